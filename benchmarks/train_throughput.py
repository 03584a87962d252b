r"""Training throughput: tokens/s, step time and MFU of the jitted train step.

  python benchmarks/train_throughput.py [--steps 20] [--quick]

Rows: the tiny config on 8 virtual CPU devices (data=2, expert=4) and on 1
device, and a wider config (d_model 512, ffn scaled with it) where matmuls
dominate. MFU is model FLOPs/s over this machine's measured float32 matmul peak
(``interaction.flops``). Random batches: this measures the step, not the data
pipeline (see benchmarks/data_throughput.py). Prints a table, then one JSON line.
"""

# isort: off
from launch import cpu_devices  # noqa: F401  (must precede jax)
# isort: on

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from experiments import tiny  # noqa: E402
from interaction import config as config_lib  # noqa: E402
from interaction import flops as metrics  # noqa: E402
from interaction import layout, sharding  # noqa: E402
from interaction import train_step as train  # noqa: E402


def wide_config():
  c = tiny.get_config()
  c.model.update(d_model=512, num_heads=8, num_kv_heads=4, head_dim=64, dense_ffn_dim=2048, expert_ffn_dim=512)
  c.model.update(flow_hidden=512)
  return c


def measure(config, mesh_axes, devices, steps: int, peak: float) -> dict:
  cfg = config_lib.model_config(config)
  mesh = sharding.make_mesh(mesh_axes, devices)
  graphdef, state, shardings = train.create(cfg, config.train, mesh)
  step = train.make_train_step(graphdef, cfg, config.train, mesh, shardings)
  b, n = config.data.batch_size, config.data.window_turns
  batch = layout.random_streams(cfg.streams, (b, n), seed=0)
  batch.update(first_turn=np.zeros(b, np.int32), turn_mask=np.ones((b, n), np.float32))
  batch = train.global_batch(batch, mesh)
  t = time.perf_counter()
  state, m = step(state, batch)
  jax.block_until_ready(m)
  compile_s = time.perf_counter() - t
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    state, m = step(state, batch)
    jax.block_until_ready(m)
    times.append(time.perf_counter() - t)
  step_s = float(np.median(times))
  tokens = b * n * layout.tokens_per_turn(cfg.streams)
  flops = metrics.train_flops_per_window(cfg, n) * b
  return {
    "devices": len(devices),
    "mesh": {k: v for k, v in dict(mesh.shape).items() if v > 1},
    "d_model": cfg.d_model,
    "tokens_per_step": tokens,
    "step_ms_median": round(step_s * 1e3, 1),
    "tokens_per_sec": round(tokens / step_s, 1),
    "model_gflop_per_step": round(flops / 1e9, 2),
    "mfu": round(flops / step_s / peak, 4),
    "compile_s": round(compile_s, 1),
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--steps", type=int, default=20, help="timed steps per row (after one compile step)")
  parser.add_argument("--quick", action="store_true", help="3 timed steps per row")
  args = parser.parse_args()
  steps = 3 if args.quick else args.steps
  peak = metrics.measure_matmul_peak()
  devices = jax.devices()
  rows = [
    ("tiny", measure(tiny.get_config(), {"data": 2, "expert": 4}, devices[:8], steps, peak)),
    ("tiny", measure(tiny.get_config(), {}, devices[:1], steps, peak)),
    ("wide512", measure(wide_config(), {}, devices[:1], steps, peak)),
    ("wide512", measure(wide_config(), {"data": 2, "expert": 4}, devices[:8], steps, peak)),
  ]
  print(
    f"float32 matmul peak (measured, 2048^3): {peak / 1e9:.1f} GFLOP/s; jax {jax.__version__} on {jax.default_backend()}"
  )
  head = f"{'config':<9}{'devices':>8}{'mesh':>22}{'tokens/step':>12}{'step ms':>9}{'tokens/s':>10}{'GFLOP/step':>11}{'MFU':>7}"
  print(head)
  print("-" * len(head))
  for name, r in rows:
    print(
      f"{name:<9}{r['devices']:>8}{json.dumps(r['mesh']):>22}{r['tokens_per_step']:>12}{r['step_ms_median']:>9}"
      f"{r['tokens_per_sec']:>10}{r['model_gflop_per_step']:>11}{r['mfu']:>7.1%}"
    )
  wide_mfu = max(r["mfu"] for name, r in rows if name == "wide512")
  print(f"target: MFU >= 30% at d_model 512 -> {'pass' if wide_mfu >= 0.30 else 'FAIL'} ({wide_mfu:.1%})")
  result = {
    "benchmark": "train_throughput",
    "peak_gflops": round(peak / 1e9, 1),
    "rows": [dict(r, config=name) for name, r in rows],
    "wide_mfu": wide_mfu,
    "target_mfu": 0.30,
    "jax": jax.__version__,
  }
  print(json.dumps(result))


if __name__ == "__main__":
  main()
