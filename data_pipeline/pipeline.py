"""The grain pipeline: shards -> windows of micro-turns -> fixed-shape batches.

  manifest -> per-process window index (record, first turn) -> shuffle(seed) -> repeat
  -> read + decode + featurize (threads, or worker processes) -> drop bad records -> batch

Windows are the unit of shuffling: window w of record r covers micro-turns
[w * N, (w + 1) * N). Records (not windows) are split across processes, record r
going to process ``r % process_count``; every process's window list is then padded
with empty windows (turn_mask 0) to the same multiple of the batch size, so all
processes run the same number of steps per epoch and every batch is full.
"""

from __future__ import annotations

import math
from pathlib import Path

import grain
import numpy as np

from data_pipeline import featurize, record, shards
from interaction import layout
from interaction.experiment import BAD_RECORDS as POLICIES
from interaction.experiment import ExperimentConfig


class _WindowIndex:
  """Random-access list of (global record index, first turn); record -1 is an empty window."""

  def __init__(self, records: np.ndarray, starts: np.ndarray):
    self.records, self.starts = records, starts

  def __len__(self) -> int:
    return len(self.records)

  def __getitem__(self, i):
    return int(self.records[i]), int(self.starts[i])


def window_index(
  turns: list[int], window_turns: int, batch_size: int, process_index: int, process_count: int
) -> _WindowIndex:
  """This process's windows, padded with empty ones to the largest process's count rounded up to a full batch."""
  turns = np.asarray(turns, np.int64)
  per_record = -(-turns // window_turns)
  counts = [int(per_record[p::process_count].sum()) for p in range(process_count)]
  target = max(1, math.ceil(max(counts) / batch_size)) * batch_size
  mine = np.arange(process_index, len(turns), process_count)
  recs = np.repeat(mine, per_record[mine])
  starts = np.concatenate([np.arange(k) * window_turns for k in per_record[mine]] or [np.zeros(0, np.int64)])
  pad = target - len(recs)
  return _WindowIndex(
    np.concatenate([recs, np.full(pad, -1)]).astype(np.int64), np.concatenate([starts, np.zeros(pad)]).astype(np.int64)
  )


class _LoadWindow:
  """Read, decode and featurize one window. Picklable: the reader opens lazily in each worker."""

  def __init__(self, paths, counts, specs, window_turns: int, policy: str):
    self.paths, self.specs, self.window_turns, self.policy = list(paths), tuple(specs), window_turns, policy
    self.offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    self._source = None

  def __getstate__(self):
    return {k: v for k, v in self.__dict__.items() if k != "_source"} | {"_source": None}

  def locate(self, rec: int) -> tuple[str, int]:
    """(shard file, index inside it) of a global record index."""
    s = int(np.searchsorted(self.offsets, rec, side="right") - 1)
    return self.paths[s], rec - int(self.offsets[s])

  def __call__(self, item):
    rec, first = item
    if rec < 0:
      out = featurize.empty_window(self.specs, self.window_turns)
    else:
      try:
        if self._source is None:
          self._source = grain.sources.ArrayRecordDataSource(self.paths)
        conv = record.decode(self._source[rec])
      except Exception as e:  # any read or decode failure makes a bad record
        shard, idx = self.locate(rec)
        if self.policy == "skip":
          return {"_skipped": np.int64(rec)}
        raise shards.CorruptRecordError(f"bad record: shard {shard} record {idx}: {' '.join(str(e).split())}") from e
      out = featurize.window(self.specs, conv, first, self.window_turns)
    out["record"] = np.int32(rec)
    return out


class _SkipAndBatchIterator(grain.DatasetIterator):
  """Drops skipped records' windows (counting them), then stacks ``batch_size`` windows."""

  def __init__(self, parent, batch_size: int, locate):
    super().__init__(parent)
    self._batch_size, self._locate = batch_size, locate
    self.skipped_windows = 0
    self.skipped_records: list[tuple[str, int]] = []  # (shard file name, index), first skip order

  def __next__(self):
    items = []
    while len(items) < self._batch_size:
      x = next(self._parent)  # StopIteration ends the epoch; a partial batch is dropped
      if "_skipped" in x:
        self.skipped_windows += 1
        shard, idx = self._locate(int(x["_skipped"]))
        key = (Path(shard).name, idx)
        if key not in self.skipped_records:
          self.skipped_records.append(key)
        continue
      items.append(x)
    return _stack(items)

  def get_state(self):
    return {
      "parent": self._parent.get_state(),
      "skipped_windows": self.skipped_windows,
      "skipped_records": [list(k) for k in self.skipped_records],
    }

  def set_state(self, state):
    self._parent.set_state(state["parent"])
    self.skipped_windows = int(state["skipped_windows"])
    self.skipped_records = [(str(s), int(i)) for s, i in state["skipped_records"]]


def _stack(items):
  first = items[0]
  if isinstance(first, dict):
    return {k: _stack([x[k] for x in items]) for k in first}
  return np.stack(items)


class _SkipAndBatch(grain.IterDataset):
  def __init__(self, parent, batch_size: int, locate):
    super().__init__(parent)
    self._batch_size, self._locate = batch_size, locate

  def __iter__(self):
    return _SkipAndBatchIterator(self._parent.__iter__(), self._batch_size, self._locate)


def stream_specs(config: ExperimentConfig) -> tuple[layout.StreamSpec, ...]:
  """The StreamSpecs of an experiment config, checked for what the pipeline can fill."""
  featurize.check_specs(config.model.streams)
  return config.model.streams


def make_pipeline(
  config: ExperimentConfig,
  data_dir,
  *,
  split: str = "train",
  seed: int | None = None,
  process_index: int | None = None,
  process_count: int | None = None,
  batch_size: int | None = None,
  window_turns: int | None = None,
  num_epochs: int | None = None,
  shuffle: bool = True,
  workers: int | None = None,
  read_threads: int | None = None,
  bad_records: str | None = None,
  verify_checksums: bool = True,
) -> grain.DatasetIterator:
  """Iterator of batches from ``data_dir``'s ``split`` for an experiment config.

  Batch size, window length, seed, ``workers``, ``read_threads`` and
  ``bad_records`` default to ``config.data``. ``num_epochs``
  None repeats forever (each epoch reshuffled). ``bad_records`` is ``fail``
  (raise, naming shard and index) or ``skip`` (drop and count in the iterator's
  ``skipped_windows`` / ``skipped_records``, which survive get_state/set_state).
  ``workers`` > 0 featurizes in that many processes. Process index and count
  default to jax's.
  """
  data = config.data
  workers = data.workers if workers is None else workers
  read_threads = data.read_threads if read_threads is None else read_threads
  bad_records = data.bad_records if bad_records is None else bad_records
  if bad_records not in POLICIES:
    raise ValueError(f"bad_records must be one of {POLICIES}, got {bad_records!r}")
  batch_size = batch_size or data.batch_size
  window_turns = window_turns or data.window_turns
  seed = data.seed if seed is None else seed
  if process_index is None or process_count is None:
    import jax

    process_index, process_count = jax.process_index(), jax.process_count()
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in [0, {process_count})")
  specs = stream_specs(config)
  split_shards = shards.read_split(data_dir, split, verify=verify_checksums)
  turns = [t for s in split_shards for t in s.turns]
  index = window_index(turns, window_turns, batch_size, process_index, process_count)
  load = _LoadWindow(
    [str(Path(data_dir) / s.file) for s in split_shards],
    [s.records for s in split_shards],
    specs,
    window_turns,
    bad_records,
  )
  ds = grain.MapDataset.source(index)
  if shuffle:
    ds = ds.shuffle(seed=int(seed) % 2**32)
  ds = ds.repeat(num_epochs).map(load)
  it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=max(2 * batch_size, 8)))
  if workers > 0:
    from absl import flags

    # grain's worker processes read absl flags; scripts without absl.app never parse them.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=16))
  it = iter(_SkipAndBatch(it_ds, batch_size, load.locate))
  it.windows_per_epoch = len(index)
  it.batches_per_epoch = len(index) // batch_size
  return it
