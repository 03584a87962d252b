"""WAV input/output and resampling to 16 kHz, on scipy (``scipy.io.wavfile``, ``scipy.signal.resample_poly``).

Reads integer PCM (8 to 64 bit) and 32/64-bit float WAVs, plain or WAVE_FORMAT_EXTENSIBLE;
several channels are averaged to mono. Writes 16-bit mono PCM.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
from scipy import signal
from scipy.io import wavfile


class WavError(ValueError):
  """A WAV file this module cannot read."""


def read_wav(path) -> tuple[np.ndarray, int]:
  """(float32 mono samples in [-1, 1], sample rate) of a WAV file."""
  path = Path(path)
  try:
    with warnings.catch_warnings():
      # Chunks other than fmt/data (LIST, fact, ...) are skipped with a warning: they hold no samples.
      warnings.simplefilter("ignore", wavfile.WavFileWarning)
      rate, x = wavfile.read(path)
  except (ValueError, EOFError) as e:  # scipy's errors for a corrupt or unsupported file
    raise WavError(f"{path}: not a readable WAV file ({e}); convert it to PCM or float WAV") from None
  if x.dtype.kind == "f":
    x = x.astype(np.float32)
  elif x.dtype.kind in "iu":
    # scipy returns integer samples left-justified in the smallest int type (24-bit in int32's top bits),
    # so the full scale is the container's, and 8-bit and narrower PCM is unsigned around its midpoint.
    half = float(2 ** (8 * x.dtype.itemsize - 1))
    x = (x.astype(np.float64) - (half if x.dtype.kind == "u" else 0.0)) / half
  else:
    raise WavError(f"{path}: unsupported WAV sample type {x.dtype}")
  if x.ndim == 2:
    x = x.mean(axis=1)
  return np.asarray(x, np.float32), int(rate)


def write_wav(path, samples: np.ndarray, rate: int) -> None:
  """Write float samples in [-1, 1] (or int16) as 16-bit mono PCM."""
  x = np.asarray(samples)
  if x.dtype != np.int16:
    x = to_int16(x)
  wavfile.write(Path(path), int(rate), x.astype("<i2").reshape(-1))


def to_int16(x: np.ndarray) -> np.ndarray:
  """Float samples in [-1, 1] to int16 PCM, clipping; the inverse of ``read_wav``'s scale (x / 32768).

  The same 32768 both ways, so a 16-bit WAV converted keeps every sample bit for bit.
  """
  return np.clip(np.round(np.asarray(x, np.float32) * 32768.0), -32768, 32767).astype(np.int16)


def resample(x: np.ndarray, rate_in: int, rate_out: int) -> np.ndarray:
  """Band-limited resampling (polyphase, Kaiser-windowed FIR): ``len(x) * rate_out // rate_in`` float32 samples."""
  x = np.asarray(x, np.float32)
  if rate_in == rate_out:
    return x
  g = math.gcd(rate_in, rate_out)
  up, down = rate_out // g, rate_in // g
  n_out = len(x) * up // down
  if not len(x):
    return np.zeros(0, np.float32)
  # resample_poly returns ceil(len * up / down) samples; the floor keeps every output inside the input's span.
  return signal.resample_poly(x, up, down).astype(np.float32)[:n_out]
