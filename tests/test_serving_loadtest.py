"""The load tool: a short run against an in-process server, and its playback (underrun) model."""

import asyncio
import json
import math

import numpy as np
import pytest

from data_pipeline import wav
from launch import loadtest as launch_loadtest
from serving import loadtest
from serving import server as server_lib
from serving.engine import open_engine
from tests.helpers import save_checkpoint

TOKEN = "loadtest-token"
SLOTS = 3


def test_three_sessions_stream_tick_end_cleanly_and_the_fourth_is_refused(tmp_path):
  workdir = save_checkpoint(tmp_path)
  audio_dir = tmp_path / "speech"
  audio_dir.mkdir()
  # 22.05 kHz: the tool resamples to 16 kHz, as espeak-ng's output needs.
  wav.write_wav(audio_dir / "voiced.wav", wav.resample(loadtest.synthetic_speech(4.0), 16000, 22050), 22050)
  engine = open_engine(str(workdir), SLOTS)

  async def scenario():
    srv = server_lib.LiveServer(engine, token=TOKEN, autotick=True, log=lambda *a: None)
    port = await srv.start("127.0.0.1", 0)
    try:
      options = loadtest.Options(
        url=f"ws://127.0.0.1:{port}/v1/session",
        token=TOKEN,
        sessions=SLOTS,
        duration=3.0,
        audio_dir=str(audio_dir),
        extra_session_at=1.5,
        progress=0,
      )
      return await loadtest.run(options), srv.stats()
    finally:
      await srv.drain()

  report, stats = asyncio.run(scenario())
  engine.close()
  text = loadtest.format_table(report)
  assert json.loads(json.dumps(report)) == report, "the report is plain JSON"
  for field in (
    "connected",
    "refused",
    "errors",
    "unexpected_closes",
    "ticks_per_session",
    "tick_ms",
    "underruns",
    "stalls",
    "server_counters",
    "max_late_ms",
    "slow_clients",
    "extra_session",
    "closes",
    "loadavg",
  ):
    assert field in report, field
  assert report["connected"] == SLOTS and report["refused"] == 0, text
  assert report["errors"] == 0 and report["unexpected_closes"] == 0, text
  assert report["closes"] == [{"code": 1000, "reason": "session ended by client", "expected": True, "count": SLOTS}]
  # 3 s of 200 ms ticks; the first tick may come before the first chunk, the last after session.end.
  assert 8 <= report["ticks_per_session"]["min"] <= report["ticks_per_session"]["max"] <= 17, text
  ticks = report["tick_ms"]["count"]
  assert ticks >= 10 * SLOTS and 0 < report["tick_ms"]["p50"] <= report["tick_ms"]["p99"] <= report["tick_ms"]["max"]
  # One model audio frame per tick (a frame whose tick event was still queued at session.end is dropped with it).
  assert ticks <= report["frames"] <= ticks + SLOTS, report
  extra = report["extra_session"]
  assert extra["all_connected"] and extra["outcome"] == "refused", extra
  assert extra["how"].startswith(("503", "1013")), extra
  assert math.isfinite(extra["refusal_ms"]) and extra["refusal_ms"] > 0, extra
  assert stats["refused_full"] == 1 and stats["sessions"] == SLOTS, stats
  counters = report["server_counters"]
  assert counters["sessions"] == SLOTS and counters["refused_full"] == 1 and counters["ticks"] >= 10, counters
  assert "extra session" in text and "tick latency ms" in text


def test_playback_counts_frames_arriving_after_their_due_time():
  pb = loadtest.Playback()
  # Frame 0 at 10.0 s: playback starts at 10.2 s; frame k is due at 10.2 + 0.2 k.
  arrivals = [10.0, 10.35, 10.5, 10.75, 10.95]  # up to 150 ms behind the tick grid: the jitter buffer absorbs it
  assert [round(pb.arrive(t), 3) for t in arrivals] == [-0.2, -0.05, -0.1, -0.05, -0.05]
  assert pb.underruns == 0 and pb.max_late_s == 0 and math.isclose(pb.min_margin_s, 0.05)
  assert math.isclose(pb.arrive(11.25), 0.05)  # frame 5, due at 11.2, comes 250 ms behind the grid: late
  assert math.isclose(pb.arrive(11.3), -0.1)  # frame 6, due at 11.4: in time again (the schedule does not move)
  assert math.isclose(pb.arrive(12.1), 0.5)  # frame 7, due at 11.6: a stall of 500 ms
  assert pb.underruns == 2 and math.isclose(pb.max_late_s, 0.5) and math.isclose(pb.min_margin_s, -0.5)
  assert pb.frames == 8
  # A rebuffering player runs dry twice: 50 ms before frame 5, then (playing 50 ms later) 450 ms before frame 7.
  assert pb.stalls == 2 and math.isclose(pb.stall_s, 0.5)


def test_playback_of_steady_frames_never_underruns_and_a_missing_tick_costs_every_later_frame():
  steady = loadtest.Playback()
  for k in range(100):
    steady.arrive(3.0 + 0.2 * k + 0.19 * (k % 2))  # alternate 0 / 190 ms late after the first: inside the buffer
  assert steady.underruns == 0 and math.isclose(steady.min_margin_s, 0.01)
  gap = loadtest.Playback()
  times = [0.2 * k for k in range(10)] + [0.2 * k for k in range(11, 20)]  # the frame of tick 10 never comes
  for t in times:
    gap.arrive(t)
  assert gap.underruns == 0, "one missing frame is covered by the 200 ms buffer"
  gap2 = loadtest.Playback()
  for t in [0.2 * k for k in range(10)] + [0.2 * k for k in range(12, 20)]:  # two missing: every later frame is late
    gap2.arrive(t)
  assert gap2.underruns == 8 and math.isclose(gap2.max_late_s, 0.2)
  assert gap2.stalls == 1 and math.isclose(gap2.stall_s, 0.2), "a rebuffering player runs dry once"


def test_speech_sources_and_refusal_parsing(tmp_path, monkeypatch):
  monkeypatch.setattr(loadtest.shutil, "which", lambda name: None)  # no espeak-ng: the synthetic fallback
  said = []
  speech, source = loadtest.load_speech(None, log=said.append)
  assert speech.dtype == np.int16 and len(speech) >= 10 * loadtest.SAMPLE_RATE and "synthetic" in source
  assert said and "espeak-ng" in said[0]
  rms = np.sqrt(np.mean((speech / 32768.0) ** 2))
  assert 0.02 < rms < 0.5, rms  # voiced: above the server's -40 dBFS speech threshold
  wav.write_wav(tmp_path / "a.wav", np.zeros(8000, np.float32), 8000)  # 1 s at 8 kHz
  speech, source = loadtest.load_speech(str(tmp_path))
  assert len(speech) == loadtest.SAMPLE_RATE + int(loadtest.PAUSE_S * loadtest.SAMPLE_RATE) and "1 WAV" in source
  monkeypatch.setenv(loadtest.TOKEN_ENV, "from-env")
  options = launch_loadtest.parse_options(["--sessions", "2", "--slow-clients", "1"])
  assert options.token == "from-env" and options.sessions == 2 and options.slow_clients == 1
  monkeypatch.delenv(loadtest.TOKEN_ENV)
  with pytest.raises(SystemExit, match=f"^error: no token: pass --token or set \\${loadtest.TOKEN_ENV}$") as e:
    launch_loadtest.main(["--sessions", "2"])
  assert e.value.code == 2
