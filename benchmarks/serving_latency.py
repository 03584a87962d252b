r"""Serving latency of the sessions engine with the tiny config (random parameters).

  PYTHONPATH=. python benchmarks/serving_latency.py [--slots 1,8,32,64] [--ticks 200] [--long-ticks 1000] [--quick]

- per-tick latency (median, p99) of ``Engine.tick`` with every slot holding a
  session, for each slot count, and the largest count whose p99 stays under the
  200 ms micro-turn (sessions served in real time on this machine);
- tail/head over ``--long-ticks`` ticks of one session: mean of the last 50
  ticks over the first 50 (target <= 1.05; the ring-buffer cache keeps a tick's
  cost flat in session length);
- the speedup of the persistent cache at tick 100: one tick versus re-running
  the whole history (a jitted forward over the 101 micro-turns) as a
  cache-less server would.

Prints a table and, as the LAST line, one JSON object with the same figures.
Timings on a shared CPU are noisy: medians are quoted, the load average is shown.
"""

# isort: off
from launch import cpu_devices  # noqa: F401  (must precede jax)

# isort: on
import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from experiments import tiny
from interaction import layout
from interaction.experiment import experiment
from interaction.model import InteractionModel
from serving.engine import Engine, Sampling

TICK_MS = layout.MICRO_TURN_SECONDS * 1e3
TAIL_HEAD_TARGET = 1.05
EDGE = 50
WARMUP = 5
HISTORY_TURNS = 100


def make_engine(cfg, graphdef, params, slots, cache_tokens):
  engine = Engine(cfg, graphdef, params, slots=slots, cache_tokens=cache_tokens)
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


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--slots", default="1,8,32,64")
  p.add_argument("--ticks", type=int, default=200, help="timed ticks per slot count")
  p.add_argument("--long-ticks", type=int, default=1000, help="ticks of the one-session tail/head run")
  p.add_argument("--quick", action="store_true", help="smoke run: 20 ticks, 120 long ticks")
  args = p.parse_args()
  if args.quick:
    args.ticks, args.long_ticks = 20, 120
  config = experiment(tiny.get_config())
  cfg = config.model
  cache_tokens = config.serve.cache_tokens
  graphdef, params = nnx.split(InteractionModel(cfg, rngs=nnx.Rngs(0)))
  params = nnx.to_pure_dict(params)
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
    "loadavg": [round(load0, 2), round(load1, 2)],
    "cpu_count": os.cpu_count(),
  }
  print(json.dumps(summary))


if __name__ == "__main__":
  main()
