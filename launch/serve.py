r"""Serve a checkpoint to live sessions over WebSocket (protocol: serving/PROTOCOL.md).

  python -m launch.serve --checkpoint workdir/demo [--host 127.0.0.1] [--port 8000] [--slots 32] \
      [--token-file FILE]

``--checkpoint`` is anything ``interaction.ckpt.open_model`` opens: a trainer
workdir, its checkpoints directory or one step, or a serve checkpoint (what
``launch.convert`` writes). The browser client is at the printed URL; SIGTERM
drains every session (close 1001) and exits 0. ``--help`` lists every limit.
"""

from __future__ import annotations

import sys

from serving import server


def main(argv=None) -> int:
  """The live server's command line (``serving.server.main``): open the model, listen, tick, drain."""
  return server.main(argv)


if __name__ == "__main__":
  sys.exit(main())
