"""MoE: dropless dispatch equals a naive per-expert loop, on one device and expert-parallel."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from interaction import moe, sharding
from tests.helpers import tiny_cfg


def naive_moe(layer, x_BTD):
  """Every token through each of its top-k experts, one at a time, in float32."""
  x = np.asarray(x_BTD, np.float32).reshape(-1, x_BTD.shape[-1])
  logits = x @ np.asarray(layer.router[...])
  weights, experts, _ = moe.route(jnp.asarray(logits), layer.k, layer.scoring, layer.normalize)
  weights, experts = np.asarray(weights), np.asarray(experts)
  gate, up, down = (np.asarray(w[...], np.float32) for w in (layer.gate, layer.up, layer.down))
  y = np.zeros_like(x)
  for n in range(x.shape[0]):
    for slot in range(layer.k):
      e = experts[n, slot]
      g, u = x[n] @ gate[e], x[n] @ up[e]
      y[n] += weights[n, slot] * ((g / (1 + np.exp(-g))) * u) @ down[e]
  if layer.shared is not None:
    y += np.asarray(layer.shared(jnp.asarray(x)))
  return y.reshape(x_BTD.shape)


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
@pytest.mark.parametrize("impl", ["tiled", "ragged_dot"])
def test_dispatch_equals_naive_loop_on_one_device(scoring, impl):
  cfg = tiny_cfg(router_scoring=scoring, gmm_impl=impl, gmm_tile=16)
  layer = moe.MoE(cfg, rngs=nnx.Rngs(1))
  x = jax.random.normal(jax.random.key(0), (2, 24, cfg.d_model))
  y, stats = jax.jit(lambda x: layer(x))(x)
  np.testing.assert_allclose(y, naive_moe(layer, x), atol=1e-5)
  assert float(stats["expert_counts"].sum()) == 2 * 24 * cfg.experts_per_token


def test_expert_parallel_on_4_devices_equals_naive_loop():
  cfg = tiny_cfg(gmm_tile=16)
  layer = moe.MoE(cfg, rngs=nnx.Rngs(2))
  x = jax.random.normal(jax.random.key(1), (4, 16, cfg.d_model))
  mesh = sharding.make_mesh({"expert": 4}, jax.devices()[:4])
  graphdef, state = nnx.split(layer)
  with jax.set_mesh(mesh):
    state = jax.device_put(state, sharding.param_shardings(state, mesh, cfg.rules))
    y, stats = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, x)
  assert y.sharding.spec[0] == "expert"
  np.testing.assert_allclose(y, naive_moe(layer, x), atol=1e-5)
  assert float(stats["expert_counts"].sum()) == 4 * 16 * cfg.experts_per_token


def test_no_token_dropped_when_all_route_to_one_expert():
  cfg = tiny_cfg(gmm_tile=16, num_shared_experts=0)
  layer = moe.MoE(cfg, rngs=nnx.Rngs(3))
  # A router that scores expert 5 above all others for every token, and 2 second.
  router = np.zeros((cfg.d_model, cfg.num_experts), np.float32)
  router[:, 5], router[:, 2] = 0.02, 0.01
  layer.router[...] = jnp.asarray(router)
  x = jnp.abs(jax.random.normal(jax.random.key(2), (4, 16, cfg.d_model)))
  expected = naive_moe(layer, x)
  for mesh_axes, devices in [(None, None), ({"expert": 4}, jax.devices()[:4])]:
    if mesh_axes is None:
      y, stats = jax.jit(lambda x: layer(x))(x)
    else:
      mesh = sharding.make_mesh(mesh_axes, devices)
      with jax.set_mesh(mesh):
        y, stats = jax.jit(lambda x: layer(x))(x)
    counts = np.asarray(stats["expert_counts"])
    assert counts[5] == 64 and counts[2] == 64 and counts.sum() == 128
    assert np.all(np.abs(np.asarray(y)).sum(-1) > 0), "a token got no expert output"
    np.testing.assert_allclose(y, expected, atol=1e-5)


def test_tiled_grouped_matmul_equals_ragged_dot_including_empty_groups():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(100, 8)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(5, 8, 6)), jnp.float32)
  for sizes in ([20, 0, 50, 30, 0], [0, 0, 0, 0, 100], [1, 2, 3, 4, 5]):
    gs = jnp.asarray(sizes, jnp.int32)
    got = moe.tiled_grouped_matmul(x, w, gs, tile=16)
    want = jax.lax.ragged_dot(x, w, gs)
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert np.all(np.asarray(got)[sum(sizes) :] == 0)


def test_router_losses_are_reported():
  cfg = tiny_cfg()
  layer = moe.MoE(dataclasses.replace(cfg), rngs=nnx.Rngs(0))
  _, stats = layer(jax.random.normal(jax.random.key(0), (2, 8, cfg.d_model)))
  out = moe.router_losses(stats, cfg.experts_per_token)
  assert out["expert_load"].shape == (cfg.num_experts,)
  np.testing.assert_allclose(out["expert_load"].sum(), 1.0, rtol=1e-6)
  assert float(out["load_balance_loss"]) > 0 and float(out["router_z_loss"]) > 0
