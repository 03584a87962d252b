"""What a model costs, from its config alone: parameter counts, bytes per device, FLOPs, MFU.

Counts come from ``jax.eval_shape`` (``ckpt.abstract_model``): nothing is allocated,
so the 276B config is counted on any host. MFU is model FLOPs per second over this
machine's matmul peak, which is measured once with a large float32 matmul (on CPU,
the virtual devices share the host's cores, so the peak is the host's).
"""

from __future__ import annotations

import math
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from interaction import layout, sharding
from interaction.ckpt.params import abstract_model
from interaction.config import ModelConfig


def count_params(cfg: ModelConfig, state=None) -> dict[str, int]:
  """Total parameters, and active per token (routed experts count k of E)."""
  state = abstract_model(cfg)[1] if state is None else state
  total = routed = 0
  for _, v in nnx.to_flat_state(state):
    n = math.prod(v.shape)
    total += n
    if "expert" in (v.get_metadata().get("axes") or ()):
      routed += n
  active = total - routed + routed * cfg.experts_per_token // max(cfg.num_experts, 1)
  return {"total": total, "active": active, "routed_experts": routed}


def bytes_per_device(cfg: ModelConfig, mesh, state=None) -> int:
  """Parameter bytes on the most loaded device under the config's sharding rules."""
  state = abstract_model(cfg)[1] if state is None else state
  specs = sharding.param_specs(state, mesh, cfg.rules)
  total = 0
  for (_, v), (_, spec) in zip(nnx.to_flat_state(state), nnx.to_flat_state(specs), strict=True):
    shards = 1
    for entry in spec.get_value():
      for axis in (entry,) if isinstance(entry, str) else entry or ():
        shards *= mesh.shape[axis]
    total += math.prod(v.shape) * np.dtype(v.dtype).itemsize // shards
  return total


def measure_matmul_peak(n: int = 2048, repeats: int = 5) -> float:
  """Best achieved float32 FLOP/s of an n x n x n matmul on the first device."""
  device = jax.devices()[0]
  a = jax.device_put(jnp.ones((n, n), jnp.float32), device)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    f(a).block_until_ready()
    times.append(time.perf_counter() - t)
  return 2 * n**3 / min(times)


def train_flops_per_window(cfg: ModelConfig, window_turns: int) -> float:
  """Model FLOPs of one training window (forward + backward = 3 x forward).

  Matmul parameters active per token (lookup tables excluded) times 2, plus
  attention scores and values over the causal, windowed context.
  """
  counts = count_params(cfg)
  tables = sum(
    s.mel_channels * s.mel_levels * cfg.d_model for s in cfg.streams if s.kind == "audio"
  ) + cfg.text_vocab_size * cfg.d_model * (0 if cfg.tie_text_embedding else 1)
  tokens = window_turns * layout.tokens_per_turn(cfg.streams)
  context = np.minimum(np.arange(1, tokens + 1), cfg.attention_window).sum()
  attention = 4 * cfg.num_layers * cfg.num_heads * cfg.head_dim * context
  return 3 * (2 * (counts["active"] - tables) * tokens + attention)


def serve_flops_per_tick(cfg: ModelConfig, slots: int, cache_tokens: int) -> float:
  """Model FLOPs of one micro-turn step: every token runs the active parameters once over the cache."""
  tokens = slots * layout.tokens_per_turn(cfg.streams)
  attention = 4 * cfg.num_layers * cfg.num_heads * cfg.head_dim * tokens * cache_tokens
  return 2 * count_params(cfg)["active"] * tokens + attention
