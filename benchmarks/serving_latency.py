r"""Serving latency of the sessions engine with the tiny config (random parameters).

  PYTHONPATH=. python benchmarks/serving_latency.py [--slots 1,8,32,64] [--ticks 200] [--long-ticks 1000] [--quick]
      [--placements one,mesh,processes] [--placement-slots 8,32,64] [--mesh data=2,expert=4]

- per-tick latency (median, p99) of ``Engine.tick`` with every slot holding a
  session, for each slot count, and the largest count whose p99 stays under the
  200 ms micro-turn (sessions served in real time on this machine);
- tail/head over ``--long-ticks`` ticks of one session: mean of the last 50
  ticks over the first 50 (target <= 1.05; the ring-buffer cache keeps a tick's
  cost flat in session length);
- the speedup of the persistent cache at tick 100: one tick versus re-running
  the whole history (a jitted forward over the 101 micro-turns) as a
  cache-less server would;
- placement: tick median / p99 at ``--placement-slots`` on one device, on the 8
  virtual devices as ``--mesh``, and on 2 processes x 4 devices as the same mesh
  (``serving.lockstep``: process 0 sends each tick's inputs to process 1, whose
  cost per tick is shown as ``send ms``).

Prints a table and, as the LAST line, one JSON object with the same figures.
Timings on a shared CPU are noisy: medians are quoted, the load average is shown.
"""

# isort: off
from launch import cpu_devices  # noqa: F401  (must precede jax)

# isort: on
import argparse
import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from experiments import tiny
from interaction import distributed, layout, sharding
from interaction.experiment import experiment
from interaction.model import InteractionModel
from launch import local
from serving import lockstep
from serving.engine import Engine, Sampling

TICK_MS = layout.MICRO_TURN_SECONDS * 1e3
TAIL_HEAD_TARGET = 1.05
EDGE = 50
WARMUP = 5
HISTORY_TURNS = 100


def make_engine(cfg, graphdef, params, slots, cache_tokens, **kw):
  engine = Engine(cfg, graphdef, params, slots=slots, cache_tokens=cache_tokens, **kw)
  for i in range(slots):
    engine.join(Sampling(temperature=1.0, seed=i))
  return engine


def inputs_for(engine, seed):
  specs = [s for s in engine.cfg.streams if s.direction == "in"]
  batch = layout.random_streams(specs, (engine.slots,), seed)
  return {sid: {k: v[s.slot] for k, v in batch.items()} for sid, s in engine.sessions.items()}


def time_ticks(engine, ticks: int) -> np.ndarray:
  pool = [inputs_for(engine, s) for s in range(4)]
  for i in range(WARMUP):
    engine.tick(pool[i % 4])
  ms = np.empty(ticks)
  for i in range(ticks):
    t0 = time.perf_counter()
    engine.tick(pool[i % 4])  # returns host arrays: the tick is complete
    ms[i] = (time.perf_counter() - t0) * 1e3
  return ms


def rerun_history_ms(cfg, graphdef, params, reps: int = 5) -> float:
  """A cache-less tick at micro-turn 100: the forward over all 101 micro-turns of one session."""
  streams = layout.random_streams(cfg.streams, (1, HISTORY_TURNS + 1), 0)

  @jax.jit
  def rerun(params, streams):
    model = nnx.merge(graphdef, params)
    first = jnp.zeros((1,), jnp.int32)
    x = model.embed_window(streams, first, HISTORY_TURNS + 1)
    h, _, _ = model.forward(x, model.window_positions(first, HISTORY_TURNS + 1))
    return model.text_logits(h[:, -1])

  jax.block_until_ready(rerun(params, streams))
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(rerun(params, streams))
    times.append((time.perf_counter() - t0) * 1e3)
  return float(np.median(times))


def summary_ms(ms) -> dict:
  return {"median_ms": float(np.median(ms)), "p99_ms": float(np.percentile(ms, 99))}


def tiny_model():
  config = experiment(tiny.get_config())
  graphdef, params = nnx.split(InteractionModel(config.model, rngs=nnx.Rngs(0)))
  return config, graphdef, nnx.to_pure_dict(params)


def worker(args) -> None:
  """One of 2 processes: process 0 times ticks of engines whose operations process 1 follows."""
  distributed.initialize_from_env()
  config, graphdef, params = tiny_model()
  mesh, channel = sharding.make_mesh(sharding.parse_mesh(args.mesh)), lockstep.Channel()
  rows = {}
  for slots in [int(s) for s in args.placement_slots.split(",")]:
    if jax.process_index() == 0:
      engine = make_engine(config.model, graphdef, params, slots, config.serve.cache_tokens, mesh=mesh, channel=channel)
      sent = (channel.send_s, channel.sent)
      ms = time_ticks(engine, args.ticks)
      rows[str(slots)] = {**summary_ms(ms), "send_ms": (channel.send_s - sent[0]) * 1e3 / (args.ticks + WARMUP)}
      engine.close()
    else:
      lockstep.follow(
        Engine(config.model, graphdef, params, slots=slots, cache_tokens=config.serve.cache_tokens, mesh=mesh), channel
      )
  if jax.process_index() == 0:
    print(json.dumps(rows), flush=True)


def two_processes(args) -> dict:
  """``worker`` on 2 processes x 4 CPU devices; process 0's rows."""
  port, procs = local.free_port(), []
  command = [sys.executable, __file__, "--worker", "--ticks", str(args.ticks)]
  command += ["--placement-slots", args.placement_slots, "--mesh", args.mesh]
  for i in range(2):
    env = local.process_env(i, 2, port, 4, timeout=120)
    env["PYTHONPATH"] = os.pathsep.join(
      [os.path.dirname(os.path.dirname(os.path.abspath(__file__))), env.get("PYTHONPATH", "")]
    )
    procs.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True))  # noqa: S603
  outs = [p.communicate(timeout=3600)[0] for p in procs]
  if any(p.returncode for p in procs):
    raise SystemExit(f"the 2-process run failed: exit {[p.returncode for p in procs]}\n{outs[0][-2000:]}")
  return json.loads(outs[0].strip().splitlines()[-1])


def placements(args, config, graphdef, params, per_slots) -> dict:
  """Tick figures per placement and slot count (one device, a mesh of 8 devices, 2 processes)."""
  wanted, counts = args.placements.split(","), [int(s) for s in args.placement_slots.split(",")]
  rows = {}
  if "one" in wanted:
    rows["one device"] = {
      str(n): per_slots.get(str(n))
      or summary_ms(time_ticks(make_engine(config.model, graphdef, params, n, config.serve.cache_tokens), args.ticks))
      for n in counts
    }
  if "mesh" in wanted:
    mesh = sharding.make_mesh(sharding.parse_mesh(args.mesh))
    rows[f"8 devices {args.mesh}"] = {
      str(n): summary_ms(
        time_ticks(make_engine(config.model, graphdef, params, n, config.serve.cache_tokens, mesh=mesh), args.ticks)
      )
      for n in counts
    }
  if "processes" in wanted:
    rows[f"2 processes x 4 {args.mesh}"] = two_processes(args)
  print(f"\n{'placement':<36} {'slots':>5}  {'median ms':>9}  {'p99 ms':>8}  {'send ms':>7}")
  for name, by_slots in rows.items():
    for n, r in by_slots.items():
      send = f"{r['send_ms']:>7.2f}" if "send_ms" in r else f"{'-':>7}"
      print(f"{name:<36} {n:>5}  {r['median_ms']:>9.1f}  {r['p99_ms']:>8.1f}  {send}")
  return rows


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--slots", default="1,8,32,64")
  p.add_argument("--ticks", type=int, default=200, help="timed ticks per slot count")
  p.add_argument("--long-ticks", type=int, default=1000, help="ticks of the one-session tail/head run")
  p.add_argument("--quick", action="store_true", help="smoke run: 20 ticks, 120 long ticks")
  p.add_argument("--placements", default="one,mesh,processes", help="any of one, mesh, processes; '' for none")
  p.add_argument("--placement-slots", default="8,32,64", help="slot counts of the placement table (multiples of 8)")
  p.add_argument("--mesh", default="data=2,expert=4", help="the 8-device mesh, in one process and across 2")
  p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.quick:
    args.ticks, args.long_ticks = 20, 120
  if args.worker:
    return worker(args)
  config, graphdef, params = tiny_model()
  cfg = config.model
  cache_tokens = config.serve.cache_tokens
  load0 = os.getloadavg()[0]
  print(f"serving_latency: tiny config, jax {jax.__version__}, {os.cpu_count()} CPUs, load {load0:.2f}", flush=True)

  per_slots = {}
  for slots in [int(s) for s in args.slots.split(",")]:
    ms = time_ticks(make_engine(cfg, graphdef, params, slots, cache_tokens), args.ticks)
    per_slots[str(slots)] = {"median_ms": float(np.median(ms)), "p99_ms": float(np.percentile(ms, 99))}
    per_slots[str(slots)]["real_time"] = per_slots[str(slots)]["p99_ms"] < TICK_MS
    print(f"  {slots} slots: median {np.median(ms):.1f} ms", flush=True)
  real_time = [int(k) for k, v in per_slots.items() if v["real_time"]]

  long_ms = time_ticks(make_engine(cfg, graphdef, params, 1, cache_tokens), args.long_ticks)
  tail_head = float(np.mean(long_ms[-EDGE:]) / np.mean(long_ms[:EDGE]))
  tail_head_median = float(np.median(long_ms[-EDGE:]) / np.median(long_ms[:EDGE]))

  engine = make_engine(cfg, graphdef, params, 1, cache_tokens)
  tick_at_100 = time_ticks(engine, HISTORY_TURNS + 20)[HISTORY_TURNS - 10 : HISTORY_TURNS + 10]
  tick_ms, rerun_ms = float(np.median(tick_at_100)), rerun_history_ms(cfg, graphdef, params)

  print(f"\n{'slots':>5}  {'median ms':>9}  {'p99 ms':>8}  {'p99 < 200 ms':>12}")
  for slots, r in per_slots.items():
    print(f"{slots:>5}  {r['median_ms']:>9.1f}  {r['p99_ms']:>8.1f}  {'yes' if r['real_time'] else 'no':>12}")
  print(f"largest slot count served in real time (p99 < {TICK_MS:.0f} ms): {max(real_time, default=0)}")
  verdict = "PASS" if tail_head <= TAIL_HEAD_TARGET else "FAIL"
  print(
    f"tail/head over {args.long_ticks} ticks of one session: {tail_head:.3f} (target <= {TAIL_HEAD_TARGET}) {verdict}"
    f"; on medians {tail_head_median:.3f}"
  )
  print(
    f"tick {HISTORY_TURNS} with the persistent cache {tick_ms:.1f} ms vs re-running the {HISTORY_TURNS + 1}-turn "
    f"history {rerun_ms:.1f} ms: {rerun_ms / tick_ms:.1f}x (one forward; a cache-less tick needs one per output "
    "slot, so the real gap is larger)"
  )
  placed = placements(args, config, graphdef, params, per_slots) if args.placements else {}
  load1 = os.getloadavg()[0]
  print(f"load average {load0:.2f} at start, {load1:.2f} at end")
  summary = {
    "benchmark": "serving_latency",
    "config": "tiny",
    "cache_tokens": cache_tokens,
    "ticks": args.ticks,
    "per_slots": per_slots,
    "max_real_time_slots": max(real_time, default=0),
    "long_ticks": args.long_ticks,
    "tail_head": tail_head,
    "tail_head_median": tail_head_median,
    "tail_head_target": TAIL_HEAD_TARGET,
    "tail_head_pass": tail_head <= TAIL_HEAD_TARGET,
    "tick_at_100_ms": tick_ms,
    "rerun_history_ms": rerun_ms,
    "cache_speedup_at_100": rerun_ms / tick_ms,
    "placements": placed,
    "loadavg": [round(load0, 2), round(load1, 2)],
    "cpu_count": os.cpu_count(),
  }
  print(json.dumps(summary))


if __name__ == "__main__":
  main()
