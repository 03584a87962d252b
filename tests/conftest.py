"""Test setup: 8 virtual CPU devices, set before jax is imported anywhere."""

import os

os.environ["XLA_FLAGS"] = " ".join(
  [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
  + ["--xla_force_host_platform_device_count=8"]
)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
