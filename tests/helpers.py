"""Shared builders for the tests: configs, models and random windows."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from experiments import tiny
from interaction import config as config_lib
from interaction import layout, objective
from interaction.ckpt import trainer as checkpoint
from interaction.model import InteractionModel

# A smaller tiny for tests that run many ticks; the engine and evaluator logic is size-blind.
SMALL_MODEL = dict(
  num_layers=2,
  num_dense_layers=1,
  attention_window=68,
  d_model=64,
  num_heads=2,
  num_kv_heads=1,
  dense_ffn_dim=128,
  expert_ffn_dim=64,
  flow_hidden=64,
  flow_steps=2,
)


def tiny_cfg(**overrides) -> config_lib.ModelConfig:
  return dataclasses.replace(config_lib.model_config(tiny.get_config()), **overrides)


def make_model(cfg, seed: int = 0):
  return nnx.split(InteractionModel(cfg, rngs=nnx.Rngs(seed)))


def random_batch(cfg, batch: int, turns: int, seed: int = 0, first_turn=None):
  out = layout.random_streams(cfg.streams, (batch, turns), seed)
  out["first_turn"] = np.zeros(batch, np.int32) if first_turn is None else np.asarray(first_turn, np.int32)
  return out


def loss_fn(graphdef):
  """jit-able ``(params, batch) -> losses`` for the tiny objective."""

  def f(params, batch):
    model = nnx.merge(graphdef, params)
    return objective.losses(model, objective.window_outputs(model, batch, jax.random.key(0)), batch)

  return f


def save_checkpoint(tmp_path, small_cfg_config=True, with_config_json=True, step=3):
  """A trainer-layout workdir holding random parameters and an optimizer state the loader must skip."""
  config = tiny.get_config()
  if small_cfg_config:
    config.model.update(SMALL_MODEL)
  config.serve.cache_tokens = config.model.attention_window
  cfg = config_lib.model_config(config)
  _, params = make_model(cfg, seed=3)
  params = nnx.to_pure_dict(params)
  workdir = tmp_path / "work"
  ckpt = checkpoint.Checkpointer(workdir / "checkpoints", async_save=False)
  state = {
    "step": jnp.int32(step),
    "params": params,
    "opt_state": {"mu": jax.tree.map(jnp.ones_like, params), "count": jnp.int32(7)},
    "skipped": jnp.int32(0),
    "bad_streak": jnp.int32(0),
  }
  ckpt.save(step, state, {}, {"config": json.loads(config.to_json())})
  ckpt.wait()
  ckpt.close()
  if with_config_json:
    (workdir / "config.json").write_text(config.to_json())
  return workdir
