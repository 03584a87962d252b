"""Speech and video for the load tool's clients: espeak-ng sentences, a voiced synthetic signal, JPEG frames."""

from __future__ import annotations

import io
import pathlib
import subprocess

import numpy as np
from PIL import Image

from serving.protocol import JPEG, SAMPLE_RATE

PAUSE_S = 0.8  # silence between looped utterances: turn-taking pauses
SENTENCES = (
  "Hello, can you hear me? I would like to book a table for two tomorrow evening.",
  "What is the weather going to be like this weekend in the mountains?",
  "Could you add seventeen and twenty five for me, and then tell me the result?",
  "I was thinking about learning to play the piano, but I am not sure where to start.",
  "Sorry, let me say that again. The meeting moved to three thirty on Thursday.",
  "Thanks, that was really helpful. One more question before you go.",
)


def synthetic_speech(seconds: float = 12.0, seed: int = 0) -> np.ndarray:
  """A voiced stand-in for speech: harmonics of a gliding pitch, syllable and phrase envelopes (float32)."""
  rng = np.random.default_rng(seed)
  t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
  f0 = 140 + 35 * np.sin(2 * np.pi * 0.35 * t) + 10 * np.sin(2 * np.pi * 2.1 * t)
  phase = 2 * np.pi * np.cumsum(f0) / SAMPLE_RATE
  voice = sum(np.sin(k * phase) / k for k in range(1, 16))
  syllables = np.sqrt(np.clip(np.sin(2 * np.pi * 4.0 * t), 0, None))
  phrases = (np.sin(2 * np.pi * t / 4.0) > -0.4).astype(np.float32)  # ~3 s spoken, ~1 s pause
  x = 0.15 * voice * syllables * phrases + 0.002 * rng.standard_normal(len(t))
  return x.astype(np.float32)


def espeak_sentences(directory: pathlib.Path) -> list[pathlib.Path]:
  files = []
  for i, sentence in enumerate(SENTENCES):
    path = directory / f"sentence{i}.wav"
    pitch, speed = 35 + 10 * (i % 4), 150 + 10 * (i % 3)
    cmd = ["espeak-ng", "-v", "en-us", "-p", str(pitch), "-s", str(speed), "-w", str(path), sentence]
    subprocess.run(cmd, check=True, capture_output=True, timeout=60)
    files.append(path)
  return files


def video_frames(count: int = 10, size: tuple[int, int] = (64, 48)) -> list[bytes]:
  """``count`` small JPEGs of a moving pattern, as ``0x02`` + JPEG frames (encoded once, sent in a loop)."""
  w, h = size
  yy, xx = np.mgrid[0:h, 0:w]
  out = []
  for i in range(count):
    rgb = np.stack([(xx * 4 + i * 20) % 256, (yy * 5 + i * 10) % 256, ((xx + yy) * 2 + i * 30) % 256], -1)
    buf = io.BytesIO()
    Image.fromarray(rgb.astype(np.uint8)).save(buf, format="JPEG", quality=80)
    out.append(bytes([JPEG]) + buf.getvalue())
  return out
