"""Real speech from espeak-ng, with word timings from the synthesizer itself.

The ``espeakng-loader`` wheel ships ``libespeak-ng.so`` and its voice data, so this
needs no system package and no network. One process-wide engine is driven through
``ctypes`` in synchronous mode (espeak-ng is not thread-safe: a lock serializes
calls). Audio comes out at 22,050 Hz and is resampled to 16 kHz (polyphase,
scipy). Word boundaries come from espeak-ng's word events (the sample at which
each word starts); a word ends where its sound does (the last sample above a
small threshold before the next word starts).

Voices mix in noise from espeak-ng's random generator and the C library's
``rand()``, both reseeded before every utterance, so a dataset is reproducible from process to process. espeak-ng also
keeps state from one utterance to the next inside a process (its pitch and flutter
phase; re-initializing does not reset it), so an utterance's samples depend
slightly on what the process said before (a few samples of length, the waveform's
phase). A split is reproducible because the generator synthesizes it in order in
one process; one conversation generated alone may differ from its copy in a split
by that much.

A ``Voice`` is an accent (an English espeak-ng language), a variant (one of the
~100 voice variants: formants, breathiness, pitch contour), a rate in words per
minute, a base pitch and a pitch range. ``TRAIN_VARIANTS`` and
``HELDOUT_VARIANTS`` split the variants: held-out ones never speak in training.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import threading

import numpy as np
from scipy import signal

from data_pipeline.record import SAMPLE_RATE

ACCENTS = ("en", "en-us", "en-gb-scotland", "en-gb-x-rp", "en-029", "en-us-nyc", "en-gb-x-gbclan", "en-gb-x-gbcwmd")
# Variants of every accent never used by training speakers (the held-out split's voices).
HELDOUT_VARIANTS = ("f4", "m6", "klatt3", "Andy", "belinda", "iven3", "steph", "Storm")
_EVENT_WORD, _EVENT_END = 1, 0
_RATE, _VOLUME, _PITCH, _RANGE = 1, 2, 3, 4


class SpeechUnavailableError(RuntimeError):
  """espeak-ng could not be loaded (the espeakng-loader wheel is missing or broken)."""


@dataclasses.dataclass(frozen=True)
class Voice:
  """One speaker: espeak-ng accent + variant, words per minute, base pitch and pitch range (0-100)."""

  accent: str = "en-us"
  variant: str = ""
  rate: int = 175
  pitch: int = 50
  range: int = 50

  @property
  def name(self) -> str:
    return f"{self.accent}+{self.variant}" if self.variant else self.accent


# The model's own voice: one speaker, always the same.
MODEL_VOICE = Voice(accent="en-us", variant="", rate=190, pitch=45, range=40)


class _Event(ctypes.Structure):
  _fields_ = [
    ("type", ctypes.c_int),
    ("unique_identifier", ctypes.c_uint),
    ("text_position", ctypes.c_int),
    ("length", ctypes.c_int),
    ("audio_position", ctypes.c_int),
    ("sample", ctypes.c_int),
    ("user_data", ctypes.c_void_p),
    ("id", ctypes.c_void_p),  # a union of int / const char* / int[2]: pointer-sized
  ]


_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.POINTER(_Event))


class _Engine:
  """The process's espeak-ng instance (synchronous output, callback collects samples and word events)."""

  def __init__(self):
    try:
      import espeakng_loader

      self.lib = ctypes.CDLL(espeakng_loader.get_library_path())
      data = espeakng_loader.get_data_path()
    except (ImportError, OSError) as e:
      raise SpeechUnavailableError(f"espeak-ng is not available ({e}); pip install espeakng-loader") from e
    self.rate = self.lib.espeak_Initialize(2, 0, str(data).encode(), 0)  # 2 = AUDIO_OUTPUT_SYNCHRONOUS
    if self.rate <= 0:
      raise SpeechUnavailableError(f"espeak_Initialize failed ({self.rate}) with data at {data}")
    self.lock = threading.Lock()
    self.libc = ctypes.CDLL(None)
    self._chunks: list[np.ndarray] = []
    self._words: list[int] = []
    self._cb = _CALLBACK(self._collect)  # kept referenced: espeak-ng holds the pointer
    self.lib.espeak_SetSynthCallback(self._cb)

  def _collect(self, wav, n, events):
    if n > 0:
      self._chunks.append(np.ctypeslib.as_array(wav, (n,)).copy())
    i = 0
    while events[i].type != _EVENT_END:
      if events[i].type == _EVENT_WORD:
        self._words.append(events[i].sample)
      i += 1
    return 0

  def synth(self, text: str, voice: Voice) -> tuple[np.ndarray, list[int]]:
    """int16 samples at ``self.rate`` and the sample at which each word starts."""
    data = text.encode("utf-8")
    with self.lock:
      if self.lib.espeak_SetVoiceByName(voice.name.encode()) != 0:
        raise ValueError(f"espeak-ng has no voice {voice.name!r}")
      for param, value in ((_RATE, voice.rate), (_PITCH, voice.pitch), (_RANGE, voice.range), (_VOLUME, 100)):
        self.lib.espeak_SetParameter(param, int(value), 0)
      self._chunks, self._words = [], []
      # Voices mix in noise from espeak-ng's random generator and the C library's rand(): both seeded per
      # utterance, the same words in the same voice give the same samples in every process.
      self.lib.espeak_ng_SetRandSeed(ctypes.c_long(0))
      self.libc.srand(0)
      self.lib.espeak_Synth(data, len(data) + 1, 0, 0, 0, 0, None, None)
      self.lib.espeak_Synchronize()
      pcm = np.concatenate(self._chunks) if self._chunks else np.zeros(0, np.int16)
      return pcm, list(self._words)


@functools.lru_cache(maxsize=1)
def _engine() -> _Engine:
  return _Engine()


def available() -> bool:
  try:
    _engine()
  except SpeechUnavailableError:
    return False
  return True


@functools.lru_cache(maxsize=1)
def variants() -> tuple[str, ...]:
  """Every voice variant the installed espeak-ng data holds (sorted)."""
  import pathlib

  import espeakng_loader

  root = pathlib.Path(espeakng_loader.get_data_path()) / "voices" / "!v"
  return tuple(sorted(p.name for p in root.iterdir() if p.is_file()))


def train_variants() -> tuple[str, ...]:
  return tuple(v for v in variants() if v not in HELDOUT_VARIANTS)


@functools.lru_cache(maxsize=4)
def _resampler(up: int, down: int) -> np.ndarray:
  """The polyphase low-pass (scipy's default Kaiser design), made once instead of on every call."""
  g = np.gcd(up, down)
  up, down = up // g, down // g
  half = 10 * max(up, down)
  return signal.firwin(2 * half + 1, 1.0 / max(up, down), window=("kaiser", 5.0))


@functools.lru_cache(maxsize=4096)
def _say(words: tuple[str, ...], voice: Voice) -> tuple[np.ndarray, tuple[tuple[int, int], ...]]:
  eng = _engine()
  pcm, starts = eng.synth(" ".join(words), voice)
  if len(starts) != len(words):
    if len(words) == 1:
      raise ValueError(f"espeak-ng reported {len(starts)} words for {words!r}")
    return _say_apart(words, voice)  # it merged some (e.g. "i i i i"): each word alone, known bounds
  fir = _resampler(SAMPLE_RATE, eng.rate)
  x = signal.resample_poly(pcm.astype(np.float32) / 32768.0, SAMPLE_RATE, eng.rate, window=fir).astype(np.float32)
  starts = [min(len(x), int(round(s * SAMPLE_RATE / eng.rate))) for s in starts]
  bounds = []
  for i, a in enumerate(starts):
    b = starts[i + 1] if i + 1 < len(starts) else len(x)
    loud = np.flatnonzero(np.abs(x[a:b]) > 0.01)
    lo = a + int(loud[0]) if len(loud) else a
    hi = a + int(loud[-1]) + 1 if len(loud) else min(a + 1, b)
    bounds.append((lo, hi))
  # Start at the first word's sound and end at the last one's: no leading or trailing silence.
  first, last = bounds[0][0], bounds[-1][1]
  x = x[first:last]
  x.setflags(write=False)
  return x, tuple((a - first, b - first) for a, b in bounds)


def _say_apart(words: tuple[str, ...], voice: Voice, gap_s: float = 0.06):
  """The words spoken one by one with ``gap_s`` of silence between them."""
  gap = np.zeros(int(gap_s * SAMPLE_RATE), np.float32)
  parts, bounds, at = [], [], 0
  for i, w in enumerate(words):
    x, ((a, b),) = _say((w,), voice)
    if i:
      parts.append(gap)
      at += len(gap)
    parts.append(x)
    bounds.append((at + a, at + b))
    at += len(x)
  x = np.concatenate(parts)
  x.setflags(write=False)
  return x, tuple(bounds)


def say(words, voice: Voice) -> tuple[np.ndarray, list[tuple[int, int]]]:
  """float32 16 kHz speech of ``words`` and each word's (start, end) sample within it.

  The audio starts at the first word's first sound and ends at the last word's last one.
  """
  words = tuple(str(w) for w in words)
  if not words:
    return np.zeros(0, np.float32), []
  x, bounds = _say(words, voice)
  return x, list(bounds)
