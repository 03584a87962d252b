"""The live server's media work per session: what goes into the model's streams and what comes out of them.

In: a micro-turn of PCM16 becomes the model's log-mel frames, streamed (each tick carries the previous
tick's last ``win - hop`` samples, so the frames equal those of the whole signal); a JPEG or raw RGB frame
becomes the model's video frame, resized as the training data is. Out: the predicted mel frames become
PCM16 speech (a streaming Griffin-Lim that carries phase across ticks, one batched call for every
session that speaks), ``text_out`` becomes the tick's
text (``calls.TextOutDecoder``: marker contents are not speech) and the session's calls become ``tool_call``
and ``tool_result`` events.

Everything but ``check_video`` runs on the engine thread, decoding included; ``SessionMedia`` is one session's
carried state.
"""

from __future__ import annotations

import codecs
import dataclasses
import io
import json

import numpy as np
from PIL import Image

from data_pipeline import audio, featurize
from interaction import layout
from serving import protocol
from serving.calls import TextOutDecoder
from serving.protocol import SAMPLES_PER_TICK, ClientError


def speaking(mels_NnC: np.ndarray, spec) -> np.ndarray:
  """[N] bool: which of N micro-turns of predicted mel frames [N, n, C] are speech (``spec.voiced``)."""
  return spec.voiced(mels_NnC)


def user_speaking(pcm: np.ndarray) -> bool:
  """Whether the user's PCM16 samples of a micro-turn have speech energy (``layout.pcm_speech``)."""
  return layout.pcm_speech(pcm.astype(np.float32) * np.float32(1 / 32768))


def decode_video(kind: int, payload: bytes, shape: tuple[int, int]) -> np.ndarray:
  """A JPEG or raw RGB frame resized to ``shape`` (height, width) as the training data is: uint8 [H, W, 3]."""
  if kind == protocol.RAW:
    w, h = protocol.raw_size(payload)
    frame = np.frombuffer(payload, np.uint8, offset=4).reshape(h, w, 3)
  else:
    try:
      image = Image.open(io.BytesIO(payload), formats=["JPEG"])
      protocol.check_side("JPEG", *image.size)
      image.draft("RGB", (shape[1], shape[0]))  # DCT-domain downscale: decode cost ~ the target size
      frame = np.asarray(image.convert("RGB"))
    except ClientError:
      raise
    except Exception as e:  # noqa: BLE001  (PIL raises many types for corrupt data)
      raise ClientError("bad_video", f"not a decodable JPEG: {type(e).__name__}: {e}") from None
  return featurize.resize(np.asarray(frame, np.uint8)[None], shape)[0]  # no copy of a megabyte frame


@dataclasses.dataclass(eq=False)
class SessionMedia:
  """One session's state carried from tick to tick (engine thread only)."""

  tail: np.ndarray | None = None  # the previous tick's last (win - hop) samples, for causal mel frames
  text: TextOutDecoder = dataclasses.field(default_factory=TextOutDecoder)
  utf8: object = dataclasses.field(default_factory=lambda: codecs.getincrementaldecoder("utf-8")("replace"))
  calls: dict = dataclasses.field(default_factory=dict)  # id(call) -> [number, reported chars, call]
  next_call: int = 0
  voice: audio.VocoderState | None = None  # the streaming vocoder's carried state (one row); None while silent

  def said(self, tokens) -> str:
    """The spoken text of a micro-turn's ``text_out`` (a character split across ticks comes out whole)."""
    return self.utf8.decode(self.text.decode(tokens).spoken)

  def call_events(self, calls, turn: int) -> list[str]:
    """``tool_call`` for every call opened since the last tick, ``tool_result`` for new result text."""
    events = []
    for call in calls:
      if id(call) in self.calls or call.end_tick == -1:
        continue
      self.calls[id(call)] = [self.next_call, 0, call]
      events.append(json.dumps(protocol.tool_call_event(self.next_call, call.kind, call.request, turn)))
      self.next_call += 1
    for key, (number, reported, call) in list(self.calls.items()):
      result = call.result
      if len(result) > reported or call.closed:
        event = protocol.tool_result_event(number, call.kind, result[reported:], call.closed, call.error, turn)
        events.append(json.dumps(event))
        self.calls[key][1] = len(result)
      if call.closed:
        del self.calls[key]
    return events


class Media:
  """The model's media streams for the live server: features in, speech and events out."""

  def __init__(self, cfg, vocoder_iters: int = 4):
    self.audio_in = cfg.stream("audio", "in")
    self.audio_out = cfg.stream("audio", "out", optional=True)
    self.video_in = cfg.stream("video", "in", optional=True)
    text_out = cfg.stream("text", "out", optional=True)
    self.text_out = text_out.name if text_out else None
    self.mel_in = audio.mel_config(self.audio_in)
    self.mel_out = audio.mel_config(self.audio_out) if self.audio_out else None
    self.vocoder_iters = vocoder_iters
    if self.audio_in.slots * self.mel_in.hop != SAMPLES_PER_TICK:
      raise ValueError(f"audio_in has {self.audio_in.slots} frames of {self.mel_in.hop} samples per micro-turn")

  @property
  def video_shape(self) -> tuple[int, int]:
    """The model's video frame (height, width); (0, 0) without video input."""
    return self.video_in.frame_shape if self.video_in else (0, 0)

  def check_video(self, kind: int, payload: bytes) -> None:
    """The loop's checks of a video frame (``protocol.check_video``), and that the model takes video."""
    if self.video_in is None:
      raise ClientError("bad_frame", "this model has no video input")
    protocol.check_video(kind, payload)

  def decode_video(self, kind: int, payload: bytes) -> np.ndarray:
    """A frame that passed ``check_video`` at the model's frame size (engine thread)."""
    return decode_video(kind, payload, self.video_in.frame_shape)

  def decoded(self, kind: int, payload: bytes) -> np.ndarray | ClientError:
    """``decode_video``, or the ``ClientError`` only the decoder can raise (a corrupt JPEG), as a value."""
    try:
      return self.decode_video(kind, payload)
    except ClientError as e:
      return e

  def features(self, state: SessionMedia, pcm: np.ndarray, frame: np.ndarray | None) -> dict:
    """The model's input streams for one micro-turn: log-mel of ``pcm`` (zero-padded) and the video frame."""
    x = np.zeros(SAMPLES_PER_TICK, np.float32)
    x[: len(pcm)] = pcm[:SAMPLES_PER_TICK] * np.float32(1 / 32768)
    keep = self.mel_in.win - self.mel_in.hop
    tail = np.zeros(keep, np.float32) if state.tail is None else state.tail
    x = np.concatenate([tail, x])
    state.tail = x[-keep:]
    mel = audio.log_mel(self.mel_in, x, start=keep, num_frames=self.audio_in.slots)
    feats = {self.audio_in.name: mel.reshape(self.audio_in.slots, -1)}
    if self.video_in is not None and frame is not None:
      feats[self.video_in.name] = featurize.patchify(frame, self.video_in.patch_size)
    return feats

  def speech(self, states: list[SessionMedia], results: list) -> list[tuple[bool, bytes] | None]:
    """Per session: (audible, the ``0x01`` PCM16 frame); one batched streaming vocoder call for all who speak.

    Each speaking session's vocoder carries its last frames and samples across ticks
    (``audio.stream_waveforms``), so its voice has no seam at tick boundaries; the audio lags the mel
    frames by one hop. A session that falls silent is flushed once (its last hop), then its state is dropped.
    """
    if self.audio_out is None:
      return [None] * len(results)
    mels = np.stack([r.values[self.audio_out.name] for r in results]) if results else np.zeros((0, 1, 1), np.float32)
    voiced = speaking(mels, self.audio_out) if len(mels) else np.zeros(0, bool)
    waves = np.zeros((len(results), SAMPLES_PER_TICK), np.float32)
    rows = [i for i, st in enumerate(states) if voiced[i] or st.voice is not None]
    if rows:
      fresh = audio.VocoderState.silence(self.mel_out, 1)
      carried = [states[i].voice or fresh for i in rows]
      state = audio.VocoderState(np.concatenate([c.mag for c in carried]), np.concatenate([c.y for c in carried]))
      iters = self.vocoder_iters
      waves[rows], state = audio.stream_waveforms(self.mel_out, mels[rows], state, iters=iters, mel_iters=2 * iters)
      for k, i in enumerate(rows):
        states[i].voice = audio.VocoderState(state.mag[k : k + 1], state.y[k : k + 1]) if voiced[i] else None
    pcm16 = np.clip(np.round(waves * 32767), -32768, 32767).astype("<i2")
    audible = voiced | np.any(pcm16 != 0, axis=1)
    return [(bool(v), protocol.audio_frame(row.tobytes())) for v, row in zip(audible, pcm16, strict=True)]

  def outputs(self, state: SessionMedia, session, result, pcm: np.ndarray, speech) -> list:
    """The audio frame, call events and the tick event (a dict: timing is added once every session is done)."""
    messages = []
    voiced = False
    if speech is not None:
      voiced, frame = speech
      messages.append(frame)
    said = state.said(result.values[self.text_out]) if self.text_out is not None else state.utf8.decode(b"")
    turn = session.turn - 1
    messages += state.call_events(session.calls, turn)
    messages.append(protocol.tick_event(turn, said, voiced, user_speaking(pcm), len(pcm)))
    return messages
