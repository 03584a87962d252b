r"""Convert checkpoints: trainer -> serve layout, Hugging Face MoE LLM <-> interaction.

  python -m launch.convert train-to-serve --src /tmp/tiny --dst /tmp/tiny_serve [--step 400] \
      [--dtype bfloat16] [--mesh data=1,expert=2]
  python -m launch.convert hf-to-interaction --src ./Qwen3-30B-A3B --dst /tmp/qwen_serve --arch qwen3_moe \
      [--experiment experiments/tiny.py] [--dtype bfloat16]
  python -m launch.convert interaction-to-hf --src /tmp/qwen_serve --dst /tmp/qwen_hf [--arch qwen3_moe]

Every command works one array at a time (host memory about twice the largest
array) and writes a serve checkpoint whose manifest holds a SHA-256 per array;
``interaction.ckpt.open_model`` verifies them. Only safetensors are read
from HF directories. An imported model keeps the source vocabulary: it needs the
source's tokenizer, not our byte-level one. Prints a JSON summary on success; on
a refused input prints ``error: ...`` and exits 2.
"""

from __future__ import annotations

import json
import pathlib
import runpy
import sys
import types

from absl import flags

from launch import cli

# The streams an imported LLM gets unless --experiment names another config file (read by path, not imported).
DEFAULT_EXPERIMENT = pathlib.Path(__file__).resolve().parent.parent / "experiments" / "tiny.py"


def _experiment(path: str | None):
  path = pathlib.Path(path) if path else DEFAULT_EXPERIMENT
  if not path.is_file():
    raise FileNotFoundError(f"--experiment {path}: no such config file")
  from interaction.experiment import experiment

  return experiment(runpy.run_path(str(path))["get_config"]())


def _mesh(text: str | None) -> dict | None:
  if not text:
    return None
  from interaction import sharding

  axes = sharding.parse_mesh(text)
  if any(v < 1 for v in axes.values()):
    raise ValueError(f"--mesh {text!r}: give every axis a size >= 1 (the hint does not depend on a device count)")
  return axes


DTYPES = ["float32", "bfloat16", "float16"]
ARCHS = ["mixtral", "qwen3_moe"]


def _flags(specs) -> flags.FlagValues:
  """One command's flags: ``(kind, name, default, help[, enum values])`` per flag."""
  fv = cli.flag_values()
  for kind, name, default, help_, *values in specs:
    define = getattr(flags, f"DEFINE_{kind}")
    define(name, default, *values, help_, flag_values=fv)
  return fv


COMMANDS = {
  "train-to-serve": _flags(
    [
      ("string", "src", None, "Trainer workdir (or its checkpoints/ directory)."),
      ("integer", "step", None, "Checkpoint step (default: the latest committed)."),
      ("string", "dst", None, "New directory for the serve checkpoint."),
      ("enum", "dtype", None, "Cast parameters.", DTYPES),
      ("string", "mesh", None, "Mesh hint recorded per array, e.g. data=1,expert=2."),
    ],
  ),
  "hf-to-interaction": _flags(
    [
      ("string", "src", None, "HF model directory: config.json + *.safetensors."),
      ("string", "dst", None, "New directory for the serve checkpoint."),
      ("enum", "arch", None, "Source architecture.", ARCHS),
      ("string", "experiment", None, "Experiment config for streams (default experiments/tiny.py)."),
      ("enum", "dtype", None, "Cast parameters.", DTYPES),
      ("integer", "seed", 0, "Seed of the parameters the source lacks."),
    ],
  ),
  "interaction-to-hf": _flags(
    [
      ("string", "src", None, "Serve checkpoint directory."),
      ("string", "dst", None, "New HF checkpoint directory."),
      ("enum", "arch", None, "Needed unless imported from HF.", ARCHS),
      ("float", "max_shard_gb", 5.0, "Largest safetensors shard, GB."),
    ],
  ),
}
REQUIRED = {
  "train-to-serve": ("src", "dst"),
  "hf-to-interaction": ("src", "dst", "arch"),
  "interaction-to-hf": ("src", "dst"),
}


def run(args) -> dict:
  if args.command == "train-to-serve":
    from interaction.ckpt import train_to_serve

    return train_to_serve.convert(args.src, args.dst, step=args.step, dtype=args.dtype, mesh_hint=_mesh(args.mesh))
  from interaction.ckpt import hf

  if args.command == "hf-to-interaction":
    experiment = _experiment(args.experiment)
    return hf.hf_to_interaction(
      args.src, args.dst, args.arch, experiment=experiment, param_dtype=args.dtype, seed=args.seed
    )
  return hf.interaction_to_hf(args.src, args.dst, args.arch, max_shard_bytes=int(args.max_shard_gb * (1 << 30)))


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  if not argv or argv[0] not in COMMANDS:
    usage = __doc__.strip().split("\n\n")[0]
    if argv and argv[0] in cli.HELP:
      print(usage)
      return 0
    raise cli.UsageError(f"give a command: {', '.join(COMMANDS)} (then --help for its flags)")
  command, fv = argv[0], COMMANDS[argv[0]]
  cli.parse(fv, argv[1:], doc=__doc__, prog=f"python -m launch.convert {command}", required=REQUIRED[command])
  args = types.SimpleNamespace(command=command, **{name: fv[name].value for name in fv})
  try:
    summary = run(args)
  except (ValueError, FileNotFoundError, FileExistsError) as e:
    raise cli.UsageError(f"{type(e).__name__}: {cli.one_line(e).removeprefix('error: ')}") from None
  print(json.dumps(summary), flush=True)
  return 0


if __name__ == "__main__":
  cli.run(main)
