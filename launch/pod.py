r"""Render the job that trains, evaluates or serves on a TPU slice (GKE) or a GPU cluster (sbatch).

  python -m launch.pod --target gke-tpu --config experiments/tml_interaction_small.py \
    --topology v5p-256 --image gcr.io/me/interaction:latest --workdir /mnt/shared/run1 --dry_run
  python -m launch.pod --target slurm --config experiments/tml_interaction_small.py \
    --topology 16x8 --workdir /shared/run1 --output run1.sbatch
  python -m launch.pod --job serve --target gke-tpu --topology v5p-16 --image IMG \
    --checkpoint /mnt/shared/run1 --mesh expert=8 --slots 16
  python -m launch.pod --job evaluate --target slurm --topology 2x8 --checkpoint /shared/run1 \
    --mesh data=2,expert=8 --eval_output /shared/run1/eval

--job train (default) and evaluate, gke-tpu: a JobSet (the shape xpk creates) with
one pod per TPU host, the slice's accelerator, topology and chips per host, and
the environment jax.distributed needs. --job serve, gke-tpu: a LeaderWorkerSet
(the leader is process 0 with the WebSocket front end, the workers the other
hosts; the group restarts as one) and a Service to the leader's port 8000; the
access token comes from the Secret ``--token_secret`` (key ``token``). slurm:
``NODESxGPUS`` nodes, one process per node, for every job. Paths must be on
storage every host shares. ``--dry_run`` (or no ``--output``) prints the spec;
arguments after ``--`` are passed on to the job.
"""

from __future__ import annotations

import sys
import types

import yaml
from absl import flags

from launch import cli, jobspec

FLAGS = cli.flag_values()
_JOB = flags.DEFINE_enum("job", "train", ["train", "evaluate", "serve"], "What the job runs.", flag_values=FLAGS)
_CHECKPOINT = flags.DEFINE_string(
  "checkpoint", None, "What evaluate/serve open (a trainer workdir or serve checkpoint).", flag_values=FLAGS
)
_MESH = flags.DEFINE_string(
  "mesh", None, "Mesh over every device of the job, e.g. expert=8 (evaluate, serve).", flag_values=FLAGS
)
_SLOTS = flags.DEFINE_integer("slots", 16, "Concurrent sessions (serve).", flag_values=FLAGS)
_EVAL_OUTPUT = flags.DEFINE_string("eval_output", None, "Report directory (evaluate).", flag_values=FLAGS)
_TOKEN_SECRET = flags.DEFINE_string(
  "token_secret",
  None,
  "Kubernetes Secret holding the access token (serve, gke-tpu; default NAME-token).",
  flag_values=FLAGS,
)
_TARGET = flags.DEFINE_enum("target", None, ["gke-tpu", "slurm"], "Where the job runs.", flag_values=FLAGS)
_CONFIG = flags.DEFINE_string(
  "config", None, "Experiment config file, as launch.train takes it (passed on, not read; train).", flag_values=FLAGS
)
_TOPOLOGY = flags.DEFINE_string(
  "topology", None, "TPU slice (v5p-256, v6e-64) or slurm NODESxGPUS (4x8).", flag_values=FLAGS
)
_WORKDIR = flags.DEFINE_string(
  "workdir", None, "Checkpoint directory on storage shared by all hosts (train).", flag_values=FLAGS
)
_NAME = flags.DEFINE_string("name", None, "Job name, a DNS label (default interaction-JOB).", flag_values=FLAGS)
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
  # What follows absl's ``--`` separator (--config.x=y overrides, job flags) is passed on to the job.
  extra = cli.parse(
    FLAGS, argv, doc=__doc__, prog="python -m launch.pod", required=("target", "topology"), positional=True
  )
  args = types.SimpleNamespace(**{name: FLAGS[name].value for name in FLAGS})
  name = args.name or f"interaction-{args.job}"
  try:
    command = job_command(args, extra)
    if args.target == "slurm":
      text = jobspec.sbatch(
        name,
        args.topology,
        command,
        time_limit=args.time,
        grace_s=args.grace,
        barrier_timeout_s=args.barrier_timeout,
        setup=args.setup,
      )
    else:
      if not args.image:
        raise ValueError("--image is required for --target gke-tpu")
      common = dict(grace_s=args.grace, barrier_timeout_s=args.barrier_timeout)
      if args.job == "serve":
        docs = jobspec.leader_worker_set(
          name, args.topology, args.image, command, token_secret=args.token_secret, **common
        )
      else:
        docs = [jobspec.jobset(name, args.topology, args.image, command, queue=args.queue, **common)]
      text = yaml.safe_dump_all(docs, sort_keys=False)
  except ValueError as e:
    raise cli.UsageError(str(e)) from None
  if args.output and not args.dry_run:
    with open(args.output, "w") as f:
      f.write(text)
    print(f"wrote {args.output}")
  else:
    sys.stdout.write(text)
  return 0


def job_command(args, extra) -> list[str]:
  """The command every process of the job runs; the flags a job needs are checked here."""
  needs = {"train": ("config", "workdir"), "evaluate": ("checkpoint", "mesh", "eval_output")}
  needs["serve"] = ("checkpoint", "mesh")
  missing = [f"--{flag}" for flag in needs[args.job] if not getattr(args, flag)]
  if missing:
    raise ValueError(f"--job {args.job} needs {', '.join(missing)}")
  if args.job == "train":
    return jobspec.train_command(args.config, args.workdir, extra)
  if args.job == "evaluate":
    return jobspec.evaluate_command(args.checkpoint, args.mesh, args.eval_output, extra)
  return jobspec.serve_command(args.checkpoint, args.mesh, args.slots, extra)


if __name__ == "__main__":
  cli.run(main)
