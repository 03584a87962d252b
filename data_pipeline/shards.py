"""ArrayRecord shards of encoded conversations and the JSON manifest that describes them.

A dataset directory holds ``manifest.json`` and the shard files of each split::

  {"format": "interaction.dataset", "version": 1,
   "splits": {"train": {"shards": [{"file": "train-00000-of-00002.array_record",
                                    "records": 512, "sha256": "...",
                                    "turns": [41, 37, ...]}, ...]}}}

``turns`` is each record's number of micro-turns, so the pipeline can enumerate
windows without reading any record.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path

from data_pipeline import record

MANIFEST = "manifest.json"
FORMAT = "interaction.dataset"
VERSION = 1
# One record per chunk: random access reads exactly one record (grain expects this).
WRITER_OPTIONS = "group_size:1"


class ManifestError(ValueError):
  """A manifest or shard that does not match what the manifest promises."""


@dataclasses.dataclass(frozen=True)
class Shard:
  file: str
  records: int
  sha256: str
  turns: tuple[int, ...]


def sha256(path) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    while chunk := f.read(1 << 22):
      h.update(chunk)
  return h.hexdigest()


def write_split(
  out_dir, split: str, records: Iterable[bytes | record.Conversation], records_per_shard: int = 1024
) -> list[Shard]:
  """Write encoded records into ``<split>-NNNNN-of-MMMMM.array_record`` shards and update the manifest.

  Conversations are encoded here; bytes are written as given (tests use this to
  plant broken records). Returns the split's shards.
  """
  from array_record.python.array_record_module import ArrayRecordWriter

  out_dir = Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  tmp_files, turns = [], []
  writer = None
  for item in records:
    if writer is None or len(turns[-1]) == records_per_shard:
      if writer is not None:
        writer.close()
      tmp_files.append(out_dir / f".{split}-{len(tmp_files):05d}.tmp")
      writer = ArrayRecordWriter(str(tmp_files[-1]), WRITER_OPTIONS)
      turns.append([])
    data = record.encode(item) if isinstance(item, record.Conversation) else item
    writer.write(data)
    turns[-1].append(item.num_turns if isinstance(item, record.Conversation) else _turns_of(data))
  if writer is not None:
    writer.close()
  shards = []
  for i, (tmp, t) in enumerate(zip(tmp_files, turns, strict=True)):
    name = f"{split}-{i:05d}-of-{len(tmp_files):05d}.array_record"
    os.replace(tmp, out_dir / name)
    shards.append(Shard(file=name, records=len(t), sha256=sha256(out_dir / name), turns=tuple(t)))
  _update_manifest(out_dir, split, shards)
  return shards


def _turns_of(data: bytes) -> int:
  # Raw bytes that do not decode (planted corruption) count as one micro-turn.
  try:
    return record.decode(data).num_turns
  except record.RecordError:
    return 1


def _update_manifest(out_dir: Path, split: str, shards: list[Shard]) -> None:
  path = out_dir / MANIFEST
  manifest = json.loads(path.read_text()) if path.exists() else {"format": FORMAT, "version": VERSION, "splits": {}}
  old = manifest["splits"].get(split, {}).get("shards", [])
  for s in old:  # shards of a previous write of this split that this write did not overwrite
    if s["file"] not in {n.file for n in shards} and (out_dir / s["file"]).exists():
      (out_dir / s["file"]).unlink()
  manifest["splits"][split] = {"shards": [dataclasses.asdict(s) | {"turns": list(s.turns)} for s in shards]}
  tmp = path.with_suffix(".tmp")
  tmp.write_text(json.dumps(manifest, indent=1))
  os.replace(tmp, path)


def read_split(data_dir, split: str, verify: bool = True) -> list[Shard]:
  """Shards of one split. With ``verify``, refuse any shard whose SHA-256 differs from the manifest."""
  data_dir = Path(data_dir)
  path = data_dir / MANIFEST
  if not path.exists():
    raise ManifestError(f"{path}: no manifest; write one with python -m launch.data convert (or synthetic)")
  manifest = json.loads(path.read_text())
  if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
    raise ManifestError(
      f"{path}: unsupported manifest {manifest.get('format')!r} v{manifest.get('version')}; expected {FORMAT!r} v{VERSION}"
    )
  if split not in manifest["splits"]:
    raise ManifestError(f"{path}: no split {split!r}; splits are {sorted(manifest['splits'])}")
  shards = [Shard(s["file"], s["records"], s["sha256"], tuple(s["turns"])) for s in manifest["splits"][split]["shards"]]
  for s in shards:
    f = data_dir / s.file
    if not f.exists():
      raise ManifestError(f"{f}: shard listed in {path} is missing")
    if len(s.turns) != s.records:
      raise ManifestError(f"{path}: shard {s.file} lists {len(s.turns)} turn counts for {s.records} records")
    if verify and (digest := sha256(f)) != s.sha256:
      raise ManifestError(
        f"{f}: SHA-256 {digest} does not match the manifest's {s.sha256}; refusing a modified or corrupt shard"
      )
  return shards
