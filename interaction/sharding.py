"""Logical axis names -> mesh axes, mesh construction and sharded init.

Parameters carry logical axis names in their ``axes`` metadata, the KV cache and
step state declare theirs beside their types (``model.CACHE_AXES``,
``step.STATE_AXES``), and activations are constrained at block boundaries with
``constrain``. A ``Rules`` value (``ModelConfig.rules``: the defaults below with an
experiment's ``rules`` section applied) maps logical names to the mesh axes
``data``, ``fsdp``, ``expert`` and ``tensor``; every function that resolves axes
takes it as an argument, so training, inspection, AOT and the loader agree.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "expert", "tensor")


@dataclasses.dataclass(frozen=True)
class Rules:
  """An immutable table: logical axis name -> the mesh axes it is split over (``()``: replicated)."""

  table: tuple[tuple[str, tuple[str, ...]], ...]

  @classmethod
  def of(cls, mapping: Mapping) -> Rules:
    """Rules from ``{name: axis | (axes...) | None}``, every mesh axis checked."""
    table = []
    for name, target in mapping.items():
      axes = (target,) if isinstance(target, str) else tuple(target or ())
      for axis in axes:
        if axis not in MESH_AXES:
          raise ValueError(f"rules[{name!r}] names mesh axis {axis!r}; mesh axes are {MESH_AXES}")
      table.append((str(name), axes))
    return cls(tuple(table))

  def __getitem__(self, name: str | None) -> tuple[str, ...]:
    if name is None:
      return ()
    for key, axes in self.table:
      if key == name:
        return axes
    raise KeyError(f"no sharding rule for logical axis {name!r}; known: {self.names()}")

  def names(self) -> list[str]:
    return [k for k, _ in self.table]

  def replace(self, overrides: Mapping | None) -> Rules:
    """These rules with some entries replaced (an experiment's ``rules`` section); unknown names are refused."""
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(self.names()))
    if unknown:
      raise ValueError(f"unknown logical axes in rules {unknown}; known: {sorted(self.names())}")
    new = dict(self.of(overrides).table)
    return Rules(tuple((k, new.get(k, v)) for k, v in self.table))

  def to_dict(self) -> dict[str, list[str]]:
    return {k: list(v) for k, v in self.table}


# The default table; an experiment's ``rules`` section replaces entries (ModelConfig.rules).
DEFAULT_RULES = Rules.of(
  {
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
  }
)


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


def logical_to_spec(names, mesh, rules: Rules) -> PartitionSpec:
  """PartitionSpec for logical axis names under ``rules``; mesh axes of size 1 or absent are dropped."""
  sizes = dict(mesh.shape) if mesh is not None and not mesh.empty else {}
  used, out = set(), []
  for name in names:
    axes = tuple(a for a in rules[name] if sizes.get(a, 1) > 1 and a not in used)
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


def _checked_spec(shape, axes, mesh, rules: Rules) -> PartitionSpec:
  if len(axes) != len(shape):
    raise ValueError(f"array of shape {shape} has axes {axes} of another rank")
  p = logical_to_spec(axes, mesh, rules)
  for dim, entry in zip(shape, p, strict=True):
    n = math.prod(mesh.shape[a] for a in ((entry,) if isinstance(entry, str) else entry or ()))
    if dim % n:
      raise ValueError(f"array of shape {shape} with axes {axes}: dim {dim} is not divisible by {n} ({entry})")
  return p


def param_specs(state, mesh, rules: Rules) -> object:
  """PartitionSpecs for an nnx State from its ``axes`` metadata and the rules."""

  def spec(v):
    return v.replace(_checked_spec(v.shape, v.get_metadata().get("axes") or (None,) * len(v.shape), mesh, rules))

  return jax.tree.map(spec, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def param_shardings(state, mesh, rules: Rules) -> object:
  return jax.tree.map(
    lambda v: v.replace(NamedSharding(mesh, v.get_value())),
    param_specs(state, mesh, rules),
    is_leaf=lambda x: isinstance(x, nnx.Variable),
  )


def is_axes(x) -> bool:
  """A leaf of a tree of logical axes: a tuple of names (``None`` for an unnamed dim)."""
  return isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x)


def tree_shardings(shapes, axes, mesh, rules: Rules) -> object:
  """NamedShardings for a tree of arrays (or ShapeDtypeStructs) from a matching tree of logical axes,
  such as ``step.STATE_AXES`` for the step state."""
  return jax.tree.map(
    lambda names, x: NamedSharding(mesh, _checked_spec(x.shape, names, mesh, rules)), axes, shapes, is_leaf=is_axes
  )


def constrain(x, names, rules: Rules):
  """Constrain an activation to the logical layout under the ambient mesh, if any."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_spec(names, mesh, rules))


def gathered(w):
  """FSDP all-gather of a lookup table before indexing it (gathers from a table
  sharded on its embedding dim would force a full reshuffle of the result)."""
  if jax.sharding.get_abstract_mesh().empty:
    return w
  return jax.lax.with_sharding_constraint(w, PartitionSpec(*(None,) * w.ndim))


def init_sharded(make_model, mesh, rules: Rules):
  """Create a model directly sharded: eval_shape -> shardings -> jit(init).

  ``make_model`` builds the nnx Module; nothing is allocated before the jit.
  Returns ``(graphdef, params)`` with params laid out on ``mesh`` by ``rules``.
  """
  abstract = nnx.eval_shape(make_model)
  graphdef, abstract_state = nnx.split(abstract)
  shardings = param_shardings(abstract_state, mesh, rules)

  @jax.jit
  def init():
    return jax.lax.with_sharding_constraint(nnx.split(make_model())[1], shardings)

  with jax.set_mesh(mesh):
    return graphdef, init()
