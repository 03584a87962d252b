"""Logical axis names -> mesh axes, mesh construction and sharded init.

Parameters carry logical axis names in their ``axes`` metadata; activations are
constrained at block boundaries with ``constrain``. One rules table maps logical
names to the mesh axes ``data``, ``fsdp``, ``expert`` and ``tensor``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "expert", "tensor")

# The rules table. A logical name maps to a mesh axis, a tuple of them, or None.
RULES: dict[str, str | tuple[str, ...] | None] = {
  "batch": ("data", "fsdp", "expert"),
  "layers": None,
  "embed": "fsdp",
  "vocab": "tensor",
  "heads": "tensor",
  "kv_heads": "tensor",
  "head_dim": None,
  "mlp": "tensor",
  "expert": "expert",
  "expert_embed": "fsdp",
  "expert_mlp": "tensor",
  "seq": None,
  "act_embed": None,
  "cache": None,
  None: None,
}


@contextlib.contextmanager
def rules(overrides: Mapping | None):
  """Temporarily override entries of RULES (an experiment's ``rules`` section), e.g.
  ``{"embed": ("fsdp", "expert")}`` to shard dense weights over every data-parallel axis.

  Must enclose both state creation and the first call (tracing) of jitted steps.
  """
  overrides = {k: (tuple(v) if isinstance(v, list | tuple) else v) for k, v in dict(overrides or {}).items()}
  unknown = sorted(set(overrides) - set(RULES))
  if unknown:
    raise ValueError(f"unknown logical axes in rules {unknown}; known: {sorted(k for k in RULES if k)}")
  for k, v in overrides.items():
    for axis in (v,) if isinstance(v, str) else v or ():
      if axis not in MESH_AXES:
        raise ValueError(f"rules[{k!r}] names mesh axis {axis!r}; mesh axes are {MESH_AXES}")
  saved = dict(RULES)
  RULES.update(overrides)
  try:
    yield
  finally:
    RULES.clear()
    RULES.update(saved)


def parse_mesh(text: str) -> dict[str, int]:
  """``"data=2,expert=4"`` -> ``{"data": 2, "expert": 4}``."""
  out = {}
  for part in filter(None, (p.strip() for p in text.split(","))):
    name, _, size = part.partition("=")
    if name not in MESH_AXES or not size.lstrip("-").isdigit():
      raise ValueError(f"bad mesh entry {part!r}: expected NAME=SIZE with NAME in {MESH_AXES}")
    out[name] = int(size)
  return out


def mesh_shape(axes: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
  """Sizes for MESH_AXES; missing axes are 1, one axis may be -1 (the rest)."""
  sizes = [int(axes.get(a, 1)) for a in MESH_AXES]
  if sum(s == -1 for s in sizes) > 1:
    raise ValueError(f"at most one mesh axis may be -1, got {dict(axes)}")
  fixed = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % fixed:
      raise ValueError(f"mesh {dict(axes)}: {num_devices} devices are not divisible by {fixed}")
    sizes[sizes.index(-1)] = num_devices // fixed
  if math.prod(sizes) != num_devices:
    raise ValueError(
      f"mesh {dict(zip(MESH_AXES, sizes, strict=True))} needs {math.prod(sizes)} devices, have {num_devices}"
    )
  return tuple(sizes)


def make_mesh(axes: Mapping[str, int], devices=None) -> jax.sharding.Mesh:
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(axes, len(devices))
  return jax.sharding.Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def logical_to_spec(names, mesh=None) -> PartitionSpec:
  """PartitionSpec for logical axis names; mesh axes of size 1 or absent are dropped."""
  sizes = dict(mesh.shape) if mesh is not None and not mesh.empty else {}
  used, out = set(), []
  for name in names:
    target = RULES[name]
    axes = (target,) if isinstance(target, str) else tuple(target or ())
    axes = tuple(a for a in axes if sizes.get(a, 1) > 1 and a not in used)
    used.update(axes)
    out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  return PartitionSpec(*out)


def param_axes(state) -> object:
  """The logical axes of every parameter of an nnx State, as a matching tree."""
  return jax.tree.map(
    lambda v: tuple(v.get_metadata().get("axes") or (None,) * len(v.shape)),
    state,
    is_leaf=lambda x: isinstance(x, nnx.Variable),
  )


def param_specs(state, mesh) -> object:
  """PartitionSpecs for an nnx State from its ``axes`` metadata and the rules."""

  def spec(v):
    axes = v.get_metadata().get("axes") or (None,) * len(v.shape)
    if len(axes) != len(v.shape):
      raise ValueError(f"parameter of shape {v.shape} has axes {axes} of another rank")
    p = logical_to_spec(axes, mesh)
    for dim, entry in zip(v.shape, p, strict=True):
      n = math.prod(mesh.shape[a] for a in ((entry,) if isinstance(entry, str) else entry or ()))
      if dim % n:
        raise ValueError(f"parameter of shape {v.shape} with axes {axes}: dim {dim} is not divisible by {n} ({entry})")
    return v.replace(p)

  return jax.tree.map(spec, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def param_shardings(state, mesh) -> object:
  return jax.tree.map(
    lambda v: v.replace(NamedSharding(mesh, v.get_value())),
    param_specs(state, mesh),
    is_leaf=lambda x: isinstance(x, nnx.Variable),
  )


def constrain(x, names):
  """Constrain an activation to the logical layout under the ambient mesh, if any."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_spec(names, mesh))


def gathered(w):
  """FSDP all-gather of a lookup table before indexing it (gathers from a table
  sharded on its embedding dim would force a full reshuffle of the result)."""
  return constrain(w, (None,) * w.ndim)


def init_sharded(make_model, mesh):
  """Create a model directly sharded: eval_shape -> shardings -> jit(init).

  ``make_model`` builds the nnx Module; nothing is allocated before the jit.
  Returns ``(graphdef, params)`` with params laid out on ``mesh``.
  """
  abstract = nnx.eval_shape(make_model)
  graphdef, abstract_state = nnx.split(abstract)
  shardings = param_shardings(abstract_state, mesh)

  @jax.jit
  def init():
    return jax.lax.with_sharding_constraint(nnx.split(make_model())[1], shardings)

  with jax.set_mesh(mesh):
    return graphdef, init()
