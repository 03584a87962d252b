r"""Peak host memory of train-to-serve against the largest single array.

  python benchmarks/convert_memory.py [--ffn 4096] [--keep DIR]

Builds a trainer checkpoint (params + AdamW state) of a tiny-streams model with
wide experts, so one array (an expert stack) is known and large, then runs
``launch.convert train-to-serve`` in a fresh process while a thread samples its
RSS. Reports the peak above the process's RSS just before converting (imports
and JAX runtime excluded) next to the largest array, and, for scale, the same
for restoring the whole train state at once. The first conversion in a process
also pays fixed one-time costs (runtimes, thread pools), reported separately;
the claim checked is on the second: the per-array extra peak stays within 2x
the largest array. Prints a table, then one JSON line.
"""

# isort: off
from launch import cpu_devices  # noqa: F401  (must precede jax)
# isort: on

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import pathlib  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

import psutil  # noqa: E402

ROOT = pathlib.Path(__file__).parent.parent


def wide_config(ffn: int):
  from experiments import tiny

  c = tiny.get_config()
  c.model.update(d_model=256, num_layers=5, num_dense_layers=1, expert_ffn_dim=ffn, num_shared_experts=0)
  return c


def make_checkpoint(workdir: pathlib.Path, ffn: int) -> dict:
  import jax

  from interaction import sharding
  from interaction import train_step as train
  from interaction.ckpt import trainer as checkpoint
  from interaction.experiment import experiment

  config = wide_config(ffn)
  typed = experiment(config)
  cfg = typed.model
  mesh = sharding.make_mesh({"data": 2, "expert": 4})
  _, state, _ = train.create(cfg, typed.train, mesh)
  ckpt = checkpoint.Checkpointer(workdir / "checkpoints", async_save=False)
  ckpt.save(1, state._asdict(), {}, {"config": json.loads(config.to_json())})
  ckpt.wait()
  ckpt.close()
  leaves = jax.tree.leaves(state.params)
  return {
    "largest_array_bytes": max(x.nbytes for x in leaves),
    "params_bytes": sum(x.nbytes for x in leaves),
    "state_bytes": checkpoint.size_bytes(state._asdict()),
  }


class PeakRSS:
  """Samples this process's RSS every few ms in a thread."""

  def __init__(self):
    self.proc, self.peak, self.running = psutil.Process(), 0, True
    self.thread = threading.Thread(target=self._run, daemon=True)

  def _run(self):
    while self.running:
      self.peak = max(self.peak, self.proc.memory_info().rss)
      time.sleep(0.002)

  def __enter__(self):
    self.baseline = self.proc.memory_info().rss
    self.thread.start()
    return self

  def __exit__(self, *_):
    self.running = False
    self.thread.join()
    self.peak = max(self.peak, self.proc.memory_info().rss)


def child(mode: str, src: str, dst: str) -> None:
  """Run in a fresh process: warm the imports up, then measure one conversion (or a full restore)."""
  import jax
  import orbax.checkpoint as ocp  # noqa: F401

  from interaction.ckpt import train_to_serve

  jax.devices()
  if mode == "convert":
    # The first conversion in a process also pays one-time costs (orbax and tensorstore runtimes, thread pools,
    # the model's abstract shapes) that do not grow with the checkpoint; the second shows the per-array peak.
    with PeakRSS() as cold:
      train_to_serve.convert(src, dst + "_cold")
    with PeakRSS() as m:
      train_to_serve.convert(src, dst)
    print(json.dumps({"baseline": m.baseline, "peak": m.peak, "cold_baseline": cold.baseline, "cold_peak": cold.peak}))
    return
  else:
    from interaction.ckpt import trainer as checkpoint

    ckpt = checkpoint.Checkpointer(pathlib.Path(src) / "checkpoints")
    with PeakRSS() as m:
      meta = ckpt.manager.item_metadata(1)
      ckpt.manager.restore(1, args=ocp.args.Composite(state=ocp.args.StandardRestore(meta["state"])))
  print(json.dumps({"baseline": m.baseline, "peak": m.peak}))


def measure(mode: str, src, dst) -> dict:
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  cmd = [sys.executable, __file__, "--child", mode, str(src), str(dst)]
  out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
  if out.returncode:
    raise RuntimeError(out.stderr[-3000:])
  return json.loads(out.stdout.strip().splitlines()[-1])


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--ffn", type=int, default=8192, help="expert ffn width: sets the largest array")
  p.add_argument("--keep", default=None, help="work directory to keep (default: a temporary one)")
  p.add_argument("--child", nargs=3, default=None, help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.child:
    child(*args.child)
    return
  work = pathlib.Path(args.keep or tempfile.mkdtemp(prefix="convert_memory_"))
  sizes = make_checkpoint(work / "wd", args.ffn)
  conv = measure("convert", work / "wd", work / "serve")
  full = measure("restore", work / "wd", "-")
  mb = 1 << 20
  largest = sizes["largest_array_bytes"]
  extra, extra_full = conv["peak"] - conv["baseline"], full["peak"] - full["baseline"]
  cold = {"baseline": conv["cold_baseline"], "peak": conv["cold_peak"]}
  extra_cold = cold["peak"] - cold["baseline"]
  print(f"checkpoint: params {sizes['params_bytes'] / mb:.0f} MiB, train state {sizes['state_bytes'] / mb:.0f} MiB")
  print(f"largest single array: {largest / mb:.0f} MiB")
  print(f"{'job':<36}{'baseline MiB':>14}{'peak MiB':>12}{'extra MiB':>12}{'extra / largest':>17}")
  rows = (
    ("train-to-serve, first in process", cold, extra_cold),
    ("train-to-serve, warm", conv, extra),
    ("full state restore (for scale)", full, extra_full),
  )
  for name, r, e in rows:
    print(f"{name:<36}{r['baseline'] / mb:>14.0f}{r['peak'] / mb:>12.0f}{e / mb:>12.0f}{e / largest:>17.2f}")
  ok = extra <= 2 * largest
  print(f"within the 2x bound: {ok}")
  summary = dict(sizes, convert=conv, full_restore=full, extra_over_largest=extra / largest, within_2x=ok)
  print(json.dumps(dict(summary, cold_extra_over_largest=extra_cold / largest)))
  if not args.keep:
    import shutil

    shutil.rmtree(work, ignore_errors=True)
  sys.exit(0 if ok else 1)


if __name__ == "__main__":
  main()
