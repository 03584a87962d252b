r"""Live server: WebSocket sessions on the sessions engine, one tick every 200 ms.

  python -m launch.serve --checkpoint workdir/demo [--host 127.0.0.1] [--port 8000] [--slots 32]

(the command line, ``serve_forever``, is ``launch/serve.py``).

Every live session holds one slot of the engine's jitted step. A tick runs at each multiple of 200 ms of
wall clock: each session's audio received since its last tick is cut into the micro-turn (zero-padded:
input that has not arrived counts as silence), its newest video frame and typed text go in with it, and
the model's speech, text, tool events and the tick's timing go out. This module holds the sessions, the
tick schedule and backpressure; the wire format is ``protocol.py`` (``PROTOCOL.md``), the HTTP side
``routes.py``, the media work (features, video, vocoder, text and tool events) ``media.py``.

Threads: the asyncio loop reads and writes sockets and checks every frame (checks that cost nothing: no decoding);
one engine thread owns the engine (join, leave, video decode and resize, featurize, step, vocoder), so a tick never
stops the loop from reading. Video is decoded ahead, in the engine thread's idle time between ticks: the newest
frame, when its session has none decoded and waiting (a newer frame replaces an undecoded older one). So a session
costs at most about one decode per tick however fast it sends, and rarely inside a tick.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import dataclasses
import json
import socket
import time

import numpy as np
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Response
from websockets.protocol import State

from serving import protocol
from serving.engine import Engine, EngineFullError, Sampling
from serving.media import Media, SessionMedia
from serving.protocol import AUDIO as AUDIO
from serving.protocol import PROTOCOL_VERSION, TICK_S, ClientError, Limits
from serving.protocol import RAW as RAW
from serving.protocol import TOKEN_ENV as TOKEN_ENV
from serving.routes import ROUTES as ROUTES
from serving.routes import STATIC as STATIC
from serving.routes import Routes, response

# Kernel send buffer per connection: fixed (no autotuning to megabytes), so a client that stops
# reading reaches the server's unsent-output cap within seconds instead of minutes of queued audio.
SEND_BUFFER_BYTES = 64 << 10
DEFAULT_LIMITS = Limits()


@dataclasses.dataclass(eq=False)
class Client:
  """One connection's state on the loop side; ``session`` and ``media`` are touched only by the engine thread."""

  ws: ServerConnection
  started: float
  key: int = 0
  released: bool = False  # its slot is free again
  session: object = None
  audio: bytearray = dataclasses.field(default_factory=bytearray)
  video: tuple[int, bytes] | None = None  # the newest frame not decoded yet: (kind, payload)
  frame: object = None  # a frame decoded ahead for the next tick (an array), or the ClientError its decode raised
  decoding: bool = False  # a decode-ahead job is queued on the engine thread
  typed: list = dataclasses.field(default_factory=list)  # text to queue at the next tick
  typed_bytes: int = 0
  text_queued: int = 0  # typed text (bytes) the model had not read at the end of the last tick
  sampling: Sampling | None = None  # settings to apply at the next tick
  outbox: collections.deque = dataclasses.field(default_factory=collections.deque)
  unsent: int = 0
  wake: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
  closing: bool = False
  media: SessionMedia = dataclasses.field(default_factory=SessionMedia)


def percentile(values, q: float) -> float | None:
  return float(np.percentile(np.asarray(values), q)) if len(values) else None


class LiveServer:
  """The WebSocket front of an ``Engine``; ``autotick=False`` lets a caller (tests) drive ``tick()``."""

  def __init__(
    self,
    engine: Engine,
    *,
    token: str,
    allowed_origins=(),
    limits: Limits | None = None,
    vocoder_iters: int = 4,
    autotick: bool = True,
    log=print,
  ):
    self.engine, self.token, self.autotick, self.log = engine, token, autotick, log
    self.limits = limits or DEFAULT_LIMITS
    self.media = Media(engine.cfg, vocoder_iters)
    self.audio_in, self.mel_in = self.media.audio_in, self.media.mel_in
    self.clients: dict[int, Client] = {}
    self.draining = False
    self.ticks = 0
    self.tick_ms = collections.deque(maxlen=5000)
    self.counters = collections.Counter()
    self.routes = Routes(token, allowed_origins, admit=self._admit, stats=self.stats, counters=self.counters)
    self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="engine")
    self._server = None
    self._stopped = False  # the engine thread is gone
    self._ticker = None
    self._tasks: set[asyncio.Task] = set()
    self._next_id = 0
    self.port = None

  # -- lifecycle ------------------------------------------------------------------

  async def start(self, host: str = "127.0.0.1", port: int = 8000) -> int:
    """Compile the step (one idle tick), bind, start ticking; returns the bound port."""
    await self._run(self.engine.tick, {})
    lim = self.limits
    self._server = await serve(
      self._handle,
      host,
      port,
      process_request=self.routes,
      max_size=lim.max_message_bytes,
      ping_interval=lim.ping_interval_s,
      ping_timeout=lim.ping_timeout_s,
      close_timeout=2,
      compression=None,
      max_queue=64,
      write_limit=64 << 10,
      create_connection=self.routes.connection,
    )
    self.port = self._server.sockets[0].getsockname()[1]
    self.routes.default_origins(host, self.port)
    if self.autotick:
      self._ticker = asyncio.create_task(self._tick_loop())
    return self.port

  async def drain(self, reason: str = protocol.SHUTDOWN_REASON) -> None:
    """Stop accepting, close every session with code 1001 and ``reason``, stop ticking."""
    self.draining = True
    if self._ticker is not None:
      self._ticker.cancel()
    closes = [c.ws.close(protocol.CLOSE_SHUTDOWN, reason) for c in list(self.clients.values())]
    await asyncio.gather(*closes, return_exceptions=True)
    if self._server is not None:
      self._server.close()
      await self._server.wait_closed()
    for _ in range(200):  # handlers free their slots on the engine thread
      if not self.clients:
        break
      await asyncio.sleep(0.01)
    self._stopped = True
    self._executor.shutdown(wait=True)

  async def abort(self, code: int, reason: str, timeout_s: float = 2.0) -> None:
    """Close every session with ``code`` and ``reason`` without the engine (it may be stuck: a lost process)."""
    self.draining = True
    if self._ticker is not None:
      self._ticker.cancel()
    closes = asyncio.gather(*(c.ws.close(code, reason) for c in list(self.clients.values())), return_exceptions=True)
    with contextlib.suppress(TimeoutError):  # the frames are out; a peer that does not answer is not waited for
      await asyncio.wait_for(closes, timeout_s)

  async def _run(self, fn, *args):
    return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

  def _spawn(self, coro) -> None:
    task = asyncio.create_task(coro)
    self._tasks.add(task)
    task.add_done_callback(self._tasks.discard)

  # -- admission and stats ----------------------------------------------------------

  def _full(self) -> str | None:
    if len(self.clients) >= self.engine.slots:
      self.counters["refused_full"] += 1
      return f"server full: {len(self.clients)} of {self.engine.slots} slots in use"
    return None

  def _admit(self) -> Response | None:
    """Before the upgrade: 503 while draining or with every slot taken, else None (the upgrade goes on)."""
    if self.draining:
      return response(503, protocol.SHUTDOWN_REASON, Retry_After="5")
    full = self._full()
    return None if full is None else response(503, full, Retry_After="1")

  def stats(self) -> dict:
    return {
      "protocol": PROTOCOL_VERSION,
      "slots": self.engine.slots,
      "clients": len(self.clients),
      "engine_sessions": len(self.engine.sessions),
      "ticks": self.ticks,
      "tick_ms_p50": percentile(self.tick_ms, 50),
      "tick_ms_p99": percentile(self.tick_ms, 99),
      "draining": self.draining,
      **dict(self.counters),
    }

  # -- sessions -------------------------------------------------------------------

  def started_event(self, client: Client) -> dict:
    return protocol.started_event(client.session.id, self.media.video_shape, self.limits)

  async def _handle(self, ws: ServerConnection) -> None:
    if self.draining:
      await ws.close(protocol.CLOSE_SHUTDOWN, protocol.SHUTDOWN_REASON)
      return
    full = self._full()
    if full is not None:  # lost a race for the last slot after the upgrade
      await ws.close(protocol.CLOSE_FULL, full)
      return
    sock = ws.transport.get_extra_info("socket") if ws.transport is not None else None
    if sock is not None:
      sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_BYTES)
    client = Client(ws, time.monotonic(), key=self._next_id)
    self._next_id += 1
    self.clients[client.key] = client  # the slot is reserved from here: admission counts it
    writer = None
    try:
      try:
        client.session = await self._run(self.engine.join, Sampling())
      except EngineFullError as e:
        await ws.close(protocol.CLOSE_FULL, f"server full: {e}")
        return
      self.counters["sessions"] += 1
      writer = asyncio.create_task(self._writer(client))
      self._send(client, json.dumps(self.started_event(client)))
      async for message in ws:
        if client.closing:
          continue
        try:
          self._on_message(client, message)
        except ClientError as e:
          self.counters[f"error_{e.code}"] += 1
          self._send(client, json.dumps(protocol.error_event(e)))
    except ConnectionClosed:
      pass
    except Exception as e:  # noqa: BLE001  (a bug must cost one session, never the server)
      self.counters["internal_errors"] += 1
      self.log(f"session {client.key}: internal error: {type(e).__name__}: {e}")
      await ws.close(protocol.CLOSE_SERVER_ERROR, f"server error: {type(e).__name__}")
    finally:
      if writer is not None:
        writer.cancel()
      await self._release(client)

  async def _release(self, client: Client) -> None:
    """Free the client's slot (once): from its handler's end, or from a tick that sees its socket closing."""
    client.closing = True
    if client.released:
      return
    client.released = True
    if client.session is not None and not self._stopped:
      await self._run(self.engine.leave, client.session.id)
    del self.clients[client.key]

  def _room(self, client: Client) -> int:
    """Bytes the client's buffered input (audio and typed text) may still grow by."""
    return self.limits.max_buffered_input_bytes - len(client.audio) - client.typed_bytes

  def _text_room(self, client: Client) -> int:
    """Bytes of typed text the client may still send: the model reads it a few bytes a tick, the rest waits."""
    pending = self.limits.max_pending_text_bytes - client.text_queued - client.typed_bytes
    return min(self._room(client), pending)

  def _on_message(self, client: Client, message: bytes | str) -> None:
    if isinstance(message, bytes):
      self._on_binary(client, *protocol.parse_binary(message))
      return
    event = protocol.parse_event(message)
    kind = event["type"]
    if kind == "text":
      client.typed_bytes += protocol.typed_text(event["text"], self._text_room(client))
      client.typed.append(event["text"])
    elif kind == "session.update":
      if "sampling" in event:
        client.sampling = dataclasses.replace(client.sampling or client.session.sampling, **event["sampling"])
    elif kind == "ping":
      self._send(client, json.dumps(protocol.pong_event(event.get("id"), client.session.turn)))
    elif kind == "session.end":
      self._close(client, protocol.CLOSE_ENDED, protocol.ENDED_REASON)

  def _on_binary(self, client: Client, kind: int, payload: bytes) -> None:
    if kind == AUDIO:
      if len(payload) > self._room(client):
        raise ClientError(
          "input_overflow",
          f"buffered input would exceed {self.limits.max_buffered_input_bytes} bytes; send audio in real time",
        )
      client.audio += payload
      self.counters["audio_bytes_in"] += len(payload)
    else:
      self.media.check_video(kind, payload)
      if client.video is not None:  # the ticks use the newest frame only: this one is never decoded
        self.counters["video_frames_dropped"] += 1
      client.video = (kind, payload)
      self.counters["video_frames_in"] += 1
      self._decode_ahead(client)

  def _decode_ahead(self, client: Client) -> None:
    """Queue the decode of ``client``'s newest frame on the engine thread unless one is queued or waiting."""
    if client.video is None or client.frame is not None or client.decoding or client.closing:
      return
    client.decoding = True
    self._spawn(self._decode(client))

  async def _decode(self, client: Client) -> None:
    video = client.video
    try:
      frame = await self._run(self.media.decoded, *video)
    finally:
      client.decoding = False
    if client.video is video:
      client.video, client.frame = None, frame
    else:  # replaced while it was decoded: the newer one is decoded next
      self.counters["video_frames_dropped"] += 1
      self._decode_ahead(client)

  # -- output -----------------------------------------------------------------------

  def _send(self, client: Client, message: bytes | str) -> None:
    if client.closing:
      return
    size = len(message)
    transport = client.ws.transport
    buffered = transport.get_write_buffer_size() if transport is not None else 0
    if client.unsent + buffered + size > self.limits.max_unsent_output_bytes:
      self.counters["closed_slow"] += 1
      self._close(client, protocol.CLOSE_POLICY, f"client too slow: {client.unsent + buffered} bytes of output unsent")
      return
    client.outbox.append(message)
    client.unsent += size
    client.wake.set()

  async def _writer(self, client: Client) -> None:
    while True:
      await client.wake.wait()
      client.wake.clear()
      while client.outbox:
        message = client.outbox.popleft()
        try:
          await client.ws.send(message)
        except ConnectionClosed:
          return
        client.unsent -= len(message)

  def _close(self, client: Client, code: int, reason: str) -> None:
    if not client.closing:
      self.log(f"session {client.session.id if client.session else '-'}: closing with {code}: {reason}")
      client.closing = True
      client.outbox.clear()
      self._spawn(client.ws.close(code, reason))

  # -- ticks ------------------------------------------------------------------------

  async def _tick_loop(self) -> None:
    next_at = time.monotonic()
    while True:
      delay = next_at - time.monotonic()
      if delay > 0:
        await asyncio.sleep(delay)
      await self.tick(next_at)
      next_at += TICK_S
      behind = time.monotonic() - next_at
      if behind > TICK_S:  # more than a whole tick behind: the missed ticks are gone, say so
        self.counters["skipped_ticks"] += int(behind // TICK_S)
        next_at += (behind // TICK_S) * TICK_S

  async def tick(self, scheduled: float | None = None) -> None:
    """One micro-turn for every live session: cut inputs, run the engine thread, queue outputs."""
    scheduled = time.monotonic() if scheduled is None else scheduled
    now = time.monotonic()
    cuts = []
    for client in list(self.clients.values()):
      if client.ws.state in (State.CLOSING, State.CLOSED) and client.session is not None:
        # Closing (e.g. a dead peer failed the keepalive): free the slot now, not after the close timeout.
        self._spawn(self._release(client))
        continue
      if client.session is None or client.closing:
        continue
      if now - client.started > self.limits.max_session_s:
        reason = f"session reached its maximum duration of {self.limits.max_session_s:g} s"
        self._close(client, protocol.CLOSE_POLICY, reason)
        continue
      take = min(len(client.audio), 2 * protocol.SAMPLES_PER_TICK)
      pcm = np.frombuffer(bytes(client.audio[:take]), "<i2")
      del client.audio[:take]
      # A frame decoded ahead; else (the first frame of a session, just before this tick) the undecoded one.
      video = ("decoded", client.frame) if client.frame is not None else client.video
      cuts.append((client, pcm, video, client.typed, client.sampling))
      self.counters["video_frames_used"] += video is not None
      if client.frame is not None:
        client.frame = None  # a newer undecoded frame, if any, stays for the next tick
      else:
        client.video = None
      client.text_queued += client.typed_bytes  # handed to the engine: counted until the tick reports the rest
      client.typed, client.typed_bytes, client.sampling = [], 0, None
    if not cuts:
      return
    late_ms = (now - scheduled) * 1000
    outputs = await self._run(self._tick_engine, cuts, scheduled, late_ms)
    self.ticks += 1
    for client, *_ in cuts:
      self._decode_ahead(client)  # frames that came during this tick, decoded before the next
    for client, messages, queued, refused in outputs:
      client.text_queued = queued
      if refused is not None:
        self.counters[f"error_{refused.code}"] += 1
      for message in messages:
        self._send(client, message)

  def _tick_engine(self, cuts, scheduled: float, late_ms: float):
    """Engine thread: decode video, featurize, step, vocode.

    Returns per client: its messages, the typed text its session has not read yet, and the error that refused its
    video frame (None if none).
    """
    engine, inputs, live = self.engine, {}, []
    for client, pcm, video, typed, sampling in cuts:
      session = client.session
      if session.id not in engine.sessions:  # left while the cut was in flight
        continue
      if sampling is not None:
        engine.configure(session, sampling)
      for said in typed:
        engine.say(session, said)
      if video is not None:  # decoded ahead, or (a session's first frame, just before the tick) now
        if video[0] != "decoded":
          self.counters["video_decoded_in_tick"] += 1  # written by this thread only
        video = video[1] if video[0] == "decoded" else self.media.decoded(*video)
      frame, refused = (None, video) if isinstance(video, ClientError) else (video, None)
      inputs[session.id] = self._features(client, pcm, frame)
      live.append((client, pcm, refused))
    t = time.monotonic()
    results = engine.tick(inputs)
    step_ms = (time.monotonic() - t) * 1000
    speech = self.media.speech([c.media for c, *_ in live], [results[client.session.id] for client, *_ in live])
    out = []
    for (client, pcm, refused), voice in zip(live, speech, strict=True):
      messages = [] if refused is None else [json.dumps(protocol.error_event(refused))]
      messages += self.media.outputs(client.media, client.session, results[client.session.id], pcm, voice)
      out.append((client, messages, len(client.session.pending), refused))
    tick_ms = (time.monotonic() - scheduled) * 1000
    self.tick_ms.append(tick_ms)
    timing = {"tick_ms": round(tick_ms, 2), "step_ms": round(step_ms, 2), "late_ms": round(late_ms, 2)}
    for _, messages, _, _ in out:
      messages[-1]["timing"] = timing
      messages[-1] = json.dumps(messages[-1])
    return out

  def _features(self, client: Client, pcm: np.ndarray, frame: np.ndarray | None) -> dict:
    return self.media.features(client.media, pcm, frame)
