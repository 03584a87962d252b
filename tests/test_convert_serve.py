"""train -> serve: the engine's step on another mesh equals the trainer checkpoint's; tampering is refused."""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import SingleDeviceSharding

from data_pipeline import synthetic
from experiments import tiny
from interaction import ckpt, sharding
from interaction import step as step_lib
from interaction import train_step as train
from interaction.ckpt import params as params_lib
from interaction.ckpt import serve as serve_checkpoint
from interaction.ckpt import train_to_serve
from interaction.ckpt import trainer as checkpoint
from interaction.ckpt.paths import UnsafePathError
from interaction.experiment import experiment
from launch import evaluate as evaluate_job
from tests.helpers import random_batch, serve_a_session

ROOT = pathlib.Path(__file__).parent.parent
REFUSED = (serve_checkpoint.ServeCheckpointError, UnsafePathError)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A trainer checkpoint (params + optimizer state + meta) saved from a (data=2, expert=4) mesh."""
  config = tiny.get_config()
  config.model.num_layers = 2
  cfg = experiment(config).model
  mesh = sharding.make_mesh({"data": 2, "expert": 4})
  graphdef, state, shardings = train.create(cfg, experiment(config).train, mesh, seed=1)
  workdir = tmp_path_factory.mktemp("wd")
  ckpt = checkpoint.Checkpointer(workdir / "checkpoints", async_save=False)
  ckpt.save(7, state._asdict(), {"pos": 0}, {"config": json.loads(config.to_json()), "mesh": dict(mesh.shape)})
  ckpt.wait()
  single = jax.tree.map(lambda _: SingleDeviceSharding(jax.devices()[0]), shardings)
  target = train.abstract_state(jax.eval_shape(lambda s: s, state), single)
  restored, _, _ = ckpt.restore(7, target._asdict())
  ckpt.close()
  return cfg, graphdef, restored["params"], workdir


def convert_cli(*args):
  out = subprocess.run(
    [sys.executable, "-m", "launch.convert", *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=300
  )
  return out


def run_ticks(step, params, cfg, batch, ticks):
  state = step_lib.init_state(cfg, 2, cfg.attention_window)
  outs = []
  for t in range(ticks):
    inputs = {s.name: batch[s.name][:, t] for s in cfg.streams if s.direction == "in"}
    forced = {s.name: batch[s.name][:, t] for s in cfg.streams if s.direction == "out"}
    state, out = step(params, state, inputs, jax.random.key(0), forced)
    outs.append(jax.device_get(out))
  return jax.tree.map(lambda *x: np.stack(x, 1), *outs)


def test_train_to_serve_then_step_on_another_mesh_matches(trained, tmp_path):
  cfg, graphdef, restored, workdir = trained
  out = convert_cli("train-to-serve", "--src", workdir, "--dst", tmp_path / "serve", "--mesh", "data=1,expert=2")
  assert out.returncode == 0, out.stderr[-2000:]
  assert json.loads(out.stdout.splitlines()[-1])["step"] == 7
  manifest = serve_checkpoint.read_manifest(tmp_path / "serve")
  assert manifest["mesh_hint"] == {"data": 1, "expert": 2}
  assert manifest["arrays"]["moe/blocks/ffn/gate"]["spec"] == [None, "expert", None, None]
  assert not any("opt_state" in n or "mu" in n.split("/") for n in manifest["arrays"])

  mesh = sharding.make_mesh({"data": 1, "expert": 2}, jax.devices()[:2])
  served = serve_checkpoint.load(tmp_path / "serve", mesh)
  gate = served["moe"]["blocks"]["ffn"]["gate"]
  assert gate.sharding.spec[1] == "expert" and set(gate.sharding.device_set) == set(jax.devices()[:2])
  assert checkpoint.tree_digest(served) == checkpoint.tree_digest(restored)

  batch = random_batch(cfg, 2, 3, seed=11)
  step = step_lib.Step(graphdef, cfg)
  want = run_ticks(step, restored, cfg, batch, 3)
  with jax.set_mesh(mesh):
    got = run_ticks(step_lib.Step(graphdef, cfg), served, cfg, batch, 3)
  diff = np.abs(got.logprobs["text_out"] - want.logprobs["text_out"]).max()
  print(f"\nserve (data=1, expert=2) vs trainer checkpoint (1 device): max |dlogp| = {diff:.2e}")
  assert diff <= 1e-5
  np.testing.assert_array_equal(got.greedy["text_out"], want.greedy["text_out"])


def test_cast_to_bfloat16_is_exact_per_array(trained, tmp_path):
  cfg, _, restored, workdir = trained
  train_to_serve.convert(workdir, tmp_path / "bf16", dtype="bfloat16")
  assert serve_checkpoint.model_config(tmp_path / "bf16").param_dtype == "bfloat16"
  want = params_lib.flatten(jax.device_get(restored))
  for name, got in params_lib.flatten(serve_checkpoint.load(tmp_path / "bf16")).items():
    np.testing.assert_array_equal(got.view(np.uint16), want[name].astype(jax.numpy.bfloat16).view(np.uint16))


@pytest.fixture(scope="module")
def served(trained, tmp_path_factory):
  _, _, _, workdir = trained
  d = tmp_path_factory.mktemp("served") / "serve"
  train_to_serve.convert(workdir, d)
  return d, params_lib.flatten(serve_checkpoint.load(d))


def test_random_single_byte_flips_are_refused_or_harmless(served):
  d, clean = served
  files = sorted(p for p in d.rglob("*") if p.is_file())
  arrays = [p for p in files if p.suffix == ".bin"]
  rng = np.random.default_rng(0)
  outcomes = {"refused": 0, "harmless": 0}
  # Half the flips land in the manifest (the config and digests live there), half across the arrays.
  targets = [d / "manifest.json"] * 60 + [arrays[i] for i in rng.integers(0, len(arrays), 60)]
  for path in targets:
    data = bytearray(path.read_bytes())
    at = int(rng.integers(0, len(data)))
    original = data[at]
    data[at] ^= int(rng.integers(1, 256))
    path.write_bytes(data)
    try:
      got = params_lib.flatten(serve_checkpoint.load(d))
    except REFUSED:
      outcomes["refused"] += 1
    else:
      for name, x in clean.items():
        assert np.array_equal(got[name].view(np.uint8), x.view(np.uint8)), f"silent wrong load: {path.name}@{at}"
      outcomes["harmless"] += 1
    finally:
      data[at] = original
      path.write_bytes(data)
  print(f"\n120 single-byte flips: {outcomes}")
  assert sum(outcomes.values()) == 120 and outcomes["refused"] >= 60


def test_truncated_missing_or_extended_arrays_are_refused_by_name(served, tmp_path):
  d, _ = served
  work = tmp_path / "s"
  shutil.copytree(d, work)
  f = work / "arrays" / "final_norm.scale.bin"
  data = f.read_bytes()
  for broken, pattern in [(data[:-1], "truncated"), (data + b"\0", "extended"), (None, "missing")]:
    f.unlink()
    if broken is not None:
      f.write_bytes(broken)
    with pytest.raises(serve_checkpoint.IntegrityError, match=f"'final_norm/scale'.*{pattern}"):
      serve_checkpoint.load(work)
    f.write_bytes(data)
  (work / "manifest.json").unlink()
  with pytest.raises(serve_checkpoint.ManifestError, match="no manifest.json"):
    serve_checkpoint.load(work)
  assert not serve_checkpoint.is_serve_checkpoint(work)


def resign(directory, manifest):
  """Rewrite a manifest with a valid self-digest, as an attacker who edits it would."""
  manifest["sha256"] = serve_checkpoint._canonical_digest(manifest)
  (directory / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("bad", ["../outside.bin", "/etc/passwd", "arrays/../../outside.bin", "symlink"])
def test_paths_escaping_the_checkpoint_are_refused(served, tmp_path, bad):
  d, _ = served
  work = tmp_path / "s"
  shutil.copytree(d, work)
  name = "final_norm/scale"
  manifest = json.loads((work / "manifest.json").read_text())
  entry = manifest["arrays"][name]
  real = work / entry["file"]
  (tmp_path / "outside.bin").write_bytes(real.read_bytes())  # same bytes: only the path is wrong
  if bad == "symlink":
    real.unlink()
    os.symlink(tmp_path / "outside.bin", real)
  else:
    entry["file"] = bad
    resign(work, manifest)
  with pytest.raises(UnsafePathError):
    serve_checkpoint.load(work)


def test_trainer_checkpoint_with_a_symlink_out_is_refused(trained, tmp_path):
  _, _, _, workdir = trained
  src = tmp_path / "wd"
  shutil.copytree(workdir, src, symlinks=True)
  meta = src / "checkpoints" / "7" / "meta" / "metadata"
  shutil.move(meta, tmp_path / "metadata")
  os.symlink(tmp_path / "metadata", meta)
  with pytest.raises(UnsafePathError, match="symlink"):
    train_to_serve.convert(src, tmp_path / "out")
  out = convert_cli("train-to-serve", "--src", src, "--dst", tmp_path / "out2")
  assert out.returncode == 2 and "UnsafePathError" in out.stderr


@pytest.fixture(scope="module")
def eval_data(tmp_path_factory):
  d = tmp_path_factory.mktemp("eval_data")
  synthetic.generate(d, "eval", len(synthetic.TASKS), seed=11)
  return d


def evaluate_cli(checkpoint, data, out) -> dict:
  args = ["--checkpoint", str(checkpoint), "--data", str(data), "--slots", "7", "--max-conversations", "7"]
  assert evaluate_job.main([*args, "--output", str(out)]) == 0
  return json.loads((out / "report.json").read_text())


def test_open_model_reads_both_layouts_alike_and_the_evaluation_job_runs_on_the_serve_layout(
  trained, eval_data, tmp_path
):
  cfg, _, restored, workdir = trained
  out = convert_cli("train-to-serve", "--src", workdir, "--dst", tmp_path / "serve")
  assert out.returncode == 0, out.stderr[-2000:]
  from_trainer, from_serve = ckpt.open_model(workdir), ckpt.open_model(tmp_path / "serve")
  assert (from_trainer.layout, from_serve.layout) == ("trainer", "serve")
  assert from_trainer.step == from_serve.step == 7 and from_trainer.cfg == from_serve.cfg == cfg
  assert from_serve.config.to_dict() == from_trainer.config.to_dict()  # the experiment config travels along
  assert from_serve.cache_tokens == from_trainer.cache_tokens == tiny.get_config().serve.cache_tokens
  want = checkpoint.tree_digest(restored)
  assert checkpoint.tree_digest(from_serve.params) == checkpoint.tree_digest(from_trainer.params) == want
  mesh = sharding.make_mesh({"data": 1, "expert": 2}, jax.devices()[:2])
  gate = ckpt.open_model(tmp_path / "serve", mesh=mesh).params["moe"]["blocks"]["ffn"]["gate"]
  assert gate.sharding.spec[1] == "expert" and set(gate.sharding.device_set) == set(jax.devices()[:2])
  with pytest.raises(ckpt.CheckpointNotFoundError, match="serve checkpoint of step 7, not the requested step 3"):
    ckpt.open_model(tmp_path / "serve", step=3)

  # Same parameters and experiment config, so the free-running evaluation is identical figure for figure.
  served = evaluate_cli(tmp_path / "serve", eval_data, tmp_path / "eval_serve")
  trained_report = evaluate_cli(workdir, eval_data, tmp_path / "eval_trainer")
  assert sum(served["conversations"].values()) == 7 and served["checkpoint"] == str(tmp_path / "serve")
  assert served["figures"] == trained_report["figures"]


def test_the_live_server_serves_what_train_to_serve_writes(trained, tmp_path):
  """``launch.convert train-to-serve``'s output, served by ``launch.serve`` (through ``open_model``): one
  WebSocket session of a few ticks gets the model's audio frames and tick events back."""
  _, _, _, workdir = trained
  out = convert_cli("train-to-serve", "--src", workdir, "--dst", tmp_path / "serve")
  assert out.returncode == 0, out.stderr[-2000:]
  assert serve_checkpoint.is_serve_checkpoint(tmp_path / "serve")
  got = serve_a_session(tmp_path / "serve", ticks=3)
  assert got["started"]["type"] == "session.started"
  assert [t["turn"] for t in got["ticks"]] == [0, 1, 2]
  # One PCM16 frame of the model's voice per tick: the type byte and 200 ms of 16 kHz samples.
  assert len(got["audio"]) == 3 and all(len(a) == 1 + 2 * 3200 and a[0] == 0x01 for a in got["audio"])
  assert got["returncode"] == 0
