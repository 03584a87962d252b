r"""Compile a config for a real TPU slice on a machine without a TPU; report per-chip memory.

  python -m launch.aot --config experiments/tml_interaction_small.py --topology v5p-256
  python -m launch.aot --config experiments/tml_interaction_small.py --topology v5p-16 --job serve

Needs libtpu (``pip install '.[tpu]'``): its compiler builds compile-only devices
for the slice. The train step is compiled at the config's global batch on
abstract, sharded inputs (nothing is allocated); ``--job serve`` compiles the
micro-turn step for ``serve.slots`` sessions of ``serve.cache_tokens``. Prints
per-chip arguments, outputs, temporaries and total against the chip's HBM,
FLOPs per step, and a roofline step time and MFU. Exits 1, naming the
shortfall, when the program does not fit; ``--json`` adds one JSON line.
"""

import json
import os
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (a get_config() module).")
_TOPOLOGY = flags.DEFINE_string("topology", None, "TPU slice, e.g. v5p-256 (cores) or v6e-64 (chips).")
_JOB = flags.DEFINE_enum("job", "train", ["train", "serve"], "Which program to compile.")
_MESH = flags.DEFINE_string("mesh", None, "Mesh axis sizes, e.g. fsdp=-1,expert=16 (default: the config's).")
_JSON = flags.DEFINE_bool("json", False, "Also print the report as one JSON line (last).")


def main(argv):
  del argv
  # Compile-only: keep jax itself on the CPU backend; libtpu is used only as a compiler.
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  from interaction import aot, sharding

  axes = sharding.parse_mesh(_MESH.value) if _MESH.value else None
  try:
    r = aot.report(_CONFIG.value, _TOPOLOGY.value, _JOB.value, axes)
  except (ValueError, RuntimeError) as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(2)
  print(aot.format_report(r), flush=True)
  if _JSON.value:
    print(json.dumps(r), flush=True)
  problem = aot.shortfall(r)
  if problem:
    print(f"error: {problem}", file=sys.stderr, flush=True)
    sys.exit(1)


def run():
  flags.mark_flags_as_required(["config", "topology"])
  app.run(main)


if __name__ == "__main__":
  run()
