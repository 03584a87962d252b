"""The sessions engine: live sessions in the fixed slots of the one jitted step.

Dimension legend: B slots (the step's batch), n slots of one stream per micro-turn.

A session ``join``s into a free slot (its cache emptied, its micro-turn reset to
0, its sampling settings written into the state) and ``leave``s it (the slot goes
idle: still computed, since shapes are static, but frozen and silent). Joining
and leaving are one small jitted update of the state, so nothing recompiles.
Each ``tick`` runs the step once over all slots. The KV cache persists across
ticks in a ring buffer of ``cache_tokens``, so a session never re-reads its
history and memory does not grow with session length.

Tool calls and delegations found in a session's ``text_out`` go to the tool
runtime and the background worker; their results enter the session's
``text_in`` at the next micro-turns whose slots the caller left free (PAD).
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from interaction import step as step_lib
from interaction import text
from serving.background import silent_inputs
from serving.calls import Call, MarkerParser

CONTEXT_TOKENS = 8192  # text tokens of a session's context kept for the background model
CALL_LOG = 1024  # calls remembered per session (bounded: memory stays constant in session length)


@dataclasses.dataclass(frozen=True)
class Sampling:
  """Per-session sampling settings (data in the step state: changing them never recompiles)."""

  temperature: float = 0.0  # 0 = greedy
  top_p: float = 1.0
  seed: int = 0

  def __post_init__(self):
    if not self.temperature >= 0:
      raise ValueError(f"temperature must be >= 0, got {self.temperature}")
    if not 0 < self.top_p <= 1:
      raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
    if not 0 <= self.seed < 2**32:
      raise ValueError(f"seed must be in [0, 2**32), got {self.seed}")


@dataclasses.dataclass(eq=False)
class Session:
  id: int
  slot: int
  sampling: Sampling
  turn: int = 0  # micro-turns ticked so far
  # The last CALL_LOG tool calls and delegations, in order; open ones also sit in ``open_calls``.
  calls: collections.deque = dataclasses.field(default_factory=lambda: collections.deque(maxlen=CALL_LOG))
  open_calls: list[Call] = dataclasses.field(default_factory=list)
  pending: collections.deque = dataclasses.field(default_factory=collections.deque)  # tokens waiting for text_in
  context: collections.deque = dataclasses.field(default_factory=lambda: collections.deque(maxlen=CONTEXT_TOKENS))
  parser: MarkerParser = dataclasses.field(default_factory=MarkerParser)

  def context_text(self) -> str:
    return text.decode(np.fromiter(self.context, np.int32, len(self.context)))


class EngineFullError(RuntimeError):
  """Every slot holds a session."""


def _set_slot(state, mask_B, seed, temperature, top_p, active):
  # Resets the slot even on leave, so an idle slot holds no trace of its last session.
  return step_lib.reset_slots(state, mask_B, seed_B=seed, temperature_B=temperature, top_p_B=top_p, active_B=active)


def _set_sampling(state, mask_B, seed, temperature, top_p):
  def pick(new, old):
    return jnp.where(mask_B, new.astype(old.dtype), old)

  return state._replace(
    seed=pick(seed, state.seed), temperature=pick(temperature, state.temperature), top_p=pick(top_p, state.top_p)
  )


_SET_SLOT, _SET_SAMPLING = jax.jit(_set_slot), jax.jit(_set_sampling)


class Engine:
  """``slots`` sessions served by one compiled step; see the module docstring."""

  def __init__(
    self,
    cfg,
    graphdef,
    params,
    *,
    slots: int,
    cache_tokens: int,
    tools=None,
    background=None,
    rng_seed: int = 0,
    mesh=None,
    channel=None,
  ):
    if slots < 1:
      raise ValueError(f"slots must be >= 1, got {slots}")
    self.cfg, self.slots, self.mesh = cfg, slots, mesh
    # On several processes the leader's engine sends every device operation to the followers first
    # (``serving.lockstep``); a follower's engine only runs ``run_op``.
    self.channel = channel
    # With a mesh the step owns the shardings: parameters by their logical axes, slots over the batch axes.
    self.step = step_lib.Step(graphdef, cfg, mesh=mesh)
    self.params = params if mesh is None else self.step.place_params(params)
    self.step.check_slots(slots)
    state = step_lib.init_state(cfg, slots, cache_tokens)._replace(active=jnp.zeros((slots,), bool))
    self._set_slot, self._set_sampling = _SET_SLOT, _SET_SAMPLING
    if mesh is not None:
      state = self.step.place_state(state)
      # The state leaves a join or a sampling change laid out as the step takes it (one compiled step).
      out = self.step.state_shardings
      self._set_slot = jax.jit(_set_slot, out_shardings=out)
      self._set_sampling = jax.jit(_set_sampling, out_shardings=out)
    else:
      devices = {d for leaf in jax.tree.leaves(params) for d in leaf.devices()}
      if len(devices) == 1:  # committed like every state the step returns, else the second tick recompiles
        state = jax.device_put(state, devices.pop())
    self.state = state
    self.rng = jax.random.key(rng_seed)
    self.tools, self.background = tools, background
    self.sessions: dict[int, Session] = {}
    self._ids = itertools.count()
    self.in_specs = cfg.directed("in")
    text_in, text_out = cfg.stream("text", "in", optional=True), cfg.stream("text", "out", optional=True)
    self.text_in = text_in.name if text_in else None
    self.text_out = text_out.name if text_out else None

  @classmethod
  def from_loaded(cls, loaded, *, slots: int, **kw) -> Engine:
    """An engine over a ``interaction.ckpt.open_model`` result."""
    kw.setdefault("cache_tokens", loaded.cache_tokens)
    return cls(loaded.cfg, loaded.graphdef, loaded.params, slots=slots, **kw)

  # -- sessions -----------------------------------------------------------------

  def _apply(self, op: str, **arrays):
    """Run one device operation on the state (on several processes: every process runs it)."""
    arrays = {k: np.asarray(v) for k, v in arrays.items()}
    if self.channel is not None:
      index = self.channel.send(op, arrays)
    out = self.run_op(op, arrays)
    if self.channel is not None and op == "step":
      out = jax.device_get(out)  # the step is a collective: every follower has read the operations up to it
      self.channel.forget(index + 1)
    return out

  def run_op(self, op: str, arrays: dict[str, np.ndarray]):
    """One device operation: ``set_slot`` and ``set_sampling`` update the state; ``step`` returns the outputs."""
    if op == "step":
      self.state, out = self.step(self.params, self.state, arrays, self.rng)
      return out
    if op == "set_slot":
      keys = ("mask", "seed", "temperature", "top_p", "active")
      self.state = self._set_slot(self.state, *(arrays[k] for k in keys))
    elif op == "set_sampling":
      self.state = self._set_sampling(self.state, *(arrays[k] for k in ("mask", "seed", "temperature", "top_p")))
    else:
      raise ValueError(f"unknown engine operation {op!r}")
    return None

  def _update_slot(self, slot: int, sampling: Sampling, active: bool) -> None:
    self._apply(
      "set_slot",
      mask=np.arange(self.slots) == slot,
      seed=np.uint32(sampling.seed),
      temperature=np.float32(sampling.temperature),
      top_p=np.float32(sampling.top_p),
      active=np.bool_(active),
    )

  def join(self, sampling: Sampling = Sampling()) -> Session:
    """A new session in the lowest free slot, with an empty cache at micro-turn 0."""
    used = {s.slot for s in self.sessions.values()}
    free = [i for i in range(self.slots) if i not in used]
    if not free:
      raise EngineFullError(f"all {self.slots} slots hold a session")
    session = Session(next(self._ids), free[0], sampling)
    self._update_slot(session.slot, sampling, True)
    self.sessions[session.id] = session
    return session

  def leave(self, session: Session | int) -> None:
    """Free the session's slot; its pending calls are dropped."""
    session = self.sessions.pop(self._live(session).id)
    for call in session.open_calls:
      call.cancel()
    self._update_slot(session.slot, Sampling(), False)

  def configure(self, session: Session | int, sampling: Sampling) -> None:
    """New sampling settings from the next tick on; the session's cache and micro-turn are kept."""
    session = self._live(session)
    session.sampling = sampling
    self._apply(
      "set_sampling",
      mask=np.arange(self.slots) == session.slot,
      seed=np.uint32(sampling.seed),
      temperature=np.float32(sampling.temperature),
      top_p=np.float32(sampling.top_p),
    )

  def say(self, session: Session | int, message: str) -> None:
    """Queue the user's typed text for the session's ``text_in`` (PAD slots, in order, after earlier text)."""
    if self.text_in is None:
      raise ValueError("this model has no text_in stream")
    self._live(session).pending.extend(text.encode(message).tolist())

  def _live(self, session: Session | int) -> Session:
    sid = session if isinstance(session, int) else session.id
    if sid not in self.sessions:
      raise KeyError(f"no live session {sid}")
    return self.sessions[sid]

  # -- ticks --------------------------------------------------------------------

  def _inputs(self, inputs: Mapping[int, Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    unknown = sorted(set(inputs) - set(self.sessions))
    if unknown:
      raise KeyError(f"inputs for sessions {unknown} that are not live; live sessions are {sorted(self.sessions)}")
    batch = silent_inputs(self.cfg, self.slots)
    for sid, session in self.sessions.items():
      given = inputs.get(sid, {})
      extra = sorted(set(given) - {s.name for s in self.in_specs})
      if extra:
        raise ValueError(f"session {sid}: unknown input streams {extra}; inputs are {[s.name for s in self.in_specs]}")
      for spec in self.in_specs:
        if spec.name in given:
          value = np.asarray(given[spec.name])
          if value.shape != (spec.slots, *spec.value_shape):
            raise ValueError(
              f"session {sid}: stream {spec.name!r} expects shape {(spec.slots, *spec.value_shape)}, got {value.shape}"
            )
          batch[spec.name][session.slot] = value
      if self.text_in is not None:
        self._fill_free_slots(session, batch[self.text_in][session.slot])
    return batch

  def _fill_free_slots(self, session: Session, row_n: np.ndarray) -> None:
    """Deliver ready call results into the PAD slots of this micro-turn's text_in, in order."""
    for call in session.open_calls:
      source = self.tools if call.kind == "tool" else self.background
      if (tokens := call.take(session.turn, getattr(source, "hold_ticks", 0))) is not None:
        session.pending.extend(tokens.tolist())
    session.open_calls = [c for c in session.open_calls if not c.closed]
    for i in np.flatnonzero(row_n == text.PAD):
      if not session.pending:
        break
      row_n[i] = session.pending.popleft()

  def tick(self, inputs: Mapping[int, Mapping[str, np.ndarray]] | None = None) -> dict[int, step_lib.TurnOutputs]:
    """One micro-turn for every live session; missing streams are silence.

    ``inputs`` maps session ids to ``{stream: [slots, ...]}``. Returns per session
    its row of the step's ``TurnOutputs`` (host arrays), whose ``values`` also hold
    the ``text_in`` it was actually fed (call results included).
    """
    batch = self._inputs(inputs or {})
    out = jax.device_get(self._apply("step", **batch))
    results = {}
    for sid, session in self.sessions.items():
      mine = out.row(session.slot)
      if self.text_in is not None:
        fed = batch[self.text_in][session.slot]
        mine = mine._replace(values={**mine.values, self.text_in: fed})
        session.context.extend(fed[fed != text.PAD].tolist())
      if self.text_out is not None:
        said = mine.values[self.text_out]
        session.context.extend(said[said != text.PAD].tolist())
        for kind, request in session.parser.feed(said):
          self._submit(session, kind, request)
      session.turn += 1
      results[sid] = mine
    return results

  def _submit(self, session: Session, kind: str, request: str) -> None:
    source = self.tools if kind == "tool" else self.background
    if source is None:
      call = Call(session.id, kind, request, session.turn, 0.0)
      call.finish(f"no {'tool runtime' if kind == 'tool' else 'background model'} in this engine")
    else:
      call = source.submit(session.id, request, session.turn, session.context_text())
    session.calls.append(call)
    session.open_calls.append(call)

  def close(self) -> None:
    if self.channel is not None:
      self.channel.send("stop", {})  # the followers return from ``lockstep.follow``
      self.channel = None
    for source in (self.tools, self.background):
      if source is not None:
        source.close()


def open_engine(checkpoint, slots: int, mesh: dict | None = None, *, channel=None, follower: bool = False) -> Engine:
  """The live server's engine over ``checkpoint`` (anything ``open_model`` opens), with the tool runtime and
  the arithmetic background model; ``mesh`` (axis sizes) lays parameters and slots out over the devices
  (of every process). On several processes the leader's engine gets the lockstep ``channel``; a
  ``follower``'s engine has no tools (it only runs the leader's operations)."""
  from interaction import sharding
  from interaction.ckpt import open_model
  from serving.background import ArithmeticBackground, BackgroundWorker
  from serving.tools import ToolRuntime

  mesh = sharding.make_mesh(mesh) if mesh else None
  loaded = open_model(checkpoint, mesh=mesh)
  if follower:
    return Engine.from_loaded(loaded, slots=slots, mesh=mesh)
  tools, background = ToolRuntime(), BackgroundWorker(ArithmeticBackground())
  return Engine.from_loaded(loaded, slots=slots, tools=tools, background=background, mesh=mesh, channel=channel)
