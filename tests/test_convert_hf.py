"""hf -> interaction -> hf: golden logits against transformers, exact round trip, refusals by name."""

import dataclasses
import functools
import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch", reason="golden logits need PyTorch (pip install torch==2.13.0, CPU wheel)")
transformers = pytest.importorskip("transformers", reason="golden logits need transformers to build the reference")

from data_pipeline import synthetic  # noqa: E402
from experiments import tiny  # noqa: E402
from interaction import ckpt  # noqa: E402
from interaction.ckpt import hf as hf_lib  # noqa: E402
from interaction.ckpt import params as params_lib  # noqa: E402
from interaction.ckpt import serve as serve_checkpoint  # noqa: E402
from interaction.ckpt.paths import UnsafePathError  # noqa: E402
from interaction.ckpt.safetensors_io import SafetensorsFile  # noqa: E402
from interaction.experiment import experiment  # noqa: E402
from launch import evaluate as evaluate_job  # noqa: E402
from serving.eval import scores  # noqa: E402
from tests.helpers import serve_a_session  # noqa: E402

ROOT = pathlib.Path(__file__).parent.parent

VOCAB = 300
EXPERIMENT = experiment(tiny.get_config())  # streams and modality settings of the imported models
SMALL = dict(vocab_size=VOCAB, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2)


def mixtral(**kw):
  kw = dict(SMALL, intermediate_size=48, num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=2, **kw)
  return transformers.MixtralConfig(max_position_embeddings=64, **kw)


def qwen3(**kw):
  kw = dict(SMALL, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3, num_experts=4, **kw)
  return transformers.Qwen3MoeConfig(head_dim=24, num_experts_per_tok=2, mlp_only_layers=[0], **kw)


MODELS = {
  # A 6-token sliding window, so the 12-token inputs exercise it.
  "mixtral": lambda: (transformers.MixtralForCausalLM, mixtral(sliding_window=6)),
  "qwen3_moe": lambda: (transformers.Qwen3MoeForCausalLM, qwen3(norm_topk_prob=True)),
  "qwen3_moe_tied": lambda: (transformers.Qwen3MoeForCausalLM, qwen3(norm_topk_prob=False, tie_word_embeddings=True)),
}


# The untied Qwen3-MoE variant adds little over the tied one: it runs in the slow suite.
@pytest.fixture(
  scope="module",
  params=[pytest.param(m, marks=pytest.mark.slow) if m == "qwen3_moe" else m for m in sorted(MODELS)],
)
def hf_model(request, tmp_path_factory):
  cls, config = MODELS[request.param]()
  torch.manual_seed(0)
  model = cls(config).eval()
  d = tmp_path_factory.mktemp(request.param)
  model.save_pretrained(d / "hf")
  return request.param.removesuffix("_tied"), model, d


@functools.partial(jax.jit, static_argnums=0)
def text_forward(graphdef, params, ids, positions):
  return params_lib.text_forward(nnx.merge(graphdef, params), ids, positions)


def hf_logits(model, ids, mask):
  pos = params_lib.left_pad_positions(mask).clip(min=0)
  with torch.no_grad():
    out = model(
      input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=torch.tensor(pos, dtype=torch.long)
    )
  return out.logits.float().numpy()


def inputs():
  rng = np.random.default_rng(0)
  # One shape for all, so the forward compiles once.
  full = [rng.integers(0, VOCAB, (2, 12)) for _ in range(2)]
  padded = rng.integers(0, VOCAB, (2, 12))
  padded_mask = np.ones((2, 12), np.int64)
  padded_mask[0, :5] = 0  # left padding: 7 real tokens
  padded_mask[1, :1] = 0
  return [(x, np.ones_like(x)) for x in full] + [(padded, padded_mask)]


def test_golden_logits_and_exact_round_trip(hf_model):
  arch, model, d = hf_model
  summary = hf_lib.hf_to_interaction(d / "hf", d / "ours", arch, experiment=EXPERIMENT)
  assert "embedders/audio_in/tables" in summary["initialized"] and "slot_embed" in summary["initialized"]
  assert not any(n.startswith(("moe/", "dense/")) for n in summary["initialized"])
  cfg = serve_checkpoint.model_config(d / "ours")
  params = jax.device_put(serve_checkpoint.load(d / "ours"))
  forward = functools.partial(text_forward, params_lib.graphdef(cfg), params)
  worst = 0.0
  for ids, mask in inputs():
    want = hf_logits(model, ids, mask)
    got = np.asarray(forward(ids, params_lib.left_pad_positions(mask)))
    real = mask.astype(bool)
    worst = max(worst, float(np.abs(got[real] - want[real]).max()))
  print(f"\n{arch}: max |logit diff| vs transformers = {worst:.2e} (logit scale {np.abs(want).max():.1f})")
  assert worst <= 1e-4

  hf_lib.interaction_to_hf(d / "ours", d / "back")
  src, back = SafetensorsFile(d / "hf" / "model.safetensors"), SafetensorsFile(d / "back" / "model.safetensors")
  assert sorted(src.names()) == sorted(back.names())
  for name in src.names():
    np.testing.assert_array_equal(back.get(name), src.get(name), err_msg=name)
  assert json.loads((d / "back" / "config.json").read_text()) == json.loads((d / "hf" / "config.json").read_text())
  again = type(model).from_pretrained(d / "back").eval()
  ids, mask = inputs()[2]
  np.testing.assert_array_equal(hf_logits(again, ids, mask), hf_logits(model, ids, mask))


@pytest.mark.slow
def test_interaction_trained_backbone_exports_and_matches(tmp_path):
  """A backbone that never came from HF (tied, scaled head) exports to a Qwen3-MoE transformers runs the same."""
  source = qwen3().to_dict() | {"model_type": "qwen3_moe", "vocab_size": 256}
  cfg = dataclasses.replace(hf_lib.import_config(source, "qwen3_moe", EXPERIMENT), tie_text_embedding=True)
  w = serve_checkpoint.Writer(tmp_path / "ours", cfg)
  for name, value in params_lib.init_params(cfg, params_lib.param_infos(cfg), seed=3).items():
    w.add(name, np.asarray(value))
  w.finish()
  hf_lib.interaction_to_hf(tmp_path / "ours", tmp_path / "hf", "qwen3_moe", max_shard_bytes=200_000)
  assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
  model = transformers.Qwen3MoeForCausalLM.from_pretrained(tmp_path / "hf").eval()
  params = jax.device_put(serve_checkpoint.load(tmp_path / "ours"))
  ids, mask = inputs()[0]
  ids = ids % 256
  got = np.asarray(text_forward(params_lib.graphdef(cfg), params, ids, None))
  np.testing.assert_allclose(got, hf_logits(model, ids, mask), atol=1e-4)


REFUSALS = [
  ("qwen3_moe", {"attention_bias": True}, "attention biases"),
  ("qwen3_moe", {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}}, "rope_scaling"),
  ("qwen3_moe", {"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling"),
  ("qwen3_moe", {"partial_rotary_factor": 0.5}, "partial rotary"),
  ("qwen3_moe", {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1}, "differs per layer"),
  ("qwen3_moe", {"mlp_only_layers": [1]}, "not a prefix"),
  ("qwen3_moe", {"shared_expert_intermediate_size": 64}, "shared experts"),
  ("qwen3_moe", {"hidden_act": "gelu"}, "activation"),
  ("mixtral", {"layer_types": ["full_attention", "sliding_attention"]}, "differs per layer"),
  ("mixtral", {"model_type": "qwen3_moe"}, "model_type"),
]


@pytest.mark.parametrize("arch,patch,message", REFUSALS)
def test_unsupported_features_are_refused_by_name(tmp_path, arch, patch, message):
  config = (mixtral() if arch == "mixtral" else qwen3()).to_dict() | {"model_type": arch} | patch
  with pytest.raises(hf_lib.UnsupportedSourceError, match=message):
    hf_lib.import_config(config, arch, EXPERIMENT)


def test_extra_source_tensors_are_refused_by_name(hf_model, tmp_path):
  arch, _, d = hf_model
  if arch != "mixtral":
    pytest.skip("one architecture is enough")
  from safetensors.numpy import save_file

  src = tmp_path / "biased"
  shutil.copytree(d / "hf", src)
  f = SafetensorsFile(d / "hf" / "model.safetensors")
  tensors = {n: np.array(f.get(n)) for n in f.names()}
  tensors["model.layers.0.self_attn.q_proj.bias"] = np.zeros(64, np.float32)
  save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
  with pytest.raises(hf_lib.UnsupportedSourceError, match="biases.*q_proj.bias"):
    hf_lib.hf_to_interaction(src, tmp_path / "out", arch, experiment=EXPERIMENT)


def test_pickle_weights_and_escaping_paths_are_refused(hf_model, tmp_path):
  arch, _, d = hf_model
  if arch != "mixtral":
    pytest.skip("one architecture is enough")
  pickled = tmp_path / "pickled"
  pickled.mkdir()
  shutil.copy(d / "hf" / "config.json", pickled)
  (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
  with pytest.raises(hf_lib.UnsafeFormatError, match=r"pickle.*pytorch_model\.bin"):
    hf_lib.hf_to_interaction(pickled, tmp_path / "o1", arch, experiment=EXPERIMENT)
  for target in ("../outside/model.safetensors", "/etc/passwd.safetensors"):
    src = tmp_path / f"index{len(target)}"
    shutil.copytree(d / "hf", src)
    index = {"weight_map": {"model.embed_tokens.weight": target}}
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(UnsafePathError):
      hf_lib.hf_to_interaction(src, tmp_path / "o2", arch, experiment=EXPERIMENT)
  outside = tmp_path / "outside"
  outside.mkdir()
  shutil.move(d / "hf" / "model.safetensors", outside / "model.safetensors")
  try:
    os.symlink(outside / "model.safetensors", d / "hf" / "model.safetensors")
    with pytest.raises(UnsafePathError, match="symlink"):
      hf_lib.hf_to_interaction(d / "hf", tmp_path / "o3", arch, experiment=EXPERIMENT)
  finally:
    os.unlink(d / "hf" / "model.safetensors")
    shutil.move(outside / "model.safetensors", d / "hf" / "model.safetensors")


def test_the_imported_model_opens_and_the_evaluation_job_runs_on_it(tmp_path):
  """What ``launch.convert hf-to-interaction`` writes is a model ``open_model``, the evaluation job and the live
  server open."""
  torch.manual_seed(0)
  # A 512-token attention window: the step's cache must hold the whole window, and 512 keeps the ticks cheap.
  transformers.Qwen3MoeForCausalLM(qwen3(norm_topk_prob=True, max_position_embeddings=512)).save_pretrained(
    tmp_path / "hf"
  )
  cmd = ["hf-to-interaction", "--src", tmp_path / "hf", "--dst", tmp_path / "ours", "--arch", "qwen3_moe"]
  out = subprocess.run(
    [sys.executable, "-m", "launch.convert", *map(str, cmd)], cwd=ROOT, capture_output=True, text=True, timeout=300
  )
  assert out.returncode == 0, out.stderr[-2000:]
  loaded = ckpt.open_model(tmp_path / "ours")
  assert loaded.layout == "serve" and loaded.step == 0 and loaded.cfg.text_vocab_size == VOCAB
  assert loaded.cfg == serve_checkpoint.model_config(tmp_path / "ours") and loaded.cfg.attention_window == 512
  assert loaded.cache_tokens == EXPERIMENT.serve.cache_tokens == 512  # the experiment's serving settings came along
  want = params_lib.flatten(serve_checkpoint.load(tmp_path / "ours"))
  got = params_lib.flatten(jax.device_get(loaded.params))
  assert sorted(got) == sorted(want) and all(np.array_equal(got[k], want[k]) for k in want)

  data = tmp_path / "data"
  synthetic.generate(data, "eval", len(synthetic.TASKS), seed=11)
  # Evaluated on meshes of 4 devices: two replicas of expert=4 (its 4 experts one per device), 8 slots each.
  args = ["--checkpoint", tmp_path / "ours", "--data", data, "--slots", "8", "--max-conversations", "7"]
  args += ["--mesh", "expert=4", "--replicas", "2"]
  assert evaluate_job.main([*map(str, args), "--output", str(tmp_path / "eval")]) == 0
  report = json.loads((tmp_path / "eval" / "report.json").read_text())
  assert sum(report["conversations"].values()) == 7 and set(scores.TARGETS) <= set(report["figures"])
  assert report["placement"] == {"replicas": 2, "mesh": {"expert": 4}}

  # The live server serves it: one WebSocket session of a few ticks gets the model's frames back.
  got = serve_a_session(tmp_path / "ours", ticks=3)
  assert got["started"]["type"] == "session.started" and [t["turn"] for t in got["ticks"]] == [0, 1, 2]
  assert len(got["audio"]) == 3 and all(len(a) == 1 + 2 * 3200 and a[0] == 0x01 for a in got["audio"])
  assert got["returncode"] == 0

  # A source window longer than the experiment's cache: the stored serving cache covers the window.
  transformers.Qwen3MoeForCausalLM(qwen3(max_position_embeddings=2048)).save_pretrained(tmp_path / "hf_long")
  hf_lib.hf_to_interaction(tmp_path / "hf_long", tmp_path / "long", "qwen3_moe", experiment=EXPERIMENT)
  assert ckpt.open_model(tmp_path / "long").cache_tokens == 2048
