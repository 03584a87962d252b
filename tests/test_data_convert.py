"""The folder-of-recordings converter, including real speech from espeak-ng."""

import json
import shutil
import subprocess

import numpy as np
import pytest

from data_pipeline import convert, pipeline, record, shards, synthetic, wav
from data_pipeline.record import SAMPLE_RATE
from data_pipeline.testing import tiny_config
from interaction import layout, text
from launch import data as launch_data


def write_folder(folder, conv: record.Conversation, rate=SAMPLE_RATE):
  """The converter's input layout for one conversation (what a recording tool would produce)."""
  folder.mkdir(parents=True)
  for name, pcm in (("user.wav", conv.user_audio), ("model.wav", conv.model_audio)):
    x = pcm.astype(np.float32) / 32768
    wav.write_wav(folder / name, x if rate == SAMPLE_RATE else wav.resample(x, SAMPLE_RATE, rate), rate)
  spoken = [{"word": w, "start": a, "end": b} for a, b, w in conv.meta.get("user_words", [])]
  words = {"user": spoken, "model": [], "typed": []}
  events = []
  for e in conv.events:
    if e.kind == "model_text":
      words["model"].append({"word": e.text.strip(), "start": e.start, "end": e.end})
    elif e.kind == "user_text":
      words["typed"].append({"text": e.text, "start": e.start, "end": e.end})
    else:
      events.append({"type": e.kind, "start": e.start, "end": e.end, "text": e.text})
  labels = {k: v.tolist() for k, v in conv.labels.items()}
  (folder / "transcript.json").write_text(json.dumps({"id": conv.id, **words, "events": events, "labels": labels}))
  if conv.frames is not None:
    (folder / "frames").mkdir()
    for f, k in zip(conv.frames, conv.frame_turns, strict=True):
      np.save(folder / "frames" / f"{int(k) * 200:06d}.npy", f)


def test_converts_a_folder_exactly(tmp_path):
  convs = [synthetic.conversation(2, i) for i in (0, 2, 5)]
  for c in convs:
    write_folder(tmp_path / "in" / c.id, c)
  assert launch_data.main(["convert", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out")]) == 0
  (shard,) = shards.read_split(tmp_path / "out", "train")
  from array_record.python.array_record_module import ArrayRecordReader

  reader = ArrayRecordReader(str(tmp_path / "out" / shard.file))
  got = {c.id: c for c in map(record.decode, reader.read_all())}
  for c in convs:
    g = got[c.id]
    np.testing.assert_array_equal(g.user_audio, c.user_audio)
    np.testing.assert_array_equal(g.frames, c.frames)
    assert g.events == c.events and g.labels.keys() == c.labels.keys()
    assert g.meta["user_words"] == [list(w) for w in c.meta["user_words"]]  # spoken words: targets, not text_in
    if c.frames is not None:
      np.testing.assert_array_equal(g.frame_turns, c.frame_turns)
    assert g.num_turns == c.num_turns


@pytest.mark.parametrize("suffix", [".png", ".ppm"])
def test_image_frames_read_with_pillow_equal_npy_frames(tmp_path, suffix):
  from PIL import Image

  conv = synthetic.conversation(2, 2)
  assert conv.frames is not None
  write_folder(tmp_path / "in" / "a", conv)
  for f in sorted((tmp_path / "in" / "a" / "frames").iterdir()):  # the same frames as lossless images
    Image.fromarray(np.load(f)).save(f.with_suffix(suffix))
    f.unlink()
  got = convert.load_conversation(tmp_path / "in" / "a")
  np.testing.assert_array_equal(got.frames, conv.frames)
  np.testing.assert_array_equal(got.frame_turns, conv.frame_turns)


def test_an_unreadable_frame_is_refused_naming_the_file(tmp_path):
  conv = synthetic.conversation(2, 2)
  write_folder(tmp_path / "in" / "a", conv)
  first = sorted((tmp_path / "in" / "a" / "frames").iterdir())[0]
  first.unlink()
  first.with_suffix(".png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
  with pytest.raises(convert.ConversionError, match=f"{first.stem}.png: not a readable image"):
    convert.load_conversation(tmp_path / "in" / "a")


def test_other_sample_rate_is_resampled(tmp_path):
  conv = synthetic.conversation(2, 0)
  write_folder(tmp_path / "in" / "a", conv, rate=22050)
  stats = convert.convert(tmp_path / "in", tmp_path / "out", progress=False)
  assert stats["resampled"] == 2
  got = convert.load_conversation(tmp_path / "in" / "a")
  assert abs(len(got.user_audio) - len(conv.user_audio)) <= 2
  n = min(len(got.user_audio), len(conv.user_audio))
  # Below 7 kHz (the round trip's filters roll off towards the 8 kHz Nyquist edge, where the synthetic
  # room noise has energy) the signal comes back within 2%.
  band = np.fft.rfftfreq(n, 1 / SAMPLE_RATE) < 7000
  got_f, want_f = np.fft.rfft(got.user_audio[:n].astype(float)), np.fft.rfft(conv.user_audio[:n].astype(float))
  assert np.linalg.norm((got_f - want_f)[band]) < 0.02 * np.linalg.norm(want_f[band])


def test_event_outside_the_audio_is_refused_naming_the_conversation(tmp_path):
  conv = synthetic.conversation(2, 0)
  write_folder(tmp_path / "in" / "a", conv)
  tr = json.loads((tmp_path / "in" / "a" / "transcript.json").read_text())
  tr["user"].append({"word": "late", "start": conv.duration + 1.0, "end": conv.duration + 1.5})
  (tmp_path / "in" / "a" / "transcript.json").write_text(json.dumps(tr))
  with pytest.raises(SystemExit, match=f"^error: .*conversation '{conv.id}'.*outside its audio") as e:
    launch_data.main(["convert", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out")])
  assert e.value.code == 2 and "\n" not in str(e.value)


def espeak(words: str, path):
  subprocess.run(["espeak-ng", "-s", "170", "-w", str(path), words], check=True, capture_output=True)
  x, rate = wav.read_wav(path)
  return wav.resample(x, rate, SAMPLE_RATE)


@pytest.mark.skipif(
  shutil.which("espeak-ng") is None,
  reason="espeak-ng is not installed (.ci/run installs it: apt-get install -y espeak-ng)",
)
def test_real_speech_conversation(tmp_path):
  """espeak-ng utterances -> a conversation folder at 22.05 kHz -> shards -> batches with speech where the words are."""
  raw = tmp_path / "raw"
  raw.mkdir()
  lines = [("user", "what is the weather like today"), ("model", "it is sunny and warm"), ("user", "thank you")]
  tracks = {"user": np.zeros(0, np.float32), "model": np.zeros(0, np.float32)}
  t, spans = 0.3, []
  for i, (who, words) in enumerate(lines):
    x = espeak(words, raw / f"{i}.wav")
    for track in tracks.values():  # both tracks advance together; silence on the other side
      track.resize(int(t * SAMPLE_RATE), refcheck=False)
    tracks[who] = np.concatenate([tracks[who], x])
    spans.append((who, words, t, t + len(x) / SAMPLE_RATE))
    t += len(x) / SAMPLE_RATE + 0.5
  conv_dir = tmp_path / "in" / "speech"
  conv_dir.mkdir(parents=True)
  n = int(t * SAMPLE_RATE)
  for who, x in tracks.items():
    y = np.zeros(n, np.float32)
    y[: len(x)] = x
    wav.write_wav(conv_dir / f"{who}.wav", wav.resample(y, SAMPLE_RATE, 22050), 22050)
  transcript = {"user": [], "model": []}
  for who, words, a, b in spans:  # utterance-level timing: one "word" per utterance
    transcript[who].append({"word": words, "start": a, "end": b})
  (conv_dir / "transcript.json").write_text(json.dumps(transcript))
  stats = convert.convert(tmp_path / "in", tmp_path / "out", progress=False)
  assert stats["resampled"] == 2
  cfg = tiny_config(window_turns=8, batch_size=1)
  it = pipeline.make_pipeline(cfg, tmp_path / "out", shuffle=False, num_epochs=1, process_index=0, process_count=1)
  batches = list(it)
  specs = pipeline.stream_specs(cfg)
  for b in batches:
    layout.check_window(specs, b, batch_dims=2, num_turns=8)
  energy = {k: np.concatenate([b[k][0].mean(axis=(1, 2)) for b in batches]) for k in ("audio_in", "audio_out")}
  for who, words, a, b in spans:
    e = energy["audio_in" if who == "user" else "audio_out"]
    inside = e[record.turn_of(a) + 1 : record.turn_of(b) - 1]
    assert inside.mean() > e.min() + 3.0, (who, words)
  assert energy["audio_out"][: record.turn_of(spans[1][2])].max() == pytest.approx(-11.5)
  # What the user said reaches the model as audio only: not in text_in, but as the listening target.
  text_in = text.decode(np.concatenate([b["text_in"][0] for b in batches]))
  assert text_in.strip("\x00") == "", text_in
  heard = np.concatenate([b["heard"][0].reshape(-1) for b in batches])
  heard = text.decode(heard[heard > 0])
  assert "what is the weather like today" in heard and "thank you" in heard, heard
  assert "sunny" not in heard  # the model's own words are not heard as the user's
