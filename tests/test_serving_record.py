"""Recording a live session: what ``launch.record`` writes is what the server heard and what the model said.

A server of random weights (the shape of the tiny model) runs on a background event loop as in
``test_serving_server``; the client streams espeak-ng speech in real time, as a person's microphone would.
"""

import asyncio
import os
import subprocess
import sys

import numpy as np
import pytest
from scipy.io import wavfile

from data_pipeline import speech
from serving import live_client
from serving.protocol import SAMPLE_RATE, SAMPLES_PER_TICK
from tests.test_serving_server import TOKEN, ServerThread, engine  # noqa: F401  (the module-scoped engine fixture)


@pytest.fixture
def server(engine):  # noqa: F811
  s = ServerThread(engine)
  yield s
  s.close()


def _said(words: str) -> np.ndarray:
  x, _ = speech.say(words.split(), speech.MODEL_VOICE)
  return np.round(x * (0.5 / float(np.abs(x).max())) * 32767).astype(np.int16)


def test_the_recording_puts_what_the_server_heard_and_what_the_model_said_on_one_timeline(server, tmp_path):
  said = _said("hello there")
  ticks = 8
  url = f"ws://127.0.0.1:{server.port}/v1/session"
  rec = asyncio.run(live_client.record(url, TOKEN, said, seconds=ticks * 0.2))
  assert len(rec.ticks) == ticks and [t["turn"] for t in rec.ticks] == list(range(ticks))
  assert rec.user.shape == rec.model.shape == (ticks * SAMPLES_PER_TICK,)
  expect = np.zeros(ticks * SAMPLES_PER_TICK, np.int16)
  expect[: len(said)] = said[: len(expect)]
  np.testing.assert_array_equal(rec.user, expect)  # every sample the client sent, in the tick that heard it
  assert any(t["user_speaking"] for t in rec.ticks) and not rec.ticks[-1]["user_speaking"]
  rate, both = wavfile.read(rec.write_wav(tmp_path / "s.wav"))
  assert rate == SAMPLE_RATE and both.dtype == np.int16 and both.shape == (ticks * SAMPLES_PER_TICK, 2)
  np.testing.assert_array_equal(both[:, 0], rec.user)
  np.testing.assert_array_equal(both[:, 1], rec.model)


def test_launch_record_writes_a_stereo_wav_and_prints_the_timeline(server, tmp_path):
  out = tmp_path / "session.wav"
  cmd = [sys.executable, "-m", "launch.record", f"--url=ws://127.0.0.1:{server.port}/v1/session", "--seconds=1.2"]
  cmd += ["--say=two plus three", "--voice=en-us+f4", "--at=0.2", f"--output={out}", "--talk_over=stop"]
  env = {**os.environ, "INTERACTION_SERVER_TOKEN": TOKEN}
  done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
  assert done.returncode == 0, done.stderr
  assert f"wrote {out}" in done.stdout and "model text:" in done.stdout
  rate, both = wavfile.read(out)
  assert rate == SAMPLE_RATE and both.shape == (6 * SAMPLES_PER_TICK, 2)
  assert np.abs(both[: int(0.2 * SAMPLE_RATE) - 1, 0]).max() == 0 and np.abs(both[:, 0]).max() > 3000


def test_launch_record_without_a_token_is_one_line(tmp_path):
  env = {k: v for k, v in os.environ.items() if k != "INTERACTION_SERVER_TOKEN"}
  done = subprocess.run(
    [sys.executable, "-m", "launch.record", f"--output={tmp_path / 'x.wav'}"], capture_output=True, text=True, env=env
  )
  assert done.returncode != 0 and "Traceback" not in done.stderr and "--token" in done.stderr
  assert not (tmp_path / "x.wav").exists()
