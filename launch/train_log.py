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
  """Writes scalars to ``metrics.jsonl`` and TensorBoard events under ``workdir``.

  A run resumed at step ``resumed_at`` first drops the JSONL rows logged past that step by the
  interrupted run (they are logged again) and has TensorBoard purge them (``purge_step``), so
  every step appears once in both.
  """

  def __init__(self, workdir, enabled: bool = True, resumed_at: int | None = None):
    self.workdir = pathlib.Path(workdir)
    self.enabled = enabled
    self.path = self.workdir / "metrics.jsonl"
    self._jsonl = self._tb = None
    if not enabled:
      return
    if resumed_at is not None and self.path.exists():
      self._rewrite(lambda row: row.get("step", 0) <= resumed_at)
    self._jsonl = open(self.path, "a")  # noqa: SIM115
    from tensorboardX import SummaryWriter

    purge = None if resumed_at is None else resumed_at + 1
    self._tb = SummaryWriter(str(self.workdir / "tensorboard"), purge_step=purge)

  def _rows(self) -> list[dict]:
    rows = []
    for line in self.path.read_text().splitlines():
      try:
        rows.append(json.loads(line))
      except ValueError:
        continue  # a line torn by a kill mid-write
    return rows

  def _rewrite(self, keep) -> bool:
    """Keep the rows ``keep`` accepts (atomic replace); True if any row was dropped."""
    rows = self._rows()
    kept = [r for r in rows if keep(r)]
    tmp = self.path.with_name(self.path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
    tmp.replace(self.path)
    return len(kept) != len(rows)

  def write(self, step: int, scalars: dict, *, replace: bool = False) -> None:
    """One row at ``step``; with ``replace`` a row of the same step and keys (a re-run's evaluation)
    is replaced in the JSONL and not added to TensorBoard a second time."""
    if not self.enabled:
      return
    row = {"step": int(step)}
    for key, value in scalars.items():
      value = np.asarray(value)
      row[key] = float(value) if value.ndim == 0 else value.tolist()
    replaced = False
    if replace:
      self._jsonl.close()
      replaced = self._rewrite(lambda r: not (r.get("step") == row["step"] and r.keys() == row.keys()))
      self._jsonl = open(self.path, "a")  # noqa: SIM115
    if not replaced:
      self._add_tb(int(step), row)
    self._jsonl.write(json.dumps(row) + "\n")
    self._jsonl.flush()

  def _add_tb(self, step: int, row: dict) -> None:
    for key, value in row.items():
      if key == "step":
        continue
      if isinstance(value, list):
        for i, v in enumerate(np.asarray(value).reshape(-1)):
          self._tb.add_scalar(f"{key}/{i}", float(v), step)
      else:
        self._tb.add_scalar(key, value, step)

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
