"""Byte-level text vocabulary with reserved specials.

Ids 0..255 are raw UTF-8 bytes. The specials follow. ``PAD`` is silence: an
output text slot with nothing to say holds ``PAD``. Tool calls and delegation to
the background model are ordinary ``text_out`` tokens between markers; results
come back on ``text_in`` between result markers.
"""

from __future__ import annotations

import numpy as np

NUM_BYTES = 256
PAD = 256  # silence / nothing in this slot
TOOL_CALL_START = 257
TOOL_CALL_END = 258
TOOL_RESULT_START = 259
TOOL_RESULT_END = 260
DELEGATE_START = 261
DELEGATE_END = 262
BACKGROUND_RESULT_START = 263
BACKGROUND_RESULT_END = 264
SPECIALS = {
  "<pad>": PAD,
  "<tool>": TOOL_CALL_START,
  "</tool>": TOOL_CALL_END,
  "<result>": TOOL_RESULT_START,
  "</result>": TOOL_RESULT_END,
  "<delegate>": DELEGATE_START,
  "</delegate>": DELEGATE_END,
  "<background>": BACKGROUND_RESULT_START,
  "</background>": BACKGROUND_RESULT_END,
}
# Rounded up to a multiple of 8 so the embedding shards evenly.
VOCAB_SIZE = 272


def encode(text: str) -> np.ndarray:
  """UTF-8 bytes of ``text`` as int32 ids."""
  return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)


def decode(ids) -> str:
  """Text of ``ids``: bytes decoded as UTF-8, specials by name, pads dropped."""
  names = {v: k for k, v in SPECIALS.items()}
  out, buf = [], bytearray()
  for i in np.asarray(ids).reshape(-1).tolist():
    if i < NUM_BYTES:
      buf.append(i)
      continue
    out.append(buf.decode("utf-8", errors="replace"))
    buf = bytearray()
    if i != PAD:
      out.append(names.get(i, f"<{i}>"))
  out.append(buf.decode("utf-8", errors="replace"))
  return "".join(out)
