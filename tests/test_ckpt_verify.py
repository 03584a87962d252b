"""Verified trainer checkpoints: a flipped byte anywhere is refused by name for serving and for resume,
and nothing under a step may lead outside it."""

import collections
import json
import os
import pathlib
import random
import shutil

import jax
import numpy as np
import pytest

from interaction import testing
from interaction.ckpt import CorruptCheckpointError, UnsafePathError, open_model, verify
from interaction.ckpt import trainer as checkpoint

STEP = 3
FLIPS = 200  # per kind of draw (uniform over bytes, uniform over files)


def files_of(step_dir: pathlib.Path) -> list[str]:
  return sorted(str(p.relative_to(step_dir)) for p in step_dir.rglob("*") if p.is_file())


def same(a, b) -> bool:
  """Bitwise equal trees (arrays, and the JSON items' strings and numbers)."""
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  if jax.tree.structure(a) != jax.tree.structure(b) or len(la) != len(lb):
    return False
  for x, y in zip(la, lb, strict=True):
    x, y = np.asarray(x), np.asarray(y)
    if x.shape != y.shape or x.dtype != y.dtype or x.tobytes() != y.tobytes():
      return False
  return True


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  return testing.save_checkpoint(tmp_path_factory.mktemp("verified"), step=STEP)


class Loads:
  """The two readers of a trainer step: the serving loader and the trainer's restore (resume)."""

  def __init__(self, workdir):
    self.workdir = workdir
    self.ckpt = checkpoint.Checkpointer(workdir / "checkpoints")
    self.want_params = open_model(workdir).params
    state, data, meta = self.ckpt.restore(STEP, None)
    self.target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    self.want_resume = (state, data, meta)

  def serving(self):
    return open_model(self.workdir).params, self.want_params

  def resume(self):
    return self.ckpt.restore(STEP, self.target), self.want_resume


def flip(path: pathlib.Path, offset: int, mask: int) -> None:
  with open(path, "r+b") as f:
    f.seek(offset)
    b = f.read(1)[0]
    f.seek(offset)
    f.write(bytes([b ^ mask]))


def test_every_single_byte_flip_is_refused_by_name_or_loads_the_same_values(workdir):
  loads = Loads(workdir)
  step_dir = workdir / "checkpoints" / str(STEP)
  names = files_of(step_dir)
  sizes = np.array([(step_dir / n).stat().st_size for n in names])
  rng = random.Random(0)
  outcome = collections.Counter()
  for kind in ("bytes", "files"):
    for _ in range(FLIPS):
      i = rng.choices(range(len(names)), weights=sizes if kind == "bytes" else None)[0]
      name, offset, mask = names[i], rng.randrange(sizes[i]), rng.randrange(1, 256)
      flip(step_dir / name, offset, mask)
      try:
        for reader in (loads.serving, loads.resume):
          try:
            got, want = reader()
          except CorruptCheckpointError as e:
            assert e.file == name and name in str(e) and f"step {STEP}" in str(e), str(e)
            outcome["refused"] += 1
            continue
          assert same(got, want), f"a flip in {name} at byte {offset} loaded different values silently"
          assert name in verify.UNDIGESTED or name == verify.STEP_METADATA, f"{name}: a flip went unnoticed"
          outcome["same values"] += 1
      finally:
        flip(step_dir / name, offset, mask)
  print(dict(outcome))
  assert outcome["refused"] >= 0.9 * 2 * 2 * FLIPS  # only orbax's own marker and commit time are undigested
  got, want = loads.serving()
  assert same(got, want), "the flips were undone: the step loads again"


def test_digests_missing_extra_or_truncated_files_are_refused(workdir, tmp_path):
  work = shutil.copytree(workdir, tmp_path / "w", symlinks=True)
  step_dir = work / "checkpoints" / str(STEP)
  (step_dir / "state" / "extra.bin").write_bytes(b"x")
  with pytest.raises(CorruptCheckpointError, match=r"state/extra.bin: a file the digests do not list"):
    open_model(work)
  (step_dir / "state" / "extra.bin").unlink()
  victim = next(n for n in files_of(step_dir) if n.startswith("state/ocdbt.process_0/d/"))
  data = (step_dir / victim).read_bytes()
  (step_dir / victim).write_bytes(data[:-1])
  with pytest.raises(CorruptCheckpointError, match=rf"{victim}: {len(data) - 1} bytes, the digests say {len(data)}"):
    open_model(work)
  (step_dir / victim).unlink()
  with pytest.raises(CorruptCheckpointError, match=rf"{victim}: listed in the digests but missing"):
    open_model(work)
  (step_dir / verify.DIGESTS).unlink()  # a step without digests is not committed: not listed, not served
  assert checkpoint.committed_steps(work / "checkpoints") == []
  with pytest.raises(FileNotFoundError):
    open_model(work)


def test_the_digest_table_checks_itself(workdir, tmp_path):
  work = shutil.copytree(workdir, tmp_path / "w", symlinks=True)
  path = work / "checkpoints" / str(STEP) / verify.DIGESTS
  doc = json.loads(path.read_text())
  name = next(iter(doc["files"]))
  doc["files"][name]["crc32c"] = "00000000"  # a consistent-looking edit of one entry
  path.write_text(json.dumps(doc))
  with pytest.raises(CorruptCheckpointError, match="digests.json: its own checksum"):
    open_model(work)
  path.write_text("{not json")
  with pytest.raises(CorruptCheckpointError, match="digests.json: unreadable"):
    open_model(work)


def other_run(tmp_path, workdir, step: int) -> pathlib.Path:
  """A second, different run's step directory (random parameters of another seed are not needed: its
  step number differs and so must what a loader reports)."""
  other = testing.save_checkpoint(tmp_path / "other", step=step)
  return other / "checkpoints" / str(step)


def test_a_step_directory_that_is_a_symlink_is_refused(workdir, tmp_path):
  work = shutil.copytree(workdir, tmp_path / "w", symlinks=True)
  os.symlink(other_run(tmp_path, workdir, 12), work / "checkpoints" / "16")
  with pytest.raises(UnsafePathError, match=r"checkpoints/16 is a symlink"):
    open_model(work)
  with pytest.raises(UnsafePathError, match="is a symlink"):
    checkpoint.Checkpointer(work / "checkpoints").restore_latest_intact(None)


def test_an_item_symlinked_to_another_run_is_refused(workdir, tmp_path):
  work = shutil.copytree(workdir, tmp_path / "w", symlinks=True)
  state = work / "checkpoints" / str(STEP) / "state"
  shutil.rmtree(state)
  os.symlink(other_run(tmp_path, workdir, 12) / "state", state)
  with pytest.raises(UnsafePathError, match="outside"):
    open_model(work)


def test_a_symlink_inside_a_step_is_refused_even_when_it_stays_inside(workdir, tmp_path):
  work = shutil.copytree(workdir, tmp_path / "w", symlinks=True)
  data = work / "checkpoints" / str(STEP) / "data" / "metadata"
  data.unlink()
  os.symlink(work / "checkpoints" / str(STEP) / "meta" / "metadata", data)
  with pytest.raises(UnsafePathError, match="a symlink inside checkpoint step"):
    open_model(work)


def test_a_corrupt_newest_step_is_set_aside_and_the_previous_one_restored(workdir, tmp_path):
  work = shutil.copytree(workdir, tmp_path / "w", symlinks=True)
  ckpt = checkpoint.Checkpointer(work / "checkpoints")
  state, data, meta = ckpt.restore(STEP, None)
  ckpt.save(STEP + 1, jax.tree.map(lambda x: x + 1, state), {"position": 9}, {"config": meta["config"]})
  ckpt.wait()
  assert ckpt.all_steps() == [STEP, STEP + 1]
  newest = work / "checkpoints" / str(STEP + 1)
  flip(newest / "data" / "metadata", 3, 0x20)
  logged = []
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
  step, got, got_data, _ = ckpt.restore_latest_intact(target, log=logged.append)
  assert step == STEP and same(got, state) and got_data == data
  assert "data/metadata" in logged[0] and f"moved it to {STEP + 1}.corrupt" in logged[0]
  assert (work / "checkpoints" / f"{STEP + 1}.corrupt" / "data").is_dir() and ckpt.all_steps() == [STEP]
  ckpt.save(STEP + 1, state, {}, {"config": meta["config"]})  # the step number is free again
  ckpt.wait()
  assert ckpt.all_steps() == [STEP, STEP + 1]
  ckpt.close()
