"""The serve layout: parameters only, one raw file per array, a manifest with SHA-256 digests.

A serve checkpoint directory holds ``manifest.json`` and ``arrays/*.bin``. Each
``.bin`` is the array's bytes, little-endian, C order, nothing else. The manifest
(format ``interaction-serve``, version 1) holds the model config, the parameter
dtype, an optional mesh hint and, per array, its file, shape, dtype, logical axes
and SHA-256. The manifest carries a digest of its own canonical JSON, so a changed
config is refused like a changed array.

``load`` checks every path against the directory (no ``..``, absolute paths or
symlinks out) and every array's size and digest before the array is used; it
raises ``IntegrityError`` naming the array, ``ManifestError`` or
``UnsafePathError``. Writing goes array by array (or chunk by chunk), so host
memory stays bounded by the largest array.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pathlib
import sys
import types

import jax
import numpy as np
from jax.sharding import NamedSharding

from interaction import sharding
from interaction.ckpt import params as params_lib
from interaction.ckpt.paths import UnsafePathError, confined
from interaction.config import ModelConfig

FORMAT = "interaction-serve"
VERSION = 1
MANIFEST = "manifest.json"
DTYPES = ("float32", "bfloat16", "float16")
_CHUNK = 64 << 20

__all__ = ["IntegrityError", "ManifestError", "UnsafePathError", "Writer", "is_serve_checkpoint", "load"]


class ServeCheckpointError(ValueError):
  """Base of every refusal to load a serve checkpoint."""


class ManifestError(ServeCheckpointError):
  """The manifest is missing, unreadable, of another format, or altered."""


class IntegrityError(ServeCheckpointError):
  """An array's file is missing, of the wrong size, or its bytes do not match the digest."""


def dtype_of(name: str) -> np.dtype:
  if name not in DTYPES:
    raise ManifestError(f"unsupported array dtype {name!r}; expected one of {DTYPES}")
  return np.dtype(jax.numpy.dtype(name))


def _canonical_digest(manifest: dict) -> str:
  body = {k: v for k, v in manifest.items() if k != "sha256"}
  return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def mesh_spec(axes, shape, mesh_axes: dict, rules: sharding.Rules) -> list:
  """The PartitionSpec (as a JSON list) of a parameter on a mesh of these axis sizes under ``rules``;
  checks divisibility."""
  fake = types.SimpleNamespace(shape=dict(mesh_axes), empty=False)
  spec = sharding.logical_to_spec(axes, fake, rules)
  for dim, entry in zip(shape, spec, strict=True):
    n = math.prod(mesh_axes[a] for a in ((entry,) if isinstance(entry, str) else entry or ()))
    if dim % n:
      raise ValueError(f"shape {tuple(shape)} with axes {axes}: dim {dim} is not divisible by {n} ({entry})")
  return [list(e) if isinstance(e, tuple) else e for e in spec]


class Writer:
  """Write a serve checkpoint array by array; ``finish()`` writes the manifest last.

  A directory without a manifest is not a serve checkpoint, so an interrupted
  write is never mistaken for a complete one.
  """

  def __init__(self, directory, cfg: ModelConfig, *, mesh_hint: dict | None = None, extra: dict | None = None):
    if sys.byteorder != "little":
      raise RuntimeError("the serve layout is little-endian; writing from a big-endian host is not supported")
    self.directory = pathlib.Path(directory)
    if self.directory.exists() and any(self.directory.iterdir()):
      raise FileExistsError(f"{self.directory} exists and is not empty; choose a new --dst")
    (self.directory / "arrays").mkdir(parents=True, exist_ok=True)
    self.cfg, self.mesh_hint, self.extra = cfg, mesh_hint, dict(extra or {})
    self.expected = params_lib.param_infos(cfg)
    self.arrays: dict[str, dict] = {}

  def _check(self, name: str, shape, dtype) -> params_lib.ParamInfo:
    info = self.expected.get(name)
    if info is None:
      raise ValueError(f"{name!r} is not a parameter of this model")
    if tuple(shape) != info.shape or np.dtype(dtype) != info.dtype:
      raise ValueError(f"{name!r}: got {tuple(shape)} {np.dtype(dtype)}, the model expects {info.shape} {info.dtype}")
    if name in self.arrays:
      raise ValueError(f"{name!r} written twice")
    return info

  def stream(self, name: str, shape, dtype) -> _ArrayStream:
    """A sink for the array's C-order bytes in consecutive chunks: ``with w.stream(...) as s: s.write(chunk)``."""
    info = self._check(name, shape, dtype)
    rel = "arrays/" + name.replace("/", ".") + ".bin"
    return _ArrayStream(self, name, rel, info)

  def add(self, name: str, array) -> None:
    array = np.asarray(array)
    with self.stream(name, array.shape, array.dtype) as s:
      flat = array.reshape(-1)
      step = max(1, _CHUNK // max(array.itemsize, 1))
      for i in range(0, flat.size, step):
        s.write(flat[i : i + step])

  def finish(self) -> dict:
    missing = sorted(set(self.expected) - set(self.arrays))
    if missing:
      raise ValueError(f"serve checkpoint incomplete: missing {missing}")
    manifest = {
      "format": FORMAT,
      "version": VERSION,
      "model_config": params_lib.config_to_json(self.cfg),
      "dtype": self.cfg.param_dtype,
      "mesh_hint": self.mesh_hint,
      **self.extra,
      "arrays": dict(sorted(self.arrays.items())),
    }
    manifest["sha256"] = _canonical_digest(manifest)
    tmp = self.directory / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, self.directory / MANIFEST)
    return manifest


class _ArrayStream:
  def __init__(self, writer: Writer, name: str, rel: str, info: params_lib.ParamInfo):
    self.writer, self.name, self.rel, self.info = writer, name, rel, info
    self.nbytes = math.prod(info.shape) * info.dtype.itemsize
    self.written, self.hash = 0, hashlib.sha256()

  def __enter__(self):
    self.file = open(self.writer.directory / self.rel, "wb")  # noqa: SIM115  (closed in __exit__)
    return self

  def write(self, chunk) -> None:
    chunk = np.ascontiguousarray(chunk)
    if chunk.dtype != self.info.dtype:
      raise ValueError(f"{self.name!r}: chunk dtype {chunk.dtype} != {self.info.dtype}")
    data = chunk.reshape(-1).view(np.uint8)  # a byte view: works for bfloat16 too
    if self.written + len(data) > self.nbytes:
      raise ValueError(f"{self.name!r}: more bytes than its shape {self.info.shape} holds")
    self.hash.update(data)
    self.file.write(data)
    self.written += len(data)

  def __exit__(self, exc_type, *_):
    self.file.close()
    if exc_type is not None:
      return
    if self.written != self.nbytes:
      raise ValueError(f"{self.name!r}: wrote {self.written} bytes, its shape needs {self.nbytes}")
    w = self.writer
    entry = {
      "file": self.rel,
      "offset": 0,
      "nbytes": self.nbytes,
      "shape": list(self.info.shape),
      "dtype": str(self.info.dtype),
      "axes": list(self.info.axes),
      "sha256": self.hash.hexdigest(),
    }
    if w.mesh_hint:
      entry["spec"] = mesh_spec(self.info.axes, self.info.shape, w.mesh_hint, w.cfg.rules)
    w.arrays[self.name] = entry


# -- loading -------------------------------------------------------------------


def is_serve_checkpoint(directory) -> bool:
  path = pathlib.Path(directory) / MANIFEST
  if not path.is_file():
    return False
  try:
    return json.loads(path.read_text()).get("format") == FORMAT
  except (ValueError, UnicodeDecodeError, AttributeError):
    return False


def read_manifest(directory) -> dict:
  """The manifest after checking its format, version and own digest."""
  path = confined(directory, MANIFEST, what="manifest")
  try:
    manifest = json.loads(path.read_bytes().decode("utf-8"))
  except FileNotFoundError as e:
    raise ManifestError(f"{directory} has no {MANIFEST}: not a serve checkpoint (or an incomplete one)") from e
  except (ValueError, UnicodeDecodeError) as e:
    raise ManifestError(f"{path}: not valid JSON ({e})") from e
  if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
    raise ManifestError(f"{path}: format is not {FORMAT!r}")
  if manifest.get("version") != VERSION:
    raise ManifestError(f"{path}: version {manifest.get('version')!r} is not supported (expected {VERSION})")
  if manifest.get("sha256") != _canonical_digest(manifest):
    raise ManifestError(f"{path}: the manifest's digest does not match its contents (altered or corrupted)")
  return manifest


def model_config(directory) -> ModelConfig:
  try:
    return params_lib.config_from_json(read_manifest(directory)["model_config"])
  except (KeyError, TypeError, ValueError) as e:
    if isinstance(e, ServeCheckpointError):
      raise
    raise ManifestError(f"{directory}: bad model_config in the manifest ({e})") from e


def read_array(directory, name: str, entry: dict, info: params_lib.ParamInfo) -> np.ndarray:
  """One array's bytes, checked against the model, its size and its digest before they are returned."""
  try:
    shape, dtype = tuple(entry["shape"]), dtype_of(entry["dtype"])
    nbytes, offset, rel, digest = int(entry["nbytes"]), int(entry["offset"]), entry["file"], entry["sha256"]
  except (KeyError, TypeError, ValueError) as e:
    raise ManifestError(f"array {name!r}: malformed manifest entry ({e})") from e
  if shape != info.shape or dtype != info.dtype or nbytes != math.prod(shape) * dtype.itemsize or offset != 0:
    raise IntegrityError(
      f"array {name!r}: manifest says {shape} {dtype} ({nbytes} bytes at {offset}); the model needs {info.shape} "
      f"{info.dtype}"
    )
  path = confined(directory, rel, what=f"file of array {name!r}")
  try:
    size = path.stat().st_size
  except FileNotFoundError as e:
    raise IntegrityError(f"array {name!r}: file {rel} is missing") from e
  if size != nbytes:
    raise IntegrityError(f"array {name!r}: file {rel} has {size} bytes, expected {nbytes} (truncated or extended)")
  buf = bytearray(nbytes)
  with open(path, "rb") as f:
    if f.readinto(buf) != nbytes:
      raise IntegrityError(f"array {name!r}: short read from {rel}")
  if hashlib.sha256(buf).hexdigest() != digest:
    raise IntegrityError(f"array {name!r}: SHA-256 of {rel} does not match the manifest (corrupted or tampered)")
  return np.frombuffer(buf, dtype=dtype).reshape(shape)


def iter_arrays(directory, names=None):
  """Yield ``(name, verified numpy array)`` one at a time, for converters that stream."""
  manifest = read_manifest(directory)
  cfg = model_config(directory)
  infos = params_lib.param_infos(cfg)
  arrays = manifest.get("arrays")
  if not isinstance(arrays, dict) or set(arrays) != set(infos):
    have = set(arrays) if isinstance(arrays, dict) else set()
    raise ManifestError(
      f"{directory}: arrays do not match the model: missing {sorted(set(infos) - have)}, "
      f"unexpected {sorted(have - set(infos))}"
    )
  for name in infos if names is None else names:
    yield name, read_array(directory, name, arrays[name], infos[name])


def _target_sharding(shardings_or_mesh, name: str, info: params_lib.ParamInfo, flat_shardings, rules):
  if shardings_or_mesh is None:
    return None
  if isinstance(shardings_or_mesh, jax.sharding.Mesh):
    mesh = shardings_or_mesh
    spec = mesh_spec(info.axes, info.shape, dict(mesh.shape), rules)
    return NamedSharding(mesh, jax.sharding.PartitionSpec(*[tuple(e) if isinstance(e, list) else e for e in spec]))
  if isinstance(shardings_or_mesh, jax.sharding.Sharding):
    return shardings_or_mesh
  return flat_shardings[name]


def load(directory, shardings_or_mesh=None) -> dict:
  """Verified parameters as the model's pure dict (``nnx.merge(graphdef, params)``).

  ``shardings_or_mesh``: None (host numpy arrays), a Mesh (each parameter laid out
  by its logical axes and the sharding rules), one Sharding for all, or a pure-dict
  tree of Shardings. Every array is verified before it is placed on a device.
  """
  cfg = model_config(directory)
  flat_sh = None
  if isinstance(shardings_or_mesh, dict):
    flat_sh = params_lib.flatten(shardings_or_mesh)
  infos = params_lib.param_infos(cfg)
  out = {}
  for name, host in iter_arrays(directory):
    sh = _target_sharding(shardings_or_mesh, name, infos[name], flat_sh, cfg.rules)
    out[name] = host if sh is None else jax.make_array_from_callback(host.shape, sh, lambda idx, h=host: h[idx])
  return params_lib.unflatten(cfg, out)
