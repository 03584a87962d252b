"""The grain pipeline: shapes, alignment, resume, per-process sharding and bad input."""

import json

import numpy as np
import pytest

from data_pipeline import featurize, pipeline, record, shards, synthetic
from data_pipeline.testing import marked_conversation, tiny_config
from interaction import layout, text

N, B = 4, 2


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("synth")
  synthetic.generate(d, "train", 21, seed=0, records_per_shard=8)  # 3 shards, every task 3 times
  return d


def make(data_dir, **kw):
  kw = dict(split="train", seed=1, process_index=0, process_count=1) | kw
  return pipeline.make_pipeline(tiny_config(window_turns=N, batch_size=B), data_dir, **kw)


def take(it, k):
  return [next(it) for _ in range(k)]


def assert_batches_equal(a, b):
  flat = lambda x, p="": (  # noqa: E731
    [kv for k, v in sorted(x.items()) for kv in flat(v, p + k + "/")] if isinstance(x, dict) else [(p, x)]
  )
  for (ka, va), (kb, vb) in zip(flat(a), flat(b), strict=True):
    assert ka == kb and va.dtype == vb.dtype
    np.testing.assert_array_equal(va, vb, err_msg=ka)


def test_batches_match_the_model_layout(data_dir):
  cfg = tiny_config(window_turns=N, batch_size=B)
  specs = pipeline.stream_specs(cfg)
  for batch in take(make(data_dir), 3):
    layout.check_window(specs, batch, batch_dims=2, num_turns=N)
    assert batch["first_turn"].shape == (B,) and batch["first_turn"].dtype == np.int32
    assert batch["turn_mask"].shape == (B, N) and batch["turn_mask"].dtype == np.float32
    assert set(batch["labels"]) == set(featurize.LABELS)
    assert all(v.shape == (B, N) and v.dtype == np.int32 for v in batch["labels"].values())
    assert batch["record"].shape == (B,)
    for spec in specs:
      x = batch[spec.name]
      if spec.kind == "audio":
        assert x.min() >= spec.mel_min and x.max() <= spec.mel_max
      if spec.kind == "text":
        assert x.min() >= 0 and x.max() < spec.vocab_size


def test_model_forward_runs_on_a_batch(data_dir):
  """The model's training forward and losses (interaction.objective) accept a pipeline batch as is."""
  import jax
  from flax import nnx

  from interaction import objective
  from interaction.model import InteractionModel

  cfg = tiny_config(window_turns=N, batch_size=B)
  graphdef, params = nnx.split(InteractionModel(cfg.model, rngs=nnx.Rngs(0)))

  @jax.jit
  def losses(params, batch):
    model = nnx.merge(graphdef, params)
    return objective.losses(model, objective.window_outputs(model, batch, jax.random.key(0)), batch)

  out = losses(params, next(make(data_dir)))
  assert np.isfinite(float(out["total"])) and float(out["text_ce"]) > 0


def test_an_event_lands_in_its_micro_turn_in_every_stream(tmp_path):
  times = [0.3, 0.6, 1.79, 2.0, 3.33, 4.41]
  shards.write_split(tmp_path, "train", [marked_conversation(times)])
  cfg = tiny_config(window_turns=N, batch_size=1)
  it = pipeline.make_pipeline(
    cfg, tmp_path, split="train", shuffle=False, num_epochs=1, process_index=0, process_count=1
  )
  batches = list(it)
  turns = np.concatenate([b["first_turn"][0] + np.arange(N) for b in batches])
  assert np.array_equal(turns, np.arange(len(turns)))  # unshuffled: windows in order
  cat = lambda name: np.concatenate([b[name][0] for b in batches])  # noqa: E731
  expected = sorted({record.turn_of(t) for t in times})
  assert expected == [int(np.floor(round(t * 16000) / 3200)) for t in times]
  for name in ("audio_in", "audio_out"):
    loud = set(np.flatnonzero(cat(name).max(axis=(1, 2)) > -10.5).tolist())
    # Each 0.1 s tone is loud from its start turn on, and spills at most into the next turn.
    assert set(expected) <= loud and all(t in expected or t - 1 in expected for t in loud)
    assert all(e - 1 not in loud or {e - 1, e - 2} & set(expected) for e in expected)
  assert np.flatnonzero(cat("video_in").max(axis=(1, 2, 3, 4)) == 255).tolist() == expected
  assert np.flatnonzero(np.concatenate([b["labels"]["cue"][0] for b in batches]) == 1).tolist() == expected
  for name, first in (("text_in", ord("u")), ("text_out", ord("m"))):
    assert np.flatnonzero(cat(name)[:, 0] == first).tolist() == expected
  # Tool results ride on text_in behind the user's word, between their markers.
  assert (
    text.decode(cat("text_in")[expected[0]]) + text.decode(cat("text_in")[expected[0] + 1]) == "u0<result>r0</result>"
  )


def test_resume_is_bit_exact(data_dir, tmp_path):
  import grain
  from etils import epath

  k, m = 3, 4
  ref = take(make(data_dir), k + m)
  it = make(data_dir)
  take(it, k)
  # Through grain's orbax checkpoint handler, as training will save it.
  grain.checkpoint.CheckpointHandler().save(epath.Path(tmp_path), item=it)
  fresh = make(data_dir)
  grain.checkpoint.CheckpointHandler().restore(epath.Path(tmp_path), item=fresh)
  for a, b in zip(take(fresh, m), ref[k:], strict=True):
    assert_batches_equal(a, b)


def test_seed_changes_the_order_deterministically(data_dir):
  a, b, c = (next(make(data_dir, seed=s))["record"] for s in (5, 5, 6))
  assert np.array_equal(a, b)
  first = [next(make(data_dir, seed=s))["record"].tolist() for s in range(6, 12)]
  assert len({tuple(r) for r in first}) > 1


def test_processes_get_disjoint_records_covering_the_epoch(data_dir):
  seen, counts = [], []
  for p in range(2):
    batches = list(make(data_dir, process_index=p, process_count=2, num_epochs=1))
    counts.append(len(batches))
    recs = np.concatenate([b["record"] for b in batches])
    seen.append(set(recs[recs >= 0].tolist()))
    # Every window of every record of this process is there exactly once.
    windows = [(int(r), int(f)) for b in batches for r, f in zip(b["record"], b["first_turn"], strict=True) if r >= 0]
    assert len(windows) == len(set(windows))
  assert counts[0] == counts[1]  # same number of steps on every process
  assert not seen[0] & seen[1]
  assert seen[0] | seen[1] == set(range(21))


def planted_dir(tmp_path, bad=(5,)):
  convs = [synthetic.conversation(7, i) for i in range(10)]
  data = [record.encode(c) for c in convs]
  for i in bad:
    data[i] = data[i][: len(data[i]) // 2]  # truncated record
  shards.write_split(tmp_path, "train", data, records_per_shard=4)
  return tmp_path


def test_bad_record_fails_naming_shard_and_index(tmp_path):
  d = planted_dir(tmp_path)
  it = make(d, num_epochs=1, shuffle=False)
  with pytest.raises(shards.CorruptRecordError, match=r"train-00001-of-00003\.array_record record 1"):
    list(it)


def test_skip_policy_counts_and_survives_resume(tmp_path):
  d = planted_dir(tmp_path, bad=(2, 5))
  full = make(d, bad_records="skip", num_epochs=1)
  batches = list(full)
  assert sorted(full.skipped_records) == [
    ("train-00000-of-00003.array_record", 2),
    ("train-00001-of-00003.array_record", 1),
  ]
  assert full.skipped_windows >= 2
  recs = np.concatenate([b["record"] for b in batches])
  assert 2 not in recs and 5 not in recs
  it = make(d, bad_records="skip", num_epochs=1)
  take(it, 2)
  state = json.loads(json.dumps(it.get_state()))
  fresh = make(d, bad_records="skip", num_epochs=1)
  fresh.set_state(state)
  rest = list(fresh)
  assert len(rest) == len(batches) - 2
  for a, b in zip(rest, batches[2:], strict=True):
    assert_batches_equal(a, b)
  assert fresh.skipped_records == full.skipped_records and fresh.skipped_windows == full.skipped_windows


def test_shard_with_wrong_checksum_is_refused(tmp_path):
  d = planted_dir(tmp_path, bad=())
  path = d / "train-00001-of-00003.array_record"
  data = bytearray(path.read_bytes())
  data[len(data) // 2] ^= 1
  path.write_bytes(bytes(data))
  with pytest.raises(shards.ManifestError, match="train-00001-of-00003.array_record: SHA-256"):
    make(d)


def test_worker_processes_give_the_same_batches(data_dir):
  ref = take(make(data_dir), 3)
  it = make(data_dir, workers=2)
  try:
    for a, b in zip(take(it, 3), ref, strict=True):
      assert_batches_equal(a, b)
  finally:
    it.close()
