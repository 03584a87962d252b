"""Multi-controller JAX: initialization from the environment, barriers that time out, preemption.

Launchers (``launch.local``, the JobSet and sbatch specs from ``launch.pod``)
set ``INTERACTION_COORDINATOR`` (host:port), ``INTERACTION_NUM_PROCESSES`` and
``INTERACTION_PROCESS_ID``; ``INTERACTION_COORDINATOR=auto`` lets jax detect the
cluster (Cloud TPU, Slurm). Without them the job is one process and every
function here is a no-op.

A dead peer must not hang the job: barriers name the processes that did not
arrive, and a watchdog thread exits this process (status 75), naming the peer,
when the coordination service stops seeing it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from typing import NoReturn

import jax
import numpy as np

ENV_COORDINATOR = "INTERACTION_COORDINATOR"
ENV_NUM_PROCESSES = "INTERACTION_NUM_PROCESSES"
ENV_PROCESS_ID = "INTERACTION_PROCESS_ID"
ENV_TIMEOUT = "INTERACTION_BARRIER_TIMEOUT"  # seconds; also the peer-liveness limit
DEFAULT_TIMEOUT_S = 60.0
PEER_LOST_EXIT = 75  # EX_TEMPFAIL: a peer vanished; the job can be restarted from its checkpoint


class BarrierTimeoutError(RuntimeError):
  """Some processes did not reach a barrier in time; the message names them."""


_barrier_counts: dict[str, int] = {}
_stop = threading.Event()
_watchdog: threading.Thread | None = None
_on_abandon: list = []  # callables(message) run before an abandoning exit (e.g. a server closing its sessions)


def timeout_s() -> float:
  return float(os.environ.get(ENV_TIMEOUT, DEFAULT_TIMEOUT_S))


def initialize_from_env() -> bool:
  """``jax.distributed.initialize`` from the launcher's environment; returns whether it ran.

  Must run before jax touches a device. On CPU, cross-process collectives use gloo.
  """
  coordinator = os.environ.get(ENV_COORDINATOR)
  if not coordinator or jax.distributed.is_initialized():
    return False
  limit = max(int(timeout_s()), 1)
  if coordinator == "auto":
    jax.distributed.initialize(initialization_timeout=max(limit, 300), heartbeat_timeout_seconds=limit + 15)
  else:
    num, pid = os.environ.get(ENV_NUM_PROCESSES), os.environ.get(ENV_PROCESS_ID)
    if num is None or pid is None:
      raise ValueError(f"{ENV_COORDINATOR} is set, so {ENV_NUM_PROCESSES} and {ENV_PROCESS_ID} must be too")
    if os.environ.get("JAX_PLATFORMS", "") in ("", "cpu"):
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
      coordinator,
      int(num),
      int(pid),
      initialization_timeout=max(limit, 60),
      # Longer than the watchdog's limit, so the watchdog names the lost peer first.
      heartbeat_timeout_seconds=limit + 15,
      shutdown_timeout_seconds=limit,
    )
  start_watchdog()
  return True


def _client():
  from jax._src import distributed

  return distributed.global_state.client


def barrier(name: str, timeout: float | None = None) -> None:
  """Wait until every process reaches ``name``; raise BarrierTimeoutError naming the missing ones."""
  n = jax.process_count()
  if n == 1:
    return
  timeout = timeout_s() if timeout is None else timeout
  count = _barrier_counts.get(name, 0)
  _barrier_counts[name] = count + 1
  key = f"interaction/barrier/{name}/{count}"
  client, me = _client(), jax.process_index()
  client.key_value_set(f"{key}/{me}", "1")
  deadline = time.monotonic() + timeout
  missing = []
  for p in range(n):
    try:
      if missing:  # past the deadline: only look
        if client.key_value_try_get(f"{key}/{p}") is None:
          missing.append(p)
      else:
        client.blocking_key_value_get(f"{key}/{p}", max(int((deadline - time.monotonic()) * 1000), 1))
    except Exception:  # noqa: BLE001  (the client raises its own runtime errors on timeout / absence)
      missing.append(p)
  if missing:
    raise BarrierTimeoutError(
      f"barrier {name!r}: process(es) {missing} of {n} did not arrive within {timeout:.0f} s "
      f"(seen from process {me}); they have died or hang"
    )


def any_process(flag: bool) -> bool:
  """True on every process if ``flag`` is true on any (a collective: all processes must call it)."""
  if jax.process_count() == 1:
    return bool(flag)
  from jax.experimental import multihost_utils

  return bool(np.any(multihost_utils.process_allgather(np.asarray([flag], np.int32))))


def process_sum(x) -> np.ndarray:
  """The sum of ``x`` over processes (a collective)."""
  if jax.process_count() == 1:
    return np.asarray(x)
  from jax.experimental import multihost_utils

  return np.sum(multihost_utils.process_allgather(np.asarray(x)[None]), axis=0)


def host_value(x):
  """An array's full value as numpy on every process (gathers when it spans processes)."""
  if getattr(x, "is_fully_addressable", True) or getattr(x, "is_fully_replicated", False):
    return np.asarray(jax.device_get(x))
  from jax.experimental import multihost_utils

  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


# -- peer liveness -----------------------------------------------------------------


def start_watchdog(interval: float | None = None) -> threading.Thread | None:
  """Exit this process, naming the peer, once a peer's heartbeat has not advanced for ``timeout_s()``.

  Collectives with a dead peer block without end; this thread turns that hang into an error.
  Every process bumps its own counter in the coordination service's key-value store; losing the
  store itself means losing process 0, which hosts it. The beat comes every ``timeout_s() / 50``
  (0.05 to 1 s), so a loss is named within the timeout plus two beats.
  """
  n = jax.process_count()
  if n == 1:
    return None
  client, me, limit = _client(), jax.process_index(), timeout_s()
  interval = min(max(limit / 50, 0.05), 1.0) if interval is None else interval
  prefix = "interaction/alive/"

  def watch():
    beat, seen = 0, {p: (None, time.monotonic()) for p in range(n) if p != me}
    while not _stop.wait(interval):
      beat += 1
      try:
        client.key_value_set(f"{prefix}{me}", str(beat), allow_overwrite=True)
        values = {k.rsplit("/", 1)[-1]: v for k, v in client.key_value_dir_get(prefix)}
      except Exception:  # noqa: BLE001  (the store is gone with process 0)
        values = {str(p): seen[p][0] for p in seen if p != 0}
      now = time.monotonic()
      for p, (last, _) in seen.items():
        value = values.get(str(p))
        if value != last:
          seen[p] = (value, now)
      lost = sorted(p for p, (_, since) in seen.items() if now - since >= limit)
      if lost:
        abandon(
          f"process {me}: lost contact with process(es) {lost} of {n}: no heartbeat for {limit:.0f} s; "
          "they have died or hang. Exiting so the job can restart from its last checkpoint."
        )

  global _watchdog
  _watchdog = threading.Thread(target=watch, name="interaction-peer-watchdog", daemon=True)
  _watchdog.start()
  return _watchdog


def abandon(message: str, code: int = PEER_LOST_EXIT) -> NoReturn:
  """Print ``error: message`` and exit now with ``code``, skipping ``jax.distributed.shutdown``.

  With a peer gone, the normal exit path's shutdown barrier waits for it and can
  abort the process (SIGABRT), losing the exit status the launcher acts on.
  """
  print(f"error: {message}", file=sys.stderr, flush=True)
  for callback in list(_on_abandon):
    try:
      callback(message)
    except Exception as e:  # noqa: BLE001  (exiting anyway: say what the callback could not do)
      print(f"error: while abandoning: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
  sys.stdout.flush()
  os._exit(code)


def on_abandon(callback) -> None:
  """Run ``callback(message)`` before this process abandons the job (a lost peer); it should be quick."""
  _on_abandon.append(callback)


@contextlib.contextmanager
def peer_guard():
  """On an error inside, give the watchdog time to name a lost peer before the error propagates.

  A dead peer often surfaces first as a collective's connection error that does not say who died.
  """
  try:
    yield
  except Exception:
    if _watchdog is not None and _watchdog.is_alive():
      print(
        f"process {jax.process_index()}: failed; checking for {timeout_s():.0f} s whether a peer died",
        file=sys.stderr,
        flush=True,
      )
      time.sleep(timeout_s() + 3)  # the watchdog exits the process here if a peer is gone
    raise


def stop_watchdog() -> None:
  _stop.set()


# -- preemption --------------------------------------------------------------------


class Preemption:
  """SIGTERM sets a flag; ``should_stop`` makes all processes agree on the same step to stop at."""

  def __init__(self):
    self.requested = False
    self.signal = None
    self._previous = None

  def install(self) -> Preemption:
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    self.requested, self.signal = True, signum

  def should_stop(self) -> bool:
    """Collective: every process returns the same answer at the same step."""
    return any_process(self.requested)

  def uninstall(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None
