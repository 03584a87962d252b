"""The live server's media work: the one text_out decoder, speech and voicing, video decode."""

import io
import pathlib
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from data_pipeline import featurize
from interaction import layout, text
from serving import calls, media, protocol

STARTS = (text.TOOL_CALL_START, text.DELEGATE_START)
ENDS = (text.TOOL_CALL_END, text.DELEGATE_END)


def reference_speech(tokens) -> bytes:
  """Speech as the data lays it out: bytes outside marker pairs (any start opens, any end closes)."""
  said, inside = bytearray(), False
  for tok in tokens:
    if tok in STARTS:
      inside = True
    elif tok in ENDS:
      inside = False
    elif tok < text.NUM_BYTES and not inside:
      said.append(tok)
  return bytes(said)


def reference_calls(tokens) -> list:
  """Calls: a start opens a request of its kind, its own end closes it, a runaway request is dropped."""
  done, kind, buf = [], None, bytearray()
  pairs = {"tool": (text.TOOL_CALL_START, text.TOOL_CALL_END), "background": (text.DELEGATE_START, text.DELEGATE_END)}
  for tok in tokens:
    for k, (start, end) in pairs.items():
      if tok == start:
        kind, buf = k, bytearray()
      elif tok == end and kind == k:
        done.append((k, buf.decode("utf-8", errors="replace")))
        kind = None
    if kind is not None and tok < text.NUM_BYTES:
      buf.append(tok)
      if len(buf) > calls.MAX_CALL_BYTES:
        kind = None
  return done


def random_text_out(rng, n: int) -> list[int]:
  """Bytes, silence, every special, well- and ill-formed marker pairs, runaway calls."""
  out = []
  while len(out) < n:
    r = rng.random()
    if r < 0.5:
      out += list(rng.integers(0, 256, int(rng.integers(1, 12))))
    elif r < 0.7:
      out += [text.PAD] * int(rng.integers(1, 6))
    elif r < 0.95:
      out.append(int(rng.integers(text.NUM_BYTES, text.VOCAB_SIZE)))
    else:
      out += [int(rng.choice(STARTS)), *([ord("x")] * int(rng.integers(400, 700)))]
  return [int(t) for t in out]


@pytest.mark.parametrize("seed", range(5))
def test_the_decoder_streamed_in_ticks_equals_the_reference_rules(seed):
  rng = np.random.default_rng(seed)
  tokens = random_text_out(rng, 20_000)
  assert set(tokens) >= {*STARTS, *ENDS}
  decoder, parser = calls.TextOutDecoder(), calls.MarkerParser()
  spoken, found, fed, breaks = bytearray(), [], [], 0
  cuts = np.sort(rng.integers(0, len(tokens), 400))
  for lo, hi in zip([0, *cuts], [*cuts, len(tokens)], strict=True):  # ticks of any length, empty ones included
    chunk = np.asarray(tokens[lo:hi], np.int32)
    out = decoder.decode(chunk)
    assert all(0 <= b <= len(out.spoken) for b in out.breaks)
    spoken += out.spoken
    found += out.calls
    breaks += len(out.breaks)
    fed += parser.feed(chunk)
  assert bytes(spoken) == reference_speech(tokens)
  assert found == fed == reference_calls(tokens)
  assert found and breaks == sum(t in STARTS or t in ENDS for t in tokens)


def test_speech_and_calls_of_a_well_formed_stream():
  tokens = [*text.encode("hi "), text.PAD, text.TOOL_CALL_START, *text.encode("add(2,3)"), text.TOOL_CALL_END]
  tokens += [text.TOOL_RESULT_START, *text.encode("5"), text.TOOL_RESULT_END, *text.encode("it is 5")]
  out = calls.TextOutDecoder().decode(tokens)
  assert out.spoken == b"hi 5it is 5"  # result markers are text_in's: outside a call pair their bytes are speech
  assert out.calls == (("tool", "add(2,3)"),) and out.breaks == (3, 3)


def test_a_character_split_across_ticks_is_said_whole():
  state = media.SessionMedia()
  word = "héllo wörld".encode()
  said = [state.said(np.asarray(list(word[i : i + 2]), np.int32)) for i in range(0, len(word), 2)]
  assert "".join(said) == "héllo wörld" and "\ufffd" not in "".join(said)


def test_the_model_speaks_when_two_frames_are_voiced():
  spec = layout.StreamSpec("audio_out", "out", "audio", 5, mel_channels=8, mel_levels=16, mel_min=-11.5, mel_max=2.5)
  silent = np.full((3, 5, 8), -11.5, np.float32)
  one, two = silent.copy(), silent.copy()
  one[1, 2, 3] = 0.0
  two[2, [0, 4], 1] = spec.voice_level + 0.01
  assert media.speaking(silent, spec).tolist() == [False] * 3
  assert media.speaking(one, spec).tolist() == [False] * 3
  assert media.speaking(two, spec).tolist() == [False, False, True]
  at_level = silent.copy()
  at_level[0, :, 0] = spec.voice_level  # not above it
  assert not media.speaking(at_level, spec)[0]


def test_user_speech_energy_threshold():
  assert not media.user_speaking(np.zeros(3200, np.int16))
  assert not media.user_speaking(np.zeros(0, np.int16))
  assert media.user_speaking(np.full(3200, 400, np.int16))  # -38 dBFS
  assert not media.user_speaking(np.full(3200, 300, np.int16))  # -40.8 dBFS


def test_video_frames_decode_to_the_model_frame():
  rng = np.random.default_rng(0)
  rgb = rng.integers(0, 256, (30, 50, 3), np.uint8)
  raw = bytes([0x32, 0, 0x1E, 0]) + rgb.tobytes()
  got = media.decode_video(protocol.RAW, raw, (40, 40))
  np.testing.assert_array_equal(got, featurize.resize(rgb[None], (40, 40))[0])
  buf = io.BytesIO()
  Image.fromarray(np.full((120, 160, 3), 200, np.uint8)).save(buf, format="JPEG")
  jpeg = media.decode_video(protocol.JPEG, buf.getvalue(), (40, 40))
  assert jpeg.shape == (40, 40, 3) and jpeg.dtype == np.uint8 and abs(int(jpeg.mean()) - 200) <= 2
  for kind, payload in [(protocol.JPEG, b"\xff\xd8\xff\xe0junk"), (protocol.RAW, raw[:-1])]:
    with pytest.raises(protocol.ClientError) as e:
      media.decode_video(kind, payload, (40, 40))
    assert e.value.code == "bad_video"


def dense_resize(frames: np.ndarray, shape, dtype=np.float32) -> np.ndarray:
  """The resize as it was: the dense filter matrices in one 3-operand einsum (seconds for a 640x480 frame)."""
  h, w = frames.shape[-3:-1]
  my, mx = featurize._resize_matrix(h, shape[0]), featurize._resize_matrix(w, shape[1])
  return np.einsum("yh,...hwc,xw->...yxc", my.astype(dtype), frames.astype(dtype), mx.astype(dtype))


@pytest.mark.parametrize("size", [(120, 160), (30, 50), (97, 131), (40, 80), (80, 40), (20, 20), (41, 41)])
def test_the_fast_resize_is_the_dense_filter(size):
  frames = np.random.default_rng(sum(size)).integers(0, 256, (2, *size, 3), np.uint8)
  new = featurize.resize(frames, (40, 40))
  old = np.clip(np.round(dense_resize(frames, (40, 40))), 0, 255).astype(np.uint8)
  exact = dense_resize(frames, (40, 40), np.float64)
  assert new.shape == (2, 40, 40, 3) and new.dtype == np.uint8
  assert np.abs(new.astype(int) - old).max() <= 1
  # They differ only at rounding ties (a block mean of whole pixels lands on .5), where float error picks the side.
  tie = np.abs(exact - np.floor(exact) - 0.5) < 1e-3
  np.testing.assert_array_equal(new[~tie], old[~tie])
  assert np.abs(new - exact).max() <= 0.5 + 1e-3


def test_a_raw_frame_of_the_largest_size_decodes_in_milliseconds():
  rng = np.random.default_rng(0)
  for w, h in [(640, 480), (4096, 85)]:  # 921,604 and 1,044,484 bytes: within the default 1 MiB message limit
    payload = bytes([w & 255, w >> 8, h & 255, h >> 8]) + rng.integers(0, 256, w * h * 3, np.uint8).tobytes()
    assert len(payload) + 1 <= protocol.Limits().max_message_bytes
    spent = []
    for _ in range(5):
      t = time.perf_counter()
      frame = media.decode_video(protocol.RAW, payload, (40, 40))
      spent.append(time.perf_counter() - t)
    assert frame.shape == (40, 40, 3)
    assert sorted(spent)[2] < 0.05, (w, h, spent)  # ~2 ms and ~6 ms idle; it took 4.5 s for 640x480 before


def test_the_server_imports_no_evaluation_code():
  """The live server decides voicing and reads text_out itself: evaluation (serving.eval) is not loaded."""
  code = "import sys, serving.server; print(sorted(m for m in sys.modules if m.startswith('serving.eval')))"
  root = pathlib.Path(__file__).parent.parent
  out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True, timeout=300)
  assert out.stdout.strip() == "[]", out.stdout + out.stderr
