r"""Seams and clipping of the model's voice as the live server renders it, tick by tick.

  python benchmarks/vocoder.py [--seconds 12]

The model's voice (espeak-ng, ``speech.MODEL_VOICE``) saying a few sentences is
turned into the ``audio_out`` stream's log-mel frames (experiments/tiny.py: 32
channels, 50 ms hop), then rendered back to audio three ways:

- ``per-tick GL``: what the server did before: an independent Griffin-Lim for
  each micro-turn's 4 frames (random starting phase each tick);
- ``streaming GL``: ``audio.stream_waveforms``, which carries the last frames
  and their emitted samples from tick to tick (what the server does now);
- ``offline GL``: one Griffin-Lim over the whole utterance (a reference no live
  server can run).

Seam figure: spectral flux (L2 change of the log-magnitude spectrum between
consecutive 10 ms frames) of frames that straddle a tick boundary, over the
flux of frames inside ticks, in voiced stretches only. 1.0 means the boundaries
are as smooth as the rest; the input speech itself scores ~1.0. Peak: the
largest |sample|; clipped: samples at full scale.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from data_pipeline import audio, speech
from data_pipeline.record import SAMPLE_RATE, SAMPLES_PER_TURN
from interaction import config as config_lib
from interaction import layout, testing

SENTENCES = (
  "hello there, what can i do for you today",
  "the answer is forty two, let me check that again",
  "look, a green ball and a blue box",
  "sol luna arbol casa agua fuego",
  "ok, i will stop talking now",
)


def mel_cfg() -> audio.MelConfig:
  """The tiny experiment's ``audio_out`` mel settings (what the live server renders)."""
  c = testing.experiment_config()
  order = config_lib.streams_from_config(c.streams, c.stream_order)
  return audio.mel_config(layout.find_stream(order, "audio", "out"))


def speech_track(seconds: float) -> np.ndarray:
  parts, total = [], 0
  while total < seconds * SAMPLE_RATE:
    for s in SENTENCES:
      x, _ = speech.say(s.replace(",", "").split(), speech.MODEL_VOICE)
      parts += [x * np.float32(0.6 / max(np.abs(x).max(), 1e-6)), np.zeros(SAMPLE_RATE // 4, np.float32)]
      total += len(x) + SAMPLE_RATE // 4
  y = np.concatenate(parts)
  return y[: len(y) // SAMPLES_PER_TURN * SAMPLES_PER_TURN]


def per_tick(cfg, mel, iters: int) -> np.ndarray:
  ticks = mel.reshape(-1, 4, mel.shape[-1])
  return np.concatenate([audio.waveforms(cfg, t[None], iters=iters, mel_iters=2 * iters)[0] for t in ticks])


def streaming(cfg, mel, iters: int) -> np.ndarray:
  state, out = audio.VocoderState.silence(cfg, 1), []
  for t in mel.reshape(-1, 4, mel.shape[-1]):
    y, state = audio.stream_waveforms(cfg, t[None], state, iters=iters, mel_iters=2 * iters)
    out.append(y[0])
  return np.concatenate(out)


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--seconds", type=float, default=12.0, help="length of the rendered speech")
  p.add_argument("--iters", type=int, default=8, help="Griffin-Lim iterations per tick (streaming and per-tick)")
  args = p.parse_args(argv)
  cfg = mel_cfg()
  x = speech_track(args.seconds)
  mel = audio.log_mel(cfg, x)
  rows = []
  for name, fn in (
    ("input speech", lambda: x),
    ("per-tick GL (before)", lambda: per_tick(cfg, mel, args.iters)),
    ("streaming GL (server)", lambda: streaming(cfg, mel, args.iters)),
    ("offline GL (reference)", lambda: audio.waveform(cfg, mel, iters=32)),
  ):
    t0 = time.perf_counter()
    y = fn()
    ms = (time.perf_counter() - t0) / (len(x) / SAMPLES_PER_TURN) * 1e3
    clipped = int(np.sum(np.abs(y) >= 32767 / 32768))
    rows.append(
      dict(
        vocoder=name,
        flux_ratio=round(audio.seam_flux_ratio(y, SAMPLES_PER_TURN), 3),
        peak=round(float(np.abs(y).max()), 4),
      )
    )
    rows[-1] |= {"clipped": clipped, "ms_per_tick": round(ms, 2)}
  print(f"{len(x) / SAMPLE_RATE:.1f} s of the model's voice, {args.iters} Griffin-Lim iterations per tick")
  print("seam = spectral flux across tick boundaries / inside ticks (1.0: seamless); clipped = samples at full scale")
  print(f"{'vocoder':<24}{'boundary/inside flux':>22}{'peak':>8}{'clipped':>9}{'ms/tick':>9}")
  for r in rows:
    print(f"{r['vocoder']:<24}{r['flux_ratio']:>22.3f}{r['peak']:>8.3f}{r['clipped']:>9d}{r['ms_per_tick']:>9.2f}")
  print(json.dumps({"seconds": round(len(x) / SAMPLE_RATE, 2), "iters": args.iters, "rows": rows}))


if __name__ == "__main__":
  main()
