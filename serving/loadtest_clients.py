"""One load-test client's side of a session: its record, its playback model, and opening its connection."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import json
import math
import socket
import time
import urllib.parse
import urllib.request

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.frames import Frame, Opcode

from serving import protocol
from serving.protocol import TICK_S

SLOW_RCVBUF = 4096  # bytes (Linux doubles it): the slow client's kernel holds little of the backlog
LATE_EPSILON_S = 1e-6  # a frame is late when it comes more than this after its due time (float round-off)


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


class Connection(ClientConnection):
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


async def open_session(url: str, token: str, *, slow: bool = False, open_timeout: float = 30.0) -> Connection:
  kwargs = dict(
    additional_headers=_headers(token),
    open_timeout=open_timeout,
    compression=None,
    proxy=None,
    create_connection=Connection,
    max_size=4 << 20,
  )
  if slow:  # no client pings (it would not read the pongs) and a one-frame queue: reading stops for real
    kwargs.update(ping_interval=None, max_queue=1, sock=await _small_buffer_socket(url))
  return await connect(url, **kwargs)


def refusal(e: BaseException) -> str | None:
  """'503 <body>' / '1013 <reason>' when ``e`` is the server refusing a session, else None."""
  if isinstance(e, InvalidStatus):
    body = (e.response.body or b"").decode("utf-8", "replace").strip()
    return f"{e.response.status_code} {body}".strip()
  if isinstance(e, ConnectionClosed) and e.rcvd is not None and e.rcvd.code == protocol.CLOSE_FULL:
    return f"{protocol.CLOSE_FULL} {e.rcvd.reason}".strip()
  return None
