r"""Data pipeline throughput: windows and micro-turns per second from shards, per worker count.

  python benchmarks/data_throughput.py                      # synthetic shards in a temp dir
  python benchmarks/data_throughput.py --data-dir DIR --train-windows-per-sec 12.5

Uses experiments/tiny.py's streams, window and batch size. Prints a table and, as
its last line, one JSON object with the same figures. The ratio to training's
consumption rate (target >= 20x) is null unless --train-windows-per-sec is given.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_pipeline import pipeline, synthetic  # noqa: E402
from data_pipeline.testing import tiny_config  # noqa: E402

TARGET_RATIO = 20.0


def measure(data_dir, workers: int, threads: int, seconds: float, warmup: int = 3) -> dict:
  """Steady-state rate of one pipeline configuration (after ``warmup`` batches)."""
  cfg = tiny_config()
  it = pipeline.make_pipeline(
    cfg, data_dir, seed=0, process_index=0, process_count=1, workers=workers, read_threads=threads
  )
  try:
    for _ in range(warmup):
      next(it)
    batches, real_turns, t0 = 0, 0.0, time.perf_counter()
    while (dt := time.perf_counter() - t0) < seconds:
      b = next(it)
      batches += 1
      real_turns += float(b["turn_mask"].sum())
  finally:
    it.close()
  windows = batches * cfg.data.batch_size
  return {
    "workers": workers,
    "read_threads": threads,
    "batches": batches,
    "windows_per_sec": round(windows / dt, 1),
    "micro_turns_per_sec": round(windows * cfg.data.window_turns / dt, 1),
    "real_micro_turns_per_sec": round(real_turns / dt, 1),
  }


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--data-dir", help="dataset directory with a train split (default: fresh synthetic shards)")
  p.add_argument("--conversations", type=int, default=512, help="synthetic conversations when no --data-dir")
  p.add_argument("--seconds", type=float, default=8.0, help="measuring time per configuration")
  p.add_argument("--workers", default="0,1,2", help="comma-separated worker process counts (0 = in-process)")
  p.add_argument("--train-windows-per-sec", type=float, default=None, help="training's consumption rate, for the ratio")
  args = p.parse_args(argv)
  cfg = tiny_config()
  with tempfile.TemporaryDirectory() as tmp:
    data_dir = args.data_dir
    if data_dir is None:
      data_dir = tmp
      t0 = time.perf_counter()
      synthetic.generate(tmp, "train", args.conversations, seed=0)
      gen = args.conversations / (time.perf_counter() - t0) * 60
      print(f"generated {args.conversations} synthetic conversations ({gen:.0f} per minute)")
    rows = [measure(data_dir, int(w), 0 if int(w) else 1, args.seconds) for w in args.workers.split(",")]
  train = args.train_windows_per_sec
  for r in rows:
    r["ratio_to_training"] = None if train is None else round(r["windows_per_sec"] / train, 1)
  print(
    f"\ntiny config: batch {cfg.data.batch_size} x window {cfg.data.window_turns} micro-turns; {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}"
  )
  header = f"{'workers':>7} {'windows/s':>10} {'micro-turns/s':>14} {'real turns/s':>13} {'x training':>11}"
  print(header + "\n" + "-" * len(header))
  for r in rows:
    ratio = "n/a" if r["ratio_to_training"] is None else f"{r['ratio_to_training']:.1f}x"
    print(
      f"{r['workers']:>7} {r['windows_per_sec']:>10.1f} {r['micro_turns_per_sec']:>14.1f} {r['real_micro_turns_per_sec']:>13.1f} {ratio:>11}"
    )
  note = (
    "training does not exist yet: pass --train-windows-per-sec to get the ratio"
    if train is None
    else f"target >= {TARGET_RATIO:.0f}x training's {train} windows/s"
  )
  print(note)
  summary = {
    "benchmark": "data_throughput",
    "config": "experiments/tiny.py",
    "batch_size": cfg.data.batch_size,
    "window_turns": cfg.data.window_turns,
    "cpus": os.cpu_count(),
    "rows": rows,
    "train_windows_per_sec": train,
    "target_ratio": TARGET_RATIO,
    "note": note,
  }
  print(json.dumps(summary))


if __name__ == "__main__":
  main()
