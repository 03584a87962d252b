"""Give a CPU-only host virtual devices before jax is imported.

The embedded default runs on 8 virtual CPU devices so the expert-parallel mesh
is real. ``INTERACTION_CPU_DEVICES`` overrides the count; an explicit device
count already in ``XLA_FLAGS`` wins. Import this module before jax.
"""

import os


def configure(default: int = 8) -> None:
  flags = os.environ.get("XLA_FLAGS", "")
  if "xla_force_host_platform_device_count" in flags:
    return
  count = int(os.environ.get("INTERACTION_CPU_DEVICES", default))
  os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={count}".strip()


configure()
