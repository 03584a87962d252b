r"""Record a live session with the server: the user's speech in, the model's speech out, as a stereo WAV.

  python -m launch.record --url ws://127.0.0.1:8000/v1/session --token_file token.txt \
      --say "what is two plus three" --voice en-us+f4 --output session.wav

The user side is spoken by espeak-ng (``--say`` in ``--voice``; or ``--wav FILE``) and streamed
in real time from ``--at`` seconds on; ``--talk_over TEXT`` adds a second voice that talks over
the model ``--talk_over_delay`` seconds after it starts speaking. The WAV's left channel is what
the server heard, the right what the model said, on one timeline; the model's text, tool calls and
speaking ticks are printed.
"""

from __future__ import annotations

import asyncio
import os
import pathlib

import numpy as np
from absl import flags

from data_pipeline import speech, wav
from launch import cli
from serving import live_client, protocol

FLAGS = cli.flag_values()
_URL = flags.DEFINE_string("url", "ws://127.0.0.1:8000/v1/session", "The server's session endpoint.", flag_values=FLAGS)
_TOKEN = flags.DEFINE_string(
  "token", None, "Bearer token (default: --token_file, else $INTERACTION_SERVER_TOKEN).", flag_values=FLAGS
)
_TOKEN_FILE = flags.DEFINE_string("token_file", None, "File holding the bearer token.", flag_values=FLAGS)
_SAY = flags.DEFINE_string("say", "what is two plus three", "What the user says (espeak-ng).", flag_values=FLAGS)
_VOICE = flags.DEFINE_string("voice", "en-us+f4", "espeak-ng voice of the user: accent[+variant].", flag_values=FLAGS)
_RATE = flags.DEFINE_integer("rate", 170, "Words per minute of the user's voice.", flag_values=FLAGS)
_WAV = flags.DEFINE_string("wav", None, "Send this WAV file (any rate/channels) instead of --say.", flag_values=FLAGS)
_AT = flags.DEFINE_float("at", 0.6, "Seconds of silence before the user speaks.", flag_values=FLAGS)
_TALK_OVER = flags.DEFINE_string(
  "talk_over", None, "A second voice that talks over the model, e.g. 'stop please'.", flag_values=FLAGS
)
_TALK_VOICE = flags.DEFINE_string(
  "talk_over_voice", "en-gb-scotland+m3", "espeak-ng voice of the second speaker.", flag_values=FLAGS
)
_TALK_DELAY = flags.DEFINE_float("talk_over_delay", 0.4, "Seconds after the model starts speaking.", flag_values=FLAGS)
_SECONDS = flags.DEFINE_float("seconds", 8.0, "Length of the session.", flag_values=FLAGS)
_OUTPUT = flags.DEFINE_string(
  "output", "session.wav", "Stereo WAV to write (left: user, right: model).", flag_values=FLAGS
)


def _voice(name: str, rate: int) -> speech.Voice:
  accent, _, variant = name.partition("+")
  return speech.Voice(accent=accent, variant=variant, rate=rate)


def _clip(text: str, voice: speech.Voice) -> np.ndarray:
  x, _ = speech.say(text.replace(",", " ").split(), voice)
  return np.round(x * (0.7 / max(float(np.abs(x).max()), 1e-6)) * 32767).astype(np.int16)


def _token() -> str:
  if _TOKEN.value:
    return _TOKEN.value
  if _TOKEN_FILE.value:
    return pathlib.Path(_TOKEN_FILE.value).read_text().strip()
  token = os.environ.get(protocol.TOKEN_ENV)
  if not token:
    raise cli.UsageError(f"no token: pass --token, --token_file or set {protocol.TOKEN_ENV}")
  return token


def main(argv=None) -> int:
  """Stream the user's side to the server in real time, record both sides, write the WAV."""
  cli.parse(FLAGS, argv, doc=__doc__, prog="python -m launch.record")
  if _WAV.value:
    x, rate = wav.read_wav(_WAV.value)
    user = wav.to_int16(wav.resample(x, rate, live_client.SAMPLE_RATE))
  else:
    user = _clip(_SAY.value, _voice(_VOICE.value, _RATE.value))
  lead = np.zeros(int(_AT.value * live_client.SAMPLE_RATE), np.int16)
  speech_end = (len(lead) + len(user)) / live_client.SAMPLE_RATE
  other = _clip(_TALK_OVER.value, _voice(_TALK_VOICE.value, 180)) if _TALK_OVER.value else None
  rec = asyncio.run(
    live_client.record(
      _URL.value,
      _token(),
      np.concatenate([lead, user]),
      seconds=_SECONDS.value,
      talk_over=other,
      talk_over_after_s=speech_end,
      talk_over_delay_s=_TALK_DELAY.value,
    )
  )
  path = rec.write_wav(_OUTPUT.value)
  print(
    f"wrote {path} ({len(rec.ticks)} ticks, {len(rec.user) / live_client.SAMPLE_RATE:.1f} s; left user, right model)"
  )
  print(f"user speech ends at {speech_end:.2f} s; model voice starts at {[round(t, 2) for t in rec.model_onsets()]} s")
  if rec.talk_over_at_s is not None:
    end = rec.model_voice_end_after(rec.talk_over_at_s)
    print(f"second voice at {rec.talk_over_at_s:.2f} s; model voice stops at {end if end is None else round(end, 2)} s")
  print(f"model text: {rec.text()!r}")
  for call in rec.calls:
    print(f"  {call['type']}: {call.get('request', call.get('text'))!r} (turn {call.get('turn')})")
  return 0


if __name__ == "__main__":
  cli.run(main, refused=(OSError, wav.WavError))
