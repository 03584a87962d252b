"""The typed experiment config: every config loads, unknown keys are refused by name, defaults live in one
place, and inspect, the trainer and the loader resolve the same sharding rules."""

import ast
import dataclasses
import importlib
import json
import math
import pathlib
import re

import jax
import numpy as np
import pytest

from interaction import experiment as experiment_lib
from interaction import sharding, train_step
from interaction.experiment import experiment
from interaction.testing import experiment_config
from launch import inspect

ROOT = pathlib.Path(__file__).parent.parent
CONFIGS = sorted(p.stem for p in (ROOT / "experiments").glob("*.py") if p.stem != "__init__")


def get_config(name: str):
  return importlib.import_module(f"experiments.{name}").get_config()


@pytest.mark.parametrize("name", CONFIGS)
def test_every_experiment_config_loads_and_round_trips_through_its_saved_json(name):
  config = experiment(get_config(name))
  assert config.serve.cache_tokens >= config.model.attention_window
  saved = json.loads(json.dumps(config.to_dict()))  # what the trainer writes as config.json
  assert experiment(saved) == config
  assert set(saved) == set(experiment_lib.SECTIONS)


def test_values_the_config_files_set_reach_the_typed_config():
  tiny, small = experiment(get_config("tiny")), experiment(get_config("tml_interaction_small"))
  assert tiny.train.transition_weight == small.train.transition_weight == 3.0
  assert tiny.train.listen_weight == 1.0 and tiny.train.time_offset_turns == 18000
  assert small.train.moment_dtype == "bfloat16" and tiny.train.moment_dtype == "float32"
  assert tiny.data.synthetic_mix == (("visual_interjection", 3),)
  assert small.serve_mesh.axes() == {"data": 1, "fsdp": 1, "expert": 8, "tensor": 1}
  assert tiny.serve_mesh == tiny.mesh and tiny.mesh.axes()["data"] == -1
  assert small.model.rules["embed"] == ("fsdp", "expert") and tiny.model.rules == sharding.DEFAULT_RULES


@pytest.mark.parametrize(
  "section, key",
  [("train", "lr_typo"), ("data", "batchsize"), ("serve", "slot"), ("mesh", "expert_axis"), ("model", "d_modle")],
)
def test_an_unknown_key_is_refused_naming_it_its_section_and_the_known_keys(section, key):
  config = get_config("tiny")
  with config.unlocked():
    config[section][key] = 1
  with pytest.raises(ValueError) as e:
    experiment(config)
  message = str(e.value)
  assert "\n" not in message and f"unknown key {key!r} in config section {section!r}" in message
  known = {f.name for f in dataclasses.fields(type(getattr(experiment(get_config("tiny")), section)))}
  assert all(k in message for k in known - {"streams", "rules"})


@pytest.mark.parametrize(
  "where, value, match",
  [
    ((), {"trian": {}}, "unknown key 'trian' in config section 'experiment config'"),
    (("streams", "text_in"), {"vocab": 3}, "unknown key 'vocab' in config section 'streams.text_in'"),
    (("rules",), {"embedding": "fsdp"}, "unknown key 'embedding' in config section 'rules'"),
    (("serve", "mesh"), {"experts": 8}, "unknown key 'experts' in config section 'serve.mesh'"),
    (("train",), {"lr": "fast"}, "config key 'train.lr' must be float"),
    (("data",), {"bad_records": "ignore"}, "data.bad_records must be one of"),
    (("train",), {"inject_nan_steps": [3]}, "'train.inject_nan_steps' is retired"),
  ],
)
def test_bad_keys_and_values_anywhere_are_refused(where, value, match):
  config = json.loads(get_config("tml_interaction_small").to_json())
  node = config
  for key in where:
    node = node.setdefault(key, {})
  node.update(value)
  with pytest.raises(ValueError, match=match):
    experiment(config)


def test_old_saved_configs_open_missing_sections_take_the_defaults():
  old = json.loads(experiment_config().to_json())
  old["train"]["inject_nan_steps"] = []  # written by configs before fault injection became a fixture
  del old["data"], old["serve"]
  config = experiment(old)
  assert config.data == experiment_lib.DataConfig()
  assert config.serve.cache_tokens == config.model.attention_window and config.serve.mesh is None


def test_the_test_fixture_config_equals_tiny_as_a_typed_value():
  assert experiment(experiment_config()) == experiment(get_config("tiny"))


SECTION_NAMES = {"config", "tc", "train", "data", "serve", "mesh", "model", "rules", "serve_section"}


def _reads_a_config_section_with_get(node: ast.Call) -> bool:
  if not (isinstance(node.func, ast.Attribute) and node.func.attr == "get"):
    return False
  receiver = node.func.value
  name = receiver.attr if isinstance(receiver, ast.Attribute) else getattr(receiver, "id", "")
  return name in SECTION_NAMES or name.endswith("_section")


def test_no_module_reads_a_config_section_with_get():
  """Defaults live in interaction/experiment.py: no other module reads ``section.get(key, default)``."""
  builders = {ROOT / "interaction" / "experiment.py", ROOT / "interaction" / "config.py"}
  found = []
  for package in ("interaction", "data_pipeline", "serving", "launch", "benchmarks"):
    for path in sorted((ROOT / package).rglob("*.py")):
      if path in builders:
        continue
      tree = ast.parse(path.read_text(), filename=str(path))
      found += [
        f"{path.relative_to(ROOT)}:{n.lineno}"
        for n in ast.walk(tree)
        if isinstance(n, ast.Call) and _reads_a_config_section_with_get(n)
      ]
  assert not found, f"config sections read with .get(): {found}; give the field a default in interaction/experiment.py"
  # The check can fail: it finds the reads this module was written to remove.
  assert _reads_a_config_section_with_get(ast.parse('tc.get("transition_weight", 1.0)').body[0].value)
  assert _reads_a_config_section_with_get(ast.parse('config.data.get("dir")').body[0].value)


def _trainer_bytes_per_device(config, mesh) -> int:
  """Parameter bytes on one device under the shardings the trainer creates its state with."""
  _, state, shardings = train_step.abstract_create(config.model, config.train, mesh)
  total = 0
  for x, s in zip(jax.tree.leaves(state.params), jax.tree.leaves(shardings.params), strict=True):
    total += math.prod(s.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
  return total


def _inspect_bytes_per_device(config, mesh_axes) -> int:
  line = inspect.report(config.model, mesh_axes).splitlines()[-1]
  return int(re.search(r"parameter bytes per device ([\d,]+)", line).group(1).replace(",", ""))


def test_inspect_reports_the_parameter_bytes_per_device_the_trainer_lays_out():
  """tml_interaction_small on fsdp=16, expert=16 from jax.eval_shape (nothing allocated), with its rules."""
  config = experiment(get_config("tml_interaction_small"))
  axes = {"fsdp": 16, "expert": 16}
  mesh = inspect.abstract_mesh(axes)
  want = _trainer_bytes_per_device(config, mesh)
  assert _inspect_bytes_per_device(config, axes) == want
  # The rules matter here: without the config's embed=(fsdp, expert) dense weights take more per device.
  default = dataclasses.replace(config, model=dataclasses.replace(config.model, rules=sharding.DEFAULT_RULES))
  assert _inspect_bytes_per_device(default, axes) == _trainer_bytes_per_device(default, mesh) > want
