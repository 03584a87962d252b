"""Multi-process JAX on localhost: launcher, barriers and lost peers, equivalence, preemption.

The fast tests use small scripts; the training runs (2 processes x 4 CPU devices
against 1 x 8) and the evaluation job on 2 processes are ``slow``.
"""

import json
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from data_pipeline import synthetic
from launch import local

ROOT = pathlib.Path(__file__).parent.parent
PY = sys.executable


def spawn(script: str, count: int, timeout: float, **popen):
  """``count`` processes running ``script`` with the launcher's environment."""
  port = local.free_port()
  procs = []
  for i in range(count):
    env = local.process_env(i, count, port, 2, timeout=timeout)
    env["PYTHONPATH"] = str(ROOT)
    procs.append(
      subprocess.Popen([PY, "-c", textwrap.dedent(script)], env=env, cwd=ROOT, text=True, **popen)  # noqa: S603
    )
  return procs


def test_launcher_prefixes_logs_stops_the_others_and_returns_the_failure():
  script = "import os, sys, time; i = os.environ['INTERACTION_PROCESS_ID']; print('hello', i, flush=True); "
  script += "sys.exit(3) if i == '1' else time.sleep(120)"
  t = time.monotonic()
  out = subprocess.run(
    [
      PY,
      "-m",
      "launch.local",
      "--processes",
      "2",
      "--devices-per-process",
      "1",
      "--grace",
      "5",
      "--",
      PY,
      "-c",
      script,
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=60,
  )
  assert out.returncode == 3, out.stdout + out.stderr
  assert time.monotonic() - t < 30, "the sleeping process must be stopped, not waited for"
  assert "[p0] hello 0" in out.stdout and "[p1] hello 1" in out.stdout
  assert "process 1 exited with status 3; stopping the others" in out.stderr


def test_launcher_without_a_command_is_a_usage_error():
  out = subprocess.run([PY, "-m", "launch.local", "--processes", "2"], cwd=ROOT, capture_output=True, text=True)
  assert out.returncode == 2 and "no command given" in out.stderr


def test_barrier_names_the_process_that_did_not_arrive():
  script = """
    import sys, time
    from interaction import distributed
    distributed.initialize_from_env()
    import jax
    if jax.process_index() == 1:
      time.sleep(8)  # alive (its heartbeat runs) but never reaches the barrier
      sys.exit(0)
    try:
      distributed.barrier("test", timeout=3)
    except distributed.BarrierTimeoutError as e:
      distributed.abandon(f"caught: {e}", code=9)  # what launch.train does (with the restartable status)
  """
  procs = spawn(script, 2, timeout=30, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  try:
    out, _ = procs[0].communicate(timeout=60)
    # The exit status survives: no shutdown barrier waiting for (and aborting on) the missing peer.
    assert procs[0].returncode == 9, out
    assert "error: caught:" in out
    assert "barrier 'test': process(es) [1] of 2 did not arrive within 3 s" in out
  finally:
    for p in procs:
      p.kill()
      p.wait()


def test_a_killed_peer_makes_the_survivor_exit_naming_it_within_the_timeout():
  script = """
    import time
    import numpy as np
    from interaction import distributed
    distributed.initialize_from_env()
    from jax.experimental import multihost_utils
    print("ready", flush=True)
    with distributed.peer_guard():
      while True:  # collectives: with a dead peer these block or fail without saying who died
        multihost_utils.process_allgather(np.ones(1))
        time.sleep(0.05)
  """
  timeout = 6
  procs = spawn(script, 2, timeout=timeout, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  try:
    for p in procs:
      assert p.stdout.readline().strip() == "ready"
    time.sleep(1)
    procs[1].kill()
    t = time.monotonic()
    _, err = procs[0].communicate(timeout=60)
    waited = time.monotonic() - t
  finally:
    for p in procs:
      p.kill()
      p.wait()
  assert procs[0].returncode == 75, err[-2000:]
  assert "lost contact with process(es) [1] of 2" in err
  assert timeout - 1 <= waited <= 2 * timeout + 10


# -- training runs ------------------------------------------------------------------

OVERRIDES = {
  "train.log_every": 1,
  "model.num_layers": 2,
  "data.window_turns": 8,
  "data.synthetic_eval": 8,
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  d = tmp_path_factory.mktemp("mp")
  synthetic.generate(d / "data", "train", 96, seed=0)
  synthetic.generate(d / "data", "eval", 8, seed=1)
  # "whole": every process reads the global batch, so a 2-process run sees a 1-process run's batches.
  (d / "whole_cfg.py").write_text(
    "from experiments import tiny\n\n\ndef get_config():\n  c = tiny.get_config()\n"
    "  c.data.process_sharding = 'whole'\n  return c\n"
  )
  return d


def train_command(setup, workdir, **extra):
  overrides = dict(OVERRIDES, **{"data.dir": str(setup / "data")}, **extra)
  cmd = [PY, "-m", "launch.train", "--config", str(setup / "whole_cfg.py"), "--workdir", str(workdir), "--noprogress"]
  return cmd + [f"--config.{k}={v}" for k, v in overrides.items()]


def launch_command(setup, workdir, processes=2, **extra):
  cmd = [PY, "-m", "launch.local", "--processes", str(processes), "--devices-per-process", "4"]
  return cmd + ["--barrier-timeout", "60", "--"] + train_command(setup, workdir, **extra)


def env():
  return dict(os.environ, PYTHONPATH=str(ROOT))


def losses(workdir):
  rows = [json.loads(line) for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]
  return {r["step"]: r["total"] for r in rows if "total" in r}


@pytest.mark.slow
def test_two_processes_of_4_devices_match_one_process_of_8(setup, tmp_path):
  extra = {"train.steps": 6, "train.checkpoint_every": 3}
  one = subprocess.run(train_command(setup, tmp_path / "one", **extra), cwd=ROOT, env=env(), capture_output=True)
  assert one.returncode == 0, one.stderr[-3000:]
  two = subprocess.run(launch_command(setup, tmp_path / "two", **extra), cwd=ROOT, env=env(), capture_output=True)
  assert two.returncode == 0, two.stdout[-3000:]
  a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
  assert sorted(a) == sorted(b) == list(range(1, 7))
  for step in a:
    # Same batches and mesh; the cross-process all-reduce (gloo) adds in another order than XLA:CPU's
    # in-process one, so the sums can differ in the last bit.
    assert abs(a[step] - b[step]) <= 1e-6 * max(1.0, abs(a[step])), (step, a[step], b[step])


@pytest.mark.slow
def test_sigterm_to_one_process_saves_the_same_step_everywhere_and_resumes(setup, tmp_path):
  extra = {"train.steps": 40, "train.checkpoint_every": 2}
  proc = subprocess.Popen(
    launch_command(setup, tmp_path, **extra),
    cwd=ROOT,
    env=env(),
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
  )
  pids, output = {}, []
  try:
    for line in proc.stdout:
      output.append(line)
      if line.startswith("[launch.local] process "):
        pids[int(line.split()[2].rstrip(":"))] = int(line.split()[-1])
      if line.startswith("[p0] checkpoint: saving step 4 "):
        os.kill(pids[1], signal.SIGTERM)
        t = time.monotonic()
        break
    output += proc.stdout.readlines()
    proc.wait(timeout=120)
  finally:
    if proc.poll() is None:
      proc.kill()
  text = "".join(output)
  assert proc.returncode == 0, text[-3000:]
  assert time.monotonic() - t < 60, "the save and exit must fit a grace period"
  saved = {}
  for line in output:
    if "preempted: process" in line:
      words = line.split()
      saved[int(words[words.index("process") + 1])] = int(words[words.index("step") + 1])
  assert sorted(saved) == [0, 1] and saved[0] == saved[1] >= 4, text[-3000:]
  resumed = subprocess.run(
    launch_command(setup, tmp_path, **extra), cwd=ROOT, env=env(), capture_output=True, text=True
  )
  assert resumed.returncode == 0, resumed.stdout[-3000:]
  assert (
    f"[p0] resumed from step {saved[0]} " in resumed.stdout and f"[p1] resumed from step {saved[0]} " in resumed.stdout
  )
  assert '"step": 40' in resumed.stdout


@pytest.mark.slow  # ~5 min on 2 cores: two processes' gloo collectives every tick
def test_the_evaluation_report_is_the_same_on_2_processes_of_4_devices_and_on_1_device(tmp_path):
  from interaction.testing import save_checkpoint
  from serving.eval import evaluate

  workdir = save_checkpoint(tmp_path)
  synthetic.generate(tmp_path / "data", "eval", len(synthetic.TASKS), seed=11)
  args = ["--checkpoint", str(workdir), "--data", str(tmp_path / "data"), "--slots", "8"]
  cmd = [PY, "-m", "launch.local", "--processes", "2", "--devices-per-process", "4", "--"]
  cmd += [PY, "-m", "launch.evaluate", *args, "--mesh", "data=2,expert=4", "--output", str(tmp_path / "out")]
  out = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)  # noqa: S603
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  assert "[p0] silence/active_rate" in out.stdout and "[p1] silence/active_rate" not in out.stdout  # p0 reports
  two = json.loads((tmp_path / "out" / "report.json").read_text())
  one = evaluate.run(workdir, tmp_path / "data", slots=8, timelines=False, progress=False)
  assert two.pop("placement") == {"mesh": {"data": 2, "expert": 4}, "processes": 2}
  assert one.pop("placement") == {"devices": 1}
  two.pop("timelines")
  assert sum(one["conversations"].values()) == len(synthetic.TASKS)
  assert two == one  # every figure and count
