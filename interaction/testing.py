"""Fixtures for tests and benchmarks: a small experiment config built in code, models, batches, checkpoints.

Library code never imports ``experiments/``, so the fixture config is written out
here. It equals experiments/tiny.py's (``tests/test_layers.py`` checks it), so the
tests exercise the model the demo trains. No test framework is imported.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from interaction import config as config_lib
from interaction import objective, schema
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


def _audio(direction: str) -> dict:
  return dict(direction=direction, kind="audio", slots=4, mel_channels=32, mel_levels=16, mel_min=-11.5, mel_max=2.5)


def experiment_config() -> ml_collections.ConfigDict:
  """The tiny experiment (about 2.5M parameters, 17 tokens per micro-turn) as a fresh ConfigDict."""
  c = ml_collections.ConfigDict()
  c.stream_order = ("audio_in", "video_in", "text_in", "text_out", "audio_out")
  c.streams = ml_collections.ConfigDict(
    dict(
      audio_in=_audio("in"),
      video_in=dict(direction="in", kind="video", slots=1, patch_size=40),
      text_in=dict(direction="in", kind="text", slots=4, vocab_size=272),
      text_out=dict(direction="out", kind="text", slots=4, vocab_size=272),
      audio_out=_audio("out"),
    )
  )
  c.model = ml_collections.ConfigDict(
    dict(
      d_model=128,
      num_layers=4,
      num_heads=4,
      num_kv_heads=2,
      head_dim=32,
      qk_norm=True,
      attention_window=512,
      num_dense_layers=1,
      dense_ffn_dim=512,
      num_experts=8,
      experts_per_token=2,
      expert_ffn_dim=128,
      num_shared_experts=1,
      router_scoring="softmax",
      video_hidden=64,
      flow_hidden=256,
      flow_layers=2,
      flow_steps=8,
      dtype="float32",
      param_dtype="float32",
      remat="none",
    )
  )
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, expert=4, tensor=1))
  c.data = ml_collections.ConfigDict(
    dict(
      dir="",
      synthetic_train=2048,
      synthetic_eval=448,
      synthetic_mix=dict(visual_interjection=3),
      window_turns=32,
      batch_size=8,
      seed=0,
      workers=0,
      read_threads=1,
      bad_records="fail",
    )
  )
  c.train = ml_collections.ConfigDict(
    dict(
      steps=600,
      lr=3e-3,
      warmup_steps=50,
      min_lr_ratio=0.1,
      weight_decay=0.01,
      b1=0.9,
      b2=0.95,
      clip_norm=1.0,
      grad_accum=1,
      aux_weight=0.01,
      z_weight=1e-3,
      listen_weight=1.0,
      time_offset_turns=18000,
      transition_weight=3.0,
      seed=0,
      log_every=10,
      checkpoint_every=100,
      keep_checkpoints=3,
      max_bad_steps=5,
    )
  )
  c.serve = ml_collections.ConfigDict(dict(slots=8, cache_tokens=512))
  return c


def tiny_cfg(**overrides) -> config_lib.ModelConfig:
  """The fixture experiment's ModelConfig with fields replaced."""
  return dataclasses.replace(config_lib.model_config(experiment_config()), **overrides)


def make_model(cfg, seed: int = 0):
  """``(graphdef, params State)`` of a freshly initialized model."""
  return nnx.split(InteractionModel(cfg, rngs=nnx.Rngs(seed)))


def random_batch(cfg, batch: int, turns: int, seed: int = 0, first_turn=None) -> dict:
  """A [batch, turns] batch of the schema's required keys (``schema.random_batch``): random streams,
  ``first_turn``, an all-real ``turn_mask``."""
  return schema.random_batch(cfg.streams, batch, turns, seed, first_turn)


def loss_fn(graphdef):
  """jit-able ``(params, batch) -> losses`` for the objective."""

  def f(params, batch):
    model = nnx.merge(graphdef, params)
    return objective.losses(model, objective.window_outputs(model, batch, jax.random.key(0)), batch)

  return f


def save_checkpoint(directory, small_cfg_config=True, with_config_json=True, step=3) -> pathlib.Path:
  """A trainer-layout workdir (``directory / "work"``) of random parameters and an optimizer state a
  loader must skip; the small model by default. Returns the workdir."""
  config = experiment_config()
  if small_cfg_config:
    config.model.update(SMALL_MODEL)
  config.serve.cache_tokens = config.model.attention_window
  cfg = config_lib.model_config(config)
  _, params = make_model(cfg, seed=3)
  params = nnx.to_pure_dict(params)
  workdir = pathlib.Path(directory) / "work"
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
