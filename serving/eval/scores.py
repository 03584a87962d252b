"""Interaction metrics, computed exactly from per-micro-turn labels and the model's streams.

Dimension legend: N micro-turns of a conversation, n slots of a stream, C mel channels.

Everything is on the micro-turn grid (0.2 s). The model is *active* in a micro-turn
when its voice is on (``StreamSpec.voiced`` of its ``audio_out`` spec: at least
``layout.VOICED_FRAMES`` frames with a mel channel above its ``voice_level``) or its ``text_out`` holds spoken bytes
(bytes outside tool/delegate markers). Times are measured from the end of the
micro-turn holding a user event (the first moment the model could have seen
all of it) or, for onsets, from the start of that micro-turn:

- turn taking, per ``user_done`` cue c of a turn_taking conversation: taken
  over when the model becomes active within ``REACT_TURNS`` after c and before
  the user speaks again; latency = (first active turn - (c + 1)) * 0.2 s.
- barge-in, per ``barge_in`` cue b: honoured when the model was active in b - 1
  or b and an inactive turn s follows within ``STOP_TURNS`` (1 s); stop latency
  = (s - b) * 0.2 s. A model already silent at the onset fails the event.
- silence: with nothing but silence in (no audio, video or text) for
  ``SILENCE_TURNS`` micro-turns, the fraction of them in which the model is active.
- visual interjection, per ``object`` cue o: detected when a model onset (an
  active turn after ``SILENT_RUN`` inactive ones) falls in [o, o + REACT_TURNS];
  onsets outside every such window are false positives.
- translation: the model's spoken words aligned in order to the reference
  translations (difflib); accuracy = matched / reference words; lag = mean of
  (turn of the matched word - turn of its source word) * 0.2 s.
- time awareness, tool use, delegation: the spoken number after the question /
  the result arrives equals the reference; calls equal the recorded request;
  "kept talking" = active in some turn between the call and its result.
"""

from __future__ import annotations

import dataclasses
import difflib

import numpy as np

from data_pipeline import script
from interaction.layout import MICRO_TURN_SECONDS
from serving.calls import TextOutDecoder

REACT_TURNS = 10  # 2 s to react to a cue
SILENT_RUN = 2  # inactive turns before an active one that make it an onset
STOP_TURNS = 5  # an interruption is honoured when the model falls silent within 1 s
ANSWER_TURNS = 20  # 4 s after a question or a result in which the spoken answer is looked for

TARGETS = {
  "turn_taking/takeover_rate": (">=", 0.9),
  "turn_taking/latency_s": ("<=", 0.4),
  "barge_in/honoured_rate": (">=", 0.9),
  "barge_in/stop_latency_s": ("<=", 0.4),
  "visual/recall": (">=", 0.9),
  "visual/precision": (">=", 0.8),
  "translation/word_accuracy": (">=", 0.9),
  "translation/lag_s": ("<=", 0.8),
  "silence/active_rate": ("<=", 0.01),
}
SILENCE_TURNS = 300  # 60 s of silence


@dataclasses.dataclass
class CallRecord:
  """A tool call or delegation as the evaluator saw it (micro-turns of the conversation)."""

  kind: str  # "tool" or "background"
  request: str
  tick: int  # turn whose text_out closed the request
  first_tick: int | None  # turn whose text_in got the first result token
  result: str = ""
  error: str | None = None


@dataclasses.dataclass
class Transcript:
  """One conversation as streamed: labels and references from the record, streams from the model."""

  task: str
  labels: dict  # name -> int [N]
  text_out: np.ndarray  # int [N, n]
  audio_out: np.ndarray  # float [N, n, C]
  text_in: np.ndarray  # int [N, n] as fed (user text and call results)
  calls: list
  ref_calls: dict  # "tool" / "background" -> recorded request text
  ref_words: list = dataclasses.field(default_factory=list)  # (turn, word) the model should say, in order
  audio_spec: object = None  # the audio_out StreamSpec: its ``voiced`` decides when the voice is on

  @property
  def num_turns(self) -> int:
    return len(self.labels["task"])


def voiced(tr: Transcript) -> np.ndarray:
  """[N] bool: the micro-turns in which the model's voice is on."""
  if tr.audio_spec is None:
    raise ValueError("Transcript.audio_spec is unset: pass the audio_out StreamSpec (its voiced() is the rule)")
  return tr.audio_spec.voiced(tr.audio_out)


def spoken_words(text_out_Nn) -> list[tuple[int, str]]:
  """(start turn, word) of every word spoken in text_out; marker contents are not speech.

  Read with the live server's decoder (``calls.TextOutDecoder``): a word ends at a space or where a
  marker stood, and starts in the turn of its first byte.
  """
  words, buf, start, decoder = [], bytearray(), 0, TextOutDecoder()

  def flush():
    if buf.strip():
      words.append((start, buf.decode("utf-8", errors="replace").strip()))
    buf.clear()

  for t, row in enumerate(np.asarray(text_out_Nn)):
    out = decoder.decode(row)
    for i, byte in enumerate(out.spoken):
      if i in out.breaks or byte == ord(" "):
        flush()
      if byte != ord(" "):
        start = t if not buf else start
        buf.append(byte)
    if len(out.spoken) in out.breaks:
      flush()
  flush()
  return words


def spoken_turns(text_out_Nn) -> np.ndarray:
  """[N] bool: the micro-turns whose text_out speaks (a byte other than a space outside the markers)."""
  decoder = TextOutDecoder()
  return np.array([bool(decoder.decode(row).spoken.strip(b" ")) for row in np.asarray(text_out_Nn)], bool)


def model_active(tr: Transcript) -> np.ndarray:
  return voiced(tr) | spoken_turns(tr.text_out)


def _cues(tr: Transcript, name: str) -> np.ndarray:
  return np.flatnonzero(tr.labels["cue"] == script.CUE[name])


def onsets(active) -> list[int]:
  return [t for t in range(len(active)) if active[t] and not active[max(0, t - SILENT_RUN) : t].any()]


def _words_after(tr: Transcript, turn: int, spoken=None) -> list[str]:
  spoken = spoken_words(tr.text_out) if spoken is None else spoken
  return [w for t, w in spoken if turn < t <= turn + ANSWER_TURNS]


def _ref_words_after(tr: Transcript, turn: int) -> list[str]:
  return [w for t, w in tr.ref_words if t > turn]


class Tally:
  """Sums per figure over conversations."""

  def __init__(self):
    self.lists: dict[str, list] = {}

  def add(self, name: str, value) -> None:
    self.lists.setdefault(name, []).append(float(value))

  def figures(self) -> dict:
    return {k: {"value": float(np.mean(v)), "n": len(v)} for k, v in self.lists.items()}


def score(tr: Transcript, tally: Tally) -> None:
  """Add one conversation's events to ``tally``."""
  active = model_active(tr)
  user = tr.labels["user_speaking"] > 0
  n = tr.num_turns
  if tr.task == "turn_taking":
    for c in _cues(tr, "user_done"):
      nxt = [t for t in range(c + 1, n) if user[t]]
      end = min(c + 1 + REACT_TURNS, nxt[0] if nxt else n)
      first = next((t for t in range(c + 1, end) if active[t]), None)
      tally.add("turn_taking/takeover_rate", first is not None)
      if first is not None:
        tally.add("turn_taking/latency_s", (first - c - 1) * MICRO_TURN_SECONDS)
  elif tr.task == "barge_in":
    for b in _cues(tr, "barge_in"):
      # Every scripted interruption counts: a model that was not speaking when the user cut in
      # fails it (otherwise a model that says nothing would honour every barge-in).
      speaking = bool(active[max(0, b - 1) : b + 1].any())
      tally.add("barge_in/not_speaking_at_onset", not speaking)
      # One silent turn is the stop: the trained reaction is an "ok" right after it.
      stop = next((t for t in range(b, min(b + STOP_TURNS + 1, n)) if not active[t]), None) if speaking else None
      tally.add("barge_in/honoured_rate", stop is not None)
      if stop is not None:
        tally.add("barge_in/stop_latency_s", (stop - b) * MICRO_TURN_SECONDS)
  elif tr.task == "visual_interjection":
    _score_visual(tr, active, tally)
  elif tr.task == "translation":
    _score_translation(tr, tally)
  elif tr.task == "time_awareness":
    for q in _cues(tr, "question"):
      ref = [w for w in _ref_words_after(tr, q) if w != "seconds"]
      tally.add("time/accuracy", _words_after(tr, q)[: len(ref)] == ref)
  elif tr.task in ("tool_use", "delegation"):
    _score_call(tr, active, tally, "tool" if tr.task == "tool_use" else "background")
  elif tr.task in ("silence", "idle"):
    for a in active:
      tally.add(f"{tr.task}/active_rate", a)


def _score_visual(tr: Transcript, active, tally: Tally) -> None:
  objects = _cues(tr, "object")
  starts = onsets(active)
  spoken = spoken_words(tr.text_out)
  for o in objects:
    hits = [t for t in starts if o <= t <= o + REACT_TURNS]
    tally.add("visual/recall", bool(hits))
    if hits:
      tally.add("visual/latency_s", (hits[0] - o) * MICRO_TURN_SECONDS)
      said = [w for t, w in spoken if o <= t <= o + REACT_TURNS + 3]
      ref = [w for t, w in tr.ref_words if t >= o][:3]
      tally.add("visual/content_accuracy", all(w in said for w in ref))
  for t in starts:
    tally.add("visual/precision", any(o <= t <= o + REACT_TURNS for o in objects))


def _score_translation(tr: Transcript, tally: Tally) -> None:
  sources = _cues(tr, "source_word")
  ref_words = tr.ref_words
  got = spoken_words(tr.text_out)
  matcher = difflib.SequenceMatcher(a=[w for _, w in ref_words], b=[w for _, w in got], autojunk=False)
  matched = 0
  for block in matcher.get_matching_blocks():
    for k in range(block.size):
      i, j = block.a + k, block.b + k
      matched += 1
      if i < len(sources):
        tally.add("translation/lag_s", (got[j][0] - sources[i]) * MICRO_TURN_SECONDS)
  for k in range(len(ref_words)):
    tally.add("translation/word_accuracy", k < matched)


def _score_call(tr: Transcript, active, tally: Tally, kind: str) -> None:
  name = "tool" if kind == "tool" else "delegation"
  calls = [c for c in tr.calls if c.kind == kind]
  tally.add(f"{name}/call_made", bool(calls))
  if not calls:
    tally.add(f"{name}/call_correct", False)
    tally.add(f"{name}/answer_correct", False)
    return
  call = calls[0]
  tally.add(f"{name}/call_correct", call.request.strip() == tr.ref_calls.get(kind, "").strip())
  arrived = call.first_tick if call.first_tick is not None else tr.num_turns
  # The model's output at the arrival turn is produced at the tick the result enters: still concurrent.
  tally.add(f"{name}/kept_talking", bool(active[call.tick + 1 : arrived + 1].any()))
  ref_turn = _cues(tr, "tool_result" if kind == "tool" else "background_result")
  ref = _ref_words_after(tr, int(ref_turn[0])) if len(ref_turn) else []
  got = _words_after(tr, arrived - 1)  # "let me check" may still be finishing: look for the answer anywhere
  tally.add(f"{name}/answer_correct", bool(ref) and any(got[i : i + len(ref)] == ref for i in range(len(got))))


def with_targets(figures: dict) -> dict:
  """Each figure with its target and verdict where it has one."""
  out = {}
  for name, fig in sorted(figures.items()):
    fig = dict(fig)
    if name in TARGETS:
      op, target = TARGETS[name]
      value = round(fig["value"], 9)  # 2 * 0.2 s is 0.4 s, not 0.4000000000000001
      fig |= {"target": target, "op": op, "pass": value >= target if op == ">=" else value <= target}
    out[name] = fig
  for name, (op, target) in TARGETS.items():  # a figure with no events to measure fails its target
    if name not in out:
      out[name] = {"value": None, "n": 0, "target": target, "op": op, "pass": False}
  return out
