r"""The 276B pod targets, AOT-compiled for real TPU slices on this CPU-only machine.

  python benchmarks/aot_report.py [--rows v5p-256:train,v5p-16:serve] [--timeout 3600]

Each row is ``python -m launch.aot --json`` in a fresh process (a compile that
runs out of HBM is a result, not a crash): the train step at the config's global
batch of 256 windows x 4096 tokens (1,048,576 tokens) on v5p-128, v5p-256 and
v6e-256, and the serving step (16 sessions x 32k-token cache) on v5p-16.
Each compile takes minutes on 2 cores. Needs libtpu (``pip install '.[tpu]'``).
Prints a table, then as the last line one JSON object with the same figures.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
CONFIG = "experiments/tml_interaction_small.py"
GIB = 2**30
# (topology, job, config overrides): the microbatch is one window per chip where the batch allows.
ROWS = {
  "v5p-128:train": ("v5p-128", "train", {"train.grad_accum": 4}),
  "v5p-256:train": ("v5p-256", "train", {"train.grad_accum": 2}),
  "v6e-256:train": ("v6e-256", "train", {"train.grad_accum": 1}),
  "v5p-16:serve": ("v5p-16", "serve", {}),
}


def compile_row(topology: str, job: str, overrides: dict, timeout: float) -> dict:
  cmd = [sys.executable, "-m", "launch.aot", "--config", CONFIG, "--topology", topology, "--job", job, "--json"]
  cmd += [f"--config.{k}={v}" for k, v in overrides.items()]
  t = time.perf_counter()
  out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
  wall = time.perf_counter() - t
  lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
  if not lines:
    tail = "\n".join(out.stderr.splitlines()[-5:])
    return {"topology": topology, "job": job, "error": f"exit {out.returncode}: {tail}", "wall_s": wall}
  return dict(json.loads(lines[-1]), overrides=overrides, wall_s=wall)


def table(rows: list[dict]) -> str:
  head = (
    f"{'topology':<9}{'chips':>6} {'job':<6}{'batch':>6}{'tokens':>10}{'mesh':>28}{'GiB/chip':>10}{'HBM':>5}"
    f"{'fits':>6}{'model FLOPs/chip':>18}{'roofline ms':>13}{'MFU<=':>7}{'compile s':>11}"
  )
  lines = [head, "-" * len(head)]
  for r in rows:
    if "error" in r:
      lines.append(f"{r['topology']:<9}{'':>6} {r['job']:<6} error: {r['error']}")
      continue
    size = (">" if r["compile_error"] else "") + f"{r['total_bytes'] / GIB:.2f}"
    lines.append(
      f"{r['topology']:<9}{r['chips']:>6} {r['job']:<6}{r['batch']:>6}{r['tokens_per_step']:>10,}"
      f"{json.dumps(r['mesh']):>28}{size:>10}"
      f"{r['hbm_bytes'] / GIB:>5.0f}"
      f"{'yes' if r['fits'] else 'NO':>6}{r['model_flops_per_chip']:>18.3e}{r['roofline_step_s'] * 1e3:>13.1f}"
      f"{r['roofline_mfu']:>7.1%}{r['compile_s']:>11.0f}"
    )
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated rows from {list(ROWS)}")
  parser.add_argument("--timeout", type=float, default=3600, help="seconds allowed per compile")
  args = parser.parse_args()
  names = [n for n in args.rows.split(",") if n]
  unknown = [n for n in names if n not in ROWS]
  if unknown:
    parser.error(f"unknown rows {unknown}; known: {list(ROWS)}")
  rows = []
  for name in names:
    print(f"compiling {name} ...", file=sys.stderr, flush=True)
    rows.append(compile_row(*ROWS[name], args.timeout))
  print(f"276B-total / 12B-active MoE ({CONFIG}); per-chip bytes = arguments + outputs - aliased + temporaries")
  print(table(rows))
  if any(r.get("compile_error") for r in rows):
    print("'>': the compiler stopped at its HBM limit; arguments + the temporaries it had reached, a lower bound")
  targets = {
    "v5p-256 train <= 60 GiB/chip": any(
      r.get("topology") == "v5p-256" and r.get("job") == "train" and r.get("total_bytes", 1e99) <= 60 * GIB
      for r in rows
    ),
    "v5p-128 train fits": any(r.get("topology") == "v5p-128" and r.get("fits") for r in rows),
    "v5p-16 serve fits (16 x 32k)": any(r.get("topology") == "v5p-16" and r.get("fits") for r in rows),
  }
  for name, ok in targets.items():
    print(f"target {name}: {'pass' if ok else 'FAIL'}")
  print(json.dumps({"benchmark": "aot_report", "config": CONFIG, "rows": rows, "targets": targets}))


if __name__ == "__main__":
  main()
