"""The words and scripts of the synthetic conversations: vocabulary, speakers, cues, and rendering.

Speakers say words from a small vocabulary with a real speech synthesizer
(espeak-ng, ``data_pipeline/speech.py``): each conversation's user has a random
accent, voice variant, rate, pitch, level and room noise; the model always speaks
in one voice. Word timings come from the synthesizer, so the labels are exact.
The user's words reach the model as audio only: they are labels (``user_word``,
``meta["user_words"]``), never ``text_in`` events, since a live client sends sound.
A ``Script`` is a conversation under construction (utterances, events and cues
placed in samples); ``render`` turns it into a ``record.Conversation`` with
per-micro-turn labels. The task families (data_pipeline/tasks.py) write scripts;
the generator (data_pipeline/synthetic.py) runs them.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy import signal

from data_pipeline import record, speech
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
TASKS += ("idle",)
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


def number_words(n: int) -> list[str]:
  """Digits of n, spoken one by one ("one two" for 12)."""
  return [DIGITS[int(c)] for c in str(n)]


def speaker(rng, split_voices: str) -> speech.Voice:
  """A random user voice: accent, variant (train or held-out set), rate, pitch and range."""
  pool = speech.HELDOUT_VARIANTS if split_voices == "heldout" else speech.train_variants()
  return speech.Voice(
    accent=str(rng.choice(speech.ACCENTS)),
    variant=str(rng.choice(pool)),
    rate=int(rng.integers(140, 231)),
    pitch=int(rng.integers(20, 81)),
    range=int(rng.integers(20, 81)),
  )


@dataclasses.dataclass
class Script:
  """A conversation under construction; all times are in samples.

  ``user`` and ``model`` hold word spans (start, end, word); ``clips`` the audio placed on each
  track as (start, float32 samples).
  """

  task: str
  id: str
  voice: speech.Voice = speech.MODEL_VOICE  # the user's voice
  voices: str = "train"  # the voice set other speakers come from
  user: list = dataclasses.field(default_factory=list)
  model: list = dataclasses.field(default_factory=list)
  clips: dict = dataclasses.field(default_factory=lambda: {"user": [], "model": []})
  events: list = dataclasses.field(default_factory=list)  # (kind, start, end, text)
  cues: list = dataclasses.field(default_factory=list)  # (sample, cue name)
  frames: object = None  # callable(num_turns) -> (frames, frame_turns), or None
  meta: dict = dataclasses.field(default_factory=dict)

  def utterance(self, words, voice: speech.Voice | None = None):
    """(audio, word bounds) of ``words`` in ``voice`` (the user's by default), not placed."""
    return speech.say(words, voice or self.voice)

  def user_says(self, t: int, words, voice: speech.Voice | None = None) -> int:
    """Say ``words`` from sample t on (one utterance); returns the sample where the last word ends."""
    x, bounds = self.utterance(words, voice)
    self.clips["user"].append((t, x))
    self.user += [(t + a, t + b, w) for (a, b), w in zip(bounds, words, strict=True)]
    return t + len(x)

  def model_says(self, t: int, words) -> int:
    """The model says ``words`` from sample t on in its own voice; returns where the last one ends."""
    x, bounds = speech.say(words, speech.MODEL_VOICE)
    self.clips["model"].append((t, x))
    self.model += [(t + a, t + b, w) for (a, b), w in zip(bounds, words, strict=True)]
    return t + len(x)

  def cut_model(self, at: int) -> None:
    """The model falls silent at sample ``at``: later words go, a word under way is cut."""
    self.model = [(a, min(b, at), w) for a, b, w in self.model if a < at]
    self.clips["model"] = [(t, x[: max(0, at - t)]) for t, x in self.clips["model"] if t < at]

  def event(self, kind: str, start: int, end: int, text: str) -> None:
    self.events.append((kind, start, end, text))

  def cue(self, t: int, name: str) -> None:
    self.cues.append((t, name))

  def last_until(self, t: int) -> None:
    """The conversation lasts at least until sample ``t`` (plus the render's tail)."""
    self.meta["_until"] = max(t, self.meta.get("_until", 0))

  def delay(self, turns: int) -> None:
    """Everything happens ``turns`` micro-turns later; the first video frame holds until then."""
    d = turns * SAMPLES_PER_TURN
    self.user = [(a + d, b + d, w) for a, b, w in self.user]
    self.model = [(a + d, b + d, w) for a, b, w in self.model]
    self.clips = {who: [(t + d, x) for t, x in clips] for who, clips in self.clips.items()}
    self.events = [(k, a + d, b + d, txt) for k, a, b, txt in self.events]
    self.cues = [(t + d, name) for t, name in self.cues]
    self.meta["_until"] = self.meta.get("_until", 0) + d
    for key, unit in (("appear_turn", 1), ("barge_in_time", SAMPLES_PER_TURN / SAMPLE_RATE)):
      if key in self.meta:
        self.meta[key] += turns * unit
    if self.frames is not None:
      inner = self.frames

      def frames(num_turns):
        f, _ = inner(max(num_turns - turns, 1))
        f = np.concatenate([np.repeat(f[:1], turns, axis=0), f])[:num_turns]
        return f, np.arange(len(f), dtype=np.int32)

      self.frames = frames


def render(s: Script, rng, tail: float = 1.0) -> record.Conversation:
  """Audio, text events and per-turn labels of a script.

  The user's track gets the speaker's level and the room's noise; the user's words are labels
  only (``user_word``, ``meta["user_words"]``), never text events: a live client sends sound.
  """
  ends = [b for _, b, _ in s.user + s.model] + [e[2] for e in s.events] + [s.meta.pop("_until", 0)]
  n = -(-(max(ends, default=0) + int(tail * SAMPLE_RATE)) // SAMPLES_PER_TURN) * SAMPLES_PER_TURN
  turns = n // SAMPLES_PER_TURN
  tracks = {"user": np.zeros(n, np.float32), "model": np.zeros(n, np.float32)}
  for who, clips in s.clips.items():
    for t, x in clips:
      tracks[who][t : t + len(x)] += x[: n - t]
  user = _room(tracks["user"], rng)
  labels = {k: np.zeros(turns, np.int32) for k in ("user_speaking", "model_speaking", "cue")}
  labels |= {"task": np.full(turns, TASKS.index(s.task), np.int32)}
  labels |= {"user_word": np.full(turns, -1, np.int32), "model_word": np.full(turns, -1, np.int32)}
  for a, b, w in s.user:
    _mark(labels, "user", a, b, w)
  events = []
  for a, b, w in s.model:
    _mark(labels, "model", a, b, w)
    events.append(record.Event("model_text", a / SAMPLE_RATE, b / SAMPLE_RATE, w + " "))
  for kind, a, b, txt in s.events:
    events.append(record.Event(kind, a / SAMPLE_RATE, b / SAMPLE_RATE, txt))
  for t, name in s.cues:
    labels["cue"][t // SAMPLES_PER_TURN] = CUE[name]
  frames, frame_turns = s.frames(turns) if s.frames else (None, None)
  words = [[round(a / SAMPLE_RATE, 4), round(b / SAMPLE_RATE, 4), w] for a, b, w in s.user]
  return record.Conversation(
    id=s.id,
    user_audio=_pcm(user),
    model_audio=_pcm(tracks["model"]),
    events=sorted(events, key=lambda e: (e.start, e.kind)),
    frames=frames,
    frame_turns=frame_turns,
    labels=labels,
    meta={"task": s.task, "source": "data_pipeline.synthetic", "user_voice": s.voice.name}
    | {"user_words": words}
    | s.meta,
  )


def _room(x, rng):
  """The user's speech at a random level, in silence or under steady background noise."""
  peak = float(np.abs(x).max(initial=0.0))
  if peak > 0:
    x = x * np.float32(rng.uniform(0.2, 0.9) / peak)
  noise = float(rng.choice([0.0, 0.0, 10 ** rng.uniform(-3.5, -2.0)]))  # rms; a third of rooms are noisy
  if noise:
    white = rng.standard_normal(len(x)).astype(np.float32)
    colour = rng.uniform(0.0, 0.95)  # one-pole low-pass: white to brown-ish noise
    white = signal.lfilter([1.0 - colour], [1.0, -colour], white).astype(np.float32)
    x = x + white * np.float32(noise / max(float(np.std(white)), 1e-9))
  return x


def _mark(labels, who, a, b, word):
  labels[f"{who}_speaking"][a // SAMPLES_PER_TURN : (b - 1) // SAMPLES_PER_TURN + 1] = 1
  if labels[f"{who}_word"][a // SAMPLES_PER_TURN] < 0:  # the first word starting in a micro-turn names it
    labels[f"{who}_word"][a // SAMPLES_PER_TURN] = WORD_ID[word]


def _pcm(x):
  return np.clip(np.round(x * 32767.0), -32768, 32767).astype(np.int16)
