"""The same model on every mesh: same initial loss, and checked-in parameter shardings.

Regenerate the golden table after an intended sharding change with
``UPDATE_GOLDEN=1 pytest tests/test_meshes.py``.
"""

import json
import os
import pathlib

import jax
import numpy as np
import pytest
from flax import nnx

from interaction import sharding
from interaction.ckpt import abstract_model
from interaction.model import InteractionModel
from tests.helpers import loss_fn, random_batch, tiny_cfg

GOLDEN = pathlib.Path(__file__).parent / "golden" / "param_shardings.json"
MESHES = {
  "data8": {"data": 8},
  "data2_expert4": {"data": 2, "expert": 4},
  "fsdp2_expert2_tensor2": {"fsdp": 2, "expert": 2, "tensor": 2},
}


def spec_table(cfg, axes):
  mesh = jax.sharding.AbstractMesh(sharding.mesh_shape(axes, 8), sharding.MESH_AXES)
  specs = sharding.param_specs(abstract_model(cfg)[1], mesh, cfg.rules)
  return {"/".join(map(str, path)): str(tuple(v.get_value())) for path, v in nnx.to_flat_state(specs)}


def test_parameter_shardings_match_golden_table():
  cfg = tiny_cfg()
  got = {name: spec_table(cfg, axes) for name, axes in MESHES.items()}
  if os.environ.get("UPDATE_GOLDEN"):
    GOLDEN.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
  want = json.loads(GOLDEN.read_text())
  assert got == want, "parameter shardings changed; if intended, regenerate with UPDATE_GOLDEN=1"
  # The table is not vacuous: experts are split over the expert axis where it exists.
  assert got["data2_expert4"]["moe/blocks/ffn/gate"] == "(None, 'expert', None, None)"
  assert got["fsdp2_expert2_tensor2"]["moe/blocks/attn/q"] == "(None, 'fsdp', 'tensor', None)"


@pytest.fixture(scope="module")
def single_device_loss():
  cfg = tiny_cfg()
  graphdef, params = nnx.split(InteractionModel(cfg, rngs=nnx.Rngs(0)))
  batch = random_batch(cfg, 8, 16, seed=11)
  return float(jax.jit(loss_fn(graphdef))(params, batch)["total"]), batch


@pytest.mark.parametrize("name", list(MESHES))
def test_same_initial_loss_on_every_mesh(name, single_device_loss):
  ref, batch = single_device_loss
  cfg = tiny_cfg()
  mesh = sharding.make_mesh(MESHES[name])
  graphdef, params = sharding.init_sharded(lambda: InteractionModel(cfg, rngs=nnx.Rngs(0)), mesh, cfg.rules)
  leaf = params["moe"]["blocks"]["ffn"]["gate"].get_value()
  want = jax.sharding.NamedSharding(
    mesh, sharding.logical_to_spec(("layers", "expert", "expert_embed", "expert_mlp"), mesh, cfg.rules)
  )
  assert leaf.sharding.is_equivalent_to(want, leaf.ndim)
  with jax.set_mesh(mesh):
    loss = float(jax.jit(loss_fn(graphdef))(params, batch)["total"])
  print(f"\n{name}: loss {loss:.7f} vs one device {ref:.7f}")
  assert abs(loss - ref) <= 1e-5
  assert np.isfinite(loss)
