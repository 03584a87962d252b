r"""Train an interaction model.

  python -m launch.train --config experiments/tiny.py --workdir /tmp/tiny
  python -m launch.train --config experiments/tiny.py --workdir /tmp/tiny --config.train.lr=3e-4

With no ``--config.data.dir`` the embedded synthetic dataset is generated into
the workdir. A workdir that already holds a checkpoint resumes from it (train
state and data iterator), unless ``--noresume``. On a CPU-only host the job runs
on 8 virtual devices (``INTERACTION_CPU_DEVICES`` to change). Exits 2 naming a
refused input (missing config file or dataset, unknown key, a batch the mesh
cannot split), 3 after too many non-finite steps in a row.
"""

import sys

from absl import flags
from ml_collections import config_flags

from launch import (
  cli,
  cpu_devices,  # noqa: F401  (must precede jax)
)

FLAGS = cli.flag_values()
_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "Experiment config file (a get_config() module).", flag_values=FLAGS
)
_WORKDIR = flags.DEFINE_string(
  "workdir", None, "Directory for checkpoints, metrics and generated data.", flag_values=FLAGS
)
_RESUME = flags.DEFINE_bool(
  "resume", True, "Resume from the newest checkpoint in the workdir, if any.", flag_values=FLAGS
)
_PROGRESS = flags.DEFINE_bool(
  "progress", True, "Show a progress bar (log lines when not a terminal).", flag_values=FLAGS
)


def main(argv=None) -> int:
  cli.parse(FLAGS, argv, doc=__doc__, prog="python -m launch.train", required=("config", "workdir"))
  from interaction import distributed
  from interaction.experiment import experiment
  from launch import trainer

  config = experiment(_CONFIG.value)
  try:
    trainer.run(config, _WORKDIR.value, resume=_RESUME.value, progress=_PROGRESS.value)
  except trainer.NonFiniteError as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(3)
  except distributed.BarrierTimeoutError as e:
    distributed.abandon(f"{e}. Exiting so the job can restart from its last checkpoint.")
  return 0


if __name__ == "__main__":
  cli.run(main, refused=(ValueError,))
