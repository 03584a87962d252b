"""Causality: nothing a micro-turn predicts depends on later tokens."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from interaction import layout, objective
from tests.helpers import make_model, random_batch, tiny_cfg

TURNS = 6


def setup():
  cfg = tiny_cfg()
  graphdef, params = make_model(cfg, seed=2)
  model = nnx.merge(graphdef, params)
  batch = random_batch(cfg, 2, TURNS, seed=8)
  x = model.embed_window({s.name: batch[s.name] for s in cfg.streams}, batch["first_turn"], TURNS)
  positions = model.window_positions(batch["first_turn"], TURNS)
  return cfg, model, batch, x, positions


def test_loss_at_turn_t_has_zero_gradient_from_later_turns():
  cfg, model, batch, x, positions = setup()
  s = layout.tokens_per_turn(cfg.streams)

  def turn_loss(x, t):
    out = objective.outputs_from_embeddings(model, x, positions, batch, jax.random.key(0))
    return -jnp.sum(out["text_out"][:, t]) + jnp.sum(out["audio_out"][:, t])

  grad_fn = jax.jit(jax.grad(turn_loss))
  for t in range(TURNS - 1):
    g = np.asarray(grad_fn(x, jnp.asarray(t)))
    assert np.all(g[:, (t + 1) * s :] == 0.0), f"turn {t} loss depends on later turns"
    assert np.abs(g[:, t * s : (t + 1) * s]).max() > 0, "the check must be able to fail"
    assert t == 0 or np.abs(g[:, : t * s]).max() > 0


def test_output_slot_does_not_see_later_slots_of_its_block():
  cfg, model, batch, x, positions = setup()
  idx = layout.prediction_index(cfg.streams, "text_out", TURNS)
  t, j = 2, 1
  target_pos = int(idx[t, j]) + 1

  def slot_logprob(x):
    out = objective.outputs_from_embeddings(model, x, positions, batch, jax.random.key(0))
    return jnp.sum(out["text_out"][:, t, j])

  g = np.asarray(jax.jit(jax.grad(slot_logprob))(x))
  # The slot's own token and everything after it are invisible to its prediction.
  assert np.all(g[:, target_pos:] == 0.0)
  assert np.abs(g[:, target_pos - 1]).max() > 0
