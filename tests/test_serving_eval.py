"""Params-only loading and the evaluation job: metrics reach their targets on the data's own behaviour."""

import json

import numpy as np
import pytest
from flax import nnx

from data_pipeline import synthetic
from interaction import ckpt
from interaction.ckpt import trainer as checkpoint
from launch import evaluate as evaluate_job
from serving.eval import evaluate, scores
from tests.helpers import make_model, save_checkpoint


def test_load_params_reads_the_parameters_only(tmp_path):
  workdir = save_checkpoint(tmp_path, with_config_json=False)
  saved_digest = checkpoint.tree_digest(
    nnx.to_pure_dict(make_model(ckpt.open_model(workdir / "checkpoints").cfg, seed=3)[1])
  )
  for path in (workdir, workdir / "checkpoints", workdir / "checkpoints" / "3"):
    loaded = ckpt.open_model(path)  # the config comes from the checkpoint's meta item (no config.json)
    assert loaded.step == 3 and loaded.cfg.num_layers == 2 and loaded.cache_tokens == 68
    assert set(loaded.params) == set(nnx.to_pure_dict(make_model(loaded.cfg)[1]))
    assert checkpoint.tree_digest(loaded.params) == saved_digest
  with pytest.raises(ckpt.CheckpointNotFoundError, match="no step 9"):
    ckpt.open_model(workdir, step=9)
  with pytest.raises(ckpt.CheckpointNotFoundError, match="not a trainer workdir"):
    ckpt.open_model(tmp_path)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  out = tmp_path_factory.mktemp("data")
  synthetic.generate(out, "eval", 2 * len(synthetic.TASKS), seed=11)
  return out


def test_metrics_pass_every_target_on_the_recorded_behaviour(data_dir, tmp_path):
  workdir = save_checkpoint(tmp_path)
  report = evaluate.run(workdir, data_dir, oracle=True, output_dir=tmp_path / "out", timelines=False)
  assert report["all_targets_pass"], report["targets_failed"]
  assert set(scores.TARGETS) <= set(report["figures"])
  for name in ("tool/call_correct", "tool/answer_correct", "delegation/answer_correct", "time/accuracy"):
    assert report["figures"][name]["value"] == 1.0


def test_streamed_evaluation_writes_report_and_timelines_and_gates_on_targets(data_dir, tmp_path, capsys):
  workdir = save_checkpoint(tmp_path)
  out = tmp_path / "out"
  args = ["--checkpoint", str(workdir), "--data", str(data_dir), "--slots", "4", "--output", str(out)]
  one_each = len(synthetic.TASKS)  # the first conversations cycle through the tasks
  code = evaluate_job.main([*args, "--max-conversations", str(one_each), "--require-targets"])
  report = json.loads((out / "report.json").read_text())
  printed = capsys.readouterr().out
  assert code == 1 and not report["all_targets_pass"]  # random parameters cannot take turns
  for name, (op, target) in scores.TARGETS.items():
    fig = report["figures"][name]
    assert fig["target"] == target and fig["op"] == op and isinstance(fig["pass"], bool)
    assert name in printed
  assert sum(report["conversations"].values()) == one_each
  assert sorted(p.name for p in out.glob("timeline-*.png")) == sorted(f"timeline-{t}.png" for t in synthetic.TASKS)
  assert evaluate_job.main([*args, "--oracle"]) == 0


def test_the_evaluation_report_is_the_same_on_one_device_on_a_mesh_and_on_2_replicas(data_dir, tmp_path):
  workdir = save_checkpoint(tmp_path)
  kw = dict(slots=8, max_conversations=len(synthetic.TASKS), timelines=False, progress=False)
  one = evaluate.run(workdir, data_dir, **kw)
  mesh = evaluate.run(workdir, data_dir, mesh={"data": 2, "expert": 4}, **kw)
  replicas = evaluate.run(workdir, data_dir, mesh={"expert": 4}, replicas=2, **kw)
  assert one.pop("placement") == {"devices": 1}
  assert mesh.pop("placement") == {"mesh": {"data": 2, "expert": 4}}
  assert replicas.pop("placement") == {"replicas": 2, "mesh": {"expert": 4}}
  assert sum(one["conversations"].values()) == len(synthetic.TASKS)
  # Every figure and count: greedy sessions see the same tokens on every placement, and a conversation
  # keeps its sampling seed whichever replica streams it.
  assert mesh == one and replicas == one


def test_a_mesh_larger_than_the_devices_is_refused_in_one_line(data_dir, tmp_path):
  workdir = save_checkpoint(tmp_path)
  args = ["--checkpoint", str(workdir), "--data", str(data_dir)]
  with pytest.raises(SystemExit, match=r"--mesh 'data=4,expert=4': mesh .* needs 16 devices, have 8; a CPU host"):
    evaluate_job.main([*args, "--mesh", "data=4,expert=4"])
  with pytest.raises(SystemExit, match=r"slots=6 cannot be split over the mesh's batch axes \(8 ways"):
    evaluate_job.main([*args, "--mesh", "data=2,expert=4", "--slots", "6"])
  with pytest.raises(SystemExit, match=r"--mesh 'expert=8': mesh .* needs 8 devices, have 4"):
    evaluate_job.main([*args, "--mesh", "expert=8", "--replicas", "2"])


def test_evaluation_cli_names_a_missing_checkpoint_or_dataset_in_one_line(data_dir, tmp_path):
  workdir = save_checkpoint(tmp_path)
  with pytest.raises(SystemExit, match=r"^error: .*nowhere: no such directory\n.*--checkpoint workdir/demo"):
    evaluate_job.main(["--checkpoint", str(tmp_path / "nowhere"), "--data", str(data_dir)])
  with pytest.raises(SystemExit, match=r"^error: .*no manifest"):
    evaluate_job.main(["--checkpoint", str(workdir), "--data", str(tmp_path)])
  with pytest.raises(SystemExit, match="--slots must be >= 1"):
    evaluate_job.main(["--checkpoint", str(workdir), "--data", str(data_dir), "--slots", "0"])


def test_spoken_words_skip_call_contents():
  from interaction import text

  ids = [*text.encode("let me"), text.TOOL_CALL_START, *text.encode("add(1,2)"), text.TOOL_CALL_END]
  ids += [*text.encode(" check three ")]
  ids += [text.PAD] * (-len(ids) % 4)
  words = scores.spoken_words(np.array(ids).reshape(-1, 4))
  assert [w for _, w in words] == ["let", "me", "check", "three"]
  assert words[0][0] == 0 and words[-1][0] == 23 // 4  # "three" starts at byte 23


def test_replay_scores_first_windows_and_leaves_continuations_out():
  from experiments import tiny
  from interaction import config as config_lib
  from serving.eval import replay
  from tests.helpers import SMALL_MODEL, random_batch

  config = tiny.get_config()
  config.model.update(SMALL_MODEL)
  cfg = config_lib.model_config(config)
  graphdef, params = make_model(cfg, seed=3)
  batch = random_batch(cfg, 3, 4, seed=5, first_turn=[0, 4, 0])
  batch |= {"turn_mask": np.ones((3, 4), np.int32), "labels": {"task": np.array([[0] * 4, [1] * 4, [2] * 4])}}
  assert replay.first_windows(dict(batch, first_turn=np.array([4, 8, 4]))) is None
  kept = replay.first_windows(batch)
  assert kept["first_turn"].tolist() == [0, 0] and kept["labels"]["task"][:, 0].tolist() == [0, 2]
  scores = replay.replay(cfg, graphdef, nnx.to_pure_dict(params), [batch], cache_tokens=cfg.attention_window)
  assert sorted(scores) == [0, 2]  # the continuation window (task 1) is not scored
  with pytest.raises(ValueError, match="start at micro-turn 0"):
    replay.replay_batch(None, cfg, params, batch, cfg.attention_window)


def test_evaluation_feeds_text_in_only_what_a_live_client_sends(data_dir, tmp_path):
  """The user's speech reaches the model as audio only: no spoken word is ever in the text_in fed."""
  from data_pipeline import record
  from interaction import text

  workdir = save_checkpoint(tmp_path)
  convs = evaluate.read_conversations(data_dir)
  typed = record.Conversation(
    id="typed", user_audio=convs[0].user_audio, model_audio=convs[0].model_audio,
    events=[record.Event("user_text", 0.4, 0.6, "typed words ")], meta={"task": "turn_taking"},
  )  # fmt: skip
  loaded = ckpt.open_model(workdir)
  from serving.background import ArithmeticBackground, BackgroundWorker
  from serving.engine import Engine, Sampling
  from serving.tools import ToolRuntime

  engine = Engine.from_loaded(loaded, slots=4, tools=ToolRuntime(), background=BackgroundWorker(ArithmeticBackground()))
  try:
    trs = evaluate.stream_through_engine(engine, loaded.cfg, [*convs, typed], Sampling(1.0, 1.0, 0), progress=False)
  finally:
    engine.close()
  results = {text.TOOL_RESULT_START: text.TOOL_RESULT_END, text.BACKGROUND_RESULT_START: text.BACKGROUND_RESULT_END}
  for conv, tr in zip([*convs, typed], trs, strict=True):
    outside, close = [], None  # text_in bytes outside call results: what the client itself sent
    for tok in tr.text_in.reshape(-1).tolist():
      if close is None and tok in results:
        close = results[tok]
      elif tok == close:
        close = None
      elif close is None and tok != text.PAD:
        outside.append(tok)
    sent = bytes(outside).decode()
    if conv.id == "typed":
      assert sent == "typed words "  # typed text does reach the model (so this test can fail)
    else:
      assert sent == "", (conv.id, sent)
      assert conv.meta["user_words"] or conv.meta["task"] == "idle", conv.id  # the user did speak
