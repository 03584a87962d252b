"""Open MoE LLMs in the Hugging Face layout (Mixtral, Qwen3-MoE) <-> the interaction text backbone.

Import reads ``config.json`` and ``*.safetensors`` only (pickle-based weight
files are refused), maps the backbone into an InteractionModel whose streams come
from an experiment config, initializes the parameters the source lacks (modality
embedders, slot/time embeddings, the flow head) and lists them. Source features
the model lacks are refused by name, never approximated.

Vocabulary: the imported backbone keeps the source's token ids (the text
streams' ``vocab_size`` becomes the HF vocabulary); our byte-level tokenizer
does not apply to it, a tokenizer matching the source is needed.

Export writes the text backbone back (Hub tensor names, per-expert weights) with
the same one-tensor-at-a-time streaming. Each mapping entry is exact (copy or
transpose + reshape), so hf -> interaction -> hf returns identical tensors.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib

import numpy as np

from interaction.ckpt import params as params_lib
from interaction.ckpt import serve
from interaction.ckpt.paths import check_tree, confined
from interaction.ckpt.safetensors_io import SafetensorsFile, SafetensorsWriter
from interaction.config import ModelConfig
from interaction.experiment import ExperimentConfig

ARCHS = ("mixtral", "qwen3_moe")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


class UnsupportedSourceError(ValueError):
  """The source uses a feature the interaction backbone does not have."""


class UnsafeFormatError(ValueError):
  """The source's weights are only in a pickle-based format."""


@dataclasses.dataclass(frozen=True)
class Entry:
  """One HF tensor that is one chunk of one of our arrays: ``ours_chunk = (hf.T if transpose else hf).reshape``."""

  hf_name: str
  hf_shape: tuple[int, ...]
  transpose: bool


# -- config ----------------------------------------------------------------------


def _refuse(cond: bool, feature: str, detail: str = "") -> None:
  if cond:
    raise UnsupportedSourceError(f"unsupported source feature: {feature}{': ' + detail if detail else ''}")


def rope_theta(hf: dict) -> float:
  rp = hf.get("rope_parameters") or {}
  _refuse(bool(hf.get("rope_scaling")), "rope_scaling", repr(hf.get("rope_scaling")))
  _refuse(rp.get("rope_type", "default") != "default", "rope_scaling", f"rope_type {rp.get('rope_type')!r}")
  factor = hf.get("partial_rotary_factor", rp.get("partial_rotary_factor", 1.0))
  _refuse(factor not in (None, 1, 1.0), "partial rotary", f"partial_rotary_factor={factor}")
  theta = rp.get("rope_theta", hf.get("rope_theta"))
  _refuse(theta is None, "rope", "no rope_theta in config.json")
  return float(theta)


def dense_prefix(hf: dict, arch: str) -> int:
  """How many leading layers are dense; refuses dense layers that are not a prefix."""
  n = int(hf["num_hidden_layers"])
  if arch == "mixtral":
    return 0
  mlp_only = set(hf.get("mlp_only_layers") or [])
  step = int(hf.get("decoder_sparse_step", 1) or 1)
  experts = int(hf.get("num_experts", hf.get("num_local_experts", 0)) or 0)
  dense = [i for i in range(n) if i in mlp_only or experts == 0 or (i + 1) % step != 0]
  _refuse(
    dense != list(range(len(dense))),
    "dense layers that are not a prefix",
    f"mlp_only_layers / decoder_sparse_step make layers {dense} dense",
  )
  return len(dense)


def attention_window(hf: dict, arch: str) -> int:
  full = int(hf.get("max_position_embeddings", 4096))
  types = set(hf.get("layer_types") or [])
  _refuse(len(types) > 1, "sliding window that differs per layer", f"layer_types {sorted(types)}")
  if arch == "qwen3_moe" and not hf.get("use_sliding_window", False):
    return full
  window = hf.get("sliding_window")
  if arch == "qwen3_moe" and window is not None:
    mwl = hf.get("max_window_layers")
    _refuse(
      mwl is not None and int(mwl) < int(hf["num_hidden_layers"]),
      "sliding window that differs per layer",
      f"max_window_layers={mwl}",
    )
  return full if window is None else int(window)


def backbone_fields(hf: dict, arch: str) -> dict:
  """ModelConfig fields of the text backbone described by an HF ``config.json``."""
  _refuse(arch not in ARCHS, "architecture", f"{arch!r} (supported: {ARCHS})")
  _refuse(hf.get("model_type") != arch, "model_type", f"{hf.get('model_type')!r} does not match --arch {arch}")
  _refuse(hf.get("hidden_act", "silu") != "silu", "activation", f"hidden_act={hf.get('hidden_act')!r}")
  for key in ("attention_bias", "mlp_bias", "qkv_bias"):
    _refuse(bool(hf.get(key)), "attention biases" if key != "mlp_bias" else "MLP biases", f"{key}=true")
  for key in ("shared_expert_intermediate_size", "n_shared_experts", "num_shared_experts"):
    _refuse(bool(hf.get(key)), "shared experts", f"{key}={hf.get(key)}")
  heads = int(hf["num_attention_heads"])
  d = int(hf["hidden_size"])
  experts = int(hf.get("num_experts", hf.get("num_local_experts", 0)) or 0)
  ffn = hf["intermediate_size"] if arch == "mixtral" else hf.get("moe_intermediate_size", hf["intermediate_size"])
  return dict(
    d_model=d,
    num_layers=int(hf["num_hidden_layers"]),
    num_heads=heads,
    num_kv_heads=int(hf.get("num_key_value_heads") or heads),
    head_dim=int(hf.get("head_dim") or d // heads),
    qk_norm=arch == "qwen3_moe",
    rope_theta=rope_theta(hf),
    attention_window=attention_window(hf, arch),
    norm_eps=float(hf["rms_norm_eps"]),
    num_dense_layers=dense_prefix(hf, arch),
    dense_ffn_dim=int(hf["intermediate_size"]),
    num_experts=max(experts, 1),
    experts_per_token=int(hf.get("num_experts_per_tok", 1)),
    expert_ffn_dim=int(ffn),
    num_shared_experts=0,
    router_scoring="softmax",
    normalize_top_k=True if arch == "mixtral" else bool(hf.get("norm_topk_prob", False)),
    # Our tied head scales logits by 1/sqrt(D) and HF's does not: keep a separate unembedding.
    tie_text_embedding=False,
  )


def import_config(hf: dict, arch: str, experiment: ExperimentConfig, *, param_dtype: str | None = None) -> ModelConfig:
  """The full model: the backbone from ``hf``, streams and modality settings from ``experiment``
  (a typed experiment config; ``launch.convert`` defaults to experiments/tiny.py)."""
  fields = backbone_fields(hf, arch)
  base = experiment.model
  vocab = int(hf["vocab_size"])
  streams = tuple(dataclasses.replace(s, vocab_size=vocab) if s.kind == "text" else s for s in base.streams)
  if param_dtype:
    fields["param_dtype"] = param_dtype
  return dataclasses.replace(base, streams=streams, **fields)


# -- the mapping -------------------------------------------------------------------


def _names(arch: str) -> dict:
  if arch == "mixtral":
    return dict(router="block_sparse_moe.gate", expert="block_sparse_moe.experts.{j}.", gate="w1", up="w3", down="w2")
  return dict(router="mlp.gate", expert="mlp.experts.{j}.", gate="gate_proj", up="up_proj", down="down_proj")


def mapping(cfg: ModelConfig, arch: str, *, tied: bool = False) -> dict[str, list[Entry]]:
  """Our parameter name -> the HF tensors that are its consecutive chunks (C order)."""
  d, h, k, e = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  v = cfg.text_vocab_size
  n = _names(arch)
  out = {
    "text_table": [Entry("model.embed_tokens.weight", (v, d), False)],
    "final_norm/scale": [Entry("model.norm.weight", (d,), False)],
    "text_head/unembed": [Entry("model.embed_tokens.weight" if tied else "lm_head.weight", (v, d), True)],
  }
  stacks = [("dense", range(cfg.num_dense_layers)), ("moe", range(cfg.num_dense_layers, cfg.num_layers))]
  for stack, layers in stacks:
    if not layers:
      continue

    def per_layer(suffix, shape, transpose, layers=layers):
      return [Entry(f"model.layers.{i}.{suffix}", shape, transpose) for i in layers]

    p = f"{stack}/blocks/"
    out[p + "attn_norm/scale"] = per_layer("input_layernorm.weight", (d,), False)
    out[p + "ffn_norm/scale"] = per_layer("post_attention_layernorm.weight", (d,), False)
    out[p + "attn/q"] = per_layer("self_attn.q_proj.weight", (h * e, d), True)
    out[p + "attn/k"] = per_layer("self_attn.k_proj.weight", (k * e, d), True)
    out[p + "attn/v"] = per_layer("self_attn.v_proj.weight", (k * e, d), True)
    out[p + "attn/o"] = per_layer("self_attn.o_proj.weight", (d, h * e), True)
    if cfg.qk_norm:
      out[p + "attn/q_norm/scale"] = per_layer("self_attn.q_norm.weight", (e,), False)
      out[p + "attn/k_norm/scale"] = per_layer("self_attn.k_norm.weight", (e,), False)
    if stack == "dense":
      f = cfg.dense_ffn_dim
      out[p + "ffn/gate"] = per_layer("mlp.gate_proj.weight", (f, d), True)
      out[p + "ffn/up"] = per_layer("mlp.up_proj.weight", (f, d), True)
      out[p + "ffn/down"] = per_layer("mlp.down_proj.weight", (d, f), True)
      continue
    f, experts = cfg.expert_ffn_dim, range(cfg.num_experts)
    out[p + "ffn/router"] = per_layer(n["router"] + ".weight", (cfg.num_experts, d), True)
    for ours, theirs, shape in (("gate", n["gate"], (f, d)), ("up", n["up"], (f, d)), ("down", n["down"], (d, f))):
      out[p + "ffn/" + ours] = [
        Entry(f"model.layers.{i}.{n['expert'].format(j=j)}{theirs}.weight", shape, True)
        for i in layers
        for j in experts
      ]
  return out


def _chunk_shape(shape: tuple[int, ...], count: int) -> tuple[int, ...]:
  for lead in range(len(shape) + 1):
    if math.prod(shape[:lead]) == count:
      return shape[lead:]
  raise ValueError(f"{count} chunks do not tile shape {shape}")


# -- import --------------------------------------------------------------------------


def open_source(src) -> tuple[dict, dict[str, SafetensorsFile]]:
  """``config.json`` and tensor name -> the safetensors file holding it, all inside ``src``."""
  src = pathlib.Path(src)
  check_tree(src)
  hf = json.loads(confined(src, "config.json", what="config").read_text())
  index = src / "model.safetensors.index.json"
  if index.exists():
    weight_map = json.loads(confined(src, index.name, what="index").read_text()).get("weight_map")
    if not isinstance(weight_map, dict):
      raise ValueError(f"{index}: no weight_map")
    files = sorted(set(weight_map.values()))
  else:
    files = sorted(p.name for p in src.glob("*.safetensors"))
  if not files:
    pickled = sorted(p.name for p in src.iterdir() if p.suffix in PICKLE_SUFFIXES)
    raise UnsafeFormatError(
      f"{src}: no .safetensors weights"
      + (
        f"; refusing pickle-based files {pickled} (they can run code when loaded); convert them to safetensors"
        if pickled
        else ""
      )
    )
  opened, where = {}, {}
  for rel in files:
    if not str(rel).endswith(".safetensors"):
      raise UnsafeFormatError(f"{src}: index points at {rel!r}; only .safetensors files are read")
    opened[rel] = SafetensorsFile(confined(src, rel, what="weights file"))
    for name in opened[rel].names():
      if name in where:
        raise ValueError(f"{src}: tensor {name!r} is in two files")
      where[name] = opened[rel]
  return hf, where


def _unused_error(unused: list[str]) -> UnsupportedSourceError:
  hints = {"bias": "attention/MLP biases", "shared_expert": "shared experts", "gate_up_proj": "fused expert layout"}
  feature = next((v for key, v in hints.items() if any(key in u for u in unused)), "unmapped tensors")
  return UnsupportedSourceError(
    f"unsupported source feature: {feature}: tensors {unused[:6]} have no place in the model"
  )


def serving_experiment(experiment: ExperimentConfig, cfg: ModelConfig) -> dict:
  """The experiment config stored with an imported model: the experiment's streams, data and serving
  settings, without its ``model`` section (the manifest's model config is the model), and a serving
  cache at least the imported attention window (the step refuses a shorter one)."""
  serve = dataclasses.replace(experiment.serve, cache_tokens=max(experiment.serve.cache_tokens, cfg.attention_window))
  out = dataclasses.replace(experiment, serve=serve).to_dict()
  out.pop("model")
  return out


def hf_to_interaction(
  src, dst, arch: str, *, experiment: ExperimentConfig, param_dtype: str | None = None, seed: int = 0
) -> dict:
  """Convert an HF checkpoint directory into a serve checkpoint; returns a summary with the initialized names.

  ``experiment`` (a typed experiment config) gives the streams and modality settings; it is stored in the
  manifest, so the converted model opens with its serving settings (``interaction.ckpt.open_model``).
  """
  hf, where = open_source(src)
  cfg = import_config(hf, arch, experiment, param_dtype=param_dtype)
  tied = bool(hf.get("tie_word_embeddings", False)) and "lm_head.weight" not in where
  table = mapping(cfg, arch, tied=tied)
  infos = params_lib.param_infos(cfg)
  missing_hf = sorted({en.hf_name for entries in table.values() for en in entries} - set(where))
  if missing_hf:
    raise ValueError(f"{src}: tensors missing from the safetensors files: {missing_hf[:6]}")
  used = {en.hf_name for entries in table.values() for en in entries}
  unused = sorted(set(where) - used)
  if unused:
    raise _unused_error(unused)
  fresh = [name for name in infos if name not in table]
  extra = {
    "source": {"kind": "hf", "arch": arch, "hf_config": hf, "tied_embeddings": tied},
    "initialized": fresh,
    "experiment": serving_experiment(experiment, cfg),
  }
  writer = serve.Writer(dst, cfg, extra=extra)
  for name, entries in table.items():
    info = infos[name]
    chunk = _chunk_shape(info.shape, len(entries))
    with writer.stream(name, info.shape, info.dtype) as sink:
      for en in entries:
        t = where[en.hf_name].get(en.hf_name)
        if t.shape != en.hf_shape:
          raise ValueError(f"{en.hf_name}: shape {t.shape}, config.json implies {en.hf_shape}")
        sink.write(np.ascontiguousarray((t.T if en.transpose else t).reshape(chunk)).astype(info.dtype))
  for name, value in params_lib.init_params(cfg, fresh, seed).items():
    writer.add(name, np.asarray(value))
  writer.finish()
  return {"arrays": len(infos), "from_source": sorted(table), "initialized": fresh}


# -- export --------------------------------------------------------------------------


def export_config(cfg: ModelConfig, arch: str) -> dict:
  """An HF config.json for the backbone of ``cfg``; refuses what the HF architecture cannot express."""
  _refuse(arch not in ARCHS, "architecture", f"{arch!r} (supported: {ARCHS})")
  _refuse(cfg.num_shared_experts > 0, "shared experts", f"{arch} has none")
  _refuse(cfg.router_scoring != "softmax", "router scoring", cfg.router_scoring)
  _refuse(cfg.qk_norm != (arch == "qwen3_moe"), "QK-norm", f"qk_norm={cfg.qk_norm} for {arch}")
  if arch == "mixtral":
    _refuse(cfg.num_dense_layers > 0, "dense layers", "Mixtral has none")
    _refuse(not cfg.normalize_top_k, "unnormalized top-k", "Mixtral renormalizes")
  common = dict(
    model_type=arch,
    vocab_size=cfg.text_vocab_size,
    hidden_size=cfg.d_model,
    num_hidden_layers=cfg.num_layers,
    num_attention_heads=cfg.num_heads,
    num_key_value_heads=cfg.num_kv_heads,
    head_dim=cfg.head_dim,
    hidden_act="silu",
    max_position_embeddings=cfg.attention_window,
    rms_norm_eps=cfg.norm_eps,
    rope_parameters={"rope_theta": cfg.rope_theta, "rope_type": "default"},
    num_experts_per_tok=cfg.experts_per_token,
    tie_word_embeddings=False,
    dtype=cfg.param_dtype,
  )
  if arch == "mixtral":
    return dict(
      common,
      architectures=["MixtralForCausalLM"],
      intermediate_size=cfg.expert_ffn_dim,
      num_local_experts=cfg.num_experts,
      sliding_window=cfg.attention_window,
    )
  return dict(
    common,
    architectures=["Qwen3MoeForCausalLM"],
    intermediate_size=cfg.dense_ffn_dim,
    moe_intermediate_size=cfg.expert_ffn_dim,
    num_experts=cfg.num_experts,
    norm_topk_prob=cfg.normalize_top_k,
    mlp_only_layers=list(range(cfg.num_dense_layers)),
    decoder_sparse_step=1,
    use_sliding_window=False,
    attention_bias=False,
  )


def _export_table(cfg: ModelConfig, arch: str, tied: bool) -> dict[str, list[Entry]]:
  table = mapping(cfg, arch, tied=tied)
  if cfg.tie_text_embedding:  # our tied table lives under the head; lm_head is written from it, scaled
    table["text_head/table"] = table.pop("text_table")
    del table["text_head/unembed"]
  elif tied:
    del table["text_head/unembed"]  # the source stored one table; it is written once
  return table


def _check_tie(src, tied: bool) -> bool:
  """Keep the source's tie only if the unembedding is still exactly the table's transpose."""
  if not tied:
    return False
  arrays = dict(serve.iter_arrays(src, ["text_table", "text_head/unembed"]))
  return bool(np.array_equal(arrays["text_table"].T, arrays["text_head/unembed"]))


def interaction_to_hf(src, dst, arch: str | None = None, *, max_shard_bytes: int = 5 << 30) -> dict:
  """Write the text backbone of serve checkpoint ``src`` as an HF checkpoint (config.json + safetensors)."""
  manifest = serve.read_manifest(src)
  cfg = serve.model_config(src)
  source = manifest.get("source") or {}
  if source.get("kind") == "hf":
    if arch not in (None, source.get("arch")):
      raise ValueError(f"{src} was imported from {source.get('arch')}; exporting it as {arch} is not supported")
    arch, hf_cfg = source["arch"], dict(source["hf_config"])
    tied = _check_tie(src, bool(source.get("tied_embeddings")))
    hf_cfg["tie_word_embeddings"] = tied
  else:
    if arch is None:
      raise ValueError(f"{src} was not imported from HF: pass --arch ({'|'.join(ARCHS)})")
    hf_cfg, tied = export_config(cfg, arch), False
  table = _export_table(cfg, arch, tied)
  dst = pathlib.Path(dst)
  if dst.exists() and any(dst.iterdir()):
    raise FileExistsError(f"{dst} exists and is not empty; choose a new --dst")
  dst.mkdir(parents=True, exist_ok=True)
  dtype = serve.dtype_of(cfg.param_dtype)
  plan = [(en.hf_name, dtype, en.hf_shape) for entries in table.values() for en in entries]
  if cfg.tie_text_embedding:
    plan.append(("lm_head.weight", dtype, (cfg.text_vocab_size, cfg.d_model)))
  shards, size = [[]], 0
  for item in plan:
    nbytes = math.prod(item[2]) * dtype.itemsize
    if shards[-1] and size + nbytes > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(item)
    size += nbytes
  names = (
    ["model.safetensors"]
    if len(shards) == 1
    else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
  )
  writers, file_of = [], {}
  for fname, items in zip(names, shards, strict=True):
    writers.append(SafetensorsWriter(dst / fname, items, metadata={"format": "pt"}))
    file_of.update({it[0]: writers[-1] for it in items})
  for name, array in serve.iter_arrays(src, list(table)):
    entries = table[name]
    chunks = array.reshape(len(entries), *_chunk_shape(array.shape, len(entries)))
    for en, c in zip(entries, chunks, strict=True):
      t = c.reshape(en.hf_shape[::-1] if en.transpose else en.hf_shape)
      file_of[en.hf_name].write(en.hf_name, t.T if en.transpose else t)
    if name == "text_head/table":
      scaled = (array.astype(np.float32) * cfg.d_model**-0.5).astype(dtype)
      file_of["lm_head.weight"].write("lm_head.weight", scaled)
  for w in writers:
    w.close()
  if len(shards) > 1:
    index = {"metadata": {}, "weight_map": {it[0]: n for n, items in zip(names, shards, strict=True) for it in items}}
    (dst / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
  (dst / "config.json").write_text(json.dumps(hf_cfg, indent=2))
  dropped = sorted(set(params_lib.param_infos(cfg)) - set(table))
  return {"arch": arch, "tensors": len(plan), "files": names, "dropped": dropped}
