"""Shared builders for the tests: configs, models and random windows."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from flax import nnx

from experiments import tiny
from interaction import config as config_lib
from interaction import layout, objective
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
