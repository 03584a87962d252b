"""The micro-turn step: one jit-compiled, fixed-shape call per 200 ms tick.

Dimension legend: B session slots, n slots of one stream, S_in input tokens per
micro-turn, D d_model, V text vocabulary, C mel channels.

``step(params, state, turn_inputs, rng, forced=None) -> (state, TurnOutputs)``
appends the input block to each slot's KV cache, then generates the output
block slot by slot (a fixed-length loop), calling the same ``forward`` as
training. Every shape is static, so it compiles once and runs for any number of
ticks; the cache is a ring buffer, so memory is constant in session length.

Sampling is per slot and data: ``temperature`` (0 = greedy), ``top_p`` and
``seed`` live in the state, and so does ``active``: an idle slot (no session)
is still computed, since shapes are static, but its micro-turn does not advance
and its outputs are silence (PAD text, the lowest mel value). A slot's randomness depends only on its seed, its
micro-turn index and the ``rng`` argument, never on which batch slot it sits in.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from interaction import layout, sharding, text
from interaction.ckpt.params import abstract_model
from interaction.config import ModelConfig
from interaction.model import CACHE_AXES, InteractionModel, KVCache, init_cache


class StepState(NamedTuple):
  cache: KVCache
  turn: jax.Array  # [B] int32: the micro-turn the next tick processes
  temperature: jax.Array  # [B] float32, 0 = greedy
  top_p: jax.Array  # [B] float32 in (0, 1]
  seed: jax.Array  # [B] uint32
  active: jax.Array  # [B] bool: False for an idle slot


# The state's logical axes (sharding.tree_shardings): every session array is split over the batch axes.
STATE_AXES = StepState(CACHE_AXES, ("batch",), ("batch",), ("batch",), ("batch",), ("batch",))


def init_state(cfg: ModelConfig, slots: int, cache_tokens: int, *, temperature=1.0, top_p=1.0) -> StepState:
  """An empty state for ``slots`` sessions with a ring buffer of ``cache_tokens``."""
  check_capacity(cfg, cache_tokens)
  return StepState(
    cache=init_cache(cfg, slots, cache_tokens),
    turn=jnp.zeros((slots,), jnp.int32),
    temperature=jnp.full((slots,), temperature, jnp.float32),
    top_p=jnp.full((slots,), top_p, jnp.float32),
    seed=jnp.arange(slots, dtype=jnp.uint32),
    active=jnp.ones((slots,), bool),
  )


def check_capacity(cfg: ModelConfig, cache_tokens: int) -> None:
  if cache_tokens < cfg.attention_window:
    raise ValueError(
      f"cache_tokens={cache_tokens} is smaller than the attention window ({cfg.attention_window} tokens); "
      "the step would forget tokens the training forward attends to"
    )
  if cache_tokens < layout.tokens_per_turn(cfg.streams):
    raise ValueError(f"cache_tokens={cache_tokens} must hold at least one micro-turn")


def reset_slots(state: StepState, mask_B, *, seed_B=None, temperature_B=None, top_p_B=None, active_B=None) -> StepState:
  """Empty the caches of the slots in ``mask_B`` and restart them at micro-turn 0."""
  mask_B = jnp.asarray(mask_B, bool)
  cache = state.cache._replace(pos=jnp.where(mask_B[:, None], -1, state.cache.pos))

  def pick(new, old):
    return old if new is None else jnp.where(mask_B, jnp.asarray(new, old.dtype), old)

  return StepState(
    cache=cache,
    turn=jnp.where(mask_B, 0, state.turn),
    temperature=pick(temperature_B, state.temperature),
    top_p=pick(top_p_B, state.top_p),
    seed=pick(seed_B, state.seed),
    active=pick(active_B, state.active),
  )


def greedy_text(logits_BV):
  """The greedy choice: silence (PAD) when it holds at least half the mass, else the likeliest byte or marker.

  A plain argmax is biased towards silence whenever what to say is uncertain: at the
  moment to answer, "speak" may hold 0.8 of the mass spread over twenty first letters
  while PAD holds 0.2, and argmax picks PAD, tick after tick. Deciding speak-or-silent
  on the total mass first is the deterministic counterpart of sampling, which speaks
  with probability 1 - p(PAD).
  """
  logp_BV = jax.nn.log_softmax(logits_BV, axis=-1)
  speak_B = jnp.argmax(logp_BV.at[:, text.PAD].set(-jnp.inf), axis=-1)
  return jnp.where(logp_BV[:, text.PAD] >= jnp.log(0.5), text.PAD, speak_B)


def sample_text(logits_BV, temperature_B, top_p_B, keys_B, greedy_B=None):
  """Per-row temperature / nucleus sampling; temperature 0 is greedy (``greedy_text``, or ``greedy_B`` if given)."""
  greedy_B = greedy_text(logits_BV) if greedy_B is None else greedy_B
  scaled = logits_BV / jnp.maximum(temperature_B, 1e-6)[:, None]
  probs = jax.nn.softmax(scaled, axis=-1)
  sorted_p = -jnp.sort(-probs, axis=-1)
  # The smallest set whose mass reaches top_p: keep tokens whose preceding mass is below it.
  before = jnp.cumsum(sorted_p, axis=-1) - sorted_p
  kept = jnp.sum(before < top_p_B[:, None], axis=-1)
  threshold = jnp.take_along_axis(sorted_p, (kept - 1)[:, None], axis=-1)
  masked = jnp.where(probs >= threshold, scaled, -jnp.inf)
  sampled_B = jax.vmap(jax.random.categorical)(keys_B, masked)
  return jnp.where(temperature_B > 0, sampled_B, greedy_B).astype(jnp.int32)


def slot_keys(rng, state: StepState, stream_index: int, slot):
  """Per-row key for one output slot: from the rng, the row's seed and micro-turn."""

  def one(seed, turn):
    return jax.random.fold_in(
      jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(rng, seed), turn), stream_index), slot
    )

  return jax.vmap(one)(state.seed, state.turn)


def flow_noise(keys_B, channels: int, temperature_B):
  """The Gaussian noise a mel slot's Euler integration starts from, with standard deviation sqrt(temperature).

  Temperature tau scales a Gaussian's log-density by 1/tau, i.e. its variance by tau:
  the same knob as the text logits'. At 0 (greedy) the flow starts from the prior's
  mean and is deterministic; full-noise sampling voices stray frames where the model
  hesitates between silence and speech, which greedy text would not do.
  """
  unit = jax.vmap(lambda k: jax.random.normal(k, (channels,)))(keys_B)
  return unit * jnp.sqrt(jnp.maximum(temperature_B, 0.0))[:, None]


def step_fn(model: InteractionModel, state: StepState, turn_inputs, rng, forced=None, *, unroll: bool = False):
  """One micro-turn for every slot (call through ``Step`` for jit + checks).

  ``unroll`` writes the loop over an output stream's slots out in full. On TPU that lets the KV cache
  be updated in place: carried through a loop, the compiler keeps a second copy of it (6.5 of the 15.2
  GiB of temporaries of the 276B config's v5p-16 serve step). XLA:CPU compiles the loop faster and
  gains nothing from unrolling, so ``Step`` unrolls for accelerators only; the arithmetic is the same.
  """
  cfg = model.cfg
  s_turn = layout.tokens_per_turn(cfg.streams)
  turn_B1 = state.turn[:, None]
  x_BSD = model.embed_block({k: v[:, None] for k, v in turn_inputs.items()}, turn_B1, "in")[:, 0]
  pos_BS = turn_B1 * s_turn + jnp.arange(x_BSD.shape[1])[None, :]
  h_BSD, cache, _ = model.forward(x_BSD, pos_BS, state.cache)
  h_BD = h_BSD[:, -1]
  next_pos_B = pos_BS[:, -1] + 1
  values, logprobs, greedy = {}, {}, {}
  for index, spec in enumerate(model.order):
    if spec.direction != "out":
      continue
    given = None if forced is None else jnp.swapaxes(forced[spec.name], 0, 1)

    def body(carry, xs, spec=spec, index=index):
      h_BD, cache, pos_B = carry
      slot, given_B = xs
      keys_B = slot_keys(rng, state, index, slot)
      if spec.kind == "text":
        logp_BV = jax.nn.log_softmax(model.text_logits(h_BD), axis=-1)
        greedy_B = greedy_text(logp_BV)
        value_B = sample_text(logp_BV, state.temperature, state.top_p, keys_B, greedy_B) if given_B is None else given_B
        score_B = (jnp.take_along_axis(logp_BV, value_B[:, None], axis=-1)[:, 0], greedy_B)
      else:
        noise = flow_noise(keys_B, spec.mel_channels, state.temperature)
        value_B = model.flow_heads[spec.name].sample(h_BD, noise, cfg.flow_steps) if given_B is None else given_B
        score_B = value_B
      x_B1D = model.embed_stream(spec.name, value_B[:, None, None], slot, state.turn[:, None])[:, 0]
      h_B1D, cache, _ = model.forward(x_B1D, pos_B[:, None], cache)
      return (h_B1D[:, 0], cache, pos_B + 1), (value_B, score_B)

    (h_BD, cache, next_pos_B), (values_nB, scores) = jax.lax.scan(
      body, (h_BD, cache, next_pos_B), (jnp.arange(spec.slots), given), unroll=unroll
    )
    values[spec.name] = jnp.swapaxes(values_nB, 0, 1)
    if spec.kind == "text":
      logprobs[spec.name] = jnp.swapaxes(scores[0], 0, 1)
      greedy[spec.name] = jnp.swapaxes(scores[1], 0, 1).astype(jnp.int32)
  outputs = TurnOutputs(mask_idle(model, state, values), logprobs, greedy)
  return state._replace(cache=cache, turn=state.turn + state.active.astype(jnp.int32)), outputs


class TurnOutputs(NamedTuple):
  """What one tick gives back, each ``{stream name: [B, n, ...]}`` (a pytree: ``jax.tree.map`` slices rows).

  ``values``: every output stream's tokens or mel frames (silence for idle slots). ``logprobs``
  (text output streams): the log-probability of each slot's token, sampled or forced. ``greedy``
  (text output streams): the greedy choice (``greedy_text``) at each slot, whatever was sampled.
  """

  values: dict
  logprobs: dict
  greedy: dict

  def row(self, index) -> TurnOutputs:
    """One slot's outputs (``index`` into the batch axis)."""
    return jax.tree.map(lambda x: x[index], self)


def mask_idle(model: InteractionModel, state: StepState, values):
  """Silence for idle slots (each stream spec's ``silence``), so nothing downstream mistakes their values for speech.

  Log-probs and greedy choices are left as computed: they describe the model, not what was emitted.
  """
  masked = {}
  for name, value in values.items():
    keep = state.active.reshape((-1,) + (1,) * (value.ndim - 1))
    masked[name] = jnp.where(keep, value, jnp.asarray(model.cfg.spec(name).silence, value.dtype))
  return masked


class Step:
  """The jitted step with input checks done on the host before any device work.

  ``Step(graphdef, cfg, mesh=None, rules=None)(params, state, turn_inputs, rng, forced=None)``.
  The state is donated: the caller must use the returned one.

  With a ``mesh`` the step owns every sharding: parameters by their logical axes, the
  state by ``STATE_AXES`` (slots over the batch axes), turn inputs and outputs split
  over the batch axes, the key replicated; ``rules`` default to the config's. The
  same object serves live sessions, the evaluation job and ``launch.aot --job serve``
  (``lower``): there is no second jit of the step.
  """

  def __init__(self, graphdef, cfg: ModelConfig, *, mesh=None, rules=None):
    self.cfg, self.mesh = cfg, mesh
    self.rules = cfg.rules if rules is None else rules
    self.inputs, self.outputs = cfg.directed("in"), cfg.directed("out")

    platform = jax.default_backend() if mesh is None else mesh.devices.flat[0].platform
    self.unroll = platform != "cpu"

    def run(params, state, turn_inputs, rng, forced):
      return step_fn(nnx.merge(graphdef, params), state, turn_inputs, rng, forced, unroll=self.unroll)

    if mesh is None:
      self._jitted = jax.jit(run, donate_argnums=(1,))
      return
    _, abstract = abstract_model(cfg)
    self.param_shardings = nnx.to_pure_dict(sharding.param_shardings(abstract, mesh, self.rules))
    self.batch_sharding = NamedSharding(mesh, P(sharding.logical_to_spec(("batch",), mesh, self.rules)[0]))
    self.state_shardings = jax.tree.map(
      lambda names: NamedSharding(mesh, sharding.logical_to_spec(names, mesh, self.rules)),
      STATE_AXES,
      is_leaf=sharding.is_axes,
    )
    replicated = self.replicated = NamedSharding(mesh, P())
    # Across processes (multi-controller) every process runs this step on the same host inputs, which
    # become global arrays here, and gets every slot's outputs back (replicated: a few KB per tick).
    self.multiprocess = any(d.process_index != jax.process_index() for d in mesh.devices.flat)
    out_sharding = replicated if self.multiprocess else self.batch_sharding
    self._jitted = jax.jit(
      run,
      in_shardings=(self.param_shardings, self.state_shardings, self.batch_sharding, replicated, self.batch_sharding),
      out_shardings=(self.state_shardings, out_sharding),
      donate_argnums=(1,),
    )

  def batch_shards(self) -> int:
    """How many ways the slots are split (1 without a mesh)."""
    if self.mesh is None:
      return 1
    axes = self.batch_sharding.spec[0] or ()
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    return math.prod(self.mesh.shape[a] for a in axes)

  def check_slots(self, slots: int) -> None:
    """Raise ValueError when ``slots`` cannot be split over the mesh's batch axes."""
    shards = self.batch_shards()
    if slots % shards:
      raise ValueError(
        f"slots={slots} cannot be split over the mesh's batch axes ({shards} ways: "
        f"{ {k: v for k, v in self.mesh.shape.items() if v > 1} }); use a multiple of {shards} slots or a mesh with fewer batch shards"
      )

  def init_state(self, slots: int, cache_tokens: int, **kw) -> StepState:
    """``init_state`` placed where the step wants it (on the mesh, slots over the batch axes)."""
    self.check_slots(slots)
    return self.place_state(init_state(self.cfg, slots, cache_tokens, **kw))

  def abstract_state(self, slots: int, cache_tokens: int) -> StepState:
    """The state as ShapeDtypeStructs carrying the step's shardings (every dim checked to divide); for ``lower``."""
    self.check_slots(slots)
    shapes = jax.eval_shape(lambda: init_state(self.cfg, slots, cache_tokens))
    if self.mesh is None:
      return shapes
    checked = sharding.tree_shardings(shapes, STATE_AXES, self.mesh, self.rules)
    return jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), shapes, checked)

  def place_state(self, state: StepState) -> StepState:
    """A state on the step's shardings (a no-op without a mesh)."""
    return state if self.mesh is None else jax.device_put(state, self.state_shardings)

  def place_params(self, params) -> dict:
    """Parameters (a pure dict or an nnx State) on the step's shardings (a no-op where they are already)."""
    params = params if isinstance(params, dict) else nnx.to_pure_dict(params)
    return params if self.mesh is None else jax.device_put(params, self.param_shardings)

  def lower(self, params, state, turn_inputs, rng, forced=None):
    """The step lowered for ahead-of-time compilation (arguments may be ShapeDtypeStructs)."""
    params = params if isinstance(params, dict) else nnx.to_pure_dict(params)
    if self.mesh is None:
      return self._jitted.lower(params, state, turn_inputs, rng, forced)
    with jax.set_mesh(self.mesh):
      return self._jitted.lower(params, state, turn_inputs, rng, forced)

  def check(self, state: StepState, turn_inputs, forced=None) -> None:
    """Raise ValueError naming the stream when an input does not match the layout."""
    slots = state.turn.shape[0]
    if not isinstance(turn_inputs, dict):
      raise ValueError(f"turn_inputs must be a dict of input streams, got {type(turn_inputs).__name__}")
    extra = sorted(set(turn_inputs) - {s.name for s in self.inputs})
    if extra:
      raise ValueError(f"turn_inputs has unknown streams {extra}; input streams are {[s.name for s in self.inputs]}")
    layout.check_window(self.inputs, turn_inputs, batch_dims=1)
    for spec in self.inputs:
      if turn_inputs[spec.name].shape[0] != slots:
        raise ValueError(f"stream {spec.name!r}: batch {turn_inputs[spec.name].shape[0]} != the state's {slots} slots")
    if forced is not None:
      layout.check_window(self.outputs, forced, batch_dims=1)

  def __call__(self, params, state: StepState, turn_inputs, rng, forced=None):
    self.check(state, turn_inputs, forced)
    if self.mesh is None:
      return self._jitted(params, state, turn_inputs, rng, forced)
    params = params if isinstance(params, dict) else nnx.to_pure_dict(params)
    if self.multiprocess:
      turn_inputs, forced = self.global_array(turn_inputs), self.global_array(forced)
      rng = self.global_key(rng)
    with jax.set_mesh(self.mesh):
      return self._jitted(params, state, turn_inputs, rng, forced)

  def global_array(self, tree, sharding=None):
    """Host arrays that hold the same values on every process -> global arrays (split over the batch axes)."""
    sharding = self.batch_sharding if sharding is None else sharding

    def one(x):
      if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return x
      x = np.asarray(x)
      return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return jax.tree.map(one, tree)

  def global_key(self, key):
    """A PRNG key that is the same on every process -> one replicated global key."""
    if not key.is_fully_addressable:
      return key
    data = self.global_array(np.asarray(jax.random.key_data(key)), self.replicated)
    return jax.random.wrap_key_data(data, impl=jax.random.key_impl(key))
