"""The synthetic task families: each builds a Script with its per-turn ground truth.

Every builder takes (script, rng, frame_size) and places the user's words, the
model's words (what the model *should* say and when), text events and cues. The
rules each family encodes are in data_pipeline/README.md, "Synthetic tasks".
"""

from __future__ import annotations

import numpy as np

from data_pipeline.record import SAMPLE_RATE, SAMPLES_PER_TURN
from data_pipeline.script import (
  COLOURS,
  DIGITS,
  FILLER,
  OBJECTS,
  RGB,
  SOURCE,
  TRANSLATION,
  Script,
  number_words,
  speaker,
)

T = SAMPLES_PER_TURN
RESPONSE_DELAY = 0.4  # seconds from a cue to the model's spoken reaction
TRANSLATION_LAG_TURNS = 3
VISUAL_EMPTY = 1 / 4  # visual_interjection conversations in which no object appears


def sec(x: float) -> int:
  return int(round(x * SAMPLE_RATE))


def _filler(rng, lo: int, hi: int) -> list[str]:
  return [str(w) for w in rng.choice(FILLER, size=int(rng.integers(lo, hi + 1)))]


def turn_taking(s: Script, rng, frame_size: int) -> None:
  """User speaks, pauses; the model answers RESPONSE_DELAY after the user's last word ends."""
  t = sec(rng.uniform(0.2, 0.8))
  for _ in range(int(rng.integers(1, 3))):
    end = s.user_says(t, _filler(rng, 2, 4))
    s.cue(end, "user_done")
    mend = s.model_says(end + sec(RESPONSE_DELAY), _filler(rng, 2, 3))
    t = mend + sec(rng.uniform(0.5, 1.0))


def barge_in(s: Script, rng, frame_size: int) -> None:
  """The user interrupts the model's long answer with "stop"; the model falls silent within one micro-turn.

  In a third of them a second person (another voice) talks over the model instead: any speech that
  cuts in stops it.
  """
  end = s.user_says(sec(rng.uniform(0.2, 0.6)), _filler(rng, 1, 2))
  s.cue(end, "user_done")
  words = _filler(rng, 6, 8)
  s.model_says(end + sec(RESPONSE_DELAY), words)
  start = s.model[-len(words) + int(rng.integers(2, 5))][0]
  tb = start + sec(rng.uniform(0.05, 0.2))
  s.cue(tb, "barge_in")
  s.cut_model(tb + T)
  voice = speaker(rng, s.voices) if rng.uniform() < 1 / 3 else None
  uend = s.user_says(tb, ["stop", *_filler(rng, 0, 2)], voice)
  s.cue(uend, "user_done")
  s.model_says(uend + sec(RESPONSE_DELAY), ["ok"])
  s.meta["barge_in_time"] = tb / SAMPLE_RATE


def visual_interjection(s: Script, rng, frame_size: int) -> None:
  """An object appears in the video while the user talks; the model says "look <colour> <object>".

  In VISUAL_EMPTY of these conversations nothing appears and the model stays silent: without
  them "say look some seconds into a long utterance" fits the data without looking at the video.
  """
  t = sec(rng.uniform(0.2, 0.5))
  uend = s.user_says(t, _filler(rng, 10, 14))
  appear = int(rng.integers(t // T + 3, max(t // T + 4, uend // T - 4)))
  colour, obj = str(rng.choice(COLOURS)), str(rng.choice(OBJECTS))
  empty = bool(rng.uniform() < VISUAL_EMPTY)
  if not empty:
    s.cue(appear * T, "object")
    s.model_says(appear * T + sec(RESPONSE_DELAY), ["look", colour, obj])
  size = frame_size
  bg = rng.integers(50, 110, size=3)
  texture = rng.integers(-12, 13, size=(size, size, 1))
  radius = int(rng.integers(size // 5, size // 3 + 1))
  cy, cx = (int(v) for v in rng.integers(radius, size - radius, size=2))

  def frames(turns):
    yy, xx = np.mgrid[:size, :size]
    inside = (
      (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2
      if obj == "ball"
      else (abs(yy - cy) <= radius) & (abs(xx - cx) <= radius)
    )
    base = np.clip(bg + texture, 0, 255).astype(np.uint8)
    seen = base.copy()
    seen[inside] = RGB[colour]
    out = np.stack([seen if k >= appear and not empty else base for k in range(turns)])
    return out, np.arange(turns, dtype=np.int32)

  s.frames = frames
  s.meta |= {"object": ""} if empty else {"object": f"{colour} {obj}", "appear_turn": appear}


def translation(s: Script, rng, frame_size: int) -> None:
  """The model says each source word's translation TRANSLATION_LAG_TURNS micro-turns after it starts, while the user goes on."""
  t = sec(rng.uniform(0.2, 0.6))
  prev_end = 0
  for w in rng.choice(SOURCE, size=int(rng.integers(5, 9))):
    w = str(w)
    end = s.user_says(t, [w])
    s.cue(t, "source_word")
    prev_end = s.model_says(max(t + TRANSLATION_LAG_TURNS * T, prev_end + sec(0.04)), [TRANSLATION[w]])
    t = end + sec(rng.uniform(0.05, 0.25))
  s.meta["lag_turns"] = TRANSLATION_LAG_TURNS


def time_awareness(s: Script, rng, frame_size: int) -> None:
  """User says "mark", later asks "how long ago"; the model says the seconds from "mark" to the question's end."""
  t = sec(rng.uniform(0.2, 0.6))
  mend = s.user_says(t, ["mark"])
  s.cue(t, "mark")
  elapsed = int(rng.integers(2, 10))
  question = ["how", "long", "ago"]
  qstart = t + elapsed * SAMPLE_RATE - len(s.utterance(question)[0])
  chatter = _filler(rng, 1, 3)
  if qstart - mend > len(s.utterance(chatter)[0]) + sec(1.0):
    s.user_says(mend + sec(0.5), chatter)
  qend = s.user_says(qstart, question)
  s.cue(qend, "question")
  s.model_says(qend + sec(RESPONSE_DELAY), [*number_words(elapsed), "seconds"])
  s.meta["elapsed_seconds"] = elapsed


def tool_use(s: Script, rng, frame_size: int) -> None:
  """User asks a sum; the model calls add(a,b), says "let me check", and says the result once it arrives."""
  a, b = (int(v) for v in rng.integers(0, 10, size=2))
  qend = s.user_says(sec(rng.uniform(0.2, 0.6)), ["what", "is", DIGITS[a], "plus", DIGITS[b]])
  s.cue(qend, "user_done")
  call = qend + sec(0.2)
  s.event("tool_call", call, call + sec(0.2), f"add({a},{b})")
  talk_end = s.model_says(call + sec(0.2), ["let", "me", "check"])
  result = (call // T + int(rng.integers(3, 9))) * T + sec(rng.uniform(0.0, 0.19))
  s.event("tool_result", result, result + sec(0.2), str(a + b))
  s.cue(result, "tool_result")
  s.model_says(max(result + sec(RESPONSE_DELAY), talk_end + sec(0.1)), number_words(a + b))
  s.meta |= {"tool_call": f"add({a},{b})", "answer": a + b}


def delegation(s: Script, rng, frame_size: int) -> None:
  """Like tool_use, but the request goes to the background model and its answer streams back on text_in."""
  a, b = (int(v) for v in rng.integers(2, 10, size=2))
  qend = s.user_says(sec(rng.uniform(0.2, 0.6)), ["what", "is", DIGITS[a], "times", DIGITS[b]])
  s.cue(qend, "user_done")
  call = qend + sec(0.2)
  s.event("delegate", call, call + sec(0.2), f"what is {a} times {b}")
  talk_end = s.model_says(call + sec(0.2), ["wait"])
  result = (call // T + int(rng.integers(5, 13))) * T + sec(rng.uniform(0.0, 0.19))
  s.event("background_result", result, result + sec(1.0), f"the answer is {a * b}")
  s.cue(result, "background_result")
  # The answer's digits are the last bytes to stream in, about a second after the result starts.
  s.model_says(max(result + sec(1.2), talk_end + sec(0.1)), number_words(a * b))
  s.meta |= {"delegate": f"{a} times {b}", "answer": a * b}


def idle(s: Script, rng, frame_size: int) -> None:
  """Nothing happens for 4-12 s (silence or room noise, a still camera or none): the model says nothing."""
  s.last_until(sec(rng.uniform(4.0, 12.0)))
  if rng.uniform() < 0.5:
    still = np.clip(rng.integers(30, 140, size=3) + rng.integers(-12, 13, size=(frame_size, frame_size, 1)), 0, 255)

    def frames(turns):
      return np.repeat(still.astype(np.uint8)[None], turns, axis=0), np.arange(turns, dtype=np.int32)

    s.frames = frames


BUILDERS = {
  "turn_taking": turn_taking,
  "barge_in": barge_in,
  "visual_interjection": visual_interjection,
  "translation": translation,
  "time_awareness": time_awareness,
  "tool_use": tool_use,
  "delegation": delegation,
  "idle": idle,
}
