"""The interaction model: stream embedders, a scanned MoE decoder, output heads.

Dimension legend:
  B batch, N micro-turns, S tokens per micro-turn, T tokens, D d_model
  L layers in a stack, C cache capacity, K kv heads, E head_dim

``forward(x_BTD, positions_BT, cache=None)`` is the one decoder forward that
training (a window, no cache) and the step (one block or one slot, with the
session's cache) both call.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from interaction import layout, sharding
from interaction.config import ModelConfig
from interaction.embed import DMelEmbed, PatchStem, TimeEmbed
from interaction.heads import FlowHead, TextHead
from interaction.layers import Attention, RMSNorm, SwiGLU, param
from interaction.moe import MoE

REMAT_POLICIES = {
  "full": None,
  "dots": jax.checkpoint_policies.checkpoint_dots,
  "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class KVCache(NamedTuple):
  """Ring-buffer KV cache of every layer, plus each entry's absolute position."""

  dense_k: jax.Array  # [Ld, B, K, C, E]: kv heads before capacity, so both attention dots read it as stored
  dense_v: jax.Array
  moe_k: jax.Array  # [Lm, B, K, C, E]
  moe_v: jax.Array
  pos: jax.Array  # [B, C] int32, -1 where empty

  @property
  def capacity(self) -> int:
    return self.pos.shape[1]


_KV_AXES = ("layers", "batch", "kv_heads", "cache", "head_dim")
# The cache's logical axes, as parameters carry theirs: the rules map them to mesh axes
# (sharding.tree_shardings), so sessions split over the batch axes and kv heads over tensor.
CACHE_AXES = KVCache(_KV_AXES, _KV_AXES, _KV_AXES, _KV_AXES, ("batch", "cache"))


def init_cache(cfg: ModelConfig, batch: int, capacity: int, dtype=None) -> KVCache:
  dtype = jnp.dtype(dtype or cfg.dtype)

  def kv(layers):
    return jnp.zeros((layers, batch, cfg.num_kv_heads, capacity, cfg.head_dim), dtype)

  return KVCache(
    kv(cfg.num_dense_layers),
    kv(cfg.num_dense_layers),
    kv(cfg.num_moe_layers),
    kv(cfg.num_moe_layers),
    jnp.full((batch, capacity), -1, jnp.int32),
  )


def write_cache(cache: KVCache, positions_BT, dense_kv, moe_kv) -> KVCache:
  """The cache with every layer's new keys and values ``[L, B, T, K, E]`` written at ``position % C``.

  One scatter per buffer after the layer scan (in place when the step donates the state) whose batch
  dimension is declared to XLA (``operand_batching_dims``), so a mesh that splits the slots writes each
  shard's rows where they are, with no transposed copy of the buffer (index arrays over the batch made
  XLA gather every slot's update to every device: one all-gather per buffer per write; ``vmap`` of the
  write moved the slot axis first, a copy of each buffer on TPU).
  """
  slot_BT1 = (positions_BT % cache.capacity)[..., None]
  # Buffers are [L, B, K, C, E]: slots batch dim 1, the write picks C (dim 3); updates are [B, T, L, K, E].
  kv_dims = jax.lax.ScatterDimensionNumbers(
    update_window_dims=(2, 3, 4),
    inserted_window_dims=(3,),
    scatter_dims_to_operand_dims=(3,),
    operand_batching_dims=(1,),
    scatter_indices_batching_dims=(0,),
  )
  pos_dims = jax.lax.ScatterDimensionNumbers(
    update_window_dims=(),
    inserted_window_dims=(1,),
    scatter_dims_to_operand_dims=(1,),
    operand_batching_dims=(0,),
    scatter_indices_batching_dims=(0,),
  )

  def put(buffer_LBKCE, new_LBTKE):
    if new_LBTKE is None:
      return buffer_LBKCE
    new_BTLKE = jnp.transpose(new_LBTKE, (1, 2, 0, 3, 4)).astype(buffer_LBKCE.dtype)
    return jax.lax.scatter(buffer_LBKCE, slot_BT1, new_BTLKE, kv_dims, mode=jax.lax.GatherScatterMode.FILL_OR_DROP)

  return KVCache(
    put(cache.dense_k, dense_kv[0]),
    put(cache.dense_v, dense_kv[1]),
    put(cache.moe_k, moe_kv[0]),
    put(cache.moe_v, moe_kv[1]),
    jax.lax.scatter(cache.pos, slot_BT1, positions_BT, pos_dims, mode=jax.lax.GatherScatterMode.FILL_OR_DROP),
  )


class Block(nnx.Module):
  """Pre-norm decoder layer: attention then a dense or MoE FFN."""

  def __init__(self, cfg: ModelConfig, moe: bool, *, rngs: nnx.Rngs):
    pd = jnp.dtype(cfg.param_dtype)
    self.attn_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=pd, rngs=rngs)
    self.attn = Attention(cfg, rngs=rngs)
    self.ffn_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=pd, rngs=rngs)
    if moe:
      self.ffn = MoE(cfg, rngs=rngs)
    else:
      self.ffn = SwiGLU(cfg.d_model, cfg.dense_ffn_dim, param_dtype=pd, dtype=cfg.dtype, rules=cfg.rules, rngs=rngs)
    self.is_moe, self.rules = moe, cfg.rules

  def __call__(self, x_BTD, positions_BT, cache):
    h_BTD, new_cache = self.attn(self.attn_norm(x_BTD), positions_BT, cache)
    x_BTD = sharding.constrain(x_BTD + h_BTD.astype(x_BTD.dtype), ("batch", "seq", "act_embed"), self.rules)
    if self.is_moe:
      y_BTD, stats = self.ffn(self.ffn_norm(x_BTD))
    else:
      y_BTD, stats = self.ffn(self.ffn_norm(x_BTD)), None
    x_BTD = sharding.constrain(x_BTD + y_BTD.astype(x_BTD.dtype), ("batch", "seq", "act_embed"), self.rules)
    return x_BTD, new_cache, stats


class Stack(nnx.Module):
  """``num`` identical layers, parameters stacked on a leading ``layers`` axis and scanned."""

  def __init__(self, cfg: ModelConfig, num: int, moe: bool, *, rngs: nnx.Rngs):
    @nnx.split_rngs(splits=num)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def create(rngs):
      return Block(cfg, moe, rngs=rngs)

    self.blocks = create(rngs)
    for _, var in nnx.iter_graph(self.blocks):
      if isinstance(var, nnx.Variable):
        var.set_metadata(axes=("layers", *var.get_metadata()["axes"]))
    self.remat = cfg.remat

  def __call__(self, x_BTD, positions_BT, cache_k, cache_v, cache_pos):
    """Returns ``(x_BTD, new (k_LBTKE, v_LBTKE) or None without a cache, stats stacked over layers)``."""
    graphdef, params = nnx.split(self.blocks)

    def body(x, layer):
      layer_params, k, v = layer
      block = nnx.merge(graphdef, layer_params)
      cache = None if k is None else (k, v, cache_pos)
      x, new_kv, stats = block(x, positions_BT, cache)
      return x, (None if cache is None else new_kv, stats)

    if self.remat != "none":
      body = jax.checkpoint(body, policy=REMAT_POLICIES[self.remat], prevent_cse=False)
    x_BTD, (new_kv, stats) = jax.lax.scan(body, x_BTD, (params, cache_k, cache_v))
    return x_BTD, new_kv, stats


class InteractionModel(nnx.Module):
  """Embedders for every stream, the decoder stacks and the output heads."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    d, pd = cfg.d_model, jnp.dtype(cfg.param_dtype)
    text_table = param(rngs, (cfg.text_vocab_size, d), ("vocab", "embed"), pd, fan_in=1)
    embedders, flow_heads = {}, {}
    for spec in cfg.streams:
      if spec.kind == "audio":
        embedders[spec.name] = DMelEmbed(spec, d, param_dtype=pd, rngs=rngs)
        if spec.direction == "out":
          flow_heads[spec.name] = FlowHead(
            spec, d, cfg.flow_hidden, cfg.flow_layers, param_dtype=pd, eps=cfg.norm_eps, rngs=rngs
          )
      elif spec.kind == "video":
        embedders[spec.name] = PatchStem(spec, d, cfg.video_hidden, param_dtype=pd, eps=cfg.norm_eps, rngs=rngs)
    self.embedders = nnx.Dict(embedders)
    self.flow_heads = nnx.Dict(flow_heads)
    self.text_table = text_table
    self.text_head = TextHead(
      d, cfg.text_vocab_size, param_dtype=pd, tied_table=text_table if cfg.tie_text_embedding else None, rngs=rngs
    )
    self.slot_embed = param(rngs, (layout.tokens_per_turn(cfg.streams), d), (None, "embed"), pd, fan_in=1)
    self.time_embed = TimeEmbed(d, param_dtype=pd, rngs=rngs)
    self.dense = Stack(cfg, cfg.num_dense_layers, False, rngs=rngs) if cfg.num_dense_layers else None
    self.moe = Stack(cfg, cfg.num_moe_layers, True, rngs=rngs) if cfg.num_moe_layers else None
    self.final_norm = RMSNorm(d, eps=cfg.norm_eps, param_dtype=pd, rngs=rngs)

  @property
  def turn(self) -> layout.TurnLayout:
    return layout.turn_layout(tuple(self.cfg.streams))

  @property
  def order(self):
    return self.turn.order

  # -- embedding --------------------------------------------------------------

  def embed_stream(self, name: str, values, first_slot, turn_BN):
    """Embed ``n`` consecutive slots of one stream: values [B, N, n, ...] -> [B, N, n, D]."""
    spec = self.cfg.spec(name)
    # Inputs arrive batch-sharded; saying so keeps the partitioner from guessing.
    values = sharding.constrain(values, ("batch",) + (None,) * (values.ndim - 1), self.cfg.rules)
    if spec.kind == "text":
      x = sharding.gathered(self.text_table[...])[values]
    else:
      x = self.embedders[name](values)
    n = values.shape[2]
    slot_ids = self.turn.offset(name) + first_slot + jnp.arange(n)
    x = x.astype(jnp.float32) + sharding.gathered(self.slot_embed[...])[slot_ids].astype(jnp.float32)
    x = x + self.time_embed(turn_BN)[:, :, None, :].astype(jnp.float32)
    return sharding.constrain(x.astype(jnp.dtype(self.cfg.dtype)), ("batch", None, None, "act_embed"), self.cfg.rules)

  def embed_block(self, streams, turn_BN, direction: str):
    """All slots of one direction's block, in layout order: [B, N, S_dir, D]."""
    parts = [self.embed_stream(s.name, streams[s.name], 0, turn_BN) for s in self.order if s.direction == direction]
    return jnp.concatenate(parts, axis=2)

  def embed_window(self, streams, first_turn_B, num_turns: int):
    """A window's tokens ``in_0, out_0, in_1, ...`` as [B, N * S, D]."""
    turn_BN = first_turn_B[:, None] + jnp.arange(num_turns)[None, :]
    x = jnp.concatenate([self.embed_block(streams, turn_BN, "in"), self.embed_block(streams, turn_BN, "out")], axis=2)
    b, n, s, d = x.shape
    return x.reshape(b, n * s, d)

  def window_positions(self, first_turn_B, num_turns: int):
    s = len(self.turn.stream)
    return (first_turn_B[:, None] * s + jnp.arange(num_turns * s)[None, :]).astype(jnp.int32)

  # -- the one forward ----------------------------------------------------------

  def forward(self, x_BTD, positions_BT, cache: KVCache | None = None):
    """Decoder over embedded tokens. Returns ``(h_BTD, cache, moe_stats)``.

    ``h_BTD`` is final-normed. With a cache the new tokens attend to it and are
    written into its ring buffer; ``moe_stats`` holds router sums per MoE layer.
    """
    x_BTD = sharding.constrain(x_BTD, ("batch", "seq", "act_embed"), self.cfg.rules)
    none = (None, None)
    dense_kv = none if cache is None else (cache.dense_k, cache.dense_v)
    moe_kv = none if cache is None else (cache.moe_k, cache.moe_v)
    pos = None if cache is None else cache.pos
    stats, new_dense, new_moe = None, none, none
    if self.dense is not None:
      x_BTD, new_dense, _ = self.dense(x_BTD, positions_BT, *dense_kv, pos)
    if self.moe is not None:
      x_BTD, new_moe, stats = self.moe(x_BTD, positions_BT, *moe_kv, pos)
    new_cache = None if cache is None else write_cache(cache, positions_BT, new_dense, new_moe)
    return self.final_norm(x_BTD), new_cache, stats

  # -- heads --------------------------------------------------------------------

  def text_logits(self, h_D):
    return self.text_head(h_D)

  def prediction_index(self, name: str, num_turns: int):
    return np.asarray(layout.prediction_index(self.cfg.streams, name, num_turns))
