"""Conversation records: pickle-free round trip and refusal of broken input."""

import dataclasses

import numpy as np
import pytest

from data_pipeline import record, synthetic
from data_pipeline.testing import marked_conversation


def assert_same(a: record.Conversation, b: record.Conversation):
  assert a.id == b.id and a.events == b.events and a.meta == b.meta
  np.testing.assert_array_equal(a.user_audio, b.user_audio)
  np.testing.assert_array_equal(a.model_audio, b.model_audio)
  np.testing.assert_array_equal(a.frames, b.frames)
  np.testing.assert_array_equal(a.frame_turns, b.frame_turns)
  assert a.labels.keys() == b.labels.keys()
  for k in a.labels:
    np.testing.assert_array_equal(a.labels[k], b.labels[k])


@pytest.mark.parametrize("index", [0, 2])  # without and with video
def test_roundtrip(index):
  conv = synthetic.conversation(seed=3, index=index)
  data = record.encode(conv)
  assert data[:2] == b"PK"  # a plain npz: no pickle opcodes anywhere
  assert_same(record.decode(data), conv)


def test_time_to_turn_on_the_sample_grid():
  assert record.turn_of(0.6) == 3 and record.turn_of(0.4) == 2 and record.turn_of(0.1999) == 0
  assert record.turn_of(0.2 - 0.4 / record.SAMPLE_RATE) == 1  # rounds to the sample at 0.2 s


def test_event_outside_audio_is_refused_naming_the_conversation():
  conv = marked_conversation([1.0], seconds=2.0)
  conv.events.append(record.Event("user_text", 1.9, 2.5, "late"))
  with pytest.raises(record.RecordError, match="'marked'.*outside its audio"):
    record.encode(conv)
  conv = marked_conversation([1.0], seconds=2.0)
  conv.model_audio = conv.model_audio[:8000]  # model track 0.5 s: its words must end by then
  conv.events = [record.Event("model_text", 0.4, 0.6, "x")]
  with pytest.raises(record.RecordError, match="'marked'.*model_text"):
    record.validate(conv)


def test_bad_frames_and_labels_are_refused():
  conv = marked_conversation([1.0], seconds=2.0)
  bad = dataclasses.replace(conv, frame_turns=conv.frame_turns[::-1].copy())
  with pytest.raises(record.RecordError, match="strictly increasing"):
    record.validate(bad)
  bad = dataclasses.replace(conv, labels={"cue": np.zeros(3, np.int32)})
  with pytest.raises(record.RecordError, match="one value per micro-turn"):
    record.validate(bad)


def test_truncated_or_corrupted_bytes_raise_record_error():
  data = record.encode(marked_conversation([1.0], seconds=2.0))
  with pytest.raises(record.RecordError, match="undecodable"):
    record.decode(data[: len(data) // 2])
  flipped = bytearray(data)
  flipped[len(data) // 3] ^= 0xFF  # inside the audio: caught by the member's CRC-32
  with pytest.raises(record.RecordError):
    record.decode(bytes(flipped))
