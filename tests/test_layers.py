"""The package layers hold: every import (function-local ones included) points down, and none is circular.

interaction < data_pipeline < serving < launch: a module imports only its own
layer and those to its left, never experiments/, tests/ or benchmarks/, and the
module graph of the four packages has no cycle. The checker is tried on a
made-up tree with each kind of violation, so it is known to catch them.
"""

from __future__ import annotations

import ast
import pathlib
import sys
import textwrap

from interaction import testing

ROOT = pathlib.Path(__file__).parent.parent
LAYERS = ("interaction", "data_pipeline", "serving", "launch")
FORBIDDEN = ("experiments", "tests", "benchmarks")
LIBRARY = ("interaction", "data_pipeline", "serving")  # launch's modules are named after their jobs


def modules(root: pathlib.Path) -> dict[str, pathlib.Path]:
  """Dotted module name -> file, for every .py file of the layered packages under ``root``."""
  out = {}
  for top in LAYERS:
    for path in sorted((root / top).rglob("*.py")):
      parts = path.relative_to(root).with_suffix("").parts
      out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
  return out


def imported(name: str, path: pathlib.Path) -> list[tuple[int, str]]:
  """``(line, dotted target)`` of every import statement in the file, at any depth, relative ones resolved."""
  package = name if path.name == "__init__.py" else name.rpartition(".")[0]
  out = []
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      out += [(node.lineno, alias.name) for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
        base = ".".join([*anchor, base] if base else anchor)
      out += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
  return out


def resolve(target: str, known) -> str | None:
  """The module a dotted import target loads: itself, or its longest known prefix (a name in a module)."""
  while target:
    if target in known:
      return target
    target = target.rpartition(".")[0]
  return None


def violations(root: pathlib.Path) -> list[str]:
  """Upward imports, imports of experiments/tests/benchmarks, import cycles and modules shadowing the stdlib."""
  mods = modules(root)
  graph, problems = {m: set() for m in mods}, []
  for name, path in mods.items():
    rank = LAYERS.index(name.split(".")[0])
    where = path.relative_to(root)
    if name.split(".")[0] in LIBRARY and path.stem in sys.stdlib_module_names:
      problems.append(f"{where}: shadows the standard library module {path.stem!r}")
    for line, target in imported(name, path):
      top = target.split(".")[0]
      if top in FORBIDDEN:
        problems.append(f"{where}:{line}: imports {target} (library code never imports {top}/)")
      elif top in LAYERS and LAYERS.index(top) > rank:
        problems.append(f"{where}:{line}: imports {target}, a higher layer than {name.split('.')[0]}")
      if top in LAYERS and (dep := resolve(target, mods)) and dep != name:
        graph[name].add(dep)
  problems += [f"import cycle: {' -> '.join([*c, c[0]])}" for c in cycles(graph)]
  return problems


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """One cycle per strongly connected component of more than one module (Tarjan's algorithm)."""
  index, low, stack, on_stack, out = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in sorted(graph[v]):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        out.append(_cycle_through(graph, sorted(component)))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return out


def _cycle_through(graph, component) -> list[str]:
  """The shortest cycle through the component's first module (breadth-first within the component)."""
  members, start = set(component), component[0]
  parent, frontier = {start: None}, [start]
  while frontier:
    nxt = []
    for v in frontier:
      for w in sorted(graph[v]):
        if w == start:
          path = [v]
          while parent[path[-1]] is not None:
            path.append(parent[path[-1]])
          return path[::-1]
        if w in members and w not in parent:
          parent[w] = v
          nxt.append(w)
    frontier = nxt
  raise AssertionError(f"no cycle through {start} in {component}")


def test_every_import_points_down_and_none_is_circular():
  problems = violations(ROOT)
  assert not problems, "\n".join(problems)


def test_the_checker_catches_each_kind_of_violation(tmp_path):
  files = {
    "interaction/__init__.py": "",
    "interaction/model.py": "import numpy\nfrom interaction import layout\n",
    "interaction/layout.py": "def f():\n  from data_pipeline import record  # a function-local climb\n",
    "interaction/inspect.py": "",
    "data_pipeline/__init__.py": "",
    "data_pipeline/record.py": "from interaction import layout\n",
    "data_pipeline/testing.py": "def cfg():\n  from experiments import tiny\n",
    "data_pipeline/synthetic.py": "from data_pipeline import tasks\n",
    "data_pipeline/tasks.py": "from .synthetic import VOCAB\n",
    "serving/__init__.py": "",
    "serving/engine.py": "import tests.helpers\nfrom launch import train\n",
    "launch/__init__.py": "",
    "launch/train.py": "from serving import engine\nfrom interaction import model\n",
  }
  for rel, text in files.items():
    (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / rel).write_text(textwrap.dedent(text))
  found = violations(tmp_path)
  expected = [
    "interaction/layout.py:2: imports data_pipeline.record, a higher layer than interaction",
    "interaction/inspect.py: shadows the standard library module 'inspect'",
    "data_pipeline/testing.py:2: imports experiments.tiny (library code never imports experiments/)",
    "serving/engine.py:1: imports tests.helpers (library code never imports tests/)",
    "serving/engine.py:2: imports launch.train, a higher layer than serving",
    "import cycle: data_pipeline.record -> interaction.layout -> data_pipeline.record",
    "import cycle: data_pipeline.synthetic -> data_pipeline.tasks -> data_pipeline.synthetic",
    "import cycle: launch.train -> serving.engine -> launch.train",
  ]
  assert sorted(found) == sorted(expected), "\n".join(found)


def test_the_fixture_config_is_the_tiny_experiment():
  from experiments import tiny

  assert testing.experiment_config().to_dict() == tiny.get_config().to_dict(), (
    "interaction/testing.py's experiment_config() must equal experiments/tiny.py's get_config(): update both"
  )
