"""Checkpoints: orbax CheckpointManager with async saves, data state and a manifest.

A checkpoint step holds the train state, the data iterator's state (JSON) and
metadata (the experiment config, mesh and parameter manifest). Orbax writes a
step into a temporary directory and renames it when complete, so a crash during
an async save leaves only committed steps visible; ``max_to_keep`` never
deletes the newest committed step. A state with non-finite values is refused.
"""

from __future__ import annotations

import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp


class NonFiniteCheckpointError(ValueError):
  """Raised instead of saving a state that holds NaN or Inf."""


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
  import hashlib

  h = hashlib.sha256()
  for x in jax.tree.leaves(tree):
    a = np.asarray(jax.device_get(x))
    h.update(str((a.shape, a.dtype)).encode())
    h.update(np.ascontiguousarray(a).tobytes())
  return h.hexdigest()


def size_bytes(tree) -> int:
  return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))
