"""Convert a folder of recorded conversations into ArrayRecord shards.

  python -m launch.data convert --input recordings/ --output data/ [--split train] [--records_per_shard 1024]

Each sub-folder of --input (or --input itself) is one conversation:

  user.wav          the user's audio (required)
  model.wav         the model's audio (optional; silence if absent)
  transcript.json   word timestamps, events, optional labels and metadata
  frames/           optional video frames named by time in ms: 000400.npy (uint8 [H, W, 3]),
                    or any image Pillow reads as RGB (.png, .jpg, .ppm)

WAVs at another sample rate are resampled to 16 kHz (scipy's polyphase filter) and
several channels are averaged; a count is printed. The transcript format and
the checks (e.g. an event outside its audio is refused, naming the conversation)
are in data_pipeline/README.md.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from data_pipeline import record, shards, wav
from data_pipeline.record import SAMPLE_RATE

_FRAME_SUFFIXES = (".npy", ".ppm", ".png", ".jpg", ".jpeg")


class ConversionError(ValueError):
  """An input conversation that cannot become a record."""


def conversation_dirs(root) -> list[Path]:
  """The conversation folders under ``root`` (``root`` itself if it holds a transcript)."""
  root = Path(root)
  if (root / "transcript.json").exists():
    return [root]
  dirs = sorted(p for p in root.iterdir() if p.is_dir() and (p / "transcript.json").exists())
  if not dirs:
    raise ConversionError(f"{root}: no conversation folders (sub-folders with transcript.json)")
  return dirs


def _load_audio(path: Path, stats: dict) -> np.ndarray:
  x, rate = wav.read_wav(path)
  if rate != SAMPLE_RATE:
    stats["resampled"] = stats.get("resampled", 0) + 1
    x = wav.resample(x, rate, SAMPLE_RATE)
  return wav.to_int16(x)


def _read_image(path: Path) -> np.ndarray:
  if path.suffix.lower() == ".npy":
    return np.load(path, allow_pickle=False)
  try:
    with Image.open(path) as im:
      return np.asarray(im.convert("RGB"))
  except (OSError, SyntaxError, ValueError) as e:  # Pillow's errors for an unreadable or truncated image
    raise ConversionError(f"{path}: not a readable image ({e}); frames are .npy, .png, .jpg or .ppm") from None


def _load_frames(folder: Path, conv_id: str):
  files = sorted(p for p in folder.iterdir() if p.suffix.lower() in _FRAME_SUFFIXES)
  if not files:
    return None, None
  by_turn = {}
  for f in files:  # sorted by time, so the last frame of a micro-turn wins
    try:
      ms = int(f.stem)
    except ValueError as e:
      raise ConversionError(
        f"conversation {conv_id!r}: frame {f.name} must be named by its time in ms (e.g. 000400.npy)"
      ) from e
    by_turn[record.turn_of(ms / 1000.0)] = f
  images = [_read_image(by_turn[k]) for k in sorted(by_turn)]
  shapes = {im.shape for im in images}
  if len(shapes) != 1 or images[0].ndim != 3 or images[0].shape[-1] != 3 or images[0].dtype != np.uint8:
    raise ConversionError(
      f"conversation {conv_id!r}: frames must all be uint8 [H, W, 3] of one size, got {sorted(map(str, shapes))}"
    )
  return np.stack(images), np.array(sorted(by_turn), np.int32)


def _events(tr: dict, conv_id: str) -> list[record.Event]:
  # The user's spoken words are not events: what the user says reaches the model as audio only
  # (their timings become the listening target, ``_user_words``). Typed text is an input event.
  events = [
    record.Event("model_text", float(w["start"]), float(w["end"]), str(w["word"]) + " ") for w in tr.get("model", [])
  ]
  for t in tr.get("typed", []):
    events.append(record.Event("user_text", float(t["start"]), float(t["end"]), str(t["text"])))
  for e in tr.get("events", []):
    if e.get("type") not in record.EVENT_KINDS:
      raise ConversionError(
        f"conversation {conv_id!r}: event type {e.get('type')!r} is not one of {record.EVENT_KINDS}"
      )
    events.append(record.Event(e["type"], float(e["start"]), float(e["end"]), str(e["text"])))
  return sorted(events, key=lambda ev: (ev.start, ev.kind))


def _user_words(tr: dict, conv_id: str, user_seconds: float) -> list[list]:
  """``meta["user_words"]``: [start, end, word] of each word the user says, inside the user's audio."""
  words = []
  for w in tr.get("user", []):
    start, end, word = float(w["start"]), float(w["end"]), str(w["word"])
    if not 0 <= start <= end <= user_seconds + 1e-6:
      raise ConversionError(
        f"conversation {conv_id!r}: user word {word!r} at [{start}, {end}] s lies outside its audio "
        f"(user.wav is {user_seconds:.3f} s)"
      )
    words.append([start, end, word])
  return words


def load_conversation(folder, stats: dict | None = None) -> record.Conversation:
  """One conversation folder as a validated Conversation."""
  folder, stats = Path(folder), stats if stats is not None else {}
  tr = json.loads((folder / "transcript.json").read_text())
  conv_id = str(tr.get("id", folder.name))
  if not (folder / "user.wav").exists():
    raise ConversionError(f"conversation {conv_id!r}: missing user.wav in {folder}")
  user = _load_audio(folder / "user.wav", stats)
  model = _load_audio(folder / "model.wav", stats) if (folder / "model.wav").exists() else np.zeros(0, np.int16)
  frames, frame_turns = _load_frames(folder / "frames", conv_id) if (folder / "frames").is_dir() else (None, None)
  conv = record.Conversation(
    id=conv_id,
    user_audio=user,
    model_audio=model,
    events=_events(tr, conv_id),
    frames=frames,
    frame_turns=frame_turns,
    meta=dict(tr.get("meta", {}))
    | {"source_dir": folder.name, "user_words": _user_words(tr, conv_id, len(user) / SAMPLE_RATE)},
  )
  if frame_turns is not None and frame_turns[-1] >= conv.num_turns:
    raise ConversionError(
      f"conversation {conv_id!r}: frame at micro-turn {frame_turns[-1]} is past the audio's {conv.num_turns} turns"
    )
  conv.labels = {k: np.asarray(v, np.int32) for k, v in tr.get("labels", {}).items()}
  record.validate(conv)
  return conv


def convert(input_dir, output_dir, split: str = "train", records_per_shard: int = 1024, progress: bool = True) -> dict:
  """Convert every conversation folder under ``input_dir`` into ``split`` of ``output_dir``; returns counts."""
  dirs = conversation_dirs(input_dir)
  stats = {"conversations": len(dirs), "resampled": 0}
  convs = (load_conversation(d, stats) for d in dirs)
  if progress:
    from tqdm import tqdm

    convs = tqdm(convs, total=len(dirs), desc=f"convert {split}", unit="conv")
  written = shards.write_split(output_dir, split, convs, records_per_shard)
  stats["shards"] = len(written)
  return stats
