"""dMel featurizer, Griffin-Lim inverse, WAV io and resampling."""

import struct

import numpy as np
import pytest

from data_pipeline import audio, wav
from data_pipeline.record import SAMPLE_RATE, SAMPLES_PER_TURN, turn_of
from data_pipeline.testing import tiny_config, tone


def tiny_audio_spec():
  return next(s for s in tiny_config().model.streams if s.kind == "audio")


def test_fixed_frames_per_turn_and_silence_value():
  spec = tiny_audio_spec()
  cfg = audio.mel_config(spec)
  assert cfg.hop * spec.slots == SAMPLES_PER_TURN
  x = np.zeros(7 * SAMPLES_PER_TURN, np.float32)
  m = audio.log_mel(cfg, x)
  assert m.shape == (7 * spec.slots, spec.mel_channels) and m.dtype == np.float32
  np.testing.assert_array_equal(m, audio.silence_value(cfg))
  assert audio.silence_value(cfg) == pytest.approx(spec.mel_min)
  assert m.min() >= spec.mel_min and m.max() <= spec.mel_max


@pytest.mark.parametrize("t", [0.6, 0.13, 0.79, 1.0, 1.39])
def test_onset_lands_in_its_micro_turn(t):
  spec = tiny_audio_spec()
  cfg = audio.mel_config(spec)
  x = np.zeros(2 * SAMPLE_RATE, np.float32)
  a = int(round(t * SAMPLE_RATE))
  x[a : a + 1600] = tone(0.1)
  m = audio.log_mel(cfg, x).reshape(-1, spec.slots, spec.mel_channels)
  loud = np.flatnonzero(m.max(axis=(1, 2)) > spec.mel_min + 1.0)
  assert loud[0] == turn_of(t) == int(np.floor(round(t * SAMPLE_RATE) / SAMPLES_PER_TURN))


def test_window_featurization_equals_whole_stream():
  """Causal frames: featurizing turns [k, k + n) alone equals slicing the whole conversation's features."""
  spec = tiny_audio_spec()
  cfg = audio.mel_config(spec)
  x = np.random.default_rng(0).normal(0, 0.05, 3 * SAMPLE_RATE).astype(np.float32)
  whole = audio.log_mel(cfg, x)
  part = audio.log_mel(cfg, x, start=5 * SAMPLES_PER_TURN, num_frames=4 * spec.slots)
  np.testing.assert_array_equal(part, whole[5 * spec.slots : 9 * spec.slots])


def test_griffin_lim_inverts_log_mel():
  spec = tiny_audio_spec()
  cfg = audio.mel_config(spec)
  x = np.concatenate(
    [np.zeros(1600, np.float32), tone(0.6, 440.0, 0.1) + tone(0.6, 1500.0, 0.05), np.zeros(1600, np.float32)]
  )
  m = audio.log_mel(cfg, x)
  y = audio.waveform(cfg, m)
  assert y.shape == (len(m) * cfg.hop,) and y.dtype == np.float32
  m2 = audio.log_mel(cfg, y)
  active = m > spec.mel_min + 3.0
  assert np.abs(m2 - m)[active].mean() < 0.3
  # Through dMel codes too: the vocoder path the server uses.
  codes = audio.quantize(m, spec.mel_levels, spec.mel_min, spec.mel_max)
  assert codes.min() >= 0 and codes.max() < spec.mel_levels
  back = audio.dequantize(codes, spec.mel_levels, spec.mel_min, spec.mel_max)
  assert np.abs(back - m).max() <= (spec.mel_max - spec.mel_min) / (spec.mel_levels - 1) / 2 + 1e-5
  assert np.abs(audio.log_mel(cfg, audio.waveform(cfg, back)) - m)[active].mean() < 0.6


def test_slots_must_divide_the_micro_turn():
  spec = tiny_audio_spec()
  import dataclasses

  with pytest.raises(ValueError, match="do not divide"):
    audio.mel_config(dataclasses.replace(spec, slots=7))


def test_wav_roundtrip_and_resampling(tmp_path):
  x = tone(0.5, 1000.0, 0.5)
  wav.write_wav(tmp_path / "a.wav", x, SAMPLE_RATE)
  y, rate = wav.read_wav(tmp_path / "a.wav")
  assert rate == SAMPLE_RATE and np.abs(y - x).max() < 1e-4
  t = np.arange(22050) / 22050
  wav.write_wav(tmp_path / "b.wav", 0.5 * np.sin(2 * np.pi * 1000.0 * t), 22050)
  z, rate = wav.read_wav(tmp_path / "b.wav")
  r = wav.resample(z, rate, SAMPLE_RATE)
  assert len(r) == SAMPLE_RATE
  spectrum = np.abs(np.fft.rfft(r * np.hanning(len(r))))
  assert abs(np.argmax(spectrum) * SAMPLE_RATE / len(r) - 1000.0) < 2.0
  # Energy preserved away from the edges, nothing aliased above 8 kHz is possible at 16 kHz.
  assert np.std(r[1000:-1000]) == pytest.approx(0.5 / np.sqrt(2), rel=0.02)


@pytest.mark.parametrize("dtype", ["uint8", "int16", "int24", "int32", "float32", "float64"])
def test_wav_reads_every_sample_format_to_float_mono(tmp_path, dtype):
  from scipy.io import wavfile

  rng = np.random.default_rng(0)
  stereo = rng.uniform(-0.9, 0.9, (500, 2))
  step = {"uint8": 2**-7, "int16": 2**-15, "int24": 2**-23, "int32": 2**-31}.get(dtype, 0.0)
  if dtype == "uint8":
    data = np.round(stereo * 128 + 128).astype(np.uint8)
  elif dtype.startswith("int"):
    bits = int(dtype[3:])
    data = np.round(stereo * 2 ** (bits - 1)).astype(np.int32 if bits > 16 else np.int16)
  else:
    data = stereo.astype(dtype)
  path = tmp_path / "x.wav"
  if dtype == "int24":  # scipy writes no 24-bit PCM: pack the little-endian bytes by hand
    body = (data.astype("<i4").view(np.uint8).reshape(-1, 4)[:, :3]).tobytes()
    fmt = struct.pack("<HHIIHH", 1, 2, 8000, 8000 * 6, 6, 24)
    riff = b"WAVE" + b"fmt " + struct.pack("<I", 16) + fmt + b"data" + struct.pack("<I", len(body)) + body
    path.write_bytes(b"RIFF" + struct.pack("<I", len(riff)) + riff)
  else:
    wavfile.write(path, 8000, data)
  got, rate = wav.read_wav(path)
  assert rate == 8000 and got.dtype == np.float32 and got.shape == (500,)
  np.testing.assert_allclose(got, stereo.mean(axis=1), atol=step + 1e-6)


def test_wav_rejects_garbage(tmp_path):
  (tmp_path / "x.wav").write_bytes(b"not a wav file at all")
  with pytest.raises(wav.WavError, match="x.wav"):
    wav.read_wav(tmp_path / "x.wav")


def test_batched_griffin_lim_keeps_signals_independent():
  cfg = audio.mel_config(tiny_audio_spec())
  a = audio.log_mel(cfg, tone(0.2, 440.0, 0.1))
  b, c = audio.log_mel(cfg, tone(0.2, 900.0, 0.2)), audio.log_mel(cfg, np.zeros(3200, np.float32))
  one = audio.waveforms(cfg, np.stack([a, b]), iters=4, mel_iters=8)
  two = audio.waveforms(cfg, np.stack([a, c]), iters=4, mel_iters=8)
  assert one.shape == (2, len(a) * cfg.hop)
  np.testing.assert_array_equal(one[0], two[0])  # a row never depends on its neighbours
  np.testing.assert_array_equal(one[0], audio.waveform(cfg, a, iters=4, mel_iters=8))
  assert np.abs(audio.log_mel(cfg, one[1]) - b)[b > cfg.mel_min + 3].mean() < 1.0


def _chirp_mel(cfg, seconds: float = 2.4, level: float = 2.0):
  """A loud gliding two-tone (well over full scale after Griffin-Lim) as log-mel frames."""
  t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
  x = level * (np.sin(2 * np.pi * (300 * t + 80 * t**2)) + 0.5 * np.sin(2 * np.pi * 1250 * t))
  return audio.log_mel(cfg, x.astype(np.float32))


def _stream(cfg, mel, frames_per_tick: int, iters: int = 4):
  state, out = audio.VocoderState.silence(cfg, 1), []
  for chunk in mel.reshape(-1, frames_per_tick, mel.shape[-1]):
    y, state = audio.stream_waveforms(cfg, chunk[None], state, iters=iters, mel_iters=2 * iters)
    out.append(y[0])
  return np.concatenate(out)


def test_streaming_vocoder_has_no_seams_at_ticks_and_never_clips():
  spec = tiny_audio_spec()
  cfg = audio.mel_config(spec)
  mel = _chirp_mel(cfg)
  streamed = _stream(cfg, mel, spec.slots)
  per_tick = np.concatenate([
    audio.waveforms(cfg, t[None], iters=4, mel_iters=8)[0] for t in mel.reshape(-1, spec.slots, mel.shape[-1])
  ])  # fmt: skip
  assert streamed.shape == per_tick.shape == (len(mel) * cfg.hop,)
  assert np.abs(streamed).max() < 0.98  # the soft limiter: nothing reaches full scale
  assert np.sum(np.abs(per_tick) >= 1.0) > 0  # the same loud input does clip tick by tick (so this can fail)
  seams = audio.seam_flux_ratio(streamed, SAMPLES_PER_TURN)
  assert seams < 1.15 < audio.seam_flux_ratio(per_tick, SAMPLES_PER_TURN), seams
  # The voice is still the input: the streamed audio's mel is near the one it was rendered from
  # (one hop late: the streaming vocoder emits a hop once the next frame's overlap is known).
  back = audio.log_mel(cfg, np.concatenate([streamed[cfg.hop :], np.zeros(cfg.hop, np.float32)]))
  loud = mel > cfg.mel_min + 3
  assert np.abs(back - mel)[loud].mean() < 1.5


def test_streaming_vocoder_rows_are_independent_and_silence_stays_silent():
  spec = tiny_audio_spec()
  cfg = audio.mel_config(spec)
  mel = _chirp_mel(cfg, seconds=0.4)[: spec.slots]
  quiet = np.full_like(mel, audio.silence_value(cfg))
  both, _ = audio.stream_waveforms(cfg, np.stack([mel, quiet]), audio.VocoderState.silence(cfg, 2), iters=4)
  one, _ = audio.stream_waveforms(cfg, mel[None], audio.VocoderState.silence(cfg, 1), iters=4)
  np.testing.assert_allclose(both[0], one[0], atol=1e-6)
  np.testing.assert_array_equal(both[1], 0.0)
