"""Every data fault is refused early as one ``DatasetError`` line naming the file (and record).

Each case breaks a copy of a small valid dataset one way; ``check_dataset`` (what
the trainer runs before building a model), ``read_split`` and the training job
itself must refuse it naming the file, fast.
"""

import json
import os
import pathlib
import shutil
import subprocess
import sys
import time

import pytest

from data_pipeline import record, shards, synthetic

ROOT = pathlib.Path(__file__).parent.parent
TRAIN0, TRAIN1 = "train-00000-of-00002.array_record", "train-00001-of-00002.array_record"


@pytest.fixture(scope="module")
def good(tmp_path_factory):
  d = tmp_path_factory.mktemp("good") / "data"
  synthetic.generate(d, "train", 6, seed=0, records_per_shard=4)  # 2 shards
  synthetic.generate(d, "eval", 2, seed=1, records_per_shard=4)
  return d


def edit_manifest(d, fn):
  m = json.loads((d / shards.MANIFEST).read_text())
  fn(m)
  (d / shards.MANIFEST).write_text(json.dumps(m))


def shard_entry(m, i=1):
  return m["splits"]["train"]["shards"][i]


def invalid_json(d):
  text = (d / shards.MANIFEST).read_text()
  (d / shards.MANIFEST).write_text(text[: text.index('"sha256": "') + 20])  # cut inside a string
  return shards.MANIFEST, "not valid JSON: Unterminated string starting at: line 10 column"


def wrong_format(d):
  edit_manifest(d, lambda m: m.update(format="tfrecord.dataset"))
  return shards.MANIFEST, "unsupported manifest"


def wrong_version(d):
  edit_manifest(d, lambda m: m.update(version=2))
  return shards.MANIFEST, "expected format 'interaction.dataset' version 1"


def not_an_object(d):
  (d / shards.MANIFEST).write_text("[1, 2]")
  return shards.MANIFEST, "unsupported manifest"


def missing_split(d):
  edit_manifest(d, lambda m: m["splits"].pop("eval"))
  return shards.MANIFEST, "no split 'eval'"


def wrong_types(d):
  edit_manifest(d, lambda m: shard_entry(m).update(records="2"))
  return shards.MANIFEST, "shard 1 (train-00001-of-00002.array_record): records must be a count"


def shard_missing(d):
  (d / TRAIN1).unlink()
  return TRAIN1, "is missing"


def absolute_path(d):
  outside = d.parent / "elsewhere.array_record"
  shutil.copy(d / TRAIN1, outside)
  edit_manifest(d, lambda m: shard_entry(m).update(file=str(outside)))
  return shards.MANIFEST, "split 'train' shard 1: file '/"


def dotdot_path(d):
  shutil.copy(d / TRAIN1, d.parent / "elsewhere.array_record")
  edit_manifest(d, lambda m: shard_entry(m).update(file="../elsewhere.array_record"))
  return shards.MANIFEST, "file '../elsewhere.array_record' is absolute or holds '..'"


def symlink_out(d):
  outside = d.parent / "elsewhere.array_record"
  shutil.move(d / TRAIN1, outside)
  os.symlink(outside, d / TRAIN1)  # same name, same bytes, same SHA: only the location is wrong
  return shards.MANIFEST, f"file '{TRAIN1}' resolves to {outside}, outside"


def sha_mismatch(d):
  data = bytearray((d / TRAIN1).read_bytes())
  data[len(data) // 3] ^= 0x10
  (d / TRAIN1).write_bytes(bytes(data))
  return TRAIN1, "SHA-256"


def corrupt_file_valid_sha(d):
  (d / TRAIN1).write_bytes((d / TRAIN1).read_bytes()[:70_000])
  edit_manifest(d, lambda m: shard_entry(m).update(sha256=shards.sha256(d / TRAIN1)))
  return TRAIN1, "not a readable ArrayRecord file"


def corrupt_record_valid_sha(d):
  # A shard written whole whose first record is half a record: its SHA is the manifest's.
  data = record.encode(synthetic.conversation(0, 4))
  shards.write_split(d, "train", [record.encode(synthetic.conversation(0, 0)), data[: len(data) // 2]], 1)
  return "train-00001-of-00002.array_record", "record 0 does not decode"


def record_count(d):
  def more(m):
    shard_entry(m).update(records=shard_entry(m)["records"] + 1, turns=shard_entry(m)["turns"] + [3])

  edit_manifest(d, more)
  return TRAIN1, "holds 2 records"


CASES = [
  invalid_json,
  wrong_format,
  wrong_version,
  not_an_object,
  missing_split,
  wrong_types,
  shard_missing,
  absolute_path,
  dotdot_path,
  symlink_out,
  sha_mismatch,
  corrupt_file_valid_sha,
  corrupt_record_valid_sha,
  record_count,
]


def broken(good, tmp_path, case):
  d = tmp_path / "data"
  shutil.copytree(good, d)
  name, words = case(d)
  return d, name, words


def test_the_valid_dataset_passes(good):
  shards.check_dataset(good)
  assert len(list(shards.iter_records(good, "train"))) == 6


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.__name__)
def test_each_data_error_is_one_typed_line_naming_the_file(good, tmp_path, case):
  d, name, words = broken(good, tmp_path, case)
  t0 = time.perf_counter()
  with pytest.raises(shards.DatasetError) as e:
    shards.check_dataset(d)
  assert time.perf_counter() - t0 < 2
  assert isinstance(e.value, ValueError)  # launch.train maps ValueError to one line, exit 2
  msg = str(e.value)
  assert "\n" not in msg and str(d / name) in msg and words in msg, msg


@pytest.mark.parametrize("case", [dotdot_path, symlink_out, absolute_path, invalid_json], ids=lambda c: c.__name__)
def test_every_reader_refuses_a_bad_manifest(good, tmp_path, case):
  d, name, words = broken(good, tmp_path, case)
  with pytest.raises(shards.ManifestError, match=words):
    shards.read_split(d, "train", verify=False)
  with pytest.raises(shards.ManifestError, match=words):
    list(shards.iter_records(d, "train"))


def test_rewriting_a_split_never_deletes_outside_the_dataset(good, tmp_path):
  d, _, _ = broken(good, tmp_path, dotdot_path)
  victim = d.parent / "elsewhere.array_record"
  before = sorted(p.name for p in d.iterdir())
  with pytest.raises(shards.UnsafeShardPathError, match="refusing to add to it"):
    synthetic.generate(d, "train", 2, seed=5)
  assert victim.exists() and sorted(p.name for p in d.iterdir()) == before


@pytest.mark.parametrize("case", [invalid_json, dotdot_path], ids=lambda c: c.__name__)
def test_launch_data_refuses_to_add_to_a_broken_dataset(good, tmp_path, case):
  from launch import data

  d, name, words = broken(good, tmp_path, case)
  before = (d / shards.MANIFEST).read_bytes()
  with pytest.raises(SystemExit, match=f"^error: {d / name}: .*{words}.*remove {d / shards.MANIFEST}") as e:
    data.main(["synthetic", f"--output={d}", "--train=2", "--eval=0"])
  assert e.value.code == 2 and (d / shards.MANIFEST).read_bytes() == before


def test_a_bad_record_is_named_by_file_and_index(good, tmp_path):
  d = tmp_path / "data"
  shutil.copytree(good, d)
  data = [record.encode(synthetic.conversation(0, i)) for i in range(3)]
  data[2] = data[2][:100]
  shards.write_split(d, "train", data, 4)
  shards.check_dataset(d)  # record 0 decodes: the sample check passes, reading every record does not
  with pytest.raises(shards.CorruptRecordError, match=r"train-00000-of-00001\.array_record: record 2 does not decode"):
    list(shards.iter_records(d, "train"))


def test_skipping_bad_records_skips_the_sample_decode(good, tmp_path):
  d, _, words = broken(good, tmp_path, corrupt_record_valid_sha)
  shards.check_dataset(d, decode=False)
  with pytest.raises(record.RecordError, match=words):  # still a RecordError for callers that catch those
    shards.check_dataset(d)


@pytest.mark.parametrize(
  "case", [invalid_json, symlink_out, sha_mismatch, corrupt_record_valid_sha], ids=lambda c: c.__name__
)
def test_training_on_a_broken_dataset_exits_2_within_10_s(good, tmp_path, case):
  d, name, words = broken(good, tmp_path, case)
  cmd = [sys.executable, "-m", "launch.train", "--config=experiments/tiny.py", f"--workdir={tmp_path / 'w'}"]
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  t0 = time.perf_counter()
  out = subprocess.run([*cmd, f"--config.data.dir={d}"], cwd=ROOT, capture_output=True, text=True, env=env, timeout=60)
  elapsed = time.perf_counter() - t0
  assert out.returncode == 2, out.stderr[-2000:]
  lines = out.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in out.stderr, out.stderr
  assert str(d / name) in lines[0] and words in lines[0], lines[0]
  assert elapsed < 10, f"{elapsed:.1f} s to the error"
  assert not (tmp_path / "w" / "checkpoints").exists()
