"""The live session protocol, version 1 (``serving/PROTOCOL.md``): constants, limits, codes and frame checks.

Standard library only, so the load tool and other clients use the same definitions as the server without
loading the model stack; ``static/client.js`` restates the constants a browser needs (a test keeps them equal).
Every check a frame passes before its content reaches the engine is here; a refused frame raises
``ClientError``, which the server turns into an ``error`` event and the session goes on.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import struct

PROTOCOL_VERSION = 1
TOKEN_ENV = "INTERACTION_SERVER_TOKEN"
SESSION_PATH = "/v1/session"
STATS_PATH = "/v1/stats"
HEALTH_PATH = "/healthz"

# Binary frame kinds: the first byte of every binary frame.
AUDIO, JPEG, RAW = 0x01, 0x02, 0x03
# Audio both ways: 16 kHz mono PCM16 little-endian; one tick per 200 ms micro-turn (the model's clock).
SAMPLE_RATE = 16_000
TICK_MS = 200
TICK_S = TICK_MS / 1000
SAMPLES_PER_TICK = SAMPLE_RATE * TICK_MS // 1000
ENCODING = "pcm16"
MAX_SIDE = 4096  # pixels: larger video frames are refused before decoding
MAX_DEPTH = 32  # nesting of a JSON event's arrays and objects
MAX_TEXT_FRAME = 64 << 10  # characters of a text frame (typed text is capped far lower; parsing is on the loop)
MAX_INT_DIGITS = 64  # digits of a JSON integer literal (int() of thousands of digits is slow, past 4300 refused)

# Close codes the server sends (1007 and 1009 come from the WebSocket layer itself).
CLOSE_ENDED = 1000  # after session.end
CLOSE_SHUTDOWN = 1001  # SIGTERM drain
CLOSE_POLICY = 1008  # the client reads too slowly, or the session reached its maximum duration
CLOSE_SERVER_ERROR = 1011  # a bug; the other sessions go on
CLOSE_LOST_PROCESS = 1012  # a server on several processes lost one: every session is closed, the job restarts
CLOSE_FULL = 1013  # admission lost a race for the last slot
SHUTDOWN_REASON = "server shutting down"
ENDED_REASON = "session ended by client"

# ``error`` event codes.
ERROR_CODES = (
  "bad_frame",
  "bad_audio",
  "bad_video",
  "bad_json",
  "bad_event",
  "bad_value",
  "unsupported",
  "input_overflow",
)
EVENT_TYPES = ("text", "session.update", "ping", "session.end")
SAMPLING_FIELDS = ("temperature", "top_p", "seed")


def _limit(default, flag: str, help: str):
  return dataclasses.field(default=default, metadata={"flag": flag, "help": help})


@dataclasses.dataclass(frozen=True)
class Limits:
  """Per-session limits, announced in ``session.started``; each field's metadata names the server's flag."""

  max_message_bytes: int = _limit(1 << 20, "--max-message-bytes", "larger frames close with 1009")
  # 4 s of PCM16 plus typed text
  max_buffered_input_bytes: int = _limit(128_000, "--max-buffered-input-bytes", "audio + text waiting per session")
  # The model reads a few bytes of text_in per tick: 4096 bytes is minutes of typing it has not read yet.
  max_pending_text_bytes: int = _limit(4096, "--max-pending-text-bytes", "typed text the model has not read yet")
  # ~4 s of speech: a reader that stops hits it before the ping timeout
  max_unsent_output_bytes: int = _limit(128 << 10, "--max-unsent-output-bytes", "past it a client closes with 1008")
  max_session_s: float = _limit(3600.0, "--max-session", "seconds before a session is closed")
  ping_interval_s: float = _limit(5.0, "--ping-interval", "seconds between WebSocket pings")
  ping_timeout_s: float = _limit(10.0, "--ping-timeout", "seconds without a pong: peer is dead")


class ClientError(ValueError):
  """A refused frame: becomes an ``error`` event; the session goes on."""

  def __init__(self, code: str, message: str):
    super().__init__(message)
    self.code = code


# -- client -> server ------------------------------------------------------------------


def parse_binary(message: bytes) -> tuple[int, bytes]:
  """(kind, payload) of a binary frame whose kind is known and whose audio payload is whole samples."""
  if not message:
    raise ClientError("bad_frame", "empty binary frame: the first byte must be a kind (1 audio, 2 JPEG, 3 raw RGB)")
  kind, payload = message[0], message[1:]
  if kind == AUDIO:
    if len(payload) % 2:
      raise ClientError("bad_audio", f"audio payload has {len(payload)} bytes: PCM16 needs an even count")
  elif kind not in (JPEG, RAW):
    raise ClientError("bad_frame", f"unknown binary kind {kind}: kinds are 1 audio, 2 JPEG, 3 raw RGB")
  return kind, payload


def check_side(what: str, w: int, h: int) -> None:
  if not (1 <= w <= MAX_SIDE and 1 <= h <= MAX_SIDE):
    raise ClientError("bad_video", f"{what} of {w}x{h}: each side must be in [1, {MAX_SIDE}]")


def raw_size(payload: bytes) -> tuple[int, int]:
  """(width, height) of a raw RGB frame's payload whose header and length agree."""
  if len(payload) < 4:
    raise ClientError("bad_video", f"raw frame has {len(payload)} bytes: needs a 4-byte width/height header")
  w, h = struct.unpack_from("<HH", payload)
  check_side("raw frame", w, h)
  if len(payload) != 4 + w * h * 3:
    raise ClientError(
      "bad_video", f"raw {w}x{h} RGB frame needs {w * h * 3} bytes after the header, got {len(payload) - 4}"
    )
  return w, h


def check_video(kind: int, payload: bytes) -> None:
  """The checks of a video frame that cost nothing (decoding is the engine thread's, at the tick that uses it).

  Raw: the header and the length agree. JPEG: it starts with SOI and ends with EOI (a truncated image does not).
  """
  if kind == RAW:
    raw_size(payload)
  elif not (payload.startswith(b"\xff\xd8") and payload.endswith(b"\xff\xd9")):
    raise ClientError("bad_video", "not a whole JPEG: it must start with FF D8 (SOI) and end with FF D9 (EOI)")


def _reject_constant(name: str):
  raise ClientError("bad_json", f"non-finite number {name} is not allowed")


def _float(literal: str) -> float:
  value = float(literal)
  if not math.isfinite(value):  # 1e999: too large for a float
    raise ClientError("bad_json", f"number {literal[:32]} is too large for a float (non-finite numbers are refused)")
  return value


def _int(literal: str) -> int:
  digits = len(literal) - literal.startswith("-")
  if digits > MAX_INT_DIGITS:
    raise ClientError("bad_json", f"integer literal of {digits} digits: at most {MAX_INT_DIGITS}")
  return int(literal)


_STRINGS = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"')
_NOT_BRACKETS = re.compile(r"[^\[\]{}]+")
_INNERMOST = re.compile(r"[\[{][\]}]")


def _too_deep(message: str) -> bool:
  """Whether a JSON text nests arrays and objects deeper than ``MAX_DEPTH``, found at C speed without parsing it.

  The parser's own guard is the interpreter's recursion limit (RecursionError, ~1000 levels), and a value that deep
  passes it but breaks the encoder when echoed back; each pass removes the innermost bracket pairs.
  """
  if message.count("[") + message.count("{") <= MAX_DEPTH:
    return False
  skeleton = _NOT_BRACKETS.sub("", _STRINGS.sub("", message))
  for _ in range(MAX_DEPTH):
    skeleton = _INNERMOST.sub("", skeleton)
    if not skeleton:
      return False
  return True


def parse_event(message: str) -> dict:
  """A text frame as an event whose ``type`` is known and whose fields are checked.

  ``text`` keeps its string unchecked for size and surrogates (``typed_text`` checks it against the
  session's buffer); ``session.update``'s ``sampling`` becomes the dict of the fields it changes.
  """
  if len(message) > MAX_TEXT_FRAME:  # refused before parsing: the loop parses every text frame
    raise ClientError(
      "input_overflow", f"text frame of {len(message)} characters: at most {MAX_TEXT_FRAME}; send text in pieces"
    )
  deep = f"JSON nested more than {MAX_DEPTH} levels deep"
  if _too_deep(message):
    raise ClientError("bad_json", deep)
  try:
    event = json.loads(message, parse_constant=_reject_constant, parse_float=_float, parse_int=_int)
  except json.JSONDecodeError as e:
    raise ClientError("bad_json", f"not JSON: {e}") from None
  except RecursionError:
    raise ClientError("bad_json", deep) from None
  if not isinstance(event, dict) or not isinstance(event.get("type"), str):
    raise ClientError("bad_json", 'a text frame must be a JSON object with a string "type"')
  kind = event["type"]
  if kind == "text":
    if not isinstance(event.get("text"), str):
      raise ClientError("bad_event", 'text needs a string "text"')
  elif kind == "session.update":
    unknown = sorted(set(event) - {"type", "sampling", "audio"})
    if unknown:
      raise ClientError("bad_event", f"unknown session.update fields {unknown}; fields are sampling, audio")
    if "audio" in event:
      check_audio(event["audio"])
    if "sampling" in event:
      event["sampling"] = parse_sampling(event["sampling"])
  elif kind not in EVENT_TYPES:
    raise ClientError("bad_event", f"unknown event type {kind[:64]!r}; types are {', '.join(EVENT_TYPES)}")
  return event


def typed_text(said: str, room: int) -> int:
  """The UTF-8 size of typed text that fits in ``room`` bytes of the session's input buffer."""
  size = len(said.encode("utf-8", "surrogatepass"))
  if size > room:
    raise ClientError("input_overflow", f"{size} bytes of text would exceed the input buffer cap")
  try:
    said.encode("utf-8")
  except UnicodeEncodeError:
    raise ClientError("bad_event", "text holds unpaired surrogates") from None
  return size


def check_audio(declared) -> None:
  """``session.update``'s ``audio``: only what the protocol carries (16 kHz PCM16) is accepted."""
  if not isinstance(declared, dict):
    raise ClientError("bad_event", "audio must be an object")
  rate, encoding = declared.get("sample_rate", SAMPLE_RATE), declared.get("encoding", ENCODING)
  if rate != SAMPLE_RATE or encoding != ENCODING or isinstance(rate, bool):
    raise ClientError(
      "unsupported", f"audio {rate!r} Hz {encoding!r}: only {SAMPLE_RATE} Hz {ENCODING} is supported; resample first"
    )


def _finite(value, name: str, lo: float, hi: float, lo_open: bool = False) -> float:
  if isinstance(value, bool) or not isinstance(value, int | float):
    raise ClientError("bad_event", f"{name} must be a number, got {type(value).__name__}")
  if not math.isfinite(value) or value < lo or value > hi or (lo_open and value == lo):
    raise ClientError("bad_value", f"{name}={value} is out of range {'(' if lo_open else '['}{lo}, {hi}]")
  return float(value)


def parse_sampling(given) -> dict:
  """The sampling fields ``given`` changes, checked: temperature in [0, 100], top_p in (0, 1], seed in [0, 2**32)."""
  if not isinstance(given, dict):
    raise ClientError("bad_event", "sampling must be an object")
  unknown = sorted(set(given) - set(SAMPLING_FIELDS))
  if unknown:
    raise ClientError("bad_event", f"unknown sampling fields {unknown}; fields are {', '.join(SAMPLING_FIELDS)}")
  fields = {}
  if "temperature" in given:
    fields["temperature"] = _finite(given["temperature"], "temperature", 0.0, 100.0)
  if "top_p" in given:
    fields["top_p"] = _finite(given["top_p"], "top_p", 0.0, 1.0, lo_open=True)
  if "seed" in given:
    seed = given["seed"]
    if isinstance(seed, bool) or not isinstance(seed, int):
      raise ClientError("bad_event", f"seed must be an integer, got {type(seed).__name__}")
    if not 0 <= seed < 2**32:
      raise ClientError("bad_value", f"seed={seed} is out of range [0, 2**32)")
    fields["seed"] = seed
  return fields


# -- server -> client --------------------------------------------------------------------


def started_event(session: int, video_shape: tuple[int, int], limits: Limits) -> dict:
  """The first frame of every session; ``video_shape`` is the model's (height, width), (0, 0) without video."""
  h, w = video_shape
  return {
    "type": "session.started",
    "protocol": PROTOCOL_VERSION,
    "session": session,
    "tick_ms": TICK_MS,
    "sample_rate": SAMPLE_RATE,
    "samples_per_tick": SAMPLES_PER_TICK,
    "video": {"width": w, "height": h},
    "limits": dataclasses.asdict(limits),
  }


def pong_event(ping_id, turn: int) -> dict:
  return {"type": "pong", "id": ping_id, "turn": turn}


def error_event(error: ClientError) -> dict:
  return {"type": "error", "code": error.code, "message": str(error), "fatal": False}


def tick_event(turn: int, text: str, speaking: bool, user_speaking: bool, user_samples: int) -> dict:
  """A tick without its ``timing`` (added once every session of the tick is rendered)."""
  return {
    "type": "tick",
    "turn": turn,
    "text": text,
    "speaking": speaking,
    "user_speaking": user_speaking,
    "user_audio_ms": round(min(user_samples, SAMPLES_PER_TICK) * 1000 / SAMPLE_RATE),
  }


def tool_call_event(number: int, kind: str, request: str, turn: int) -> dict:
  return {"type": "tool_call", "call": number, "kind": kind, "request": request, "turn": turn}


def tool_result_event(number: int, kind: str, text: str, done: bool, error: str | None, turn: int) -> dict:
  return {"type": "tool_result", "call": number, "kind": kind, "text": text, "done": done, "error": error, "turn": turn}


def audio_frame(pcm16_le: bytes) -> bytes:
  return bytes([AUDIO]) + pcm16_le
