"""Micro-turn stream layout: which token of a window belongs to which stream.

Pure numpy (no jax): the data pipeline, the model and the step all derive their
index arrays from these functions, so the layout is never hard-coded twice.

A micro-turn is one input block followed by one output block. Inside a block the
streams come in spec order, each with its fixed number of slots. A window of N
micro-turns is the sequence ``in_0, out_0, in_1, out_1, ...``.

Legend: N micro-turns in a window, S tokens per micro-turn, T = N * S tokens.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import numpy as np

from interaction import text

MICRO_TURN_SECONDS = 0.2
DIRECTIONS = ("in", "out")
KINDS = ("audio", "video", "text")

# Silence and voicing: the one definition every layer uses (``StreamSpec.silence``, ``silent``,
# ``voiced``). Two levels, because they read different signals:
# - A *target* mel frame (from the data) is silent when no channel rises above the middle of
#   [mel_min, mel_max]: the data's frames are bimodal (digital silence sits at mel_min, speech far
#   above), so the midpoint splits them (the objective's transition weights).
# - A *predicted* mel frame (from the flow head) is voiced only ``VOICE_MARGIN`` nats above that
#   midpoint, and a micro-turn speaks only with ``VOICED_FRAMES`` such frames: generated frames
#   hover near the split where the model hesitates, and one stray frame is not speech
#   (evaluation's scores and the live server's ``speaking`` flag and vocoder).
# - The user's raw microphone PCM is not a mel frame at all: a micro-turn of it has speech energy
#   above ``PCM_SPEECH_RMS`` (-40 dBFS RMS of samples in [-1, 1]; the server's ``user_speaking``).
VOICE_MARGIN = 0.5
VOICED_FRAMES = 2
PCM_SPEECH_RMS = 0.01


def pcm_speech(samples) -> bool:
  """Whether float samples in [-1, 1] of a micro-turn have speech energy (RMS above ``PCM_SPEECH_RMS``)."""
  x = np.asarray(samples, np.float32)
  rms = float(np.sqrt(np.mean(x * x))) if x.size else 0.0
  return rms > PCM_SPEECH_RMS


@dataclasses.dataclass(frozen=True)
class StreamSpec:
  """One modality in one direction, with its slots per micro-turn.

  Audio streams carry log-mel frames (one frame per slot) that the model
  quantizes to dMel codes: ``mel_channels`` channels, ``mel_levels`` levels each,
  values clipped to ``[mel_min, mel_max]``. Video streams carry RGB patches of
  ``patch_size`` x ``patch_size`` pixels (one patch per slot, row-major over a
  frame of ``frame_shape``). Text streams carry
  token ids below ``vocab_size``.
  """

  name: str
  direction: str
  kind: str
  slots: int
  mel_channels: int = 0
  mel_levels: int = 0
  mel_min: float = -1.0
  mel_max: float = 1.0
  patch_size: int = 0
  patches_per_row: int = 1
  vocab_size: int = 0

  def __post_init__(self):
    if self.direction not in DIRECTIONS:
      raise ValueError(f"stream {self.name!r}: direction must be one of {DIRECTIONS}, got {self.direction!r}")
    if self.kind not in KINDS:
      raise ValueError(f"stream {self.name!r}: kind must be one of {KINDS}, got {self.kind!r}")
    if self.slots < 1:
      raise ValueError(f"stream {self.name!r}: slots must be >= 1, got {self.slots}")
    if self.kind == "audio" and (self.mel_channels < 1 or self.mel_levels < 2):
      raise ValueError(f"audio stream {self.name!r} needs mel_channels >= 1 and mel_levels >= 2")
    if self.kind == "audio" and not self.mel_max > self.mel_min:
      raise ValueError(f"audio stream {self.name!r}: mel_max must exceed mel_min")
    if self.kind == "video" and self.patch_size < 1:
      raise ValueError(f"video stream {self.name!r} needs patch_size >= 1")
    if self.kind == "video" and self.slots % self.patches_per_row:
      raise ValueError(f"video stream {self.name!r}: slots ({self.slots}) must be a multiple of patches_per_row")
    if self.kind == "video" and self.direction == "out":
      raise ValueError(f"video stream {self.name!r}: video output is not supported")
    if self.kind == "text" and self.vocab_size < 2:
      raise ValueError(f"text stream {self.name!r} needs vocab_size >= 2")

  @property
  def value_shape(self) -> tuple[int, ...]:
    """Shape of one slot's value (after the slot axis)."""
    if self.kind == "audio":
      return (self.mel_channels,)
    if self.kind == "video":
      return (self.patch_size, self.patch_size, 3)
    return ()

  @property
  def frame_shape(self) -> tuple[int, int]:
    """(height, width) in pixels of a video frame cut into this stream's patches."""
    return (self.slots // self.patches_per_row * self.patch_size, self.patches_per_row * self.patch_size)

  @property
  def dtype(self) -> np.dtype:
    """The dtype a batch carries for this stream."""
    return {"audio": np.dtype(np.float32), "video": np.dtype(np.uint8), "text": np.dtype(np.int32)}[self.kind]

  @property
  def silence(self):
    """The value of one silent element: PAD text, the lowest mel value (digital silence), a black pixel."""
    return {"audio": self.mel_min, "video": 0, "text": text.PAD}[self.kind]

  def silent(self, values):
    """[..., n] bool per slot of ``values`` [..., n, *value_shape] (numpy or jax): PAD text, a *target* mel
    frame with no channel above the middle of [mel_min, mel_max], an all-black patch."""
    if self.kind == "text":
      return values == text.PAD
    if self.kind == "audio":
      return values.max(axis=-1) <= (self.mel_min + self.mel_max) / 2
    return (values == 0).all(axis=(-3, -2, -1))

  @property
  def voice_level(self) -> float:
    """The log-mel level a *predicted* frame's loudest channel must exceed to count as voiced."""
    if self.kind != "audio":
      raise ValueError(f"stream {self.name!r} is a {self.kind} stream; only audio has a voice level")
    return (self.mel_min + self.mel_max) / 2 + VOICE_MARGIN

  def voiced(self, frames_Nnc):
    """[N] bool: which micro-turns of predicted mel frames [N, n, C] are speech (``VOICED_FRAMES`` voiced frames)."""
    frames_Nnc = np.asarray(frames_Nnc)
    return (frames_Nnc.max(axis=-1) > self.voice_level).sum(axis=-1) >= VOICED_FRAMES


def validate_specs(specs: Sequence[StreamSpec]) -> None:
  names = [s.name for s in specs]
  if len(set(names)) != len(names):
    raise ValueError(f"stream names must be unique, got {names}")
  if not any(s.direction == "in" for s in specs) or not any(s.direction == "out" for s in specs):
    raise ValueError("a layout needs at least one input and one output stream")


def find_stream(specs: Sequence[StreamSpec], kind: str, direction: str, *, optional: bool = False):
  """The one stream of ``kind`` in ``direction`` (``ModelConfig.stream`` for a config).

  With ``optional`` a missing stream is None; a missing required one, or two that match, is a KeyError.
  """
  found = [s for s in specs if s.kind == kind and s.direction == direction]
  if len(found) == 1:
    return found[0]
  if not found and optional:
    return None
  what = "no" if not found else f"{len(found)} ({[s.name for s in found]})"
  raise KeyError(
    f"{what} {kind} {direction}put streams, need exactly one; streams are {[(s.name, s.kind, s.direction) for s in specs]}"
  )


def block_order(specs: Sequence[StreamSpec]) -> list[StreamSpec]:
  """Streams in token order inside one micro-turn: inputs, then outputs."""
  validate_specs(specs)
  return [s for s in specs if s.direction == "in"] + [s for s in specs if s.direction == "out"]


def tokens_per_turn(specs: Sequence[StreamSpec]) -> int:
  return sum(s.slots for s in specs)


def input_tokens_per_turn(specs: Sequence[StreamSpec]) -> int:
  return sum(s.slots for s in specs if s.direction == "in")


def output_tokens_per_turn(specs: Sequence[StreamSpec]) -> int:
  return sum(s.slots for s in specs if s.direction == "out")


@dataclasses.dataclass(frozen=True)
class TurnLayout:
  """Per-token arrays for one micro-turn, each of shape [S]."""

  stream: np.ndarray  # index into ``order``
  slot: np.ndarray  # slot within its stream
  predicted: np.ndarray  # bool: an output slot (a training target)
  order: tuple[StreamSpec, ...]

  def offset(self, name: str) -> int:
    """Offset of a stream's first slot inside the micro-turn."""
    for i, spec in enumerate(self.order):
      if spec.name == name:
        return int(np.flatnonzero(self.stream == i)[0])
    raise KeyError(f"no stream named {name!r}; streams are {[s.name for s in self.order]}")


@functools.lru_cache(maxsize=64)
def _turn_layout(specs: tuple[StreamSpec, ...]) -> TurnLayout:
  order = tuple(block_order(specs))
  stream = np.concatenate([np.full(s.slots, i, np.int32) for i, s in enumerate(order)])
  slot = np.concatenate([np.arange(s.slots, dtype=np.int32) for s in order])
  predicted = np.concatenate([np.full(s.slots, s.direction == "out") for s in order])
  return TurnLayout(stream=stream, slot=slot, predicted=predicted, order=order)


def turn_layout(specs: Sequence[StreamSpec]) -> TurnLayout:
  """Layout of one micro-turn (cached: the specs are hashable)."""
  return _turn_layout(tuple(specs))


@dataclasses.dataclass(frozen=True)
class WindowLayout:
  """Per-token arrays for a window of N micro-turns, each of shape [T]."""

  stream: np.ndarray
  slot: np.ndarray
  turn: np.ndarray  # absolute micro-turn index
  position: np.ndarray  # absolute token position (RoPE), grows across turns
  predicted: np.ndarray
  order: tuple[StreamSpec, ...]


def window_layout(specs: Sequence[StreamSpec], num_turns: int, first_turn: int = 0) -> WindowLayout:
  """Layout of ``num_turns`` micro-turns starting at micro-turn ``first_turn``."""
  tl = turn_layout(specs)
  s = len(tl.stream)
  turn = np.repeat(np.arange(first_turn, first_turn + num_turns, dtype=np.int32), s)
  return WindowLayout(
    stream=np.tile(tl.stream, num_turns),
    slot=np.tile(tl.slot, num_turns),
    turn=turn,
    position=(first_turn * s + np.arange(num_turns * s)).astype(np.int32),
    predicted=np.tile(tl.predicted, num_turns),
    order=tl.order,
  )


def token_index(specs: Sequence[StreamSpec], name: str, num_turns: int) -> np.ndarray:
  """Window-relative index of each token of a stream: int32 [N, slots]."""
  tl = turn_layout(specs)
  spec = tl.order[[sp.name for sp in tl.order].index(name)]
  s = len(tl.stream)
  return (np.arange(num_turns)[:, None] * s + tl.offset(name) + np.arange(spec.slots)[None, :]).astype(np.int32)


def prediction_index(specs: Sequence[StreamSpec], name: str, num_turns: int) -> np.ndarray:
  """Window-relative index of the hidden state that predicts each slot of an output stream.

  Output slots are predicted by next-token prediction: the hidden state at token
  ``p - 1`` predicts the value at token ``p``. Returns int32 [N, slots].
  """
  tl = turn_layout(specs)
  spec = tl.order[[sp.name for sp in tl.order].index(name)]
  if spec.direction != "out":
    raise ValueError(f"stream {name!r} is an input stream; inputs are never predicted")
  s = len(tl.stream)
  first = tl.offset(name) + np.arange(spec.slots)
  return (np.arange(num_turns)[:, None] * s + first[None, :] - 1).astype(np.int32)


def window_targets(specs: Sequence[StreamSpec], streams: dict[str, np.ndarray]) -> np.ndarray:
  """Per-token text target of a window: the token id at predicted text slots, -1 elsewhere.

  ``streams`` maps stream names to [N, slots, ...] arrays of one window.
  """
  tl = turn_layout(specs)
  num_turns = next(iter(streams.values())).shape[0]
  targets = np.full((num_turns, len(tl.stream)), -1, np.int64)
  for spec in tl.order:
    if spec.direction == "out" and spec.kind == "text":
      off = tl.offset(spec.name)
      targets[:, off : off + spec.slots] = streams[spec.name]
  return targets.reshape(-1)


def check_window(specs: Sequence[StreamSpec], streams: dict, batch_dims: int, num_turns: int | None = None) -> None:
  """Raise ValueError naming the stream when an array does not match the layout.

  ``batch_dims`` leading dims are free (e.g. 2 for [B, N]); after them come the
  stream's slots and its value shape. With ``num_turns`` the turn dim is checked.
  """
  for spec in specs:
    if spec.name not in streams:
      raise ValueError(
        f"missing stream {spec.name!r}; expected an array of shape [...,{spec.slots},{','.join(map(str, spec.value_shape))}]"
      )
    x = streams[spec.name]
    shape, dtype = tuple(getattr(x, "shape", ())), getattr(x, "dtype", None)
    expected = (spec.slots, *spec.value_shape)
    ok = len(shape) == batch_dims + len(expected) and shape[batch_dims:] == expected
    if ok and num_turns is not None and batch_dims >= 2:
      ok = shape[1] == num_turns
    if not ok:
      lead = "B" if batch_dims == 1 else "B, N" if num_turns is None else f"B, {num_turns}"
      raise ValueError(
        f"stream {spec.name!r}: expected shape [{lead}, {', '.join(map(str, expected))}], got {list(shape)}"
      )
    if dtype is None or np.dtype(dtype) != spec.dtype:
      raise ValueError(f"stream {spec.name!r}: expected dtype {spec.dtype}, got {dtype}")


def random_streams(specs: Sequence[StreamSpec], lead: tuple[int, ...], seed: int = 0) -> dict[str, np.ndarray]:
  """Random values of the right shape and dtype for every stream (tests, benchmarks, AOT)."""
  rng = np.random.default_rng(seed)
  out = {}
  for spec in specs:
    shape = (*lead, spec.slots, *spec.value_shape)
    if spec.kind == "audio":
      out[spec.name] = rng.uniform(spec.mel_min, spec.mel_max, shape).astype(np.float32)
    elif spec.kind == "video":
      out[spec.name] = rng.integers(0, 256, shape, dtype=np.uint8)
    else:
      out[spec.name] = rng.integers(0, spec.vocab_size, shape).astype(np.int32)
  return out
