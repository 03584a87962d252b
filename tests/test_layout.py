"""The micro-turn layout: order, positions, targets and shape checks."""

import numpy as np
import pytest

from interaction import layout, text
from tests.helpers import tiny_cfg


def test_window_order_is_in_out_per_turn():
  cfg = tiny_cfg()
  wl = layout.window_layout(cfg.streams, num_turns=3, first_turn=5)
  s = layout.tokens_per_turn(cfg.streams)
  assert len(wl.position) == 3 * s
  np.testing.assert_array_equal(wl.position, np.arange(5 * s, 8 * s))
  np.testing.assert_array_equal(wl.turn, np.repeat([5, 6, 7], s))
  for t in range(3):
    block = wl.predicted[t * s : (t + 1) * s]
    n_in = layout.input_tokens_per_turn(cfg.streams)
    assert not block[:n_in].any() and block[n_in:].all()
    names = [wl.order[i].name for i in wl.stream[t * s : (t + 1) * s]]
    assert names == [n for spec in layout.block_order(cfg.streams) for n in [spec.name] * spec.slots]


def test_prediction_index_points_at_previous_token():
  cfg = tiny_cfg()
  n = 4
  wl = layout.window_layout(cfg.streams, n)
  for spec in cfg.streams:
    if spec.direction != "out":
      continue
    idx = layout.prediction_index(cfg.streams, spec.name, n)
    assert idx.shape == (n, spec.slots)
    target_tokens = idx + 1
    assert all(wl.order[i].name == spec.name for i in wl.stream[target_tokens.reshape(-1)])
    np.testing.assert_array_equal(wl.slot[target_tokens], np.broadcast_to(np.arange(spec.slots), idx.shape))
    assert wl.predicted[target_tokens].all()
  with pytest.raises(ValueError, match="input stream"):
    layout.prediction_index(cfg.streams, "audio_in", n)


def test_window_targets_only_on_text_outputs():
  cfg = tiny_cfg()
  streams = layout.random_streams(cfg.streams, (3,), seed=1)
  targets = layout.window_targets(cfg.streams, streams)
  wl = layout.window_layout(cfg.streams, 3)
  is_text_out = np.array([wl.order[i].name == "text_out" for i in wl.stream])
  assert (targets[~is_text_out] == -1).all()
  np.testing.assert_array_equal(targets[is_text_out], streams["text_out"].reshape(-1))


def test_check_window_names_stream_and_shape():
  cfg = tiny_cfg()
  streams = layout.random_streams(cfg.streams, (2, 3))
  layout.check_window(cfg.streams, streams, batch_dims=2, num_turns=3)
  bad = dict(streams, audio_in=streams["audio_in"][..., :5])
  with pytest.raises(ValueError, match=r"'audio_in'.*\[B, N, 4, 32\]"):
    layout.check_window(cfg.streams, bad, batch_dims=2)
  with pytest.raises(ValueError, match="'text_in'.*dtype int32"):
    layout.check_window(cfg.streams, dict(streams, text_in=streams["text_in"].astype(np.float32)), batch_dims=2)


def test_bad_specs_are_refused():
  with pytest.raises(ValueError, match="direction"):
    layout.StreamSpec("x", "sideways", "text", 1, vocab_size=10)
  with pytest.raises(ValueError, match="mel_channels"):
    layout.StreamSpec("a", "in", "audio", 2)
  with pytest.raises(ValueError, match="unique"):
    spec = layout.StreamSpec("t", "in", "text", 1, vocab_size=10)
    layout.validate_specs([spec, spec])


def test_text_roundtrip_with_specials():
  ids = np.concatenate([[text.TOOL_CALL_START], text.encode("add 2 3"), [text.TOOL_CALL_END, text.PAD]])
  assert text.decode(ids) == "<tool>add 2 3</tool>"
  assert text.decode(text.encode("héllo")) == "héllo"


def test_model_dmel_codes_match_the_data_pipeline():
  from data_pipeline import audio
  from interaction.embed import dmel_quantize

  spec = tiny_cfg().spec("audio_in")
  mel = (
    np.random.default_rng(0).uniform(spec.mel_min - 1, spec.mel_max + 1, (500, spec.mel_channels)).astype(np.float32)
  )
  args = (spec.mel_levels, spec.mel_min, spec.mel_max)
  np.testing.assert_array_equal(np.asarray(dmel_quantize(mel, *args)), audio.quantize(mel, *args))
  levels = audio.dequantize(np.arange(spec.mel_levels), *args)
  np.testing.assert_array_equal(np.asarray(dmel_quantize(levels, *args)), np.arange(spec.mel_levels))
