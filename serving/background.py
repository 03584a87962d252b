"""The background model: answers delegated requests on its own worker thread.

When the interaction model writes ``<delegate>request</delegate>``, the engine
hands the request and the session's context to ``BackgroundWorker.submit``.
One worker thread runs the background model's ``generate(request, context)``,
whose chunks stream back between ``<background>`` markers into the session's
free ``text_in`` slots. If it raises or misses its deadline, the session gets
an ``error: ...`` result and goes on.

Models:
- ``CheckpointBackground``: a second interaction-model checkpoint with its own
  config, parameters and jitted step; it reads the context as ``text_in`` and
  its ``text_out`` is the answer.
- ``ArithmeticBackground``: a rule-based stand-in answering "what is a times b"
  (the synthetic delegation task) until a trained background model exists.
"""

from __future__ import annotations

import queue
import re
import threading
from collections.abc import Iterator
from typing import Protocol

import jax
import numpy as np

from interaction import layout, text
from interaction import step as step_lib
from interaction.ckpt import open_model
from serving.calls import Call

DEFAULT_DEADLINE = 10.0  # seconds


class BackgroundModel(Protocol):
  def generate(self, request: str, context: str) -> Iterator[str]: ...


class ArithmeticBackground:
  """Answers ``what is A times|plus|minus B`` as ``the answer is N``."""

  _Q = re.compile(r"what is (-?\d+) (times|plus|minus) (-?\d+)")

  def generate(self, request: str, context: str) -> Iterator[str]:
    m = self._Q.search(request)
    if not m:
      raise ValueError(f"cannot answer {request!r}")
    a, op, b = int(m.group(1)), m.group(2), int(m.group(3))
    yield f"the answer is {a * b if op == 'times' else a + b if op == 'plus' else a - b}"


class CheckpointBackground:
  """A second model from its own checkpoint: context in on ``text_in``, answer out of ``text_out``."""

  def __init__(self, path, *, max_turns: int = 64, silent_turns: int = 3, seed: int = 0):
    self.loaded = open_model(path)
    self.cfg = self.loaded.cfg
    self.step = step_lib.Step(self.loaded.graphdef, self.cfg)
    self.max_turns, self.silent_turns, self.rng = max_turns, silent_turns, jax.random.key(seed)
    self.text_in, self.text_out = self.cfg.stream("text", "in"), self.cfg.stream("text", "out")

  def _silence(self, ids: np.ndarray) -> dict[str, np.ndarray]:
    out = silent_inputs(self.cfg, 1)
    out[self.text_in.name][0, : len(ids)] = ids
    return out

  def generate(self, request: str, context: str) -> Iterator[str]:
    state = step_lib.init_state(self.cfg, 1, self.loaded.cache_tokens, temperature=0.0)
    prompt = np.concatenate([text.encode(context), [text.DELEGATE_START], text.encode(request), [text.DELEGATE_END]])
    n = self.text_in.slots
    # Feed the prompt; only the tail that fits the attention window can matter.
    keep = (self.cfg.attention_window // layout.tokens_per_turn(self.cfg.streams)) * n
    prompt = prompt[-keep:].astype(np.int32)
    for i in range(0, len(prompt), n):
      state, _ = self.step(self.loaded.params, state, self._silence(prompt[i : i + n]), self.rng)
    spoke, quiet = False, 0
    for _ in range(self.max_turns):
      state, out = self.step(self.loaded.params, state, self._silence(np.zeros(0, np.int32)), self.rng)
      ids = np.asarray(out.values[self.text_out.name])[0]
      said = ids[ids < text.NUM_BYTES]
      if len(said):
        spoke, quiet = True, 0
        yield text.decode(said)
      elif spoke:
        quiet += 1
        if quiet >= self.silent_turns:
          return


def silent_inputs(cfg, batch: int) -> dict[str, np.ndarray]:
  """Every input stream silent (``StreamSpec.silence``: lowest mel value, black frames, PAD text); [batch, slots, ...]."""
  return {s.name: np.full((batch, s.slots, *s.value_shape), s.silence, s.dtype) for s in cfg.directed("in")}


class BackgroundWorker:
  """One worker thread running the background model for every session, in request order."""

  kind = "background"

  def __init__(self, model: BackgroundModel, *, deadline: float = DEFAULT_DEADLINE, hold_ticks: int = 0):
    self.model, self.deadline, self.hold_ticks = model, deadline, hold_ticks
    self._requests: queue.Queue = queue.Queue()
    self._thread = threading.Thread(target=self._run, name="background-model", daemon=True)
    self._thread.start()

  def submit(self, session: int, request: str, tick: int, context: str = "") -> Call:
    call = Call(session, self.kind, request, tick, self.deadline)
    self._requests.put((call, context))
    return call

  def _run(self) -> None:
    while (item := self._requests.get()) is not None:
      call, context = item
      try:
        for chunk in self.model.generate(call.request, context):
          if call.closed:  # past its deadline or its session left: stop spending compute on it
            break
          call.emit(chunk)
        call.finish()
      except Exception as e:  # a crashed background model must not take the session down
        call.finish(f"background model failed: {type(e).__name__}: {e}")

  def close(self) -> None:
    self._requests.put(None)
