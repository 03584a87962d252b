r"""Training throughput: tokens/s, step time and MFU of the jitted train step.

  python benchmarks/train_throughput.py [--steps 20] [--quick] [--sync_only --rounds 5 --loop_steps 10]

Rows: the tiny config on 8 virtual CPU devices (data=2, expert=4) and on 1
device, and a wider config (d_model 512, ffn scaled with it) where matmuls
dominate. MFU is model FLOPs/s over this machine's measured float32 matmul peak
(``interaction.flops``). Random batches: this measures the step, not the data
pipeline (see benchmarks/data_throughput.py). Then the training loop's bad-step check two ways on the
tiny config (8 devices): reading ``state.bad_streak`` back every step (a host sync: step n+1 is not
dispatched before step n finishes) against ``launch.trainer.StreakWatch`` (kept on the device, read
every ``log_every`` steps), in alternating rounds of ``--loop_steps`` steps so both see the same
machine load; tokens/s from each one's median round. Prints tables, then one JSON line.
"""

# isort: off
from launch import cpu_devices  # noqa: F401  (must precede jax)
# isort: on

import json  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import flags  # noqa: E402

from experiments import tiny  # noqa: E402
from interaction import flops as metrics  # noqa: E402
from interaction import layout, sharding  # noqa: E402
from interaction import train_step as train  # noqa: E402
from interaction.experiment import experiment  # noqa: E402
from launch import cli, trainer  # noqa: E402

FLAGS = cli.flag_values()
_STEPS = flags.DEFINE_integer("steps", 20, "Timed steps per row (after one compile step).", flag_values=FLAGS)
_QUICK = flags.DEFINE_bool("quick", False, "3 timed steps per row.", flag_values=FLAGS)
_SYNC_ONLY = flags.DEFINE_bool("sync_only", False, "Only the per-step sync comparison.", flag_values=FLAGS)
_ROUNDS = flags.DEFINE_integer("rounds", 5, "Rounds per variant of the sync comparison.", flag_values=FLAGS)
_LOOP_STEPS = flags.DEFINE_integer("loop_steps", 10, "Steps per round of the sync comparison.", flag_values=FLAGS)


def wide_config():
  c = tiny.get_config()
  c.model.update(d_model=512, num_heads=8, num_kv_heads=4, head_dim=64, dense_ffn_dim=2048, expert_ffn_dim=512)
  c.model.update(flow_hidden=512)
  return c


def measure(config, mesh_axes, devices, steps: int, peak: float) -> dict:
  cfg, step, state, batch = setup(config, mesh_axes, devices)
  b, n = config.data.batch_size, config.data.window_turns
  mesh = sharding.make_mesh(mesh_axes, devices)
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


def setup(config, mesh_axes, devices):
  """The jitted step, its first state and one device batch of random streams."""
  typed = experiment(config)
  cfg = typed.model
  mesh = sharding.make_mesh(mesh_axes, devices)
  graphdef, state, shardings = train.create(cfg, typed.train, mesh)
  step = train.make_train_step(graphdef, cfg, typed.train, mesh, shardings)
  b, n = config.data.batch_size, config.data.window_turns
  batch = layout.random_streams(cfg.streams, (b, n), seed=0)
  batch.update(first_turn=np.zeros(b, np.int32), turn_mask=np.ones((b, n), np.float32))
  return cfg, step, state, train.global_batch(batch, mesh, cfg.rules)


def measure_sync(config, mesh_axes, devices, rounds: int, steps: int) -> dict:
  """Tokens/s of the loop with the per-step ``int(state.bad_streak)`` and with ``StreakWatch``, interleaved."""
  cfg, step, state, batch = setup(config, mesh_axes, devices)
  limit, log_every = config.train.max_bad_steps, config.train.log_every

  def per_step_sync(state):
    for i in range(steps):
      state, m = step(state, batch)
      if (i + 1) % log_every == 0:
        jax.device_get(m)  # the loop's metrics row
      if int(state.bad_streak) >= limit:
        raise RuntimeError("non-finite steps in a benchmark")
    return state

  def device_watch(state):
    watch = trainer.StreakWatch(limit)
    for i in range(steps):
      state, m = step(state, batch)
      watch.update(state)
      if (i + 1) % log_every == 0:
        jax.device_get(m)
        if watch.tripped() is not None:
          raise RuntimeError("non-finite steps in a benchmark")
    return state

  variants = {"per_step_sync": per_step_sync, "device_watch": device_watch}
  for fn in variants.values():  # compile both paths once
    state = fn(state)
  jax.block_until_ready(state)
  times = {name: [] for name in variants}
  for r in range(rounds):
    for name in list(variants)[:: 1 if r % 2 == 0 else -1]:  # alternate which goes first
      t = time.perf_counter()
      state = jax.block_until_ready(variants[name](state))
      times[name].append(time.perf_counter() - t)
  tokens = config.data.batch_size * config.data.window_turns * layout.tokens_per_turn(cfg.streams) * steps
  out = {name: round(tokens / float(np.median(ts)), 1) for name, ts in times.items()}
  return {"steps_per_round": steps, "rounds": rounds, "log_every": log_every, "tokens_per_sec": out}


def print_sync(r: dict) -> None:
  print(f"bad-step check, tiny on 8 devices, {r['rounds']} interleaved rounds of {r['steps_per_round']} steps:")
  base = r["tokens_per_sec"]["per_step_sync"]
  for name, tps in r["tokens_per_sec"].items():
    print(f"  {name:<15}{tps:>10.1f} tokens/s  ({tps / base:.3f}x)")


def main(argv=None):
  cli.parse(FLAGS, argv, doc=__doc__, prog="benchmarks/train_throughput.py")
  devices = jax.devices()
  sync = measure_sync(tiny.get_config(), {"data": 2, "expert": 4}, devices[:8], _ROUNDS.value, _LOOP_STEPS.value)
  if _SYNC_ONLY.value:
    print_sync(sync)
    print(json.dumps({"benchmark": "train_throughput", "sync": sync, "jax": jax.__version__}))
    return
  steps = 3 if _QUICK.value else _STEPS.value
  peak = metrics.measure_matmul_peak()
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
  print_sync(sync)
  result = {
    "benchmark": "train_throughput",
    "peak_gflops": round(peak / 1e9, 1),
    "rows": [dict(r, config=name) for name, r in rows],
    "wide_mfu": wide_mfu,
    "target_mfu": 0.30,
    "sync": sync,
    "jax": jax.__version__,
  }
  print(json.dumps(result))


if __name__ == "__main__":
  main()
