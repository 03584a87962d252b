r"""Live server: WebSocket sessions on the sessions engine, one tick every 200 ms.

  python -m serving.server --checkpoint workdir/demo [--host 127.0.0.1] [--port 8000] [--slots 32]

The protocol (frames, events, limits, close codes) is ``serving/PROTOCOL.md``.
Every live session holds one slot of the engine's jitted step. A tick runs at
each multiple of 200 ms of wall clock: each session's audio received since its
last tick is cut into the micro-turn (zero-padded: input that has not arrived
counts as silence), its newest video frame and typed text go in with it, and
the model's speech (PCM16), text, tool events and the tick's timing go out.

Threads: the asyncio loop reads and writes sockets and checks every frame; one
engine thread owns the engine (join, leave, featurize, step, vocoder), so a tick
never stops the loop from reading. The token comes from ``--token-file``, the
``INTERACTION_SERVER_TOKEN`` environment variable, or is generated and printed.
"""

from __future__ import annotations

import argparse
import asyncio
import codecs
import collections
import concurrent.futures
import dataclasses
import hmac
import http
import io
import json
import math
import os
import pathlib
import secrets
import signal
import socket
import struct
import sys
import time
import urllib.parse

import numpy as np
from websockets.asyncio.server import ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response
from websockets.protocol import State

from data_pipeline import audio, featurize, record
from interaction import layout, text
from serving import metrics
from serving.engine import Engine, EngineFullError, Sampling

PROTOCOL_VERSION = 1
TOKEN_ENV = "INTERACTION_SERVER_TOKEN"
AUDIO, JPEG, RAW = 0x01, 0x02, 0x03
SAMPLE_RATE = record.SAMPLE_RATE
SAMPLES_PER_TICK = record.SAMPLES_PER_TURN
TICK_S = layout.MICRO_TURN_SECONDS
MAX_SIDE = 4096  # pixels: larger video frames are refused before decoding
# Kernel send buffer per connection: fixed (no autotuning to megabytes), so a client that stops
# reading reaches the server's unsent-output cap within seconds instead of minutes of queued audio.
SEND_BUFFER_BYTES = 64 << 10
SPEECH_RMS = 0.01  # -40 dBFS: the user's micro-turn "has speech energy" above this
STATIC = pathlib.Path(__file__).parent / "static"
# Every route; "<file>" is any file in STATIC. All but /healthz need the token.
ROUTES = ("/", "/static/<file>", "/healthz", "/v1/stats", "/v1/session")
CONTENT_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript", ".css": "text/css"}


@dataclasses.dataclass(frozen=True)
class Limits:
  max_message_bytes: int = 1 << 20
  max_buffered_input_bytes: int = 128_000  # 4 s of PCM16 plus typed text
  max_unsent_output_bytes: int = 128 << 10  # ~4 s of speech: a reader that stops hits it before the ping timeout
  max_session_s: float = 3600.0
  ping_interval_s: float = 5.0
  ping_timeout_s: float = 10.0


class ClientError(ValueError):
  """A refused frame: becomes an ``error`` event; the session goes on."""

  def __init__(self, code: str, message: str):
    super().__init__(message)
    self.code = code


@dataclasses.dataclass(eq=False)
class Client:
  """One connection's state on the loop side; ``session`` is the engine's, touched only by the engine thread."""

  ws: ServerConnection
  started: float
  key: int = 0
  released: bool = False  # its slot is free again
  session: object = None
  audio: bytearray = dataclasses.field(default_factory=bytearray)
  video: np.ndarray | None = None  # newest frame since the last tick, at the model's frame size
  typed: list = dataclasses.field(default_factory=list)  # text to queue at the next tick
  typed_bytes: int = 0
  sampling: Sampling | None = None  # settings to apply at the next tick
  outbox: collections.deque = dataclasses.field(default_factory=collections.deque)
  unsent: int = 0
  wake: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
  closing: bool = False
  # engine-thread state
  tail: np.ndarray | None = None  # the previous tick's last (win - hop) samples, for causal mel frames
  utf8: object = dataclasses.field(default_factory=lambda: codecs.getincrementaldecoder("utf-8")("replace"))
  in_call: bool = False
  calls: dict = dataclasses.field(default_factory=dict)  # id(call) -> [number, reported chars]
  next_call: int = 0


def _finite(value, name: str, lo: float, hi: float, lo_open: bool = False) -> float:
  if isinstance(value, bool) or not isinstance(value, int | float):
    raise ClientError("bad_event", f"{name} must be a number, got {type(value).__name__}")
  if not math.isfinite(value) or value < lo or value > hi or (lo_open and value == lo):
    raise ClientError("bad_value", f"{name}={value} is out of range {'(' if lo_open else '['}{lo}, {hi}]")
  return float(value)


def parse_sampling(given, current: Sampling) -> Sampling:
  if not isinstance(given, dict):
    raise ClientError("bad_event", "sampling must be an object")
  unknown = sorted(set(given) - {"temperature", "top_p", "seed"})
  if unknown:
    raise ClientError("bad_event", f"unknown sampling fields {unknown}; fields are temperature, top_p, seed")
  fields = dataclasses.asdict(current)
  if "temperature" in given:
    fields["temperature"] = _finite(given["temperature"], "temperature", 0.0, 100.0)
  if "top_p" in given:
    fields["top_p"] = _finite(given["top_p"], "top_p", 0.0, 1.0, lo_open=True)
  if "seed" in given:
    seed = given["seed"]
    if isinstance(seed, bool) or not isinstance(seed, int):
      raise ClientError("bad_event", f"seed must be an integer, got {type(seed).__name__}")
    if not 0 <= seed < 2**32:
      raise ClientError("bad_value", f"seed={seed} is out of range [0, 2**32)")
    fields["seed"] = seed
  return Sampling(**fields)


def _reject_constant(name: str):
  raise ClientError("bad_json", f"non-finite number {name} is not allowed")


def decode_video(kind: int, payload: bytes, shape: tuple[int, int]) -> np.ndarray:
  """A JPEG or raw RGB frame resized to ``shape`` (height, width) as the training data is: uint8 [H, W, 3]."""
  if kind == RAW:
    if len(payload) < 4:
      raise ClientError("bad_video", f"raw frame has {len(payload)} bytes: needs a 4-byte width/height header")
    w, h = struct.unpack_from("<HH", payload)
    if not (1 <= w <= MAX_SIDE and 1 <= h <= MAX_SIDE):
      raise ClientError("bad_video", f"raw frame of {w}x{h}: each side must be in [1, {MAX_SIDE}]")
    if len(payload) != 4 + w * h * 3:
      raise ClientError(
        "bad_video", f"raw {w}x{h} RGB frame needs {w * h * 3} bytes after the header, got {len(payload) - 4}"
      )
    frame = np.frombuffer(payload, np.uint8, offset=4).reshape(h, w, 3)
  else:
    from PIL import Image  # a serving dependency only

    try:
      image = Image.open(io.BytesIO(payload), formats=["JPEG"])
      w, h = image.size
      if not (1 <= w <= MAX_SIDE and 1 <= h <= MAX_SIDE):
        raise ClientError("bad_video", f"JPEG of {w}x{h}: each side must be in [1, {MAX_SIDE}]")
      image.draft("RGB", (shape[1], shape[0]))  # DCT-domain downscale: decode cost ~ the target size
      frame = np.asarray(image.convert("RGB"))
    except ClientError:
      raise
    except Exception as e:  # noqa: BLE001  (PIL raises many types for corrupt data)
      raise ClientError("bad_video", f"not a decodable JPEG: {type(e).__name__}: {e}") from None
  return featurize.resize(frame[None].astype(np.uint8), shape)[0]


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
    limits: Limits = Limits(),
    vocoder_iters: int = 4,
    autotick: bool = True,
    log=print,
  ):
    self.engine, self.token, self.limits, self.autotick, self.log = engine, token, limits, autotick, log
    self.allowed_origins = set(allowed_origins)
    self.vocoder_iters = vocoder_iters
    cfg = engine.cfg
    self.audio_in = next(s for s in cfg.streams if s.direction == "in" and s.kind == "audio")
    self.audio_out = next((s for s in cfg.streams if s.direction == "out" and s.kind == "audio"), None)
    self.video_in = next((s for s in cfg.streams if s.direction == "in" and s.kind == "video"), None)
    self.mel_in = audio.mel_config(self.audio_in)
    self.mel_out = audio.mel_config(self.audio_out) if self.audio_out else None
    if self.audio_in.slots * self.mel_in.hop != SAMPLES_PER_TICK:
      raise ValueError(f"audio_in has {self.audio_in.slots} frames of {self.mel_in.hop} samples per micro-turn")
    self.clients: dict[int, Client] = {}
    self.draining = False
    self.ticks = 0
    self.tick_ms = collections.deque(maxlen=5000)
    self.counters = collections.Counter()
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
      process_request=self._process_request,
      max_size=lim.max_message_bytes,
      ping_interval=lim.ping_interval_s,
      ping_timeout=lim.ping_timeout_s,
      close_timeout=2,
      compression=None,
      max_queue=64,
      write_limit=64 << 10,
    )
    self.port = self._server.sockets[0].getsockname()[1]
    if not self.allowed_origins:
      self.allowed_origins = {f"http://{h}:{self.port}" for h in {host, "localhost", "127.0.0.1"}}
    if self.autotick:
      self._ticker = asyncio.create_task(self._tick_loop())
    return self.port

  async def drain(self, reason: str = "server shutting down") -> None:
    """Stop accepting, close every session with code 1001 and ``reason``, stop ticking."""
    self.draining = True
    if self._ticker is not None:
      self._ticker.cancel()
    closes = [c.ws.close(1001, reason) for c in list(self.clients.values())]
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

  async def _run(self, fn, *args):
    return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

  def _spawn(self, coro) -> None:
    task = asyncio.create_task(coro)
    self._tasks.add(task)
    task.add_done_callback(self._tasks.discard)

  # -- HTTP: auth, origin, admission, static files --------------------------------

  def _authorized(self, request: Request) -> bool:
    given = ""
    header = request.headers.get("Authorization", "")
    if header.startswith("Bearer "):
      given = header[len("Bearer ") :].strip()
    else:
      query = urllib.parse.parse_qs(urllib.parse.urlsplit(request.path).query)
      given = (query.get("token") or [""])[0]
    return hmac.compare_digest(given.encode(), self.token.encode())

  @staticmethod
  def _response(status: int, body: bytes | str, content_type: str = "text/plain; charset=utf-8", **headers) -> Response:
    body = body.encode() if isinstance(body, str) else body
    status = http.HTTPStatus(status)
    pairs = [("Content-Type", content_type), ("Content-Length", str(len(body))), ("Cache-Control", "no-store")]
    pairs += [(k.replace("_", "-"), v) for k, v in headers.items()]
    return Response(status.value, status.phrase, Headers(pairs), body)

  def _json(self, status: int, obj) -> Response:
    return self._response(status, json.dumps(obj), "application/json")

  def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
    path = urllib.parse.urlsplit(request.path).path
    if path == "/healthz":
      return self._json(200, {"status": "ok", "protocol": PROTOCOL_VERSION})
    origin = request.headers.get("Origin")
    if origin is not None and origin not in self.allowed_origins:
      self.counters["refused_origin"] += 1
      return self._response(403, f"origin {origin!r} is not allowed; start the server with --allowed-origin {origin}")
    if not self._authorized(request):
      self.counters["refused_auth"] += 1
      return self._response(401, "missing or wrong token", WWW_Authenticate='Bearer realm="interaction"')
    if path == "/v1/session":
      if self.draining:
        return self._response(503, "server shutting down", Retry_After="5")
      if len(self.clients) >= self.engine.slots:
        self.counters["refused_full"] += 1
        return self._response(
          503, f"server full: {len(self.clients)} of {self.engine.slots} slots in use", Retry_After="1"
        )
      return None  # the WebSocket handshake goes on
    if path == "/v1/stats":
      return self._json(200, self.stats())
    if path == "/":
      path = "/static/index.html"
    if path.startswith("/static/"):
      name = path[len("/static/") :]
      file = STATIC / name
      if "/" not in name and not name.startswith(".") and file.is_file():
        return self._response(200, file.read_bytes(), CONTENT_TYPES.get(file.suffix, "application/octet-stream"))
    return self._response(404, f"no route {path}; routes are {', '.join(ROUTES)}")

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
    h, w = self.video_in.frame_shape if self.video_in else (0, 0)
    return {
      "type": "session.started",
      "protocol": PROTOCOL_VERSION,
      "session": client.session.id,
      "tick_ms": round(TICK_S * 1000),
      "sample_rate": SAMPLE_RATE,
      "samples_per_tick": SAMPLES_PER_TICK,
      "video": {"width": w, "height": h},
      "limits": dataclasses.asdict(self.limits),
    }

  async def _handle(self, ws: ServerConnection) -> None:
    if self.draining:
      await ws.close(1001, "server shutting down")
      return
    if len(self.clients) >= self.engine.slots:  # lost a race for the last slot after the upgrade
      self.counters["refused_full"] += 1
      await ws.close(1013, f"server full: {len(self.clients)} of {self.engine.slots} slots in use")
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
        await ws.close(1013, f"server full: {e}")
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
          self._send(client, json.dumps({"type": "error", "code": e.code, "message": str(e), "fatal": False}))
    except ConnectionClosed:
      pass
    except Exception as e:  # noqa: BLE001  (a bug must cost one session, never the server)
      self.counters["internal_errors"] += 1
      self.log(f"session {client.key}: internal error: {type(e).__name__}: {e}")
      await ws.close(1011, f"server error: {type(e).__name__}")
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

  def _on_message(self, client: Client, message: bytes | str) -> None:
    if isinstance(message, bytes):
      self._on_binary(client, message)
      return
    try:
      event = json.loads(message, parse_constant=_reject_constant)
    except json.JSONDecodeError as e:
      raise ClientError("bad_json", f"not JSON: {e}") from None
    if not isinstance(event, dict) or not isinstance(event.get("type"), str):
      raise ClientError("bad_json", 'a text frame must be a JSON object with a string "type"')
    kind = event["type"]
    if kind == "text":
      said = event.get("text")
      if not isinstance(said, str):
        raise ClientError("bad_event", 'text needs a string "text"')
      size = len(said.encode("utf-8", "surrogatepass"))
      if client.typed_bytes + len(client.audio) + size > self.limits.max_buffered_input_bytes:
        raise ClientError("input_overflow", f"{size} bytes of text would exceed the input buffer cap")
      try:
        said.encode("utf-8")
      except UnicodeEncodeError:
        raise ClientError("bad_event", "text holds unpaired surrogates") from None
      client.typed.append(said)
      client.typed_bytes += size
    elif kind == "session.update":
      unknown = sorted(set(event) - {"type", "sampling", "audio"})
      if unknown:
        raise ClientError("bad_event", f"unknown session.update fields {unknown}; fields are sampling, audio")
      if "audio" in event:
        declared = event["audio"]
        if not isinstance(declared, dict):
          raise ClientError("bad_event", "audio must be an object")
        rate, encoding = declared.get("sample_rate", SAMPLE_RATE), declared.get("encoding", "pcm16")
        if rate != SAMPLE_RATE or encoding != "pcm16" or isinstance(rate, bool):
          raise ClientError(
            "unsupported", f"audio {rate!r} Hz {encoding!r}: only {SAMPLE_RATE} Hz pcm16 is supported; resample first"
          )
      if "sampling" in event:
        client.sampling = parse_sampling(event["sampling"], client.sampling or client.session.sampling)
    elif kind == "ping":
      self._send(client, json.dumps({"type": "pong", "id": event.get("id"), "turn": client.session.turn}))
    elif kind == "session.end":
      self._close(client, 1000, "session ended by client")
    else:
      raise ClientError(
        "bad_event", f"unknown event type {kind[:64]!r}; types are text, session.update, ping, session.end"
      )

  def _on_binary(self, client: Client, message: bytes) -> None:
    if not message:
      raise ClientError("bad_frame", "empty binary frame: the first byte must be a kind (1 audio, 2 JPEG, 3 raw RGB)")
    kind, payload = message[0], message[1:]
    if kind == AUDIO:
      if len(payload) % 2:
        raise ClientError("bad_audio", f"audio payload has {len(payload)} bytes: PCM16 needs an even count")
      if len(client.audio) + client.typed_bytes + len(payload) > self.limits.max_buffered_input_bytes:
        raise ClientError(
          "input_overflow",
          f"buffered input would exceed {self.limits.max_buffered_input_bytes} bytes; send audio in real time",
        )
      client.audio += payload
      self.counters["audio_bytes_in"] += len(payload)
    elif kind in (JPEG, RAW):
      if self.video_in is None:
        raise ClientError("bad_frame", "this model has no video input")
      client.video = decode_video(kind, payload, self.video_in.frame_shape)
      self.counters["video_frames_in"] += 1
    else:
      raise ClientError("bad_frame", f"unknown binary kind {kind}: kinds are 1 audio, 2 JPEG, 3 raw RGB")

  # -- output -----------------------------------------------------------------------

  def _send(self, client: Client, message: bytes | str) -> None:
    if client.closing:
      return
    size = len(message)
    transport = client.ws.transport
    buffered = transport.get_write_buffer_size() if transport is not None else 0
    if client.unsent + buffered + size > self.limits.max_unsent_output_bytes:
      self.counters["closed_slow"] += 1
      self._close(client, 1008, f"client too slow: {client.unsent + buffered} bytes of output unsent")
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
        self._close(client, 1008, f"session reached its maximum duration of {self.limits.max_session_s:g} s")
        continue
      take = min(len(client.audio), 2 * SAMPLES_PER_TICK)
      pcm = np.frombuffer(bytes(client.audio[:take]), "<i2")
      del client.audio[:take]
      cuts.append((client, pcm, client.video, client.typed, client.sampling))
      client.video, client.typed, client.typed_bytes, client.sampling = None, [], 0, None
    if not cuts:
      return
    late_ms = (now - scheduled) * 1000
    outputs = await self._run(self._tick_engine, cuts, scheduled, late_ms)
    self.ticks += 1
    for client, messages in outputs:
      for message in messages:
        self._send(client, message)

  def _tick_engine(self, cuts, scheduled: float, late_ms: float):
    """Engine thread: featurize, step, vocode; returns the messages per client."""
    engine, inputs, live = self.engine, {}, []
    for client, pcm, frame, typed, sampling in cuts:
      session = client.session
      if session.id not in engine.sessions:  # left while the cut was in flight
        continue
      if sampling is not None:
        engine.configure(session, sampling)
      for said in typed:
        engine.say(session, said)
      inputs[session.id] = self._features(client, pcm, frame)
      live.append((client, pcm))
    t = time.monotonic()
    results = engine.tick(inputs)
    step_ms = (time.monotonic() - t) * 1000
    out = []
    speech = self._speech([results[client.session.id] for client, _ in live])
    for (client, pcm), frame in zip(live, speech, strict=True):
      out.append((client, self._outputs(client, results[client.session.id], pcm, frame)))
    tick_ms = (time.monotonic() - scheduled) * 1000
    self.tick_ms.append(tick_ms)
    timing = {"tick_ms": round(tick_ms, 2), "step_ms": round(step_ms, 2), "late_ms": round(late_ms, 2)}
    for _, messages in out:
      messages[-1]["timing"] = timing
      messages[-1] = json.dumps(messages[-1])
    return out

  def _features(self, client: Client, pcm: np.ndarray, frame: np.ndarray | None) -> dict:
    x = np.zeros(SAMPLES_PER_TICK, np.float32)
    x[: len(pcm)] = pcm[:SAMPLES_PER_TICK] * np.float32(1 / 32768)
    keep = self.mel_in.win - self.mel_in.hop
    tail = np.zeros(keep, np.float32) if client.tail is None else client.tail
    x = np.concatenate([tail, x])
    client.tail = x[-keep:]
    mel = audio.log_mel(self.mel_in, x, start=keep, num_frames=self.audio_in.slots)
    feats = {self.audio_in.name: mel.reshape(self.audio_in.slots, -1)}
    if self.video_in is not None and frame is not None:
      feats[self.video_in.name] = featurize.patchify(frame, self.video_in.patch_size)
    return feats

  def _speech(self, results: list[dict]) -> list[tuple[bool, bytes] | None]:
    """Per session: (speaking, the ``0x01`` PCM16 frame); one batched vocoder call for all who speak."""
    if self.audio_out is None:
      return [None] * len(results)
    mels = np.stack([r[self.audio_out.name] for r in results]) if results else np.zeros((0, 1, 1), np.float32)
    speaking = metrics.voiced(mels) if len(mels) else np.zeros(0, bool)
    waves = np.zeros((len(results), SAMPLES_PER_TICK), np.float32)
    if speaking.any():
      iters = self.vocoder_iters
      waves[speaking] = audio.waveforms(self.mel_out, mels[speaking], iters=iters, mel_iters=2 * iters)[
        :, :SAMPLES_PER_TICK
      ]
    pcm16 = np.clip(np.round(waves * 32767), -32768, 32767).astype("<i2")
    return [(bool(v), bytes([AUDIO]) + row.tobytes()) for v, row in zip(speaking, pcm16, strict=True)]

  def _outputs(self, client: Client, result: dict, pcm: np.ndarray, speech) -> list:
    """The audio frame, call events and the tick event (a dict; timing is added after every session)."""
    messages = []
    speaking = False
    if speech is not None:
      speaking, frame = speech
      messages.append(frame)
    said = bytearray()
    if self.engine.text_out is not None:
      for tok in result[self.engine.text_out].tolist():
        if tok in (text.TOOL_CALL_START, text.DELEGATE_START):
          client.in_call = True
        elif tok in (text.TOOL_CALL_END, text.DELEGATE_END):
          client.in_call = False
        elif tok < text.NUM_BYTES and not client.in_call:
          said.append(tok)
    messages += self._call_events(client)
    user = pcm.astype(np.float32) * np.float32(1 / 32768)
    rms = float(np.sqrt(np.mean(user * user))) if len(user) else 0.0
    messages.append(
      {
        "type": "tick",
        "turn": client.session.turn - 1,
        "text": client.utf8.decode(bytes(said)),
        "speaking": speaking,
        "user_speaking": rms > SPEECH_RMS,
        "user_audio_ms": round(min(len(pcm), SAMPLES_PER_TICK) * 1000 / SAMPLE_RATE),
      }
    )
    return messages

  def _call_events(self, client: Client) -> list[str]:
    events, turn = [], client.session.turn - 1
    for call in client.session.calls:
      if id(call) in client.calls or call.end_tick == -1:
        continue
      client.calls[id(call)] = [client.next_call, 0, call]
      events.append(
        json.dumps(
          {"type": "tool_call", "call": client.next_call, "kind": call.kind, "request": call.request, "turn": turn}
        )
      )
      client.next_call += 1
    for key, (number, reported, call) in list(client.calls.items()):
      result = call.result
      if len(result) > reported or call.closed:
        event = {"type": "tool_result", "call": number, "kind": call.kind, "text": result[reported:]}
        event.update(done=call.closed, error=call.error, turn=turn)
        events.append(json.dumps(event))
        client.calls[key][1] = len(result)
      if call.closed:
        del client.calls[key]
    return events


# -- command line ---------------------------------------------------------------------


def read_token(token_file: str | None) -> tuple[str, str]:
  """(token, where it came from)."""
  if token_file:
    token = pathlib.Path(token_file).read_text().strip()
    if not token:
      raise SystemExit(f"error: token file {token_file} is empty")
    return token, f"file {token_file}"
  if os.environ.get(TOKEN_ENV):
    return os.environ[TOKEN_ENV].strip(), f"${TOKEN_ENV}"
  return secrets.token_urlsafe(24), "generated"


def build_engine(checkpoint: str, slots: int) -> Engine:
  from interaction.ckpt import open_model
  from serving.background import ArithmeticBackground, BackgroundWorker
  from serving.tools import ToolRuntime

  loaded = open_model(checkpoint)
  return Engine.from_loaded(
    loaded, slots=slots, tools=ToolRuntime(), background=BackgroundWorker(ArithmeticBackground())
  )


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(
    prog="python -m serving.server",
    description="Serve live interaction sessions over WebSocket (protocol: serving/PROTOCOL.md).",
    formatter_class=argparse.ArgumentDefaultsHelpFormatter,
  )
  p.add_argument("--checkpoint", required=True, help="trainer workdir, its checkpoints/ directory, or one step")
  p.add_argument("--host", default="127.0.0.1", help="address to bind (default: localhost only)")
  p.add_argument("--port", type=int, default=8000, help="0 picks a free port")
  p.add_argument("--slots", type=int, default=32, help="concurrent sessions (the step's batch)")
  p.add_argument("--token-file", help=f"file holding the access token (else ${TOKEN_ENV}, else one is generated)")
  p.add_argument("--allowed-origin", action="append", default=[], help="browser Origin allowed to connect (repeat)")
  d = Limits()
  p.add_argument("--max-message-bytes", type=int, default=d.max_message_bytes, help="larger frames close with 1009")
  p.add_argument(
    "--max-buffered-input-bytes", type=int, default=d.max_buffered_input_bytes, help="audio + text waiting per session"
  )
  p.add_argument(
    "--max-unsent-output-bytes", type=int, default=d.max_unsent_output_bytes, help="past it a client closes with 1008"
  )
  p.add_argument("--max-session", type=float, default=d.max_session_s, help="seconds before a session is closed")
  p.add_argument("--ping-interval", type=float, default=d.ping_interval_s, help="seconds between WebSocket pings")
  p.add_argument("--ping-timeout", type=float, default=d.ping_timeout_s, help="seconds without a pong: peer is dead")
  p.add_argument("--vocoder-iters", type=int, default=4, help="Griffin-Lim iterations per tick of model speech")
  return p.parse_args(argv)


async def serve_forever(args: argparse.Namespace) -> int:
  token, source = read_token(args.token_file)
  print(f"loading {args.checkpoint} for {args.slots} slots...", flush=True)
  try:
    engine = build_engine(args.checkpoint, args.slots)
  except FileNotFoundError as e:  # CheckpointNotFoundError included
    raise SystemExit(f"error: {e}; pass a trainer workdir (e.g. workdir/demo after make demo)") from None
  limits = Limits(
    args.max_message_bytes,
    args.max_buffered_input_bytes,
    args.max_unsent_output_bytes,
    args.max_session,
    args.ping_interval,
    args.ping_timeout,
  )
  server = LiveServer(
    engine, token=token, allowed_origins=args.allowed_origin, limits=limits, vocoder_iters=args.vocoder_iters
  )
  try:
    port = await server.start(args.host, args.port)
  except OSError as e:
    engine.close()
    raise SystemExit(
      f"error: cannot listen on {args.host}:{args.port}: {e.strerror or e}; pick another --port"
    ) from None
  stop = asyncio.Event()
  loop = asyncio.get_running_loop()
  for sig in (signal.SIGTERM, signal.SIGINT):
    loop.add_signal_handler(sig, stop.set)
  shown = token if source == "generated" else f"<token from {source}>"
  print(f"serving {args.slots} slots on http://{args.host}:{port}/?token={shown}  (token: {source})", flush=True)
  print(f"ready: ws://{args.host}:{port}/v1/session", flush=True)
  await stop.wait()
  print(f"draining {len(server.clients)} sessions...", flush=True)
  await server.drain()
  engine.close()
  print("stopped", flush=True)
  return 0


def main(argv=None) -> int:
  args = parse_args(argv)
  if args.slots < 1:
    raise SystemExit(f"error: --slots must be >= 1, got {args.slots}")
  return asyncio.run(serve_forever(args))


if __name__ == "__main__":
  sys.exit(main())
