r"""Load test for the live server: N clients streaming real speech in real time, reading everything.

  python -m launch.loadtest --url ws://127.0.0.1:8000/v1/session --sessions 32 --duration 60 \
      [--token T] [--audio DIR] [--video] [--slow_clients K] [--extra_session_at SECONDS] [--json]

Each client opens a session (serving/PROTOCOL.md) and streams 200 ms chunks of speech paced against
the wall clock, looping it: the WAV files of ``--audio DIR`` (any rate and channel count), else
sentences synthesized with ``espeak-ng``, else a voiced synthetic signal; ``--video`` adds one JPEG
per chunk. ``--slow_clients K``: K clients stop reading after ``--slow_after`` seconds, and the run
waits up to ``--slow_linger`` s past ``--duration`` for the server to close them.
``--extra_session_at T``: one session too many is opened at T seconds and the time until it is
refused is measured. How the clients, their playback model and the slow readers work:
``serving/loadtest.py``.

Prints a table, a progress line per ``--progress`` s on stderr, and as the LAST line one JSON
object with the same figures (``--json``: only that line on stdout). Exit status: 0 when every
session connected, ran and ended cleanly, else 1; a refused command line (no token) is one line, 2.
"""

from __future__ import annotations

import asyncio
import json
import os

from absl import flags

from launch import cli
from serving import loadtest, protocol
from serving.loadtest_report import clean, format_table
from serving.protocol import TOKEN_ENV

FLAGS = cli.flag_values()
_URL = flags.DEFINE_string("url", f"ws://127.0.0.1:8000{protocol.SESSION_PATH}", "Session URL.", flag_values=FLAGS)
_TOKEN = flags.DEFINE_string("token", None, f"Access token (else ${TOKEN_ENV}).", flag_values=FLAGS)
_SESSIONS = flags.DEFINE_integer("sessions", 4, "Concurrent clients.", flag_values=FLAGS)
_DURATION = flags.DEFINE_float("duration", 10.0, "Seconds each client streams.", flag_values=FLAGS)
_AUDIO = flags.DEFINE_string(
  "audio", None, "Directory of .wav files to stream (else espeak-ng speech).", flag_values=FLAGS
)
_VIDEO = flags.DEFINE_boolean("video", False, "Also send one small JPEG per 200 ms chunk.", flag_values=FLAGS)
_SLOW_CLIENTS = flags.DEFINE_integer("slow_clients", 0, "Clients that stop reading.", flag_values=FLAGS)
_SLOW_AFTER = flags.DEFINE_float("slow_after", 3.0, "Seconds before the slow clients stop.", flag_values=FLAGS)
_SLOW_LINGER = flags.DEFINE_float(
  "slow_linger", 30.0, "Seconds past --duration to wait for the server to close them.", flag_values=FLAGS
)
_EXTRA_AT = flags.DEFINE_float(
  "extra_session_at", None, "Open one session too many at this many seconds.", flag_values=FLAGS
)
_PROGRESS = flags.DEFINE_float(
  "progress", 10.0, "Seconds between progress lines on stderr (0: none).", flag_values=FLAGS
)
_JSON = flags.DEFINE_boolean("json", False, "Print only the JSON report.", flag_values=FLAGS)


def parse_options(argv=None) -> loadtest.Options:
  """The command line as the run's ``Options``; the token defaults to ``$INTERACTION_SERVER_TOKEN``."""
  cli.parse(FLAGS, argv, doc=__doc__, prog="python -m launch.loadtest")
  token = _TOKEN.value or os.environ.get(TOKEN_ENV)
  if not token:
    raise cli.UsageError(f"no token: pass --token or set ${TOKEN_ENV}")
  if _SESSIONS.value < 1 or not 0 <= _SLOW_CLIENTS.value <= _SESSIONS.value or _DURATION.value <= 0:
    raise cli.UsageError("need --sessions >= 1, 0 <= --slow_clients <= --sessions and --duration > 0")
  return loadtest.Options(
    url=_URL.value,
    token=token,
    sessions=_SESSIONS.value,
    duration=_DURATION.value,
    audio_dir=_AUDIO.value,
    video=_VIDEO.value,
    slow_clients=_SLOW_CLIENTS.value,
    slow_after=_SLOW_AFTER.value,
    slow_linger=_SLOW_LINGER.value,
    extra_session_at=_EXTRA_AT.value,
    progress=_PROGRESS.value,
  )


def main(argv=None) -> int:
  """Run the load test; the table (unless ``--json``) and the JSON report go to stdout."""
  options = parse_options(argv)
  try:
    report = asyncio.run(loadtest.run(options))
  except SystemExit as e:  # the library's refusals (an --audio folder with no .wav files) are one line
    if isinstance(e.code, str):
      raise cli.UsageError(e.code) from None
    raise
  if not _JSON.value:
    print(format_table(report))
  print(json.dumps(report), flush=True)
  return 0 if clean(report) else 1


if __name__ == "__main__":
  cli.run(main)
