r"""Serve a checkpoint to live sessions over WebSocket (protocol: serving/PROTOCOL.md).

  python -m launch.serve --checkpoint workdir/demo [--host 127.0.0.1] [--port 8000] [--slots 32] \
      [--token_file FILE] [--mesh data=2,expert=4]

``--checkpoint`` is anything ``interaction.ckpt.open_model`` opens: a trainer
workdir, its checkpoints directory or one step, or a serve checkpoint (what
``launch.convert`` writes). The browser client is at the printed URL; SIGTERM
drains every session (close 1001) and exits 0. ``--help`` lists every limit.
``--mesh`` lays the parameters and the slots out over this process's devices.
"""

from __future__ import annotations

import asyncio
import dataclasses
import types

from absl import flags

from launch import cli
from serving import server
from serving.protocol import TOKEN_ENV, Limits

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


def main(argv=None) -> int:
  """The live server's command line: open the model, listen, tick, drain (``serving.server.serve_forever``)."""
  cli.parse(FLAGS, argv, doc=__doc__, prog="python -m launch.serve", required=("checkpoint",))
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
  try:
    return asyncio.run(server.serve_forever(args))
  except SystemExit as e:  # the server's own refusals (a missing checkpoint, a taken port) are one line
    if isinstance(e.code, str):
      raise cli.UsageError(e.code) from None
    raise


if __name__ == "__main__":
  cli.run(main)
