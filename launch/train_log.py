"""What the training job writes as it goes: a JSONL log, TensorBoard events, and a progress bar."""

from __future__ import annotations

import json
import pathlib
import sys
import time

import numpy as np


def log(msg: str) -> None:
  print(msg, flush=True)


class MetricsWriter:
  """Writes scalars to ``metrics.jsonl`` and TensorBoard events under ``workdir``."""

  def __init__(self, workdir, enabled: bool = True):
    self.workdir = pathlib.Path(workdir)
    self.enabled = enabled
    self._jsonl = open(self.workdir / "metrics.jsonl", "a") if enabled else None  # noqa: SIM115
    self._tb = None
    if enabled:
      from tensorboardX import SummaryWriter

      self._tb = SummaryWriter(str(self.workdir / "tensorboard"))

  def write(self, step: int, scalars: dict) -> None:
    if not self.enabled:
      return
    row = {"step": int(step)}
    for key, value in scalars.items():
      value = np.asarray(value)
      if value.ndim == 0:
        row[key] = float(value)
        self._tb.add_scalar(key, float(value), int(step))
      else:
        row[key] = value.tolist()
        for i, v in enumerate(value.reshape(-1)):
          self._tb.add_scalar(f"{key}/{i}", float(v), int(step))
    self._jsonl.write(json.dumps(row) + "\n")
    self._jsonl.flush()

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._tb.close()


class Progress:
  """A tqdm bar with loss and tokens/s, or plain log lines when stdout is not a terminal."""

  def __init__(self, start, total, enabled):
    self.enabled, self.tty = enabled, sys.stdout.isatty()
    self.bar = None
    if enabled and self.tty:
      from tqdm import tqdm

      self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)
    self.pos, self.t0, self.start, self.total = start, time.perf_counter(), start, total

  def update(self, step, loss, tokens_per_sec):
    if self.bar is not None:
      self.bar.update(step - self.pos)
      self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_sec:,.0f}")
    elif self.enabled:
      rate = (step - self.start) / max(time.perf_counter() - self.t0, 1e-9)
      eta = (self.total - step) / max(rate, 1e-9)
      log(f"step {step}/{self.total} loss {loss:.4f} tokens/s {tokens_per_sec:,.0f} eta {eta:.0f}s")
    self.pos = step

  def close(self):
    if self.bar is not None:
      self.bar.close()
