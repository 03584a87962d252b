"""Tools and the background model: results stream into text_in while the session keeps ticking."""

import json
import time

import numpy as np
import pytest

from interaction import text
from serving import background, calls, tools
from tests.test_serving_engine import random_inputs, shared_engine


def engine_with(tool_runtime=None, worker=None):
  engine = shared_engine()
  engine.tools, engine.background = tool_runtime, worker
  return engine


def tick_until_closed(engine, session, call, user_text=None, max_ticks=200, pause=0.0):
  """Tick until ``call`` delivered its end marker; returns the text_in fed at each tick."""
  fed = []
  for t in range(max_ticks):
    given = random_inputs(engine.cfg, t)
    given["text_in"] = np.full(4, text.PAD, np.int32) if user_text is None else user_text
    out = engine.tick({session.id: given})[session.id]
    fed.append(out.values["text_in"])
    assert out.values["text_out"].shape == (4,)  # the model spoke a full block every tick
    if call.closed and not session.pending:  # closed = end marker queued; then it must be fed
      return np.stack(fed)
    time.sleep(pause)
  raise AssertionError(f"call {call} never closed")


def delivered(fed, start, end) -> str:
  ids = fed.reshape(-1).tolist()
  i = ids.index(start)
  return text.decode(ids[i + 1 : ids.index(end, i)])


def test_marker_parser_finds_calls_across_micro_turns():
  p = calls.MarkerParser()
  stream = [text.PAD, text.TOOL_CALL_START, *text.encode("add(2,"), *text.encode("3)"), text.TOOL_CALL_END]
  stream += [*text.encode("hi "), text.DELEGATE_START, *text.encode("what is 2 times 4"), text.DELEGATE_END]
  found = []
  for i in range(0, len(stream), 4):
    found += p.feed(stream[i : i + 4])
  assert found == [("tool", "add(2,3)"), ("background", "what is 2 times 4")]
  assert p.feed([text.TOOL_CALL_START, *([ord("x")] * (calls.MAX_CALL_BYTES + 1)), text.TOOL_CALL_END]) == []


def test_calculator_and_clock():
  t = tools.builtin_tools()
  assert t["add"].fn("2", "3") == "5" and t["mul"].fn("6", "7") == "42" and t["div"].fn("7", "2") == "3.5"
  assert tools.calc("(1 + 2) * 3 - 2 ** 3") == "1"
  assert tools.parse_call(" add( 1 , 2 ) ") == ("add", ["1", "2"])
  assert tools.parse_call("clock()") == ("clock", [])
  assert t["clock"].fn().endswith("+00:00")
  for bad in ("__import__('os')", "a + 1", "2 ** 1000"):
    with pytest.raises(ValueError):
      tools.calc(bad)
  with pytest.raises(ValueError, match="not a tool call"):
    tools.parse_call("add 2 3")


def test_tool_result_arrives_mid_speech_in_free_slots_only():
  engine = engine_with(tools.ToolRuntime())
  s = engine.join()
  for t in range(3):
    engine.tick({s.id: random_inputs(engine.cfg, t)})
  engine._submit(s, "tool", "add(19,23)")  # as if the model had just written <tool>add(19,23)</tool>
  call = s.calls[-1]
  user = np.array([ord("h"), text.PAD, ord("i"), text.PAD], np.int32)  # the user types in two slots
  fed = tick_until_closed(engine, s, call, user_text=user)
  assert (fed[:, 0] == ord("h")).all() and (fed[:, 2] == ord("i")).all()  # user text is never overwritten
  assert delivered(fed[:, [1, 3]], text.TOOL_RESULT_START, text.TOOL_RESULT_END) == "42"
  assert call.ok and call.result == "42" and call.first_tick >= call.tick
  engine.tick({s.id: random_inputs(engine.cfg, 9)})
  assert s.turn == 3 + len(fed) + 1


def test_tool_past_its_deadline_yields_an_error_and_the_session_goes_on():
  runtime = tools.ToolRuntime()
  runtime.register("slow", lambda: time.sleep(3) or "late", deadline=0.3)
  engine = engine_with(runtime)
  s = engine.join()
  engine._submit(s, "tool", "slow()")
  t0 = time.monotonic()
  fed = tick_until_closed(engine, s, s.calls[-1], pause=0.02)
  assert time.monotonic() - t0 < 2.5  # the session did not wait for the tool
  assert delivered(fed, text.TOOL_RESULT_START, text.TOOL_RESULT_END) == "error: deadline of 0.3 s exceeded"
  engine.tick({s.id: random_inputs(engine.cfg, 0)})
  engine.close()


def test_unknown_tool_and_failing_tool_yield_error_results():
  runtime = tools.ToolRuntime()
  runtime.register("boom", lambda: 1 / 0)
  engine = engine_with(runtime)
  s = engine.join()
  for request, expected in (
    ("nosuch(1)", "error: unknown tool 'nosuch'"),
    ("boom()", "error: ZeroDivisionError: division by zero"),
    ("not a call", "error: not a tool call"),
  ):
    engine._submit(s, "tool", request)
    fed = tick_until_closed(engine, s, s.calls[-1])
    assert delivered(fed, text.TOOL_RESULT_START, text.TOOL_RESULT_END).startswith(expected)
  assert [c.ok for c in s.calls] == [False, False, False]


class Crashing:
  def generate(self, request, context):
    yield "partial "
    raise RuntimeError("out of memory")


class Slow:
  def generate(self, request, context):
    time.sleep(3)
    yield "too late"


def test_background_crash_and_timeout_yield_errors_and_the_session_goes_on():
  engine = engine_with(worker=background.BackgroundWorker(Crashing()))
  s = engine.join()
  engine._submit(s, "background", "what is 2 times 3")
  fed = tick_until_closed(engine, s, s.calls[-1])
  got = delivered(fed, text.BACKGROUND_RESULT_START, text.BACKGROUND_RESULT_END)
  assert got == "partial error: background model failed: RuntimeError: out of memory"
  engine.close()
  engine = engine_with(worker=background.BackgroundWorker(Slow(), deadline=0.3))
  s = engine.join()
  engine._submit(s, "background", "anything")
  fed = tick_until_closed(engine, s, s.calls[-1], pause=0.02)
  assert delivered(fed, text.BACKGROUND_RESULT_START, text.BACKGROUND_RESULT_END).startswith("error: deadline")
  engine.close()


def test_background_answer_streams_back_with_the_session_context():
  seen = {}

  class Echo:
    def generate(self, request, context):
      seen["context"] = context
      yield "the answer "
      yield "is 6"

  engine = engine_with(worker=background.BackgroundWorker(Echo()))
  s = engine.join()
  user = text.encode("two!")
  engine.tick({s.id: dict(random_inputs(engine.cfg, 0), text_in=user)})
  engine._submit(s, "background", "what is 2 times 3")
  fed = tick_until_closed(engine, s, s.calls[-1])
  assert delivered(fed, text.BACKGROUND_RESULT_START, text.BACKGROUND_RESULT_END) == "the answer is 6"
  assert seen["context"].startswith("two!")
  engine.close()


@pytest.mark.slow
def test_checkpoint_background_runs_its_own_model(tmp_path):
  from tests.test_serving_eval import save_checkpoint

  workdir = save_checkpoint(tmp_path, small_cfg_config=True)
  model = background.CheckpointBackground(workdir / "checkpoints", max_turns=4)
  chunks = list(model.generate("what is 2 times 3", "context"))
  assert model.step is not None and all(isinstance(c, str) for c in chunks)
  assert json.loads((workdir / "config.json").read_text())["model"]["num_layers"] == 2
