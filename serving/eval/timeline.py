"""Timeline PNGs of streamed conversations: who is active in each micro-turn, cues, calls and results.

Rows, top to bottom: the user's speech (labels), the model's reference speech
(labels), what the model did (active turns, its spoken words), and the
conversation's cues as vertical lines; tool calls and delegations are spans
from the turn that closed the request to the turn its result arrived.
"""

from __future__ import annotations

import pathlib

import numpy as np

from data_pipeline import script
from interaction.layout import MICRO_TURN_SECONDS
from serving.eval import scores


def plot(tr: scores.Transcript, path, title: str = "") -> pathlib.Path:
  import matplotlib

  matplotlib.use("Agg")  # files only; no display
  import matplotlib.pyplot as plt

  n = tr.num_turns
  t = np.arange(n) * MICRO_TURN_SECONDS
  rows = [
    ("user speaks", tr.labels["user_speaking"] > 0, "tab:blue"),
    ("model (reference)", tr.labels["model_speaking"] > 0, "tab:gray"),
    ("model (streamed)", scores.model_active(tr), "tab:orange"),
  ]
  fig, ax = plt.subplots(figsize=(max(8.0, n * 0.12), 3.2))
  for y, (_, on, colour) in enumerate(reversed(rows)):
    ax.broken_barh([(t[i], MICRO_TURN_SECONDS) for i in np.flatnonzero(on)], (y + 0.1, 0.8), color=colour)
  for turn, word in scores.spoken_words(tr.text_out):
    ax.text(turn * MICRO_TURN_SECONDS, 0.5, _printable(word), fontsize=6, va="center", rotation=45)
  for turn in np.flatnonzero(tr.labels["cue"] > 0):
    ax.axvline(turn * MICRO_TURN_SECONDS, color="tab:red", lw=0.8, ls="--")
    ax.text(turn * MICRO_TURN_SECONDS, len(rows) + 0.05, script.CUES[tr.labels["cue"][turn]], fontsize=6)
  for call in tr.calls:
    end = call.first_tick if call.first_tick is not None else n
    ax.broken_barh(
      [(call.tick * MICRO_TURN_SECONDS, (end - call.tick) * MICRO_TURN_SECONDS)], (-0.9, 0.7), color="tab:green"
    )
    label = _printable(f"{call.kind}: {call.request[:24]} -> {(call.error or call.result)[:24]}")
    ax.text(call.tick * MICRO_TURN_SECONDS, -0.55, label, fontsize=6, va="center")
  ax.set_yticks([y + 0.5 for y in range(len(rows))] + [-0.55], [r[0] for r in reversed(rows)] + ["calls"])
  ax.set_ylim(-1.0, len(rows) + 0.5)
  ax.set_xlim(0, n * MICRO_TURN_SECONDS)
  ax.set_xlabel("seconds (one bar = one 200 ms micro-turn)")
  ax.set_title(title or tr.task, fontsize=9)
  fig.tight_layout()
  path = pathlib.Path(path)
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def _printable(s: str) -> str:
  return "".join(c if c.isprintable() and ord(c) < 0x2500 else "?" for c in s)


def plot_one_per_task(transcripts, out_dir) -> list[pathlib.Path]:
  """The first conversation of each task as ``timeline-<task>.png``."""
  seen, paths = set(), []
  for tr in transcripts:
    if tr.task not in seen:
      seen.add(tr.task)
      paths.append(plot(tr, pathlib.Path(out_dir) / f"timeline-{tr.task}.png"))
  return paths
