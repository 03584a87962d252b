"""Full-size config counted from jax.eval_shape (no memory), and every config loads."""

import importlib
import pathlib
import subprocess
import sys

import pytest

from interaction import config as config_lib
from interaction import flops

ROOT = pathlib.Path(__file__).parent.parent
EXPERIMENTS = sorted(p.stem for p in (ROOT / "experiments").glob("*.py") if p.stem != "__init__")


def test_tml_interaction_small_is_276b_total_12b_active():
  cfg = config_lib.model_config(importlib.import_module("experiments.tml_interaction_small").get_config())
  counts = flops.count_params(cfg)
  print(f"\ntml_interaction_small: total {counts['total']:,}, active {counts['active']:,}")
  assert abs(counts["total"] / 276e9 - 1) <= 0.01
  assert abs(counts["active"] / 12e9 - 1) <= 0.03


def test_launch_inspect_prints_the_same_counts():
  cfg = config_lib.model_config(importlib.import_module("experiments.tml_interaction_small").get_config())
  counts = flops.count_params(cfg)
  out = subprocess.run(
    [
      sys.executable,
      "-m",
      "launch.inspect",
      "--config",
      "experiments/tml_interaction_small.py",
      "--mesh",
      "fsdp=16,expert=16",
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    check=True,
  ).stdout
  assert f"total {counts['total']:,}" in out and f"active per token {counts['active']:,}" in out
  assert "tokens per micro-turn: 32" in out
  assert "parameter bytes per device" in out


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_config_loads(name):
  config = importlib.import_module(f"experiments.{name}").get_config()
  cfg = config_lib.model_config(config)
  assert flops.count_params(cfg)["total"] > 0
  assert config.data.window_turns > 0 and config.serve.cache_tokens >= cfg.attention_window


def test_unknown_model_field_is_refused_by_name():
  config = importlib.import_module("experiments.tiny").get_config()
  config.model.d_modle = 3
  with pytest.raises(ValueError, match="d_modle"):
    config_lib.model_config(config)
