"""The frozen model config, built once from an experiment's ``get_config()``.

Layers receive this dataclass (or the fields they need), never the experiment
config, so a model is fully described by one hashable value.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from interaction import layout, sharding, text

ROUTER_SCORINGS = ("softmax", "sigmoid")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
GMM_IMPLS = ("auto", "ragged_dot", "tiled")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Everything that shapes parameters and the forward computation."""

  streams: tuple[layout.StreamSpec, ...]
  d_model: int = 128
  num_layers: int = 2
  num_heads: int = 4
  num_kv_heads: int = 2
  head_dim: int = 32
  qk_norm: bool = True
  rope_theta: float = 10_000.0
  # Sliding attention window in tokens. The step's ring-buffer cache must hold at
  # least this many tokens for the step to equal the training forward.
  attention_window: int = 512
  # FFN: the first ``num_dense_layers`` layers are dense SwiGLU, the rest MoE.
  num_dense_layers: int = 0
  dense_ffn_dim: int = 512
  num_experts: int = 8
  experts_per_token: int = 2
  expert_ffn_dim: int = 128
  num_shared_experts: int = 0
  router_scoring: str = "softmax"
  # Renormalize the top-k routing weights to sum to 1 (Mixtral: yes; Qwen3-MoE: its norm_topk_prob).
  normalize_top_k: bool = True
  gmm_impl: str = "auto"
  # Rows per tile of the CPU grouped matmul; 128 was fastest at 16k tokens (benchmarks/step_latency.py).
  gmm_tile: int = 128
  # Run each device's tokens through expert dispatch in up to this many sequential chunks (the most
  # that divide them evenly). Dropless dispatch sizes its buffers for the worst case (every gathered
  # assignment local), so peak memory falls by the chunk count; results are unchanged.
  moe_chunks: int = 1
  # Embedders and heads.
  video_hidden: int = 64
  flow_hidden: int = 256
  flow_layers: int = 2
  flow_steps: int = 8
  tie_text_embedding: bool = True
  # Numerics: parameters are stored in param_dtype, matmuls run in dtype.
  dtype: str = "float32"
  param_dtype: str = "float32"
  remat: str = "none"
  norm_eps: float = 1e-6
  # Logical axis -> mesh axes for parameters, activations and the cache (an experiment's ``rules`` section).
  rules: sharding.Rules = sharding.DEFAULT_RULES

  def __post_init__(self):
    layout.validate_specs(self.streams)
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
    if not 0 <= self.num_dense_layers <= self.num_layers:
      raise ValueError(f"num_dense_layers must be in [0, num_layers={self.num_layers}], got {self.num_dense_layers}")
    if self.num_dense_layers < self.num_layers and not 1 <= self.experts_per_token <= self.num_experts:
      raise ValueError(f"experts_per_token must be in [1, num_experts={self.num_experts}]")
    if self.router_scoring not in ROUTER_SCORINGS:
      raise ValueError(f"router_scoring must be one of {ROUTER_SCORINGS}, got {self.router_scoring!r}")
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"remat must be one of {REMAT_POLICIES}, got {self.remat!r}")
    if self.gmm_impl not in GMM_IMPLS:
      raise ValueError(f"gmm_impl must be one of {GMM_IMPLS}, got {self.gmm_impl!r}")
    if self.moe_chunks < 1:
      raise ValueError(f"moe_chunks must be >= 1, got {self.moe_chunks}")
    if self.attention_window < 1:
      raise ValueError("attention_window must be >= 1 token")
    for s in self.streams:
      if s.kind == "text" and s.vocab_size > text.VOCAB_SIZE and self.tie_text_embedding:
        raise ValueError(f"stream {s.name!r}: vocab_size {s.vocab_size} exceeds the shared table")

  @property
  def num_moe_layers(self) -> int:
    return self.num_layers - self.num_dense_layers

  @property
  def text_vocab_size(self) -> int:
    return max(s.vocab_size for s in self.streams if s.kind == "text")

  def spec(self, name: str) -> layout.StreamSpec:
    for s in self.streams:
      if s.name == name:
        return s
    raise KeyError(f"no stream named {name!r}; streams are {[s.name for s in self.streams]}")

  def stream(self, kind: str, direction: str, *, optional: bool = False) -> layout.StreamSpec | None:
    """The one stream of ``kind`` in ``direction``, e.g. ``cfg.stream("audio", "in")`` (``layout.find_stream``).

    With ``optional`` a missing stream is None; a missing required one, or two that match, is a KeyError.
    """
    return layout.find_stream(self.streams, kind, direction, optional=optional)

  def directed(self, direction: str) -> tuple[layout.StreamSpec, ...]:
    """Every ``"in"`` or ``"out"`` stream, in config order."""
    if direction not in layout.DIRECTIONS:
      raise ValueError(f"direction must be one of {layout.DIRECTIONS}, got {direction!r}")
    return tuple(s for s in self.streams if s.direction == direction)


def streams_from_config(streams: Mapping, order) -> tuple[layout.StreamSpec, ...]:
  """StreamSpecs from ``{name: {direction, kind, slots, ...}}`` in the given order.

  ConfigDict sorts its keys, so the order is a separate field.
  """
  if sorted(order) != sorted(streams):
    raise ValueError(f"stream_order {list(order)} must name each stream once; streams are {sorted(streams)}")
  return tuple(layout.StreamSpec(name=name, **dict(streams[name])) for name in order)


def model_config(config) -> ModelConfig:
  """ModelConfig from an experiment config with ``model``, ``streams``, ``stream_order`` and optional ``rules``."""
  fields = dict(config["model"])
  known = {f.name for f in dataclasses.fields(ModelConfig)} - {"streams", "rules"}
  unknown = sorted(set(fields) - known)
  if unknown:
    raise ValueError(f"unknown model config fields {unknown}; known fields are {sorted(known)}")
  rules = sharding.DEFAULT_RULES.replace(config.get("rules"))
  return ModelConfig(streams=streams_from_config(config["streams"], config["stream_order"]), rules=rules, **fields)
