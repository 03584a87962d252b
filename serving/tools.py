"""The tool runtime: registered Python callables run on a thread pool with a deadline.

A call in ``text_out`` reads ``name(arg, arg, ...)``. The runtime runs it off the
tick loop; its result (or ``error: ...``) streams back between ``<result>``
markers into the session's free ``text_in`` slots. An unknown tool, a bad
argument, an exception or a missed deadline all yield an error result; none
stops the session.

Built-ins: the calculator (``add``, ``sub``, ``mul``, ``div`` and ``calc(expr)``
for + - * / ** and parentheses over numbers) and the clock (``clock()``: UTC
time, ISO 8601).
"""

from __future__ import annotations

import ast
import concurrent.futures
import dataclasses
import datetime
import operator
import re
from collections.abc import Callable

from serving.calls import Call

DEFAULT_DEADLINE = 2.0  # seconds
_CALL = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*\((.*)\)\s*$", re.S)


@dataclasses.dataclass(frozen=True)
class Tool:
  name: str
  fn: Callable[..., object]
  deadline: float = DEFAULT_DEADLINE


def parse_call(request: str) -> tuple[str, list[str]]:
  """``"add(2, 3)"`` -> ``("add", ["2", "3"])``; ValueError when it is not a call."""
  m = _CALL.match(request)
  if not m:
    raise ValueError(f"not a tool call: {request!r} (expected name(arg, ...))")
  args = m.group(2).strip()
  return m.group(1), [a.strip() for a in args.split(",")] if args else []


def _number(x: str) -> float | int:
  try:
    return int(x)
  except ValueError:
    return float(x)


def _fmt(x) -> str:
  return str(int(x)) if isinstance(x, float) and x.is_integer() and abs(x) < 1e15 else str(x)


_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}
_BINARY[ast.Pow] = operator.pow


def _eval(node):
  if isinstance(node, ast.Expression):
    return _eval(node.body)
  if isinstance(node, ast.Constant) and isinstance(node.value, int | float) and not isinstance(node.value, bool):
    return node.value
  if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
    v = _eval(node.operand)
    return -v if isinstance(node.op, ast.USub) else v
  if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
    left, right = _eval(node.left), _eval(node.right)
    if isinstance(node.op, ast.Pow) and abs(right) > 64:
      raise ValueError("exponent too large")
    return _BINARY[type(node.op)](left, right)
  raise ValueError(f"unsupported expression element {type(node).__name__}")


def calc(expr: str) -> str:
  """Arithmetic over numbers (no names, no calls): an AST walk, never ``eval``."""
  return _fmt(_eval(ast.parse(expr, mode="eval")))


def builtin_tools() -> dict[str, Tool]:
  def binary(op):
    return lambda a, b: _fmt(op(_number(a), _number(b)))

  def clock():
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")

  ops = {"add": operator.add, "sub": operator.sub, "mul": operator.mul, "div": operator.truediv}
  tools = {name: Tool(name, binary(op)) for name, op in ops.items()}
  tools["calc"] = Tool("calc", lambda *parts: calc(",".join(parts)))
  tools["clock"] = Tool("clock", clock)
  return tools


class ToolRuntime:
  """Runs tool calls for every session of an engine; ``poll`` hands out what is ready."""

  kind = "tool"

  def __init__(self, tools: dict[str, Tool] | None = None, *, workers: int = 4, hold_ticks: int = 0):
    self.tools = dict(builtin_tools() if tools is None else tools)
    self.hold_ticks = hold_ticks
    self._pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="tool")

  def register(self, name: str, fn: Callable[..., object], deadline: float = DEFAULT_DEADLINE) -> None:
    if deadline <= 0:
      raise ValueError(f"tool {name!r}: deadline must be > 0 seconds, got {deadline}")
    self.tools[name] = Tool(name, fn, deadline)

  def submit(self, session: int, request: str, tick: int, context: str = "") -> Call:
    """Start a call; an unparsable call or an unknown tool finishes at once with an error."""
    del context  # tools see their arguments only
    try:
      name, args = parse_call(request)
    except ValueError as e:
      call = Call(session, self.kind, request, tick, DEFAULT_DEADLINE)
      call.finish(str(e))
      return call
    tool = self.tools.get(name)
    call = Call(session, self.kind, request, tick, tool.deadline if tool else DEFAULT_DEADLINE)
    if tool is None:
      call.finish(f"unknown tool {name!r}; tools are {sorted(self.tools)}")
      return call

    def run():
      try:
        call.emit(str(tool.fn(*args)))
        call.finish()
      except Exception as e:  # any tool failure becomes the session's error result
        call.finish(f"{type(e).__name__}: {e}")

    self._pool.submit(run)
    return call

  def close(self) -> None:
    self._pool.shutdown(wait=False, cancel_futures=True)
