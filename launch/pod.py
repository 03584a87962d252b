r"""Render the job that runs ``launch.train`` on a TPU slice (GKE JobSet) or a GPU cluster (sbatch).

  python -m launch.pod --target gke-tpu --config experiments/tml_interaction_small.py \
    --topology v5p-256 --image gcr.io/me/interaction:latest --workdir /mnt/shared/run1 --dry-run
  python -m launch.pod --target slurm --config experiments/tml_interaction_small.py \
    --topology 16x8 --workdir /shared/run1 --output run1.sbatch

gke-tpu: a JobSet (the shape xpk creates) with one pod per TPU host, the
slice's accelerator, topology and chips per host, and the environment
jax.distributed needs. slurm: ``NODESxGPUS`` nodes, one process per node.
The workdir must be a filesystem every host shares. ``--dry-run`` (or no
``--output``) prints the spec; ``--config.x=y`` style overrides after ``--`` are
passed to launch.train.
"""

from __future__ import annotations

import argparse
import sys

import yaml

from launch import jobspec


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  extra = []
  if "--" in argv:
    split = argv.index("--")
    argv, extra = argv[:split], argv[split + 1 :]
  parser = argparse.ArgumentParser(
    prog="python -m launch.pod", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument("--target", required=True, choices=["gke-tpu", "slurm"])
  parser.add_argument("--config", required=True, help="experiment config file, as launch.train takes it")
  parser.add_argument("--topology", required=True, help="TPU slice (v5p-256, v6e-64) or slurm NODESxGPUS (4x8)")
  parser.add_argument("--workdir", required=True, help="checkpoint directory on storage shared by all hosts")
  parser.add_argument("--name", default="interaction-train", help="job name (a DNS label)")
  parser.add_argument("--image", default="", help="container image with this repo installed (gke-tpu)")
  parser.add_argument("--queue", default=None, help="Kueue queue name label (gke-tpu)")
  parser.add_argument("--time", default="24:00:00", help="time limit (slurm)")
  parser.add_argument("--setup", default="", help="shell lines run before srun, e.g. 'module load cuda' (slurm)")
  parser.add_argument("--grace", type=int, default=120, help="seconds between SIGTERM and the kill")
  parser.add_argument("--barrier-timeout", type=int, default=300, help="seconds to wait for a missing process")
  parser.add_argument("--output", default=None, help="write the spec here instead of printing it")
  parser.add_argument("--dry-run", action="store_true", help="print the spec (the default without --output)")
  args = parser.parse_args(argv)
  command = jobspec.train_command(args.config, args.workdir, extra)
  try:
    if args.target == "gke-tpu":
      if not args.image:
        parser.error("--image is required for --target gke-tpu")
      spec = jobspec.jobset(
        args.name,
        args.topology,
        args.image,
        command,
        grace_s=args.grace,
        barrier_timeout_s=args.barrier_timeout,
        queue=args.queue,
      )
      text = yaml.safe_dump(spec, sort_keys=False)
    else:
      text = jobspec.sbatch(
        args.name,
        args.topology,
        command,
        time_limit=args.time,
        grace_s=args.grace,
        barrier_timeout_s=args.barrier_timeout,
        setup=args.setup,
      )
  except ValueError as e:
    parser.error(str(e))
  if args.output and not args.dry_run:
    with open(args.output, "w") as f:
      f.write(text)
    print(f"wrote {args.output}")
  else:
    sys.stdout.write(text)
  return 0


if __name__ == "__main__":
  sys.exit(main())
