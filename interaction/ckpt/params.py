"""Parameter names, shapes and logical axes of a model, from its config alone.

A parameter's name is its ``nnx.to_pure_dict`` path joined with ``/`` (e.g.
``moe/blocks/ffn/gate``). Nothing here allocates parameters: shapes come from
``nnx.eval_shape``, so a 276B config is described on any host.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from interaction import layout, sharding
from interaction.config import ModelConfig
from interaction.model import InteractionModel


class ParamInfo(NamedTuple):
  shape: tuple[int, ...]
  dtype: np.dtype
  axes: tuple  # logical axis names, one per dim


def config_to_json(cfg: ModelConfig) -> dict:
  """A JSON-able dict that ``config_from_json`` turns back into the same ModelConfig."""
  out = dataclasses.asdict(cfg)
  out["streams"] = [dataclasses.asdict(s) for s in cfg.streams]
  out["rules"] = cfg.rules.to_dict()
  return out


def config_from_json(d: dict) -> ModelConfig:
  if not isinstance(d, dict) or not isinstance(d.get("streams"), list):
    raise ValueError("model config must be an object with a 'streams' list")
  known = {f.name for f in dataclasses.fields(ModelConfig)}
  unknown = sorted(set(d) - known)
  if unknown:
    raise ValueError(f"unknown model config fields {unknown}")
  streams = tuple(layout.StreamSpec(**s) for s in d["streams"])
  # Manifests written before the rules were part of the model config hold none: the defaults.
  rules = sharding.DEFAULT_RULES.replace(d.get("rules"))
  return ModelConfig(**{k: v for k, v in d.items() if k not in ("streams", "rules")}, streams=streams, rules=rules)


@functools.lru_cache(maxsize=8)
def abstract_model(cfg: ModelConfig):
  """``(graphdef, State of ShapeDtypeStructs)`` of the model ``cfg`` describes; nothing is allocated.

  Every parameter carries its logical axes as metadata. Cached per config: treat the result as read-only.
  """
  return nnx.split(nnx.eval_shape(lambda: InteractionModel(cfg, rngs=nnx.Rngs(0))))


def name_of(path) -> str:
  return "/".join(str(getattr(k, "key", k)) for k in path)


@functools.lru_cache(maxsize=8)
def _param_infos(cfg: ModelConfig) -> tuple:
  _, state = abstract_model(cfg)
  out = []
  for path, var in nnx.to_flat_state(state):
    axes = tuple(var.get_metadata().get("axes") or (None,) * len(var.shape))
    out.append((name_of(path), ParamInfo(tuple(var.shape), np.dtype(var.dtype), axes)))
  return tuple(sorted(out))


def param_infos(cfg: ModelConfig) -> dict[str, ParamInfo]:
  """Every parameter of the model ``cfg`` describes, by name, in a fixed order."""
  return dict(_param_infos(cfg))


def graphdef(cfg: ModelConfig):
  return abstract_model(cfg)[0]


def unflatten(cfg: ModelConfig, flat: dict) -> dict:
  """Arrays by name -> the model's pure-dict tree (``nnx.merge(graphdef(cfg), tree)``)."""
  _, state = abstract_model(cfg)
  pure = nnx.to_pure_dict(state)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(pure)
  names = [name_of(p) for p, _ in leaves]
  missing, extra = sorted(set(names) - set(flat)), sorted(set(flat) - set(names))
  if missing or extra:
    raise ValueError(f"parameters do not match the model: missing {missing}, unexpected {extra}")
  return jax.tree_util.tree_unflatten(treedef, [flat[n] for n in names])


def flatten(tree) -> dict:
  """The model's pure-dict tree -> arrays by name."""
  return {name_of(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def init_params(cfg: ModelConfig, names, seed: int = 0) -> dict:
  """Fresh initial values of only the named parameters, by name.

  Under jit the initializers of every other parameter are dead code, so the full
  model is never materialized.
  """
  names = list(names)

  @jax.jit
  def init():
    state = nnx.split(InteractionModel(cfg, rngs=nnx.Rngs(seed)))[1]
    flat = {name_of(p): v.get_value() for p, v in nnx.to_flat_state(state)}
    return {n: flat[n] for n in names}

  return jax.device_get(init())


def text_forward(model: InteractionModel, ids_BT, positions_BT=None):
  """Text-only logits of the backbone: table lookup, decoder, text head; no slot or time embeddings.

  This is how an imported LLM is compared with its source. Give padding tokens
  position -1: keys at negative positions are invisible, so left padding does not
  change the real tokens' logits (the pads' own logits are meaningless).
  """
  ids_BT = jnp.asarray(ids_BT, jnp.int32)
  if positions_BT is None:
    positions_BT = jnp.broadcast_to(jnp.arange(ids_BT.shape[1], dtype=jnp.int32), ids_BT.shape)
  x_BTD = jnp.asarray(model.text_table[...])[ids_BT].astype(jnp.dtype(model.cfg.dtype))
  h_BTD, _, _ = model.forward(x_BTD, jnp.asarray(positions_BT, jnp.int32))
  return model.text_logits(h_BTD)


def left_pad_positions(mask_BT) -> np.ndarray:
  """Positions 0..n-1 for real tokens and -1 for pads, from a 0/1 attention mask."""
  mask = np.asarray(mask_BT).astype(bool)
  return np.where(mask, np.cumsum(mask, axis=1) - 1, -1).astype(np.int32)
