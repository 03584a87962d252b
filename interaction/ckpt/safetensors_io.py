"""A strict, pickle-free safetensors reader and a streaming writer.

Format: an 8-byte little-endian header length N, N bytes of JSON
``{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}``,
then the data, offsets relative to its start. The reader memory-maps the file
and checks every entry (dtype, size, bounds, no overlap) before any tensor is
used; the writer lays out the header first, then takes tensors one at a time in
any order, so a converter holds one tensor in memory, not the model.
"""

from __future__ import annotations

import json
import math
import pathlib

import ml_dtypes
import numpy as np

DTYPES = {
  "F64": np.dtype(np.float64),
  "F32": np.dtype(np.float32),
  "F16": np.dtype(np.float16),
  "BF16": np.dtype(ml_dtypes.bfloat16),
  "I64": np.dtype(np.int64),
  "I32": np.dtype(np.int32),
  "I16": np.dtype(np.int16),
  "I8": np.dtype(np.int8),
  "U8": np.dtype(np.uint8),
  "BOOL": np.dtype(np.bool_),
}
CODES = {v: k for k, v in DTYPES.items()}
MAX_HEADER = 100 << 20


class SafetensorsError(ValueError):
  """A safetensors file whose header is malformed or inconsistent with its size."""


class SafetensorsFile:
  """Read-only view of one .safetensors file; ``get(name)`` is a memory-mapped array."""

  def __init__(self, path):
    self.path = pathlib.Path(path)
    size = self.path.stat().st_size
    with open(self.path, "rb") as f:
      head = f.read(8)
      if len(head) != 8:
        raise SafetensorsError(f"{self.path}: shorter than a safetensors header")
      n = int.from_bytes(head, "little")
      if n > MAX_HEADER or 8 + n > size:
        raise SafetensorsError(f"{self.path}: header length {n} is impossible for a {size}-byte file")
      try:
        header = json.loads(f.read(n).decode("utf-8"))
      except (ValueError, UnicodeDecodeError) as e:
        raise SafetensorsError(f"{self.path}: header is not JSON ({e})") from e
    if not isinstance(header, dict):
      raise SafetensorsError(f"{self.path}: header is not an object")
    self.metadata = header.pop("__metadata__", None) or {}
    self.data_size = size - 8 - n
    self.entries = {}
    spans = []
    for name, e in header.items():
      try:
        dtype, shape, (begin, end) = DTYPES[e["dtype"]], tuple(int(d) for d in e["shape"]), e["data_offsets"]
        begin, end = int(begin), int(end)
      except (KeyError, TypeError, ValueError) as err:
        raise SafetensorsError(f"{self.path}: tensor {name!r} has a malformed entry {e!r}") from err
      if any(d < 0 for d in shape) or not 0 <= begin <= end <= self.data_size:
        raise SafetensorsError(f"{self.path}: tensor {name!r} lies outside the file's data")
      if end - begin != math.prod(shape) * dtype.itemsize:
        raise SafetensorsError(f"{self.path}: tensor {name!r} has {end - begin} bytes for shape {shape} {dtype}")
      self.entries[name] = (dtype, shape, begin)
      spans.append((begin, end, name))
    spans.sort()
    for (_, e0, a), (b1, _, b) in zip(spans, spans[1:], strict=False):
      if b1 < e0:
        raise SafetensorsError(f"{self.path}: tensors {a!r} and {b!r} overlap")
    self._data = np.memmap(self.path, np.uint8, "r", offset=8 + n) if self.data_size else np.zeros(0, np.uint8)

  def names(self) -> list[str]:
    return list(self.entries)

  def shape(self, name: str) -> tuple[int, ...]:
    return self.entries[name][1]

  def get(self, name: str) -> np.ndarray:
    dtype, shape, begin = self.entries[name]
    nbytes = math.prod(shape) * dtype.itemsize
    return self._data[begin : begin + nbytes].view(dtype).reshape(shape)


class SafetensorsWriter:
  """Write tensors declared up front, one at a time in any order: ``write(name, array)``, then ``close()``."""

  def __init__(self, path, entries, metadata: dict | None = None):
    """``entries``: ``[(name, numpy dtype, shape), ...]`` in file order."""
    self.path = pathlib.Path(path)
    header, offset, self.plan = {}, 0, {}
    if metadata:
      header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    for name, dtype, shape in entries:
      dtype = np.dtype(dtype)
      nbytes = math.prod(shape) * dtype.itemsize
      header[name] = {"dtype": CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
      self.plan[name] = (dtype, tuple(shape), offset)
      offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # 8-byte aligned data, as the reference writer does
    self.data_start = 8 + len(raw)
    self.file = open(self.path, "wb")  # noqa: SIM115  (closed in close())
    self.file.write(len(raw).to_bytes(8, "little") + raw)
    self.file.truncate(self.data_start + offset)
    self.written: set[str] = set()

  def write(self, name: str, array) -> None:
    dtype, shape, offset = self.plan[name]
    array = np.ascontiguousarray(array)
    if array.dtype != dtype or array.shape != shape:
      raise ValueError(f"{name}: got {array.shape} {array.dtype}, declared {shape} {dtype}")
    self.file.seek(self.data_start + offset)
    self.file.write(array.reshape(-1).view(np.uint8))
    self.written.add(name)

  def close(self) -> None:
    self.file.close()
    missing = sorted(set(self.plan) - self.written)
    if missing:
      raise ValueError(f"{self.path}: tensors declared but never written: {missing[:5]}")
