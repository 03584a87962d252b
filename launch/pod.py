r"""Render the job that runs ``launch.train`` on a TPU slice (GKE JobSet) or a GPU cluster (sbatch).

  python -m launch.pod --target gke-tpu --config experiments/tml_interaction_small.py \
    --topology v5p-256 --image gcr.io/me/interaction:latest --workdir /mnt/shared/run1 --dry_run
  python -m launch.pod --target slurm --config experiments/tml_interaction_small.py \
    --topology 16x8 --workdir /shared/run1 --output run1.sbatch

gke-tpu: a JobSet (the shape xpk creates) with one pod per TPU host, the
slice's accelerator, topology and chips per host, and the environment
jax.distributed needs. slurm: ``NODESxGPUS`` nodes, one process per node.
The workdir must be a filesystem every host shares. ``--dry_run`` (or no
``--output``) prints the spec; ``--config.x=y`` style overrides after ``--`` are
passed to launch.train.
"""

from __future__ import annotations

import sys
import types

import yaml
from absl import flags

from launch import cli, jobspec

FLAGS = cli.flag_values()
_TARGET = flags.DEFINE_enum("target", None, ["gke-tpu", "slurm"], "Where the job runs.", flag_values=FLAGS)
_CONFIG = flags.DEFINE_string(
  "config", None, "Experiment config file, as launch.train takes it (passed on, not read).", flag_values=FLAGS
)
_TOPOLOGY = flags.DEFINE_string(
  "topology", None, "TPU slice (v5p-256, v6e-64) or slurm NODESxGPUS (4x8).", flag_values=FLAGS
)
_WORKDIR = flags.DEFINE_string(
  "workdir", None, "Checkpoint directory on storage shared by all hosts.", flag_values=FLAGS
)
_NAME = flags.DEFINE_string("name", "interaction-train", "Job name (a DNS label).", flag_values=FLAGS)
_IMAGE = flags.DEFINE_string("image", "", "Container image with this repo installed (gke-tpu).", flag_values=FLAGS)
_QUEUE = flags.DEFINE_string("queue", None, "Kueue queue name label (gke-tpu).", flag_values=FLAGS)
_TIME = flags.DEFINE_string("time", "24:00:00", "Time limit (slurm).", flag_values=FLAGS)
_SETUP = flags.DEFINE_string(
  "setup", "", "Shell lines run before srun, e.g. 'module load cuda' (slurm).", flag_values=FLAGS
)
_GRACE = flags.DEFINE_integer("grace", 120, "Seconds between SIGTERM and the kill.", flag_values=FLAGS)
_BARRIER_TIMEOUT = flags.DEFINE_integer(
  "barrier_timeout", 300, "Seconds to wait for a missing process.", flag_values=FLAGS
)
_OUTPUT = flags.DEFINE_string("output", None, "Write the spec here instead of printing it.", flag_values=FLAGS)
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print the spec (the default without --output).", flag_values=FLAGS)


def main(argv=None) -> int:
  # What follows absl's ``--`` separator (--config.x=y overrides) is passed on to launch.train.
  extra = cli.parse(
    FLAGS,
    argv,
    doc=__doc__,
    prog="python -m launch.pod",
    required=("target", "config", "topology", "workdir"),
    positional=True,
  )
  args = types.SimpleNamespace(**{name: FLAGS[name].value for name in FLAGS})
  command = jobspec.train_command(args.config, args.workdir, extra)
  try:
    if args.target == "gke-tpu":
      if not args.image:
        raise ValueError("--image is required for --target gke-tpu")
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
    raise cli.UsageError(str(e)) from None
  if args.output and not args.dry_run:
    with open(args.output, "w") as f:
      f.write(text)
    print(f"wrote {args.output}")
  else:
    sys.stdout.write(text)
  return 0


if __name__ == "__main__":
  cli.run(main)
