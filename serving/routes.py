"""The live server's HTTP side: routes, the token, the Origin allowlist, static files and the health check.

``Routes`` is the ``process_request`` hook of the WebSocket server: it answers every plain HTTP request
itself and lets only an authorized, admitted ``GET /v1/session`` go on to the upgrade. The table of
routes is in ``serving/PROTOCOL.md``. A request that websockets cannot parse (another method, a body,
headers over its limits, not HTTP/1.1) is answered with its status line by ``Routes.connection``'s reading
of the request, where websockets itself drops the connection and logs a traceback.
(Not named ``http``: that would shadow the standard library's.)
"""

from __future__ import annotations

import hmac
import http
import json
import os
import pathlib
import secrets
import urllib.parse
from collections.abc import Callable

from websockets import http11
from websockets.asyncio.server import ServerConnection
from websockets.datastructures import Headers
from websockets.exceptions import InvalidHandshake, SecurityError
from websockets.http11 import Request, Response
from websockets.protocol import CONNECTING, Protocol
from websockets.server import ServerProtocol

from serving.protocol import HEALTH_PATH, PROTOCOL_VERSION, SESSION_PATH, STATS_PATH, TOKEN_ENV

STATIC = pathlib.Path(__file__).parent / "static"
# Every route; "<file>" is any file in STATIC. All but /healthz need the token.
ROUTES = ("/", "/static/<file>", HEALTH_PATH, STATS_PATH, SESSION_PATH)
CONTENT_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript", ".css": "text/css"}


def response(status: int, body: bytes | str, content_type: str = "text/plain; charset=utf-8", **headers) -> Response:
  """A complete response; ``headers`` names use ``_`` for ``-`` (``Retry_After="1"``)."""
  body = body.encode() if isinstance(body, str) else body
  status = http.HTTPStatus(status)
  pairs = [("Content-Type", content_type), ("Content-Length", str(len(body))), ("Cache-Control", "no-store")]
  pairs += [(k.replace("_", "-"), v) for k, v in headers.items()]
  return Response(status.value, status.phrase, Headers(pairs), body)


def json_response(status: int, obj) -> Response:
  return response(status, json.dumps(obj), "application/json")


def read_token(token_file: str | None) -> tuple[str, str]:
  """(token, where it came from): ``token_file``, else ``$INTERACTION_SERVER_TOKEN``, else a new random one."""
  if token_file:
    token = pathlib.Path(token_file).read_text().strip()
    if not token:
      raise SystemExit(f"error: token file {token_file} is empty")
    return token, f"file {token_file}"
  if os.environ.get(TOKEN_ENV):
    return os.environ[TOKEN_ENV].strip(), f"${TOKEN_ENV}"
  return secrets.token_urlsafe(24), "generated"


class Routes:
  """Answers HTTP requests; ``admit()`` refuses a session (a response) or lets it go on (None)."""

  def __init__(
    self,
    token: str,
    allowed_origins=(),
    *,
    admit: Callable[[], Response | None],
    stats: Callable[[], dict],
    counters,
  ):
    self.token, self.admit, self.stats, self.counters = token, admit, stats, counters
    self.allowed_origins = set(allowed_origins)

  def default_origins(self, host: str, port: int) -> None:
    """Without ``--allowed-origin``: the server's own pages, by every name it answers to on this port."""
    if not self.allowed_origins:
      self.allowed_origins = {f"http://{h}:{port}" for h in {host, "localhost", "127.0.0.1"}}

  def authorized(self, request: Request) -> bool:
    """The token from ``Authorization: Bearer`` or the ``token`` query parameter, compared in constant time."""
    given = ""
    scheme, _, credentials = request.headers.get("Authorization", "").strip().partition(" ")
    if scheme.lower() == "bearer":  # auth schemes are case-insensitive (RFC 9110 11.1)
      given = credentials.strip()
    else:
      query = urllib.parse.parse_qs(urllib.parse.urlsplit(request.path).query)
      given = (query.get("token") or [""])[0]
    return hmac.compare_digest(given.encode(), self.token.encode())

  def __call__(self, connection: ServerConnection, request: Request) -> Response | None:
    path = urllib.parse.urlsplit(request.path).path
    if path == HEALTH_PATH:
      return json_response(200, {"status": "ok", "protocol": PROTOCOL_VERSION})
    origin = request.headers.get("Origin")
    if origin is not None and origin not in self.allowed_origins:
      self.counters["refused_origin"] += 1
      return response(403, f"origin {origin!r} is not allowed; start the server with --allowed-origin {origin}")
    if not self.authorized(request):
      self.counters["refused_auth"] += 1
      return response(401, "missing or wrong token", WWW_Authenticate='Bearer realm="interaction"')
    if path == SESSION_PATH:
      return self.admit()  # None: the WebSocket handshake goes on
    if path == STATS_PATH:
      return json_response(200, self.stats())
    return self.static(path)

  def static(self, path: str) -> Response:
    """The browser client's files (``/`` is its page); 404 for anything else."""
    if path == "/":
      path = "/static/index.html"
    if path.startswith("/static/"):
      name = path[len("/static/") :]
      file = STATIC / name
      if "/" not in name and not name.startswith(".") and file.is_file():
        return response(200, file.read_bytes(), CONTENT_TYPES.get(file.suffix, "application/octet-stream"))
    return response(404, f"no route {path}; routes are {', '.join(ROUTES)}")

  def connection(self, protocol: ServerProtocol, server, **kw) -> ServerConnection:
    """``serve``'s ``create_connection``: a connection whose protocol answers unparseable requests with a status."""
    protocol.__class__ = HttpProtocol  # websockets builds the protocol itself; only its request reading changes
    protocol.refused = lambda status: self.counters.update([f"refused_http_{status}"])
    protocol.parser = protocol.parse()  # nothing was read yet: restart the parser as ours
    next(protocol.parser)
    return QuietConnection(protocol, server, **kw)


class Refused(Exception):
  """An HTTP request the server does not take: answered with ``status`` and the reason, then closed."""

  def __init__(self, status: int, reason: str, **headers):
    super().__init__(reason)
    self.status, self.headers = status, headers


def read_request(read_line):
  """websockets' request parsing (``http11.Request.parse``), each refusal a ``Refused`` with its HTTP status."""
  limit = http11.MAX_LINE_LENGTH
  try:
    line = yield from http11.parse_line(read_line)
  except SecurityError:
    raise Refused(414, f"request line over {limit} bytes") from None
  parts = line.split(b" ", 2)
  if len(parts) != 3:
    raise Refused(400, "not an HTTP request line")
  method, path, version = parts
  if version != b"HTTP/1.1":
    raise Refused(505, f"{version[:16].decode('ascii', 'replace')!r}: only HTTP/1.1 is served")
  if method != b"GET":
    raise Refused(405, f"method {method[:16].decode('ascii', 'replace')!r}: only GET is served", Allow="GET")
  try:
    headers = yield from http11.parse_headers(read_line)
  except SecurityError:
    raise Refused(431, f"headers over {http11.MAX_NUM_HEADERS} lines or a line over {limit} bytes") from None
  except ValueError as e:
    raise Refused(400, str(e)[:200]) from None
  length = headers.get("Content-Length", "0").strip()
  if "Transfer-Encoding" in headers or length != "0":
    if not length.isdigit():
      raise Refused(400, f"Content-Length {length[:32]!r} is not a number")
    raise Refused(413, "requests have no body here (Content-Length must be 0, no Transfer-Encoding)")
  return Request(path.decode("ascii", "surrogateescape"), headers)


class HttpProtocol(ServerProtocol):
  """websockets' server protocol, reading the opening request with ``read_request``."""

  refused: Callable[[int], None] = staticmethod(lambda status: None)

  def parse(self):
    if self.state is CONNECTING:
      try:
        request = yield from read_request(self.reader.read_line)
      except EOFError:  # the peer left before a whole request: nothing to answer
        self.send_eof()
        self.parser = self.discard()
        next(self.parser)
        yield
      except Refused as e:
        self.refused(e.status)
        self.send_response(response(e.status, f"{e}\n", Connection="close", **e.headers))  # then EOF, discard
        yield
      self.events.append(request)
    yield from Protocol.parse(self)  # frames, as ServerProtocol.parse goes on after the request


class QuietConnection(ServerConnection):
  """A connection whose refused upgrade (e.g. no ``Upgrade`` header: 426) is its response, not a logged traceback."""

  async def handshake(self, *args, **kw) -> None:
    try:
      await super().handshake(*args, **kw)
    except InvalidHandshake:
      if self.response is None:  # nothing was answered: websockets logs it
        raise
