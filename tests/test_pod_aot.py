"""AOT compile for a TPU slice without a TPU: topology parsing and the memory report's fields."""

import dataclasses
import json

import jax
import numpy as np
import pytest
from flax import nnx

from experiments import tml_interaction_small
from interaction import moe, sharding
from interaction.experiment import experiment
from launch import aot
from tests.helpers import tiny_cfg


def test_topology_names_map_to_chips_and_shapes():
  t = aot.parse_topology("v5p-256")
  assert (t.chips, t.shape, t.hosts, t.chips_per_host) == (128, "4x4x8", 32, 4)
  assert aot.parse_topology("v5p-16").chips == 8 and aot.parse_topology("v6e-256").shape == "16x16"
  for name in ["v5p-64", "v5p-128", "v5p-512", "v6e-64", "v6e-128"]:
    assert name in aot.known_topologies()
  for bad in ["v5p-7", "v5p-2048", "v9-8", "v5p"]:
    with pytest.raises(ValueError, match="unknown topology .* known: v4-8, .*v5p-8"):
      aot.parse_topology(bad)


def test_moe_chunks_leave_the_expert_parallel_output_unchanged():
  x = jax.random.normal(jax.random.key(1), (4, 16, 128))
  mesh = sharding.make_mesh({"expert": 4}, jax.devices()[:4])
  out = []
  for chunks in (1, 4):
    layer = moe.MoE(tiny_cfg(gmm_tile=16, moe_chunks=chunks), rngs=nnx.Rngs(2))
    graphdef, state = nnx.split(layer)

    def loss(s, x, graphdef=graphdef):
      y, _ = nnx.merge(graphdef, s)(x)
      return (y**2).sum(), y

    with jax.set_mesh(mesh):
      state = jax.device_put(state, sharding.param_shardings(state, mesh, layer.rules))
      (_, y), g = jax.jit(jax.value_and_grad(loss, has_aux=True))(state, x)
    out.append((np.asarray(y), np.asarray(g["gate"][...])))
  # Not bitwise: XLA:CPU blocks a matmul by its row count, and a chunk has fewer rows.
  np.testing.assert_allclose(out[1][0], out[0][0], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out[1][1], out[0][1], rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="moe_chunks must be >= 1"):
    tiny_cfg(moe_chunks=0)


def small_pod_config():
  """The 276B config's shape of things (streams, MoE, sigmoid router) at toy width."""
  c = tml_interaction_small.get_config()
  c.model.update(d_model=256, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=64, dense_ffn_dim=512)
  c.model.update(num_experts=16, expert_ffn_dim=128, flow_hidden=128, video_hidden=32, attention_window=512)
  c.model.update(moe_chunks=2)
  c.data.update(window_turns=16, batch_size=8)
  c.mesh.update(fsdp=-1, expert=2)
  c.serve.update(slots=4, cache_tokens=512, mesh=dict(expert=4))
  return c


@pytest.fixture(scope="module")
def libtpu():
  pytest.importorskip("libtpu", reason="libtpu is not installed (pip install '.[tpu]'): no TPU compiler to AOT with")


@pytest.mark.parametrize("job", ["train", "serve"])
def test_aot_compile_for_v5p_8_reports_per_chip_memory_and_flops(libtpu, job):
  r = aot.report(experiment(small_pod_config()), "v5p-8", job)
  assert r["topology"] == "v5p-8" and r["chips"] == 4 and r["job"] == job and r["compile_error"] is None
  assert r["mesh"] == ({"fsdp": 2, "expert": 2} if job == "train" else {"expert": 4})
  parts = ["argument_bytes", "output_bytes", "temp_bytes", "code_bytes"]
  assert all(r[k] > 0 for k in parts)
  assert r["total_bytes"] == sum(r[k] for k in parts) - r["alias_bytes"]
  assert r["alias_bytes"] > 0, "the donated state must alias the outputs"
  assert 0 < r["total_bytes"] < r["hbm_bytes"] == 95 * aot.GIB and r["fits"] and aot.shortfall(r) is None
  assert r["xla_flops_per_chip"] > 0 and r["model_flops_per_chip"] > 0 and r["bytes_accessed_per_chip"] > 0
  assert r["roofline_step_s"] > 0 and 0 < r["roofline_mfu"] <= 1
  assert r["batch"] == (8 if job == "train" else 4)
  text = aot.format_report(r)
  assert "temporaries" in text and "fits" in text and "MFU" in text
  small = dict(r, hbm_bytes=r["total_bytes"] - aot.GIB // 2, fits=False)
  assert "exceeds" in aot.shortfall(small) and "by 0.50 GiB" in aot.shortfall(small)


@pytest.mark.parametrize("topology", ["v4-8", "v5e-4"])
def test_v4_and_v5e_slices_compile_the_serve_step_one_device_per_chip(libtpu, topology):
  r = aot.report(experiment(small_pod_config()), topology, "serve")
  chip = aot.parse_topology(topology).chip
  assert r["chips"] == 4 and r["mesh"] == {"expert": 4} and r["compile_error"] is None
  assert r["hbm_bytes"] == {"v4": 32, "v5e": 16}[chip.name] * aot.GIB and r["fits"]
  assert aot.parse_topology("v5litepod-16").name == "v5e-16"


OOM_CONFIG = """
from tests.test_pod_aot import small_pod_config

def get_config():
  c = small_pod_config()
  if "{job}" == "serve":
    c.serve.update(cache_tokens=2**26)  # 64M-token caches: 4 slots' KV and scratch far past 95 GiB
  else:
    c.model.update(expert_ffn_dim=2**22)  # ~200 GiB of expert weights and Adam moments per chip
  return c
"""


@pytest.mark.parametrize("job", ["train", "serve"])
def test_a_config_that_cannot_fit_exits_1_naming_the_shortfall(libtpu, job, tmp_path, capsys):
  path = tmp_path / f"oom_{job}.py"
  path.write_text(OOM_CONFIG.format(job=job))
  assert aot.main(["--config", str(path), "--topology", "v5p-8", "--job", job, "--json"]) == 1
  out, err = capsys.readouterr()
  r = json.loads(out.strip().splitlines()[-1])
  # The compiler's refusal is the report (serve passes a PRNG key: its bytes are counted, not a TypeError).
  assert r["compile_error"].startswith("RESOURCE_EXHAUSTED") and not r["fits"]
  assert r["temp_bytes"] > r["hbm_bytes"] and r["argument_bytes"] > 0
  assert "DOES NOT FIT" in out and "from the compiler's message" in out
  assert f"error: {job} step does not fit on v5p-8:" in err and "exceeds 95 GiB HBM by" in err


def test_unknown_topology_is_a_clear_error_before_compiling():
  with pytest.raises(ValueError, match="unknown topology 'v5p-3'"):
    aot.report(experiment(small_pod_config()), "v5p-3")


def test_mesh_that_does_not_divide_the_slice_is_named(libtpu):
  with pytest.raises(ValueError, match="needs 12 devices, have 4"):
    aot.report(experiment(small_pod_config()), "v5p-8", mesh_axes={"fsdp": 3, "expert": 4})


def test_abstract_state_matches_the_allocated_one():
  from interaction import train_step as train

  config = small_pod_config()
  config.train = tml_interaction_small.get_config().train
  cfg = dataclasses.replace(experiment(config).model, num_layers=2)
  mesh = sharding.make_mesh({"fsdp": 2, "expert": 4})
  _, state, shardings = train.create(cfg, experiment(config).train, mesh)
  _, abstract, abstract_sh = train.abstract_create(cfg, experiment(config).train, mesh)
  same = jax.tree.map(
    lambda a, b: (a.shape, a.dtype) == (b.shape, b.dtype) and a.sharding.is_equivalent_to(b.sharding, a.ndim),
    state,
    abstract,
  )
  assert all(jax.tree.leaves(same))
  assert jax.tree.structure(shardings) == jax.tree.structure(abstract_sh)
