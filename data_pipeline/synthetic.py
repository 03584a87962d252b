"""Embedded synthetic conversations with exact per-micro-turn ground truth.

  python -m launch.data synthetic --output /tmp/synth --train 2048 --eval 256

The vocabulary, speakers and the ``Script`` a conversation is written into
live in data_pipeline/script.py, the task families in data_pipeline/tasks.py.
The eval split is spoken by voice variants no train conversation uses
(``speech.HELDOUT_VARIANTS``). Conversation ``i`` of a split is a pure function of
(seed, i, voices): generation is deterministic and order-independent.
"""

from __future__ import annotations

import numpy as np

from data_pipeline import record, shards
from data_pipeline import tasks as task_lib
from data_pipeline.script import TASKS, Script, render, speaker

VOICE_SETS = ("train", "heldout")
LATE_START = 0.3  # conversations that open with 1-10 s of silence


def conversation(
  seed: int, index: int, tasks=TASKS, frame_size: int = 40, voices: str = "train"
) -> record.Conversation:
  """Conversation ``index`` of the stream seeded by ``seed``; the task cycles through ``tasks``.

  ``voices`` picks the user's voice variants: "train" or "heldout" (never used in training).
  """
  if voices not in VOICE_SETS:
    raise ValueError(f"voices must be one of {VOICE_SETS}, got {voices!r}")
  task = tasks[index % len(tasks)]
  rng = np.random.default_rng([seed, index])
  s = Script(task=task, id=f"synth-{seed}-{index:07d}-{task}", voice=speaker(rng, voices), voices=voices)
  task_lib.BUILDERS[task](s, rng, frame_size)
  if rng.uniform() < LATE_START:  # a session does not always open with speech: silence first, of any length
    s.delay(int(rng.integers(5, 50)))
  return render(s, rng)


def mixed_tasks(weights=None) -> tuple[str, ...]:
  """The task cycle for a mix: each task ``weights.get(task, 1)`` times, interleaved.

  ``{"visual_interjection": 3}`` -> the seven tasks, then visual_interjection twice more:
  a third of the conversations are visual, the rest split evenly.
  """
  weights = dict(weights or {})
  unknown = sorted(set(weights) - set(TASKS))
  if unknown:
    raise ValueError(f"synthetic mix names unknown tasks {unknown}; known: {TASKS}")
  bad = {k: v for k, v in weights.items() if not (isinstance(v, int) and v >= 0)}
  if bad:
    raise ValueError(f"synthetic mix weights must be integers >= 0, got {bad}")
  rounds = max([1, *weights.values()])
  cycle = tuple(t for r in range(rounds) for t in TASKS if weights.get(t, 1) > r)
  if not cycle:
    raise ValueError("synthetic mix gives every task weight 0")
  return cycle


def generate(
  out_dir,
  split: str,
  count: int,
  seed: int,
  tasks=TASKS,
  records_per_shard: int = 512,
  frame_size: int = 40,
  progress: bool = False,
  voices: str | None = None,
):
  """Write ``count`` conversations as one split of ``out_dir``; returns the shards.

  ``voices`` defaults to "heldout" for the eval split and "train" otherwise.
  """
  voices = voices or ("heldout" if split == "eval" else "train")
  convs = (conversation(seed, i, tasks, frame_size, voices) for i in range(count))
  if progress:
    from tqdm import tqdm

    convs = tqdm(convs, total=count, desc=f"synthetic {split}", unit="conv")
  return shards.write_split(out_dir, split, convs, records_per_shard)
