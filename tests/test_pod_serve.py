"""The sampler on several processes: the lockstep engine equals one device's, and the live server on 2 processes
x 4 CPU devices drains on SIGTERM to any process and closes every session when a process dies.

The 200-tick engine comparison and the 30 s load test over espeak-ng speech are ``slow``.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from launch import local
from serving import lockstep, protocol
from tests.helpers import ROOT, save_checkpoint

TOKEN = "test-token-pod"
MESH = "data=2,expert=4"


def test_lockstep_messages_round_trip_and_garbage_is_a_channel_error():
  arrays = {
    "mask": np.arange(8) == 3,
    "seed": np.asarray(np.uint32(7)),
    "audio_in": np.random.default_rng(0).standard_normal((8, 2, 80)).astype(np.float32),
    "text_in": np.arange(16, dtype=np.int32).reshape(8, 2),
  }
  op, back = lockstep.decode(lockstep.encode("set_slot", arrays))
  assert op == "set_slot" and back.keys() == arrays.keys()
  for k, v in arrays.items():
    assert back[k].dtype == v.dtype and back[k].shape == v.shape
    np.testing.assert_array_equal(back[k], v)
  good = lockstep.encode("step", arrays)
  for bad in (b"", good[:-1], good + b"x", b"\xff\xff\xff\x7f{", good.replace(b'"step"', b'"boom"')):
    with pytest.raises(lockstep.ChannelError):
      lockstep.decode(bad)
  with pytest.raises(ValueError, match="unknown lockstep operation"):
    lockstep.encode("rm -rf", {})
  with pytest.raises(ValueError, match="dtype object"):
    lockstep.encode("step", {"x": np.asarray([object()])})


# -- the engine in lockstep -------------------------------------------------------------

ENGINE_SCRIPT = """
  import json, sys
  import numpy as np
  from interaction import distributed
  distributed.initialize_from_env()
  import jax
  from interaction import sharding
  from serving import lockstep
  from serving.engine import Engine
  from tests.helpers import make_model
  from tests.test_serving_engine import _churn, small_cfg

  cfg = small_cfg()
  graphdef, params = make_model(cfg, seed=3)
  mesh = sharding.make_mesh({"data": 2, "expert": 4})
  channel = lockstep.Channel()
  if jax.process_index() == 0:
    engine = Engine(cfg, graphdef, params, slots=8, cache_tokens=68, mesh=mesh, channel=channel)
    log = _churn(engine, cfg, int(sys.argv[2]))
    engine.close()
    flat = {}
    for sid, outs in log.items():
      for t, out in enumerate(outs):
        for field in ("values", "logprobs", "greedy"):
          for stream, value in getattr(out, field).items():
            flat[f"{sid}/{t}/{field}/{stream}"] = value
    np.savez(sys.argv[1], **flat)
  else:
    engine = Engine(cfg, graphdef, params, slots=8, cache_tokens=68, mesh=mesh)
    lockstep.follow(engine, channel)
  print(json.dumps({"process": jax.process_index(), "compiled": engine.step._jitted._cache_size()}), flush=True)
"""


@pytest.mark.slow
def test_an_engine_on_two_processes_gives_each_session_the_outputs_it_gets_on_one_device(tmp_path):
  """200 ticks of random joins, leaves and sampling changes: process 0 owns the sessions, process 1 follows."""
  from interaction.testing import make_model
  from serving.engine import Engine
  from tests.test_serving_engine import _churn, small_cfg

  ticks, out_file = 200, tmp_path / "log.npz"
  procs = spawn([sys.executable, "-c", textwrap.dedent(ENGINE_SCRIPT), str(out_file), str(ticks)], timeout=60)
  outs = [p.communicate(timeout=1200)[0] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], outs
  for out in outs:  # one compilation of the step per process
    assert json.loads(out.strip().splitlines()[-1])["compiled"] == 1, out
  cfg = small_cfg()
  graphdef, params = make_model(cfg, seed=3)
  one = _churn(Engine(cfg, graphdef, params, slots=8, cache_tokens=68), cfg, ticks)
  two = np.load(out_file, allow_pickle=False)
  assert len(two.files) == sum(len(o) for o in one.values()) * sum(
    len(getattr(one[0][0], f)) for f in ("values", "logprobs", "greedy")
  )
  worst = 0.0
  for sid, outs in one.items():
    for t, a in enumerate(outs):
      for stream, value in a.values.items():  # sampled text, mel frames and the text_in fed: bitwise
        np.testing.assert_array_equal(value, two[f"{sid}/{t}/values/{stream}"], err_msg=f"session {sid} {stream}")
      np.testing.assert_array_equal(a.greedy["text_out"], two[f"{sid}/{t}/greedy/text_out"])
      worst = max(worst, float(np.max(np.abs(a.logprobs["text_out"] - two[f"{sid}/{t}/logprobs/text_out"]))))
  print(f"\nlargest log-prob difference, 2 processes x 4 devices vs one device, over {ticks} ticks: {worst:.2e}")
  assert worst < 1e-4  # float32 rounding riding the KV cache (see the one-process mesh test)


# -- the live server on two processes ---------------------------------------------------


def spawn(command, timeout: float, devices: int = 4, **popen):
  """Two processes of ``command`` with the launcher's environment (``timeout``: the liveness limit)."""
  port = local.free_port()
  procs = []
  for i in range(2):
    env = local.process_env(i, 2, port, devices, timeout=timeout)
    env.update({"PYTHONPATH": str(ROOT), protocol.TOKEN_ENV: TOKEN, "JAX_PLATFORMS": "cpu"})
    procs.append(
      subprocess.Popen(  # noqa: S603
        command, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen
      )
    )
  return procs


class TwoProcessServer:
  """``python -m launch.serve`` as process 0 and 1 of a job on localhost; output lines collected per process."""

  def __init__(self, checkpoint, timeout: float = 10, slots: int = 8):
    command = [sys.executable, "-m", "launch.serve", "--checkpoint", str(checkpoint), "--port", "0"]
    self.procs = spawn([*command, "--slots", str(slots), "--mesh", MESH], timeout=timeout)
    self.lines = [[], []]
    ready = threading.Event()
    for i, p in enumerate(self.procs):
      threading.Thread(target=self._read, args=(i, p, ready), daemon=True).start()
    if not ready.wait(300):
      self.stop()
      raise AssertionError("the server did not start:\n" + self.output())
    self.url = next(x for x in self.lines[0] if x.startswith("ready: ")).split()[1] + f"?token={TOKEN}"

  def _read(self, i, proc, ready):
    for line in proc.stdout:
      self.lines[i].append(line)
      if line.startswith("ready: "):
        ready.set()

  def output(self) -> str:
    return "".join(f"[p{i}] {x}" for i, lines in enumerate(self.lines) for x in lines if "[Gloo]" not in x)

  def stop(self):
    for p in self.procs:
      p.kill()
      p.wait()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  return save_checkpoint(tmp_path_factory.mktemp("ckpt"))


class Reader:
  """A session read on its own thread: its tick events, then how the server closed it."""

  def __init__(self, url):
    self.ws = connect(url)
    assert json.loads(self.ws.recv(timeout=60))["type"] == "session.started"
    self.ticks = []
    self.thread = threading.Thread(target=self._read, daemon=True)
    self.thread.start()

  def _read(self):
    try:
      while True:
        message = self.ws.recv(timeout=120)
        if isinstance(message, str) and json.loads(message)["type"] == "tick":
          self.ticks.append(json.loads(message))
    except (ConnectionClosed, TimeoutError):
      pass

  def closed(self, timeout: float = 60) -> tuple[int, str]:
    self.thread.join(timeout)
    assert not self.thread.is_alive(), "the session was not closed"
    return self.ws.close_code, self.ws.close_reason


def stream(readers, seconds: float) -> None:
  """Every session sends noise in real time for ``seconds``."""
  pcm = protocol.audio_frame(
    (np.random.default_rng(0).standard_normal(protocol.SAMPLES_PER_TICK) * 2000).astype("<i2").tobytes()
  )
  end = time.monotonic() + seconds
  while time.monotonic() < end:
    for r in readers:
      r.ws.send(pcm)
    time.sleep(protocol.TICK_S)


@pytest.mark.parametrize("signalled", [0, 1])
def test_sigterm_to_either_process_drains_every_session_and_every_process_exits_0(checkpoint, signalled):
  server = TwoProcessServer(checkpoint)
  try:
    readers = [Reader(server.url) for _ in range(8)]
    stream(readers, 3.0)
    assert min(len(r.ticks) for r in readers) >= 3, server.output()  # the 8 sessions ticked on the 2-process step
    server.procs[signalled].send_signal(signal.SIGTERM)
    for r in readers:
      assert r.closed() == (1001, "server shutting down")
    assert [p.wait(60) for p in server.procs] == [0, 0], server.output()
    out = server.output()
    assert "across 2 processes" in out and "[p1] process 1: following process 0" in out
    assert "[p0] stopped" in out and "[p1] process 1: stopped after" in out
    if signalled == 1:
      assert "drain requested: process 1 got SIGTERM" in out
  finally:
    server.stop()


def test_a_killed_process_closes_every_session_naming_it_and_the_leader_exits_75(checkpoint):
  timeout = 5.0
  server = TwoProcessServer(checkpoint, timeout=timeout)
  try:
    readers = [Reader(server.url) for _ in range(8)]
    stream(readers, 2.0)
    server.procs[1].kill()
    t = time.monotonic()
    for r in readers:
      assert r.closed() == (protocol.CLOSE_LOST_PROCESS, "server lost process(es) [1] of 2"), server.output()
    closed = time.monotonic() - t
    assert server.procs[0].wait(30) == 75, server.output()
    waited = time.monotonic() - t
  finally:
    server.stop()
  assert "lost contact with process(es) [1] of 2" in server.output()
  print(f"\nsessions closed {closed:.2f} s, leader exited {waited:.2f} s after the kill (limit {timeout:g} s)")
  # The watchdog's limit, plus two of its beats (0.1 s) and two ticks.
  assert closed <= timeout + 2 * 0.1 + 2 * protocol.TICK_S + 0.5


@pytest.mark.slow
def test_eight_sessions_of_speech_for_30_s_on_two_processes_have_no_underrun(checkpoint):
  """The load test's clients (espeak-ng speech, real time, playback model) against the 2-process server."""
  server = TwoProcessServer(checkpoint)
  try:
    out = subprocess.run(
      [sys.executable, "-m", "launch.loadtest", "--url", server.url.split("?")[0], "--token", TOKEN]
      + ["--sessions", "8", "--duration", "30", "--json"],
      cwd=ROOT,
      capture_output=True,
      text=True,
      timeout=300,
      env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    report = json.loads(out.stdout.strip().splitlines()[-1])
  finally:
    server.stop()
  print(f"\n2 processes x 4 devices, 8 sessions: {json.dumps(report)}")
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  assert report["underruns"] == 0, report
