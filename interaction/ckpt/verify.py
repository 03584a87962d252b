"""Integrity of a trainer checkpoint step: a CRC-32C of every 64 MiB block of every file, written before it commits.

Orbax writes a step into ``<step>.orbax-checkpoint-tmp`` and renames it when every process has
finished; ``Checkpointer`` hooks the moment in between (orbax's post-finalization callback on the
primary host) to write ``digests.json``: each file's size and CRC-32C, and a CRC of that table
itself. So a committed step always carries its digests, and a reader checks every byte it could
read (arrays, OCDBT nodes, the data iterator's state, config and manifest) before orbax parses
any of it. With several processes each checks a share of the files and all agree on the result.

CRC-32C catches every single-byte flip (any burst up to 32 bits) at several GB/s; it guards
against storage faults and truncation, not against someone rewriting the digests on purpose.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import pathlib

import google_crc32c
import numpy as np

from interaction.ckpt.paths import UnsafePathError

DIGESTS = "digests.json"
FORMAT, VERSION = "interaction.checkpoint_digests", 1
# Written by orbax's rename after the digests (its content names the directory): not part of the values.
UNDIGESTED = frozenset({"commit_success.txt"})
# Orbax adds the commit time to the step's metadata after the digests; it is digested without that field.
STEP_METADATA, COMMIT_TIME = "_CHECKPOINT_METADATA", "commit_timestamp_nsecs"
_CHUNK = 1 << 24
# Each file is digested in blocks of this size, so the blocks of one large file are checked in parallel.
BLOCK = 64 << 20


class CorruptCheckpointError(ValueError):
  """A checkpoint file whose bytes differ from the digest written when it was saved (or is missing)."""

  def __init__(self, step_dir, file: str, why: str):
    self.step_dir, self.file = pathlib.Path(step_dir), file
    step = self.step_dir.name
    super().__init__(f"checkpoint step {step} ({self.step_dir}): {file}: {why}; refusing a corrupt or altered step")


def _block_crc(path, offset: int, length: int) -> int:
  """CRC-32C of ``length`` bytes of a file from ``offset``, read in 16 MiB pieces (the C code releases the GIL)."""
  crc = 0
  with open(path, "rb", buffering=0) as f:
    f.seek(offset)
    while length > 0 and (chunk := f.read(min(_CHUNK, length))):
      crc = google_crc32c.extend(crc, chunk)
      length -= len(chunk)
  return crc


def _files(step_dir: pathlib.Path) -> list[str]:
  """Every regular file under ``step_dir`` (relative, sorted); a symlink anywhere is refused."""
  out = []
  for root, dirs, names in os.walk(step_dir):
    for name in dirs + names:
      p = pathlib.Path(root) / name
      if p.is_symlink():
        raise UnsafePathError(f"{p}: a symlink inside checkpoint step {step_dir}; a step holds only its own files")
    out += [str((pathlib.Path(root) / n).relative_to(step_dir)) for n in names]
  return sorted(f for f in out if f != DIGESTS and f not in UNDIGESTED)


def _step_metadata(path) -> bytes:
  """Orbax's step metadata with its commit time left out (canonical JSON); the raw bytes if it is no JSON object."""
  raw = pathlib.Path(path).read_bytes()
  try:
    doc = json.loads(raw)
  except ValueError:
    return raw
  if not isinstance(doc, dict):
    return raw
  doc.pop(COMMIT_TIME, None)
  return json.dumps(doc, sort_keys=True).encode()


def _digest_all(step_dir: pathlib.Path, names: list[str]) -> list[tuple[int, list[str]]]:
  """``(size, [CRC-32C of each BLOCK])`` of every file, all blocks of all files spread over a thread pool."""
  sizes, jobs = [], []
  for n in names:
    if n == STEP_METADATA:
      sizes.append(len(_step_metadata(step_dir / n)))
      jobs.append((n, 0, 0))
      continue
    sizes.append((step_dir / n).stat().st_size)
    jobs += [(n, off, min(BLOCK, sizes[-1] - off)) for off in range(0, max(sizes[-1], 1), BLOCK)]

  def crc(job):
    n, off, length = job
    return (
      google_crc32c.value(_step_metadata(step_dir / n)) if n == STEP_METADATA else _block_crc(step_dir / n, off, length)
    )

  with concurrent.futures.ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1))) as pool:
    crcs = list(pool.map(crc, jobs))
  out = {n: (size, []) for n, size in zip(names, sizes, strict=True)}
  for (n, _, _), c in zip(jobs, crcs, strict=True):
    out[n][1].append(f"{c:08x}")
  return [out[n] for n in names]


def _table_crc(files: dict) -> str:
  return f"{google_crc32c.value(json.dumps(files, sort_keys=True).encode()):08x}"


def write(step_dir) -> dict:
  """Write ``digests.json`` over every file now under ``step_dir``; returns the table."""
  step_dir = pathlib.Path(step_dir)
  names = _files(step_dir)
  files = {n: {"size": s, "crc32c": c} for n, (s, c) in zip(names, _digest_all(step_dir, names), strict=True)}
  doc = {
    "format": FORMAT,
    "version": VERSION,
    "algorithm": "crc32c",
    "block_bytes": BLOCK,
    "files": files,
    "table_crc32c": _table_crc(files),
  }
  tmp = step_dir / (DIGESTS + ".tmp")
  tmp.write_text(json.dumps(doc, indent=0, sort_keys=True))
  tmp.replace(step_dir / DIGESTS)
  return files


def has_digests(step_dir) -> bool:
  return (pathlib.Path(step_dir) / DIGESTS).exists()


def read(step_dir) -> dict:
  """The digest table of a step, itself checked; ``CorruptCheckpointError`` if missing or altered."""
  step_dir = pathlib.Path(step_dir)
  path = step_dir / DIGESTS
  if path.is_symlink():
    raise UnsafePathError(f"{path}: a symlink inside checkpoint step {step_dir}")
  if not path.is_file():
    raise CorruptCheckpointError(step_dir, DIGESTS, "missing (the step was not committed by this trainer)")
  try:
    doc = json.loads(path.read_bytes())
    files = doc["files"]
    ok = doc["format"] == FORMAT and doc["version"] == VERSION and doc["algorithm"] == "crc32c"
    ok = ok and doc["block_bytes"] == BLOCK
    ok = ok and isinstance(files, dict) and doc["table_crc32c"] == _table_crc(files)
  except (ValueError, KeyError, TypeError) as e:
    raise CorruptCheckpointError(step_dir, DIGESTS, f"unreadable ({type(e).__name__})") from None
  if not ok:
    raise CorruptCheckpointError(step_dir, DIGESTS, "its own checksum or header does not match")
  return files


def check(step_dir, *, process_index: int = 0, process_count: int = 1, agree=None) -> None:
  """Raise ``CorruptCheckpointError`` naming the first file of ``step_dir`` that differs from its digest.

  With several processes, process ``i`` reads files ``i::process_count`` and ``agree`` (a sum over
  processes of a vector) tells every process which files any of them found bad, so all refuse alike.
  """
  step_dir = pathlib.Path(step_dir)
  files = read(step_dir)
  present = _files(step_dir)
  names = sorted(set(files) | set(present))
  why = [""] * len(names)
  for i, n in enumerate(names):
    if n not in files:
      why[i] = "a file the digests do not list"
    elif n not in present:
      why[i] = "listed in the digests but missing"
  mine = [i for i in range(process_index, len(names), process_count) if not why[i]]
  for i, (size, crcs) in zip(mine, _digest_all(step_dir, [names[i] for i in mine]), strict=True):
    want = files[names[i]]
    if size != want["size"]:
      why[i] = f"{size} bytes, the digests say {want['size']}"
    elif crcs != want["crc32c"]:
      k = next((k for k, (a, b) in enumerate(zip(crcs, want["crc32c"], strict=False)) if a != b), 0)
      got, said = crcs[k] if k < len(crcs) else "-", want["crc32c"][k] if k < len(want["crc32c"]) else "-"
      why[i] = f"CRC-32C {got} of bytes from {k * BLOCK}, the digests say {said}"
  bad = np.array([bool(w) for w in why], np.int32)
  if agree is not None and process_count > 1:
    bad = np.asarray(agree(bad))
  for i in np.flatnonzero(bad):
    raise CorruptCheckpointError(step_dir, names[i], why[i] or "found corrupt by another process")
