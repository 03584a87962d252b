"""Shared builders for the tests: the fixtures of ``interaction.testing`` (benchmarks use them too), and a live
server started on a checkpoint the way a user starts it."""

import contextlib
import json
import os
import pathlib
import signal
import subprocess
import sys

import numpy as np

from interaction.testing import (
  SMALL_MODEL,
  experiment_config,
  loss_fn,
  make_model,
  random_batch,
  save_checkpoint,
  tiny_cfg,
)
from serving import protocol

__all__ = [
  "SMALL_MODEL",
  "experiment_config",
  "loss_fn",
  "make_model",
  "random_batch",
  "save_checkpoint",
  "serve_a_session",
  "tiny_cfg",
]

ROOT = pathlib.Path(__file__).parent.parent


@contextlib.contextmanager
def running_server(checkpoint, token: str, slots: int):
  """``python -m launch.serve`` on a free port: yields (the process, its session URL); killed on exit."""
  env = {**os.environ, protocol.TOKEN_ENV: token, "JAX_PLATFORMS": "cpu"}
  cmd = [sys.executable, "-m", "launch.serve", "--checkpoint", str(checkpoint), "--port", "0", "--slots", str(slots)]
  proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
  try:
    lines = []
    for line in proc.stdout:
      lines.append(line)
      if line.startswith("ready: "):
        break
    else:
      raise AssertionError("the server did not start:\n" + "".join(lines[-40:]))
    yield proc, line.split()[1]
  finally:
    proc.kill()
    proc.wait()


def serve_a_session(checkpoint, ticks: int = 3, token: str = "test-token-e", timeout: float = 240) -> dict:
  """Start ``python -m launch.serve`` on ``checkpoint`` (localhost, a free port), open one WebSocket session,
  send ``ticks`` micro-turns of a tone and read until ``ticks`` tick events came back; then SIGTERM.

  Returns the ``session.started`` event, the tick events, the binary audio frames, and the exit code.
  """
  from websockets.sync.client import connect

  with running_server(checkpoint, token, slots=1) as (proc, url):
    url += f"?token={token}"
    got = {"started": None, "ticks": [], "audio": []}
    t = np.arange(protocol.SAMPLES_PER_TICK) / protocol.SAMPLE_RATE
    pcm = (3000 * np.sin(2 * np.pi * 220 * t)).astype("<i2").tobytes()
    with connect(url, open_timeout=timeout) as ws:
      got["started"] = json.loads(ws.recv(timeout=timeout))
      for _ in range(ticks):
        ws.send(protocol.audio_frame(pcm))
      while len(got["ticks"]) < ticks:
        message = ws.recv(timeout=timeout)  # the first tick compiles the step
        if isinstance(message, bytes):
          got["audio"].append(message)
        elif json.loads(message).get("type") == "tick":
          got["ticks"].append(json.loads(message))
    proc.send_signal(signal.SIGTERM)
    got["returncode"] = proc.wait(60)
    return got
