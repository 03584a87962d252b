"""The batch schema: the one list of what a training batch holds, with each key's dtype and shape.

Dimension legend: B windows, N micro-turns, n slots of one stream.

Every producer and reader of batches derives its keys from ``fields``: the pipeline checks each
window it cuts (``data_pipeline.featurize.window``), the train step keeps the keys the model reads
(``train_step.model_batch``), AOT compiles on ``shapes``, and the tests' random batches are built
from it. Pure numpy (no jax). A pipeline batch carries more (evaluation ``labels``, ``record``):
those are the pipeline's own, never read by the model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from interaction import layout

TURNS = "N"  # placeholder in a field's shape for the window's micro-turns


@dataclasses.dataclass(frozen=True)
class Field:
  """One key of a batch: its dtype and its shape per window (``TURNS`` for the micro-turn axis)."""

  name: str
  dtype: np.dtype
  shape: tuple
  required: bool = True  # False: a training-only target the objective uses when the batch has it
  doc: str = ""

  def window_shape(self, turns: int) -> tuple[int, ...]:
    return tuple(turns if d == TURNS else d for d in self.shape)


def fields(specs: Sequence[layout.StreamSpec]) -> tuple[Field, ...]:
  """The batch's keys for a stream layout, in order: every stream, then the window's bookkeeping and targets."""
  out = [
    Field(s.name, s.dtype, (TURNS, s.slots, *s.value_shape), doc=f"{s.direction}put {s.kind} stream") for s in specs
  ]
  out.append(Field("first_turn", np.dtype(np.int32), (), doc="absolute micro-turn of the window's start"))
  out.append(Field("turn_mask", np.dtype(np.float32), (TURNS,), doc="1 for a real micro-turn, 0 for padding"))
  heard = layout.find_stream(specs, "audio", "in", optional=True)
  if heard is not None:
    doc = "listening target: transcript bytes on the input audio frames (-1: no word timings)"
    out.append(Field("heard", np.dtype(np.int32), (TURNS, heard.slots), required=False, doc=doc))
  return tuple(out)


def check(specs: Sequence[layout.StreamSpec], batch, *, batch_dims: int, turns: int | None = None) -> None:
  """Raise ValueError naming the key when ``batch`` lacks a required key or one has the wrong shape or dtype.

  ``batch_dims`` leading dims are free (0 for one window, 1 for [B, ...]); with ``turns`` the
  micro-turn axis is checked too. Keys outside the schema are left alone.
  """
  for f in fields(specs):
    if f.name not in batch:
      if f.required:
        raise ValueError(f"batch is missing {f.name!r} ({f.doc}); it has {sorted(batch)}")
      continue
    x = batch[f.name]
    shape, dtype = tuple(np.shape(x)), getattr(x, "dtype", None)
    want = f.window_shape(-1 if turns is None else turns)
    ok = len(shape) == batch_dims + len(want) and all(
      w in (-1, s) for w, s in zip(want, shape[batch_dims:], strict=True)
    )
    if not ok or dtype is None or np.dtype(dtype) != f.dtype:
      lead = ["B"] * batch_dims
      dims = ", ".join([*lead, *(TURNS if d == -1 else str(d) for d in want)])
      raise ValueError(f"batch key {f.name!r} ({f.doc}): expected {f.dtype} [{dims}], got {dtype} {list(shape)}")


def select(specs: Sequence[layout.StreamSpec], batch) -> dict:
  """The keys of ``batch`` the model reads: every required one (a clear error when missing) and the optional
  targets it has."""
  schema = fields(specs)
  missing = [f.name for f in schema if f.required and f.name not in batch]
  if missing:
    raise ValueError(f"batch is missing {missing}; it has {sorted(batch)}")
  return {f.name: batch[f.name] for f in schema if f.name in batch}


def shapes(
  specs: Sequence[layout.StreamSpec], batch_size: int, turns: int, *, optional: bool = True
) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
  """``{key: (shape, dtype)}`` of a [batch_size, turns] batch (with the optional targets unless told not to)."""
  return {f.name: ((batch_size, *f.window_shape(turns)), f.dtype) for f in fields(specs) if f.required or optional}


def random_batch(specs: Sequence[layout.StreamSpec], batch_size: int, turns: int, seed: int = 0, first_turn=None):
  """A batch of the required keys: random stream values (``layout.random_streams``), ``first_turn`` (0 unless
  given) and an all-real ``turn_mask``."""
  out = layout.random_streams(specs, (batch_size, turns), seed)
  out["first_turn"] = np.zeros(batch_size, np.int32) if first_turn is None else np.asarray(first_turn, np.int32)
  out["turn_mask"] = np.ones((batch_size, turns), np.float32)
  return out
