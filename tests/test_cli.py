"""The jobs' command lines: one absl style, ``--help`` lists every flag, refused input is one line (exit 2)."""

import os
import pathlib
import subprocess
import sys

import pytest

from launch import aot, cli, convert, data, demo, evaluate, inspect, loadtest, local, pod, record, serve, train

ROOT = pathlib.Path(__file__).parent.parent
# (module, its flags, the argv prefix that selects a command)
ENTRY_POINTS = [
  (train, train.FLAGS, []),
  (demo, demo.FLAGS, []),
  (inspect, inspect.FLAGS, []),
  (aot, aot.FLAGS, []),
  (evaluate, evaluate.FLAGS, []),
  (serve, serve.FLAGS, []),
  (loadtest, loadtest.FLAGS, []),
  (record, record.FLAGS, []),
  (local, local.FLAGS, []),
  (pod, pod.FLAGS, []),
  (data, data.SYNTHETIC, ["synthetic"]),
  (data, data.CONVERT, ["convert"]),
  *[(convert, fv, [name]) for name, fv in convert.COMMANDS.items()],
]


def run(*args, timeout=300):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


def assert_one_line_error(out, *words):
  assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
  lines = out.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr
  assert "Traceback" not in out.stderr
  for word in words:
    assert word in lines[0], lines[0]


@pytest.mark.parametrize("module, fv, command", ENTRY_POINTS, ids=lambda x: getattr(x, "__name__", None))
def test_help_exits_0_and_lists_every_flag_with_its_default(module, fv, command, capsys):
  with pytest.raises(SystemExit) as e:
    module.main([*command, "--help"])
  assert e.value.code == 0
  text = capsys.readouterr().out
  names = {fv[n].name for n in fv} - {"flagfile", "undefok"}
  assert "log_level" in names and len(names) > 1
  for name in names:
    line = next((ln for ln in text.splitlines() if ln.strip().startswith((f"--{name}:", f"--[no]{name}:"))), None)
    assert line is not None, f"{module.__name__} {command}: --{name} missing from --help"
  assert sum(ln.startswith("    (default: ") for ln in text.splitlines()) == len(names)


def test_the_program_itself_exits_0_on_help():
  out = run("-m", "launch.train", "--help")
  assert out.returncode == 0 and "--workdir" in out.stdout and "--[no]resume" in out.stdout, out.stderr


def test_argparse_dashed_names_still_parse():
  fv = local.FLAGS
  assert cli.parse(fv, ["--devices-per-process", "3", "--", "echo", "--not-a-flag"], positional=True) == [
    "echo",
    "--not-a-flag",
  ]
  assert fv.devices_per_process == 3
  cli.parse(pod.FLAGS, ["--target=slurm", "--config=c.py", "--topology=1x8", "--workdir=/w", "--dry-run"])
  assert pod.FLAGS.dry_run


def test_an_unknown_flag_or_a_missing_required_one_is_a_usage_error():
  with pytest.raises(SystemExit, match="^error: Unknown command line flag 'bogus'") as e:
    evaluate.main(["--bogus"])
  assert e.value.code == 2
  with pytest.raises(SystemExit, match="^error: --data is required") as e:
    evaluate.main(["--checkpoint", "x"])
  assert e.value.code == 2


def test_a_missing_config_file_is_one_line(tmp_path):
  out = run("-m", "launch.train", "--config", str(tmp_path / "nope.py"), "--workdir", str(tmp_path / "w"))
  assert_one_line_error(out, "nope.py: no such config file", "experiments/tiny.py")


def test_an_unknown_override_key_is_one_line(tmp_path):
  out = run("-m", "launch.train", "--config=experiments/tiny.py", f"--workdir={tmp_path}", "--config.train.stepz=3")
  assert_one_line_error(out, "--config.train.stepz", "no key train.stepz", '"steps"')
  out = run("-m", "launch.inspect", "--config=experiments/tiny.py", "--config.trian.steps=3")
  assert_one_line_error(out, "no key trian.steps", '"train"')


def test_a_batch_the_mesh_cannot_split_is_one_line(tmp_path):
  args = ["--config.data.batch_size=4", "--config.mesh.data=2", "--config.mesh.expert=4"]
  out = run("-m", "launch.train", "--config=experiments/tiny.py", f"--workdir={tmp_path / 'w'}", *args)
  assert_one_line_error(out, "data.batch_size=4 cannot be split", "use a multiple of 8")
  assert not (tmp_path / "w" / "data").exists()


def test_a_missing_checkpoint_or_dataset_is_one_line(tmp_path):
  out = run("-m", "launch.serve", "--checkpoint", str(tmp_path / "nothing"), "--port", "0")
  assert_one_line_error(out, "nothing: no such directory")
  out = run("-m", "launch.convert", "train-to-serve", "--src", str(tmp_path / "nothing"), "--dst", str(tmp_path / "d"))
  assert_one_line_error(out, "nothing: no such directory")
  out = run("-m", "launch.data", "convert", "--input", str(tmp_path / "nothing"), "--output", str(tmp_path / "o"))
  assert_one_line_error(out, "nothing")
  config = tmp_path / "cfg.py"
  config.write_text(
    "from experiments import tiny\n\ndef get_config():\n  c = tiny.get_config()\n"
    f"  c.data.dir = {str(tmp_path / 'nodata')!r}\n  return c\n"
  )
  out = run("-m", "launch.train", f"--config={config}", f"--workdir={tmp_path / 'w'}")
  assert_one_line_error(out, "nodata", "manifest.json")
