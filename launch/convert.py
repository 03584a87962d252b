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

import argparse
import json
import pathlib
import runpy
import sys

# The streams an imported LLM gets unless --experiment names another config file (read by path, not imported).
DEFAULT_EXPERIMENT = pathlib.Path(__file__).resolve().parent.parent / "experiments" / "tiny.py"


def _experiment(path: str | None):
  path = pathlib.Path(path) if path else DEFAULT_EXPERIMENT
  if not path.is_file():
    raise FileNotFoundError(f"--experiment {path}: no such config file")
  return runpy.run_path(str(path))["get_config"]()


def _mesh(text: str | None) -> dict | None:
  if not text:
    return None
  from interaction import sharding

  axes = sharding.parse_mesh(text)
  if any(v < 1 for v in axes.values()):
    raise ValueError(f"--mesh {text!r}: give every axis a size >= 1 (the hint does not depend on a device count)")
  return axes


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m launch.convert", description=__doc__.split("\n")[0])
  sub = p.add_subparsers(dest="command", required=True)
  t = sub.add_parser("train-to-serve", help="trainer checkpoint -> serve layout (drops the optimizer state)")
  t.add_argument("--src", required=True, help="trainer workdir (or its checkpoints/ directory)")
  t.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest committed)")
  t.add_argument("--dst", required=True, help="new directory for the serve checkpoint")
  t.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"), help="cast parameters")
  t.add_argument("--mesh", default=None, help="mesh hint recorded per array, e.g. data=1,expert=2")
  h = sub.add_parser("hf-to-interaction", help="HF Mixtral / Qwen3-MoE (safetensors) -> serve layout")
  h.add_argument("--src", required=True, help="HF model directory: config.json + *.safetensors")
  h.add_argument("--dst", required=True)
  h.add_argument("--arch", required=True, choices=("mixtral", "qwen3_moe"))
  h.add_argument("--experiment", default=None, help="experiment config for streams (default experiments/tiny.py)")
  h.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"))
  h.add_argument("--seed", type=int, default=0, help="seed of the parameters the source lacks")
  x = sub.add_parser("interaction-to-hf", help="serve layout -> HF checkpoint of the text backbone")
  x.add_argument("--src", required=True, help="serve checkpoint directory")
  x.add_argument("--dst", required=True)
  x.add_argument("--arch", default=None, choices=("mixtral", "qwen3_moe"), help="needed unless imported from HF")
  x.add_argument("--max-shard-gb", type=float, default=5.0)
  return p


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
  args = parser().parse_args(argv)
  try:
    summary = run(args)
  except (ValueError, FileNotFoundError, FileExistsError) as e:
    print(f"error: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
    return 2
  print(json.dumps(summary), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
