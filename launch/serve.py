r"""Serve a checkpoint to live sessions over WebSocket (protocol: serving/PROTOCOL.md).

  python -m launch.serve --checkpoint workdir/demo [--host 127.0.0.1] [--port 8000] [--slots 32] \
      [--token_file FILE] [--mesh data=2,expert=4]

``--checkpoint`` is anything ``interaction.ckpt.open_model`` opens: a trainer
workdir, its checkpoints directory or one step, or a serve checkpoint (what
``launch.convert`` writes). The browser client is at the printed URL; SIGTERM
drains every session (close 1001) and exits 0. ``--help`` lists every limit.
``--mesh`` lays the parameters and the slots out over the devices.

On several processes (``launch.local --processes 2 -- python -m launch.serve ...
--mesh data=2,expert=4``, or the rendered job on a slice) the mesh spans every
process's devices: process 0 owns the sockets and the sessions and sends each
tick's inputs to the others, which run the same step (``serving.lockstep``).
SIGTERM to any process drains the server and every process exits 0; a lost
process closes every session (1012) and the leader exits 75 naming it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
import signal
import types

import jax
from absl import flags

from interaction import distributed
from launch import cli
from serving import lockstep, protocol, server
from serving.engine import open_engine
from serving.protocol import TOKEN_ENV, Limits
from serving.routes import read_token

FLAGS = cli.flag_values()
_CHECKPOINT = flags.DEFINE_string(
  "checkpoint", None, "Trainer workdir, its checkpoints/ directory, one step, or a serve checkpoint.", flag_values=FLAGS
)
_HOST = flags.DEFINE_string("host", "127.0.0.1", "Address to bind (default: localhost only).", flag_values=FLAGS)
_PORT = flags.DEFINE_integer("port", 8000, "Port; 0 picks a free one.", flag_values=FLAGS)
_SLOTS = flags.DEFINE_integer("slots", 32, "Concurrent sessions (the step's batch).", flag_values=FLAGS)
_MESH = flags.DEFINE_string(
  "mesh", None, "Mesh axis sizes, e.g. data=2,expert=4 (default: one device).", flag_values=FLAGS
)
_TOKEN_FILE = flags.DEFINE_string(
  "token_file", None, f"File holding the access token (else ${TOKEN_ENV}, else one is generated).", flag_values=FLAGS
)
_ORIGINS = flags.DEFINE_multi_string("allowed_origin", [], "Browser Origin allowed to connect.", flag_values=FLAGS)
_VOCODER_ITERS = flags.DEFINE_integer(
  "vocoder_iters", 4, "Griffin-Lim iterations per tick of model speech.", flag_values=FLAGS
)
# One flag per session limit, named by the limit's own metadata (--max-message-bytes -> --max_message_bytes).
_LIMITS = {
  f.name: (flags.DEFINE_integer if f.type in (int, "int") else flags.DEFINE_float)(
    f.metadata["flag"].lstrip("-").replace("-", "_"), f.default, f.metadata["help"], flag_values=FLAGS
  )
  for f in dataclasses.fields(Limits)
}


async def serve_forever(args, channel: lockstep.Channel | None = None) -> int:
  """Open the model, listen, tick until SIGTERM/SIGINT, drain; ``args``: any object with this job's flags.

  ``channel``: this is process 0 of several (the leader). Refusals (a missing checkpoint, a taken port)
  are ``SystemExit("error: ...")``: one line.
  """
  token, source = read_token(args.token_file)
  mesh = args.mesh
  where = f" on mesh {','.join(f'{k}={v}' for k, v in mesh.items())}" if mesh else ""
  where += f" across {jax.process_count()} processes" if channel is not None else ""
  print(f"loading {args.checkpoint} for {args.slots} slots{where}...", flush=True)
  engine = _open(args, channel=channel)
  limits = Limits(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Limits)})
  live = server.LiveServer(
    engine, token=token, allowed_origins=args.allowed_origin, limits=limits, vocoder_iters=args.vocoder_iters
  )
  try:
    port = await live.start(args.host, args.port)
  except OSError as e:
    engine.close()
    raise SystemExit(
      f"error: cannot listen on {args.host}:{args.port}: {e.strerror or e}; pick another --port"
    ) from None
  stop = asyncio.Event()
  loop = asyncio.get_running_loop()
  for sig in (signal.SIGTERM, signal.SIGINT):
    loop.add_signal_handler(sig, stop.set)
  if channel is not None:
    distributed.on_abandon(lambda message: _close_sessions(loop, live, message))
    watcher = asyncio.create_task(_watch(live, channel, stop))
  shown = token if source == "generated" else f"<token from {source}>"
  print(f"serving {args.slots} slots on http://{args.host}:{port}/?token={shown}  (token: {source})", flush=True)
  print(f"ready: ws://{args.host}:{port}{protocol.SESSION_PATH}", flush=True)
  await stop.wait()
  if channel is not None:
    watcher.cancel()
  print(f"draining {len(live.clients)} sessions...", flush=True)
  await live.drain()
  engine.close()  # on several processes: the followers stop too
  print("stopped", flush=True)
  return 0


def _open(args, channel=None, follower=False):
  try:
    return open_engine(args.checkpoint, args.slots, args.mesh, channel=channel, follower=follower)
  except FileNotFoundError as e:  # CheckpointNotFoundError included
    raise SystemExit(f"error: {e}; pass a trainer workdir (e.g. workdir/demo after make demo)") from None
  except ValueError as e:  # e.g. slots that do not split over --mesh
    raise SystemExit(f"error: {e}") from None


async def _watch(live: server.LiveServer, channel: lockstep.Channel, stop: asyncio.Event) -> None:
  """The leader's watch: a follower's SIGTERM (a drain request) stops the server; so does a failed tick
  that no lost process explains within the watchdog's limit (the sessions are closed with the error)."""
  failed_at = None
  while True:
    await asyncio.sleep(0.25)
    reason = await asyncio.to_thread(channel.drain_requested)
    if reason:
      print(f"drain requested: {reason}", flush=True)
      stop.set()
      return
    ticker = live._ticker
    if ticker is not None and ticker.done() and not ticker.cancelled() and ticker.exception() is not None:
      failed_at = failed_at or loop_time()
      if loop_time() - failed_at > distributed.timeout_s() + 3:
        error = ticker.exception()
        await live.abort(protocol.CLOSE_SERVER_ERROR, f"server error: {type(error).__name__}"[:123])
        distributed.abandon(f"the step failed and no process was lost: {type(error).__name__}: {error}", 1)


def loop_time() -> float:
  return asyncio.get_running_loop().time()


def _close_sessions(loop, live: server.LiveServer, message: str) -> None:
  """From the watchdog's thread, before the leader exits: every session closed (1012) naming the lost process."""
  found = re.search(r"process\(es\) (\[[^\]]*\] of \d+)", message)
  reason = f"server lost process(es) {found.group(1)}" if found else "server lost a process"
  asyncio.run_coroutine_threadsafe(live.abort(protocol.CLOSE_LOST_PROCESS, reason[:123]), loop).result(3)


def follow_forever(args) -> int:
  """Process 1..N-1: run the leader's operations on this process's part of the engine until it stops."""
  engine = _open(args, follower=True)
  term = distributed.Preemption().install()
  me = jax.process_index()
  print(f"process {me}: following process 0 ({args.slots} slots)", flush=True)
  ran = lockstep.follow(engine, lockstep.Channel(), stop_requested=lambda: term.requested)
  print(f"process {me}: stopped after {ran} operations", flush=True)
  return 0


def main(argv=None) -> int:
  """The live server's command line: open the model, listen, tick, drain (``serve_forever``); or follow process 0."""
  cli.parse(FLAGS, argv, doc=__doc__, prog="python -m launch.serve", required=("checkpoint",))
  distributed.initialize_from_env()  # before the mesh is checked: it spans every process's devices
  if _SLOTS.value < 1:
    raise cli.UsageError(f"--slots must be >= 1, got {_SLOTS.value}")
  args = types.SimpleNamespace(
    checkpoint=_CHECKPOINT.value,
    host=_HOST.value,
    port=_PORT.value,
    slots=_SLOTS.value,
    mesh=cli.mesh_flag(_MESH.value),
    token_file=_TOKEN_FILE.value,
    allowed_origin=list(_ORIGINS.value),
    vocoder_iters=_VOCODER_ITERS.value,
    **{name: flag.value for name, flag in _LIMITS.items()},
  )
  if jax.process_count() > 1 and args.mesh is None:
    raise cli.UsageError(
      f"on {jax.process_count()} processes --mesh is required (over all {jax.device_count()} devices)"
    )
  try:
    if jax.process_index() > 0:
      return follow_forever(args)
    return asyncio.run(serve_forever(args, lockstep.Channel() if jax.process_count() > 1 else None))
  except SystemExit as e:  # the server's own refusals (a missing checkpoint, a taken port) are one line
    if isinstance(e.code, str):
      raise cli.UsageError(e.code) from None
    raise


if __name__ == "__main__":
  cli.run(main)
