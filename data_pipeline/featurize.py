"""Cut a decoded conversation into a window of micro-turns, featurized per stream spec.

Streams are matched to the record by kind and direction: the input audio stream
gets the user's audio, the output audio stream the model's; the video stream the
frames; the input text stream the user text, tool results and background results;
the output text stream the model's text, tool calls and delegations.

Text of an event is laid out from the micro-turn containing its start time,
filling the stream's slots and spilling into later turns; an event that starts
while earlier text is still being laid out queues behind it. Text spilling past
the conversation's last micro-turn is dropped.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np

from data_pipeline import audio, record
from interaction import layout, schema, text

# Per-micro-turn evaluation labels the pipeline carries (missing ones are -1).
# The synthetic generator writes all of them; see data_pipeline/README.md.
LABELS = ("task", "user_speaking", "model_speaking", "cue", "user_word", "model_word")
LABEL_PAD = -1

_MARKERS = {
  "user_text": ((), ()),
  "model_text": ((), ()),
  "tool_call": ((text.TOOL_CALL_START,), (text.TOOL_CALL_END,)),
  "tool_result": ((text.TOOL_RESULT_START,), (text.TOOL_RESULT_END,)),
  "delegate": ((text.DELEGATE_START,), (text.DELEGATE_END,)),
  "background_result": ((text.BACKGROUND_RESULT_START,), (text.BACKGROUND_RESULT_END,)),
}


def check_specs(specs: Sequence[layout.StreamSpec]) -> None:
  """Refuse stream layouts the record cannot fill (e.g. two input audio streams)."""
  seen = set()
  for s in specs:
    key = (s.kind, s.direction)
    if key in seen:
      raise ValueError(f"stream {s.name!r}: only one {s.direction}put {s.kind} stream is supported")
    seen.add(key)
    # The mel of digital silence must be the spec's silence (what idle slots and silent inputs hold).
    if s.kind == "audio" and (quiet := audio.silence_value(audio.mel_config(s))) != s.silence:
      raise ValueError(
        f"audio stream {s.name!r}: digital silence has log-mel {quiet:.4f}, not mel_min={s.mel_min}; "
        f"set mel_min >= log(POWER_FLOOR) = {np.log(audio.POWER_FLOOR):.4f} so silence has one value"
      )
    if s.kind == "video" and s.patches_per_row * s.patch_size != s.frame_shape[1]:
      raise ValueError(f"video stream {s.name!r}: inconsistent frame shape")
    if s.kind == "text" and s.vocab_size < text.VOCAB_SIZE:
      raise ValueError(f"text stream {s.name!r}: vocab_size {s.vocab_size} < {text.VOCAB_SIZE} byte+special ids")


def event_tokens(ev: record.Event) -> np.ndarray:
  """Token ids of one event: its UTF-8 bytes between the markers of its kind."""
  pre, post = _MARKERS[ev.kind]
  return np.concatenate([np.array(pre, np.int32), text.encode(ev.text), np.array(post, np.int32)])


def layout_text(events: Sequence[record.Event], num_turns: int, slots: int) -> np.ndarray:
  """int32 [num_turns, slots]: events' tokens placed from their start turn on, PAD elsewhere."""
  out = np.full(num_turns * slots, text.PAD, np.int32)
  cursor = 0
  for ev in sorted(events, key=lambda e: e.start):
    toks = event_tokens(ev)
    pos = max(cursor, record.turn_of(ev.start) * slots)
    n = max(0, min(len(toks), len(out) - pos))
    out[pos : pos + n] = toks[:n]
    cursor = pos + len(toks)
  return out.reshape(num_turns, slots)


@functools.lru_cache(maxsize=16)
def _resize_matrix(n_in: int, n_out: int) -> np.ndarray:
  """float32 [n_out, n_in] linear interpolation at pixel centres (area-averaging when shrinking)."""
  m = np.zeros((n_out, n_in), np.float32)
  scale = n_in / n_out
  if scale <= 1.0:
    pos = np.clip((np.arange(n_out) + 0.5) * scale - 0.5, 0, n_in - 1)
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, n_in - 1)
    m[np.arange(n_out), lo] += 1 - (pos - lo)
    m[np.arange(n_out), hi] += pos - lo
  else:
    for i in range(n_out):
      a, b = i * scale, (i + 1) * scale
      for j in range(int(np.floor(a)), int(np.ceil(b))):
        m[i, j] = min(b, j + 1) - max(a, j)
    m /= m.sum(axis=1, keepdims=True)
  return m


@functools.lru_cache(maxsize=16)
def _resize_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
  """``_resize_matrix`` as its nonzero taps: (indices int [n_out, K], weights float32 [n_out, K]), zero-padded."""
  m = _resize_matrix(n_in, n_out)
  k = int((m != 0).sum(axis=1).max())
  idx, wts = np.zeros((n_out, k), np.intp), np.zeros((n_out, k), np.float32)
  for i, row in enumerate(m):
    (j,) = np.nonzero(row)
    idx[i, : len(j)], wts[i, : len(j)] = j, row[j]
  return idx, wts


def resize(frames: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
  """uint8 [..., H, W, 3] frames resized to ``shape`` (H', W'), separable linear filter (area average when shrinking).

  Each axis is a weighted sum over the filter's few taps per output pixel, so the cost is about that of reading
  the frame once: ~2 ms for 640x480 (a dense matrix product took seconds as a 3-operand einsum, and BLAS threads
  cost more than they save at these sizes on a busy machine). Rows are gathered one tap at a time (each a
  contiguous copy); columns, many taps when the width shrinks a lot, all at once. Whole factors are block sums
  of integers (what the filter's weights are there), ~0.5 ms for 640x480.
  """
  h, w = frames.shape[-3:-1]
  if (h, w) == tuple(shape):
    return frames
  (fy, ry), (fx, rx) = divmod(h, shape[0]), divmod(w, shape[1])
  if ry == rx == 0 and fy * fx <= 256:  # whole factors (160x120, 640x480 -> 40x40): block sums, exact in integers
    *lead, _, _, c = frames.shape
    rows = frames.reshape(*lead, shape[0], fy, w * c).sum(axis=-2, dtype=np.uint16)
    blocks = rows.reshape(*lead, shape[0], shape[1], fx, c).sum(axis=-2, dtype=np.uint32)
    return np.round(blocks / np.float32(fy * fx)).astype(np.uint8)
  x = frames.astype(np.float32)
  (iy, wy), (ix, wx) = _resize_taps(h, shape[0]), _resize_taps(w, shape[1])
  y = x[..., iy[:, 0], :, :] * wy[:, 0, None, None]  # [..., H', W, 3]
  for k in range(1, iy.shape[1]):
    y += x[..., iy[:, k], :, :] * wy[:, k, None, None]
  out = (y[..., ix, :] * wx[:, :, None]).sum(axis=-2)  # [..., H', W', K, 3] -> [..., H', W', 3]
  return np.clip(np.round(out), 0, 255).astype(np.uint8)


def patchify(frames: np.ndarray, p: int) -> np.ndarray:
  """[..., H, W, 3] -> [..., (H/p)*(W/p), p, p, 3], patches row-major."""
  *lead, h, w, c = frames.shape
  x = frames.reshape(*lead, h // p, p, w // p, p, c)
  x = np.moveaxis(x, -4, -3)  # [..., H/p, W/p, p, p, c]
  return x.reshape(*lead, (h // p) * (w // p), p, p, c)


def _audio_window(spec, pcm: np.ndarray, first: int, n: int) -> np.ndarray:
  cfg = audio.mel_config(spec)
  x = pcm.astype(np.float32) * np.float32(1.0 / 32768.0)
  return audio.log_mel(cfg, x, first * record.SAMPLES_PER_TURN, n * spec.slots).reshape(n, spec.slots, -1)


def _video_window(spec, conv: record.Conversation, first: int, n: int) -> np.ndarray:
  out = np.zeros((n, spec.slots, spec.patch_size, spec.patch_size, 3), np.uint8)
  if conv.frames is None or not len(conv.frames):
    return out
  ft = conv.frame_turns
  sel = (ft >= first) & (ft < first + n)
  if sel.any():
    out[ft[sel] - first] = patchify(resize(conv.frames[sel], spec.frame_shape), spec.patch_size)
  return out


HEARD_UNKNOWN = -1  # ``heard`` slots of a conversation without word timings: no listening target


def heard_text(spec: layout.StreamSpec, conv: record.Conversation, first: int, n: int) -> np.ndarray:
  """int32 [n, spec.slots]: the bytes of the words the user said, on the input audio stream's frames.

  A listening target, never an input: each word's bytes (and a space) are laid out from the first
  frame that has heard the whole word (frame ``i`` ends at sample ``(i + 1) * hop``), queueing
  behind the word before; PAD elsewhere. ``HEARD_UNKNOWN`` everywhere when the record has no word
  timings (``meta["user_words"]``).
  """
  words = conv.meta.get("user_words")
  if words is None:
    return np.full((n, spec.slots), HEARD_UNKNOWN, np.int32)
  hop = record.SAMPLES_PER_TURN // spec.slots
  total = max(conv.num_turns, first + n) * spec.slots
  out = np.full(total, text.PAD, np.int32)
  cursor = 0
  for _, end, word in sorted(words, key=lambda w: w[1]):
    toks = text.encode(str(word) + " ")
    pos = max(cursor, -(-int(round(end * record.SAMPLE_RATE)) // hop) - 1)
    k = max(0, min(len(toks), total - pos))
    out[pos : pos + k] = toks[:k]
    cursor = pos + len(toks)
  return out.reshape(-1, spec.slots)[first : first + n]


def window(specs: Sequence[layout.StreamSpec], conv: record.Conversation, first: int, n: int) -> dict:
  """Features of micro-turns [first, first + n) of ``conv``: the batch schema's keys (``interaction.schema``,
  checked) and the evaluation labels.

  Turns past the conversation's end are padding: silence, zero frames, PAD text,
  labels -1, turn_mask 0.
  """
  total = conv.num_turns
  out = {}
  for spec in specs:
    if spec.kind == "audio":
      pcm = conv.user_audio if spec.direction == "in" else conv.model_audio
      out[spec.name] = _audio_window(spec, pcm, first, n)
      if spec.direction == "in":
        out["heard"] = heard_text(spec, conv, first, n)
    elif spec.kind == "video":
      out[spec.name] = _video_window(spec, conv, first, n)
    else:
      kinds = record.INPUT_EVENTS if spec.direction == "in" else record.OUTPUT_EVENTS
      full = layout_text([e for e in conv.events if e.kind in kinds], total, spec.slots)
      win = np.full((n, spec.slots), text.PAD, np.int32)
      part = full[first : first + n]
      win[: len(part)] = part
      out[spec.name] = win
  out["first_turn"] = np.int32(first)
  out["turn_mask"] = (np.arange(first, first + n) < total).astype(np.float32)
  labels = {}
  for name in LABELS:
    lab = np.full(n, LABEL_PAD, np.int32)
    if name in conv.labels:
      part = conv.labels[name][first : first + n]
      lab[: len(part)] = part
    labels[name] = lab
  out["labels"] = labels
  schema.check(specs, out, batch_dims=0, turns=n)
  return out


def empty_window(specs: Sequence[layout.StreamSpec], n: int) -> dict:
  """An all-padding window (turn_mask 0), used to even out per-process window counts."""
  conv = record.Conversation(id="<empty>", user_audio=np.zeros(0, np.int16), model_audio=np.zeros(0, np.int16))
  out = window(specs, conv, 0, n)
  out["turn_mask"][:] = 0.0
  return out
