"""Load a model for serving: config, graph and parameters only (never the optimizer state).

``load_params(path, mesh=None, step=None)`` is the one entry point the engine,
the evaluator and the background model use. It dispatches on what ``path``
holds, so new on-disk layouts (e.g. a converted serve layout) only add a branch
to ``_resolve``:

- a trainer workdir: ``config.json`` + ``checkpoints/<step>/``;
- a trainer checkpoint directory: ``<step>/`` subdirectories (the config is read
  from the sibling ``config.json`` or from the step's ``meta`` item);
- one checkpoint step: a directory holding ``state/`` and ``meta/``.

Only ``state['params']`` is read, by an orbax partial restore: the optimizer
moments (twice the parameters' size) never leave the disk.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import jax
import ml_collections
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import SingleDeviceSharding

from interaction import config as config_lib
from interaction import sharding
from interaction.model import InteractionModel


class CheckpointNotFoundError(FileNotFoundError):
  """The path holds nothing the loader knows how to read."""


@dataclasses.dataclass(frozen=True)
class Loaded:
  """A model ready for the step: ``nnx.merge(graphdef, params)`` rebuilds it."""

  cfg: config_lib.ModelConfig
  graphdef: object
  params: dict  # pure dict of arrays, the trainer's ``state['params']`` layout
  config: ml_collections.ConfigDict  # the experiment config (serve.cache_tokens, data, ...)
  step: int
  path: pathlib.Path  # the checkpoint step directory read

  @property
  def cache_tokens(self) -> int:
    serve = self.config.get("serve")
    return int(serve.cache_tokens) if serve and "cache_tokens" in serve else self.cfg.attention_window


def _steps(directory: pathlib.Path) -> list[int]:
  return sorted(int(p.name) for p in directory.iterdir() if p.is_dir() and p.name.isdigit() and (p / "state").is_dir())


def _resolve(path: pathlib.Path, step: int | None) -> tuple[pathlib.Path, dict | None]:
  """(checkpoint step directory, experiment config dict if found beside it)."""
  if not path.exists():
    raise CheckpointNotFoundError(f"{path}: no such directory")
  if (path / "state").is_dir():  # one step
    if step is not None and path.name.isdigit() and int(path.name) != step:
      raise CheckpointNotFoundError(f"{path} is step {path.name}, not the requested step {step}")
    return path, _read_config(path.parent.parent / "config.json")
  for ckpt_dir, config_file in ((path / "checkpoints", path / "config.json"), (path, path.parent / "config.json")):
    if ckpt_dir.is_dir() and (steps := _steps(ckpt_dir)):
      if step is None:
        step = steps[-1]
      if step not in steps:
        raise CheckpointNotFoundError(f"{ckpt_dir}: no step {step}; committed steps are {steps}")
      return ckpt_dir / str(step), _read_config(config_file)
  raise CheckpointNotFoundError(
    f"{path}: not a trainer workdir (config.json + checkpoints/<step>/), a checkpoint directory (<step>/) "
    "or a checkpoint step (state/, meta/)"
  )


def _read_config(file: pathlib.Path) -> dict | None:
  return json.loads(file.read_text()) if file.is_file() else None


def _meta_config(step_dir: pathlib.Path) -> dict:
  meta_dir = step_dir / "meta"
  if not meta_dir.is_dir():
    raise CheckpointNotFoundError(f"{step_dir}: no config.json beside the checkpoints and no meta item")
  meta = ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(meta_dir)
  if "config" not in meta:
    raise CheckpointNotFoundError(f"{meta_dir}: the metadata holds no experiment config")
  return meta["config"]


def abstract_params(cfg: config_lib.ModelConfig, mesh=None):
  """(graphdef, pure dict of ShapeDtypeStructs carrying their target shardings)."""
  graphdef, state = nnx.split(nnx.eval_shape(lambda: InteractionModel(cfg, rngs=nnx.Rngs(0))))
  shapes = nnx.to_pure_dict(state)
  if mesh is None:
    one = SingleDeviceSharding(jax.devices()[0])
    shardings = jax.tree.map(lambda _: one, shapes)
  else:
    shardings = nnx.to_pure_dict(sharding.param_shardings(state, mesh))
  return graphdef, jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)


def load_params(path, mesh=None, step: int | None = None) -> Loaded:
  """Config, graphdef and parameters of the newest (or ``step``) checkpoint under ``path``.

  With ``mesh=None`` the parameters land on the first device; with a mesh they
  are laid out by the model's sharding rules.
  """
  step_dir, config_dict = _resolve(pathlib.Path(path).absolute(), step)
  config = ml_collections.ConfigDict(config_dict if config_dict is not None else _meta_config(step_dir))
  cfg = config_lib.model_config(config)
  graphdef, target = abstract_params(cfg, mesh)
  restore_args = ocp.checkpoint_utils.construct_restore_args({"params": target})
  checkpointer = ocp.PyTreeCheckpointer()
  try:
    out = checkpointer.restore(
      step_dir / "state",
      args=ocp.args.PyTreeRestore(item={"params": target}, restore_args=restore_args, partial_restore=True),
    )
  except (ValueError, KeyError) as e:
    raise ValueError(f"{step_dir}: the checkpoint's parameters do not match the model config: {e}") from e
  finally:
    checkpointer.close()
  return Loaded(cfg, graphdef, out["params"], config, int(step_dir.name) if step_dir.name.isdigit() else -1, step_dir)
