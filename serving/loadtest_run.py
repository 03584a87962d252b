"""One load-test run: N clients stream, read and end (or stop reading, or come one too many)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time

import numpy as np
from websockets.exceptions import ConnectionClosed

from serving import loadtest_report
from serving.loadtest_clients import ClientRecord, Connection, Options, fetch_stats, open_session, refusal
from serving.loadtest_sources import video_frames
from serving.protocol import AUDIO, SAMPLES_PER_TICK, TICK_S

STATS_POLL_S = 0.25
END_TIMEOUT_S = 10.0  # after session.end, wait this long for the server's close


class LoadTest:
  """One run: ``await LoadTest(options, speech).run()`` returns the report (a JSON-able dict)."""

  def __init__(self, options: Options, speech: np.ndarray, *, source: str = "given", log=None):
    if options.sessions < 1:
      raise ValueError(f"sessions must be >= 1, got {options.sessions}")
    if not 0 <= options.slow_clients <= options.sessions:
      raise ValueError(f"slow clients must be in [0, sessions={options.sessions}], got {options.slow_clients}")
    self.o, self.source = options, source
    self.log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    self.speech = np.asarray(speech, np.int16)
    if len(self.speech) < SAMPLES_PER_TICK:
      self.speech = np.resize(self.speech, SAMPLES_PER_TICK)
    self.video = video_frames() if options.video else None
    first_slow = options.sessions - options.slow_clients
    self.clients = [ClientRecord(i, slow=i >= first_slow) for i in range(options.sessions)]
    self.extra: dict | None = None
    self.all_started = asyncio.Event()  # every client has connected or failed to
    self.notes: list[str] = []
    self.stats_base = None
    self.server_start = self.server_end = None
    self.stats_errors = 0
    self.loop_lag_s: list[float] = []
    self.t0 = None
    self.deadline = None

  # -- the run ------------------------------------------------------------------------------

  async def run(self) -> dict:
    o = self.o
    self.t0 = time.monotonic()
    self.deadline = self.t0 + o.duration
    self.server_start = await self._stats() if o.server_stats or o.slow_clients else None
    if o.slow_clients:
      if self.server_start is None:
        self.notes.append("slow clients read again only at the end: /v1/stats did not answer")
      else:
        self.stats_base = int(self.server_start.get("closed_slow", 0))
    tasks = [asyncio.create_task(self._client(c)) for c in self.clients]
    helpers = [asyncio.create_task(self._lag_monitor()), asyncio.create_task(self._note_all_started(tasks))]
    if o.progress > 0:
      helpers.append(asyncio.create_task(self._progress()))
    if o.slow_clients:
      helpers.append(asyncio.create_task(self._watch_slow()))
    extra = None
    if o.extra_session_at is not None:
      extra = asyncio.create_task(self._extra_session(o.extra_session_at))
    limit = o.duration + (o.slow_linger if o.slow_clients else 0) + END_TIMEOUT_S + o.open_timeout + 30
    _, pending = await asyncio.wait(tasks, timeout=limit)
    for task in pending:
      task.cancel()
    if pending:
      self.notes.append(f"{len(pending)} clients had not finished {limit:.0f} s after the start: cancelled")
    await asyncio.gather(*pending, return_exceptions=True)
    if extra is not None:
      if self.extra is None:  # the run ended before its time
        extra.cancel()
        self.notes.append(f"the run ended before the extra session's time ({o.extra_session_at:g} s)")
      await asyncio.wait([extra], timeout=o.open_timeout + 5)
      extra.cancel()
    for task in helpers:
      task.cancel()
    await asyncio.gather(*helpers, *([extra] if extra else []), return_exceptions=True)
    wall_s = time.monotonic() - self.t0
    self.server_end = await self._stats() if o.server_stats else None
    return self.report(wall_s)

  async def _stats(self) -> dict | None:
    try:
      return await asyncio.to_thread(fetch_stats, self.o.url, self.o.token)
    except Exception as e:  # noqa: BLE001  (reported; the run does not need it)
      self.notes.append(f"GET /v1/stats failed: {type(e).__name__}: {e}")
      return None

  def server_counters(self) -> dict | None:
    """The server's counters over the run (``/v1/stats`` at the end minus at the start): ticks, skipped_ticks, ..."""
    if self.server_start is None or self.server_end is None:
      return None
    skip = {"protocol", "slots", "clients", "engine_sessions", "draining"}
    keys = {k for k, v in self.server_end.items() if isinstance(v, int) and not isinstance(v, bool) and k not in skip}
    out = {k: self.server_end[k] - int(self.server_start.get(k, 0) or 0) for k in sorted(keys)}
    out.setdefault("skipped_ticks", 0)
    return out

  async def _note_all_started(self, tasks) -> None:
    """Sets ``all_started`` once every client has its session (or has failed to get one)."""
    while not all(c.connected or c.refused or c.errors or c.closed_at for c in self.clients):
      if all(t.done() for t in tasks):
        break
      await asyncio.sleep(0.02)
    self.all_started.set()

  async def _client(self, c: ClientRecord) -> None:
    o = self.o
    try:
      ws = await open_session(o.url, o.token, slow=c.slow, open_timeout=o.open_timeout)
    except Exception as e:  # noqa: BLE001  (refusals and every connect failure are recorded, not raised)
      c.refused = refusal(e)
      if c.refused is None:
        c.errors.append(f"connect: {type(e).__name__}: {e}")
      return
    sender = None
    try:
      try:
        started = json.loads(await asyncio.wait_for(ws.recv(), o.open_timeout))
      except ConnectionClosed as e:
        c.refused = refusal(e)
        if c.refused is None:
          self._record_close(c, e)
        return
      if started.get("type") != "session.started":
        c.errors.append(f"first frame is {started.get('type')!r}, not session.started")
        return
      c.connected, c.session, c.opened_at = True, started.get("session"), time.monotonic()
      if started.get("samples_per_tick", SAMPLES_PER_TICK) != SAMPLES_PER_TICK:
        c.errors.append(f"server ticks {started.get('samples_per_tick')} samples; this tool sends {SAMPLES_PER_TICK}")
      ping_interval = (started.get("limits") or {}).get("ping_interval_s")
      sender = asyncio.create_task(self._send(c, ws))
      ender = asyncio.create_task(self._end(c, ws, sender))
      try:
        await self._read(c, ws, ping_interval)
      except ConnectionClosed as e:
        self._record_close(c, e)
      finally:
        ender.cancel()
    except Exception as e:  # noqa: BLE001  (a bug in one client must not end the run)
      c.errors.append(f"client: {type(e).__name__}: {e}")
    finally:
      if sender is not None:
        sender.cancel()
      if c.closed_at is None:
        c.closed_at = time.monotonic()
      with contextlib.suppress(Exception):
        await asyncio.wait_for(ws.close(), 5)

  def _record_close(self, c: ClientRecord, e: ConnectionClosed) -> None:
    c.closed_at = time.monotonic()
    c.close_code = e.rcvd.code if e.rcvd is not None else 1006  # 1006: no close frame came
    c.close_reason = e.rcvd.reason if e.rcvd is not None else ""

  async def _read(self, c: ClientRecord, ws: Connection, ping_interval: float | None) -> None:
    while True:
      if c.slow and c.stopped_reading_at is None and not c.resume.is_set() and self._stop_now(c, ws, ping_interval):
        c.stopped_reading_at = time.monotonic()
        await c.resume.wait()
        c.resumed_at = time.monotonic()
      message = await ws.recv()
      if c.stopped_reading_at is None:
        self._on_message(c, message, time.monotonic())

  def _stop_now(self, c: ClientRecord, ws: Connection, ping_interval: float | None) -> bool:
    """A slow client stops right after the first server ping past ``slow_after`` (or without one, a ping later)."""
    now, after = time.monotonic(), c.opened_at + self.o.slow_after
    if now < after:
      return False
    if not ping_interval:
      return True
    return (ws.last_ping is not None and ws.last_ping >= after) or now > after + ping_interval + 1.0

  def _on_message(self, c: ClientRecord, message, now: float) -> None:
    if isinstance(message, bytes):
      if message[:1] == bytes([AUDIO]):
        c.frames += 1
        if not c.slow:
          c.playback.arrive(now)
      else:
        c.events[f"binary_{message[0] if message else 'empty'}"] += 1
      return
    event = json.loads(message)
    kind = event.get("type")
    if kind == "tick":
      c.ticks += 1
      c.speaking += bool(event.get("speaking"))
      streaming = c.opened_at + 2 * TICK_S < now and (c.streaming_until is None or now < c.streaming_until)
      if streaming and event.get("user_audio_ms", 0) < TICK_S * 1000:
        c.input_gaps += 1
      timing = event.get("timing") or {}
      if not c.slow:
        for name, into in (("tick_ms", c.tick_ms), ("step_ms", c.step_ms), ("late_ms", c.late_ms)):
          if isinstance(timing.get(name), int | float):
            into.append(timing[name])
        if all(isinstance(timing.get(k), int | float) for k in ("tick_ms", "step_ms")):
          c.overhead_ms.append(timing["tick_ms"] - timing["step_ms"])
    elif kind == "error":
      c.errors.append(f"{event.get('code')}: {event.get('message')}")
    else:
      c.events[str(kind)] += 1

  async def _send(self, c: ClientRecord, ws: Connection) -> None:
    """Chunk i leaves at opened_at + i * TICK_S (a late loop sends the chunks it owes at once)."""
    speech, n = self.speech, len(self.speech)
    pos = (c.index * 7919 * SAMPLES_PER_TICK // 10) % n  # clients start at different places in the speech
    i = 0
    try:
      while True:
        due = c.opened_at + i * TICK_S
        delay = due - time.monotonic()
        if delay > 0:
          await asyncio.sleep(delay)
        else:
          c.max_send_lag_s = max(c.max_send_lag_s, -delay)
        idx = (pos + np.arange(SAMPLES_PER_TICK)) % n
        await ws.send(bytes([AUDIO]) + speech[idx].astype("<i2").tobytes())
        if self.video is not None:
          await ws.send(self.video[i % len(self.video)])
        pos = (pos + SAMPLES_PER_TICK) % n
        i += 1
        c.chunks_sent = i
    except ConnectionClosed:
      pass

  async def _end(self, c: ClientRecord, ws: Connection, sender: asyncio.Task) -> None:
    """At the deadline: stop streaming, send session.end; a slow client first waits (up to the linger) to be closed."""
    await asyncio.sleep(max(0.0, self.deadline - time.monotonic()))
    if c.slow and not c.resume.is_set():
      with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(c.resume.wait(), max(0.0, self.deadline + self.o.slow_linger - time.monotonic()))
      if not c.resume.is_set():
        what = "had not stopped reading" if c.stopped_reading_at is None else "was not closed by the server"
        self.notes.append(f"slow client {c.index} {what} {self.o.slow_linger:g} s after the run: it ends normally")
        c.resume.set()
    if c.server_closed_at is not None:  # its reader is collecting the server's close frame
      await asyncio.sleep(END_TIMEOUT_S)
      c.errors.append(f"no close frame {END_TIMEOUT_S:g} s after the server closed it")
      await ws.close()
      return
    c.streaming_until = time.monotonic()
    sender.cancel()
    await asyncio.gather(sender, return_exceptions=True)
    try:
      await ws.send(json.dumps({"type": "session.end"}))
      c.ended_by_client = True
    except ConnectionClosed:
      return
    await asyncio.sleep(END_TIMEOUT_S)
    c.errors.append(f"no close {END_TIMEOUT_S:g} s after session.end")
    await ws.close()

  async def _watch_slow(self) -> None:
    """Poll /v1/stats; when ``closed_slow`` rises by m, the m slow clients that stopped reading first read again."""
    o = self.o
    slow = [c for c in self.clients if c.slow]
    while self.stats_base is not None:
      await asyncio.sleep(STATS_POLL_S)
      waiting = [c for c in slow if c.stopped_reading_at is not None and not c.resume.is_set()]
      if not waiting:
        if all(c.closed_at is not None or c.resume.is_set() for c in slow):
          return
        continue
      try:
        stats = await asyncio.to_thread(fetch_stats, o.url, o.token)
      except Exception:  # noqa: BLE001  (counted; the next poll tries again)
        self.stats_errors += 1
        continue
      closed = int(stats.get("closed_slow", 0)) - self.stats_base
      seen = sum(c.server_closed_at is not None for c in slow)
      now = time.monotonic()
      for c in sorted(waiting, key=lambda c: c.stopped_reading_at)[: max(0, closed - seen)]:
        c.server_closed_at = now
        c.resume.set()

  async def _extra_session(self, at: float) -> None:
    """At ``at`` s: one session past the slot count; how long until it is refused."""
    o = self.o
    await asyncio.sleep(max(0.0, self.t0 + at - time.monotonic()))
    live = sum(c.live for c in self.clients)
    self.extra = {
      "at_s": round(time.monotonic() - self.t0, 2),
      "live_sessions": live,
      "all_connected": live == o.sessions,
    }
    t = time.monotonic()
    try:
      ws = await open_session(o.url, o.token, open_timeout=o.open_timeout)
    except Exception as e:  # noqa: BLE001
      ms = (time.monotonic() - t) * 1000
      refused = refusal(e)
      if refused is None:
        self.extra.update(outcome="error", error=f"{type(e).__name__}: {e}", ms=round(ms, 2))
      else:
        self.extra.update(outcome="refused", how=refused, refusal_ms=round(ms, 2))
      return
    try:
      message = await asyncio.wait_for(ws.recv(), o.open_timeout)
    except ConnectionClosed as e:
      ms = (time.monotonic() - t) * 1000
      refused = refusal(e)
      outcome = "refused" if refused else f"closed {e.rcvd.code if e.rcvd else 1006}"
      self.extra.update(outcome=outcome, how=refused or str(e), refusal_ms=round(ms, 2) if refused else None)
      return
    except TimeoutError:
      self.extra.update(outcome="error", error="no first frame")
    else:
      kind = json.loads(message).get("type") if isinstance(message, str) else "binary"
      self.extra.update(outcome="accepted", how=f"first frame {kind}", ms=round((time.monotonic() - t) * 1000, 2))
      with contextlib.suppress(Exception):
        await ws.send(json.dumps({"type": "session.end"}))
    with contextlib.suppress(Exception):
      await asyncio.wait_for(ws.close(), 5)

  async def _lag_monitor(self, every: float = 0.05) -> None:
    """This process's own event-loop lag: a late loop delays sends and arrival times (numbers to distrust)."""
    while True:
      t = time.monotonic()
      await asyncio.sleep(every)
      self.loop_lag_s.append(time.monotonic() - t - every)

  async def _progress(self) -> None:
    while True:
      await asyncio.sleep(self.o.progress)
      normal = [c for c in self.clients if not c.slow]
      ticks = [x for c in normal for x in c.tick_ms]
      p99 = f"{np.percentile(ticks, 99):.1f}" if ticks else "-"
      self.log(
        f"[loadtest] {time.monotonic() - self.t0:5.0f} s: {sum(c.live for c in self.clients)}/{len(self.clients)} live, "
        f"{sum(c.ticks for c in self.clients)} ticks, tick p99 {p99} ms, "
        f"underruns {sum(c.playback.underruns for c in normal)}, "
        f"errors {sum(len(c.errors) for c in self.clients)}, closed {sum(c.closed_at is not None for c in self.clients)}"
      )

  def report(self, wall_s: float) -> dict:
    return loadtest_report.build_report(self, wall_s)
