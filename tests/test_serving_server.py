"""The live server: auth on every route, admission, fuzzing, churn, dead and slow peers, drain, streaming features.

The server runs in a background thread with its own event loop (``ServerThread``);
the tests talk to it with blocking sockets and the websockets sync client. Ticks
are driven by hand (``autotick=False``) where outputs are compared, so the cut of
input into micro-turns is deterministic.
"""

import asyncio
import base64
import http.client
import io
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from data_pipeline import audio
from serving import server as server_lib
from serving.engine import Engine
from tests.helpers import SMALL_MODEL, make_model, save_checkpoint, tiny_cfg

TOKEN = "test-token-123"
SLOTS = 8


@pytest.fixture(scope="module")
def engine():
  cfg = tiny_cfg(**SMALL_MODEL)
  graphdef, params = make_model(cfg, seed=3)
  return Engine(cfg, graphdef, params, slots=SLOTS, cache_tokens=cfg.attention_window)


class ServerThread:
  """A ``LiveServer`` on its own event loop thread; ``call`` runs a coroutine there and waits."""

  def __init__(self, engine, **kw):
    assert not engine.sessions, "the shared engine must come back empty from every test"
    self.loop = asyncio.new_event_loop()
    self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
    self.thread.start()
    kw.setdefault("token", TOKEN)
    kw.setdefault("log", lambda *a: None)
    self.server = server_lib.LiveServer(engine, **kw)
    self.port = self.call(self.server.start("127.0.0.1", 0))
    self.url = f"ws://127.0.0.1:{self.port}/v1/session?token={TOKEN}"

  def call(self, coro, timeout: float = 120):
    return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

  def tick(self):
    self.call(self.server.tick())

  def wait_empty(self, timeout: float) -> float:
    """Seconds until no client and no engine session is left (raises on timeout)."""
    t = time.monotonic()
    while self.server.clients or self.server.engine.sessions:
      if time.monotonic() - t > timeout:
        raise AssertionError(f"{len(self.server.clients)} clients / {len(self.server.engine.sessions)} sessions left")
      time.sleep(0.02)
    return time.monotonic() - t

  def close(self):
    self.call(self.server.drain())
    self.loop.call_soon_threadsafe(self.loop.stop)
    self.thread.join(10)


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


def get(port, path, headers=None):
  conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
  conn.request("GET", path, headers=headers or {})
  response = conn.getresponse()
  body = response.read()
  conn.close()
  return response.status, body


def sync(ws, tag) -> list:
  """Every message before the pong answering ping ``tag`` (the server has taken every earlier frame)."""
  ws.send(json.dumps({"type": "ping", "id": tag}))
  got = []
  while True:
    message = ws.recv(timeout=30)
    if isinstance(message, str) and json.loads(message).get("type") == "pong":
      assert json.loads(message)["id"] == tag
      return got
    got.append(message)


def pcm_frame(samples: np.ndarray) -> bytes:
  return bytes([server_lib.AUDIO]) + samples.astype("<i2").tobytes()


def raw_session(port, *, rcvbuf=None, read_response=True):
  """A WebSocket upgrade done by hand on a blocking socket; returns the socket after the 101."""
  sock = socket.socket()
  if rcvbuf:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
  sock.connect(("127.0.0.1", port))
  key = base64.b64encode(os.urandom(16)).decode()
  request = (
    f"GET /v1/session?token={TOKEN} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
    f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
  )
  sock.sendall(request.encode())
  if read_response:
    head = b""
    while b"\r\n\r\n" not in head:
      chunk = sock.recv(1)
      assert chunk, "server closed during the handshake"
      head += chunk
    assert head.startswith(b"HTTP/1.1 101"), head
  return sock


def reset(sock):
  """Close with a TCP reset: no close frame, no FIN handshake."""
  sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
  sock.close()


# -- auth, origin, admission -------------------------------------------------------------


def test_every_route_rejects_a_missing_or_wrong_token_except_the_health_check(serve):
  s = serve(autotick=False)
  routes = []
  for route in server_lib.ROUTES:
    if route == "/static/<file>":
      routes += [f"/static/{p.name}" for p in server_lib.STATIC.iterdir()]
    else:
      routes.append(route)
  routes += ["/no/such/route", "/static/../server.py"]
  assert len(routes) >= len(server_lib.ROUTES) + 2
  for path in routes:
    if path == "/healthz":
      status, body = get(s.port, path)
      assert status == 200 and json.loads(body)["status"] == "ok"
      continue
    for query, headers in [("", {}), ("?token=wrong", {}), ("", {"Authorization": "Bearer wrong"})]:
      status, _ = get(s.port, path + query, headers)
      assert status == 401, (path, query, headers, status)
      status, _ = get(s.port, path + query, {**headers, "Origin": "http://evil.example"})
      assert status in (401, 403), path
  # The WebSocket upgrade itself: refused before it completes.
  for url in (f"ws://127.0.0.1:{s.port}/v1/session", f"ws://127.0.0.1:{s.port}/v1/session?token=wrong"):
    with pytest.raises(InvalidStatus) as e:
      connect(url, open_timeout=10)
    assert e.value.response.status_code == 401
  with pytest.raises(InvalidStatus) as e:
    connect(s.url, origin="http://evil.example", open_timeout=10)
  assert e.value.response.status_code == 403
  # With the token: the page, the stats, 404 elsewhere; an allowed origin connects.
  assert get(s.port, f"/?token={TOKEN}")[0] == 200
  assert get(s.port, "/v1/stats", {"Authorization": f"Bearer {TOKEN}"})[0] == 200
  assert get(s.port, f"/no/such/route?token={TOKEN}")[0] == 404
  assert get(s.port, f"/static/../server.py?token={TOKEN}")[0] == 404
  with connect(s.url, origin=f"http://127.0.0.1:{s.port}") as ws:
    assert json.loads(ws.recv(timeout=10))["type"] == "session.started"
  assert s.server.counters["refused_auth"] >= 3 * (len(routes) - 1)


def test_the_session_past_the_slot_count_is_refused_fast_and_nothing_is_allocated(serve, engine):
  s = serve(autotick=False)
  clients = [connect(s.url) for _ in range(SLOTS)]
  try:
    for ws in clients:
      assert json.loads(ws.recv(timeout=10))["type"] == "session.started"
    t = time.monotonic()
    with pytest.raises(InvalidStatus) as e:
      connect(s.url, open_timeout=10)
    refused_ms = (time.monotonic() - t) * 1000
    assert e.value.response.status_code == 503
    assert b"server full: 8 of 8 slots in use" in e.value.response.body
    assert refused_ms < 100, refused_ms
    assert len(engine.sessions) == SLOTS and len(s.server.clients) == SLOTS
  finally:
    for ws in clients:
      ws.close()
  s.wait_empty(10)
  with connect(s.url) as ws:  # the slots came back
    assert json.loads(ws.recv(timeout=10))["type"] == "session.started"


# -- the session protocol ---------------------------------------------------------------


def test_input_is_cut_per_tick_late_input_is_silence_and_settings_apply(serve, engine):
  s = serve(autotick=False)
  with connect(s.url) as ws:
    started = json.loads(ws.recv(timeout=10))
    assert started["samples_per_tick"] == 3200 and started["protocol"] == 1
    session = engine.sessions[started["session"]]
    ws.send(pcm_frame(np.full(4800, 8000)))  # 1.5 ticks of loud audio
    ws.send(json.dumps({"type": "text", "text": "hi"}))
    ws.send(json.dumps({"type": "session.update", "sampling": {"temperature": 0.5, "top_p": 0.9, "seed": 7}}))
    sync(ws, 1)
    heard = []
    for k in range(3):
      s.tick()
      got = sync(ws, 10 + k)
      assert isinstance(got[0], bytes) and got[0][0] == server_lib.AUDIO and len(got[0]) == 1 + 2 * 3200
      tick = json.loads(got[-1])
      assert tick["type"] == "tick" and tick["turn"] == k
      assert set(tick["timing"]) == {"tick_ms", "step_ms", "late_ms"}
      heard.append((tick["user_audio_ms"], tick["user_speaking"]))
    assert heard == [(200, True), (100, True), (0, False)]  # nothing arrived for tick 3: silence
    assert session.sampling.temperature == 0.5 and session.sampling.seed == 7
    slot = session.slot
    assert float(engine.state.temperature[slot]) == 0.5 and int(engine.state.seed[slot]) == 7
    assert int(engine.state.turn[slot]) == 3  # the settings did not reset the session
    assert [t for t in session.context if t < 256][:2] == list(b"hi")  # the typed text reached text_in
    ws.send(json.dumps({"type": "session.end"}))
    with pytest.raises(ConnectionClosed):
      while True:
        ws.recv(timeout=10)
    assert ws.close_code == 1000 and ws.close_reason == "session ended by client"


def test_streamed_audio_features_equal_the_offline_features_of_the_whole_signal(serve):
  s = serve(autotick=False)
  rng = np.random.default_rng(0)
  pcm = (rng.standard_normal(3200 * 5) * 3000).astype(np.int16)
  client = server_lib.Client(ws=None, started=0.0)
  streamed = [s.server._features(client, pcm[i * 3200 : (i + 1) * 3200], None) for i in range(5)]
  streamed = np.concatenate([f[s.server.audio_in.name] for f in streamed])
  offline = audio.log_mel(s.server.mel_in, pcm.astype(np.float32) / 32768)
  np.testing.assert_allclose(streamed, offline, atol=1e-5)


def test_session_longer_than_the_limit_is_closed_with_a_reason(serve):
  s = serve(autotick=False, limits=server_lib.Limits(max_session_s=0.3))
  with connect(s.url) as ws:
    ws.recv(timeout=10)
    time.sleep(0.4)
    s.tick()
    with pytest.raises(ConnectionClosed):
      while True:
        ws.recv(timeout=10)
    assert ws.close_code == 1008 and "maximum duration of 0.3 s" in ws.close_reason
  s.wait_empty(10)


# -- fuzzing -----------------------------------------------------------------------------

# Frames that break the WebSocket protocol itself: the server closes with these codes.
FATAL = {"not_utf8_text": 1007, "oversize": 1009}


def _jpeg(size=(32, 24)) -> bytes:
  from PIL import Image

  out = io.BytesIO()
  Image.fromarray(np.full((size[1], size[0], 3), 128, np.uint8)).save(out, format="JPEG")
  return out.getvalue()


def _not_length(payload: bytes, length: int) -> bytes:
  return payload + b"\x00" if len(payload) == length else payload


def malformed_frame(rng, max_bytes: int):
  """(name, frame, send as text?): one malformed frame."""
  jpeg = _jpeg()
  junk = rng.integers(0, 256, int(rng.integers(1, 64)), dtype=np.uint8).tobytes()
  w, h = (int(x) for x in rng.integers(0, 70, 2))
  cases = [
    ("empty_binary", b"", False),
    ("odd_pcm", bytes([1]) + (junk if len(junk) % 2 else junk + b"\x00"), False),
    ("unknown_kind", bytes([int(rng.choice([0, 4, 9, 200, 255]))]) + junk, False),
    ("not_jpeg", bytes([2]) + junk, False),
    ("corrupt_jpeg", bytes([2]) + b"\xff\xd8\xff\xe0" + junk, False),
    ("truncated_jpeg", bytes([2]) + jpeg[: int(rng.integers(1, len(jpeg) - 1))], False),
    ("raw_wrong_size", bytes([3]) + struct.pack("<HH", w + 1, h + 1) + _not_length(junk, (w + 1) * (h + 1) * 3), False),
    ("raw_zero_side", bytes([3]) + struct.pack("<HH", 0, h) + junk, False),
    ("raw_no_header", bytes([3]) + junk[:3], False),
    ("not_json", junk.decode("latin-1"), True),
    ("json_not_object", json.dumps([1, 2, {"type": "text"}]), True),
    ("type_not_string", json.dumps({"type": 5}), True),
    ("unknown_type", json.dumps({"type": "nope" + junk.hex()[:8]}), True),
    ("nan", '{"type": "session.update", "sampling": {"temperature": NaN}}', True),
    ("infinity", '{"type": "ping", "id": Infinity}', True),
    ("bad_temperature", json.dumps({"type": "session.update", "sampling": {"temperature": -1}}), True),
    ("bad_top_p", json.dumps({"type": "session.update", "sampling": {"top_p": 0}}), True),
    ("bad_seed", json.dumps({"type": "session.update", "sampling": {"seed": 2**40}}), True),
    ("seed_not_int", json.dumps({"type": "session.update", "sampling": {"seed": "7"}}), True),
    ("unknown_sampling_field", json.dumps({"type": "session.update", "sampling": {"beam": 4}}), True),
    ("wrong_sample_rate", json.dumps({"type": "session.update", "audio": {"sample_rate": 44100}}), True),
    ("wrong_encoding", json.dumps({"type": "session.update", "audio": {"encoding": "opus"}}), True),
    ("text_not_string", json.dumps({"type": "text", "text": 5}), True),
    ("unknown_update_field", json.dumps({"type": "session.update", "voice": "x"}), True),
    ("surrogate_text", '{"type": "text", "text": "\\ud800"}', True),
    # Frames that once closed the session with 1011 (RecursionError, ValueError from int()) or read as bad_value.
    ("deep_nesting", '{"type": "ping", "id": ' + "[" * 5000 + "]" * 5000 + "}", True),
    ("deep_unclosed", "[" * int(rng.integers(1000, max_bytes - 16)), True),
    ("huge_int", '{"type": "ping", "id": ' + "9" * int(rng.integers(65, 6000)) + "}", True),
    ("huge_float", '{"type": "session.update", "sampling": {"temperature": 1e999}}', True),
  ]
  if rng.random() < 0.01:
    kind = str(rng.choice(list(FATAL)))
    if kind == "not_utf8_text":
      return kind, b"\xff\xfe" + junk, True
    return kind, bytes([1]) + bytes(max_bytes + 2), False
  return cases[int(rng.integers(len(cases)))]


def run_conversation(engine, serve, fuzz_frames: int, ticks: int = 25, fuzzers: int = 4):
  """The well-formed session's outputs (audio bytes and tick events minus timing) over ``ticks`` ticks."""
  max_bytes = 16 << 10
  s = serve(autotick=False, limits=server_lib.Limits(max_message_bytes=max_bytes))
  rng, fuzz_rng = np.random.default_rng(0), np.random.default_rng(1)
  good = connect(s.url)
  assert json.loads(good.recv(timeout=10))["type"] == "session.started"
  fuzz = [connect(s.url, max_size=None) for _ in range(fuzzers if fuzz_frames else 0)]
  for ws in fuzz:
    ws.recv(timeout=10)
  sent, refused, unanswered, fatal = 0, 0, 0, []
  per_tick = -(-fuzz_frames // (ticks * max(fuzzers, 1)))
  outputs = []
  for t in range(ticks):
    good.send(pcm_frame((rng.standard_normal(3200) * 4000).clip(-32768, 32767)))
    if t % 5 == 0:
      good.send(bytes([server_lib.RAW]) + struct.pack("<HH", 40, 40) + rng.integers(0, 256, 4800, np.uint8).tobytes())
    if t == 3:
      good.send(json.dumps({"type": "text", "text": "what is 2+3"}))
    for i, ws in enumerate(fuzz):
      expected = 0
      for _ in range(min(per_tick, fuzz_frames - sent)):
        name, frame, as_text = malformed_frame(fuzz_rng, max_bytes)
        sent += 1
        if isinstance(frame, str):
          ws.send(frame)
        else:
          ws.send(frame, text=as_text)  # bytes as a text frame: not UTF-8
        if name in FATAL:
          before = []
          with pytest.raises(ConnectionClosed):
            while True:
              before.append(ws.recv(timeout=10))
          errors = [m for m in before if isinstance(m, str) and json.loads(m)["type"] == "error"]
          # The connection dies at once: answers still queued behind it are lost with it.
          assert len(errors) <= expected
          refused, unanswered = refused + len(errors), unanswered + expected - len(errors)
          fatal.append((name, ws.close_code))
          ws = fuzz[i] = connect(s.url, max_size=None)
          ws.recv(timeout=10)
          expected = 0
          continue
        expected += 1
      errors = [json.loads(m) for m in sync(ws, t) if isinstance(m, str)]
      errors = [e for e in errors if e["type"] == "error"]
      assert len(errors) == expected and all(not e["fatal"] and e["code"] for e in errors)
      refused += len(errors)
    sync(good, t)
    s.tick()
    got = sync(good, 1000 + t)
    events = [json.loads(m) for m in got if isinstance(m, str)]
    for e in events:
      e.pop("timing", None)
    outputs.append(([m for m in got if isinstance(m, bytes)], events))
  for ws in [good, *fuzz]:
    ws.close()
  s.wait_empty(10)
  assert s.server.counters["internal_errors"] == 0
  return outputs, sent, refused + unanswered, fatal


@pytest.mark.parametrize("frames", [10_000, pytest.param(100_000, marks=pytest.mark.slow)])
def test_fuzzed_frames_get_typed_errors_and_leave_other_sessions_outputs_identical(engine, serve, frames):
  clean, _, _, _ = run_conversation(engine, serve, 0)
  fuzzed, sent, refused, fatal = run_conversation(engine, serve, frames)
  assert sent >= frames
  # Every malformed frame got a typed error, or a protocol close (which drops answers still queued).
  assert refused + len(fatal) == sent
  assert all(code == FATAL[name] for name, code in fatal), fatal
  assert [len(audio) for audio, _ in clean] == [1] * 25
  assert [[e["type"] for e in events][-1] for _, events in clean] == ["tick"] * 25
  assert fuzzed == clean  # the well-formed session: same audio bytes, text and events, tick by tick


# -- churn, dead peers, slow readers -------------------------------------------------------


def test_a_thousand_abrupt_disconnects_leak_no_slot(serve, engine):
  s = serve()  # real 200 ms ticks run throughout
  with connect(s.url) as survivor:
    survivor.recv(timeout=10)
    waits = []
    for i in range(1000):
      while True:  # every one of the 1000 gets a session: a refusal only waits for the next tick's frees
        try:
          sock = raw_session(s.port, read_response=i % 4 != 0)
          break
        except AssertionError:  # 503 full: the previous disconnects are freed at the next tick
          t = time.monotonic()
          while len(s.server.clients) >= SLOTS and time.monotonic() - t < 5:
            time.sleep(0.01)
          waits.append(time.monotonic() - t)
      if i % 4 == 1:
        sock.sendall(bytes([0x82, 0xFE, 0x10, 0x00]) + os.urandom(4) + b"\x01\x02\x03")  # half a masked frame
      elif i % 4 == 2:
        sock.sendall(b"\x82")  # one byte of a frame header
      reset(sock)
    # A slot held by a reset connection comes back within a few ticks (not at the ping timeout, never leaked);
    # how often the 7 free slots run out depends on the machine's speed, so that count is not checked.
    assert max(waits, default=0) < 10 * server_lib.TICK_S, sorted(waits)[-5:]
    sync(survivor, "alive")  # the survivor's session is still served
  s.wait_empty(15)
  assert s.server.counters["internal_errors"] == 0


def test_a_dead_peer_is_dropped_within_the_ping_timeout(serve, engine):
  limits = server_lib.Limits(ping_interval_s=0.3, ping_timeout_s=0.6)
  s = serve(limits=limits)  # ticks running: a tick frees the slot of a connection that is closing
  sock = raw_session(s.port)  # completes the upgrade, then never reads or answers a ping
  while not engine.sessions:
    time.sleep(0.01)
  freed = s.wait_empty(10)
  # The first unanswered ping goes out after one interval; one tick (0.2 s) later the slot is free.
  assert freed <= limits.ping_interval_s + limits.ping_timeout_s + server_lib.TICK_S + 0.3, freed
  sock.close()


def test_a_client_that_stops_reading_is_closed_at_the_output_cap_and_others_go_on(serve, engine):
  cap = 32 << 10
  log = []
  s = serve(autotick=False, limits=server_lib.Limits(max_unsent_output_bytes=cap), log=log.append)
  slow = raw_session(s.port, rcvbuf=4096)
  with connect(s.url) as ws:
    ws.recv(timeout=10)
    for t in range(200):
      ws.send(pcm_frame(np.zeros(3200)))
      sync(ws, t)
      s.tick()
      assert json.loads(sync(ws, -t - 1)[-1])["turn"] == t
      if s.server.counters["closed_slow"]:
        break
    assert s.server.counters["closed_slow"] == 1, "the slow client was never closed"
    # 64 KiB kernel send buffer (doubled by Linux) + the cap, at 6.4 KB of audio per tick.
    assert t < (cap + 2 * server_lib.SEND_BUFFER_BYTES + 65536) // 6400 + 5
    # The close frame queues behind the output the client never read, so the reason is checked in the log.
    assert any("closing with 1008: client too slow" in line for line in log), log
    for k in range(3):  # the other session is unaffected
      s.tick()
      assert json.loads(sync(ws, f"after{k}")[-1])["type"] == "tick"
  slow.close()
  s.wait_empty(10)


# -- drain on SIGTERM ------------------------------------------------------------------------


@pytest.mark.parametrize("mesh", [None, "data=2,expert=4"])
def test_sigterm_closes_every_session_with_a_reason_and_exits_0(tmp_path, mesh):
  workdir = save_checkpoint(tmp_path)
  env = {**os.environ, server_lib.TOKEN_ENV: TOKEN, "JAX_PLATFORMS": "cpu"}  # conftest's 8 CPU devices
  placement = ["--mesh", mesh] if mesh else []
  proc = subprocess.Popen(
    [sys.executable, "-m", "launch.serve", "--checkpoint", str(workdir), "--port", "0", "--slots", "8", *placement],
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
    env=env,
    cwd=os.path.dirname(os.path.dirname(__file__)),
  )
  try:
    lines = []
    for line in proc.stdout:
      lines.append(line)
      if line.startswith("ready: "):
        url = line.split()[1] + f"?token={TOKEN}"
        break
    else:
      raise AssertionError("server did not start:\n" + "".join(lines))
    assert ("on mesh data=2,expert=4" in lines[0]) == bool(mesh), lines[0]
    clients = [connect(url) for _ in range(8)]
    for ws in clients:
      assert json.loads(ws.recv(timeout=10))["type"] == "session.started"
    time.sleep(0.5)  # live sessions: ticks are flowing
    t = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    for ws in clients:
      with pytest.raises(ConnectionClosed):
        while True:
          ws.recv(timeout=30)
      assert ws.close_code == 1001 and ws.close_reason == "server shutting down"
    assert proc.wait(30) == 0
    assert time.monotonic() - t < 30
    assert "stopped" in proc.stdout.read()
  finally:
    proc.kill()
    proc.wait()


def test_a_missing_checkpoint_is_a_clear_error_not_a_traceback(tmp_path):
  out = subprocess.run(
    [sys.executable, "-m", "launch.serve", "--checkpoint", str(tmp_path / "nothing")],
    capture_output=True,
    text=True,
    env={**os.environ, "JAX_PLATFORMS": "cpu"},
    cwd=os.path.dirname(os.path.dirname(__file__)),
    timeout=120,
  )
  assert out.returncode == 2 and "error: " in out.stderr and "no such directory" in out.stderr
  assert len(out.stderr.strip().splitlines()) == 1, out.stderr
  assert "Traceback" not in out.stderr
