"""One engine on several processes: process 0 owns the sessions, every process runs the step.

Multi-controller JAX runs the same program on every process, but a live
server's inputs (sockets, clocks, tool threads) exist on process 0 only. So the
engine on process 0, the leader, sends each device operation with its host
arguments (a join's slot mask and sampling, a tick's whole input batch after the
host logic filled it) to the other processes before running it, and each
follower runs the same operations in the same order on its part of the global
state. Nothing a follower computes depends on its own clock or threads, so all
processes hold the same state after every operation.

The channel is the key-value store of the coordination service that
``jax.distributed`` already runs: one entry per operation under its sequence
number, a JSON header and the arrays' raw bytes (no pickle). The leader deletes
entries once a step has completed, since a step is a collective that every
follower can only have joined after reading everything before it.

A follower's SIGTERM asks the leader to drain (key ``drain``); the leader closes
every session, then sends ``stop`` and every process exits 0. A lost process is
named by ``interaction.distributed``'s watchdog.
"""

from __future__ import annotations

import json
import math
import struct
import time

import jax
import numpy as np

from interaction import distributed

PREFIX = "interaction/lockstep/"
DRAIN_KEY = PREFIX + "drain"
OPS = ("set_slot", "set_sampling", "step", "stop")


class ChannelError(RuntimeError):
  """A message on the lockstep channel could not be decoded (a bug or a version mismatch between processes)."""


def encode(op: str, arrays: dict[str, np.ndarray]) -> bytes:
  """``op`` and named host arrays as bytes: a length-prefixed JSON header, then each array's raw bytes."""
  if op not in OPS:
    raise ValueError(f"unknown lockstep operation {op!r}; known: {OPS}")
  arrays = {k: np.asarray(v) for k, v in arrays.items()}  # tobytes() is C order; 0-d arrays stay 0-d
  for k, v in arrays.items():
    if v.dtype.hasobject:
      raise ValueError(f"array {k!r} has dtype object; only plain numeric arrays travel")
  header = json.dumps({"op": op, "arrays": [[k, v.dtype.str, list(v.shape)] for k, v in arrays.items()]}).encode()
  return b"".join([struct.pack("<I", len(header)), header, *(v.tobytes() for v in arrays.values())])


def decode(data: bytes) -> tuple[str, dict[str, np.ndarray]]:
  try:
    (n,) = struct.unpack_from("<I", data)
    header = json.loads(data[4 : 4 + n])
    op, offset, arrays = header["op"], 4 + n, {}
    for name, dtype, shape in header["arrays"]:
      dtype, count = np.dtype(dtype), math.prod(shape)
      arrays[name] = np.frombuffer(data, dtype, count, offset).reshape(tuple(shape)).copy()
      offset += dtype.itemsize * count
  except (struct.error, ValueError, KeyError, TypeError) as e:
    raise ChannelError(f"undecodable lockstep message ({len(data)} bytes): {type(e).__name__}: {e}") from None
  if op not in OPS or offset != len(data):
    raise ChannelError(f"lockstep message: operation {op!r}, {len(data) - offset} bytes left over")
  return op, arrays


class Channel:
  """Process 0 sends operations in order; every other process receives them in the same order."""

  def __init__(self, client=None):
    self.client = distributed._client() if client is None else client
    self.sent = self.received = self.forgotten = 0
    self.bytes_sent = 0
    self.send_s = 0.0  # time spent handing operations to the store (the leader's cost per tick)

  def send(self, op: str, arrays: dict[str, np.ndarray]) -> int:
    t = time.perf_counter()
    payload = encode(op, arrays)
    self.client.key_value_set_bytes(f"{PREFIX}{self.sent}", payload)
    self.sent += 1
    self.bytes_sent += len(payload)
    self.send_s += time.perf_counter() - t
    return self.sent - 1

  def forget(self, upto: int) -> None:
    """Delete entries below ``upto`` (every follower has read them: call after a step completed)."""
    for i in range(self.forgotten, upto):
      self.client.key_value_delete(f"{PREFIX}{i}")
    self.forgotten = max(self.forgotten, upto)

  def receive(self, timeout_s: float) -> tuple[str, dict[str, np.ndarray]] | None:
    """The next operation, or None if none came within ``timeout_s`` (or the store is unreachable)."""
    try:
      data = self.client.blocking_key_value_get_bytes(f"{PREFIX}{self.received}", max(int(timeout_s * 1000), 1))
    except Exception:  # noqa: BLE001  (deadline exceeded, or process 0 gone: the watchdog names that)
      return None
    self.received += 1
    return decode(data)

  def request_drain(self, reason: str) -> None:
    self.client.key_value_set(DRAIN_KEY, reason, allow_overwrite=True)

  def drain_requested(self) -> str | None:
    try:
      return self.client.key_value_try_get(DRAIN_KEY)
    except Exception:  # noqa: BLE001  (absent)
      return None


def follow(engine, channel: Channel, *, stop_requested=lambda: False, poll_s: float = 0.5) -> int:
  """A follower's life: run the leader's operations on ``engine`` until ``stop``; returns how many ran.

  ``stop_requested()`` true (this process got SIGTERM) asks the leader once to drain the server.
  """
  ran, asked = 0, False
  while True:
    if not asked and stop_requested():
      channel.request_drain(f"process {jax.process_index()} got SIGTERM")
      asked = True
    message = channel.receive(poll_s)
    if message is None:
      continue
    op, arrays = message
    if op == "stop":
      return ran
    engine.run_op(op, arrays)
    ran += 1
