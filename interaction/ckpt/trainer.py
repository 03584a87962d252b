"""The trainer layout: orbax CheckpointManager with async saves, data state and a manifest.

A checkpoint step holds the train state, the data iterator's state (JSON) and
metadata (the experiment config, mesh and parameter manifest). Orbax writes a
step into a temporary directory and renames it when complete, so a crash during
an async save leaves only committed steps visible; ``max_to_keep`` never
deletes the newest committed step. A state with non-finite values is refused.

On disk: ``<workdir>/config.json`` and ``<workdir>/checkpoints/<step>/{state,data,meta}``.
``locate``, ``experiment_config`` and ``restore_params`` read that layout without
a CheckpointManager (which would create directories) and without the optimizer state.
"""

from __future__ import annotations

import hashlib
import json
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from interaction.ckpt.paths import CheckpointNotFoundError


class NonFiniteCheckpointError(ValueError):
  """Raised instead of saving a state that holds NaN or Inf."""


class NotTrainerLayoutError(CheckpointNotFoundError):
  """The path is none of the trainer layout's directories (workdir, checkpoints, step)."""


@jax.jit
def _all_finite(leaves):
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def all_finite(tree) -> bool:
  """One compiled reduction over every float leaf.

  A single program matters on virtual CPU devices: many small eager programs
  with collectives in flight at once can starve each other's rendezvous.
  """
  leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
  return bool(jax.device_get(_all_finite(leaves))) if leaves else True


def param_manifest(params) -> dict:
  """Shapes and dtypes of every parameter, saved beside the arrays for humans and tools."""
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  return {
    "/".join(str(getattr(k, "key", k)) for k in path): {"shape": list(x.shape), "dtype": str(x.dtype)}
    for path, x in flat
  }


class Checkpointer:
  """Save and restore (train state, data state, metadata) by step under ``directory``."""

  def __init__(self, directory, *, keep: int = 3, async_save: bool = True):
    self.directory = pathlib.Path(directory).absolute()
    self.manager = ocp.CheckpointManager(
      self.directory,
      options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=async_save),
    )

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state, data_state: dict | None, meta: dict) -> None:
    """Start an async save of ``step``; returns once arrays are copied off the device."""
    if not all_finite(state):
      raise NonFiniteCheckpointError(f"refusing to checkpoint step {step}: the state holds NaN or Inf values")
    meta = dict(meta, manifest=param_manifest(state["params"]) if isinstance(state, dict) else None)
    self.manager.save(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave(data_state or {}),
        meta=ocp.args.JsonSave(meta),
      ),
    )

  def restore(self, step: int, target):
    """Restore ``step`` onto the shardings carried by ``target`` (ShapeDtypeStructs).

    ``target`` may describe another mesh than the one that saved: orbax reads
    each array's slices for the new layout.
    """
    out = self.manager.restore(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()
      ),
    )
    return out["state"], out["data"], out["meta"]

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()


def tree_digest(tree) -> str:
  """SHA-256 over every array's bytes, gathered to the host, in tree order."""
  h = hashlib.sha256()
  for x in jax.tree.leaves(tree):
    a = np.asarray(jax.device_get(x))
    h.update(str((a.shape, a.dtype)).encode())
    h.update(np.ascontiguousarray(a).tobytes())
  return h.hexdigest()


def size_bytes(tree) -> int:
  return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


# -- reading the layout without a manager -------------------------------------------------


def committed_steps(directory) -> list[int]:
  """Steps under a checkpoints directory that orbax finished (renamed to their bare number)."""
  directory = pathlib.Path(directory)
  return sorted(int(p.name) for p in directory.iterdir() if p.is_dir() and p.name.isdigit() and (p / "state").is_dir())


def is_step_dir(path) -> bool:
  return (pathlib.Path(path) / "state").is_dir()


def locate(path, step: int | None = None) -> tuple[pathlib.Path, pathlib.Path]:
  """``(step directory, the workdir's config.json path)`` of the newest (or ``step``) committed step.

  ``path`` is a trainer workdir (``checkpoints/<step>/``), its checkpoints directory or one step.
  """
  path = pathlib.Path(path).absolute()
  if not path.exists():
    raise CheckpointNotFoundError(f"{path}: no such directory")
  if is_step_dir(path):
    if step is not None and path.name.isdigit() and int(path.name) != step:
      raise CheckpointNotFoundError(f"{path} is step {path.name}, not the requested step {step}")
    return path, path.parent.parent / "config.json"
  for ckpt_dir, config_file in ((path / "checkpoints", path / "config.json"), (path, path.parent / "config.json")):
    if ckpt_dir.is_dir() and (steps := committed_steps(ckpt_dir)):
      if step is None:
        step = steps[-1]
      if step not in steps:
        raise CheckpointNotFoundError(f"{ckpt_dir}: no step {step}; committed steps are {steps}")
      return ckpt_dir / str(step), config_file
  raise NotTrainerLayoutError(
    f"{path}: not a trainer workdir (config.json + checkpoints/<step>/), a checkpoint directory (<step>/) "
    "or a checkpoint step (state/, meta/)"
  )


def experiment_config(step_dir, config_file=None) -> dict:
  """The experiment config saved with a step (its ``meta`` item), else the workdir's ``config.json``."""
  step_dir = pathlib.Path(step_dir)
  meta_dir = step_dir / "meta"
  if meta_dir.is_dir():
    meta = ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(meta_dir)
    if isinstance(meta, dict) and "config" in meta:
      return meta["config"]
  if config_file is not None and pathlib.Path(config_file).is_file():
    return json.loads(pathlib.Path(config_file).read_text())
  raise CheckpointNotFoundError(f"{step_dir}: no experiment config in its meta item and no config.json beside it")


def restore_params(step_dir, target: dict) -> dict:
  """``state['params']`` of a step onto ``target``'s shardings (a pure dict of ShapeDtypeStructs).

  An orbax partial restore: the optimizer moments (twice the parameters' size) never leave the disk.
  """
  step_dir = pathlib.Path(step_dir)
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
  return out["params"]
