r"""Run a command as a multi-process JAX job on this machine (CPU devices, gloo collectives).

  python -m launch.local --processes 2 --devices_per_process 4 -- \
    python -m launch.train --config experiments/tiny.py --workdir /tmp/tiny2

Starts ``--processes`` copies of the command, each with
``--devices_per_process`` virtual CPU devices and the environment
``interaction.distributed`` reads (a coordinator on 127.0.0.1, the process
count and this process's id), and streams their output prefixed with
``[pN]``. Exits 0 when all exit 0. When one fails, the others get SIGTERM (then
SIGKILL after ``--grace`` s) and the launcher exits with the failed one's code.
SIGTERM/SIGINT to the launcher is forwarded to every process.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time

from absl import flags

from launch import cli


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def process_env(index: int, count: int, port: int, devices: int, base=None, timeout: float | None = None) -> dict:
  """The environment of process ``index``: coordinator, process id/count, CPU device count."""
  env = dict(os.environ if base is None else base)
  flags = [f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
  env.update(
    INTERACTION_COORDINATOR=f"127.0.0.1:{port}",
    INTERACTION_NUM_PROCESSES=str(count),
    INTERACTION_PROCESS_ID=str(index),
    INTERACTION_CPU_DEVICES=str(devices),
    XLA_FLAGS=" ".join([*flags, f"--xla_force_host_platform_device_count={devices}"]),
    JAX_PLATFORMS="cpu",
    PYTHONUNBUFFERED="1",
  )
  if timeout is not None:
    env["INTERACTION_BARRIER_TIMEOUT"] = str(timeout)
  return env


def _stream(index: int, proc: subprocess.Popen, out_lock: threading.Lock) -> None:
  for line in proc.stdout:
    with out_lock:
      sys.stdout.write(f"[p{index}] {line}")
      sys.stdout.flush()


def _describe(code: int) -> str:
  if code < 0:
    return f"was killed by {signal.Signals(-code).name}"
  return f"exited with status {code}"


def run(command: list[str], processes: int, devices: int, grace: float, timeout: float | None) -> int:
  """Start the processes, stream their logs, return the job's exit status."""
  if processes < 1 or devices < 1:
    raise ValueError("--processes and --devices_per_process must be >= 1")
  if not command:
    raise ValueError("no command given: put it after '--'")
  port, lock = free_port(), threading.Lock()
  procs, threads = [], []
  for i in range(processes):
    env = process_env(i, processes, port, devices, timeout=timeout)
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    procs.append(proc)
    print(f"[launch.local] process {i}: pid {proc.pid}", flush=True)
    threads.append(threading.Thread(target=_stream, args=(i, proc, lock), daemon=True))
    threads[-1].start()

  def forward(signum, frame):
    del frame
    for p in procs:
      if p.poll() is None:
        p.send_signal(signum)

  signal.signal(signal.SIGTERM, forward)
  signal.signal(signal.SIGINT, forward)
  status = 0
  while any([p.poll() is None for p in procs]):  # a list: poll every process, not up to the first live one
    failed = [(i, p.returncode) for i, p in enumerate(procs) if p.returncode not in (None, 0)]
    if failed:
      i, code = failed[0]
      print(f"[launch.local] process {i} {_describe(code)}; stopping the others", file=sys.stderr, flush=True)
      status = code if code > 0 else 128 - code
      _stop(procs, grace)
      break
    time.sleep(0.2)
  for t in threads:
    t.join(timeout=5)
  if status == 0:
    codes = [p.returncode for p in procs]
    bad = [(i, c) for i, c in enumerate(codes) if c != 0]
    if bad:
      i, code = bad[0]
      print(f"[launch.local] process {i} {_describe(code)}", file=sys.stderr, flush=True)
      status = code if code > 0 else 128 - code
  return status


def _stop(procs, grace: float) -> None:
  """SIGTERM the live processes, SIGKILL what is left after ``grace`` seconds."""
  for p in procs:
    if p.poll() is None:
      p.terminate()
  deadline = time.monotonic() + grace
  for p in procs:
    try:
      p.wait(timeout=max(deadline - time.monotonic(), 0.1))
    except subprocess.TimeoutExpired:
      p.kill()
      p.wait()


FLAGS = cli.flag_values()
_PROCESSES = flags.DEFINE_integer("processes", 2, "Number of JAX processes.", flag_values=FLAGS)
_DEVICES = flags.DEFINE_integer("devices_per_process", 4, "Virtual CPU devices in each process.", flag_values=FLAGS)
_GRACE = flags.DEFINE_float("grace", 30.0, "Seconds between SIGTERM and SIGKILL when stopping.", flag_values=FLAGS)
_BARRIER_TIMEOUT = flags.DEFINE_float(
  "barrier_timeout", None, "Seconds a process waits for a missing peer (default 60).", flag_values=FLAGS
)


def main(argv=None) -> int:
  # The wrapped command follows absl's own ``--`` separator: nothing after it is parsed here.
  command = cli.parse(FLAGS, argv, doc=__doc__, prog="python -m launch.local", positional=True)
  try:
    return run(command, _PROCESSES.value, _DEVICES.value, _GRACE.value, _BARRIER_TIMEOUT.value)
  except ValueError as e:
    raise cli.UsageError(str(e)) from None


if __name__ == "__main__":
  cli.run(main)
