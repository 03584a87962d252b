r"""Make datasets: generate the embedded synthetic tasks, or convert folders of recordings.

  python -m launch.data synthetic --output /tmp/synth --train 2048 --eval 256 [--tasks turn_taking,barge_in]
  python -m launch.data convert --input recordings/ --output data/ --split train

Both write versioned, checksummed ArrayRecord shards with a ``manifest.json``
(data_pipeline/README.md). ``synthetic`` writes a train split (seed) and an eval
split (seed + 1); ``convert`` is ``data_pipeline.convert``'s command line.
"""

from __future__ import annotations

import sys
import time

from absl import flags

from data_pipeline import convert, record, shards, synthetic, wav
from data_pipeline.script import TASKS
from launch import cli

SYNTHETIC = cli.flag_values()
_S_OUTPUT = flags.DEFINE_string("output", None, "Dataset directory (manifest.json + shards).", flag_values=SYNTHETIC)
_S_TRAIN = flags.DEFINE_integer("train", 2048, "Conversations in the train split.", flag_values=SYNTHETIC)
_S_EVAL = flags.DEFINE_integer("eval", 256, "Conversations in the eval split.", flag_values=SYNTHETIC)
_S_SEED = flags.DEFINE_integer("seed", 0, "Train uses seed, eval seed + 1.", flag_values=SYNTHETIC)
_S_TASKS = flags.DEFINE_list(
  "tasks", list(TASKS), f"Comma-separated subset of {','.join(TASKS)}.", flag_values=SYNTHETIC
)
_S_RECORDS = flags.DEFINE_integer("records_per_shard", 512, "Conversations per shard.", flag_values=SYNTHETIC)
_S_FRAME = flags.DEFINE_integer("frame_size", 40, "Side in pixels of the (square) video frames.", flag_values=SYNTHETIC)

CONVERT = cli.flag_values()
_C_INPUT = flags.DEFINE_string("input", None, "Folder of conversation folders.", flag_values=CONVERT)
_C_OUTPUT = flags.DEFINE_string("output", None, "Dataset directory (manifest.json + shards).", flag_values=CONVERT)
_C_SPLIT = flags.DEFINE_string("split", "train", "Split to write.", flag_values=CONVERT)
_C_RECORDS = flags.DEFINE_integer("records_per_shard", 1024, "Conversations per shard.", flag_values=CONVERT)


def synthetic_main(argv) -> int:
  cli.parse(SYNTHETIC, argv, doc=synthetic.__doc__, prog="python -m launch.data synthetic", required=("output",))
  tasks = tuple(_S_TASKS.value)
  unknown = sorted(set(tasks) - set(TASKS))
  if unknown:
    raise cli.UsageError(f"--tasks: unknown tasks {unknown}; known: {','.join(TASKS)}")
  t0 = time.perf_counter()
  for split, count, seed in (("train", _S_TRAIN.value, _S_SEED.value), ("eval", _S_EVAL.value, _S_SEED.value + 1)):
    if count > 0:
      try:
        synthetic.generate(_S_OUTPUT.value, split, count, seed, tasks, _S_RECORDS.value, _S_FRAME.value, progress=True)
      except shards.DatasetError as e:  # an existing manifest in --output that cannot be added to
        raise cli.UsageError(cli.one_line(e)) from None
  total = _S_TRAIN.value + _S_EVAL.value
  dt = time.perf_counter() - t0
  print(f"wrote {total} conversations to {_S_OUTPUT.value} in {dt:.1f} s ({total / dt * 60:.0f} per minute)")
  return 0


def convert_main(argv) -> int:
  cli.parse(CONVERT, argv, doc=convert.__doc__, prog="python -m launch.data convert", required=("input", "output"))
  try:
    stats = convert.convert(_C_INPUT.value, _C_OUTPUT.value, _C_SPLIT.value, _C_RECORDS.value)
  except (convert.ConversionError, record.RecordError, wav.WavError, shards.DatasetError) as e:
    raise cli.UsageError(cli.one_line(e)) from None
  print(
    f"wrote {stats['conversations']} conversations in {stats['shards']} shards to {_C_OUTPUT.value}; "
    f"resampled {stats['resampled']} WAVs to 16 kHz"
  )
  return 0


COMMANDS = {"synthetic": synthetic_main, "convert": convert_main}


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  if argv and argv[0] in COMMANDS:
    return COMMANDS[argv[0]](argv[1:])
  usage = "\n\n".join(__doc__.strip().split("\n\n")[:2])
  if argv and argv[0] in cli.HELP:
    print(usage)
    return 0
  print(f"{usage}\n\nerror: give a command: {' or '.join(COMMANDS)} (then --help for its flags)", file=sys.stderr)
  return 2


if __name__ == "__main__":
  cli.run(main)
