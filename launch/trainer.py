"""The training loop: data, sharded state, the jitted step, checkpoints, metrics.

``run(config, workdir)`` is what ``python -m launch.train`` calls. It resumes
from the newest committed checkpoint in ``workdir`` (train state and data
iterator state together), so an interrupted run continues exactly. The step
itself is ``interaction.train_step``.
"""

from __future__ import annotations

import json
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from data_pipeline import shards, synthetic
from data_pipeline.pipeline import make_pipeline
from interaction import distributed, flops, objective, sharding, train_step
from interaction.ckpt import trainer as checkpoint
from interaction.experiment import ExperimentConfig
from launch.train_log import MetricsWriter, Progress, log


class NonFiniteError(RuntimeError):
  """Too many non-finite steps in a row."""


class StreakWatch:
  """The first step at which the bad-step streak reached ``limit``, kept on the device.

  ``update`` after every step only dispatches a tiny program (no host sync, so step n+1 is queued
  before step n finishes); ``tripped`` reads it back, which the loop does only where it waits for the
  device anyway (metrics, checkpoints, the end). The step it names is exact however late it is read.
  """

  def __init__(self, limit: int):
    self.limit = limit
    self.first = None  # int32 on the state's devices: 0 until the streak reaches the limit, then that step
    self._zero = jax.jit(lambda step: step * 0)
    self._update = jax.jit(lambda first, streak, step: jnp.where((first == 0) & (streak >= limit), step, first))

  def update(self, state) -> None:
    if self.first is None:
      self.first = self._zero(state.step)
    self.first = self._update(self.first, state.bad_streak, state.step)

  def tripped(self) -> int | None:
    """The step at which the streak reached the limit, or None (waits for the steps dispatched so far)."""
    step = 0 if self.first is None else int(self.first)
    return step or None


def prepare_data(config: ExperimentConfig, workdir: pathlib.Path) -> pathlib.Path:
  """The dataset directory; with none configured, the embedded synthetic tasks in the workdir.

  Process 0 generates them (the workdir is shared) while the others wait at a barrier.
  """
  if config.data.dir:
    data_dir = pathlib.Path(config.data.dir)
    if not (data_dir / "manifest.json").exists():
      raise FileNotFoundError(f"--config.data.dir={data_dir} has no manifest.json; convert data into it first")
  else:
    data_dir = _synthetic_data(config, workdir)
  # Before any model exists: a broken dataset is one line (exit 2) in seconds, not a traceback after init. The
  # pipelines then skip their own checksum pass (``pipeline``): each shard is hashed once per run.
  shards.check_dataset(data_dir, decode=config.data.bad_records == "fail")
  return data_dir


def _synthetic_data(config: ExperimentConfig, workdir: pathlib.Path) -> pathlib.Path:
  data_dir = workdir / "data"
  if jax.process_index() == 0 and not (data_dir / "manifest.json").exists():
    log(f"generating the embedded synthetic dataset into {data_dir}")
    # The train split follows the configured mix; held-out conversations are spread evenly over the tasks.
    train_tasks = synthetic.mixed_tasks(dict(config.data.synthetic_mix))
    for split, count, tasks in (
      ("train", config.data.synthetic_train, train_tasks),
      ("eval", config.data.synthetic_eval, synthetic.TASKS),
    ):
      synthetic.generate(data_dir, split, count, seed=config.data.seed + (split == "eval"), tasks=tasks, progress=True)
  distributed.barrier("synthetic_data", timeout=max(distributed.timeout_s(), config.data.prepare_timeout))
  return data_dir


def pipeline(config: ExperimentConfig, data_dir, **kwargs):
  """``make_pipeline`` split across processes per ``data.process_sharding``; returns ``(iterator, whole)``."""
  kwargs.setdefault("verify_checksums", False)  # prepare_data's check_dataset hashed every shard
  mode, n = config.data.process_sharding, jax.process_count()
  if mode == "whole" or n == 1:
    return make_pipeline(config, data_dir, process_index=0, process_count=1, **kwargs), n > 1
  if config.data.batch_size % n:
    raise ValueError(f"data.batch_size={config.data.batch_size} is not divisible by the {n} processes")
  return make_pipeline(config, data_dir, batch_size=config.data.batch_size // n, **kwargs), False


def train_iterator(config: ExperimentConfig, data_dir, data_state: dict | None):
  """The train split's iterator, at the restored position if any; returns ``(iterator, whole)``."""
  it, whole = pipeline(config, data_dir, split="train")
  if data_state:
    it.set_state(data_state)
  return it, whole


def make_eval_loss(graphdef, cfg, tc, mesh):
  """Jitted losses of a batch, sharded like training (no gradient)."""

  def f(params, batch):
    model = nnx.merge(graphdef, params)
    out = objective.window_outputs(model, batch, jax.random.key(tc.seed + 1))
    losses = objective.losses(
      model,
      out,
      batch,
      aux_weight=tc.aux_weight,
      z_weight=tc.z_weight,
      transition_weight=tc.transition_weight,
    )
    return {k: v for k, v in losses.items() if k != "expert_load"}

  jitted = jax.jit(f, in_shardings=(None, train_step.batch_sharding(mesh, cfg.rules)))

  def run(params, batch):
    with jax.set_mesh(mesh):
      return jitted(params, batch)

  return run


def evaluate(config: ExperimentConfig, data_dir, params, eval_loss, cfg, mesh, max_batches: int | None = None) -> dict:
  """Mean held-out losses over the eval split, weighted by real micro-turns."""
  it, whole = pipeline(config, data_dir, split="eval", num_epochs=1, shuffle=False)
  totals, weight = {}, 0.0
  for i, batch in enumerate(it):
    if max_batches is not None and i >= max_batches:
      break
    # The global weight: every process must take the same branch (the loss is a collective).
    w = float(np.sum(batch["turn_mask"])) if whole else float(distributed.process_sum(np.sum(batch["turn_mask"])))
    if w == 0:
      continue
    out = jax.device_get(
      eval_loss(params, train_step.global_batch(train_step.model_batch(cfg, batch), mesh, cfg.rules, whole=whole))
    )
    for k, v in out.items():
      totals[k] = totals.get(k, 0.0) + float(v) * w
    weight += w
  it.close()
  return {k: v / max(weight, 1.0) for k, v in totals.items()}


def restore_or_init(config, cfg, tc, mesh, ckpt: checkpoint.Checkpointer, resume: bool):
  """The newest intact committed step (a corrupt newer one is set aside and named), else a fresh state."""
  graphdef, state, shardings = train_step.create(cfg, tc, mesh, seed=tc.seed)
  if not resume or not ckpt.all_steps():
    return graphdef, state, shardings, None, 0
  target = train_step.abstract_state(jax.eval_shape(lambda s: s, state), shardings)
  step, restored, data_state, _ = ckpt.restore_latest_intact(target._asdict(), log=log)
  log(f"resumed from step {step} ({ckpt.directory})")
  return graphdef, train_step.TrainState(**restored), shardings, data_state, step


def run(config: ExperimentConfig, workdir, *, resume: bool = True, progress: bool = True) -> dict:
  """Train ``config`` (``interaction.experiment.experiment`` of a get_config()) in ``workdir``; returns a
  summary (final step, losses, eval).

  Joins the launcher's multi-process job first, if any (``interaction.distributed``). On SIGTERM
  every process saves a checkpoint at the same step and returns (``summary["preempted"]``).
  """
  distributed.initialize_from_env()
  preemption = distributed.Preemption().install()
  try:
    with distributed.peer_guard():
      return _run(config, pathlib.Path(workdir), resume, progress, preemption)
  finally:
    preemption.uninstall()


def _run(config, workdir, resume, progress, preemption) -> dict:
  main = jax.process_index() == 0
  if main:
    workdir.mkdir(parents=True, exist_ok=True)
  distributed.barrier("workdir")
  cfg, tc = config.model, config.train
  mesh = sharding.make_mesh(config.mesh.axes())
  train_step.check_batch_size(config.data.batch_size, mesh, cfg.rules)
  saved = json.loads(json.dumps(config.to_dict()))  # every field, defaults included: what ran
  data_dir = prepare_data(config, workdir)
  ckpt = checkpoint.Checkpointer(workdir / "checkpoints", keep=tc.keep_checkpoints)
  graphdef, state, shardings, data_state, start = restore_or_init(config, cfg, tc, mesh, ckpt, resume)
  if main:  # only now: a refused resume leaves the workdir's config (and its checkpoints' readers) as they were
    _write_atomic(workdir / "config.json", json.dumps(saved, indent=1))
  it, whole = train_iterator(config, data_dir, data_state)
  step_fn = train_step.make_train_step(graphdef, cfg, tc, mesh, shardings)
  writer = MetricsWriter(workdir, enabled=main, resumed_at=start or None)
  # Measured on this process's first device; only process 0 reports MFU.
  peak = flops.measure_matmul_peak() if main else float("nan")
  window_flops = flops.train_flops_per_window(cfg, config.data.window_turns)
  tokens_per_batch = config.data.batch_size * config.data.window_turns * sum(s.slots for s in cfg.streams)
  meta = {"config": saved, "mesh": dict(mesh.shape)}
  log(
    f"process {jax.process_index()}/{jax.process_count()}: mesh {dict(mesh.shape)}; "
    f"matmul peak {peak / 1e9:.1f} GFLOP/s; training steps {start}..{tc.steps}"
  )
  bar = Progress(start, tc.steps, progress and main)
  last_losses, t_last, steps_since, preempted = {}, time.perf_counter(), 0, False
  check_every = max(tc.preemption_check_every, 1)
  watch = StreakWatch(tc.max_bad_steps)
  for step in range(start, tc.steps):
    batch = train_step.model_batch(cfg, next(it))
    state, m = step_fn(state, train_step.global_batch(batch, mesh, cfg.rules, whole=whole))
    watch.update(state)
    steps_since += 1
    done = step + 1
    logged = done % tc.log_every == 0 or done == tc.steps
    if logged:
      elapsed, t_last = time.perf_counter() - t_last, time.perf_counter()
      scale = steps_since / elapsed
      last_losses = _log_metrics(
        writer,
        bar,
        done,
        jax.device_get(m),
        state,
        scale * tokens_per_batch,
        scale * window_flops * config.data.batch_size / peak,
      )
      steps_since = 0
    # A collective every process runs at the same step, so all stop at the same one.
    preempted = done < tc.steps and done % check_every == 0 and preemption.should_stop()
    save = done % tc.checkpoint_every == 0 or done == tc.steps or preempted
    # Read where the host waits anyway, and always before a save (every process reads the same value).
    if (logged or save) and (bad := watch.tripped()) is not None:
      bar.close()
      ckpt.wait()  # an in-flight save commits (or fails) now, not at interpreter exit: name what is really there
      raise NonFiniteError(
        f"step {bad}: {tc.max_bad_steps} non-finite steps in a row (loss or gradient NaN/Inf); "
        f"stopping. The last committed checkpoint is step {ckpt.latest_step()}"
      )
    if save:
      ckpt.save(done, state._asdict(), it.get_state(), meta)
      log(f"checkpoint: saving step {done} (async)")
    if preempted:
      break
  bar.close()
  ckpt.wait()
  if preempted:
    log(f"preempted: process {jax.process_index()} saved step {ckpt.latest_step()} and stops; a restart resumes there")
    distributed.barrier("preempted")
    _close(writer, ckpt, it)
    return {"step": int(state.step), "preempted": True, "checkpoint": ckpt.latest_step()}
  eval_losses = evaluate(config, data_dir, state.params, make_eval_loss(graphdef, cfg, tc, mesh), cfg, mesh)
  writer.write(tc.steps, {f"eval/{k}": v for k, v in eval_losses.items()}, replace=True)
  _close(writer, ckpt, it)
  summary = _summary(state, last_losses, eval_losses)
  distributed.barrier("finished")
  return summary


def _summary(state, train_losses: dict, eval_losses: dict) -> dict:
  """The run's last line: final step, skipped steps, the parameters' SHA-256, the last train and eval losses."""
  summary = {
    "step": int(state.step),
    "skipped": int(state.skipped),
    "params_sha256": checkpoint.tree_digest(jax.tree.map(distributed.host_value, state.params)),
    "train": train_losses,
    "eval": eval_losses,
  }
  log("summary " + json.dumps(summary))
  return summary


def _log_metrics(writer, bar, step: int, m: dict, state, tokens_per_sec: float, mfu: float) -> dict:
  """Write one metrics row and advance the progress bar; returns the scalar losses."""
  losses = {k: float(v) for k, v in m.items() if np.ndim(v) == 0}
  writer.write(step, dict(m, tokens_per_sec=tokens_per_sec, mfu=mfu, skipped_steps=int(state.skipped)))
  bar.update(step, losses.get("total", float("nan")), tokens_per_sec)
  return losses


def _write_atomic(path: pathlib.Path, text: str) -> None:
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(text)
  tmp.replace(path)


def _close(writer, ckpt, it) -> None:
  writer.close()
  ckpt.close()
  it.close()
