"""The load tool's report: figures over every client (a JSON-able dict), the table it prints, the pass check."""

from __future__ import annotations

import collections
import os

import numpy as np

from serving import protocol
from serving.protocol import TICK_S


def percentiles(values) -> dict:
  if not len(values):
    return {"count": 0, "p50": None, "p99": None, "max": None}
  a = np.asarray(values, np.float64)
  return {
    "count": len(a),
    "p50": round(float(np.percentile(a, 50)), 2),
    "p99": round(float(np.percentile(a, 99)), 2),
    "max": round(float(a.max()), 2),
  }


def _closes(clients) -> tuple[int, list[dict]]:
  """(unexpected closes, a row per distinct close): a slow client closed 1008 and an ended one 1000 are expected."""
  closes, unexpected = collections.Counter(), 0
  for c in clients:
    if not c.connected:
      continue
    expected = (c.slow and c.close_code == protocol.CLOSE_POLICY) or (
      c.ended_by_client and c.close_code == protocol.CLOSE_ENDED
    )
    unexpected += not expected
    closes[(c.close_code, c.close_reason or "", expected)] += 1
  rows = [
    {"code": code, "reason": reason, "expected": exp, "count": n}
    for (code, reason, exp), n in sorted(closes.items(), key=lambda kv: (str(kv[0][0]), kv[0][1]))
  ]
  return unexpected, rows


def _slow_client(c, t0: float) -> dict:
  def rel(t):
    return None if t is None else round(t - t0, 2)

  return {
    "client": c.index,
    "connected": c.connected,
    "stopped_reading_s": rel(c.stopped_reading_at),
    "server_closed_s": rel(c.server_closed_at),
    "closed_after_stop_s": None
    if c.server_closed_at is None or c.stopped_reading_at is None
    else round(c.server_closed_at - c.stopped_reading_at, 2),
    "close_code": c.close_code,
    "close_reason": c.close_reason,
    "connection_ended_s": rel(c.closed_at),
  }


def _latency(normal) -> dict:
  """Tick latency and playback figures of the clients that read everything."""
  margins = [c.playback.min_margin_s for c in normal if c.playback.frames]
  return {
    "tick_ms": percentiles([x for c in normal for x in c.tick_ms]),
    "step_ms": percentiles([x for c in normal for x in c.step_ms]),
    # What the server adds around the step (inputs, vocoder, queueing): what other clients can change.
    "overhead_ms": percentiles([x for c in normal for x in c.overhead_ms]),
    "late_ms": percentiles([x for c in normal for x in c.late_ms]),
    "underruns": sum(c.playback.underruns for c in normal),
    "max_late_ms": round(max((c.playback.max_late_s for c in normal), default=0.0) * 1000, 2),
    "min_margin_ms": round(min(margins) * 1000, 2) if margins else None,
    "stalls": sum(c.playback.stalls for c in normal),
    "stall_ms": round(sum(c.playback.stall_s for c in normal) * 1000, 1),
  }


def build_report(test, wall_s: float) -> dict:
  """The report of a finished ``LoadTest`` (plain JSON)."""
  o, clients = test.o, test.clients
  normal = [c for c in clients if not c.slow]
  slow = [c for c in clients if c.slow]
  unexpected, closes = _closes(clients)
  ticks = [c.ticks for c in normal if c.connected]
  lag = np.asarray(test.loop_lag_s or [0.0]) * 1000
  for c in slow:
    if c.connected and c.stopped_reading_at is None:
      test.notes.append(f"slow client {c.index} never stopped reading (the run was shorter than --slow-after)")
  return {
    "tool": "serving.loadtest",
    "url": o.url,
    "sessions": o.sessions,
    "duration_s": o.duration,
    "wall_s": round(wall_s, 2),
    "audio": test.source,
    "video": o.video,
    "connected": sum(c.connected for c in clients),
    "refused": sum(c.refused is not None for c in clients),
    "refusals": sorted({c.refused for c in clients if c.refused}),
    "errors": sum(len(c.errors) for c in clients),
    "error_samples": sorted({e for c in clients for e in c.errors})[:10],
    "unexpected_closes": unexpected,
    "closes": closes,
    "normal_clients": len(normal),
    "ticks_per_session": {
      "min": min(ticks, default=0),
      "mean": round(float(np.mean(ticks)), 1) if ticks else 0,
      "max": max(ticks, default=0),
      "expected": round(o.duration / TICK_S),
    },
    "frames": sum(c.frames for c in normal),
    "speaking_ticks": sum(c.speaking for c in normal),
    "input_gap_ticks": sum(c.input_gaps for c in normal),
    **_latency(normal),
    "server_counters": test.server_counters(),
    "events": dict(sum((c.events for c in clients), collections.Counter())),
    "slow_clients": [_slow_client(c, test.t0) for c in slow],
    "extra_session": test.extra,
    "client_loop_lag_ms": {"p99": round(float(np.percentile(lag, 99)), 2), "max": round(float(lag.max()), 2)},
    "client_max_send_lag_ms": round(max((c.max_send_lag_s for c in clients), default=0.0) * 1000, 2),
    "stats_poll_errors": test.stats_errors,
    "notes": test.notes,
    "loadavg": [round(x, 2) for x in os.getloadavg()],
    "cpu_count": os.cpu_count(),
  }


def _ms(x) -> str:
  return "-" if x is None else f"{x:.1f}"


def format_table(r: dict) -> str:
  t, tps = r["tick_ms"], r["ticks_per_session"]
  rows = [
    ("sessions connected", f"{r['connected']} of {r['sessions']} ({r['normal_clients']} normal)"),
    ("refused", f"{r['refused']}" + (f"  {r['refusals']}" if r["refusals"] else "")),
    ("errors", f"{r['errors']}" + (f"  e.g. {r['error_samples'][0]}" if r["error_samples"] else "")),
    ("unexpected closes", str(r["unexpected_closes"])),
    ("ticks per session", f"min {tps['min']}  mean {tps['mean']}  max {tps['max']}  (duration: {tps['expected']})"),
    ("tick latency ms", f"p50 {_ms(t['p50'])}  p99 {_ms(t['p99'])}  max {_ms(t['max'])}  ({t['count']} ticks)"),
    ("  of which step ms", f"p50 {_ms(r['step_ms']['p50'])}  p99 {_ms(r['step_ms']['p99'])}"),
    ("  tick - step ms", f"p50 {_ms(r['overhead_ms']['p50'])}  p99 {_ms(r['overhead_ms']['p99'])}"),
    ("  tick start late ms", f"p99 {_ms(r['late_ms']['p99'])}  max {_ms(r['late_ms']['max'])}"),
    (
      "underruns",
      f"{r['underruns']} of {r['frames']} frames; max late {r['max_late_ms']:.1f} ms; "
      f"closest margin {_ms(r['min_margin_ms'])} ms",
    ),
    ("  rebuffering player", f"{r['stalls']} stalls, {r['stall_ms']:.0f} ms of inserted silence (all clients)"),
    ("input gap ticks", f"{r['input_gap_ticks']} (ticks with < 200 ms of our audio at the server)"),
  ]
  if r["server_counters"] is not None:
    rows.append(("server counters", "  ".join(f"{k} {v}" for k, v in r["server_counters"].items())))
  for c in r["closes"]:
    rows.append((f"close {c['code']}", f"{c['count']} x {c['reason']!r}" + ("" if c["expected"] else "  (unexpected)")))
  for s in r["slow_clients"]:
    if s["stopped_reading_s"] is None:
      what = f"never stopped reading; closed {s['close_code']} {s['close_reason']!r}"
    elif s["server_closed_s"] is None:
      what = f"stopped reading at {s['stopped_reading_s']} s; not seen closed by the server; got {s['close_code']}"
    else:
      what = (
        f"stopped reading at {s['stopped_reading_s']} s, server closed it at {s['server_closed_s']} s "
        f"({s['closed_after_stop_s']} s later): {s['close_code']} {s['close_reason']!r}"
      )
    rows.append((f"slow client {s['client']}", what))
  e = r["extra_session"]
  if e is not None:
    what = f"{e['outcome']} in {_ms(e.get('refusal_ms', e.get('ms')))} ms: {e.get('how', e.get('error'))}"
    rows.append(("extra session", f"at {e['at_s']} s with {e['live_sessions']} live: {what}"))
  rows.append(
    ("client loop lag ms", f"p99 {r['client_loop_lag_ms']['p99']:.1f}  max {r['client_loop_lag_ms']['max']:.1f}")
  )
  rows.append(("audio", f"{r['audio']}" + (" + JPEG video" if r["video"] else "")))
  rows.append(("load average", " ".join(f"{x:.2f}" for x in r["loadavg"]) + f" ({r['cpu_count']} CPUs)"))
  width = max(len(k) for k, _ in rows)
  lines = [f"loadtest: {r['sessions']} sessions x {r['duration_s']:g} s on {r['url']} ({r['wall_s']:.1f} s wall)"]
  lines += [f"  {k:<{width}}  {v}" for k, v in rows]
  lines += [f"  note: {n}" for n in r["notes"]]
  return "\n".join(lines)


def clean(report: dict) -> bool:
  """Every session connected, nothing refused or in error, every close expected, no underrun."""
  return (
    report["connected"] == report["sessions"]
    and report["errors"] == 0
    and report["unexpected_closes"] == 0
    and report["underruns"] == 0
  )
