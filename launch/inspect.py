r"""Print what a config costs before launching it; allocates nothing.

  python -m launch.inspect --config experiments/tiny.py --mesh data=2,expert=4

Prints parameter counts (total and active per token), the micro-turn layout
and parameter bytes per device for the mesh, all from ``jax.eval_shape``.
"""

from __future__ import annotations

import math

import jax
from absl import flags
from ml_collections import config_flags

from interaction import flops, layout, sharding
from interaction.ckpt import abstract_model
from interaction.config import ModelConfig
from interaction.experiment import experiment
from interaction.layout import MICRO_TURN_SECONDS
from launch import cli

FLAGS = cli.flag_values()
_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "Experiment config file (a get_config() module).", flag_values=FLAGS
)
_MESH = flags.DEFINE_string(
  "mesh", None, "Mesh axis sizes, e.g. data=2,expert=4 (default: the config's mesh).", flag_values=FLAGS
)
_DEVICES = flags.DEFINE_integer(
  "devices", None, "Device count for a -1 mesh axis (default: the product).", flag_values=FLAGS
)


def stream_table(cfg: ModelConfig) -> list[tuple[str, str, str, int]]:
  return [(s.name, s.direction, s.kind, s.slots) for s in layout.block_order(cfg.streams)]


def abstract_mesh(mesh_axes: dict[str, int], num_devices: int | None = None) -> jax.sharding.AbstractMesh:
  """A device-free mesh of these axis sizes; ``num_devices`` resolves a -1 axis (default: the product)."""
  n = num_devices or math.prod(v for v in mesh_axes.values() if v > 0)
  return jax.sharding.AbstractMesh(sharding.mesh_shape(mesh_axes, n), sharding.MESH_AXES)


def report(cfg: ModelConfig, mesh_axes: dict[str, int] | None = None, num_devices: int | None = None) -> str:
  """A printable summary: parameter counts, micro-turn layout, bytes per device (under ``cfg.rules``)."""
  state = abstract_model(cfg)[1]
  counts = flops.count_params(cfg, state)
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
    mesh = abstract_mesh(mesh_axes, num_devices)
    per_device = flops.bytes_per_device(cfg, mesh, state)
    shape = dict(mesh.shape)
    lines.append(f"mesh {shape}: parameter bytes per device {per_device:,} ({per_device / 2**30:.2f} GiB)")
  return "\n".join(lines)


def main(argv=None) -> int:
  cli.parse(FLAGS, argv, doc=__doc__, prog="python -m launch.inspect", required=("config",))
  config = experiment(_CONFIG.value)
  cfg = config.model  # its sharding rules included: the layout training uses
  axes = sharding.parse_mesh(_MESH.value) if _MESH.value else config.mesh.axes()
  if any(v == -1 for v in axes.values()) and not _DEVICES.value:
    axes = {k: (1 if v == -1 else v) for k, v in axes.items()}
  print(report(cfg, axes, _DEVICES.value))
  return 0


def run() -> None:
  """The ``interaction-inspect`` command."""
  cli.run(main, refused=(ValueError,))


if __name__ == "__main__":
  run()
