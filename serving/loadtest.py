r"""Load test for the live server: N clients streaming real speech in real time, reading everything.

  python -m serving.loadtest --url ws://127.0.0.1:8000/v1/session --sessions 32 --duration 60 \
      [--token T] [--audio DIR] [--video] [--slow-clients K] [--extra-session-at SECONDS] [--json]

Each client opens a session (``serving/PROTOCOL.md``), then sends 200 ms chunks of speech (``0x01`` +
PCM16LE, 16 kHz mono) paced against the wall clock from its ``session.started`` (chunk i leaves at
start + i * 200 ms, so pacing never drifts), looping the audio; ``--video`` adds one JPEG per chunk.
Speech: the WAV files of ``--audio DIR`` (any rate and channel count; resampled to 16 kHz mono),
else a few sentences synthesized with ``espeak-ng``, else a voiced synthetic signal. Every client
reads everything and counts model audio frames, ticks (with ``timing.tick_ms``, the server's tick
latency), errors and how its session closed.

Playback model (underruns): a client starts playing one tick (200 ms jitter buffer) after its first
model audio frame arrives; frame k is due at that start + k * 200 ms; a frame that arrives after it
is due is an underrun. Tick latency and underruns are figures of the normal clients only.

``--slow-clients K``: K clients (8 KiB socket receive buffer, one-frame client queue) stop reading
after ``--slow-after`` seconds, right after the next keepalive ping from the server. A client that
never reads never answers pings either, so two limits race: the keepalive closes it 10-15 s after it
stops (``ping_timeout_s`` after the first unanswered ping), the output cap once ~256 KiB are unsent
(~12 s of model audio plus kernel buffers here). Stopping just after a ping gives the cap the whole
ping interval + timeout. They keep the connection open and keep sending audio. The server's close frame queues behind the output they did not read, so the
tool polls ``GET /v1/stats`` (``closed_slow``) and, once the server has closed them, lets them read
again to collect the close code and reason it sent; the time is the one the counter rose (+/- 0.25 s).
The run goes on past ``--duration`` (up to ``--slow-linger`` s) while a slow client is still open.

``--extra-session-at T``: at T seconds, with every client connected, one more session is opened and
the time until it is refused is measured (``503`` before the upgrade, or close code ``1013``).

Prints a table, a progress line per ``--progress`` s on stderr, and as the LAST line one JSON
object with the same figures (``--json``: only that line on stdout).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import dataclasses
import io
import json
import math
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request

import numpy as np
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.frames import Frame, Opcode

from data_pipeline import wav
from serving import protocol
from serving.protocol import AUDIO, JPEG, SAMPLE_RATE, SAMPLES_PER_TICK, TICK_S, TOKEN_ENV

SLOW_RCVBUF = 4096  # bytes (Linux doubles it): the slow client's kernel holds little of the backlog
STATS_POLL_S = 0.25
LATE_EPSILON_S = 1e-6  # a frame is late when it comes more than this after its due time (float round-off)
END_TIMEOUT_S = 10.0  # after session.end, wait this long for the server's close
PAUSE_S = 0.8  # silence between looped utterances: turn-taking pauses
SENTENCES = (
  "Hello, can you hear me? I would like to book a table for two tomorrow evening.",
  "What is the weather going to be like this weekend in the mountains?",
  "Could you add seventeen and twenty five for me, and then tell me the result?",
  "I was thinking about learning to play the piano, but I am not sure where to start.",
  "Sorry, let me say that again. The meeting moved to three thirty on Thursday.",
  "Thanks, that was really helpful. One more question before you go.",
)


# -- speech and video sources --------------------------------------------------------------


def synthetic_speech(seconds: float = 12.0, seed: int = 0) -> np.ndarray:
  """A voiced stand-in for speech: harmonics of a gliding pitch, syllable and phrase envelopes (float32)."""
  rng = np.random.default_rng(seed)
  t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
  f0 = 140 + 35 * np.sin(2 * np.pi * 0.35 * t) + 10 * np.sin(2 * np.pi * 2.1 * t)
  phase = 2 * np.pi * np.cumsum(f0) / SAMPLE_RATE
  voice = sum(np.sin(k * phase) / k for k in range(1, 16))
  syllables = np.sqrt(np.clip(np.sin(2 * np.pi * 4.0 * t), 0, None))
  phrases = (np.sin(2 * np.pi * t / 4.0) > -0.4).astype(np.float32)  # ~3 s spoken, ~1 s pause
  x = 0.15 * voice * syllables * phrases + 0.002 * rng.standard_normal(len(t))
  return x.astype(np.float32)


def _espeak(directory: pathlib.Path) -> list[pathlib.Path]:
  files = []
  for i, sentence in enumerate(SENTENCES):
    path = directory / f"sentence{i}.wav"
    pitch, speed = 35 + 10 * (i % 4), 150 + 10 * (i % 3)
    cmd = ["espeak-ng", "-v", "en-us", "-p", str(pitch), "-s", str(speed), "-w", str(path), sentence]
    subprocess.run(cmd, check=True, capture_output=True, timeout=60)
    files.append(path)
  return files


def load_speech(audio_dir: str | None = None, log=print) -> tuple[np.ndarray, str]:
  """(int16 mono 16 kHz speech to loop, where it came from): --audio DIR, else espeak-ng, else synthetic."""
  pause = np.zeros(int(PAUSE_S * SAMPLE_RATE), np.float32)

  def join(files) -> np.ndarray:
    pieces = []
    for f in files:
      x, rate = wav.read_wav(f)
      pieces += [wav.resample(x, rate, SAMPLE_RATE), pause]
    return wav.to_int16(np.concatenate(pieces))

  if audio_dir:
    files = sorted(p for p in pathlib.Path(audio_dir).iterdir() if p.suffix.lower() == ".wav")
    if not files:
      raise SystemExit(f"error: no .wav files in {audio_dir}")
    speech = join(files)
    return speech, f"{len(files)} WAV files in {audio_dir} ({len(speech) / SAMPLE_RATE:.1f} s, looped)"
  if shutil.which("espeak-ng"):
    try:
      with tempfile.TemporaryDirectory(prefix="loadtest-speech-") as tmp:
        speech = join(_espeak(pathlib.Path(tmp)))
      return speech, f"espeak-ng, {len(SENTENCES)} sentences ({len(speech) / SAMPLE_RATE:.1f} s, looped)"
    except (OSError, subprocess.SubprocessError, wav.WavError) as e:
      log(f"espeak-ng failed ({type(e).__name__}: {e}): using a synthetic voiced signal")
  else:
    log("espeak-ng is not installed and no --audio DIR was given: using a synthetic voiced signal")
  return wav.to_int16(synthetic_speech()), "synthetic voiced signal (no espeak-ng)"


def video_frames(count: int = 10, size: tuple[int, int] = (64, 48)) -> list[bytes]:
  """``count`` small JPEGs of a moving pattern, as ``0x02`` + JPEG frames (encoded once, sent in a loop)."""
  from PIL import Image  # a serving dependency; only --video needs it

  w, h = size
  yy, xx = np.mgrid[0:h, 0:w]
  out = []
  for i in range(count):
    rgb = np.stack([(xx * 4 + i * 20) % 256, (yy * 5 + i * 10) % 256, ((xx + yy) * 2 + i * 30) % 256], -1)
    buf = io.BytesIO()
    Image.fromarray(rgb.astype(np.uint8)).save(buf, format="JPEG", quality=80)
    out.append(bytes([JPEG]) + buf.getvalue())
  return out


# -- the playback model ---------------------------------------------------------------------


@dataclasses.dataclass
class Playback:
  """A client's playback buffer: starts ``jitter_s`` after the first frame arrives; frame k is due at start + k * tick_s.

  ``underruns`` counts the frames that come after that fixed due time: once a frame is lost (a tick the
  server skipped) every later frame is late too. ``stalls`` models a player that rebuffers instead: it
  waits for a late frame and plays the rest that much later, so it counts the times the buffer ran dry.
  """

  tick_s: float = TICK_S
  jitter_s: float = TICK_S
  start: float | None = None
  frames: int = 0
  underruns: int = 0
  max_late_s: float = 0.0  # the latest a frame came after it was due (0: none late)
  min_margin_s: float = math.inf  # the closest a frame came to its due time (negative: late)
  stalls: int = 0  # times a rebuffering player ran dry
  stall_s: float = 0.0  # and the silence it inserted
  shift_s: float = 0.0  # how much later than planned that player is playing

  def arrive(self, t: float) -> float:
    """The next frame arrived at ``t`` (seconds, any clock); returns how late it is (<= 0: in time)."""
    if self.start is None:
      self.start = t + self.jitter_s
    late = t - (self.start + self.frames * self.tick_s)
    self.frames += 1
    self.min_margin_s = min(self.min_margin_s, -late)
    if late > LATE_EPSILON_S:
      self.underruns += 1
      self.max_late_s = max(self.max_late_s, late)
    dry = late - self.shift_s
    if dry > LATE_EPSILON_S:
      self.stalls += 1
      self.stall_s += dry
      self.shift_s += dry
    return late


# -- one client -----------------------------------------------------------------------------


class _Connection(ClientConnection):
  """A client connection that notes when the server's keepalive pings arrive."""

  last_ping: float | None = None

  def process_event(self, event) -> None:
    if isinstance(event, Frame) and event.opcode is Opcode.PING:
      self.last_ping = time.monotonic()
    super().process_event(event)


@dataclasses.dataclass(eq=False)
class ClientRecord:
  index: int
  slow: bool = False
  connected: bool = False
  refused: str | None = None  # "503 ..." or "1013 ..."
  session: int | None = None
  opened_at: float | None = None  # monotonic: when the session.started arrived
  ticks: int = 0
  frames: int = 0
  speaking: int = 0  # ticks whose model audio is speech
  input_gaps: int = 0  # ticks, while streaming, where less than 200 ms of our audio had reached the server
  tick_ms: list = dataclasses.field(default_factory=list)
  step_ms: list = dataclasses.field(default_factory=list)
  overhead_ms: list = dataclasses.field(default_factory=list)  # tick_ms - step_ms per tick
  late_ms: list = dataclasses.field(default_factory=list)
  playback: Playback = dataclasses.field(default_factory=Playback)
  events: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  errors: list = dataclasses.field(default_factory=list)
  chunks_sent: int = 0
  max_send_lag_s: float = 0.0
  streaming_until: float | None = None
  ended_by_client: bool = False
  close_code: int | None = None
  close_reason: str | None = None
  closed_at: float | None = None
  # slow clients
  stopped_reading_at: float | None = None
  server_closed_at: float | None = None  # when /v1/stats showed the server closing it
  resumed_at: float | None = None
  resume: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)

  @property
  def live(self) -> bool:
    return self.connected and self.closed_at is None


@dataclasses.dataclass
class Options:
  url: str
  token: str
  sessions: int = 4
  duration: float = 10.0
  audio_dir: str | None = None
  video: bool = False
  slow_clients: int = 0
  slow_after: float = 3.0
  slow_linger: float = 30.0
  extra_session_at: float | None = None
  progress: float = 10.0  # seconds between progress lines on stderr; 0: none
  server_stats: bool = True  # read /v1/stats at the start and the end (server counters over the run)
  open_timeout: float = 30.0


def _headers(token: str) -> dict:
  return {"Authorization": f"Bearer {token}"}


def stats_url(url: str) -> str:
  parts = urllib.parse.urlsplit(url)
  return f"{'https' if parts.scheme == 'wss' else 'http'}://{parts.netloc}{protocol.STATS_PATH}"


def fetch_stats(url: str, token: str, timeout: float = 5.0) -> dict:
  """``GET /v1/stats`` of the server behind the session URL ``url`` (blocking; no proxies)."""
  opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
  with opener.open(urllib.request.Request(stats_url(url), headers=_headers(token)), timeout=timeout) as r:
    return json.loads(r.read())


async def _small_buffer_socket(url: str) -> socket.socket:
  """A connected TCP socket whose receive buffer is ``SLOW_RCVBUF`` (set before connecting: it bounds the window)."""
  parts = urllib.parse.urlsplit(url)
  port = parts.port or (443 if parts.scheme == "wss" else 80)
  loop = asyncio.get_running_loop()
  family, kind, proto, _, addr = (await loop.getaddrinfo(parts.hostname, port, type=socket.SOCK_STREAM))[0]
  sock = socket.socket(family, kind, proto)
  try:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SLOW_RCVBUF)
    sock.setblocking(False)
    await loop.sock_connect(sock, addr)
  except BaseException:
    sock.close()
    raise
  return sock


async def open_session(url: str, token: str, *, slow: bool = False, open_timeout: float = 30.0) -> _Connection:
  kwargs = dict(
    additional_headers=_headers(token),
    open_timeout=open_timeout,
    compression=None,
    proxy=None,
    create_connection=_Connection,
    max_size=4 << 20,
  )
  if slow:  # no client pings (it would not read the pongs) and a one-frame queue: reading stops for real
    kwargs.update(ping_interval=None, max_queue=1, sock=await _small_buffer_socket(url))
  return await connect(url, **kwargs)


def _refusal(e: BaseException) -> str | None:
  """'503 <body>' / '1013 <reason>' when ``e`` is the server refusing a session, else None."""
  if isinstance(e, InvalidStatus):
    body = (e.response.body or b"").decode("utf-8", "replace").strip()
    return f"{e.response.status_code} {body}".strip()
  if isinstance(e, ConnectionClosed) and e.rcvd is not None and e.rcvd.code == protocol.CLOSE_FULL:
    return f"{protocol.CLOSE_FULL} {e.rcvd.reason}".strip()
  return None


def _percentiles(values) -> dict:
  if not len(values):
    return {"count": 0, "p50": None, "p99": None, "max": None}
  a = np.asarray(values, np.float64)
  return {
    "count": len(a),
    "p50": round(float(np.percentile(a, 50)), 2),
    "p99": round(float(np.percentile(a, 99)), 2),
    "max": round(float(a.max()), 2),
  }


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
      c.refused = _refusal(e)
      if c.refused is None:
        c.errors.append(f"connect: {type(e).__name__}: {e}")
      return
    sender = None
    try:
      try:
        started = json.loads(await asyncio.wait_for(ws.recv(), o.open_timeout))
      except ConnectionClosed as e:
        c.refused = _refusal(e)
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

  async def _read(self, c: ClientRecord, ws: _Connection, ping_interval: float | None) -> None:
    while True:
      if c.slow and c.stopped_reading_at is None and not c.resume.is_set() and self._stop_now(c, ws, ping_interval):
        c.stopped_reading_at = time.monotonic()
        await c.resume.wait()
        c.resumed_at = time.monotonic()
      message = await ws.recv()
      if c.stopped_reading_at is None:
        self._on_message(c, message, time.monotonic())

  def _stop_now(self, c: ClientRecord, ws: _Connection, ping_interval: float | None) -> bool:
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

  async def _send(self, c: ClientRecord, ws: _Connection) -> None:
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

  async def _end(self, c: ClientRecord, ws: _Connection, sender: asyncio.Task) -> None:
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
      refused = _refusal(e)
      if refused is None:
        self.extra.update(outcome="error", error=f"{type(e).__name__}: {e}", ms=round(ms, 2))
      else:
        self.extra.update(outcome="refused", how=refused, refusal_ms=round(ms, 2))
      return
    try:
      message = await asyncio.wait_for(ws.recv(), o.open_timeout)
    except ConnectionClosed as e:
      ms = (time.monotonic() - t) * 1000
      refused = _refusal(e)
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

  # -- the report ---------------------------------------------------------------------------

  def report(self, wall_s: float) -> dict:
    o, t0 = self.o, self.t0
    normal = [c for c in self.clients if not c.slow]
    slow = [c for c in self.clients if c.slow]
    closes = collections.Counter()
    unexpected = 0
    for c in self.clients:
      if not c.connected:
        continue
      expected = (c.slow and c.close_code == protocol.CLOSE_POLICY) or (
        c.ended_by_client and c.close_code == protocol.CLOSE_ENDED
      )
      unexpected += not expected
      closes[(c.close_code, c.close_reason or "", expected)] += 1
    ticks = [c.ticks for c in normal if c.connected]
    lag = np.asarray(self.loop_lag_s or [0.0]) * 1000
    margins = [c.playback.min_margin_s for c in normal if c.playback.frames]

    for c in slow:
      if c.connected and c.stopped_reading_at is None:
        self.notes.append(f"slow client {c.index} never stopped reading (the run was shorter than --slow-after)")

    def rel(t):
      return None if t is None else round(t - t0, 2)

    return {
      "tool": "serving.loadtest",
      "url": o.url,
      "sessions": o.sessions,
      "duration_s": o.duration,
      "wall_s": round(wall_s, 2),
      "audio": self.source,
      "video": o.video,
      "connected": sum(c.connected for c in self.clients),
      "refused": sum(c.refused is not None for c in self.clients),
      "refusals": sorted({c.refused for c in self.clients if c.refused}),
      "errors": sum(len(c.errors) for c in self.clients),
      "error_samples": sorted({e for c in self.clients for e in c.errors})[:10],
      "unexpected_closes": unexpected,
      "closes": [
        {"code": code, "reason": reason, "expected": exp, "count": n}
        for (code, reason, exp), n in sorted(closes.items(), key=lambda kv: (str(kv[0][0]), kv[0][1]))
      ],
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
      "tick_ms": _percentiles([x for c in normal for x in c.tick_ms]),
      "step_ms": _percentiles([x for c in normal for x in c.step_ms]),
      # What the server adds around the step (inputs, vocoder, queueing): what other clients can change.
      "overhead_ms": _percentiles([x for c in normal for x in c.overhead_ms]),
      "late_ms": _percentiles([x for c in normal for x in c.late_ms]),
      "underruns": sum(c.playback.underruns for c in normal),
      "max_late_ms": round(max((c.playback.max_late_s for c in normal), default=0.0) * 1000, 2),
      "min_margin_ms": round(min(margins) * 1000, 2) if margins else None,
      "stalls": sum(c.playback.stalls for c in normal),
      "stall_ms": round(sum(c.playback.stall_s for c in normal) * 1000, 1),
      "server_counters": self.server_counters(),
      "events": dict(sum((c.events for c in self.clients), collections.Counter())),
      "slow_clients": [
        {
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
        for c in slow
      ],
      "extra_session": self.extra,
      "client_loop_lag_ms": {"p99": round(float(np.percentile(lag, 99)), 2), "max": round(float(lag.max()), 2)},
      "client_max_send_lag_ms": round(max((c.max_send_lag_s for c in self.clients), default=0.0) * 1000, 2),
      "stats_poll_errors": self.stats_errors,
      "notes": self.notes,
      "loadavg": [round(x, 2) for x in os.getloadavg()],
      "cpu_count": os.cpu_count(),
    }


async def run(options: Options, speech: np.ndarray | None = None, source: str | None = None, log=None) -> dict:
  """Run the load test; ``speech`` (int16, 16 kHz) defaults to ``load_speech(options.audio_dir)``."""
  log = log or (lambda line: print(line, file=sys.stderr, flush=True))
  if speech is None:
    speech, source = await asyncio.to_thread(load_speech, options.audio_dir, log)
  return await LoadTest(options, speech, source=source or "given", log=log).run()


# -- output ---------------------------------------------------------------------------------


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


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(
    prog="python -m serving.loadtest",
    description=__doc__,
    epilog="Protocol: serving/PROTOCOL.md. Exit status: 0 when every session connected, ran and ended cleanly, else 1.",
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  p.add_argument(
    "--url", default=f"ws://127.0.0.1:8000{protocol.SESSION_PATH}", help="session URL (default: %(default)s)"
  )
  p.add_argument("--token", help=f"access token (default: ${TOKEN_ENV})")
  p.add_argument("--sessions", type=int, default=4, help="concurrent clients (default: %(default)s)")
  p.add_argument("--duration", type=float, default=10.0, help="seconds each client streams (default: %(default)s)")
  p.add_argument("--audio", metavar="DIR", help="directory of .wav files to stream (default: espeak-ng speech)")
  p.add_argument("--video", action="store_true", help="also send one small JPEG per 200 ms chunk")
  p.add_argument("--slow-clients", type=int, default=0, metavar="K", help="clients that stop reading (default: 0)")
  p.add_argument(
    "--slow-after", type=float, default=3.0, help="seconds before slow clients stop (default: %(default)s)"
  )
  p.add_argument(
    "--slow-linger", type=float, default=30.0, help="seconds past --duration to wait for the server to close them"
  )
  p.add_argument("--extra-session-at", type=float, metavar="SECONDS", help="open one session too many at this time")
  p.add_argument("--progress", type=float, default=10.0, help="seconds between progress lines on stderr (0: none)")
  p.add_argument("--json", action="store_true", help="print only the JSON report")
  args = p.parse_args(argv)
  args.token = args.token or os.environ.get(TOKEN_ENV)
  if not args.token:
    p.error(f"no token: pass --token or set ${TOKEN_ENV}")
  if args.sessions < 1 or not 0 <= args.slow_clients <= args.sessions or args.duration <= 0:
    p.error("need --sessions >= 1, 0 <= --slow-clients <= --sessions and --duration > 0")
  return args


def clean(report: dict) -> bool:
  """Every session connected, nothing refused or in error, every close expected, no underrun."""
  return (
    report["connected"] == report["sessions"]
    and report["errors"] == 0
    and report["unexpected_closes"] == 0
    and report["underruns"] == 0
  )


def main(argv=None) -> int:
  args = parse_args(argv)
  options = Options(
    url=args.url,
    token=args.token,
    sessions=args.sessions,
    duration=args.duration,
    audio_dir=args.audio,
    video=args.video,
    slow_clients=args.slow_clients,
    slow_after=args.slow_after,
    slow_linger=args.slow_linger,
    extra_session_at=args.extra_session_at,
    progress=args.progress,
  )
  report = asyncio.run(run(options))
  if not args.json:
    print(format_table(report))
  print(json.dumps(report), flush=True)
  return 0 if clean(report) else 1


if __name__ == "__main__":
  sys.exit(main())
