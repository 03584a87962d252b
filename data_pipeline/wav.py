"""WAV input/output and resampling to 16 kHz, with numpy only.

Reads RIFF/WAVE files with integer PCM (8/16/24/32 bit) or 32/64-bit float
samples. Several channels are averaged to mono. Other sample rates are resampled
with a Kaiser-windowed sinc (band-limited to the lower of the two Nyquist rates).
"""

from __future__ import annotations

import math
import struct
from pathlib import Path

import numpy as np

_PCM, _FLOAT, _EXTENSIBLE = 1, 3, 0xFFFE


class WavError(ValueError):
  """A WAV file this module cannot read."""


def read_wav(path) -> tuple[np.ndarray, int]:
  """(float32 mono samples in [-1, 1], sample rate) of a WAV file."""
  path = Path(path)
  data = path.read_bytes()
  if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
    raise WavError(f"{path}: not a RIFF/WAVE file")
  fmt, pcm, pos = None, None, 12
  while pos + 8 <= len(data):
    cid, size = data[pos : pos + 4], struct.unpack("<I", data[pos + 4 : pos + 8])[0]
    body = data[pos + 8 : pos + 8 + size]
    if cid == b"fmt ":
      fmt = struct.unpack("<HHIIHH", body[:16])
      if fmt[0] == _EXTENSIBLE and len(body) >= 26:
        fmt = (struct.unpack("<H", body[24:26])[0],) + fmt[1:]
    elif cid == b"data":
      pcm = body
    pos += 8 + size + (size & 1)
  if fmt is None or pcm is None:
    raise WavError(f"{path}: missing fmt or data chunk")
  code, channels, rate, _, _, bits = fmt
  if code == _PCM and bits in (8, 16, 32):
    x = np.frombuffer(pcm[: len(pcm) // (bits // 8) * (bits // 8)], {8: np.uint8, 16: "<i2", 32: "<i4"}[bits])
    x = (x.astype(np.float32) - 128.0) / 128.0 if bits == 8 else x.astype(np.float32) / float(2 ** (bits - 1))
  elif code == _PCM and bits == 24:
    b = np.frombuffer(pcm[: len(pcm) // 3 * 3], np.uint8).reshape(-1, 3).astype(np.int32)
    v = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
    x = (np.where(v >= 1 << 23, v - (1 << 24), v)).astype(np.float32) / float(1 << 23)
  elif code == _FLOAT and bits in (32, 64):
    x = np.frombuffer(pcm[: len(pcm) // (bits // 8) * (bits // 8)], "<f4" if bits == 32 else "<f8").astype(np.float32)
  else:
    raise WavError(f"{path}: unsupported WAV encoding (format {code}, {bits} bit)")
  x = x[: len(x) // channels * channels].reshape(-1, channels).mean(axis=1)
  return x.astype(np.float32), rate


def write_wav(path, samples: np.ndarray, rate: int) -> None:
  """Write float samples in [-1, 1] (or int16) as 16-bit mono PCM."""
  x = np.asarray(samples)
  if x.dtype != np.int16:
    x = to_int16(x)
  data = x.astype("<i2").tobytes()
  header = b"RIFF" + struct.pack("<I", 36 + len(data)) + b"WAVE"
  header += b"fmt " + struct.pack("<IHHIIHH", 16, _PCM, 1, rate, rate * 2, 2, 16)
  Path(path).write_bytes(header + b"data" + struct.pack("<I", len(data)) + data)


def to_int16(x: np.ndarray) -> np.ndarray:
  """Float samples in [-1, 1] to int16 PCM, clipping."""
  return np.clip(np.round(np.asarray(x, np.float32) * 32767.0), -32768, 32767).astype(np.int16)


def resample(x: np.ndarray, rate_in: int, rate_out: int, half_taps: int = 32, beta: float = 8.0) -> np.ndarray:
  """Band-limited resampling by a Kaiser-windowed sinc with ``2 * half_taps`` taps per output sample."""
  if rate_in == rate_out:
    return np.asarray(x, np.float32)
  x = np.asarray(x, np.float32)
  g = math.gcd(rate_in, rate_out)
  up, down = rate_out // g, rate_in // g
  n_out = len(x) * up // down
  # Downsampling must low-pass at the output's Nyquist rate, so the kernel is stretched.
  cutoff = min(1.0, rate_out / rate_in)
  width = int(math.ceil(half_taps / cutoff))
  k = np.arange(-width + 1, width + 1)
  # Output n sits at input position n * down / up: only ``up`` distinct fractional phases exist,
  # so the kernel is tabulated once per phase.
  d = np.arange(up)[:, None] / up - k[None, :]
  r = np.clip(d / width, -1.0, 1.0)
  table = (cutoff * np.sinc(cutoff * d) * np.i0(beta * np.sqrt(1.0 - r * r)) / np.i0(beta)).astype(np.float32)
  pad = np.concatenate([np.zeros(width, np.float32), x, np.zeros(width + 1, np.float32)])
  out = np.empty(n_out, np.float32)
  for lo in range(0, n_out, 8192):  # chunks bound the [chunk, taps] temporary
    n = np.arange(lo, min(n_out, lo + 8192), dtype=np.int64)
    base, phase = (n * down) // up, (n * down) % up
    out[lo : lo + len(n)] = np.einsum("nk,nk->n", pad[base[:, None] + k[None, :] + width], table[phase])
  return out
