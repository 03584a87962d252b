"""Dropless mixture-of-experts FFN with expert parallelism.

Dimension legend:
  B batch, T tokens per row, N = B*T tokens, D d_model, F expert ffn hidden
  E routed experts, L experts on this device, K experts per token, M = N*K

Dispatch is dropless: every (token, expert) assignment is computed, sorted by
expert and run through a grouped matmul. Under a mesh the layer runs in
``shard_map``: tokens are gathered across the ``expert`` axis, each device runs
its L = E / |expert| experts on the assignments routed to them, and the partial
outputs are summed back to the token owners with ``psum_scatter``. Those
collectives exist on every backend, XLA:CPU included, so CI tests the same path
a pod runs.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from interaction import sharding
from interaction.layers import SwiGLU, param


def route(logits_NE, k: int, scoring: str, normalize: bool):
  """Top-k routing. Returns (weights_NK, experts_NK, probs_NE) in float32."""
  logits_NE = logits_NE.astype(jnp.float32)
  if scoring == "softmax":
    probs_NE = jax.nn.softmax(logits_NE, axis=-1)
  else:
    probs_NE = jax.nn.sigmoid(logits_NE)
  weights_NK, experts_NK = jax.lax.top_k(probs_NE, k)
  if normalize or scoring == "sigmoid":
    weights_NK = weights_NK / jnp.sum(weights_NK, axis=-1, keepdims=True)
  if scoring == "sigmoid":
    probs_NE = probs_NE / jnp.sum(probs_NE, axis=-1, keepdims=True)
  return weights_NK, experts_NK.astype(jnp.int32), probs_NE


def router_stats(logits_NE, experts_NK, probs_NE, num_experts: int):
  """Sums over this shard's tokens, to be added across shards before use."""
  counts_E = jnp.zeros((num_experts,), jnp.float32).at[experts_NK.reshape(-1)].add(1.0)
  z_N = jax.nn.logsumexp(logits_NE.astype(jnp.float32), axis=-1)
  return {
    "expert_counts": counts_E,
    "prob_sum": jnp.sum(probs_NE, axis=0),
    "z_sq_sum": jnp.sum(z_N * z_N),
    "tokens": jnp.asarray(logits_NE.shape[0], jnp.float32),
  }


def router_losses(stats, k: int):
  """Load-balancing loss (E * sum_e f_e P_e) and router z-loss from summed stats."""
  e = stats["expert_counts"].shape[-1]
  f_E = stats["expert_counts"] / (stats["tokens"] * k)
  p_E = stats["prob_sum"] / stats["tokens"]
  return {
    "load_balance_loss": e * jnp.sum(f_E * p_E),
    "router_z_loss": stats["z_sq_sum"] / stats["tokens"],
    "expert_load": f_E,
  }


def resolve_gmm_impl(impl: str) -> str:
  if impl != "auto":
    return impl
  # XLA:CPU lowers ragged_dot to a dense masked matmul over all groups (E times
  # the work), so CPU uses the tiled kernel below; TPU and GPU have native ones.
  return "tiled" if jax.default_backend() == "cpu" else "ragged_dot"


def _tiled(x_MD, group_sizes_L, num_groups: int, tile: int, out_dim: int, tile_fn):
  """``tile_fn(x_tile, group) -> [tile, out_dim]`` over row tiles, each tile owned by one group.

  Each group's rows are padded up to a multiple of ``tile``, so a tile never
  spans two groups; tiles past the last group are skipped. Rows past
  ``sum(group_sizes)`` produce zeros. Cost is at most (M + L * tile) rows, so
  when M is small (the step's one-token forwards) the tile shrinks to the power
  of two that covers an even share, M / L rows (at least 8): same result, the
  padding no longer dominates.
  """
  m, d = x_MD.shape
  tile = min(tile, max(8, 1 << max(-(-m // num_groups) - 1, 0).bit_length()))
  num_tiles = -(-m // tile) + num_groups
  ends_L = jnp.cumsum(group_sizes_L)
  starts_L = ends_L - group_sizes_L
  padded_L = -(-group_sizes_L // tile) * tile
  padded_ends_L = jnp.cumsum(padded_L)
  row_M = jnp.arange(m)
  group_M = jnp.minimum(jnp.searchsorted(ends_L, row_M, side="right"), num_groups - 1)
  valid_M = row_M < ends_L[-1]
  dest_M = jnp.where(valid_M, padded_ends_L[group_M] - padded_L[group_M] + row_M - starts_L[group_M], num_tiles * tile)
  x_pad = jnp.zeros((num_tiles * tile, d), x_MD.dtype).at[dest_M].set(x_MD, mode="drop")
  tile_start = jnp.arange(num_tiles) * tile
  tile_group = jnp.minimum(jnp.searchsorted(padded_ends_L, tile_start, side="right"), num_groups - 1)
  tile_used = tile_start < padded_ends_L[-1]

  def body(_, inputs):
    x_tile, g, used = inputs
    out = jax.lax.cond(used, lambda: tile_fn(x_tile, g), lambda: jnp.zeros((tile, out_dim), x_tile.dtype))
    return None, out

  _, y = jax.lax.scan(body, None, (x_pad.reshape(num_tiles, tile, d), tile_group, tile_used))
  y = y.reshape(num_tiles * tile, -1)
  return jnp.where(valid_M[:, None], y[jnp.minimum(dest_M, num_tiles * tile - 1)], 0)


def _dot(a, b):
  return jnp.dot(a, b, preferred_element_type=jnp.float32).astype(a.dtype)


def tiled_grouped_matmul(x_MD, w_LDF, group_sizes_L, tile: int):
  """``ragged_dot`` as a loop over row tiles (``_tiled``)."""
  return _tiled(x_MD, group_sizes_L, w_LDF.shape[0], tile, w_LDF.shape[-1], lambda xt, g: _dot(xt, w_LDF[g]))


def tiled_grouped_ffn(x_MD, w_gate, w_up, w_down, group_sizes_L, tile: int):
  """``silu(x @ gate) * (x @ up) @ down`` per group in one loop over row tiles.

  Equal to three ``tiled_grouped_matmul`` calls; fused, each tile is gathered
  and scattered once instead of three times.
  """

  def ffn(x_tile, g):
    return _dot(jax.nn.silu(_dot(x_tile, w_gate[g])) * _dot(x_tile, w_up[g]), w_down[g])

  return _tiled(x_MD, group_sizes_L, w_gate.shape[0], tile, w_down.shape[-1], ffn)


def grouped_matmul(x_MD, w_LDF, group_sizes_L, impl: str, tile: int):
  if resolve_gmm_impl(impl) == "ragged_dot":
    return jax.lax.ragged_dot(x_MD, w_LDF, group_sizes_L, preferred_element_type=jnp.float32).astype(x_MD.dtype)
  return tiled_grouped_matmul(x_MD, w_LDF, group_sizes_L, tile)


def dispatch_local(x_ND, weights_NK, experts_NK, w_gate, w_up, w_down, expert_offset, *, impl, tile):
  """Run the assignments routed to experts [offset, offset + L) of these weights.

  Returns y_ND: the weighted sum of those experts' outputs per token (zero for
  tokens routed elsewhere). Nothing is dropped: the buffers hold all N*K rows.
  """
  n, k = experts_NK.shape
  num_local = w_gate.shape[0]
  local_M = experts_NK.reshape(-1) - expert_offset
  is_local_M = (local_M >= 0) & (local_M < num_local)
  key_M = jnp.where(is_local_M, local_M, num_local)
  order_M = jnp.argsort(key_M, stable=True)
  group_sizes_L = jnp.zeros((num_local + 1,), jnp.int32).at[key_M].add(1)[:num_local]
  x_MD = x_ND[order_M // k]
  if resolve_gmm_impl(impl) == "tiled":
    y_MD = tiled_grouped_ffn(x_MD, w_gate, w_up, w_down, group_sizes_L, tile)
  else:
    h_MF = jax.nn.silu(grouped_matmul(x_MD, w_gate, group_sizes_L, impl, tile)) * grouped_matmul(
      x_MD, w_up, group_sizes_L, impl, tile
    )
    y_MD = grouped_matmul(h_MF, w_down, group_sizes_L, impl, tile)
  y_NKD = jnp.zeros_like(y_MD).at[order_M].set(y_MD).reshape(n, k, -1)
  gate_NK = jnp.where(is_local_M.reshape(n, k), weights_NK, 0.0).astype(y_NKD.dtype)
  y_NKD = jnp.where(is_local_M.reshape(n, k)[..., None], y_NKD, 0)
  return jnp.einsum("nkd,nk->nd", y_NKD, gate_NK)


class MoE(nnx.Module):
  """Top-k routed SwiGLU experts plus optional always-on shared experts."""

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    d, f, e, pd = cfg.d_model, cfg.expert_ffn_dim, cfg.num_experts, jnp.dtype(cfg.param_dtype)
    self.router = param(rngs, (d, e), ("embed", None), pd, fan_in=d)
    self.gate = param(rngs, (e, d, f), ("expert", "expert_embed", "expert_mlp"), pd, fan_in=d)
    self.up = param(rngs, (e, d, f), ("expert", "expert_embed", "expert_mlp"), pd, fan_in=d)
    self.down = param(rngs, (e, f, d), ("expert", "expert_mlp", "expert_embed"), pd, fan_in=f)
    self.shared = (
      SwiGLU(d, f * cfg.num_shared_experts, param_dtype=pd, dtype=cfg.dtype, rules=cfg.rules, rngs=rngs)
      if cfg.num_shared_experts
      else None
    )
    self.k, self.scoring, self.num_experts = cfg.experts_per_token, cfg.router_scoring, e
    self.normalize = cfg.normalize_top_k
    self.impl, self.tile, self.dtype = cfg.gmm_impl, cfg.gmm_tile, jnp.dtype(cfg.dtype)
    self.chunks, self.rules = cfg.moe_chunks, cfg.rules

  def __call__(self, x_BTD):
    """Returns ``(y_BTD, stats)``; ``stats`` are router sums over all tokens."""
    dt = self.dtype
    weights = (self.router[...], self.gate[...].astype(dt), self.up[...].astype(dt), self.down[...].astype(dt))
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
      y_BTD, stats = self._local(x_BTD.astype(dt), *weights, expert_axis=None, reduce_axes=())
    else:
      y_BTD, stats = self._sharded(x_BTD.astype(dt), weights, mesh)
    if self.shared is not None:
      y_BTD = y_BTD + self.shared(x_BTD)
    return y_BTD, stats

  def _sharded(self, x_BTD, weights, mesh):
    batch = sharding.logical_to_spec(("batch",), mesh, self.rules)[0]
    batch_axes = () if batch is None else (batch,) if isinstance(batch, str) else tuple(batch)
    expert_w = sharding.logical_to_spec(("expert", None, "expert_mlp"), mesh, self.rules)
    expert_w_down = sharding.logical_to_spec(("expert", "expert_mlp", None), mesh, self.rules)
    shards = 1
    for a in batch_axes:
      shards *= mesh.shape[a]
    if x_BTD.shape[0] % shards:
      raise ValueError(f"MoE: batch {x_BTD.shape[0]} is not divisible by the mesh's batch shards {batch_axes}={shards}")
    expert_axis = "expert" if mesh.shape.get("expert", 1) > 1 else None
    tensor_axis = "tensor" if mesh.shape.get("tensor", 1) > 1 else None
    fn = functools.partial(self._local, expert_axis=expert_axis, reduce_axes=batch_axes, tensor_axis=tensor_axis)
    stats_spec = {"expert_counts": P(), "prob_sum": P(), "z_sq_sum": P(), "tokens": P()}
    return jax.shard_map(
      fn,
      mesh=mesh,
      in_specs=(P(batch), P(), expert_w, expert_w, expert_w_down),
      out_specs=(P(batch), stats_spec),
      check_vma=False,
    )(x_BTD, *weights)

  def _local(self, x_BTD, router, w_gate, w_up, w_down, *, expert_axis, reduce_axes, tensor_axis=None):
    b, t, d = x_BTD.shape
    x_ND = x_BTD.reshape(b * t, d)
    logits_NE = jnp.dot(x_ND.astype(jnp.float32), router.astype(jnp.float32))
    weights_NK, experts_NK, probs_NE = route(logits_NE, self.k, self.scoring, self.normalize)
    stats = router_stats(logits_NE, experts_NK, probs_NE, self.num_experts)
    if reduce_axes:
      stats = jax.tree.map(lambda s: jax.lax.psum(s, reduce_axes), stats)

    def dispatch(x_ND, weights_NK, experts_NK):
      offset = 0
      if expert_axis is not None:
        x_ND = jax.lax.all_gather(x_ND, expert_axis, tiled=True)
        weights_NK = jax.lax.all_gather(weights_NK, expert_axis, tiled=True)
        experts_NK = jax.lax.all_gather(experts_NK, expert_axis, tiled=True)
        offset = jax.lax.axis_index(expert_axis) * w_gate.shape[0]
      y_ND = dispatch_local(x_ND, weights_NK, experts_NK, w_gate, w_up, w_down, offset, impl=self.impl, tile=self.tile)
      if tensor_axis is not None:
        y_ND = jax.lax.psum(y_ND, tensor_axis)
      if expert_axis is not None:
        y_ND = jax.lax.psum_scatter(y_ND, expert_axis, scatter_dimension=0, tiled=True)
      return y_ND

    # The most chunks up to moe_chunks that split the tokens evenly (the step's single tokens: one).
    c = math.gcd(self.chunks, b * t)
    if c == 1:
      return dispatch(x_ND, weights_NK, experts_NK).reshape(b, t, d), stats
    # Rematerialized per chunk, so the backward keeps one chunk's dispatch buffers alive at a time.
    chunk = jax.checkpoint(dispatch, prevent_cse=False)
    xs = (x_ND.reshape(c, -1, d), weights_NK.reshape(c, -1, self.k), experts_NK.reshape(c, -1, self.k))
    _, y_CND = jax.lax.scan(lambda _, x: (None, chunk(*x)), None, xs)
    return y_CND.reshape(b, t, d), stats
