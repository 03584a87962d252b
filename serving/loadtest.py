r"""Load test for the live server: N clients streaming real speech in real time, reading everything.

The library of ``python -m launch.loadtest`` (its command line, flags and exit status are there):
``run(Options(...))`` returns the report that ``format_table`` prints and ``clean`` judges.

Each client opens a session (``serving/PROTOCOL.md``), then sends 200 ms chunks of speech (``0x01`` +
PCM16LE, 16 kHz mono) paced against the wall clock from its ``session.started`` (chunk i leaves at
start + i * 200 ms, so pacing never drifts), looping the audio; ``--video`` adds one JPEG per chunk.
Speech: the WAV files of ``--audio DIR`` (any rate and channel count; resampled to 16 kHz mono),
else a few sentences synthesized with ``espeak-ng``, else a voiced synthetic signal. Every client
reads everything and counts model audio frames, ticks (with ``timing.tick_ms``, the server's tick
latency), errors and how its session closed.

Playback model (underruns): a client starts playing one tick (200 ms jitter buffer) after its first
model audio frame arrives; frame k is due at that start + k * 200 ms; a frame that arrives after it
is due is an underrun. Tick latency and underruns are figures of the normal clients only.

``--slow_clients K``: K clients (8 KiB socket receive buffer, one-frame client queue) stop reading
after ``--slow_after`` seconds, right after the next keepalive ping from the server. A client that
never reads never answers pings either, so two limits race: the keepalive closes it 10-15 s after it
stops (``ping_timeout_s`` after the first unanswered ping), the output cap once ~256 KiB are unsent
(~12 s of model audio plus kernel buffers here). Stopping just after a ping gives the cap the whole
ping interval + timeout. They keep the connection open and keep sending audio. The server's close
frame queues behind the output they did not read, so the tool polls ``GET /v1/stats`` (``closed_slow``)
and, once the server has closed them, lets them read again to collect the close code and reason it
sent; the time is the one the counter rose (+/- 0.25 s).
The run goes on past ``--duration`` (up to ``--slow_linger`` s) while a slow client is still open.

``--extra_session_at T``: at T seconds, with every client connected, one more session is opened and
the time until it is refused is measured (``503`` before the upgrade, or close code ``1013``).

This module is the tool's entry (``run``) and where its speech comes from; ``loadtest_run`` runs the
clients, ``loadtest_clients`` holds one client's record, playback model and connection,
``loadtest_sources`` the speech and video it sends, ``loadtest_report`` the report and table.
"""

from __future__ import annotations

import asyncio
import pathlib
import shutil
import subprocess
import sys
import tempfile

import numpy as np

from data_pipeline import wav
from serving.loadtest_clients import Options
from serving.loadtest_clients import Playback as Playback
from serving.loadtest_clients import fetch_stats as fetch_stats
from serving.loadtest_report import clean as clean
from serving.loadtest_report import format_table as format_table
from serving.loadtest_run import LoadTest as LoadTest
from serving.loadtest_sources import PAUSE_S, SENTENCES, espeak_sentences, synthetic_speech
from serving.protocol import SAMPLE_RATE
from serving.protocol import TOKEN_ENV as TOKEN_ENV


def load_speech(audio_dir: str | None = None, log=print) -> tuple[np.ndarray, str]:
  """(int16 mono 16 kHz speech to loop, where it came from): --audio DIR, else espeak-ng, else synthetic."""
  pause = np.zeros(int(PAUSE_S * SAMPLE_RATE), np.float32)

  def join(files) -> np.ndarray:
    pieces = []
    for f in files:
      x, rate = wav.read_wav(f)
      pieces += [wav.resample(x, rate, SAMPLE_RATE), pause]
    return wav.to_int16(np.concatenate(pieces))

  if audio_dir:
    files = sorted(p for p in pathlib.Path(audio_dir).iterdir() if p.suffix.lower() == ".wav")
    if not files:
      raise SystemExit(f"error: no .wav files in {audio_dir}")
    speech = join(files)
    return speech, f"{len(files)} WAV files in {audio_dir} ({len(speech) / SAMPLE_RATE:.1f} s, looped)"
  if shutil.which("espeak-ng"):
    try:
      with tempfile.TemporaryDirectory(prefix="loadtest-speech-") as tmp:
        speech = join(espeak_sentences(pathlib.Path(tmp)))
      return speech, f"espeak-ng, {len(SENTENCES)} sentences ({len(speech) / SAMPLE_RATE:.1f} s, looped)"
    except (OSError, subprocess.SubprocessError, wav.WavError) as e:
      log(f"espeak-ng failed ({type(e).__name__}: {e}): using a synthetic voiced signal")
  else:
    log("espeak-ng is not installed and no --audio DIR was given: using a synthetic voiced signal")
  return wav.to_int16(synthetic_speech()), "synthetic voiced signal (no espeak-ng)"


async def run(options: Options, speech: np.ndarray | None = None, source: str | None = None, log=None) -> dict:
  """Run the load test; ``speech`` (int16, 16 kHz) defaults to ``load_speech(options.audio_dir)``."""
  log = log or (lambda line: print(line, file=sys.stderr, flush=True))
  if speech is None:
    speech, source = await asyncio.to_thread(load_speech, options.audio_dir, log)
  return await LoadTest(options, speech, source=source or "given", log=log).run()
