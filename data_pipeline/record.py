"""One conversation record: the in-memory form, its validation and its pickle-free encoding.

A record is the bytes of an uncompressed ``.npz`` archive (``np.savez``), read back
with ``allow_pickle=False``. Members (see data_pipeline/README.md, "Record format"):

  header       uint8 [n]        UTF-8 JSON: format, version, id, sample_rate, num_turns, events, meta
  user_audio   int16 [samples]  the user's speech, 16 kHz mono PCM
  model_audio  int16 [samples]  the model's speech, 16 kHz mono PCM
  frames       uint8 [F, H, W, 3]  optional RGB frames, at most one per micro-turn
  frame_turns  int32 [F]        micro-turn index of each frame, strictly increasing
  label.<name> int32 [num_turns]  per-micro-turn evaluation labels

Times are seconds from the start of the conversation. A time ``t`` belongs to
micro-turn ``turn_of(t) = round(t * 16000) // 3200``, i.e. floor(t / 0.2) on the
sample grid (so 0.6 s is turn 3 despite float rounding).
"""

from __future__ import annotations

import dataclasses
import io
import json
import zipfile

import numpy as np

from interaction import layout

FORMAT = "interaction.conversation"
VERSION = 1
SAMPLE_RATE = 16_000
SAMPLES_PER_TURN = int(round(SAMPLE_RATE * layout.MICRO_TURN_SECONDS))
# Events from the user's side go to the input text stream, the model's to the output one.
INPUT_EVENTS = ("user_text", "tool_result", "background_result")
OUTPUT_EVENTS = ("model_text", "tool_call", "delegate")
EVENT_KINDS = INPUT_EVENTS + OUTPUT_EVENTS


class RecordError(ValueError):
  """A record that cannot be decoded or breaks the format's invariants."""


def turn_of(t: float) -> int:
  """Micro-turn containing time ``t`` (seconds), with ``t`` snapped to the sample grid."""
  return int(round(t * SAMPLE_RATE)) // SAMPLES_PER_TURN


@dataclasses.dataclass(frozen=True)
class Event:
  """A timed text event. ``kind`` is one of EVENT_KINDS; the text is laid out from ``start`` on."""

  kind: str
  start: float
  end: float
  text: str


@dataclasses.dataclass
class Conversation:
  """One conversation, decoded. Audio is int16 PCM at SAMPLE_RATE."""

  id: str
  user_audio: np.ndarray
  model_audio: np.ndarray
  events: list[Event] = dataclasses.field(default_factory=list)
  frames: np.ndarray | None = None
  frame_turns: np.ndarray | None = None
  labels: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
  meta: dict = dataclasses.field(default_factory=dict)

  @property
  def num_samples(self) -> int:
    return max(len(self.user_audio), len(self.model_audio))

  @property
  def duration(self) -> float:
    return self.num_samples / SAMPLE_RATE

  @property
  def num_turns(self) -> int:
    """Micro-turns covering both audio tracks (at least one)."""
    return max(1, -(-self.num_samples // SAMPLES_PER_TURN))


def validate(conv: Conversation) -> None:
  """Raise RecordError naming the conversation when it breaks an invariant of the format."""

  def fail(msg):
    raise RecordError(f"conversation {conv.id!r}: {msg}")

  for name in ("user_audio", "model_audio"):
    a = getattr(conv, name)
    if not isinstance(a, np.ndarray) or a.dtype != np.int16 or a.ndim != 1:
      fail(f"{name} must be a 1-D int16 array, got {getattr(a, 'dtype', type(a))} {getattr(a, 'shape', '')}")
  # An event must lie inside the audio it describes; half a sample of slack absorbs rounding.
  slack = 0.5 / SAMPLE_RATE
  track_end = {"user_text": len(conv.user_audio) / SAMPLE_RATE, "model_text": len(conv.model_audio) / SAMPLE_RATE}
  for ev in conv.events:
    if ev.kind not in EVENT_KINDS:
      fail(f"event kind {ev.kind!r} is not one of {EVENT_KINDS}")
    end = track_end.get(ev.kind, conv.duration)
    if not (0.0 <= ev.start <= ev.end <= end + slack):
      fail(f"{ev.kind} event {ev.text!r} at [{ev.start:.3f}, {ev.end:.3f}] s lies outside its audio [0, {end:.3f}] s")
  if (conv.frames is None) != (conv.frame_turns is None):
    fail("frames and frame_turns must be given together")
  if conv.frames is not None:
    f, ft = conv.frames, conv.frame_turns
    if f.dtype != np.uint8 or f.ndim != 4 or f.shape[-1] != 3:
      fail(f"frames must be uint8 [F, H, W, 3], got {f.dtype} {f.shape}")
    if ft.shape != (len(f),) or (len(ft) and (ft.min() < 0 or ft.max() >= conv.num_turns)):
      fail(f"frame_turns must be [F] micro-turn indices in [0, {conv.num_turns}), got {ft.tolist()[:8]}...")
    if np.any(np.diff(ft) <= 0):
      fail("frame_turns must be strictly increasing (at most one frame per micro-turn)")
  for name, lab in conv.labels.items():
    if lab.shape != (conv.num_turns,):
      fail(f"label {name!r} has shape {lab.shape}, expected ({conv.num_turns},) (one value per micro-turn)")


def encode(conv: Conversation) -> bytes:
  """Bytes of one record (validated first)."""
  validate(conv)
  header = {
    "format": FORMAT,
    "version": VERSION,
    "id": conv.id,
    "sample_rate": SAMPLE_RATE,
    "num_turns": conv.num_turns,
    "events": [[e.kind, float(e.start), float(e.end), e.text] for e in conv.events],
    "meta": conv.meta,
  }
  arrays = {
    "header": np.frombuffer(json.dumps(header).encode("utf-8"), np.uint8),
    "user_audio": conv.user_audio,
    "model_audio": conv.model_audio,
  }
  if conv.frames is not None:
    arrays["frames"] = conv.frames
    arrays["frame_turns"] = conv.frame_turns.astype(np.int32)
  for name, lab in conv.labels.items():
    arrays[f"label.{name}"] = np.asarray(lab, np.int32)
  buf = io.BytesIO()
  np.savez(buf, **arrays)
  return buf.getvalue()


def decode(data: bytes) -> Conversation:
  """Conversation from record bytes. Raises RecordError on any corruption or format mismatch."""
  try:
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
      # Reading every member verifies the zip CRC-32 of each one.
      arrays = {k: z[k] for k in z.files}
    header = json.loads(arrays.pop("header").tobytes().decode("utf-8"))
  except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError, UnicodeDecodeError) as e:
    raise RecordError(f"undecodable record ({type(e).__name__}: {e})") from e
  if header.get("format") != FORMAT or header.get("version") != VERSION:
    raise RecordError(
      f"unsupported record format {header.get('format')!r} v{header.get('version')}; expected {FORMAT!r} v{VERSION}"
    )
  try:
    conv = Conversation(
      id=header["id"],
      user_audio=arrays.pop("user_audio"),
      model_audio=arrays.pop("model_audio"),
      events=[Event(k, float(s), float(e), t) for k, s, e, t in header["events"]],
      frames=arrays.pop("frames", None),
      frame_turns=arrays.pop("frame_turns", None),
      labels={k[len("label.") :]: v for k, v in arrays.items() if k.startswith("label.")},
      meta=header.get("meta", {}),
    )
  except (KeyError, TypeError, ValueError) as e:
    raise RecordError(f"malformed record header ({type(e).__name__}: {e})") from e
  if conv.num_turns != header["num_turns"]:
    raise RecordError(f"conversation {conv.id!r}: header says {header['num_turns']} turns, audio has {conv.num_turns}")
  validate(conv)
  return conv
