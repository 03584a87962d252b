"""Asynchronous calls whose results stream back into a session's ``text_in``.

A ``Call`` is one tool call or one delegation to the background model. Workers
(thread pool or the background model's thread) ``emit`` text chunks and
``finish``; the engine ``take``s the tokens that are ready at each tick. Nothing
here blocks a tick except an explicit ``hold_ticks`` (the evaluator's simulated
latency, which makes arrival ticks deterministic).

``TextOutDecoder`` is the one marker-aware reading of a session's ``text_out``:
what the model says and the calls it makes; ``MarkerParser`` is the engine's
view of it (the calls only).
"""

from __future__ import annotations

import dataclasses
import threading
import time

import numpy as np

from interaction import text

# Bytes inside one marker pair before the parser gives up on it: bounds memory on a runaway call.
MAX_CALL_BYTES = 512

MARKERS = {
  "tool": (text.TOOL_CALL_START, text.TOOL_CALL_END, text.TOOL_RESULT_START, text.TOOL_RESULT_END),
  "background": (text.DELEGATE_START, text.DELEGATE_END, text.BACKGROUND_RESULT_START, text.BACKGROUND_RESULT_END),
}


@dataclasses.dataclass
class Call:
  """One request and its streamed result; ticks are the session's micro-turns."""

  session: int
  kind: str  # "tool" or "background"
  request: str
  tick: int  # micro-turn whose text_out closed the call
  deadline: float  # seconds of wall time
  started: float = dataclasses.field(default_factory=time.monotonic)
  result: str = ""  # text delivered so far
  error: str | None = None
  first_tick: int | None = None  # micro-turn whose text_in received the result's first token
  end_tick: int | None = None  # micro-turn the end marker was queued for delivery
  _chunks: list = dataclasses.field(default_factory=list, repr=False)
  _taken: int = dataclasses.field(default=0, repr=False)
  _finished: threading.Event = dataclasses.field(default_factory=threading.Event, repr=False)
  _lock: threading.Lock = dataclasses.field(default_factory=threading.Lock, repr=False)

  @property
  def closed(self) -> bool:
    return self.end_tick is not None

  @property
  def ok(self) -> bool:
    return self.closed and self.error is None

  # -- worker side --------------------------------------------------------------

  def emit(self, chunk: str) -> None:
    with self._lock:
      if not self.closed:
        self._chunks.append(chunk)

  def finish(self, error: str | None = None) -> None:
    with self._lock:
      if not self._finished.is_set():
        self.error = self.error or error
        self._finished.set()

  # -- engine side ----------------------------------------------------------------

  def cancel(self) -> None:
    """Drop the call (its session left); workers stop emitting into it."""
    with self._lock:
      if not self.closed:
        self.error, self.end_tick = "cancelled", -1
        self._finished.set()

  def take(self, tick: int, hold_ticks: int = 0) -> np.ndarray | None:
    """Tokens ready to enter text_in at ``tick`` (markers included), or None."""
    if self.closed or tick < self.tick + hold_ticks:
      return None
    if hold_ticks and tick == self.tick + hold_ticks and not self._finished.is_set():
      self._finished.wait(max(0.0, self.started + self.deadline - time.monotonic()))
    with self._lock:
      finished = self._finished.is_set()
      if not finished and time.monotonic() > self.started + self.deadline:
        self.error = f"deadline of {self.deadline:g} s exceeded"
        finished = True
      new, self._taken = self._chunks[self._taken :], len(self._chunks)
      pieces = new + ([f"error: {self.error}"] if finished and self.error else [])
      if not pieces and not finished:
        return None
      start, end = MARKERS[self.kind][2:]
      ids = [text.encode(p) for p in pieces]
      if self.first_tick is None:
        ids.insert(0, np.array([start], np.int32))
        self.first_tick = tick
      if finished:
        ids.append(np.array([end], np.int32))
        self.end_tick = tick
        self._finished.set()
      self.result += "".join(pieces)
      return np.concatenate(ids)


_STARTS = {start: kind for kind, (start, _, _, _) in MARKERS.items()}
_ENDS = {end: kind for kind, (_, end, _, _) in MARKERS.items()}


@dataclasses.dataclass(frozen=True)
class TextOut:
  """What a stretch of ``text_out`` holds."""

  spoken: bytes  # the bytes outside marker pairs, in order (UTF-8, possibly split mid-character)
  breaks: tuple[int, ...]  # offsets into ``spoken`` where a marker stood: a word ends there
  calls: tuple[tuple[str, str], ...]  # (kind, request text) of every call closed in the stretch


class TextOutDecoder:
  """Reads ``text_out`` token by token, across ticks; the state carries over between ``decode`` calls.

  Two rules, as the data lays calls out:

  - speech: bytes outside marker pairs; any start marker (``<tool>``, ``<delegate>``) opens a pair and
    any end marker closes it;
  - calls: a start marker opens a request of its kind (abandoning an unfinished one), its own end marker
    closes it; a request longer than ``MAX_CALL_BYTES`` is abandoned (bounds memory on a runaway call).

  They differ only on streams the data never holds (an end marker of the other kind closes the speech
  gap but not the request).
  """

  def __init__(self):
    self.inside = False  # between a start and an end marker: bytes are not speech
    self.kind: str | None = None  # the kind of the request being read
    self.buf = bytearray()

  def decode(self, tokens) -> TextOut:
    spoken, breaks, calls = bytearray(), [], []
    for tok in np.asarray(tokens).reshape(-1).tolist():
      if tok < text.NUM_BYTES:
        if not self.inside:
          spoken.append(tok)
        if self.kind is not None:
          self.buf.append(tok)
          if len(self.buf) > MAX_CALL_BYTES:
            self.kind = None
      elif tok in _STARTS:
        self.inside, self.kind, self.buf = True, _STARTS[tok], bytearray()
        breaks.append(len(spoken))
      elif tok in _ENDS:
        self.inside = False
        breaks.append(len(spoken))
        if self.kind == _ENDS[tok]:
          calls.append((self.kind, self.buf.decode("utf-8", errors="replace")))
          self.kind = None
    return TextOut(bytes(spoken), tuple(breaks), tuple(calls))


class MarkerParser(TextOutDecoder):
  """Finds ``<tool>..</tool>`` and ``<delegate>..</delegate>`` requests in a stream of text_out tokens."""

  def feed(self, tokens) -> list[tuple[str, str]]:
    """(kind, request text) of every call closed by ``tokens``."""
    return list(self.decode(tokens).calls)
