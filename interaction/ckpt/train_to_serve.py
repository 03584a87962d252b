"""Trainer checkpoint -> serve layout, one array at a time.

Reads the parameters of one committed step of an orbax trainer checkpoint leaf
by leaf (tensorstore reads of the orbax arrays into host numpy), never the optimizer state,
casts each to the serving dtype in bounded chunks and streams it into a serve
checkpoint. Peak host memory is about one array plus one chunk
(``benchmarks/convert_memory.py`` measures it).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import pathlib

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts

from interaction import config as config_lib
from interaction import experiment as experiment_lib
from interaction.ckpt import params as params_lib
from interaction.ckpt import serve, trainer

_CHUNK_BYTES = 32 << 20


def model_config_of(step_path, config_file=None) -> tuple[config_lib.ModelConfig, dict]:
  """The model config and the experiment config a trainer saved with a step."""
  stored = trainer.experiment_config(step_path, config_file)
  return experiment_lib.experiment(stored).model, stored


class OrbaxParamReader:
  """One parameter at a time from a step's ``state`` item, as host numpy."""

  def __init__(self, step_path):
    self.directory = pathlib.Path(step_path) / "state"
    self.ckptr = ocp.PyTreeCheckpointer()
    # One context for every read, with no chunk cache: nothing outlives the array being converted.
    self.context = ts.Context({"cache_pool": {"total_bytes_limit": 0}})
    tree = self.ckptr.metadata(self.directory).item_metadata
    if "params" not in tree:
      raise ValueError(f"{self.directory}: no 'params' in the checkpoint state")
    flat = jax.tree_util.tree_flatten_with_path(tree["params"])[0]
    self.leaves = {params_lib.name_of(p): (tuple(str(getattr(k, "key", k)) for k in p), m) for p, m in flat}

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self.leaves[name][1].shape)

  def read(self, name: str) -> np.ndarray:
    """The whole array, read by tensorstore straight into one numpy buffer.

    Orbax's own restore stages copies (2x and more); the direct read allocates
    the result once. Falls back to an orbax partial restore for layouts the
    direct read does not know.
    """
    keys, meta = self.leaves[name]
    kvstore = {"driver": "ocdbt", "base": f"file://{self.directory.resolve()}", "path": ".".join(("params", *keys))}
    for driver in ("zarr", "zarr3"):
      try:
        spec = {"driver": driver, "kvstore": kvstore}
        store = ts.open(spec, open=True, read=True, context=self.context).result()
      except ValueError:
        continue
      if tuple(store.shape) != tuple(meta.shape):
        raise ValueError(f"{name!r}: stored shape {tuple(store.shape)} != metadata shape {tuple(meta.shape)}")
      return store.read().result()
    return self._read_orbax(keys)

  def _read_orbax(self, keys) -> np.ndarray:
    item, args = {}, {}
    node_i, node_a = item, args
    for k in keys[:-1]:
      node_i = node_i.setdefault(k, {})
      node_a = node_a.setdefault(k, {})
    node_i[keys[-1]] = 0
    node_a[keys[-1]] = ocp.RestoreArgs(restore_type=np.ndarray)
    out = self.ckptr.restore(
      self.directory,
      args=ocp.args.PyTreeRestore(item={"params": item}, restore_args={"params": args}, partial_restore=True),
    )["params"]
    for k in keys:
      out = out[k]
    return np.asarray(out)


def _release_freed_memory() -> None:
  """Return freed heap pages to the OS (glibc keeps them in per-thread arenas otherwise).

  tensorstore decodes on worker threads; without this, each array's freed buffers
  stay resident and the process's peak grows with the number of large arrays.
  """
  with contextlib.suppress(OSError, AttributeError):
    ctypes.CDLL("libc.so.6").malloc_trim(0)


def convert(src, dst, *, step: int | None = None, dtype: str | None = None, mesh_hint: dict | None = None) -> dict:
  """Write the params of trainer checkpoint ``src`` (latest or ``step``) as a serve checkpoint at ``dst``."""
  path, config_file = trainer.locate(src, step)
  trainer.check_step(path)  # confinement and every file's digest, before anything is parsed
  cfg, experiment = model_config_of(path, config_file)
  cfg = cfg if dtype is None else dataclasses.replace(cfg, param_dtype=dtype)
  serve.dtype_of(cfg.param_dtype)
  infos = params_lib.param_infos(cfg)
  reader = OrbaxParamReader(path)
  missing, extra = sorted(set(infos) - set(reader.leaves)), sorted(set(reader.leaves) - set(infos))
  if missing or extra:
    raise ValueError(f"{path}: checkpoint params do not match its config: missing {missing}, unexpected {extra}")
  for name, info in infos.items():
    if reader.shape(name) != info.shape:
      raise ValueError(f"{path}: {name!r} has shape {reader.shape(name)}, its config says {info.shape}")
  source = {"kind": "train", "checkpoint": str(path.resolve()), "step": int(path.name)}
  writer = serve.Writer(dst, cfg, mesh_hint=mesh_hint, extra={"source": source, "experiment": experiment})
  largest = 0
  for name, info in infos.items():
    array = reader.read(name)
    largest = max(largest, array.nbytes)
    with writer.stream(name, info.shape, info.dtype) as sink:
      flat = array.reshape(-1)
      step_elems = max(1, _CHUNK_BYTES // max(array.itemsize, 1))
      for i in range(0, flat.size, step_elems):
        sink.write(flat[i : i + step_elems].astype(info.dtype, copy=False))
    del array, flat
    _release_freed_memory()
  manifest = writer.finish()
  return {"step": int(path.name), "arrays": len(manifest["arrays"]), "largest_source_bytes": largest}
