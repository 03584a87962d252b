"""ArrayRecord shards of encoded conversations and the JSON manifest that describes them.

A dataset directory holds ``manifest.json`` and the shard files of each split::

  {"format": "interaction.dataset", "version": 1,
   "splits": {"train": {"shards": [{"file": "train-00000-of-00002.array_record",
                                    "records": 512, "sha256": "...",
                                    "turns": [41, 37, ...]}, ...]}}}

``turns`` is each record's number of micro-turns, so the pipeline can enumerate
windows without reading any record. Shard files lie inside the dataset directory
(no absolute paths, ``..`` or symlinks out). Every fault a reader finds is a
``DatasetError`` (a ValueError) whose message is one line naming the file (and
record); ``check_dataset`` finds them before a training job builds its model.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path, PurePosixPath

from data_pipeline import record

MANIFEST = "manifest.json"
FORMAT = "interaction.dataset"
VERSION = 1
# One record per chunk: random access reads exactly one record (grain expects this).
WRITER_OPTIONS = "group_size:1"


class DatasetError(ValueError):
  """Anything wrong with a dataset directory; ``str(e)`` is one line naming the file (and record)."""


class ManifestError(DatasetError):
  """A manifest, or a shard that does not match what the manifest promises."""


class UnsafeShardPathError(ManifestError):
  """A shard ``file`` that is absolute, holds ``..`` or resolves (through symlinks) outside the dataset directory."""


class CorruptRecordError(DatasetError, record.RecordError):
  """A record of a shard (whose SHA-256 may well match) that does not decode."""


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
  plant broken records). Returns the split's shards. An existing manifest that
  does not parse, or lists a path outside ``out_dir``, is refused before anything is written.
  """
  from array_record.python.array_record_module import ArrayRecordWriter

  out_dir = Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  manifest = _existing_manifest(out_dir)
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
  _update_manifest(out_dir, manifest, split, shards)
  return shards


def _turns_of(data: bytes) -> int:
  # Raw bytes that do not decode (planted corruption) count as one micro-turn.
  try:
    return record.decode(data).num_turns
  except record.RecordError:
    return 1


def _existing_manifest(out_dir: Path) -> dict:
  path = out_dir / MANIFEST
  if not (path.exists() or path.is_symlink()):
    return {"format": FORMAT, "version": VERSION, "splits": {}}
  try:
    manifest = load_manifest(out_dir)
    for split in manifest["splits"]:  # every listed path is checked: a rewrite deletes the stale ones
      _split_entries(out_dir, path, manifest, split)
  except ManifestError as e:
    raise type(e)(f"{e} (refusing to add to it; remove {path} to start a fresh dataset)") from None
  return manifest


def _update_manifest(out_dir: Path, manifest: dict, split: str, shards: list[Shard]) -> None:
  path = out_dir / MANIFEST
  old = manifest["splits"].get(split, {}).get("shards", [])
  for s in old:  # shards of a previous write of this split that this write did not overwrite
    if s["file"] not in {n.file for n in shards} and (out_dir / s["file"]).exists():
      (out_dir / s["file"]).unlink()
  manifest["splits"][split] = {"shards": [dataclasses.asdict(s) | {"turns": list(s.turns)} for s in shards]}
  tmp = path.with_suffix(".tmp")
  tmp.write_text(json.dumps(manifest, indent=1))
  os.replace(tmp, path)


def _confined(data_dir: Path, rel, where: str) -> Path:
  """``data_dir / rel``, refused unless it is a plain relative path that stays inside ``data_dir``."""
  if not isinstance(rel, str) or not rel or "\x00" in rel or "\\" in rel:
    raise UnsafeShardPathError(f"{where}: file {rel!r} is not a plain relative path")
  p = PurePosixPath(rel)
  if p.is_absolute() or rel.startswith("~") or ".." in p.parts:
    raise UnsafeShardPathError(
      f"{where}: file {rel!r} is absolute or holds '..'; shards must lie in the dataset directory"
    )
  full = data_dir / p
  real_root, real = data_dir.resolve(), full.resolve()
  if real == real_root or not real.is_relative_to(real_root):
    raise UnsafeShardPathError(f"{where}: file {rel!r} resolves to {real}, outside {real_root} (a symlink out?)")
  return full


def load_manifest(data_dir) -> dict:
  """The parsed ``manifest.json`` of a dataset directory, format, version and ``splits`` checked."""
  data_dir = Path(data_dir)
  path = data_dir / MANIFEST
  if not (path.exists() or path.is_symlink()):
    raise ManifestError(f"{path}: no manifest; write one with python -m launch.data convert (or synthetic)")
  _confined(data_dir, MANIFEST, str(data_dir))
  try:
    manifest = json.loads(path.read_bytes())
  except json.JSONDecodeError as e:
    raise ManifestError(f"{path}: not valid JSON: {e.msg}: line {e.lineno} column {e.colno} (char {e.pos})") from None
  except (OSError, ValueError, RecursionError) as e:  # undecodable UTF-8, a directory, absurd nesting
    raise ManifestError(f"{path}: unreadable manifest ({type(e).__name__}: {' '.join(str(e).split())})") from None
  if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
    got = (
      (manifest.get("format"), manifest.get("version")) if isinstance(manifest, dict) else (type(manifest).__name__,)
    )
    raise ManifestError(f"{path}: unsupported manifest {got}; expected format {FORMAT!r} version {VERSION}")
  if not isinstance(manifest.get("splits"), dict):
    raise ManifestError(f"{path}: 'splits' must be an object of split name -> {{'shards': [...]}}")
  return manifest


def _split_entries(data_dir: Path, path: Path, manifest: dict, split: str) -> list[Shard]:
  """One split's shard entries, every field's type and every path's confinement checked."""
  if split not in manifest["splits"]:
    raise ManifestError(f"{path}: no split {split!r}; splits are {sorted(manifest['splits'])}")
  entries = manifest["splits"][split]
  if not isinstance(entries, dict) or not isinstance(entries.get("shards"), list):
    raise ManifestError(f"{path}: split {split!r} must be an object with a 'shards' list")
  out = []
  for i, s in enumerate(entries["shards"]):
    where = f"{path}: split {split!r} shard {i}"
    if not isinstance(s, dict) or set(s) != {"file", "records", "sha256", "turns"}:
      raise ManifestError(f"{where}: expected an object with exactly file, records, sha256 and turns")
    _confined(data_dir, s["file"], where)
    if not _count(s["records"]) or not isinstance(s["turns"], list) or not all(_count(t) and t > 0 for t in s["turns"]):
      raise ManifestError(f"{where} ({s['file']}): records must be a count and turns a list of positive counts")
    if len(s["turns"]) != s["records"]:
      raise ManifestError(f"{where}: shard {s['file']} lists {len(s['turns'])} turn counts for {s['records']} records")
    if not isinstance(s["sha256"], str) or len(s["sha256"]) != 64 or set(s["sha256"]) - set("0123456789abcdef"):
      raise ManifestError(f"{where} ({s['file']}): sha256 must be 64 lowercase hex digits")
    out.append(Shard(s["file"], s["records"], s["sha256"], tuple(s["turns"])))
  return out


def _count(x) -> bool:
  return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def read_split(data_dir, split: str, verify: bool = True) -> list[Shard]:
  """Shards of one split. With ``verify``, refuse any shard whose SHA-256 differs from the manifest.

  Every error is a ``ManifestError`` (a ``DatasetError``) naming the file.
  """
  data_dir = Path(data_dir)
  path = data_dir / MANIFEST
  shards = _split_entries(data_dir, path, load_manifest(data_dir), split)
  for s in shards:
    f = data_dir / s.file
    if not f.is_file():
      raise ManifestError(f"{f}: shard listed in {path} is missing")
    if verify and (digest := sha256(f)) != s.sha256:
      raise ManifestError(
        f"{f}: SHA-256 {digest} does not match the manifest's {s.sha256}; refusing a modified or corrupt shard"
      )
  return shards


def read_record(path, index: int) -> record.Conversation:
  """Record ``index`` of one shard file, decoded; any failure is a ``CorruptRecordError`` naming file and index."""
  from array_record.python.array_record_module import ArrayRecordReader

  try:
    reader = ArrayRecordReader(str(path), "readahead_buffer_size:0")
  except Exception as e:  # the library raises plain RuntimeError/ValueError on a broken file
    raise CorruptRecordError(f"{path}: not a readable ArrayRecord file ({_brief(e)})") from None
  try:
    (data,) = reader.read([index])
  except Exception as e:
    raise CorruptRecordError(f"{path}: record {index} cannot be read ({_brief(e)})") from None
  finally:
    reader.close()
  try:
    return record.decode(data)
  except record.RecordError as e:
    raise CorruptRecordError(f"{path}: record {index} does not decode ({_brief(e)})") from None


def iter_records(data_dir, split: str) -> Iterator[record.Conversation]:
  """Every conversation of a split, decoded, in order; checksums verified first, a bad record named by file and index."""
  from array_record.python.array_record_module import ArrayRecordReader

  data_dir = Path(data_dir)
  for shard in read_split(data_dir, split):
    f = data_dir / shard.file
    try:
      reader = ArrayRecordReader(str(f))
    except Exception as e:
      raise CorruptRecordError(f"{f}: not a readable ArrayRecord file ({_brief(e)})") from None
    try:
      for i in range(shard.records):
        try:
          data = reader.read([i])[0]
          conv = record.decode(data)
        except Exception as e:
          raise CorruptRecordError(f"{f}: record {i} does not decode ({_brief(e)})") from None
        yield conv
    finally:
      reader.close()


def _brief(e: BaseException) -> str:
  return " ".join(str(e).split())[:300] or type(e).__name__


def check_dataset(data_dir, splits=("train", "eval"), *, decode: bool = True) -> None:
  """Refuse a broken dataset directory before any model exists: manifest, paths, checksums, a sample decode.

  Parses and checks the manifest, confines every shard path to ``data_dir``,
  checks every shard's SHA-256 and record count, and (with ``decode``) decodes
  each shard's first record. Raises ``DatasetError`` (a ValueError) whose str is
  one line naming the file (and record). Pass ``decode=False`` where bad records
  are skipped rather than fatal.
  """
  from array_record.python.array_record_module import ArrayRecordReader

  data_dir = Path(data_dir)
  for split in splits:
    for s in read_split(data_dir, split, verify=True):
      f = data_dir / s.file
      try:
        reader = ArrayRecordReader(str(f), "readahead_buffer_size:0")
        n = reader.num_records()
        reader.close()
      except Exception as e:
        raise CorruptRecordError(f"{f}: not a readable ArrayRecord file ({_brief(e)})") from None
      if n != s.records:
        raise ManifestError(f"{f}: holds {n} records, {data_dir / MANIFEST} says {s.records}")
      if decode and s.records:
        conv = read_record(f, 0)
        if conv.num_turns != s.turns[0]:
          raise ManifestError(
            f"{f}: record 0 has {conv.num_turns} micro-turns, {data_dir / MANIFEST} says {s.turns[0]}"
          )
