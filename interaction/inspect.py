"""What a config costs, from ``jax.eval_shape`` alone: nothing is allocated."""

from __future__ import annotations

import math

import jax
import numpy as np
from flax import nnx

from interaction import layout, sharding
from interaction.config import ModelConfig
from interaction.layout import MICRO_TURN_SECONDS
from interaction.model import InteractionModel


def abstract_params(cfg: ModelConfig):
  """The model's parameter State as ShapeDtypeStructs."""
  return nnx.split(nnx.eval_shape(lambda: InteractionModel(cfg, rngs=nnx.Rngs(0))))[1]


def count_params(cfg: ModelConfig, state=None) -> dict[str, int]:
  """Total parameters, and active per token (routed experts count k of E)."""
  state = abstract_params(cfg) if state is None else state
  total = routed = 0
  for _, v in nnx.to_flat_state(state):
    n = math.prod(v.shape)
    total += n
    if "expert" in (v.get_metadata().get("axes") or ()):
      routed += n
  active = total - routed + routed * cfg.experts_per_token // max(cfg.num_experts, 1)
  return {"total": total, "active": active, "routed_experts": routed}


def bytes_per_device(cfg: ModelConfig, mesh, state=None) -> int:
  """Parameter bytes on the most loaded device under the sharding rules."""
  state = abstract_params(cfg) if state is None else state
  specs = sharding.param_specs(state, mesh)
  total = 0
  for (_, v), (_, spec) in zip(nnx.to_flat_state(state), nnx.to_flat_state(specs), strict=True):
    shards = 1
    for entry in spec.get_value():
      for axis in (entry,) if isinstance(entry, str) else entry or ():
        shards *= mesh.shape[axis]
    total += math.prod(v.shape) * np.dtype(v.dtype).itemsize // shards
  return total


def stream_table(cfg: ModelConfig) -> list[tuple[str, str, str, int]]:
  return [(s.name, s.direction, s.kind, s.slots) for s in layout.block_order(cfg.streams)]


def report(cfg: ModelConfig, mesh_axes: dict[str, int] | None = None, num_devices: int | None = None) -> str:
  """A printable summary: parameter counts, micro-turn layout, bytes per device."""
  state = abstract_params(cfg)
  counts = count_params(cfg, state)
  per_turn = layout.tokens_per_turn(cfg.streams)
  lines = [
    f"parameters: total {counts['total']:,} ({counts['total'] / 1e9:.2f}B), "
    f"active per token {counts['active']:,} ({counts['active'] / 1e9:.2f}B)",
    "",
    f"{'stream':<12}{'dir':<5}{'kind':<7}{'slots':>6}",
  ]
  lines += [f"{n:<12}{d:<5}{k:<7}{s:>6}" for n, d, k, s in stream_table(cfg)]
  lines += [
    f"tokens per micro-turn: {per_turn} ({layout.input_tokens_per_turn(cfg.streams)} in, "
    f"{layout.output_tokens_per_turn(cfg.streams)} out); tokens per second of stream: {per_turn / MICRO_TURN_SECONDS:g}",
  ]
  if mesh_axes is not None:
    n = num_devices or math.prod(v for v in mesh_axes.values() if v > 0)
    mesh = jax.sharding.AbstractMesh(sharding.mesh_shape(mesh_axes, n), sharding.MESH_AXES)
    per_device = bytes_per_device(cfg, mesh, state)
    shape = dict(zip(sharding.MESH_AXES, sharding.mesh_shape(mesh_axes, n), strict=True))
    lines.append(f"mesh {shape}: parameter bytes per device {per_device:,} ({per_device / 2**30:.2f} GiB)")
  return "\n".join(lines)
