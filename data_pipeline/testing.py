"""Small builders shared by the data tests and the benchmark (no test framework imports)."""

from __future__ import annotations

import dataclasses

import numpy as np

from data_pipeline import record
from data_pipeline.record import SAMPLE_RATE
from interaction.experiment import ExperimentConfig, experiment
from interaction.testing import experiment_config


def tiny_config(
  window_turns: int | None = None, batch_size: int | None = None, seed: int | None = None
) -> ExperimentConfig:
  """The typed tiny experiment (``interaction.testing``, equal to experiments/tiny.py's), data fields overridden."""
  c = experiment(experiment_config())
  given = dict(window_turns=window_turns, batch_size=batch_size, seed=seed)
  return dataclasses.replace(c, data=dataclasses.replace(c.data, **{k: v for k, v in given.items() if v is not None}))


def tone(seconds: float, freq: float = 700.0, amp: float = 0.2) -> np.ndarray:
  t = np.arange(int(round(seconds * SAMPLE_RATE))) / SAMPLE_RATE
  return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def marked_conversation(times: list[float], seconds: float = 6.0, frame_size: int = 40) -> record.Conversation:
  """Silence, video frames and labels except at each time in ``times``: a 0.1 s tone in both
  tracks, a white square in that micro-turn's frame, a one-word event per stream and cue 1."""
  n = int(seconds * SAMPLE_RATE)
  user, model = np.zeros(n, np.float32), np.zeros(n, np.float32)
  conv_turns = -(-n // record.SAMPLES_PER_TURN)
  frames = np.zeros((conv_turns, frame_size, frame_size, 3), np.uint8)
  cue = np.zeros(conv_turns, np.int32)
  events = []
  for i, t in enumerate(times):
    a = int(round(t * SAMPLE_RATE))
    x = tone(0.1)[: n - a]
    user[a : a + len(x)] += x
    model[a : a + len(x)] += x
    k = record.turn_of(t)
    frames[k, 10:30, 10:30] = 255
    cue[k] = 1
    events.append(record.Event("user_text", t, t + 0.1, f"u{i}"))
    events.append(record.Event("tool_result", t, t + 0.1, f"r{i}"))
    events.append(record.Event("model_text", t, t + 0.1, f"m{i}"))
  to16 = lambda x: np.round(x * 32767).astype(np.int16)  # noqa: E731
  return record.Conversation(
    id="marked",
    user_audio=to16(user),
    model_audio=to16(model),
    events=events,
    frames=frames,
    frame_turns=np.arange(conv_turns, dtype=np.int32),
    labels={"cue": cue},
  )
