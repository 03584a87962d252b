"""The micro-turn step: equals the training forward, compiles once, checks its inputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from interaction import layout, objective
from interaction import step as step_lib
from tests.helpers import make_model, random_batch, tiny_cfg

TURNS = 16


def inputs_at(cfg, streams, t):
  return {s.name: streams[s.name][:, t] for s in cfg.streams if s.direction == "in"}


def run_ticks(step, params, state, cfg, streams, turns, forced=True, rng=None):
  rng = jax.random.key(1) if rng is None else rng
  outs = []
  for t in range(turns):
    given = {s.name: streams[s.name][:, t] for s in cfg.streams if s.direction == "out"} if forced else None
    state, out = step(params, state, inputs_at(cfg, streams, t), rng, given)
    outs.append(jax.tree.map(np.asarray, out))
  return state, jax.tree.map(lambda *x: np.stack(x, axis=1), *outs)


def test_teacher_forced_step_equals_training_forward():
  cfg = tiny_cfg()
  graphdef, params = make_model(cfg)
  batch = random_batch(cfg, 2, TURNS, seed=3)
  ref = jax.jit(lambda p, b: objective.window_outputs(nnx.merge(graphdef, p), b, jax.random.key(0)))(params, batch)
  step = step_lib.Step(graphdef, cfg)
  _, got = run_ticks(step, params, step_lib.init_state(cfg, 2, cfg.attention_window), cfg, batch, TURNS)
  lp_step, lp_train = got.logprobs["text_out"], np.asarray(ref["text_out"])
  diff = np.abs(lp_step - lp_train).max()
  bitwise = np.mean(lp_step == lp_train)
  print(f"\nstep vs forward: max |dlogp| = {diff:.3g}, bitwise equal fraction = {bitwise:.3f}")
  assert lp_step.shape == (2, TURNS, cfg.spec("text_out").slots)
  assert diff <= 1e-5


def test_the_unrolled_slot_loop_accelerators_compile_equals_the_scanned_one():
  cfg = tiny_cfg()
  graphdef, params = make_model(cfg, seed=2)
  batch = random_batch(cfg, 2, 6, seed=5)
  outs = {}
  for unroll in (False, True):
    step = step_lib.Step(graphdef, cfg)
    step.unroll = unroll  # what Step picks on a TPU or GPU (traced at the first call, so set before it)
    state = step_lib.init_state(cfg, 2, cfg.attention_window, temperature=0.0)
    _, outs[unroll] = run_ticks(step, params, state, cfg, batch, 6, forced=False)
  np.testing.assert_array_equal(outs[True].values["text_out"], outs[False].values["text_out"])
  np.testing.assert_allclose(outs[True].values["audio_out"], outs[False].values["audio_out"], atol=1e-5)
  np.testing.assert_allclose(outs[True].logprobs["text_out"], outs[False].logprobs["text_out"], atol=1e-5)


def test_free_running_step_is_what_the_forward_would_sample():
  """Greedy text and flow-sampled mel frames, fed back, are reproduced by the window forward."""
  cfg = tiny_cfg()
  graphdef, params = make_model(cfg, seed=1)
  batch = random_batch(cfg, 2, 8, seed=4)
  step = step_lib.Step(graphdef, cfg)
  state = step_lib.init_state(cfg, 2, cfg.attention_window, temperature=0.0)
  rng = jax.random.key(7)
  _, got = run_ticks(step, params, state, cfg, batch, 8, forced=False, rng=rng)
  window = dict(batch, text_out=got.values["text_out"], audio_out=got.values["audio_out"])
  model = nnx.merge(graphdef, params)
  x = model.embed_window({s.name: window[s.name] for s in cfg.streams}, window["first_turn"], 8)
  h, _, _ = model.forward(x, model.window_positions(window["first_turn"], 8))
  h_text = h[:, model.prediction_index("text_out", 8)]
  greedy = step_lib.greedy_text(model.text_logits(h_text).reshape(-1, cfg.spec("text_out").vocab_size))
  np.testing.assert_array_equal(np.asarray(greedy).reshape(got.values["text_out"].shape), got.values["text_out"])
  h_audio = h[:, model.prediction_index("audio_out", 8)]
  index = [s.name for s in model.order].index("audio_out")
  for t in range(8):
    # The step donated its state; a fresh one has the same seeds (0, 1).
    fake = step_lib.init_state(cfg, 2, cfg.attention_window)._replace(turn=jnp.full((2,), t, jnp.int32))
    for j in range(cfg.spec("audio_out").slots):
      keys = step_lib.slot_keys(rng, fake, index, j)
      noise = step_lib.flow_noise(keys, cfg.spec("audio_out").mel_channels, jnp.zeros(2))
      mel = model.flow_heads["audio_out"].sample(h_audio[:, t, j], noise, cfg.flow_steps)
      np.testing.assert_allclose(got.values["audio_out"][:, t, j], mel, atol=1e-4)


def test_step_compiles_once_over_300_ticks_with_ring_wrap():
  cfg = tiny_cfg(attention_window=68)
  graphdef, params = make_model(cfg)
  capacity = 68  # 4 micro-turns of 17 tokens: 300 ticks wrap the ring 75 times
  compiles = []
  jax.monitoring.register_event_duration_secs_listener(
    lambda name, *a, **k: compiles.append(name) if name == "/jax/core/compile/backend_compile_duration" else None
  )
  step = step_lib.Step(graphdef, cfg)
  state = step_lib.init_state(cfg, 2, capacity)
  inputs = [layout.random_streams([s for s in cfg.streams if s.direction == "in"], (2,), seed) for seed in range(3)]
  state, out = step(params, state, inputs[0], jax.random.key(0))
  after_first = len(compiles)
  assert after_first >= 1  # the counter sees the step's own compilation
  for t in range(1, 300):
    state, out = step(params, state, inputs[t % 3], jax.random.key(0))
  jax.block_until_ready(out)
  print(f"\ncompilations: {after_first} on the first tick, {len(compiles) - after_first} in the next 299")
  assert len(compiles) == after_first
  assert step._jitted._cache_size() == 1
  assert int(state.turn[0]) == 300
  assert state.cache.pos.max() == 300 * 17 - 1 and state.cache.pos.min() == 300 * 17 - capacity


def test_ring_buffer_step_equals_sliding_window_forward():
  """Past the cache capacity the step still equals a forward with the same window."""
  cfg = tiny_cfg(attention_window=51)
  graphdef, params = make_model(cfg)
  batch = random_batch(cfg, 1, 10, seed=5)
  ref = jax.jit(lambda p, b: objective.window_outputs(nnx.merge(graphdef, p), b, jax.random.key(0)))(params, batch)
  step = step_lib.Step(graphdef, cfg)
  _, got = run_ticks(step, params, step_lib.init_state(cfg, 1, 51), cfg, batch, 10)
  np.testing.assert_allclose(got.logprobs["text_out"], ref["text_out"], atol=1e-5)


def test_reset_slot_restarts_a_session():
  cfg = tiny_cfg()
  graphdef, params = make_model(cfg)
  batch = random_batch(cfg, 2, 3, seed=6)
  step = step_lib.Step(graphdef, cfg)
  state, first = run_ticks(step, params, step_lib.init_state(cfg, 2, cfg.attention_window), cfg, batch, 3)
  state = step_lib.reset_slots(state, np.array([True, False]))
  assert state.turn.tolist() == [0, 3]
  _, again = run_ticks(step, params, state, cfg, batch, 1)
  np.testing.assert_allclose(again.logprobs["text_out"][0, 0], first.logprobs["text_out"][0, 0], atol=1e-6)


def test_bad_turn_inputs_raise_before_device_work():
  cfg = tiny_cfg()
  graphdef, params = make_model(cfg)
  step = step_lib.Step(graphdef, cfg)
  state = step_lib.init_state(cfg, 2, cfg.attention_window)
  good = layout.random_streams([s for s in cfg.streams if s.direction == "in"], (2,))
  cases = [
    (dict(good, audio_in=good["audio_in"][:, :3]), r"'audio_in'.*\[B, 4, 32\].*\[2, 3, 32\]"),
    (dict(good, video_in=good["video_in"].astype(np.float32)), r"'video_in'.*uint8"),
    (dict(good, text_in=good["text_in"][:1]), r"'text_in'.*batch 1 != the state's 2 slots"),
    ({k: v for k, v in good.items() if k != "text_in"}, r"missing stream 'text_in'"),
    (dict(good, bogus=good["text_in"]), r"unknown streams \['bogus'\]"),
  ]
  for bad, pattern in cases:
    with pytest.raises(ValueError, match=pattern):
      step(params, state, bad, jax.random.key(0))
  assert step._jitted._cache_size() == 0
  with pytest.raises(ValueError, match="smaller than the attention window"):
    step_lib.init_state(cfg, 2, cfg.attention_window - 1)


def test_sampling_settings_are_per_slot_data():
  from interaction import text

  logits = jnp.log(jnp.zeros((3, text.VOCAB_SIZE)).at[:, :3].set(jnp.array([0.5, 0.3, 0.2])))
  keys = jax.random.split(jax.random.key(0), 3)
  greedy = step_lib.sample_text(logits, jnp.zeros(3), jnp.ones(3), keys)
  assert greedy.tolist() == [0, 0, 0]
  # top_p 0.5 keeps only the top token, so sampling is deterministic even at temperature 1.
  for seed in range(5):
    keys = jax.random.split(jax.random.key(seed), 3)
    assert step_lib.sample_text(logits, jnp.ones(3), jnp.full(3, 0.5), keys).tolist() == [0, 0, 0]
  counts = np.zeros(text.VOCAB_SIZE)
  for seed in range(300):
    counts[int(step_lib.sample_text(logits[:1], jnp.ones(1), jnp.ones(1), jax.random.key(seed)[None])[0])] += 1
  np.testing.assert_allclose(counts[:3] / 300, [0.5, 0.3, 0.2], atol=0.08)


def test_greedy_speaks_when_speech_holds_most_of_the_mass_even_if_silence_is_the_single_likeliest_token():
  from interaction import text

  def logits(p_pad, spoken):
    probs = np.full(text.VOCAB_SIZE, 1e-9)
    probs[text.PAD] = p_pad
    for byte, p in spoken.items():
      probs[ord(byte)] = p
    return jnp.log(jnp.asarray(probs / probs.sum(), jnp.float32))[None]

  # Answering: 0.7 of the mass says something, spread over first letters; PAD alone is the argmax.
  spread = logits(0.3, {"n": 0.25, "s": 0.2, "y": 0.15, "h": 0.1})
  assert int(jnp.argmax(spread)) == text.PAD
  assert step_lib.greedy_text(spread).tolist() == [ord("n")]
  assert step_lib.greedy_text(logits(0.6, {"n": 0.4})).tolist() == [text.PAD]
  assert step_lib.greedy_text(logits(0.05, {"n": 0.15, "o": 0.8})).tolist() == [ord("o")]
  keys = jax.random.split(jax.random.key(0), 1)
  assert step_lib.sample_text(spread, jnp.zeros(1), jnp.ones(1), keys).tolist() == [ord("n")]


def test_flow_noise_has_standard_deviation_sqrt_temperature():
  keys = jnp.stack([jax.random.key(3)] * 3)
  noise = np.asarray(step_lib.flow_noise(keys, 4096, jnp.array([0.0, 1.0, 4.0])))
  assert not noise[0].any()  # greedy: the flow starts from the prior's mean
  np.testing.assert_allclose(noise[2], 2 * noise[1], rtol=1e-6)  # same draw, scaled
  assert 0.95 < noise[1].std() < 1.05


def test_rope_angles_stay_accurate_in_sessions_of_hours_and_are_the_plain_product_below_4096():
  from interaction import layers

  e, theta = 32, 10_000.0
  inv_freq = theta ** (-jnp.arange(0, e, 2, dtype=jnp.float32) / e)
  small = jnp.arange(4096, dtype=jnp.int32)[None]
  plain = small.astype(jnp.float32)[..., None] * inv_freq
  np.testing.assert_array_equal(layers.rope_angles(small, inv_freq, theta, e), plain)  # old checkpoints unchanged
  # Positions of 3 and 30 hours of micro-turns (17 tokens per 200 ms).
  big = np.array([[17 * 5 * 3600 * 3 + 123, 17 * 5 * 3600 * 30 + 4095]], np.int64)
  exact = np.mod(big[..., None] * (theta ** (-np.arange(0, e, 2, dtype=np.float64) / e)), 2 * np.pi)

  def error(angles):
    d = np.mod(np.asarray(angles, np.float64) - exact, 2 * np.pi)
    return np.minimum(d, 2 * np.pi - d).max()

  assert error(layers.rope_angles(jnp.asarray(big, jnp.int32), inv_freq, theta, e)) < 2e-3
  assert error(jnp.asarray(big, jnp.float32)[..., None] * inv_freq) > 2e-2  # what the plain product loses
