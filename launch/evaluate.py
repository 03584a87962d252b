r"""Evaluation job: stream held-out conversations through the engine and score interaction behaviour.

  python -m launch.evaluate --checkpoint workdir/demo --data workdir/demo/data [--slots 32] [--output DIR]
                            [--require_targets] [--temperature 0] [--max_conversations N] [--oracle]
                            [--mesh data=2,expert=4] [--replicas 2]

``--checkpoint`` is anything ``interaction.ckpt.open_model`` opens: a trainer
workdir, its checkpoints directory or one step, or a serve checkpoint (what
``launch.convert`` writes). Each conversation of the eval split is a session fed
one micro-turn per tick; the model free-runs (serving/eval/evaluate.py). Writes
``report.json`` and timeline PNGs to ``--output`` and prints a table.
``--require_targets`` exits 1 when any target fails; ``--oracle`` scores the
recorded model streams instead (the data's own behaviour). ``--mesh`` lays the
parameters and the slots out over the job's devices (all processes' under
``launch.local`` or on a pod slice: each process streams the same conversations in
lockstep, process 0 writes the report); ``--replicas R`` splits
the conversations over R engines, each on 1/R of the devices (a mesh of ``--mesh``'s
shape, or one device each). The report is the same for every placement.
"""

from __future__ import annotations

import sys

from absl import flags

from data_pipeline import shards
from interaction import distributed
from interaction.ckpt import ServeCheckpointError, UnsafePathError
from launch import cli
from serving.eval import evaluate

FLAGS = cli.flag_values()
_CHECKPOINT = flags.DEFINE_string(
  "checkpoint", None, "Trainer workdir, checkpoints directory, one step, or serve dir.", flag_values=FLAGS
)
_DATA = flags.DEFINE_string("data", None, "Dataset directory with manifest.json and an eval split.", flag_values=FLAGS)
_SLOTS = flags.DEFINE_integer("slots", 32, "Engine slots (sessions streamed at once).", flag_values=FLAGS)
_OUTPUT = flags.DEFINE_string("output", None, "Directory for report.json and timeline PNGs.", flag_values=FLAGS)
_REQUIRE = flags.DEFINE_bool("require_targets", False, "Exit 1 when any figure misses its target.", flag_values=FLAGS)
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "Sampling temperature (0 = greedy).", flag_values=FLAGS)
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass.", flag_values=FLAGS)
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.", flag_values=FLAGS)
_MAX_CONVERSATIONS = flags.DEFINE_integer(
  "max_conversations", None, "Score at most this many conversations (default: all).", flag_values=FLAGS
)
_MESH = flags.DEFINE_string(
  "mesh", None, "Mesh axis sizes, e.g. data=2,expert=4 (default: one device).", flag_values=FLAGS
)
_REPLICAS = flags.DEFINE_integer(
  "replicas", 1, "Engines side by side, each on 1/R of the devices, conversations split among them.", flag_values=FLAGS
)
_ORACLE = flags.DEFINE_bool(
  "oracle", False, "Score the recorded model streams (checks the metrics).", flag_values=FLAGS
)


def main(argv=None) -> int:
  cli.parse(FLAGS, argv, doc=__doc__, prog="python -m launch.evaluate", required=("checkpoint", "data"))
  if _SLOTS.value < 1:
    raise cli.UsageError(f"--slots must be >= 1, got {_SLOTS.value}")
  if _REPLICAS.value < 1:
    raise cli.UsageError(f"--replicas must be >= 1, got {_REPLICAS.value}")
  # A multi-process job (launch.local, a pod): every process streams the same conversations through
  # its part of the mesh in lockstep; process 0 prints and writes the report.
  distributed.initialize_from_env()
  mesh = cli.mesh_flag(_MESH.value, share=_REPLICAS.value)
  try:
    report = evaluate.run(
      _CHECKPOINT.value,
      _DATA.value,
      _SLOTS.value,
      _OUTPUT.value,
      temperature=_TEMPERATURE.value,
      top_p=_TOP_P.value,
      seed=_SEED.value,
      max_conversations=_MAX_CONVERSATIONS.value,
      oracle=_ORACLE.value,
      mesh=mesh,
      replicas=_REPLICAS.value,
    )
  except (FileNotFoundError, shards.DatasetError) as e:  # CheckpointNotFoundError included
    raise cli.UsageError(
      f"error: {e}\n(--checkpoint takes a trainer workdir or a serve checkpoint, --data a dataset directory; "
      "after make demo: --checkpoint workdir/demo --data workdir/demo/data)"
    ) from None
  except (ServeCheckpointError, UnsafePathError, ValueError) as e:  # ValueError: e.g. slots the mesh cannot split
    raise cli.UsageError(f"error: {e}") from None
  if _REQUIRE.value and not report["all_targets_pass"]:
    print(f"--require_targets: {len(report['targets_failed'])} target(s) failed", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  cli.run(main)
