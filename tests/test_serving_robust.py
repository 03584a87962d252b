"""The live server under hostile or unlucky input: video that cannot stall the ticks, a text flood that cannot grow
memory, fuzzed frames that never close a session with 1011, HTTP requests websockets cannot parse.

The server runs in a background thread (``tests.test_serving_server.ServerThread``); clients are the websockets
sync client and raw sockets.
"""

import contextlib
import functools
import gc
import io
import json
import logging
import os
import socket
import struct
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from PIL import Image
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from serving import protocol
from serving.engine import Engine
from tests.helpers import ROOT, SMALL_MODEL, make_model, tiny_cfg
from tests.test_serving_server import SLOTS, TOKEN, ServerThread, get, malformed_frame, sync


@pytest.fixture(scope="module")
def engine():
  cfg = tiny_cfg(**SMALL_MODEL)
  graphdef, params = make_model(cfg, seed=3)
  return Engine(cfg, graphdef, params, slots=SLOTS, cache_tokens=cfg.attention_window)


@pytest.fixture
def serve(engine):
  servers = []

  def start(**kw):
    servers.append(ServerThread(engine, **kw))
    return servers[-1]

  yield start
  for s in servers:
    s.close()
  assert not engine.sessions


def raw_frame(w: int, h: int, rng) -> bytes:
  return bytes([protocol.RAW]) + struct.pack("<HH", w, h) + rng.integers(0, 256, w * h * 3, np.uint8).tobytes()


def browser_jpeg(rng) -> bytes:
  """A 160x120 camera frame as the browser client sends it (``static/client.js``): a JPEG of a noisy scene."""
  y, x = np.mgrid[:120, :160]
  scene = np.stack([x * 1.5, y * 2.0, (x + y) * 0.8], -1) + rng.normal(0, 12, (120, 160, 3))
  out = io.BytesIO()
  Image.fromarray(np.clip(scene, 0, 255).astype(np.uint8)).save(out, format="JPEG", quality=80)
  return bytes([protocol.JPEG]) + out.getvalue()


class Peer:
  """A session that reads everything it is sent on its own thread (a client that stops reading is closed 1008)."""

  def __init__(self, url: str):
    self.ws = connect(url, max_size=None)
    self.started = json.loads(self.ws.recv(timeout=30))
    self.errors, self.pongs, self.close_code = [], [], None
    self.thread = threading.Thread(target=self._read, daemon=True)
    self.thread.start()

  def _read(self):
    try:
      for message in self.ws:
        if isinstance(message, str) and '"error"' in message:
          self.errors.append(json.loads(message))
        elif isinstance(message, str) and '"pong"' in message:
          self.pongs.append(json.loads(message))
    except ConnectionClosed:
      pass
    self.close_code = self.ws.close_code

  def close(self):
    self.ws.close()
    self.thread.join(10)


# -- video: off the loop, one decode per session and tick -------------------------------------------


# The video clients, in their own process as a browser would be (in this one they would contend for its GIL).
VIDEO_CLIENT = r"""
import sys, threading, time
import numpy as np
from websockets.sync.client import connect
from tests.test_serving_robust import browser_jpeg, raw_frame
url, start, phases, seconds = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
rng = np.random.default_rng(1)
raws, jpegs = [raw_frame(640, 480, rng) for _ in range(2)], [browser_jpeg(rng) for _ in range(5)]
raw_ws, jpeg_ws = connect(url, max_size=None), connect(url, max_size=None)
for ws in (raw_ws, jpeg_ws):
  threading.Thread(target=lambda ws=ws: [None for _ in ws], daemon=True).start()
print("connected", flush=True)
sent = 0
for r in range(phases):
  if r % 2 == 0:  # the phases without video
    continue
  k = 0
  while time.monotonic() < start + (r + 1) * seconds:
    when = start + r * seconds + k * 0.1
    time.sleep(max(0.0, when - time.monotonic()))
    if when >= start + (r + 1) * seconds:
      break
    raw_ws.send(raws[k % 2])
    if k % 2 == 0:
      jpeg_ws.send(jpegs[k % 5])
    sent, k = sent + 1, k + 1
print("sent", sent, flush=True)
"""


def tick_phases(s, rounds: int, seconds: float):
  """Tick latencies (ms, the server's own) without and with video, in alternating phases of ``seconds``.

  Eight sessions: six stream audio in real time throughout; in the video phases the other two, from another
  process, send 640x480 raw frames (921,605 bytes, 10 a second: half are replaced before a tick) and the browser's
  160x120 JPEG at 5 fps.
  """
  rng = np.random.default_rng(0)
  pcm = protocol.audio_frame((rng.standard_normal(protocol.SAMPLES_PER_TICK) * 2000).astype("<i2").tobytes())
  watchers = [Peer(s.url) for _ in range(SLOTS - 2)]
  start = time.monotonic() + 3.0
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
  args = [s.url, repr(start), str(2 * rounds), str(seconds)]
  video = subprocess.Popen([sys.executable, "-c", VIDEO_CLIENT, *args], stdout=subprocess.PIPE, text=True, env=env)
  try:
    assert video.stdout.readline().startswith("connected")
    marks = []
    for r in range(2 * rounds + 1):
      boundary = start + r * seconds
      while (now := time.monotonic()) < boundary:
        for p in watchers:
          p.ws.send(pcm)
        time.sleep(min(protocol.TICK_S, max(0.0, boundary - now)))
      marks.append(len(s.server.tick_ms))
    assert video.stdout.readline().startswith("sent")
    assert video.wait(30) == 0
  finally:
    video.kill()
    for p in watchers:
      p.close()
  ticks = list(s.server.tick_ms)
  # The first tick of a phase straddles the switch: left out.
  phases = [ticks[a + 1 : b] for a, b in zip(marks[:-1], marks[1:], strict=True)]
  errors = [p.errors for p in watchers if p.errors]
  return np.concatenate(phases[0::2]), np.concatenate(phases[1::2]), errors


def test_the_largest_raw_frames_and_a_jpeg_stream_are_decoded_between_ticks(serve):
  s = serve()  # real 200 ms ticks
  quiet, video, errors = tick_phases(s, rounds=3, seconds=2.0)
  s.wait_empty(10)
  used, inline = s.server.counters["video_frames_used"], s.server.counters["video_decoded_in_tick"]
  # The tick latencies are reported, not asserted (a shared machine's noise is larger than the effect;
  # the README's figures come from passing runs): what is checked is where the decoding happens.
  p99 = (float(np.percentile(quiet, 99)), float(np.percentile(video, 99)))
  skipped = s.server.counters["skipped_ticks"]
  print(
    f"tick p99 ms without / with video {p99[0]:.1f} / {p99[1]:.1f}; {used} frames used, {inline} decoded in a tick;"
    f" {skipped} ticks skipped"
  )
  # 6 s of each: 29 ticks on an idle machine; a loaded one (the suite beside a demo) ran 19 and skipped some.
  assert len(quiet) >= 12 and len(video) >= 12 and not errors
  assert used >= len(video)  # the video reached the model: two sessions had a frame at most ticks
  # Only a session's first frame of a phase may be decoded inside a tick; every other was decoded ahead.
  assert inline <= 2 * 3, inline


@pytest.mark.slow  # a timing ratio: run it on a machine doing nothing else (`make test-slow`)
def test_video_does_not_slow_the_other_sessions_ticks(serve):
  s = serve()  # real 200 ms ticks
  attempts = []
  for _ in range(3):  # a shared machine's noise can spoil one measurement; a stall would spoil all three
    quiet, video, errors = tick_phases(s, rounds=3, seconds=2.0)
    s.wait_empty(10)
    p99 = (float(np.percentile(quiet, 99)), float(np.percentile(video, 99)))
    attempts.append((p99, len(quiet), len(video), errors))
    if p99[1] <= 1.1 * p99[0]:
      break
  print("tick p99 ms (without video, with video), ticks, errors:", attempts)
  (quiet_p99, video_p99), n_quiet, n_video, errors = attempts[-1]
  assert n_quiet >= 24 and n_video >= 24 and not errors, attempts
  assert video_p99 <= 1.1 * quiet_p99, attempts
  assert s.server.counters["video_frames_dropped"] > 0  # raw frames came faster than ticks: the older went unread


# -- typed text: a cumulative cap ------------------------------------------------------------------------


def errors_of(messages) -> list[str]:
  return [json.loads(m)["code"] for m in messages if isinstance(m, str) and json.loads(m)["type"] == "error"]


def test_typed_text_waiting_for_the_model_is_capped_and_room_comes_back_as_it_reads(serve, engine):
  cap = protocol.Limits().max_pending_text_bytes
  s = serve(autotick=False)
  with connect(s.url) as ws:
    session = engine.sessions[json.loads(ws.recv(timeout=10))["session"]]
    for _ in range(cap // 1024):
      ws.send(json.dumps({"type": "text", "text": "é" * 512}))  # 1024 bytes of UTF-8
    assert errors_of(sync(ws, 1)) == []
    ws.send(json.dumps({"type": "text", "text": "x"}))
    assert errors_of(sync(ws, 2)) == ["input_overflow"]
    s.tick()  # the model reads a micro-turn's worth of text_in slots; the rest keeps waiting
    sync(ws, 3)
    read = cap - len(session.pending)
    assert 0 < read <= 4, read
    ws.send(json.dumps({"type": "text", "text": "y" * (read + 1)}))
    ws.send(json.dumps({"type": "text", "text": "y" * read}))
    assert errors_of(sync(ws, 4)) == ["input_overflow"]
    s.tick()
    sync(ws, 5)
    assert len(session.pending) == cap - read  # the refused frame was dropped whole
  s.wait_empty(10)


def rss_bytes() -> int:
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_a_text_flood_gets_input_overflow_and_memory_returns_to_baseline(serve, engine):
  cap = protocol.Limits().max_pending_text_bytes
  s = serve()  # real ticks: the model reads while the flood goes on
  with connect(s.url) as ws:  # one session's life before the baseline: what every session allocates is there
    ws.recv(timeout=10)
    sync(ws, 0)
  s.wait_empty(10)
  gc.collect()
  baseline = rss_bytes()
  chunk = json.dumps({"type": "text", "text": "flood " * 1365})  # 8,190 bytes of text
  peer = Peer(s.url)
  session = engine.sessions[peer.started["session"]]
  deepest = 0
  for i in range(1280):  # 10 MB
    peer.ws.send(chunk)
    if i % 64 == 0:
      deepest = max(deepest, len(session.pending))
  peer.ws.send(json.dumps({"type": "ping", "id": "end"}))
  deadline = time.monotonic() + 30
  while not peer.pongs and time.monotonic() < deadline:
    time.sleep(0.05)
  assert peer.pongs, "the server did not answer the ping after the flood"
  refused = [e for e in peer.errors if e["code"] == "input_overflow"]
  assert len(refused) >= 1280 - 2, len(refused)  # at most the first 4096 bytes fit: none of the 8 KB frames
  assert deepest <= cap and len(session.pending) <= cap
  assert peer.close_code is None
  peer.close()
  s.wait_empty(10)
  gc.collect()
  grown = rss_bytes() - baseline
  print(f"RSS baseline {baseline / 2**20:.1f} MiB, after the 10 MB flood and close {grown / 2**20:+.1f} MiB")
  assert grown < 10 << 20, grown


# -- fuzzing: typed errors, never 1011 -------------------------------------------------------------------


def _nested(rng) -> str:
  depth = int(rng.choice([33, 100, 999, 5000, 60_000]))
  opener, closer = [("[", "]"), ('{"a": ', "}"), ('[{"b": ', "}]")][int(rng.integers(3))]
  return opener * depth + ("1" + closer * depth if rng.random() < 0.5 else "")


def _huge_number(rng) -> str:
  digits = "".join(rng.choice(list("0123456789"), int(rng.choice([65, 300, 4301, 5000, 20_000]))))
  return str(rng.choice(["", "-"])) + "1" + digits + str(rng.choice(["", ".5", "e5", "e999"]))


def _mutated(rng) -> str:
  event = json.dumps({"type": "session.update", "sampling": {"temperature": 0.5, "seed": 3}, "audio": {}})
  chars = list(event)
  for _ in range(int(rng.integers(1, 6))):
    i = int(rng.integers(len(chars)))
    chars[i] = str(rng.choice(list('[]{}",:0e-.\\u') + [chr(int(rng.integers(0, 0x2FFF)))]))
  return "".join(chars)


@functools.lru_cache(maxsize=1)
def _jpegs() -> tuple[bytes, ...]:
  rng = np.random.default_rng(3)
  return tuple(browser_jpeg(rng)[1:] for _ in range(8))


def _corrupt_jpeg(rng) -> bytes:
  """A JPEG whose start and end markers are right (the loop passes it) and whose inside is damaged."""
  jpeg = bytearray(_jpegs()[int(rng.integers(8))])
  for _ in range(int(rng.integers(1, 20))):
    jpeg[int(rng.integers(2, len(jpeg) - 2))] = int(rng.integers(256))
  return bytes([protocol.JPEG]) + bytes(jpeg)


def hostile_frame(rng):
  """(frame, whether it must be refused) for the fuzzer: the socket fuzzer's cases and the ones that crashed it."""
  pick = rng.random()
  if pick < 0.4:
    name, frame, as_text = malformed_frame(rng, 1 << 20)
    if name == "not_utf8_text" or name == "oversize":  # WebSocket-level: the connection's own checks
      return json.dumps({"type": "ping", "id": name}), False
    return frame, True
  if pick < 0.55:
    field = [
      '{"type": "ping", "id": %s}',
      '{"type": "session.update", "sampling": {"seed": %s}}',
      '{"type": "text", "text": "a", "extra": %s}',
    ]
    return field[int(rng.integers(3))] % _nested(rng), True
  if pick < 0.7:
    where = ['{"type": "ping", "id": %s}', '{"type": "session.update", "sampling": {"temperature": %s}}', "%s"]
    return where[int(rng.integers(3))] % _huge_number(rng), None  # a 65-digit float is a fine ping id
  if pick < 0.8:
    return _mutated(rng), None
  if pick < 0.85:
    return json.dumps({"type": "text", "text": "z" * int(rng.integers(60_000, 200_000))}), None
  if pick < 0.95:
    return _corrupt_jpeg(rng), None  # refused at the tick, by the decoder, or decoded to something
  return json.dumps({"type": "ping", "id": [1, {"k": "v"}, None, 2.5]}), False


def test_ten_thousand_hostile_frames_on_the_message_handler_are_typed_errors(serve, engine):
  """The handler itself (on the loop thread, as the server calls it): every refusal is a ``ClientError`` with a
  documented code; any other exception is what the connection handler would turn into a 1011 close."""
  # No keepalive: on a loaded machine 500 frames can hold the loop past the ping timeout (a close that
  # would leave the remaining ticks without the session).
  s = serve(autotick=False, limits=protocol.Limits(ping_interval_s=3600.0, ping_timeout_s=3600.0))
  rng = np.random.default_rng(7)
  with connect(s.url, max_size=None) as ws:
    ws.recv(timeout=10)
    client = next(iter(s.server.clients.values()))
    outcome = {"refused": 0, "accepted": 0, "crashed": []}

    async def feed(frames):
      for frame, must_refuse in frames:
        try:
          s.server._on_message(client, frame)
          assert not must_refuse, frame[:80]
          outcome["accepted"] += 1
        except protocol.ClientError as e:
          assert e.code in protocol.ERROR_CODES and str(e)
          assert must_refuse is not False, (frame[:80], e)
          outcome["refused"] += 1
        except Exception as e:  # noqa: BLE001  (counted: the assertion below names it)
          outcome["crashed"].append(f"{type(e).__name__}: {e} <- {frame[:80]!r}")
        client.typed, client.typed_bytes = [], 0  # what a tick would hand the engine: the fuzz keeps room
        client.outbox.clear()
        client.unsent = 0

    for _ in range(20):
      s.call(feed([hostile_frame(rng) for _ in range(500)]))
      s.tick()  # the newest video frame is decoded on the engine thread: refused there or used
    assert not outcome["crashed"], outcome["crashed"][:5]
    assert outcome["refused"] + outcome["accepted"] == 10_000
    assert outcome["refused"] > 6000, outcome
    assert s.server.counters["internal_errors"] == 0 and s.server.ticks == 20
    assert s.server.counters["error_bad_video"] > 0  # some damaged JPEGs only the decoder could refuse
    sync(ws, "alive")  # the session went on
  s.wait_empty(10)


# -- HTTP: a status line for every request, no traceback --------------------------------------------------


def raw_http(port: int, request: bytes) -> bytes:
  """The status line the server answers ``request`` with (b"" when it only closes)."""
  with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
    with contextlib.suppress(OSError):  # the server may answer and close before the whole request went out
      sock.sendall(request)
    answer = b""
    with contextlib.suppress(ConnectionResetError):
      while chunk := sock.recv(65536):
        answer += chunk
  return answer.split(b"\r\n", 1)[0]


HTTP_REFUSALS = {
  "POST /v1/stats HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi": 405,
  "PUT / HTTP/1.1\r\nHost: x\r\nContent-Length: 3000000\r\n\r\n" + "x" * 3_000_000: 405,
  "OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n": 405,
  "GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n0123456789": 413,
  "GET / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n": 413,
  "GET /" + "a" * 9000 + " HTTP/1.1\r\nHost: x\r\n\r\n": 414,
  "GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + "b" * 9000 + "\r\n\r\n": 431,
  "GET / HTTP/1.1\r\n" + "".join(f"X-{i}: y\r\n" for i in range(200)) + "\r\n": 431,
  "GET / HTTP/1.0\r\n\r\n": 505,
  "HELLO\r\n\r\n": 400,
  "GET / HTTP/1.1\r\nno colon here\r\n\r\n": 400,
  "GET / HTTP/1.1\r\nContent-Length: ten\r\n\r\n": 400,
  f"GET /v1/session?token={TOKEN} HTTP/1.1\r\nHost: x\r\n\r\n": 426,  # no WebSocket upgrade headers
}


def test_requests_websockets_cannot_parse_get_a_status_and_no_traceback(serve, caplog):
  s = serve(autotick=False)
  caplog.set_level(logging.INFO, logger="websockets")
  for request, status in HTTP_REFUSALS.items():
    line = raw_http(s.port, request.encode())
    assert line.startswith(f"HTTP/1.1 {status} ".encode()), (request[:60], line)
  with socket.create_connection(("127.0.0.1", s.port)) as sock:  # a request cut short: closed, nothing logged
    sock.sendall(b"GET / HT")
  time.sleep(0.3)
  logged = [r for r in caplog.records if r.levelno >= logging.WARNING or r.exc_info]
  assert not logged, [(r.getMessage(), r.exc_info and r.exc_info[0]) for r in logged]
  assert sum(v for k, v in s.server.counters.items() if k.startswith("refused_http_")) == len(HTTP_REFUSALS) - 1
  with connect(s.url) as ws:  # the server goes on
    assert json.loads(ws.recv(timeout=10))["type"] == "session.started"


def test_the_bearer_scheme_is_case_insensitive(serve):
  s = serve(autotick=False)
  for scheme in ("Bearer", "bearer", "BEARER", "bEaReR"):
    assert get(s.port, "/v1/stats", {"Authorization": f"{scheme} {TOKEN}"})[0] == 200, scheme
    assert get(s.port, "/v1/stats", {"Authorization": f"{scheme} wrong"})[0] == 401, scheme
  assert get(s.port, "/v1/stats", {"Authorization": f"Basic {TOKEN}"})[0] == 401
  with connect(s.url.split("?")[0], additional_headers={"Authorization": f"bearer {TOKEN}"}) as ws:
    assert json.loads(ws.recv(timeout=10))["type"] == "session.started"
