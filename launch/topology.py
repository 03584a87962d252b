"""TPU slices by name: published per-chip figures, physical topologies, compile-only devices and meshes.

Slice names follow Cloud TPU: ``v4-N`` and ``v5p-N`` count TensorCores (2 per
chip), so v5p-256 is 128 chips; ``v5e-N`` (``v5litepod-N``) and ``v6e-N`` count
chips. ``topology_devices`` asks libtpu's compiler for compile-only devices of the
slice (one per chip: v4 in megacore mode): no TPU is needed.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import numpy as np

from interaction import sharding

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
  """Published per-chip figures (Cloud TPU system architecture pages)."""

  name: str
  hbm_bytes: int
  peak_bf16_flops: float
  hbm_bytes_per_s: float
  cores_per_chip: int  # the slice name counts cores for v4 and v5p, chips for v5e and v6e
  chips_per_host: int
  shapes: dict  # chips -> physical topology
  libtpu_options: tuple = ()  # (name, value) pairs for libtpu's topology: v4 is one device per chip (megacore)


CHIPS = {
  "v4": Chip(
    "v4",
    32 * GIB,
    275e12,
    1200e9,
    2,
    4,
    {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8", 512: "8x8x8"},
    (("chip_config_name", "megacore"),),
  ),
  "v5e": Chip(
    "v5e",
    16 * GIB,
    197e12,
    819e9,
    1,
    4,  # a multi-host slice has 4 chips per host (v5e-8, one 2x4 host, is modelled as 2 hosts of 4)
    {4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"},
  ),
  "v5p": Chip(
    "v5p",
    95 * GIB,
    459e12,
    2765e9,
    2,
    4,
    {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8", 512: "8x8x8"},
  ),
  "v6e": Chip(
    "v6e",
    32 * GIB,
    918e12,
    1640e9,
    1,
    4,
    {4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"},
  ),
}


@dataclasses.dataclass(frozen=True)
class Topology:
  name: str  # e.g. "v5p-256"
  chip: Chip
  chips: int
  shape: str  # e.g. "4x8x8"

  @property
  def hosts(self) -> int:
    return max(1, self.chips // self.chip.chips_per_host)

  @property
  def chips_per_host(self) -> int:
    return min(self.chips, self.chip.chips_per_host)


def known_topologies() -> list[str]:
  return [f"{c.name}-{n * c.cores_per_chip}" for c in CHIPS.values() for n in c.shapes]


ALIASES = {"v5litepod": "v5e"}  # Cloud TPU's accelerator type for v5e slices


def parse_topology(name: str) -> Topology:
  """``"v5p-256"`` -> Topology (``v5litepod-16`` is ``v5e-16``); a clear error lists the known slices."""
  gen, _, count = name.partition("-")
  gen = ALIASES.get(gen, gen)
  chip = CHIPS.get(gen)
  if chip is None or not count.isdigit() or int(count) % chip.cores_per_chip:
    raise ValueError(f"unknown topology {name!r}; known: {', '.join(known_topologies())}")
  chips = int(count) // chip.cores_per_chip
  if chips not in chip.shapes:
    raise ValueError(f"unknown topology {name!r}; known: {', '.join(known_topologies())}")
  return Topology(f"{gen}-{count}", chip, chips, chip.shapes[chips])


def topology_devices(topo: Topology) -> list:
  """Compile-only devices of the slice, from libtpu (no TPU needed)."""
  try:
    import libtpu  # noqa: F401
  except ImportError as e:
    raise RuntimeError("AOT compilation for TPU needs libtpu: pip install '.[tpu]' (or pip install libtpu)") from e
  from jax.experimental import topologies

  # Compile-only use takes no chips; without this a second compiling process on the host fails on
  # libtpu's lockfile.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  devices = topologies.get_topology_desc(
    platform="tpu", topology_name=f"{topo.chip.name}:{topo.shape}", **dict(topo.chip.libtpu_options)
  ).devices
  if len(devices) != topo.chips:
    raise RuntimeError(f"libtpu made {len(devices)} devices for {topo.name} ({topo.shape}), expected {topo.chips}")
  return list(devices)


def topology_mesh(axes: dict, devices) -> jax.sharding.Mesh:
  """A mesh over the slice, laid out on the physical torus when mesh_utils can."""
  shape = sharding.mesh_shape(axes, len(devices))
  try:
    from jax.experimental import mesh_utils

    grid = mesh_utils.create_device_mesh(shape, devices)
  except (ValueError, NotImplementedError, AssertionError):
    grid = np.asarray(devices).reshape(shape)
  return jax.sharding.Mesh(grid, sharding.MESH_AXES)
