"""ruff format and lint are part of the suite."""

import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).parent.parent


def ruff():
  exe = pathlib.Path(sys.executable).parent / "ruff"
  found = str(exe) if exe.exists() else shutil.which("ruff")
  if found is None:
    pytest.fail("ruff is not installed; install the test extra: pip install -e '.[test]'")
  return found


def test_ruff_format_clean():
  result = subprocess.run([ruff(), "format", "--check", "."], cwd=ROOT, capture_output=True, text=True)
  assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_lint_clean():
  result = subprocess.run([ruff(), "check", "."], cwd=ROOT, capture_output=True, text=True)
  assert result.returncode == 0, result.stdout + result.stderr
