r"""Save and restore time of a trainer checkpoint with and without verification.

  python benchmarks/checkpoint_io.py [--params 1e9] [--reps 3] [--dir /tmp]

Two states: the tiny experiment's train state (parameters and AdamW moments) and a state of
``--params`` float32 parameters (1B by default, 4 GB, in 64 arrays). Each is saved and restored
``--reps`` times, alternating the two ways so drift on a shared machine hits both alike:

- verified: ``interaction.ckpt.trainer.Checkpointer`` (the trainer's path: digests written before
  the step commits, every file checked before the restore reads it);
- plain: the same checkpointer (its finiteness check, manifest and async orbax save) with the
  digest callback and the check turned off.

Save time runs from ``save`` until the step is committed (``wait_until_finished``); restore time
until every array is on the device. Medians; the overhead is verified / plain - 1. Prints a
table, then one JSON line.
"""

# isort: off
from launch import cpu_devices  # noqa: F401  (must precede jax)
# isort: on

import argparse  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402


def tiny_state():
  import jax

  from experiments import tiny
  from interaction import sharding
  from interaction import train_step as train
  from interaction.experiment import experiment

  config = experiment(tiny.get_config())
  mesh = sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])
  _, state, _ = train.create(config.model, config.train, mesh)
  return state._asdict()


def big_state(params: int, arrays: int = 64):
  import jax
  import jax.numpy as jnp

  rows = max(1, params // (arrays * 4096))
  keys = jax.random.split(jax.random.key(0), arrays)
  return {"params": {f"w{i:02d}": jax.random.normal(k, (rows, 4096), jnp.float32) for i, k in enumerate(keys)}}


class Verified:
  """The trainer's checkpointer: digests before the commit, a check of every file before a restore."""

  def __init__(self, directory):
    from interaction.ckpt import trainer as checkpoint

    self.ckpt = self.make(checkpoint)(directory, keep=2)

  @staticmethod
  def make(checkpoint):
    return checkpoint.Checkpointer

  def save(self, step, state):
    self.ckpt.save(step, state, {}, {"step": step})
    self.ckpt.wait()

  def restore(self, step, target):
    return self.ckpt.restore(step, target)[0]


class Plain(Verified):
  """The same checkpointer (finiteness check, manifest, async orbax save) with no digests and no check."""

  @staticmethod
  def make(checkpoint):
    class Unverified(checkpoint.Checkpointer):
      def _write_digests(self):
        pass

      def check(self, step):
        pass

    return Unverified


def measure(state, reps: int, root: pathlib.Path) -> dict:
  import jax

  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
  times = {(way, op): [] for way in ("plain", "verified") for op in ("save", "restore")}
  for rep in range(-1, reps):  # rep -1 warms up (compilation of the finiteness check, thread pools)
    for way, cls in (
      (("plain", Plain), ("verified", Verified)) if rep % 2 == 0 else (("verified", Verified), ("plain", Plain))
    ):
      directory = root / f"{way}{rep}"
      saver = cls(directory)
      t = time.perf_counter()
      saver.save(1, state)
      saved = time.perf_counter() - t
      t = time.perf_counter()
      jax.block_until_ready(saver.restore(1, target))
      restored = time.perf_counter() - t
      if rep >= 0:
        times[(way, "save")].append(saved)
        times[(way, "restore")].append(restored)
      shutil.rmtree(directory)
  return {f"{way}_{op}_s": statistics.median(v) for (way, op), v in times.items()}


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--params", type=float, default=1e9, help="parameters of the large state (float32)")
  p.add_argument("--reps", type=int, default=3)
  p.add_argument("--dir", default=None, help="where to write the checkpoints (default: a temporary directory)")
  args = p.parse_args()
  import jax

  from interaction.ckpt import trainer as checkpoint

  results = {}
  with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
    for name, make in (("tiny", tiny_state), ("1B" if args.params == 1e9 else f"{args.params:.0e}", None)):
      state = make() if make else big_state(int(args.params))
      nbytes = checkpoint.size_bytes(state)
      r = measure(state, args.reps if make is None else max(args.reps, 7), pathlib.Path(tmp) / name)
      del state
      r["bytes"] = nbytes
      r["save_overhead"] = r["verified_save_s"] / r["plain_save_s"] - 1
      r["restore_overhead"] = r["verified_restore_s"] / r["plain_restore_s"] - 1
      results[name] = r
  print(
    f"{'state':>6} {'GB':>6} | {'save plain':>10} {'verified':>9} {'+%':>6} | {'restore plain':>13} {'verified':>9} {'+%':>6}"
  )
  for name, r in results.items():
    print(
      f"{name:>6} {r['bytes'] / 1e9:6.2f} | {r['plain_save_s']:9.2f}s {r['verified_save_s']:8.2f}s "
      f"{100 * r['save_overhead']:5.1f}% | {r['plain_restore_s']:12.2f}s {r['verified_restore_s']:8.2f}s "
      f"{100 * r['restore_overhead']:5.1f}%"
    )
  print(
    f"medians of {args.reps} (tiny: {max(args.reps, 7)}); devices: {jax.device_count()} x {jax.devices()[0].platform}"
  )
  print(json.dumps(results))


if __name__ == "__main__":
  main()
