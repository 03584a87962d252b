"""Decoder building blocks: RMSNorm, RoPE, grouped-query attention, SwiGLU.

Dimension legend:
  B batch, T new tokens (query length), C cache capacity, S keys attended
  D d_model, H query heads, K kv heads, G = H / K query heads per kv head,
  E head_dim, F ffn hidden

Attention takes an optional cache. Without one it attends causally within the
given tokens (training). With one it attends over the cached keys followed by the
new tokens, and returns the cache with the new keys written into its ring buffer
(the step). There is no mode flag: the cache is data.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from interaction import sharding


def param(rngs: nnx.Rngs, shape, axes, dtype, fan_in: int | None = None, init="normal"):
  """A parameter with logical ``axes`` metadata; normal init scaled by 1/sqrt(fan_in)."""
  if init == "ones":
    value = jnp.ones(shape, dtype)
  elif init == "zeros":
    value = jnp.zeros(shape, dtype)
  else:
    std = (fan_in or shape[0]) ** -0.5
    value = (std * jax.random.truncated_normal(rngs.params(), -2.0, 2.0, shape, jnp.float32)).astype(dtype)
  return nnx.Param(value, axes=tuple(axes))


class RMSNorm(nnx.Module):
  def __init__(self, dim: int, *, eps: float, param_dtype, rngs: nnx.Rngs, axis_name="act_embed"):
    self.scale = param(rngs, (dim,), (axis_name,), param_dtype, init="ones")
    self.eps = eps

  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (y * self.scale[...].astype(jnp.float32)).astype(x.dtype)


ROPE_SPLIT_BITS = 12  # positions below 2**12 take the plain float32 product


def rope_angles(positions_BT, inv_freq_F, theta: float, e: int):
  """``position * inv_freq`` (mod 2 pi) without float32's loss at large positions.

  A float32 product of a position of hours (10^5-10^6 tokens) and a frequency is
  off by up to ~0.1 rad. The position is split as ``hi * 2**12 + lo`` (exact
  integer ops); ``2**12 * inv_freq mod 2 pi`` is taken in float64 on the host, so
  the angle ``hi * c + lo * inv_freq`` stays small and accurate. For positions
  below 2**12 (``hi == 0``) this is the plain product, bit for bit.
  """
  inv64 = float(theta) ** (-np.arange(0, e, 2, dtype=np.float64) / e)
  c_F = jnp.asarray(np.mod(inv64 * 2.0**ROPE_SPLIT_BITS, 2 * np.pi), jnp.float32)
  positions_BT = positions_BT.astype(jnp.int32)
  hi = (positions_BT >> ROPE_SPLIT_BITS).astype(jnp.float32)[..., None]
  lo = (positions_BT & (2**ROPE_SPLIT_BITS - 1)).astype(jnp.float32)[..., None]
  return lo * inv_freq_F + hi * c_F


def rope(x_BTHE, positions_BT, theta: float):
  """Rotary embedding on the last dim, at absolute token positions."""
  e = x_BTHE.shape[-1]
  inv_freq = theta ** (-jnp.arange(0, e, 2, dtype=jnp.float32) / e)
  angle_BTF = rope_angles(positions_BT, inv_freq, theta, e)
  sin, cos = jnp.sin(angle_BTF)[:, :, None, :], jnp.cos(angle_BTF)[:, :, None, :]
  x1, x2 = jnp.split(x_BTHE.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x_BTHE.dtype)


class Attention(nnx.Module):
  """Grouped-query attention with optional QK-norm over a sliding window."""

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    d, h, k, e, pd = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, jnp.dtype(cfg.param_dtype)
    self.q = param(rngs, (d, h, e), ("embed", "heads", "head_dim"), pd, fan_in=d)
    self.k = param(rngs, (d, k, e), ("embed", "kv_heads", "head_dim"), pd, fan_in=d)
    self.v = param(rngs, (d, k, e), ("embed", "kv_heads", "head_dim"), pd, fan_in=d)
    self.o = param(rngs, (h, e, d), ("heads", "head_dim", "embed"), pd, fan_in=h * e)
    self.q_norm = RMSNorm(e, eps=cfg.norm_eps, param_dtype=pd, rngs=rngs, axis_name="head_dim") if cfg.qk_norm else None
    self.k_norm = RMSNorm(e, eps=cfg.norm_eps, param_dtype=pd, rngs=rngs, axis_name="head_dim") if cfg.qk_norm else None
    self.num_kv_heads, self.window, self.theta = k, cfg.attention_window, cfg.rope_theta
    self.dtype = jnp.dtype(cfg.dtype)

  def __call__(self, x_BTD, positions_BT, cache=None):
    """Returns ``(y_BTD, (k_BTKE, v_BTKE))``: the output and the new tokens' keys and values.

    ``cache`` is ``(k_BKCE, v_BKCE, pos_BC)``: the ring buffer and the absolute
    position of each entry (-1 when empty). It is only read: the caller writes
    the returned keys at ``position % C`` once for every layer (``write_cache``),
    so a step never copies the buffer per layer.
    """
    dt = self.dtype
    x = x_BTD.astype(dt)
    q_BTHE = jnp.einsum("btd,dhe->bthe", x, self.q[...].astype(dt))
    k_BTKE = jnp.einsum("btd,dke->btke", x, self.k[...].astype(dt))
    v_BTKE = jnp.einsum("btd,dke->btke", x, self.v[...].astype(dt))
    if self.q_norm is not None:
      q_BTHE, k_BTKE = self.q_norm(q_BTHE), self.k_norm(k_BTKE)
    q_BTHE = rope(q_BTHE, positions_BT, self.theta)
    k_BTKE = rope(k_BTKE, positions_BT, self.theta)

    b, t, h, e = q_BTHE.shape
    q_BTKGE = q_BTHE.reshape(b, t, self.num_kv_heads, h // self.num_kv_heads, e)
    # Logits over the cache and over the new tokens side by side: one softmax, no concatenated key copy.
    parts = [(jnp.swapaxes(k_BTKE, 1, 2), jnp.swapaxes(v_BTKE, 1, 2), positions_BT)]
    if cache is not None:
      ck_BKCE, cv_BKCE, cpos_BC = cache
      parts.insert(0, (ck_BKCE.astype(dt), cv_BKCE.astype(dt), cpos_BC))
    logits = []
    for keys_BKSE, _, key_pos_BS in parts:
      logits_BKGTS = jnp.einsum("btkge,bkse->bkgts", q_BTKGE, keys_BKSE).astype(jnp.float32) * e**-0.5
      delta_BTS = positions_BT[:, :, None] - key_pos_BS[:, None, :]
      visible_BTS = (key_pos_BS[:, None, :] >= 0) & (delta_BTS >= 0) & (delta_BTS < self.window)
      logits.append(jnp.where(visible_BTS[:, None, None], logits_BKGTS, jnp.finfo(jnp.float32).min))
    probs_BKGTS = jax.nn.softmax(jnp.concatenate(logits, axis=-1), axis=-1).astype(dt)
    splits = np.cumsum([p[0].shape[2] for p in parts])[:-1]
    out_BTKGE = sum(
      jnp.einsum("bkgts,bkse->btkge", probs, values_BKSE)
      for probs, (_, values_BKSE, _) in zip(jnp.split(probs_BKGTS, splits, axis=-1), parts, strict=True)
    )
    y_BTD = jnp.einsum("bthe,hed->btd", out_BTKGE.reshape(b, t, h, e), self.o[...].astype(dt))
    return y_BTD, (k_BTKE, v_BTKE)


class SwiGLU(nnx.Module):
  """Dense gated FFN: down(silu(x W_gate) * x W_up)."""

  def __init__(self, d: int, f: int, *, param_dtype, dtype, rules, rngs: nnx.Rngs):
    self.gate = param(rngs, (d, f), ("embed", "mlp"), param_dtype, fan_in=d)
    self.up = param(rngs, (d, f), ("embed", "mlp"), param_dtype, fan_in=d)
    self.down = param(rngs, (f, d), ("mlp", "embed"), param_dtype, fan_in=f)
    self.dtype, self.rules = jnp.dtype(dtype), rules

  def __call__(self, x_BTD):
    dt = self.dtype
    x = x_BTD.astype(dt)
    h_BTF = jax.nn.silu(x @ self.gate[...].astype(dt)) * (x @ self.up[...].astype(dt))
    h_BTF = sharding.constrain(h_BTF, ("batch", "seq", "mlp"), self.rules)
    return h_BTF @ self.down[...].astype(dt)
