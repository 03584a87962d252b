"""Shared builders for the tests: the fixtures of ``interaction.testing`` (benchmarks use them too)."""

from interaction.testing import (
  SMALL_MODEL,
  experiment_config,
  loss_fn,
  make_model,
  random_batch,
  save_checkpoint,
  tiny_cfg,
)

__all__ = [
  "SMALL_MODEL",
  "experiment_config",
  "loss_fn",
  "make_model",
  "random_batch",
  "save_checkpoint",
  "tiny_cfg",
]
