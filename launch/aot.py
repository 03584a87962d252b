r"""Compile a config for a real TPU slice on a machine without a TPU; report per-chip memory.

  python -m launch.aot --config experiments/tml_interaction_small.py --topology v5p-256
  python -m launch.aot --config experiments/tml_interaction_small.py --topology v5p-16 --job serve

Needs libtpu (``pip install '.[tpu]'``): its compiler builds compile-only devices
for the slice (``launch.topology``). The train step is compiled at the config's
global batch on abstract, sharded inputs (nothing is allocated); ``--job serve``
compiles the micro-turn step for ``serve.slots`` sessions of ``serve.cache_tokens``.
Prints per-chip arguments, outputs, temporaries and total against the chip's HBM,
FLOPs per step, and a roofline step time and MFU (from the compiled program's
memory and cost analysis). Exits 1, naming the shortfall, when the program does
not fit; ``--json`` adds one JSON line.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import sys
import time

import jax
import jax.numpy as jnp
from absl import flags
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from ml_collections import config_flags

from interaction import flops, layout, schema, sharding, train_step
from interaction import step as step_lib
from interaction.ckpt import abstract_model
from interaction.experiment import ExperimentConfig, experiment
from launch import cli
from launch.topology import GIB, known_topologies, parse_topology, topology_devices, topology_mesh

__all__ = ["GIB", "known_topologies", "parse_topology", "report", "format_report", "shortfall"]

FLAGS = cli.flag_values()
_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "Experiment config file (a get_config() module).", flag_values=FLAGS
)
_TOPOLOGY = flags.DEFINE_string(
  "topology", None, "TPU slice, e.g. v5p-256 (cores) or v6e-64 (chips).", flag_values=FLAGS
)
_JOB = flags.DEFINE_enum("job", "train", ["train", "serve"], "Which program to compile.", flag_values=FLAGS)
_MESH = flags.DEFINE_string(
  "mesh", None, "Mesh axis sizes, e.g. fsdp=-1,expert=16 (default: the config's).", flag_values=FLAGS
)
_JSON = flags.DEFINE_bool("json", False, "Also print the report as one JSON line (last).", flag_values=FLAGS)


def _sds(tree, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def abstract_batch(cfg, batch_size: int, window_turns: int, mesh) -> dict:
  """The model's training batch (``schema.shapes``, training-only targets included) as sharded ShapeDtypeStructs."""
  bsh = train_step.batch_sharding(mesh, cfg.rules)
  shapes = schema.shapes(cfg.streams, batch_size, window_turns)
  return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=bsh) for k, (shape, dtype) in shapes.items()}


def lower_train(config: ExperimentConfig, mesh):
  """The jitted train step lowered on abstract state and batch; returns ``(lowered, inputs)``."""
  cfg, tc = config.model, config.train
  graphdef, state, shardings = train_step.abstract_create(cfg, tc, mesh)
  step = train_step.make_train_step(graphdef, cfg, tc, mesh, shardings)
  batch = abstract_batch(cfg, config.data.batch_size, config.data.window_turns, mesh)
  with jax.set_mesh(mesh):
    return step.jitted.lower(state, batch), (state, batch)


def lower_serve(config: ExperimentConfig, mesh):
  """The micro-turn step for ``serve.slots`` sessions of ``serve.cache_tokens``, params in ``model.dtype``.

  Lowers ``interaction.step.Step``, the object the engine runs, with its own shardings.
  Returns ``(lowered, inputs)``.
  """
  cfg = config.model
  slots, cache_tokens = config.serve.slots, config.serve.cache_tokens
  graphdef, abs_state = abstract_model(cfg)
  step = step_lib.Step(graphdef, cfg, mesh=mesh)
  serve_dtype = jnp.dtype(cfg.dtype)

  def cast(x):  # serving holds weights in the compute dtype
    return jax.ShapeDtypeStruct(x.shape, serve_dtype if jnp.issubdtype(x.dtype, jnp.floating) else x.dtype)

  params = _sds(jax.tree.map(cast, nnx.to_pure_dict(abs_state)), step.param_shardings)
  state = step.abstract_state(slots, cache_tokens)
  inputs = {
    s.name: jax.ShapeDtypeStruct((slots, s.slots, *s.value_shape), s.dtype, sharding=step.batch_sharding)
    for s in cfg.directed("in")
  }
  rng = jax.eval_shape(lambda: jax.random.key(0))
  rng = jax.ShapeDtypeStruct(rng.shape, rng.dtype, sharding=NamedSharding(mesh, P()))
  return step.lower(params, state, inputs, rng), (params, state, inputs, rng)


def model_flops_per_chip(config: ExperimentConfig, job: str, chips: int) -> float:
  """Analytic model FLOPs per step per chip (train: 3x forward; serve: forward of one micro-turn)."""
  cfg = config.model
  if job == "train":
    return flops.train_flops_per_window(cfg, config.data.window_turns) * config.data.batch_size / chips
  return flops.serve_flops_per_tick(cfg, config.serve.slots, config.serve.cache_tokens) / chips


def report(config: ExperimentConfig, topology: str, job: str = "train", mesh_axes: dict | None = None) -> dict:
  """Compile ``job`` for ``topology`` and return the per-chip memory, FLOPs and roofline figures."""
  if job not in ("train", "serve"):
    raise ValueError(f"job must be 'train' or 'serve', got {job!r}")
  topo = parse_topology(topology)
  devices = topology_devices(topo)
  if mesh_axes is None:
    mesh_axes = (config.serve_mesh if job == "serve" else config.mesh).axes()
  mesh = topology_mesh(mesh_axes, devices)
  if config.model.gmm_impl == "auto":
    # "auto" resolves by jax's default backend, which is the CPU here; the target is a TPU.
    config = dataclasses.replace(config, model=dataclasses.replace(config.model, gmm_impl="ragged_dot"))
  t = time.perf_counter()
  lowered, inputs = lower_train(config, mesh) if job == "train" else lower_serve(config, mesh)
  error = None
  try:
    compiled = lowered.compile()
  except jax.errors.JaxRuntimeError as e:
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    compiled, error = None, str(e).splitlines()[0]
  compile_s = time.perf_counter() - t
  args, out, alias, temp, code, xla_flops, bytes_accessed = _analysis(compiled, inputs, error)
  total = args + out - alias + temp + code
  model_flops = model_flops_per_chip(config, job, topo.chips)
  cfg = config.model
  chip = topo.chip
  # Roofline = a lower bound on step time: the compute at peak, or the HBM traffic at full bandwidth.
  # XLA's cost analysis counts a loop body once (the scanned layers, the slot loop), so compute uses
  # the analytic FLOPs (plus the forward recomputed under full remat) and the serving step's traffic
  # is at least every forward reading all weights and the cache once. Collectives are not modelled.
  hw_flops = model_flops * (4 / 3 if job == "train" and cfg.remat == "full" else 1.0)
  traffic = bytes_accessed
  if job == "serve":
    forwards = 1 + sum(s.slots for s in cfg.streams if s.direction == "out")
    traffic = max(traffic, forwards * args)
  step_s = max(hw_flops / chip.peak_bf16_flops, traffic / chip.hbm_bytes_per_s)
  if job == "train":
    batch, tokens = config.data.batch_size, config.data.batch_size * config.data.window_turns
  else:
    batch, tokens = config.serve.slots, config.serve.slots
  tokens *= layout.tokens_per_turn(cfg.streams)
  return {
    "topology": topo.name,
    "physical": f"{chip.name}:{topo.shape}",
    "chips": topo.chips,
    "job": job,
    "mesh": {k: v for k, v in dict(mesh.shape).items() if v > 1},
    "batch": batch,
    "tokens_per_step": tokens,
    "argument_bytes": args,
    "output_bytes": out,
    "alias_bytes": alias,
    "temp_bytes": temp,
    "code_bytes": code,
    "total_bytes": total,
    "hbm_bytes": chip.hbm_bytes,
    "peak_flops": chip.peak_bf16_flops,
    "fits": total <= chip.hbm_bytes,
    "xla_flops_per_chip": xla_flops,
    "model_flops_per_chip": float(model_flops),
    "bytes_accessed_per_chip": bytes_accessed,
    "hardware_flops_per_chip": float(hw_flops),
    "hbm_traffic_per_chip": float(traffic),
    "roofline_step_s": step_s,
    "roofline_mfu": float(model_flops / (step_s * chip.peak_bf16_flops)) if step_s else 0.0,
    "compile_s": compile_s,
    "compile_error": error,
  }


def _analysis(compiled, inputs, error: str | None) -> tuple:
  """Per-chip (arguments, outputs, aliased, temporaries, code) bytes and XLA's (flops, bytes accessed)."""
  if compiled is None:  # the compiler refused: arguments from the input shardings, temporaries from its message
    args = sum(_shard_bytes(x) for x in jax.tree.leaves(inputs))
    return args, 0, 0, _oom_temporaries(error), 0, 0.0, 0.0
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list | tuple) else cost
  return (
    mem.argument_size_in_bytes,
    mem.output_size_in_bytes,
    mem.alias_size_in_bytes,
    mem.temp_size_in_bytes,
    mem.generated_code_size_in_bytes,
    float(cost.get("flops", 0.0)),
    float(cost.get("bytes accessed", 0.0)),
  )


def _shard_bytes(x) -> int:
  """Bytes of the largest shard of a sharded ShapeDtypeStruct."""
  return math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize  # PRNG key dtypes have one too


def _oom_temporaries(message: str) -> int:
  """The temporaries figure from XLA's CompileTimeHbmOom message ("... HLO temporaries (826.46G) ...")."""
  found = re.search(r"temporaries \(([\d.]+)([KMGT])\)", message)
  if not found:
    return 0
  return int(float(found.group(1)) * 1024 ** "KMGT".index(found.group(2)) * 1024)


def format_report(r: dict) -> str:
  gib = lambda b: f"{b / GIB:8.2f} GiB"  # noqa: E731
  if r["compile_error"]:
    return "\n".join(
      [
        f"{r['job']} step on {r['topology']} ({r['physical']}, {r['chips']} chips), mesh {r['mesh']}",
        f"  batch {r['batch']} ({r['tokens_per_step']:,} tokens per step); compiler ran out of HBM "
        f"after {r['compile_s']:.0f} s:",
        f"    arguments   {gib(r['argument_bytes'])}  (from the input shardings)",
        f"    temporaries {gib(r['temp_bytes'])}  (from the compiler's message)",
        f"    total      >{gib(r['total_bytes'])}  of {r['hbm_bytes'] / GIB:.0f} GiB HBM -> DOES NOT FIT",
        f"  {r['compile_error']}",
      ]
    )
  lines = [
    f"{r['job']} step on {r['topology']} ({r['physical']}, {r['chips']} chips), mesh {r['mesh']}",
    f"  batch {r['batch']} ({r['tokens_per_step']:,} tokens per step); compiled in {r['compile_s']:.0f} s",
    "  per-chip memory:",
    f"    arguments   {gib(r['argument_bytes'])}",
    f"    outputs     {gib(r['output_bytes'])}  (aliased to arguments: {gib(r['alias_bytes']).strip()})",
    f"    temporaries {gib(r['temp_bytes'])}",
    f"    code        {gib(r['code_bytes'])}",
    f"    total       {gib(r['total_bytes'])}  of {r['hbm_bytes'] / GIB:.0f} GiB HBM"
    f" -> {'fits' if r['fits'] else 'DOES NOT FIT'}",
    f"  FLOPs per chip per step: {r['model_flops_per_chip']:.3e} model (analytic), "
    f"{r['hardware_flops_per_chip']:.3e} executed (with remat recompute), "
    f"{r['xla_flops_per_chip']:.3e} XLA cost analysis (counts each loop body once)",
    f"  HBM traffic per chip per step: {r['hbm_traffic_per_chip']:.3e} bytes "
    f"(XLA cost analysis: {r['bytes_accessed_per_chip']:.3e})",
    f"  roofline: step >= {r['roofline_step_s'] * 1e3:.1f} ms, MFU <= {r['roofline_mfu']:.1%} at "
    f"{r['peak_flops'] / 1e12:.0f} TFLOP/s bf16 peak (compute and HBM only; collectives not modelled)",
  ]
  return "\n".join(lines)


def shortfall(r: dict) -> str | None:
  if r["fits"]:
    return None
  over = r["total_bytes"] - r["hbm_bytes"]
  return (
    f"{r['job']} step does not fit on {r['topology']}: {r['total_bytes'] / GIB:.2f} GiB per chip exceeds "
    f"{r['hbm_bytes'] / GIB:.0f} GiB HBM by {over / GIB:.2f} GiB (temporaries {r['temp_bytes'] / GIB:.2f} GiB)"
  )


def main(argv=None) -> int:
  cli.parse(FLAGS, argv, doc=__doc__, prog="python -m launch.aot", required=("config", "topology"))
  # Compile-only: keep jax itself on the CPU backend (libtpu is used only as a compiler). Set before
  # the first backend use; the environment variable was read when jax was imported.
  if "JAX_PLATFORMS" not in os.environ:
    jax.config.update("jax_platforms", "cpu")
  axes = sharding.parse_mesh(_MESH.value) if _MESH.value else None
  try:
    r = report(experiment(_CONFIG.value), _TOPOLOGY.value, _JOB.value, axes)
  except (ValueError, RuntimeError) as e:
    raise cli.UsageError(cli.one_line(e)) from None
  print(format_report(r), flush=True)
  if _JSON.value:
    print(json.dumps(r), flush=True)
  problem = shortfall(r)
  if problem:
    print(f"error: {problem}", file=sys.stderr, flush=True)
    return 1
  return 0


if __name__ == "__main__":
  cli.run(main)
