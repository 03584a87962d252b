r"""Evaluation job: stream held-out conversations through the engine and score interaction behaviour.

  python -m launch.evaluate --checkpoint workdir/demo --data workdir/demo/data [--slots 32] [--output DIR]
                            [--require-targets] [--temperature 0] [--max-conversations N] [--oracle]

``--checkpoint`` is anything ``interaction.ckpt.open_model`` opens: a trainer
workdir, its checkpoints directory or one step, or a serve checkpoint (what
``launch.convert`` writes). Each conversation of the eval split is a session fed
one micro-turn per tick; the model free-runs (serving/eval/evaluate.py). Writes
``report.json`` and timeline PNGs to ``--output`` and prints a table.
``--require-targets`` exits 1 when any target fails; ``--oracle`` scores the
recorded model streams instead (the data's own behaviour).
"""

from __future__ import annotations

import argparse
import sys

from data_pipeline import shards
from interaction.ckpt import ServeCheckpointError, UnsafePathError
from serving.eval import evaluate


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python -m launch.evaluate", description=__doc__.split("\n\n")[0])
  p.add_argument("--checkpoint", required=True, help="trainer workdir, checkpoints directory, one step, or serve dir")
  p.add_argument("--data", required=True, help="dataset directory with manifest.json and an eval split")
  p.add_argument("--slots", type=int, default=32, help="engine slots (sessions streamed at once)")
  p.add_argument("--output", help="directory for report.json and timeline PNGs")
  p.add_argument("--require-targets", action="store_true", help="exit 1 when any figure misses its target")
  p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
  p.add_argument("--top-p", type=float, default=1.0)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--max-conversations", type=int)
  p.add_argument("--oracle", action="store_true", help="score the recorded model streams (checks the metrics)")
  return p.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(argv)
  if args.slots < 1:
    raise SystemExit(f"error: --slots must be >= 1, got {args.slots}")
  try:
    report = evaluate.run(
      args.checkpoint,
      args.data,
      args.slots,
      args.output,
      temperature=args.temperature,
      top_p=args.top_p,
      seed=args.seed,
      max_conversations=args.max_conversations,
      oracle=args.oracle,
    )
  except (FileNotFoundError, shards.ManifestError) as e:  # CheckpointNotFoundError included
    raise SystemExit(
      f"error: {e}\n(--checkpoint takes a trainer workdir or a serve checkpoint, --data a dataset directory; "
      "after make demo: --checkpoint workdir/demo --data workdir/demo/data)"
    ) from None
  except (ServeCheckpointError, UnsafePathError) as e:
    raise SystemExit(f"error: {e}") from None
  if args.require_targets and not report["all_targets_pass"]:
    print(f"--require-targets: {len(report['targets_failed'])} target(s) failed", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
