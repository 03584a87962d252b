"""The trained model listens, live: spoken questions over the WebSocket protocol in real time.

Slow (``make test-slow``): it serves the checkpoint ``make demo`` trains
(``$INTERACTION_DEMO_CHECKPOINT``, default ``workdir/demo``) and trains one with
the demo's config first when there is none. Every input is what a live client
sends: espeak-ng speech in voices the model never heard in training, streamed
in 200 ms chunks against the wall clock; nothing is typed.
"""

from __future__ import annotations

import asyncio
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from data_pipeline import speech
from serving import live_client
from tests.helpers import running_server

ROOT = pathlib.Path(__file__).resolve().parent.parent
TOKEN = "live-listening-test"
ASKER = speech.Voice(accent="en-us", variant="f4", rate=165, pitch=55, range=50)  # held out of training
OTHER = speech.Voice(accent="en-gb-scotland", variant="m6", rate=185, pitch=35, range=40)  # held out too
LEAD_S = 0.6

pytestmark = pytest.mark.slow


def clip(words: str, voice: speech.Voice, level: float = 0.6) -> np.ndarray:
  x, _ = speech.say(words.split(), voice)
  return np.round(x * (level / float(np.abs(x).max())) * 32767).astype(np.int16)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> pathlib.Path:
  path = pathlib.Path(os.environ.get("INTERACTION_DEMO_CHECKPOINT", ROOT / "workdir" / "demo"))
  if not (path / "checkpoints").is_dir():
    path = tmp_path_factory.mktemp("demo")
    cmd = [sys.executable, "-m", "launch.train", "--config", "experiments/tiny.py", "--workdir", str(path)]
    subprocess.run(cmd, cwd=ROOT, check=True, env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=3600)
  return path


@pytest.fixture(scope="module")
def url(checkpoint):
  with running_server(checkpoint, TOKEN, slots=2) as (_, session_url):
    yield session_url


def session(url, said: np.ndarray, seconds: float, **kw) -> live_client.Recording:
  stream = np.concatenate([np.zeros(int(LEAD_S * live_client.SAMPLE_RATE), np.int16), said])
  return asyncio.run(live_client.record(url, TOKEN, stream, seconds=seconds, **kw))


def test_a_spoken_question_gets_the_answer_and_a_second_voice_stops_the_model(url, tmp_path):
  question = clip("what is two plus three", ASKER)
  end_s = LEAD_S + len(question) / live_client.SAMPLE_RATE
  rec = session(
    url, question, seconds=end_s + 5.0, talk_over=clip("wait, stop, hold on", OTHER), talk_over_after_s=end_s
  )
  rec.write_wav(tmp_path / "question.wav")
  calls = [c for c in rec.calls if c["type"] == "tool_call"]
  assert [c["request"] for c in calls][:1] == ["add(2,3)"], (rec.text(), rec.calls)
  assert "five" in rec.text().split(), rec.text()
  onsets = [t for t in rec.model_onsets() if t > end_s - 0.2]
  assert onsets and onsets[0] - end_s <= 0.6, (onsets, end_s)
  # The second voice talks over the answer: the model's voice stops within 0.4 s of its start.
  assert rec.talk_over_at_s is not None and rec.talk_over_at_s > onsets[0], (rec.talk_over_at_s, onsets)
  stops = rec.model_voice_end_after(rec.talk_over_at_s)
  assert stops is not None and stops - rec.talk_over_at_s <= 0.4, (stops, rec.talk_over_at_s)
