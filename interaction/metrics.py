"""Training metrics: a JSONL log, TensorBoard event files, and MFU.

MFU is model FLOPs per second over this machine's matmul peak, which is
measured once at start with a large float32 matmul (on CPU, the virtual devices
share the host's cores, so the peak is the host's).
"""

from __future__ import annotations

import json
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np

from interaction import inspect, layout
from interaction.config import ModelConfig


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
  counts = inspect.count_params(cfg)
  tables = sum(
    s.mel_channels * s.mel_levels * cfg.d_model for s in cfg.streams if s.kind == "audio"
  ) + cfg.text_vocab_size * cfg.d_model * (0 if cfg.tie_text_embedding else 1)
  tokens = window_turns * layout.tokens_per_turn(cfg.streams)
  context = np.minimum(np.arange(1, tokens + 1), cfg.attention_window).sum()
  attention = 4 * cfg.num_layers * cfg.num_heads * cfg.head_dim * context
  return 3 * (2 * (counts["active"] - tables) * tokens + attention)


class MetricsWriter:
  """Writes scalars to ``metrics.jsonl`` and TensorBoard events under ``workdir``."""

  def __init__(self, workdir, enabled: bool = True):
    self.workdir = pathlib.Path(workdir)
    self.enabled = enabled
    self._jsonl = open(self.workdir / "metrics.jsonl", "a") if enabled else None  # noqa: SIM115
    self._tb = None
    if enabled:
      from tensorboardX import SummaryWriter

      self._tb = SummaryWriter(str(self.workdir / "tensorboard"))

  def write(self, step: int, scalars: dict) -> None:
    if not self.enabled:
      return
    row = {"step": int(step)}
    for key, value in scalars.items():
      value = np.asarray(value)
      if value.ndim == 0:
        row[key] = float(value)
        self._tb.add_scalar(key, float(value), int(step))
      else:
        row[key] = value.tolist()
        for i, v in enumerate(value.reshape(-1)):
          self._tb.add_scalar(f"{key}/{i}", float(v), int(step))
    self._jsonl.write(json.dumps(row) + "\n")
    self._jsonl.flush()

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._tb.close()
