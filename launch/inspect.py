r"""Print what a config costs before launching it; allocates nothing.

  python -m launch.inspect --config experiments/tiny.py --mesh data=2,expert=4

Prints parameter counts (total and active per token), the micro-turn layout
and parameter bytes per device for the mesh.
"""

from absl import app, flags
from ml_collections import config_flags

from interaction import config as config_lib
from interaction import inspect, sharding

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (a get_config() module).")
_MESH = flags.DEFINE_string("mesh", None, "Mesh axis sizes, e.g. data=2,expert=4 (default: the config's mesh).")
_DEVICES = flags.DEFINE_integer("devices", None, "Device count for a -1 mesh axis (default: the product).")


def main(argv):
  del argv
  cfg = config_lib.model_config(_CONFIG.value)
  axes = sharding.parse_mesh(_MESH.value) if _MESH.value else dict(_CONFIG.value.mesh)
  if any(v == -1 for v in axes.values()) and not _DEVICES.value:
    axes = {k: (1 if v == -1 else v) for k, v in axes.items()}
  print(inspect.report(cfg, axes, _DEVICES.value))


def run():
  flags.mark_flag_as_required("config")
  app.run(main)


if __name__ == "__main__":
  run()
