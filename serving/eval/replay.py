"""Replay held-out conversations through the micro-turn step and score them per task.

The step is the serving path: each conversation is fed one 200 ms micro-turn
per tick with the recorded outputs teacher-forced, so the scores say what the
model would say at each moment (its greedy choice) given exactly the past it
would have seen live. The sampler issue's evaluation job adds free-running
behaviour metrics (latencies, barge-in, tool use).
"""

from __future__ import annotations

import jax
import numpy as np

from interaction import step as step_lib


def replay_batch(step, cfg, params, batch, cache_tokens: int):
  """Greedy choices [B, N, slots] and target log-probs of the text output stream for one batch of whole
  conversations."""
  if np.any(batch["first_turn"] != 0):
    raise ValueError("replay needs windows that start at micro-turn 0 of their conversation")
  text_out = cfg.stream("text", "out").name
  b, n = batch["turn_mask"].shape
  state = step_lib.init_state(cfg, b, cache_tokens, temperature=0.0)
  greedy, logps = [], []
  for t in range(n):
    forced = {s.name: batch[s.name][:, t] for s in cfg.directed("out")}
    state, out = step(
      params, state, {s.name: batch[s.name][:, t] for s in cfg.directed("in")}, jax.random.key(0), forced
    )
    greedy.append(np.asarray(out.greedy[text_out]))
    logps.append(np.asarray(out.logprobs[text_out]))
  return np.stack(greedy, 1), np.stack(logps, 1)


def first_windows(batch):
  """The rows of ``batch`` whose window starts a conversation (None if there are none).

  A conversation longer than the replay window continues in later windows; replaying one of
  those from an empty cache would score the model without its past, so they are left out.
  """
  keep = np.asarray(batch["first_turn"]) == 0
  if not keep.any():
    return None
  return batch if keep.all() else jax.tree.map(lambda x: np.asarray(x)[keep], batch)


def replay(cfg, graphdef, params, batches, *, cache_tokens: int) -> dict[int, dict[str, float]]:
  """Per task id: greedy accuracy on spoken and on silent ``text_out`` slots (the first window of each
  conversation), and mean log-prob."""
  step = step_lib.Step(graphdef, cfg)
  sums: dict[int, np.ndarray] = {}
  for batch in batches:
    batch = first_windows(batch)
    if batch is None:
      continue
    greedy, logp = replay_batch(step, cfg, params, batch, cache_tokens)
    spec = cfg.stream("text", "out")
    target = batch[spec.name]
    mask = np.broadcast_to(batch["turn_mask"][..., None] > 0, target.shape)
    right = greedy == target
    spoken, silent = mask & ~spec.silent(target), mask & spec.silent(target)
    for row, task in enumerate(batch["labels"]["task"][:, 0].tolist()):
      if task < 0:
        continue
      sums.setdefault(task, np.zeros(6))
      sums[task] += [
        (right & spoken)[row].sum(),
        spoken[row].sum(),
        (right & silent)[row].sum(),
        silent[row].sum(),
        (logp * mask)[row].sum(),
        mask[row].sum(),
      ]
  return {
    task: {
      "spoken_acc": a[0] / max(a[1], 1),
      "silent_acc": a[2] / max(a[3], 1),
      "mean_logprob": a[4] / max(a[5], 1),
      "spoken_slots": int(a[1]),
    }
    for task, a in sums.items()
  }
