"""The evaluation: stream held-out conversations through the engine and score interaction behaviour.

``run(checkpoint, data_dir, slots, output_dir)`` is what ``python -m launch.evaluate`` calls.
Each conversation joins the engine as a session and receives its user audio,
video and user text one 200 ms micro-turn per tick (no look-ahead); everything
it says is its own (free running, nothing teacher-forced). Tool calls run in
the tool runtime (built-in calculator) and delegations in the background
worker; their results reach the model only through the runtime. Tool and
background results are held for ``TOOL_LATENCY_TICKS`` / ``BACKGROUND_LATENCY_TICKS``
ticks, a simulated latency in the range the training data shows, which also
makes arrival ticks deterministic.

Writes ``report.json`` (every figure; those with a target carry value, target
and pass) and ``timeline-<task>.png`` for one conversation per task, and prints
a table. ``oracle=True`` scores the recorded model streams instead (the data's
own behaviour: a check that the scores and targets are attainable).
"""

from __future__ import annotations

import concurrent.futures
import json
import math
import pathlib
import time

import jax
import numpy as np

from data_pipeline import featurize, record, script, shards
from interaction import sharding
from interaction.ckpt import open_model
from serving.background import ArithmeticBackground, BackgroundWorker
from serving.calls import MarkerParser
from serving.engine import Engine, Sampling
from serving.eval import scores, timeline
from serving.tools import ToolRuntime

TOOL_LATENCY_TICKS = 3
BACKGROUND_LATENCY_TICKS = 6


def read_conversations(data_dir, split: str = "eval", limit: int | None = None) -> list[record.Conversation]:
  """Decoded conversations of a split, checksums verified."""
  out = []
  for conversation in shards.iter_records(data_dir, split):  # a bad record is named by file and index
    if limit is not None and len(out) >= limit:
      break
    out.append(conversation)
  return out


def silent_conversation(turns: int = scores.SILENCE_TURNS) -> record.Conversation:
  """``turns`` micro-turns of nothing: no sound, no video, no text (the model should stay quiet)."""
  zeros = np.zeros(turns * record.SAMPLES_PER_TURN, np.int16)
  return record.Conversation(id=f"silence-{turns}", user_audio=zeros, model_audio=zeros, meta={"task": "silence"})


def conversation_streams(cfg, conv: record.Conversation) -> dict:
  """Whole-conversation features, and what a live client sends: ``client_<stream>`` for each input.

  A live client sends its microphone, its camera and what the user types: the user's speech
  reaches the model as audio only. Tool and background results come from the runtime, live.
  """
  feats = featurize.window(cfg.streams, conv, 0, conv.num_turns)
  for spec in cfg.directed("in"):
    if spec.kind == "text":
      typed = [e for e in conv.events if e.kind == "user_text"]
      feats["client_" + spec.name] = featurize.layout_text(typed, conv.num_turns, spec.slots)
    else:
      feats["client_" + spec.name] = feats[spec.name]
  return feats


def ref_words(conv: record.Conversation) -> list[tuple[int, str]]:
  """(micro-turn, word) of everything the recorded model says, in order."""
  return [(record.turn_of(e.start), e.text.strip()) for e in conv.events if e.kind == "model_text"]


def ref_calls(conv: record.Conversation) -> dict:
  kinds = {"tool_call": "tool", "delegate": "background"}
  return {kinds[e.kind]: e.text for e in conv.events if e.kind in kinds}


def oracle_transcript(cfg, conv, feats) -> scores.Transcript:
  """The recorded model streams as a transcript (calls parsed from text_out, results from the cues)."""
  text_out, text_in = cfg.stream("text", "out").name, cfg.stream("text", "in").name
  audio_out = cfg.stream("audio", "out")
  parser, calls = MarkerParser(), []
  cue = feats["labels"]["cue"]
  for t, row in enumerate(feats[text_out]):
    for kind, request in parser.feed(row):
      name = "tool_result" if kind == "tool" else "background_result"
      arrived = np.flatnonzero((cue == script.CUE[name]) & (np.arange(len(cue)) > t))
      calls.append(scores.CallRecord(kind, request, t, int(arrived[0]) if len(arrived) else None))
  return scores.Transcript(
    conv.meta.get("task", ""),
    feats["labels"],
    feats[text_out],
    feats[audio_out.name],
    feats[text_in],
    calls,
    ref_calls(conv),
    ref_words(conv),
    audio_out,
  )


def stream_through_engine(
  engine, cfg, convs, sampling, progress: bool = True, *, ids=None, label: str = ""
) -> list[scores.Transcript]:
  """Run every conversation as a session; sessions join as slots free up, leave at their last turn.

  ``ids``: each conversation's index in the whole evaluation (its sampling seed is ``sampling.seed + id``),
  so a conversation samples alike whichever replica streams it.
  """
  ids = list(range(len(convs))) if ids is None else list(ids)
  in_names = [s.name for s in cfg.directed("in")]
  queue = list(range(len(convs)))
  live, done = {}, {}  # session id -> (conversation index, features, per-turn outputs)
  ticks, t0 = 0, time.perf_counter()
  while queue or live:
    while queue and len(live) < engine.slots:
      i = queue.pop(0)
      session = engine.join(Sampling(sampling.temperature, sampling.top_p, sampling.seed + ids[i]))
      live[session.id] = (i, conversation_streams(cfg, convs[i]), [], session)
    inputs = {}
    for sid, (_, feats, outs, _) in live.items():
      t = len(outs)
      inputs[sid] = {k: feats["client_" + k][t] for k in in_names}
    results = engine.tick(inputs)
    ticks += 1
    for sid in list(live):
      i, feats, outs, session = live[sid]
      outs.append(results[sid])
      if len(outs) == convs[i].num_turns:
        engine.leave(sid)
        done[i] = _transcript(cfg, convs[i], feats, outs, session)
        del live[sid]
    if progress and ticks % 50 == 0:
      print(f"  {label}tick {ticks}: {len(done)}/{len(convs)} conversations done", flush=True)
  if progress:
    dt = time.perf_counter() - t0
    print(
      f"  {label}{ticks} ticks in {dt:.1f} s ({dt / ticks * 1e3:.0f} ms per tick, {engine.slots} slots)", flush=True
    )
  return [done[i] for i in range(len(convs))]


def _transcript(cfg, conv, feats, outs, session) -> scores.Transcript:
  stack = {k: np.stack([o.values[k] for o in outs]) for k in outs[0].values}
  audio_out = cfg.stream("audio", "out")
  calls = [scores.CallRecord(c.kind, c.request, c.tick, c.first_tick, c.result, c.error) for c in session.calls]
  return scores.Transcript(
    conv.meta.get("task", ""),
    feats["labels"],
    stack[cfg.stream("text", "out").name],
    stack[audio_out.name],
    stack[cfg.stream("text", "in").name],
    calls,
    ref_calls(conv),
    ref_words(conv),
    audio_out,
  )


def replica_meshes(axes: dict | None, replicas: int) -> list:
  """One mesh per replica over disjoint devices (``[None]``: one engine on the first device)."""
  if replicas < 1:
    raise ValueError(f"replicas must be >= 1, got {replicas}")
  if replicas == 1:
    return [sharding.make_mesh(axes) if axes else None]
  devices = jax.devices()
  axes = dict(axes or {})
  per = len(devices) // replicas if -1 in axes.values() else math.prod(axes.values() or [1])
  if per < 1 or per * replicas > len(devices):
    raise ValueError(
      f"{replicas} replicas of mesh {axes or '(one device)'} need {replicas * max(per, 1)} devices, have {len(devices)}"
    )
  return [sharding.make_mesh(axes, devices[r * per : (r + 1) * per]) for r in range(replicas)]


def placement(meshes: list) -> dict:
  """Where the engines ran, for the report: one device, or each replica's mesh axes."""
  if meshes == [None]:
    return {"devices": 1}
  shape = {k: v for k, v in meshes[0].shape.items() if v > 1}
  where = {"mesh": shape} if len(meshes) == 1 else {"replicas": len(meshes), "mesh": shape}
  return where | ({"processes": jax.process_count()} if jax.process_count() > 1 else {})


def build_report(transcripts, info: dict) -> dict:
  tally = scores.Tally()
  per_task = {}
  for tr in transcripts:
    scores.score(tr, tally)
    if tr.task != "silence":  # the silent session is a probe, not a held-out conversation
      per_task[tr.task] = per_task.get(tr.task, 0) + 1
  figures = scores.with_targets(tally.figures())
  failed = sorted(k for k, f in figures.items() if f.get("pass") is False)
  return dict(info, conversations=per_task, figures=figures, targets_failed=failed, all_targets_pass=not failed)


def format_table(report: dict) -> str:
  lines = [f"{'figure':<30}{'value':>9}{'target':>10}{'':>6}{'events':>8}"]
  for name, f in report["figures"].items():
    value = "n/a" if f["value"] is None else f"{f['value']:.3f}"
    target = f"{f['op']} {f['target']:g}" if "target" in f else ""
    verdict = ("PASS" if f["pass"] else "FAIL") if "target" in f else ""
    lines.append(f"{name:<30}{value:>9}{target:>10}{verdict:>6}{f['n']:>8}")
  lines.append(
    "all targets pass" if report["all_targets_pass"] else f"targets failed: {', '.join(report['targets_failed'])}"
  )
  return "\n".join(lines)


def run(
  checkpoint,
  data_dir,
  slots: int = 32,
  output_dir=None,
  *,
  temperature: float = 0.0,
  top_p: float = 1.0,
  seed: int = 0,
  max_conversations: int | None = None,
  oracle: bool = False,
  timelines: bool = True,
  progress: bool = True,
  silence: bool = True,
  mesh: dict | None = None,
  replicas: int = 1,
) -> dict:
  """Evaluate ``checkpoint`` on the eval split of ``data_dir``; print the table, return the report.

  ``mesh`` (axis sizes, e.g. ``{"data": 2, "expert": 4}``) lays the parameters and the engine's slots
  out over this process's devices; ``None`` runs on the first device. ``replicas`` > 1 splits the
  conversations over that many engines, each on its own devices (a sub-mesh of ``mesh``'s shape, or one
  device each), run side by side; their transcripts merge into one report. The report is the same
  for every placement. In a multi-process job (``interaction.distributed``) the mesh spans every
  process's devices: each process streams the same conversations (read from ``data_dir``) in lockstep,
  and process 0 alone prints and writes ``output_dir``.
  """
  meshes = replica_meshes(mesh, replicas)
  lead = jax.process_index() == 0  # on several processes every one streams in lockstep; process 0 reports
  progress = progress and lead
  loaded = open_model(checkpoint, mesh=meshes[0] if replicas == 1 else None)
  convs = read_conversations(data_dir, limit=max_conversations)
  if not convs:
    raise ValueError(f"{data_dir}: the eval split holds no conversations")
  if silence:
    convs = [silent_conversation(), *convs]  # first, so its 300 ticks run beside the others
  info = {"checkpoint": str(loaded.path), "step": loaded.step, "slots": slots, "oracle": oracle}
  info |= {"placement": placement(meshes)}
  info |= {"silence_turns": scores.SILENCE_TURNS if silence else 0}
  info |= {"sampling": {"temperature": temperature, "top_p": top_p, "seed": seed}}
  if oracle:
    transcripts = [oracle_transcript(loaded.cfg, c, conversation_streams(loaded.cfg, c)) for c in convs]
  else:
    sampling = Sampling(temperature, top_p, seed)

    def replica(r: int) -> dict:
      tools = ToolRuntime(hold_ticks=TOOL_LATENCY_TICKS)
      background = BackgroundWorker(ArithmeticBackground(), hold_ticks=BACKGROUND_LATENCY_TICKS)
      engine = Engine.from_loaded(loaded, slots=slots, tools=tools, background=background, mesh=meshes[r])
      mine = list(range(r, len(convs), len(meshes)))
      label = f"replica {r}: " if len(meshes) > 1 else ""
      try:
        got = stream_through_engine(
          engine, loaded.cfg, [convs[i] for i in mine], sampling, progress, ids=mine, label=label
        )
      finally:
        engine.close()
      return dict(zip(mine, got, strict=True))

    # Side by side: a tick waits on its devices with the GIL released, so the replicas' steps overlap.
    with concurrent.futures.ThreadPoolExecutor(len(meshes)) as pool:
      merged = {i: tr for part in pool.map(replica, range(len(meshes))) for i, tr in part.items()}
    transcripts = [merged[i] for i in range(len(convs))]
    info |= {"tool_latency_ticks": TOOL_LATENCY_TICKS, "background_latency_ticks": BACKGROUND_LATENCY_TICKS}
  report = build_report(transcripts, info)
  if not lead:
    return report
  if output_dir is not None:
    out = pathlib.Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=1))
    if timelines:
      convs_only = [tr for tr in transcripts if tr.task != "silence"]
      report["timelines"] = [str(p) for p in timeline.plot_one_per_task(convs_only, out)]
      (out / "report.json").write_text(json.dumps(report, indent=1))
  print(format_table(report), flush=True)
  return report
