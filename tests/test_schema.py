"""Schemas stated once: typed step outputs, the batch schema, the stream lookup, silence and voicing per spec."""

import dataclasses
import pathlib
import re

import jax
import numpy as np
import pytest

from data_pipeline import audio, featurize, synthetic
from interaction import layout, objective, schema, sharding, text, train_step
from interaction import step as step_lib
from launch import aot
from serving.background import silent_inputs
from tests.helpers import SMALL_MODEL, make_model, random_batch, tiny_cfg

ROOT = pathlib.Path(__file__).parent.parent
LIBRARY = ("interaction", "data_pipeline", "serving", "launch")


@pytest.fixture(scope="module")
def cfg():
  return tiny_cfg(**SMALL_MODEL)


@pytest.fixture(scope="module")
def conversation():
  return synthetic.conversation(5, 0, synthetic.TASKS, 40, "heldout")


# -- typed step outputs -------------------------------------------------------------------------


def test_the_step_returns_typed_outputs_keyed_by_stream(cfg):
  graphdef, params = make_model(cfg)
  step = step_lib.Step(graphdef, cfg)
  state = step_lib.init_state(cfg, 3, cfg.attention_window, temperature=0.0)
  state = state._replace(active=np.array([True, True, False]))
  inputs = {k: v[:, 0] for k, v in random_batch(cfg, 3, 1, seed=2).items() if k in {s.name for s in cfg.directed("in")}}
  _, out = step(params, state, inputs, jax.random.key(0))
  assert isinstance(out, step_lib.TurnOutputs)
  assert sorted(out.values) == sorted(s.name for s in cfg.directed("out"))
  text_outs = sorted(s.name for s in cfg.directed("out") if s.kind == "text")
  assert sorted(out.logprobs) == sorted(out.greedy) == text_outs
  for spec in cfg.directed("out"):
    assert out.values[spec.name].shape == (3, spec.slots, *spec.value_shape)
    assert out.values[spec.name].dtype == spec.dtype
    # The idle slot's values are its stream's silence.
    assert np.asarray(spec.silent(np.asarray(out.values[spec.name])[2])).all()
  name = cfg.stream("text", "out").name
  # Greedy sampling (temperature 0) emits the greedy choice; the log-probs are of what was emitted.
  np.testing.assert_array_equal(np.asarray(out.values[name])[:2], np.asarray(out.greedy[name])[:2])
  assert np.all(np.asarray(out.logprobs[name]) <= 0)
  row = out.row(1)
  assert row.values[name].shape == (cfg.spec(name).slots,)
  np.testing.assert_array_equal(row.greedy[name], np.asarray(out.greedy[name])[1])


def test_no_output_is_looked_up_by_a_suffixed_name():
  pattern = re.compile(r"""_logprobs["']|_greedy["']""")
  hits = [
    f"{p.relative_to(ROOT)}:{i}"
    for pkg in (*LIBRARY, "benchmarks", "tests")
    for p in sorted((ROOT / pkg).rglob("*.py"))
    if p.name != "test_schema.py"
    for i, line in enumerate(p.read_text().splitlines(), 1)
    if pattern.search(line)
  ]
  assert not hits, f"step outputs are TurnOutputs fields, not suffixed keys: {hits}"


# -- one batch schema ---------------------------------------------------------------------------


def test_featurized_windows_match_the_schema_and_hold_nothing_else_the_model_reads(cfg, conversation):
  win = featurize.window(cfg.streams, conversation, 0, 6)
  schema.check(cfg.streams, win, batch_dims=0, turns=6)
  assert set(win) - {f.name for f in schema.fields(cfg.streams)} == {"labels"}
  assert "heard" in win  # the training-only target, declared optional
  assert [f.name for f in schema.fields(cfg.streams) if not f.required] == ["heard"]
  stacked = jax.tree.map(lambda *x: np.stack(x), win, featurize.window(cfg.streams, conversation, 6, 6))
  schema.check(cfg.streams, stacked, batch_dims=1, turns=6)
  # The train step keeps exactly the schema's keys.
  assert set(train_step.model_batch(cfg, stacked)) == {f.name for f in schema.fields(cfg.streams)}


def test_the_schema_names_the_key_that_is_wrong(cfg, conversation):
  win = featurize.window(cfg.streams, conversation, 0, 4)
  with pytest.raises(ValueError, match=r"batch key 'turn_mask'.*expected float32 \[N\], got float64"):
    schema.check(cfg.streams, dict(win, turn_mask=win["turn_mask"].astype(np.float64)), batch_dims=0)
  with pytest.raises(
    ValueError, match=r"batch key 'audio_in'.*expected float32 \[5, 4, 32\], got float32 \[4, 4, 32\]"
  ):
    schema.check(cfg.streams, win, batch_dims=0, turns=5)
  with pytest.raises(ValueError, match=r"batch key 'heard'.*expected int32 \[N, 4\], got int32 \[4, 3\]"):
    schema.check(cfg.streams, dict(win, heard=win["heard"][:, :3]), batch_dims=0)
  with pytest.raises(ValueError, match=r"batch is missing 'first_turn'"):
    schema.check(cfg.streams, {k: v for k, v in win.items() if k != "first_turn"}, batch_dims=0)
  with pytest.raises(ValueError, match=r"batch is missing \['turn_mask'\]"):
    train_step.model_batch(cfg, {k: v for k, v in win.items() if k != "turn_mask"})
  schema.check(cfg.streams, {k: v for k, v in win.items() if k != "heard"}, batch_dims=0)  # optional


def test_tests_aot_and_the_pipeline_build_the_same_batch(cfg, conversation):
  b, n = 2, 5
  want = schema.shapes(cfg.streams, b, n)
  mesh = sharding.make_mesh({"data": 1}, jax.devices()[:1])
  abstract = aot.abstract_batch(cfg, b, n, mesh)
  assert {k: (v.shape, np.dtype(v.dtype)) for k, v in abstract.items()} == want
  fake = random_batch(cfg, b, n)
  schema.check(cfg.streams, fake, batch_dims=1, turns=n)
  assert {k: (v.shape, v.dtype) for k, v in fake.items()} == schema.shapes(cfg.streams, b, n, optional=False)
  real = jax.tree.map(lambda *x: np.stack(x), *[featurize.window(cfg.streams, conversation, 0, n)] * b)
  assert {k: (v.shape, v.dtype) for k, v in train_step.model_batch(cfg, real).items()} == want


# -- one stream lookup --------------------------------------------------------------------------


def test_the_stream_lookup(cfg):
  assert cfg.stream("audio", "in").name == "audio_in" and cfg.stream("text", "out").name == "text_out"
  assert cfg.stream("video", "out", optional=True) is None
  with pytest.raises(KeyError, match="no video output streams, need exactly one"):
    cfg.stream("video", "out")
  two = dataclasses.replace(cfg, streams=(*cfg.streams, dataclasses.replace(cfg.spec("text_in"), name="typed")))
  with pytest.raises(KeyError, match=r"2 \(\['text_in', 'typed'\]\) text input streams"):
    two.stream("text", "in", optional=True)
  assert [s.name for s in cfg.directed("in")] == [s.name for s in cfg.streams if s.direction == "in"]


def test_library_code_does_not_rederive_a_stream_by_kind_and_direction():
  pattern = re.compile(r"""kind == ["']\w+["'] and \w+\.direction ==|direction == ["']\w+["'] and \w+\.kind ==""")
  hits = [
    f"{p.relative_to(ROOT)}:{i}"
    for pkg in (*LIBRARY, "benchmarks")
    for p in sorted((ROOT / pkg).rglob("*.py"))
    for i, line in enumerate(p.read_text().splitlines(), 1)
    if pattern.search(line) and "StreamSpec" not in line
  ]
  allowed = {"interaction/layout.py"}  # find_stream itself, and the spec's own checks
  assert [h for h in hits if h.split(":")[0] not in allowed] == []


# -- one silence, one voicing -------------------------------------------------------------------


def test_silence_is_one_value_per_spec_everywhere(cfg):
  specs = {s.kind + "_" + s.direction: s for s in cfg.streams}
  assert specs["text_out"].silence == text.PAD and specs["video_in"].silence == 0
  assert specs["audio_in"].silence == specs["audio_in"].mel_min
  # The log-mel of digital silence is the audio spec's silence (what idle slots and silent inputs hold).
  mel = audio.log_mel(audio.mel_config(specs["audio_in"]), np.zeros(3200, np.float32))
  assert np.all(mel == specs["audio_in"].silence)
  assert audio.silence_value(audio.mel_config(specs["audio_in"])) == specs["audio_in"].silence
  for name, x in silent_inputs(cfg, 2).items():
    assert np.all(x == cfg.spec(name).silence) and np.asarray(cfg.spec(name).silent(x)).all()
  low = dataclasses.replace(specs["audio_in"], mel_min=-20.0)
  with pytest.raises(ValueError, match="digital silence has log-mel -11.5129, not mel_min=-20.0"):
    featurize.check_specs((low, *[s for s in cfg.streams if s.name != low.name]))


def test_silent_slots_and_voiced_turns_follow_the_spec(cfg):
  mel = cfg.stream("audio", "out")
  frames = np.full((3, mel.slots, mel.mel_channels), mel.mel_min, np.float32)
  mid = (mel.mel_min + mel.mel_max) / 2
  frames[1, 0, 5] = mid  # a target frame at the midpoint is still silent
  frames[2, :2, 0] = mid + 0.01
  np.testing.assert_array_equal(objective.silent_slots(mel, frames), mel.silent(frames))
  assert mel.silent(frames)[:, :2].tolist() == [[True, True], [True, True], [False, False]]
  # A predicted frame is voiced only VOICE_MARGIN above the midpoint, a turn with VOICED_FRAMES of them.
  assert mel.voice_level == mid + layout.VOICE_MARGIN == -4.0  # the level the server and evaluation used
  assert mel.voiced(frames).tolist() == [False, False, False]
  frames[2, :2, 0] = mel.voice_level + 0.01
  assert mel.voiced(frames).tolist() == [False, False, True]
  frames[2, 1, 0] = mel.voice_level
  assert mel.voiced(frames).tolist() == [False, False, False]
  words = cfg.stream("text", "out")
  ids = np.array([[text.PAD, 104, text.TOOL_CALL_START, text.PAD]])
  assert words.silent(ids).tolist() == [[True, False, False, True]]
  with pytest.raises(ValueError, match="only audio has a voice level"):
    words.voice_level  # noqa: B018


def test_pcm_speech_energy():
  assert not layout.pcm_speech(np.zeros(3200)) and not layout.pcm_speech(np.zeros(0))
  assert layout.pcm_speech(np.full(3200, 0.0101)) and not layout.pcm_speech(np.full(3200, 0.0099))


def test_silence_and_voicing_thresholds_live_in_one_place():
  pattern = re.compile(r"^\s*(VOICE_LEVEL|SPEECH_LEVEL|SPEECH_RMS|SPEECH_FRAMES|VOICED_FRAMES|PCM_SPEECH_RMS)\s*=")
  defined = [
    f"{p.relative_to(ROOT)}:{i}"
    for pkg in LIBRARY
    for p in sorted((ROOT / pkg).rglob("*.py"))
    for i, line in enumerate(p.read_text().splitlines(), 1)
    if pattern.search(line)
  ]
  assert [d.split(":")[0] for d in defined] == ["interaction/layout.py"] * 2, defined
