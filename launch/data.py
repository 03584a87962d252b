r"""Make datasets: generate the embedded synthetic tasks, or convert folders of recordings.

  python -m launch.data synthetic --output /tmp/synth --train 2048 --eval 256 [--tasks turn_taking,barge_in]
  python -m launch.data convert --input recordings/ --output data/ --split train

Both write versioned, checksummed ArrayRecord shards with a ``manifest.json``
(data_pipeline/README.md). ``synthetic`` writes a train split (seed) and an eval
split (seed + 1); ``convert`` is ``data_pipeline.convert``'s command line.
"""

from __future__ import annotations

import argparse
import sys
import time

from data_pipeline import convert, synthetic
from data_pipeline.script import TASKS


def synthetic_main(argv) -> int:
  p = argparse.ArgumentParser(prog="python -m launch.data synthetic", description=synthetic.__doc__.split("\n")[0])
  p.add_argument("--output", required=True, help="dataset directory (manifest.json + shards)")
  p.add_argument("--train", type=int, default=2048, help="conversations in the train split")
  p.add_argument("--eval", type=int, default=256, help="conversations in the eval split")
  p.add_argument("--seed", type=int, default=0, help="train uses seed, eval seed + 1")
  p.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated subset of {','.join(TASKS)}")
  p.add_argument("--records-per-shard", type=int, default=512)
  p.add_argument("--frame-size", type=int, default=40, help="side in pixels of the (square) video frames")
  args = p.parse_args(argv)
  tasks = tuple(args.tasks.split(","))
  unknown = sorted(set(tasks) - set(TASKS))
  if unknown:
    p.error(f"unknown tasks {unknown}; known: {TASKS}")
  t0 = time.perf_counter()
  for split, count, seed in (("train", args.train, args.seed), ("eval", args.eval, args.seed + 1)):
    if count > 0:
      synthetic.generate(args.output, split, count, seed, tasks, args.records_per_shard, args.frame_size, progress=True)
  total = args.train + args.eval
  dt = time.perf_counter() - t0
  print(f"wrote {total} conversations to {args.output} in {dt:.1f} s ({total / dt * 60:.0f} per minute)")
  return 0


COMMANDS = {"synthetic": synthetic_main, "convert": lambda argv: convert.main(argv) or 0}


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  if argv and argv[0] in COMMANDS:
    return COMMANDS[argv[0]](argv[1:])
  usage = "\n\n".join(__doc__.strip().split("\n\n")[:2])
  if argv and argv[0] in ("-h", "--help"):
    print(usage)
    return 0
  print(f"{usage}\n\nerror: give a command: {' or '.join(COMMANDS)} (then --help for its flags)", file=sys.stderr)
  return 2


if __name__ == "__main__":
  sys.exit(main())
