"""The live server's HTTP side: routes, the token, the Origin allowlist, static files and the health check.

``Routes`` is the ``process_request`` hook of the WebSocket server: it answers every plain HTTP request
itself and lets only an authorized, admitted ``GET /v1/session`` go on to the upgrade. The table of
routes is in ``serving/PROTOCOL.md``. (Not named ``http``: that would shadow the standard library's.)
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

from websockets.asyncio.server import ServerConnection
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

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
    header = request.headers.get("Authorization", "")
    if header.startswith("Bearer "):
      given = header[len("Bearer ") :].strip()
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
