"""ruff format and lint are part of the suite, and so are the size limits of modules and functions."""

import ast
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


MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 80
PACKAGES = ("interaction", "data_pipeline", "serving", "launch", "experiments", "benchmarks")


def _sources():
  return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def test_no_module_over_500_lines_and_no_function_over_80_outside_tests():
  assert len(_sources()) > 50  # the walk found the packages (so this can fail)
  too_long = []
  for path in _sources():
    source = path.read_text()
    name = path.relative_to(ROOT)
    if source.count("\n") > MAX_MODULE_LINES:
      too_long.append(f"{name}: {source.count(chr(10))} lines (max {MAX_MODULE_LINES}): split the module")
    for node in ast.walk(ast.parse(source)):
      if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
        lines = node.end_lineno - node.lineno + 1
        if lines > MAX_FUNCTION_LINES:
          too_long.append(f"{name}:{node.lineno} {node.name}: {lines} lines (max {MAX_FUNCTION_LINES})")
  assert not too_long, "\n".join(too_long)
