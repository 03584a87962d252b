"""Output heads: text unembedding and the flow-matching mel head.

Dimension legend: B batch, D d_model, V text vocabulary, C mel channels,
H flow head hidden width; ``...`` is any leading shape.

The flow head models a mel frame given the decoder's hidden state with
conditional flow matching (straight paths from Gaussian noise to the frame).
Sampling integrates its velocity with a fixed number of Euler steps, so the
step's shapes stay static.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from interaction.embed import time_features
from interaction.layers import RMSNorm, param


def mel_to_unit(mel, lo: float, hi: float):
  """Log-mel -> [-1, 1], the space the flow head works in."""
  return 2.0 * (jnp.clip(mel, lo, hi) - lo) / (hi - lo) - 1.0


def unit_to_mel(x, lo: float, hi: float):
  return lo + (jnp.clip(x, -1.0, 1.0) + 1.0) * 0.5 * (hi - lo)


class FlowHead(nnx.Module):
  """Velocity field v(x_t, t | h) for one audio stream's mel frames."""

  def __init__(self, spec, d: int, hidden: int, layers: int, *, param_dtype, eps: float, rngs: nnx.Rngs):
    c = spec.mel_channels
    self.cond = param(rngs, (d, hidden), ("embed", None), param_dtype)
    self.inp = param(rngs, (c, hidden), (None, None), param_dtype)
    self.time = param(rngs, (32, hidden), (None, None), param_dtype)
    self.norms = nnx.List(
      [RMSNorm(hidden, eps=eps, param_dtype=param_dtype, rngs=rngs, axis_name=None) for _ in range(layers)]
    )
    self.mlps = nnx.List([param(rngs, (hidden, hidden), (None, None), param_dtype) for _ in range(layers)])
    self.out = param(rngs, (hidden, c), (None, None), param_dtype, init="zeros")
    self.lo, self.hi, self.channels = spec.mel_min, spec.mel_max, c

  def velocity(self, x_C, t, h_D):
    # Flow time t in [0, 1] reuses the sinusoid features at a 100 s scale.
    z = h_D.astype(jnp.float32) @ self.cond[...] + x_C @ self.inp[...] + time_features(t * 100.0) @ self.time[...]
    for norm, w in zip(self.norms, self.mlps, strict=True):
      z = z + jax.nn.silu(norm(z) @ w[...])
    return z @ self.out[...]

  def loss(self, h_D, mel_C, rng):
    """Conditional flow-matching loss per frame (mean over channels), shape ``h_D.shape[:-1]``."""
    x1 = mel_to_unit(mel_C.astype(jnp.float32), self.lo, self.hi)
    k_noise, k_time = jax.random.split(rng)
    x0 = jax.random.normal(k_noise, x1.shape)
    t = jax.random.uniform(k_time, x1.shape[:-1])
    xt = (1.0 - t[..., None]) * x0 + t[..., None] * x1
    err = self.velocity(xt, t, h_D) - (x1 - x0)
    return jnp.mean(err * err, axis=-1)

  def sample(self, h_D, noise_C, steps: int):
    """Euler integration from ``noise_C`` at t=0 to a mel frame at t=1."""

    def body(i, x):
      t = jnp.full(x.shape[:-1], i / steps, jnp.float32)
      return x + self.velocity(x, t, h_D) / steps

    return unit_to_mel(jax.lax.fori_loop(0, steps, body, noise_C.astype(jnp.float32)), self.lo, self.hi)


class TextHead(nnx.Module):
  """Logits over the text vocabulary; tied to the text embedding table by default."""

  def __init__(self, d: int, vocab: int, *, param_dtype, tied_table=None, rngs: nnx.Rngs):
    self.table = tied_table
    self.unembed = None if tied_table is not None else param(rngs, (d, vocab), ("embed", "vocab"), param_dtype)

  def __call__(self, h_D):
    h = h_D.astype(jnp.float32)
    if self.unembed is not None:
      return h @ self.unembed[...].astype(jnp.float32)
    # The tied table has unit-variance rows; 1/sqrt(D) keeps initial logits O(1).
    return (h @ self.table[...].astype(jnp.float32).T) * h.shape[-1] ** -0.5
