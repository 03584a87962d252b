"""The wire protocol's one definition (serving/protocol.py) against its restatements: the browser client's
constants, PROTOCOL.md's tables and examples, the data pipeline's clock; and its frame checks."""

import json
import pathlib
import re
import subprocess
import sys

import pytest

from data_pipeline import record
from interaction import layout
from serving import protocol, routes

ROOT = pathlib.Path(__file__).parent.parent
DOC = (ROOT / "serving" / "PROTOCOL.md").read_text()

# client.js name -> protocol.py name
CLIENT_CONSTANTS = {
  "PROTOCOL_VERSION": "PROTOCOL_VERSION",
  "SESSION_PATH": "SESSION_PATH",
  "KIND_AUDIO": "AUDIO",
  "KIND_JPEG": "JPEG",
  "SAMPLE_RATE": "SAMPLE_RATE",
  "ENCODING": "ENCODING",
}


def js_constants(path: pathlib.Path) -> dict:
  """Top-level ``const NAME = <number or string>;`` of a script, as Python values."""
  found = {}
  for name, value in re.findall(r"^const (\w+) = ([^;]+);", path.read_text(), re.M):
    value = value.strip()
    if re.fullmatch(r"0x[0-9a-fA-F]+|\d+", value):
      found[name] = int(value, 0)
    elif re.fullmatch(r'"[^"]*"', value):
      found[name] = json.loads(value)
  return found


def test_the_browser_client_constants_equal_the_protocol():
  got = js_constants(routes.STATIC / "client.js")
  for js, py in CLIENT_CONSTANTS.items():
    assert js in got, f"client.js has no `const {js} = ...;`"
    assert got[js] == getattr(protocol, py), (js, got[js], getattr(protocol, py))


def test_the_protocol_clock_is_the_data_pipeline_clock():
  assert protocol.SAMPLE_RATE == record.SAMPLE_RATE
  assert protocol.SAMPLES_PER_TICK == record.SAMPLES_PER_TURN
  assert protocol.TICK_S == layout.MICRO_TURN_SECONDS


def test_protocol_and_load_tool_import_no_model_stack():
  code = (
    "import sys, serving.protocol; numpy = 'numpy' in sys.modules; import serving.loadtest; "
    "print(numpy, sorted({m.split('.')[0] for m in sys.modules} & {'jax', 'jaxlib', 'flax', 'optax', 'orbax'}))"
  )
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
  assert out.stdout.split() == ["False", "[]"], out.stdout + out.stderr


# -- PROTOCOL.md matches the code ------------------------------------------------------------


def test_protocol_md_lists_every_error_code_and_close_code():
  paragraph = DOC[DOC.index("Error codes:") : DOC.index("### Close codes")]
  assert set(re.findall(r"`(\w+)`\s+\(", paragraph)) == set(protocol.ERROR_CODES)
  table = DOC[DOC.index("### Close codes") :]
  documented = {int(c) for c in re.findall(r"^\| (\d{4}) \|", table, re.M)}
  sent = {v for k, v in vars(protocol).items() if k.startswith("CLOSE_")}
  assert documented == sent | {1007, 1009}  # 1007 and 1009 come from the WebSocket layer


def test_protocol_md_routes_are_the_servers_routes():
  table = DOC[DOC.index("## Routes and auth") : DOC.index("- **Token**")]
  documented = re.findall(r"^\| `GET ([^`]+)` \|", table, re.M)
  assert sorted(documented) == sorted(routes.ROUTES)


def _examples(section: str) -> dict:
  """{kind: the JSON example} of a frame table in PROTOCOL.md."""
  start = DOC.index(section)
  table = DOC[start : DOC.index("\n\n", DOC.index("|---", start))]
  examples = {}
  for row in table.splitlines()[2:]:
    kind = row.split("|")[1].strip()
    for candidate in re.findall(r"`(\{[^`]*\})`", row)[-1:]:  # the example column's
      examples[kind] = json.loads(candidate)
  return examples


def test_protocol_md_server_examples_have_the_fields_the_server_sends():
  examples = _examples("### Server -> client")
  limits = protocol.Limits()
  assert examples["started"] == protocol.started_event(17, (40, 40), limits)
  built = {
    "tick": protocol.tick_event(12, "hi ", True, False, 3200) | {"timing": {}},
    "tool call": protocol.tool_call_event(3, "tool", "add 2 3", 12),
    "tool result": protocol.tool_result_event(3, "tool", "5", True, None, 15),
    "error": protocol.error_event(protocol.ClientError("bad_audio", "x")),
    "pong": protocol.pong_event(7, 12),
  }
  for kind, event in built.items():
    assert list(examples[kind]) == list(event), kind
    assert examples[kind]["type"] == event["type"]
  assert set(examples["tick"]["timing"]) == {"tick_ms", "step_ms", "late_ms"}


def test_protocol_md_client_examples_pass_the_checks():
  examples = _examples("### Client -> server")
  assert set(examples) == {"text", "settings", "ping", "end"}
  for event in examples.values():
    assert protocol.parse_event(json.dumps(event))["type"] == event["type"]


# -- frame checks --------------------------------------------------------------------------

REFUSED = [
  ('{"type": "text"', "bad_json"),
  ('[{"type": "text"}]', "bad_json"),
  ('{"type": 3}', "bad_json"),
  ('{"type": "ping", "id": NaN}', "bad_json"),
  ('{"type": "speak"}', "bad_event"),
  ('{"type": "text", "text": 3}', "bad_event"),
  ('{"type": "session.update", "voice": 1}', "bad_event"),
  ('{"type": "session.update", "audio": 16000}', "bad_event"),
  ('{"type": "session.update", "audio": {"sample_rate": 48000}}', "unsupported"),
  ('{"type": "session.update", "audio": {"sample_rate": true}}', "unsupported"),
  ('{"type": "session.update", "audio": {"encoding": "opus"}}', "unsupported"),
  ('{"type": "session.update", "sampling": []}', "bad_event"),
  ('{"type": "session.update", "sampling": {"beam": 2}}', "bad_event"),
  ('{"type": "session.update", "sampling": {"temperature": "hot"}}', "bad_event"),
  ('{"type": "session.update", "sampling": {"temperature": true}}', "bad_event"),
  ('{"type": "session.update", "sampling": {"temperature": -0.1}}', "bad_value"),
  ('{"type": "session.update", "sampling": {"temperature": 1e999}}', "bad_json"),  # too large for a float
  ('{"type": "ping", "id": -1e999}', "bad_json"),
  ('{"type": "ping", "id": ' + "9" * 5000 + "}", "bad_json"),  # int() would raise ValueError
  ('{"type": "session.update", "sampling": {"seed": ' + "1" * 65 + "}}", "bad_json"),
  ("[" * 60_000, "bad_json"),  # the parser would raise RecursionError
  ('{"type": "ping", "id": ' + "[" * 900 + "]" * 900 + "}", "bad_json"),  # parses, but too deep to echo back
  ('{"type": "ping", "id": ' + '{"a": ' * 40 + "1" + "}" * 40 + "}", "bad_json"),
  ('{"type": "text", "text": "' + "a" * 70_000 + '"}', "input_overflow"),
  ('{"type": "session.update", "sampling": {"top_p": 0}}', "bad_value"),
  ('{"type": "session.update", "sampling": {"top_p": 1.5}}', "bad_value"),
  ('{"type": "session.update", "sampling": {"seed": 1.0}}', "bad_event"),
  ('{"type": "session.update", "sampling": {"seed": 4294967296}}', "bad_value"),
]


@pytest.mark.parametrize("message, code", REFUSED)
def test_a_refused_text_frame_gets_its_code(message, code):
  with pytest.raises(protocol.ClientError) as e:
    protocol.parse_event(message)
  assert e.value.code == code and e.value.code in protocol.ERROR_CODES and str(e.value)


def test_nesting_to_the_limit_and_brackets_in_strings_are_accepted():
  inner = "[" * (protocol.MAX_DEPTH - 1) + "]" * (protocol.MAX_DEPTH - 1)  # the event object is one level
  assert protocol.parse_event('{"type": "ping", "id": ' + inner + "}")["type"] == "ping"
  with pytest.raises(protocol.ClientError):
    protocol.parse_event('{"type": "ping", "id": [' + inner + "]}")
  brackets = "[[{" * 100 + '\\"' + "}]]" * 100
  assert protocol.parse_event(json.dumps({"type": "text", "text": brackets}))["text"] == brackets
  big = 10**63
  assert protocol.parse_event(json.dumps({"type": "ping", "id": [big, -big, 1.5e308]}))["id"] == [big, -big, 1.5e308]


def test_accepted_events_are_normalised():
  update = protocol.parse_event('{"type": "session.update", "sampling": {"temperature": 1, "seed": 0}}')
  assert update["sampling"] == {"temperature": 1.0, "seed": 0} and isinstance(update["sampling"]["temperature"], float)
  assert protocol.parse_event('{"type": "ping", "id": {"any": ["json"]}}')["id"] == {"any": ["json"]}
  assert protocol.parse_event('{"type": "session.update", "audio": {"sample_rate": 16000}}')["audio"]


def test_binary_frames_and_typed_text():
  assert protocol.parse_binary(b"\x01\x00\x00") == (protocol.AUDIO, b"\x00\x00")
  for frame, code in [(b"", "bad_frame"), (b"\x01\x00", "bad_audio"), (b"\x07ab", "bad_frame")]:
    with pytest.raises(protocol.ClientError) as e:
      protocol.parse_binary(frame)
    assert e.value.code == code
  assert protocol.raw_size(b"\x02\x00\x01\x00" + bytes(6)) == (2, 1)
  for payload in [
    b"\x02\x00",
    b"\x00\x00\x01\x00",
    b"\x02\x00\x01\x00" + bytes(5),
    b"\x01\x10\x01\x00" + bytes(3 * 4097),
  ]:
    with pytest.raises(protocol.ClientError) as e:
      protocol.raw_size(payload)
    assert e.value.code == "bad_video"
  assert protocol.typed_text("héllo", room=6) == 6
  with pytest.raises(protocol.ClientError) as e:
    protocol.typed_text("héllo", room=5)
  assert e.value.code == "input_overflow"
  with pytest.raises(protocol.ClientError) as e:
    protocol.typed_text("\ud800", room=10)
  assert e.value.code == "bad_event"
  protocol.check_video(protocol.JPEG, b"\xff\xd8 anything \xff\xd9")
  protocol.check_video(protocol.RAW, b"\x01\x00\x01\x00abc")
  for kind, payload in [
    (protocol.JPEG, b"\xff\xd8 truncated"),
    (protocol.JPEG, b"no SOI\xff\xd9"),
    (protocol.RAW, b"\x01"),
  ]:
    with pytest.raises(protocol.ClientError) as e:
      protocol.check_video(kind, payload)
    assert e.value.code == "bad_video"
