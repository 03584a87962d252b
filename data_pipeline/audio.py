"""dMel featurizer and its inverse (Griffin-Lim), sized by an audio StreamSpec.

Each micro-turn gets exactly ``spec.slots`` frames, so the hop is
``3200 / slots`` samples (50 ms for 4 slots). Frames are *causal*: frame ``i``
covers the ``win = 2 * hop`` samples that end at ``(i + 1) * hop``, so a frame
never sees audio from a later micro-turn. This is what lets a sound starting at
``t`` first show in micro-turn floor(t / 0.2), and lets the server featurize a
live stream one micro-turn at a time with ``hop`` samples of carried context.

Value: natural log of mel power, floored at 1e-5 and clipped to
``[spec.mel_min, spec.mel_max]``. Power is ``|rfft(hann * frame)|^2 / sum(hann^2)``
(white noise of variance s^2 has power s^2 in every FFT bin) through ``mel_channels``
triangular HTK-mel filters from 0 Hz to 8 kHz. The model quantizes these values
to ``mel_levels`` levels; ``quantize``/``dequantize`` here are the reference for that.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from data_pipeline.record import SAMPLE_RATE, SAMPLES_PER_TURN
from interaction import layout

POWER_FLOOR = 1e-5


@dataclasses.dataclass(frozen=True)
class MelConfig:
  """STFT and mel parameters derived from an audio StreamSpec."""

  hop: int
  channels: int
  mel_min: float
  mel_max: float
  fmin: float = 0.0
  fmax: float = SAMPLE_RATE / 2

  @property
  def win(self) -> int:
    return 2 * self.hop

  @property
  def n_fft(self) -> int:
    return 1 << (self.win - 1).bit_length()


def mel_config(spec: layout.StreamSpec) -> MelConfig:
  """MelConfig of an audio stream: ``spec.slots`` frames per 200 ms micro-turn."""
  if spec.kind != "audio":
    raise ValueError(f"stream {spec.name!r} is not an audio stream")
  if SAMPLES_PER_TURN % spec.slots:
    raise ValueError(
      f"audio stream {spec.name!r}: {spec.slots} slots do not divide {SAMPLES_PER_TURN} samples per micro-turn"
    )
  return MelConfig(
    hop=SAMPLES_PER_TURN // spec.slots, channels=spec.mel_channels, mel_min=spec.mel_min, mel_max=spec.mel_max
  )


def _hz_to_mel(f):
  return 2595.0 * np.log10(1.0 + np.asarray(f, np.float64) / 700.0)


def _mel_to_hz(m):
  return 700.0 * (10.0 ** (np.asarray(m, np.float64) / 2595.0) - 1.0)


@functools.lru_cache(maxsize=32)
def _filterbank(cfg: MelConfig) -> np.ndarray:
  """Triangular mel filters, float32 [channels, n_fft // 2 + 1], peak 1."""
  freqs = np.fft.rfftfreq(cfg.n_fft, 1.0 / SAMPLE_RATE)
  edges = _mel_to_hz(np.linspace(_hz_to_mel(cfg.fmin), _hz_to_mel(cfg.fmax), cfg.channels + 2))
  lo, mid, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]
  up = (freqs[None] - lo) / np.maximum(mid - lo, 1e-9)
  down = (hi - freqs[None]) / np.maximum(hi - mid, 1e-9)
  fb = np.maximum(0.0, np.minimum(up, down))
  # Low channels can be narrower than one FFT bin; give them their nearest bin so none is dead.
  empty = fb.sum(axis=1) == 0
  fb[empty, np.argmin(np.abs(freqs[None] - mid[empty]), axis=1)] = 1.0
  return fb.astype(np.float32)


@functools.lru_cache(maxsize=32)
def _window(win: int) -> np.ndarray:
  return (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(win) / win)).astype(np.float32)  # periodic Hann


def _frames(x: np.ndarray, start: int, num_frames: int, cfg: MelConfig) -> np.ndarray:
  """[num_frames, win] causal frames; frame i ends at sample ``start + (i + 1) * hop``; zeros outside x."""
  lo, hi = start + cfg.hop - cfg.win, start + num_frames * cfg.hop
  seg = np.zeros(hi - lo, np.float32)
  a, b = max(lo, 0), min(hi, len(x))
  if b > a:
    seg[a - lo : b - lo] = x[a:b]
  return np.lib.stride_tricks.sliding_window_view(seg, cfg.win)[:: cfg.hop][:num_frames]


def log_mel(cfg: MelConfig, x: np.ndarray, start: int = 0, num_frames: int | None = None) -> np.ndarray:
  """float32 [num_frames, channels] log-mel of float audio ``x`` from sample ``start`` (a multiple of hop)."""
  if num_frames is None:
    num_frames = -(-(len(x) - start) // cfg.hop)
  w = _window(cfg.win)
  spec = np.fft.rfft(_frames(np.asarray(x, np.float32), start, num_frames, cfg) * w, n=cfg.n_fft, axis=-1)
  power = (spec.real**2 + spec.imag**2).astype(np.float32) / np.float32(np.sum(w * w))
  # einsum, not BLAS: a frame's value must not depend on how many frames are computed together.
  mel = np.einsum("fk,ck->fc", power, _filterbank(cfg))
  return np.clip(np.log(np.maximum(mel, POWER_FLOOR)), cfg.mel_min, cfg.mel_max).astype(np.float32)


def silence_value(cfg: MelConfig) -> float:
  """The log-mel value of digital silence (every channel, every frame)."""
  return float(np.clip(np.log(np.float32(POWER_FLOOR)), cfg.mel_min, cfg.mel_max))


def quantize(logmel: np.ndarray, levels: int, lo: float, hi: float) -> np.ndarray:
  """dMel codes: int32 in [0, levels), uniform over [lo, hi], rounding to the nearest level."""
  q = np.round((np.clip(logmel, lo, hi) - lo) / (hi - lo) * (levels - 1))
  return q.astype(np.int32)


def dequantize(codes: np.ndarray, levels: int, lo: float, hi: float) -> np.ndarray:
  """Log-mel values of dMel codes (the level centres)."""
  return (lo + np.asarray(codes, np.float32) * np.float32((hi - lo) / (levels - 1))).astype(np.float32)


def _stft(y_BX: np.ndarray, num_frames: int, cfg: MelConfig) -> np.ndarray:
  """[B, num_frames, n_fft // 2 + 1] spectra of the causal 2-hop frames of each row of ``y_BX``."""
  b = y_BX.shape[0]
  padded = np.zeros((b, (num_frames + 1) * cfg.hop), np.float32)  # one hop of zeros before sample 0
  padded[:, cfg.hop :] = y_BX[:, : num_frames * cfg.hop]
  return _hop_frames(padded, cfg)  # frame i ends at sample (i + 1) * hop


def _istft(spec_BFK: np.ndarray, cfg: MelConfig) -> np.ndarray:
  """Weighted overlap-add inverse of ``_stft`` (frames of 2 hops), float32 [B, num_frames * hop]."""
  return _hop_overlap_add(spec_BFK, cfg)[:, cfg.hop :]  # frame i spans hops i-1 and i: drop the hop before 0


def waveform(cfg: MelConfig, logmel: np.ndarray, iters: int = 32, mel_iters: int = 50, seed: int = 0) -> np.ndarray:
  """Griffin-Lim vocoder: float32 audio [frames * hop] whose log-mel approximates ``logmel`` [frames, channels]."""
  return waveforms(cfg, np.asarray(logmel)[None], iters, mel_iters, seed)[0]


def _magnitudes(cfg: MelConfig, logmel_BFC: np.ndarray, mel_iters: int) -> np.ndarray:
  """STFT magnitudes [B, F, n_fft // 2 + 1] whose mel projection approximates ``logmel_BFC``.

  Non-negative power whose mel projection matches: multiplicative updates (as in NMF),
  started from each channel's power spread evenly over its filter.
  """
  fb = _filterbank(cfg)
  logmel_BFC = np.asarray(logmel_BFC, np.float32)
  mel = np.exp(logmel_BFC)
  mel = np.where(logmel_BFC <= silence_value(cfg) + 1e-6, 0.0, mel)
  density = mel / np.maximum(fb.sum(axis=1), 1e-9)
  power = density @ (fb / np.maximum(fb.sum(axis=0, keepdims=True), 1e-9)) + 1e-12
  norm = np.maximum(fb.sum(axis=0), 1e-9)
  for _ in range(mel_iters):
    power *= np.einsum("bfc,ck->bfk", mel / np.maximum(np.einsum("bfk,ck->bfc", power, fb), 1e-12), fb) / norm
  return np.sqrt(np.maximum(power, 0.0) * np.sum(_window(cfg.win) ** 2)).astype(np.float32)


def waveforms(
  cfg: MelConfig, logmel_BFC: np.ndarray, iters: int = 32, mel_iters: int = 50, seed: int = 0
) -> np.ndarray:
  """``waveform`` of B independent signals at once (one FFT call per iteration for all): [B, frames * hop]."""
  mag = _magnitudes(cfg, logmel_BFC, mel_iters)
  rng = np.random.default_rng(seed)
  phase = np.exp(2j * np.pi * rng.random(mag.shape)).astype(np.complex64)
  y = _istft(mag * phase, cfg)
  for _ in range(iters):
    spec = _stft(y, mag.shape[1], cfg)
    phase = spec / np.maximum(np.abs(spec), 1e-9)
    y = _istft(mag * phase, cfg)
  return np.clip(y, -1.0, 1.0).astype(np.float32)


@dataclasses.dataclass
class VocoderState:
  """What a streaming vocoder carries from one chunk to the next (one row per stream).

  ``mag`` [B, C, K]: magnitudes of the last C frames; ``y`` [B, (C + 1) * hop]: the signal of the
  hops they cover, the last of which is not yet emitted (it still lacks the next frame's overlap).
  """

  mag: np.ndarray
  y: np.ndarray

  @classmethod
  def silence(cls, cfg: MelConfig, batch: int, context: int = 4) -> VocoderState:
    k = cfg.n_fft // 2 + 1
    return cls(np.zeros((batch, context, k), np.float32), np.zeros((batch, (context + 1) * cfg.hop), np.float32))


def soft_limit(x: np.ndarray, ceiling: float = 0.98) -> np.ndarray:
  """Identity below ``ceiling / 2``, then a tanh knee that never reaches ``ceiling`` (no clipped samples)."""
  knee = ceiling / 2
  over = np.abs(x) > knee
  soft = np.sign(x) * (knee + (ceiling - knee) * np.tanh((np.abs(x) - knee) / (ceiling - knee)))
  return np.where(over, soft, x).astype(np.float32)


def _hop_frames(y_BX: np.ndarray, cfg: MelConfig) -> np.ndarray:
  """Spectra of the 2-hop frames of ``y_BX`` (H hops -> H - 1 frames; frame k = hops k, k + 1)."""
  b, hops = y_BX.shape[0], y_BX.shape[1] // cfg.hop
  h = y_BX.reshape(b, hops, cfg.hop)
  frames = np.concatenate([h[:, :-1], h[:, 1:]], axis=-1)
  return np.fft.rfft(frames * _window(cfg.win), n=cfg.n_fft, axis=-1)


def _hop_overlap_add(spec_BFK: np.ndarray, cfg: MelConfig) -> np.ndarray:
  """Inverse of ``_hop_frames``: F frames -> F + 1 hops, weighted overlap-add."""
  w = _window(cfg.win)
  frames = np.fft.irfft(spec_BFK, n=cfg.n_fft, axis=-1)[..., : cfg.win] * w
  b, num = frames.shape[:2]
  out = np.zeros((b, num + 1, cfg.hop), np.float32)
  norm = np.zeros((num + 1, cfg.hop), np.float32)
  halves = frames.reshape(b, num, 2, cfg.hop)
  out[:, :num] += halves[:, :, 0]
  out[:, 1:] += halves[:, :, 1]
  norm[:num] += (w * w)[: cfg.hop]
  norm[1:] += (w * w)[cfg.hop :]
  return (out / np.maximum(norm, 1e-3)).reshape(b, -1)


def stream_waveforms(
  cfg: MelConfig,
  logmel_BFC: np.ndarray,
  state: VocoderState,
  *,
  iters: int = 8,
  mel_iters: int = 16,
  seed: int = 0,
  ceiling: float = 0.98,
) -> tuple[np.ndarray, VocoderState]:
  """Griffin-Lim over a stream, one chunk of F frames at a time: ([B, F * hop] audio, next state).

  Each chunk is solved together with the last C frames of the stream, whose emitted samples are
  held fixed, so the new audio continues the old one's phase: no seam at chunk boundaries. The
  output lags the frames by one hop (a hop is final only once the next frame's overlap is known).
  Samples pass a soft limiter below ``ceiling``: nothing clips.
  """
  new = _magnitudes(cfg, logmel_BFC, mel_iters)
  b, f, _ = new.shape
  c = state.mag.shape[1]
  mag = np.concatenate([state.mag, new], axis=1)  # frames covering hops 0 .. C + F
  y0 = np.zeros((b, (c + f + 1) * cfg.hop), np.float32)
  y0[:, : (c + 1) * cfg.hop] = state.y
  fixed = np.arange(y0.shape[1]) < c * cfg.hop  # hops already emitted
  rng = np.random.default_rng(seed)
  noise = np.exp(2j * np.pi * rng.random(mag.shape)).astype(np.complex64)
  y = y0
  for i in range(max(iters, 1)):
    spec = _hop_frames(y, cfg)
    size = np.abs(spec)
    phase = np.where(size > 1e-6, spec / np.maximum(size, 1e-9), noise if i == 0 else 1.0)
    y = np.where(fixed, y0, _hop_overlap_add(mag * phase, cfg))
  out = soft_limit(y[:, c * cfg.hop : (c + f) * cfg.hop], ceiling)
  return out, VocoderState(mag[:, -c:], y[:, -(c + 1) * cfg.hop :].astype(np.float32))


def seam_flux_ratio(y: np.ndarray, period: int, n_fft: int = 512, hop: int = 160) -> float:
  """How audible the seams every ``period`` samples are: 1.0 = no more than anywhere else.

  The mean log-spectral flux (RMS change of the log-magnitude spectrum between consecutive
  ``hop``-spaced frames) of frame pairs whose centres straddle a multiple of ``period``, over that
  of the other pairs, in voiced stretches only (both frames above 5% of the loudest one's energy).
  """
  win = np.hanning(n_fft).astype(np.float32)
  starts = np.arange(0, len(y) - n_fft, hop)
  spec = np.abs(np.fft.rfft(np.stack([y[s : s + n_fft] * win for s in starts]), axis=-1))
  flux = np.sqrt(np.mean(np.diff(np.log(spec + 1e-4), axis=0) ** 2, axis=-1))
  energy = np.sqrt(np.mean(spec**2, axis=-1))
  voiced = (energy[1:] > 0.05 * energy.max()) & (energy[:-1] > 0.05 * energy.max())
  centre = starts + n_fft // 2
  seam = centre[1:] // period != centre[:-1] // period
  return float(flux[seam & voiced].mean() / flux[~seam & voiced].mean())
