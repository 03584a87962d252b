"""Encoder-free embedders: every stream enters the decoder through a light layer.

Dimension legend:
  B batch, N micro-turns, n slots of one stream, D d_model
  C mel channels, Q dMel levels, P patch side in pixels, V text vocabulary

- audio: dMel. Each log-mel channel is quantized to Q levels; one embedding
  table per channel; a frame's embedding is the sum over its channels.
- video: an hMLP stem. A P x P patch is embedded by three linear stages over
  non-overlapping (P/4)-pixel sub-patches, merged 2 x 2 at each stage.
- text: one table (shared with the text unembedding when tied).
- time: sinusoidal features of the micro-turn's elapsed seconds, projected.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from interaction import sharding
from interaction.layers import RMSNorm, param
from interaction.layout import MICRO_TURN_SECONDS


def dmel_quantize(mel, levels: int, lo: float, hi: float):
  """Log-mel values -> the nearest of ``levels`` uniform levels over [lo, hi] (0 .. levels-1).

  The same rule as ``data_pipeline.audio.quantize`` (tested), so codes written
  by the data tools and codes the model embeds agree.
  """
  scaled = (jnp.clip(mel.astype(jnp.float32), lo, hi) - lo) / (hi - lo) * (levels - 1)
  return jnp.round(scaled).astype(jnp.int32)


class DMelEmbed(nnx.Module):
  def __init__(self, spec, d: int, *, param_dtype, rngs: nnx.Rngs):
    c, q = spec.mel_channels, spec.mel_levels
    # Summing C tables: scale each so the sum has unit variance.
    self.tables = param(rngs, (c, q, d), (None, None, "embed"), param_dtype, fan_in=c)
    self.levels, self.lo, self.hi = q, spec.mel_min, spec.mel_max

  def __call__(self, mel_BNnC):
    codes = dmel_quantize(mel_BNnC, self.levels, self.lo, self.hi)
    channel = jnp.arange(codes.shape[-1])
    return jnp.sum(sharding.gathered(self.tables[...])[channel, codes], axis=-2)


class PatchStem(nnx.Module):
  """hMLP stem: P x P x 3 patch -> D, in three 2 x 2-merging linear stages."""

  def __init__(self, spec, d: int, hidden: int, *, param_dtype, eps: float, rngs: nnx.Rngs):
    p = spec.patch_size
    if p % 4:
      raise ValueError(f"video stream {spec.name!r}: patch_size {p} must be a multiple of 4 for the hMLP stem")
    self.sub = p // 4
    self.w1 = param(rngs, (self.sub * self.sub * 3, hidden), (None, None), param_dtype)
    self.n1 = RMSNorm(hidden, eps=eps, param_dtype=param_dtype, rngs=rngs, axis_name=None)
    self.w2 = param(rngs, (4 * hidden, hidden), (None, None), param_dtype)
    self.n2 = RMSNorm(hidden, eps=eps, param_dtype=param_dtype, rngs=rngs, axis_name=None)
    self.w3 = param(rngs, (4 * hidden, d), (None, "embed"), param_dtype)

  def __call__(self, pixels_BNnPP3):
    lead, s = pixels_BNnPP3.shape[:-3], self.sub
    x = pixels_BNnPP3.astype(jnp.float32) / 255.0 - 0.5
    # [.., 4, s, 4, s, 3] -> [.., 4, 4, s*s*3]: the 4 x 4 grid of sub-patches.
    x = x.reshape(*lead, 4, s, 4, s, 3).swapaxes(-4, -3).reshape(*lead, 4, 4, s * s * 3)
    x = jax.nn.gelu(self.n1(x @ self.w1[...]))
    x = jax.nn.gelu(self.n2(merge2x2(x) @ self.w2[...]))
    return merge2x2(x).reshape(*lead, -1) @ sharding.gathered(self.w3[...])


def merge2x2(x):
  """[.., 2h, 2w, c] -> [.., h, w, 4c]: concatenate each 2 x 2 neighbourhood."""
  *lead, h2, w2, c = x.shape
  x = x.reshape(*lead, h2 // 2, 2, w2 // 2, 2, c).swapaxes(-4, -3)
  return x.reshape(*lead, h2 // 2, w2 // 2, 4 * c)


def time_features(seconds, num: int = 16):
  """Sinusoids of elapsed seconds with periods from 0.4 s to ~1 hour."""
  periods = 2 * MICRO_TURN_SECONDS * (3600 / (2 * MICRO_TURN_SECONDS)) ** (jnp.arange(num) / (num - 1))
  angle = 2 * jnp.pi * seconds.astype(jnp.float32)[..., None] / periods
  return jnp.concatenate([jnp.sin(angle), jnp.cos(angle)], axis=-1)


class TimeEmbed(nnx.Module):
  def __init__(self, d: int, *, param_dtype, rngs: nnx.Rngs, num: int = 16):
    self.proj = param(rngs, (2 * num, d), (None, "embed"), param_dtype)
    self.num = num

  def __call__(self, turn):
    # Seconds from an integer count: exact in float32 for any realistic session.
    return time_features(turn.astype(jnp.float32) * MICRO_TURN_SECONDS, self.num) @ sharding.gathered(self.proj[...])
