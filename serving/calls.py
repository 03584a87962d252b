"""Asynchronous calls whose results stream back into a session's ``text_in``.

A ``Call`` is one tool call or one delegation to the background model. Workers
(thread pool or the background model's thread) ``emit`` text chunks and
``finish``; the engine ``take``s the tokens that are ready at each tick. Nothing
here blocks a tick except an explicit ``hold_ticks`` (the evaluator's simulated
latency, which makes arrival ticks deterministic).

``MarkerParser`` finds the calls in a session's ``text_out`` token stream.
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


class MarkerParser:
  """Finds ``<tool>..</tool>`` and ``<delegate>..</delegate>`` requests in a stream of text_out tokens."""

  def __init__(self):
    self.kind: str | None = None
    self.buf = bytearray()

  def feed(self, tokens) -> list[tuple[str, str]]:
    """(kind, request text) of every call closed by ``tokens``."""
    done = []
    for tok in np.asarray(tokens).reshape(-1).tolist():
      for kind, (start, end, _, _) in MARKERS.items():
        if tok == start:  # a new start abandons an unfinished call
          self.kind, self.buf = kind, bytearray()
        elif tok == end and self.kind == kind:
          done.append((kind, self.buf.decode("utf-8", errors="replace")))
          self.kind = None
      if self.kind is not None and tok < text.NUM_BYTES:
        self.buf.append(tok)
        if len(self.buf) > MAX_CALL_BYTES:
          self.kind = None
    return done
