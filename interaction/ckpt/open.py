"""One loader for every checkpoint layout: ``open_model(path, *, mesh=None, step=None) -> Loaded``.

``path`` may be
- a trainer workdir (``config.json`` + ``checkpoints/<step>/``), its ``checkpoints/``
  directory or one step (``state/``, ``meta/``): every file of the step is checked
  against its digest, then ``state['params']`` is read by an orbax partial restore,
  never the optimizer state;
- a serve checkpoint (``manifest.json`` + ``arrays/``), as ``launch.convert
  train-to-serve`` and ``hf-to-interaction`` write it: every array is verified
  against its SHA-256 before it is placed.

Either way no path out of the checkpoint is followed (``paths.check_tree``).
"""

from __future__ import annotations

import dataclasses
import pathlib

import jax
from flax import nnx
from jax.sharding import SingleDeviceSharding

from interaction import config as config_lib
from interaction import sharding
from interaction.ckpt import serve, trainer
from interaction.ckpt.params import abstract_model
from interaction.ckpt.paths import CheckpointNotFoundError, check_tree
from interaction.experiment import ExperimentConfig, experiment

LAYOUTS = ("trainer", "serve")


@dataclasses.dataclass(frozen=True)
class Loaded:
  """A model ready for the step: ``nnx.merge(graphdef, params)`` rebuilds it."""

  cfg: config_lib.ModelConfig
  graphdef: object
  params: dict  # pure dict of arrays, the trainer's ``state['params']`` layout
  config: ExperimentConfig  # the experiment stored with it (serve.cache_tokens, data, ...); its model is cfg
  step: int  # the training step; 0 for a model imported from elsewhere
  path: pathlib.Path  # the step directory or serve checkpoint read
  layout: str  # one of LAYOUTS

  @property
  def cache_tokens(self) -> int:
    return self.config.serve.cache_tokens


def param_shardings(cfg: config_lib.ModelConfig, mesh=None) -> dict:
  """Target shardings of every parameter (a pure dict): the first device, or laid out on ``mesh`` by
  the config's sharding rules."""
  _, state = abstract_model(cfg)
  if mesh is None:
    one = SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda _: one, nnx.to_pure_dict(state))
  return nnx.to_pure_dict(sharding.param_shardings(state, mesh, cfg.rules))


def _abstract_params(cfg, shardings) -> dict:
  shapes = nnx.to_pure_dict(abstract_model(cfg)[1])
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)


def _open_trainer(path: pathlib.Path, mesh, step: int | None) -> Loaded:
  step_dir, config_file = trainer.locate(path, step)
  trainer.check_step(step_dir)  # before any of its files is parsed
  config = experiment(trainer.experiment_config(step_dir, config_file))
  cfg = config.model
  params = trainer.restore_params(step_dir, _abstract_params(cfg, param_shardings(cfg, mesh)))
  number = int(step_dir.name) if step_dir.name.isdigit() else -1
  return Loaded(cfg, abstract_model(cfg)[0], params, config, number, step_dir, "trainer")


def _open_serve(path: pathlib.Path, mesh, step: int | None) -> Loaded:
  check_tree(path)
  manifest = serve.read_manifest(path)
  source = manifest.get("source") or {}
  number = int(source.get("step", 0))
  if step is not None and step != number:
    raise CheckpointNotFoundError(f"{path} is a serve checkpoint of step {number}, not the requested step {step}")
  cfg = serve.model_config(path)
  params = serve.load(path, param_shardings(cfg, mesh))
  config = experiment(manifest.get("experiment") or {}, model=cfg)
  return Loaded(cfg, abstract_model(cfg)[0], params, config, number, path, "serve")


def open_model(path, *, mesh=None, step: int | None = None) -> Loaded:
  """Config, graphdef and parameters of the checkpoint at ``path`` (the newest step, or ``step``).

  With ``mesh=None`` the parameters land on the first device; with a mesh they are
  laid out by the model's sharding rules. Raises ``CheckpointNotFoundError`` when
  ``path`` holds no checkpoint (or not ``step``), ``ServeCheckpointError`` /
  ``CorruptCheckpointError`` / ``UnsafePathError`` when what it holds is altered or
  escapes the directory.
  """
  path = pathlib.Path(path).absolute()
  if not path.exists():
    raise CheckpointNotFoundError(f"{path}: no such directory")
  if (path / serve.MANIFEST).exists() or (path / serve.MANIFEST).is_symlink():
    return _open_serve(path, mesh, step)
  try:
    return _open_trainer(path, mesh, step)
  except trainer.NotTrainerLayoutError as e:
    raise CheckpointNotFoundError(f"{e}, nor a serve checkpoint (manifest.json + arrays/)") from None
