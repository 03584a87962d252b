r"""Train an interaction model.

  python -m launch.train --config experiments/tiny.py --workdir /tmp/tiny
  python -m launch.train --config experiments/tiny.py --workdir /tmp/tiny --config.train.lr=3e-4

With no ``--config.data.dir`` the embedded synthetic dataset is generated into
the workdir. A workdir that already holds a checkpoint resumes from it (train
state and data iterator), unless ``--noresume``. On a CPU-only host the job runs
on 8 virtual devices (``INTERACTION_CPU_DEVICES`` to change).
"""

import sys

from absl import app, flags
from ml_collections import config_flags

from launch import cpu_devices  # noqa: F401  (must precede jax)

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (a get_config() module).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and generated data.")
_RESUME = flags.DEFINE_bool("resume", True, "Resume from the newest checkpoint in the workdir, if any.")
_PROGRESS = flags.DEFINE_bool("progress", True, "Show a progress bar (log lines when not a terminal).")


def main(argv):
  del argv
  from interaction import distributed
  from launch import trainer

  try:
    trainer.run(_CONFIG.value, _WORKDIR.value, resume=_RESUME.value, progress=_PROGRESS.value)
  except trainer.NonFiniteError as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(3)
  except distributed.BarrierTimeoutError as e:
    distributed.abandon(f"{e}. Exiting so the job can restart from its last checkpoint.")


def run():
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)


if __name__ == "__main__":
  run()
