"""The trainer layout: orbax CheckpointManager with async saves, data state and a manifest.

A checkpoint step holds the train state, the data iterator's state (JSON) and
metadata (the experiment config, mesh and parameter manifest). Orbax writes a
step into a temporary directory and renames it when complete, so a crash during
an async save leaves only committed steps visible; ``max_to_keep`` never
deletes the newest committed step. A state with non-finite values is refused.
Just before the rename the primary host writes ``digests.json`` (``verify``): every
read checks the step's bytes first and refuses an altered one with
``CorruptCheckpointError``; ``restore_latest_intact`` falls back past such steps.

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

from interaction import distributed
from interaction.ckpt import verify
from interaction.ckpt.paths import CheckpointNotFoundError, UnsafePathError, check_tree
from interaction.ckpt.verify import CorruptCheckpointError


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
  """Save and restore (train state, data state, metadata) by step under ``directory``.

  Every save goes through orbax's async path (``async_save=False`` waits for it), so each
  committed step gets its digests from the post-finalization callback.
  """

  def __init__(self, directory, *, keep: int = 3, async_save: bool = True):
    self.directory = pathlib.Path(directory).absolute()
    self.async_save = async_save
    self._saving: int | None = None
    self.manager = ocp.CheckpointManager(
      self.directory,
      options=ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        create=True,
        enable_async_checkpointing=True,
        async_options=ocp.AsyncOptions(post_finalization_callback=self._write_digests),
      ),
    )

  def _write_digests(self) -> None:
    """Runs on the primary host after every process wrote the step and before orbax renames it."""
    tmp = [p for p in self.directory.glob(f"{self._saving}.orbax-checkpoint-tmp*") if p.is_dir()]
    if len(tmp) != 1:
      raise RuntimeError(f"cannot find the temporary directory of step {self._saving} under {self.directory}: {tmp}")
    verify.write(tmp[0])

  def latest_step(self) -> int | None:
    """The newest committed step (renamed by orbax, with its digests)."""
    steps = self.all_steps()
    return steps[-1] if steps else None

  def all_steps(self) -> list[int]:
    return committed_steps(self.directory) if self.directory.is_dir() else []

  def save(self, step: int, state, data_state: dict | None, meta: dict) -> None:
    """Start an async save of ``step``; returns once arrays are copied off the device."""
    if not all_finite(state):
      raise NonFiniteCheckpointError(f"refusing to checkpoint step {step}: the state holds NaN or Inf values")
    meta = dict(meta, manifest=param_manifest(state["params"]) if isinstance(state, dict) else None)
    self.manager.wait_until_finished()  # the digest callback of the previous step names it by ``_saving``
    self._saving = step
    self.manager.save(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave(data_state or {}),
        meta=ocp.args.JsonSave(meta),
      ),
    )
    if not self.async_save:
      self.manager.wait_until_finished()

  def check(self, step: int) -> None:
    """Raise ``CorruptCheckpointError`` unless every file of ``step`` matches its digest (all processes)."""
    check_step(self.directory / str(step))

  def restore(self, step: int, target, *, checked: bool = False):
    """Restore ``step`` onto the shardings carried by ``target`` (ShapeDtypeStructs), after checking its bytes.

    ``target`` may describe another mesh than the one that saved: orbax reads
    each array's slices for the new layout. A parameter whose shape or dtype differs
    from the step's manifest is named (``ValueError``) before orbax reads anything.
    """
    if not checked:
      self.check(step)
    step_dir = self.directory / str(step)
    if isinstance(target, dict) and "params" in target:
      check_params(step_dir, target["params"])
    out = self.manager.restore(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()
      ),
    )
    return out["state"], out["data"], out["meta"]

  def restore_latest_intact(self, target, log=print):
    """``(step, state, data, meta)`` of the newest step that passes its digests, or None with no step.

    A corrupt newer step is renamed ``<step>.corrupt`` (kept for inspection, invisible to orbax) and
    named in the log; with no intact step left, the last ``CorruptCheckpointError`` is raised.
    """
    steps, error = self.all_steps(), None
    for step in reversed(steps):
      try:
        self.check(step)
      except CorruptCheckpointError as e:
        error = e
        self._set_aside(step)
        log(f"checkpoint: {e}; moved it to {step}.corrupt and trying the step before")
        continue
      return (step, *self.restore(step, target, checked=True))
    if error is not None:
      raise error
    return None

  def _set_aside(self, step: int) -> None:
    if jax.process_index() == 0:
      src, dst = self.directory / str(step), self.directory / f"{step}.corrupt"
      n = 1
      while dst.exists():
        dst, n = self.directory / f"{step}.corrupt.{n}", n + 1
      src.rename(dst)
    distributed.barrier(f"checkpoint_set_aside_{step}")
    self.manager.reload()

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
  """Steps under a checkpoints directory that are committed: renamed by orbax to their bare number,
  with the digests written just before that rename (an older trainer's steps have none)."""
  directory = pathlib.Path(directory)
  return sorted(
    int(p.name)
    for p in directory.iterdir()
    if p.name.isdigit() and p.is_dir() and (p / "state").is_dir() and (verify.has_digests(p) or p.is_symlink())
  )


def check_step(step_dir) -> None:
  """The step's own checks before anything in it is parsed: confinement, then every file's digest."""
  step_dir = pathlib.Path(step_dir)
  if step_dir.is_symlink():
    raise UnsafePathError(f"{step_dir} is a symlink (to {step_dir.resolve()}); a step directory holds its own files")
  check_tree(step_dir)
  verify.check(
    step_dir, process_index=jax.process_index(), process_count=jax.process_count(), agree=distributed.process_sum
  )


def check_params(step_dir, target: dict) -> None:
  """Refuse a parameter tree whose names or shapes differ from the step's manifest, naming the first few."""
  meta = ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(pathlib.Path(step_dir) / "meta")
  saved = (meta or {}).get("manifest") if isinstance(meta, dict) else None
  if not saved:
    return
  want = param_manifest(target)
  problems = [
    f"{k}: the checkpoint holds shape {tuple(saved[k]['shape'])}, the config builds {tuple(v['shape'])}"
    for k, v in want.items()
    if k in saved and list(saved[k]["shape"]) != list(v["shape"])
  ]
  problems += [f"{k}: not in the checkpoint" for k in want if k not in saved]
  problems += [f"{k}: in the checkpoint but not in the config's model" for k in saved if k not in want]
  if problems:
    more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
    raise ValueError(
      f"checkpoint step {pathlib.Path(step_dir).name} does not match the model config: {'; '.join(problems[:3])}{more}. "
      "Use the config it was trained with (its meta item holds it) or a fresh workdir"
    )


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
    if path.is_symlink():
      raise UnsafePathError(f"{path} is a symlink (to {path.resolve()}); a step directory holds its own files")
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
  check_params(step_dir, target)
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
