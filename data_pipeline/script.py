"""The words and scripts of the synthetic conversations: vocabulary, word sounds, cues, and rendering.

Speakers say words from a small vocabulary; each word is a distinct sound (a
word-specific mix of three tones under an attack/release envelope), so the audio
carries the meaning and the transcript is exact. A ``Script`` is a conversation
under construction (words, events and cues placed in samples); ``render`` turns
it into a ``record.Conversation`` with per-micro-turn labels. The task families
(data_pipeline/tasks.py) write scripts; the generator (data_pipeline/synthetic.py)
runs them.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from data_pipeline import record
from data_pipeline.record import SAMPLE_RATE, SAMPLES_PER_TURN

DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
FILLER = ("hello", "yes", "no", "the", "i", "you", "now", "here", "and", "see", "well", "so")
SOURCE = ("sun", "moon", "tree", "house", "water", "fire")
TARGET = ("sol", "luna", "arbol", "casa", "agua", "fuego")
TRANSLATION = dict(zip(SOURCE, TARGET, strict=True))
COLOURS = ("red", "green", "blue")
OBJECTS = ("ball", "box")
OTHER = ("what", "is", "plus", "times", "let", "me", "check", "wait", "look", "stop", "ok", "how", "long", "ago")
OTHER += ("mark", "seconds")
VOCAB = DIGITS + FILLER + SOURCE + TARGET + COLOURS + OBJECTS + OTHER
WORD_ID = {w: i for i, w in enumerate(VOCAB)}
RGB = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (50, 80, 230)}

TASKS = ("turn_taking", "barge_in", "visual_interjection", "translation", "time_awareness", "tool_use", "delegation")
# Per-turn "cue" label: what happened in this micro-turn that the model should react to.
CUES = (
  "none",
  "user_done",
  "barge_in",
  "object",
  "source_word",
  "mark",
  "question",
  "tool_result",
  "background_result",
)
CUE = {c: i for i, c in enumerate(CUES)}


@functools.lru_cache(maxsize=1)
def _word_tones() -> np.ndarray:
  """float [len(VOCAB), 3] distinct tone frequencies (Hz) per word, fixed forever."""
  grid = 700.0 * (10 ** (np.linspace(420, 2300, 28) / 2595.0) - 1.0)  # mel-spaced, 300 Hz .. 4.5 kHz
  rng = np.random.default_rng(20260501)
  seen, out = set(), []
  while len(out) < len(VOCAB):
    pick = tuple(sorted(rng.choice(len(grid), 3, replace=False).tolist()))
    if pick not in seen and min(np.diff(pick)) >= 2:  # tones at least two grid steps apart stay resolvable
      seen.add(pick)
      out.append(grid[list(pick)])
  return np.array(out)


def word_samples(word: str) -> int:
  """Duration of a word in samples: 0.24 s to 0.36 s, fixed per word."""
  return int((0.24 + 0.04 * (WORD_ID[word] % 4)) * SAMPLE_RATE)


def word_sound(word: str, pitch: float = 1.0) -> np.ndarray:
  """float32 waveform of one word, scaled in frequency by the speaker's ``pitch``."""
  n = word_samples(word)
  t = np.arange(n) / SAMPLE_RATE
  freqs = _word_tones()[WORD_ID[word]] * pitch
  amps = np.array([0.12, 0.09, 0.07])
  x = (amps[:, None] * np.sin(2 * np.pi * freqs[:, None] * t[None])).sum(0)
  attack, release = int(0.02 * SAMPLE_RATE), int(0.05 * SAMPLE_RATE)
  env = np.ones(n)
  env[:attack] = np.linspace(0.0, 1.0, attack)
  env[-release:] = np.linspace(1.0, 0.0, release)
  return (x * env).astype(np.float32)


def say(words: str) -> list[str]:
  return words.split()


def number_words(n: int) -> list[str]:
  """Digits of n, spoken one by one ("one two" for 12)."""
  return [DIGITS[int(c)] for c in str(n)]


@dataclasses.dataclass
class Script:
  """A conversation under construction; all times are in samples."""

  task: str
  id: str
  user_pitch: float = 1.0
  user: list = dataclasses.field(default_factory=list)  # (start, word)
  model: list = dataclasses.field(default_factory=list)  # (start, word, end): end < natural end when cut
  events: list = dataclasses.field(default_factory=list)  # (kind, start, end, text)
  cues: list = dataclasses.field(default_factory=list)  # (sample, cue name)
  frames: object = None  # callable(num_turns) -> (frames, frame_turns), or None
  meta: dict = dataclasses.field(default_factory=dict)

  def user_says(self, t: int, words, rng, gap=(0.04, 0.12)) -> int:
    """Place words from sample t on with random gaps; returns the sample where the last one ends."""
    for i, w in enumerate(words):
      if i:
        t += int(rng.uniform(*gap) * SAMPLE_RATE)
      self.user.append((t, w))
      t += word_samples(w)
    return t

  def model_says(self, t: int, words, gap=0.06) -> int:
    """Place the model's words from sample t on; returns the sample where the last one ends."""
    for i, w in enumerate(words):
      if i:
        t += int(gap * SAMPLE_RATE)
      self.model.append((t, w, t + word_samples(w)))
      t += word_samples(w)
    return t

  def event(self, kind: str, start: int, end: int, text: str) -> None:
    self.events.append((kind, start, end, text))

  def cue(self, t: int, name: str) -> None:
    self.cues.append((t, name))


def render(s: Script, tail: float = 1.0) -> record.Conversation:
  """Audio, text events and per-turn labels of a script."""
  ends = [t + word_samples(w) for t, w in s.user] + [e for _, _, e in s.model] + [e[2] for e in s.events]
  n = -(-(max(ends, default=0) + int(tail * SAMPLE_RATE)) // SAMPLES_PER_TURN) * SAMPLES_PER_TURN
  turns = n // SAMPLES_PER_TURN
  user, model = np.zeros(n, np.float32), np.zeros(n, np.float32)
  labels = {k: np.zeros(turns, np.int32) for k in ("user_speaking", "model_speaking", "cue")}
  labels |= {"task": np.full(turns, TASKS.index(s.task), np.int32)}
  labels |= {"user_word": np.full(turns, -1, np.int32), "model_word": np.full(turns, -1, np.int32)}
  events = []
  for t, w in s.user:
    x = word_sound(w, s.user_pitch)
    user[t : t + len(x)] += x
    _mark(labels, "user", t, t + len(x), w)
    events.append(record.Event("user_text", t / SAMPLE_RATE, (t + len(x)) / SAMPLE_RATE, w + " "))
  for t, w, end in s.model:
    x = word_sound(w)[: end - t]
    model[t : t + len(x)] += x
    _mark(labels, "model", t, t + len(x), w)
    events.append(record.Event("model_text", t / SAMPLE_RATE, (t + len(x)) / SAMPLE_RATE, w + " "))
  for kind, a, b, txt in s.events:
    events.append(record.Event(kind, a / SAMPLE_RATE, b / SAMPLE_RATE, txt))
  for t, name in s.cues:
    labels["cue"][t // SAMPLES_PER_TURN] = CUE[name]
  frames, frame_turns = s.frames(turns) if s.frames else (None, None)
  return record.Conversation(
    id=s.id,
    user_audio=_pcm(user),
    model_audio=_pcm(model),
    events=sorted(events, key=lambda e: (e.start, e.kind)),
    frames=frames,
    frame_turns=frame_turns,
    labels=labels,
    meta={"task": s.task, "source": "data_pipeline.synthetic"} | s.meta,
  )


def _mark(labels, who, a, b, word):
  labels[f"{who}_speaking"][a // SAMPLES_PER_TURN : (b - 1) // SAMPLES_PER_TURN + 1] = 1
  labels[f"{who}_word"][a // SAMPLES_PER_TURN] = WORD_ID[word]


def _pcm(x):
  return np.clip(np.round(x * 32767.0), -32768, 32767).astype(np.int16)
