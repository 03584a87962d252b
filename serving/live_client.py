"""A scripted live session: stream speech to the server in real time, record what the model says.

One WebSocket session (``serving/PROTOCOL.md``). The client sends its microphone
as 200 ms chunks paced by the wall clock from ``session.started`` (one chunk
ahead, so every tick hears a whole micro-turn), silence when the script says
nothing, and optionally a second clip that *talks over* the model: sent
``talk_over_delay_s`` after the model starts speaking (at the earliest at
``talk_over_after_s``). Everything the server sends is recorded, and the two
sides are put on one timeline: tick ``k`` heard the user's samples ``[k * 3200,
(k + 1) * 3200)`` of the stream as the server consumed them (``user_audio_ms``),
and its audio frame is what the model said in that micro-turn.

Imports no jax (only ``serving.protocol``): the server may run anywhere.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import pathlib

import numpy as np
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from serving import protocol
from serving.protocol import SAMPLE_RATE, SAMPLES_PER_TICK, TICK_S


@dataclasses.dataclass
class Recording:
  """Both sides of a session on the micro-turn grid: int16 tracks of equal length, tick events, calls."""

  user: np.ndarray
  model: np.ndarray
  ticks: list
  calls: list
  talk_over_at_s: float | None = None  # when the talk-over clip started, on this timeline

  def text(self) -> str:
    """Everything the model said in ``text_out`` (tool calls excluded), in order."""
    return "".join(t.get("text", "") for t in self.ticks)

  def model_onsets(self, threshold: int = 300) -> list[float]:
    """Times (s) at which the model's voice starts after at least 0.2 s of silence."""
    loud = np.abs(self.model.astype(np.int32)) > threshold
    idx = np.flatnonzero(loud)
    if not len(idx):
      return []
    starts = [idx[0]] + [b for a, b in zip(idx[:-1], idx[1:], strict=True) if b - a > SAMPLES_PER_TICK]
    return [s / SAMPLE_RATE for s in starts]

  def model_voice_end_after(self, t: float, threshold: int = 300) -> float | None:
    """The time (s) the model's voice last sounds before a silence of at least 0.2 s that follows ``t``."""
    loud = np.flatnonzero(np.abs(self.model.astype(np.int32)) > threshold)
    loud = loud[loud >= int(t * SAMPLE_RATE)]
    if not len(loud):
      return None
    gaps = np.flatnonzero(np.diff(loud) > SAMPLES_PER_TICK)
    return float((loud[gaps[0]] if len(gaps) else loud[-1]) / SAMPLE_RATE)

  def write_wav(self, path) -> pathlib.Path:
    """A stereo 16 kHz WAV: the user (what the server heard) left, the model right."""
    from scipy.io import wavfile

    path = pathlib.Path(path)
    wavfile.write(path, SAMPLE_RATE, np.stack([self.user, self.model], axis=1).astype(np.int16))
    return path


async def record(
  url: str,
  token: str,
  speech: np.ndarray,
  *,
  seconds: float,
  talk_over: np.ndarray | None = None,
  talk_over_after_s: float = 0.0,
  talk_over_delay_s: float = 0.3,
  open_timeout: float = 60.0,
  end_timeout: float = 120.0,
) -> Recording:
  """Stream int16 16 kHz ``speech`` (then silence) for ``seconds``; returns the recording."""
  total = int(round(seconds / TICK_S))
  sent = np.zeros(0, np.int16)  # the stream as sent, talk-over mixed in
  stream = np.zeros(total * SAMPLES_PER_TICK, np.int32)
  stream[: min(len(speech), len(stream))] = speech[: len(stream)]
  ticks, calls, audio = [], [], []
  state = {"onset_tick": None, "talk_at": None}
  all_heard = asyncio.Event()

  async with connect(
    url, additional_headers={"Authorization": f"Bearer {token}"}, open_timeout=open_timeout, max_size=1 << 22
  ) as ws:
    started = json.loads(await ws.recv())
    if started.get("type") != "session.started":
      raise RuntimeError(f"expected session.started, got {started}")
    loop = asyncio.get_running_loop()
    t0 = loop.time()

    async def send():
      nonlocal sent
      for i in range(total):
        if talk_over is not None and state["talk_at"] is None and state["onset_tick"] is not None:
          at = max(int(round(talk_over_after_s / TICK_S)), state["onset_tick"] + int(round(talk_over_delay_s / TICK_S)))
          state["talk_at"] = max(at, i)
          a = state["talk_at"] * SAMPLES_PER_TICK
          n = min(len(talk_over), len(stream) - a)
          stream[a : a + n] += talk_over[:n]
        chunk = np.clip(stream[i * SAMPLES_PER_TICK : (i + 1) * SAMPLES_PER_TICK], -32768, 32767).astype("<i2")
        sent = np.concatenate([sent, chunk])
        await ws.send(protocol.audio_frame(chunk.tobytes()))
        # One chunk ahead of the ticks: the server's buffer never runs dry, so tick k hears chunk k.
        await asyncio.sleep(max(0.0, t0 + i * TICK_S - loop.time()))
      # End the session once every chunk sent has been heard (a server still compiling its first
      # tick lags the wall clock), so the recording covers the whole stream.
      try:
        await asyncio.wait_for(all_heard.wait(), timeout=end_timeout)
      finally:
        await ws.send(json.dumps({"type": "session.end"}))

    async def receive():
      try:
        async for msg in ws:
          if isinstance(msg, bytes):
            if msg[:1] == bytes([protocol.AUDIO]):
              audio.append(np.frombuffer(msg[1:], "<i2"))
            continue
          event = json.loads(msg)
          if event.get("type") == "tick":
            ticks.append(event)
            if len(ticks) >= total:
              all_heard.set()
            if event.get("speaking") and state["onset_tick"] is None and len(ticks) * TICK_S >= talk_over_after_s:
              state["onset_tick"] = len(ticks) - 1
          elif event.get("type") in ("tool_call", "tool_result"):
            calls.append(event)
      except ConnectionClosed:
        pass

    reader = asyncio.create_task(receive())
    await send()
    await asyncio.wait_for(reader, timeout=30)

  return _timeline(ticks, audio, sent, state["talk_at"], calls)


def _timeline(ticks: list, audio: list, sent: np.ndarray, talk_tick: int | None, calls: list) -> Recording:
  """Both sides on the tick grid: tick k heard ``user_audio_ms`` of the stream as sent, zero-padded."""
  n = min(len(ticks), len(audio))
  heard = np.zeros(n * SAMPLES_PER_TICK, np.int16)
  cursor, talk_at = 0, None
  talk_sample = None if talk_tick is None else talk_tick * SAMPLES_PER_TICK
  for k in range(n):
    take = min(int(ticks[k].get("user_audio_ms", 200) * SAMPLE_RATE // 1000), len(sent) - cursor)
    heard[k * SAMPLES_PER_TICK : k * SAMPLES_PER_TICK + take] = sent[cursor : cursor + take]
    if talk_sample is not None and talk_at is None and cursor <= talk_sample < cursor + take:
      talk_at = (k * SAMPLES_PER_TICK + talk_sample - cursor) / SAMPLE_RATE
    cursor += take
  model = np.concatenate(audio[:n]) if n else np.zeros(0, np.int16)
  return Recording(heard, model.astype(np.int16), ticks[:n], calls, talk_at)
