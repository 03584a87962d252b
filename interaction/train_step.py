"""The train step and train state: a pure ``(state, batch) -> (state, metrics)``.

Dimension legend: B global batch (windows), A gradient-accumulation microbatches.

The step is jitted once with explicit shardings and the state donated. A step
whose loss or gradient norm is not finite leaves parameters and optimizer state
untouched and is counted; the caller stops after ``max_bad_steps`` in a row.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from interaction import objective, schema, sharding
from interaction.ckpt.params import abstract_model
from interaction.config import ModelConfig
from interaction.experiment import TrainConfig
from interaction.model import InteractionModel


class TrainState(NamedTuple):
  step: jax.Array  # int32 []: steps taken, skipped ones included
  params: dict  # pure dict of arrays (nnx.to_pure_dict layout)
  opt_state: optax.OptState
  skipped: jax.Array  # int32 []: non-finite steps skipped in total
  bad_streak: jax.Array  # int32 []: non-finite steps in a row


def schedule(tc: TrainConfig) -> optax.Schedule:
  """Linear warmup to ``lr``, cosine decay to ``lr * min_lr_ratio`` at ``steps``."""
  return optax.warmup_cosine_decay_schedule(
    0.0, tc.lr, max(tc.warmup_steps, 1), max(tc.steps, tc.warmup_steps + 1), tc.lr * tc.min_lr_ratio
  )


class AdamState(NamedTuple):
  count: jax.Array  # int32 []
  mu: optax.Updates
  nu: optax.Updates


def scale_by_adam_stored_as(dtype, b1: float, b2: float, eps: float = 1e-8) -> optax.GradientTransformation:
  """Adam whose moments are *stored* in ``dtype``; the update is computed in float32.

  With bfloat16 the two moments take half their float32 memory (on the 276B config
  that is 16 GiB per chip of a v5p-128); with float32 this equals ``optax.scale_by_adam``.
  """
  f32 = jnp.float32

  def init(params):
    def zeros(p):
      return jnp.zeros(p.shape, dtype)

    return AdamState(jnp.zeros((), jnp.int32), jax.tree.map(zeros, params), jax.tree.map(zeros, params))

  def update(updates, state, params=None):
    del params
    count = optax.safe_increment(state.count)
    mu = jax.tree.map(lambda g, m: b1 * m.astype(f32) + (1 - b1) * g.astype(f32), updates, state.mu)
    nu = jax.tree.map(lambda g, v: b2 * v.astype(f32) + (1 - b2) * jnp.square(g.astype(f32)), updates, state.nu)
    c1, c2 = 1 - b1 ** count.astype(f32), 1 - b2 ** count.astype(f32)
    out = jax.tree.map(lambda m, v, g: ((m / c1) / (jnp.sqrt(v / c2) + eps)).astype(g.dtype), mu, nu, updates)
    store = jax.tree.map(lambda x: x.astype(dtype), (mu, nu))
    return out, AdamState(count, *store)

  return optax.GradientTransformation(init, update)


def optimizer(tc: TrainConfig) -> optax.GradientTransformation:
  """AdamW with global-norm clipping; no weight decay on vectors (norm scales).

  ``tc.moment_dtype`` is the dtype Adam's moments are stored in.
  """
  mask = lambda p: jax.tree.map(lambda x: x.ndim > 1, p)  # noqa: E731
  moment_dtype = jnp.dtype(tc.moment_dtype)
  if moment_dtype == jnp.float32:
    adamw = optax.adamw(schedule(tc), b1=tc.b1, b2=tc.b2, weight_decay=tc.weight_decay, mask=mask)
  else:
    adamw = optax.chain(
      scale_by_adam_stored_as(moment_dtype, tc.b1, tc.b2),
      optax.add_decayed_weights(tc.weight_decay, mask),
      optax.scale_by_learning_rate(schedule(tc)),
    )
  return optax.chain(optax.clip_by_global_norm(tc.clip_norm), adamw)


def batch_sharding(mesh, rules: sharding.Rules) -> NamedSharding:
  """Leading (batch) dim split over the axes ``rules`` give ``batch``."""
  return NamedSharding(mesh, P(sharding.logical_to_spec(("batch",), mesh, rules)[0]))


def check_batch_size(batch_size: int, mesh, rules: sharding.Rules) -> None:
  """A clear error for a batch the mesh cannot split (jax's own names tiling factors, not the setting)."""
  axes = batch_sharding(mesh, rules).spec[0] or ()
  axes = (axes,) if isinstance(axes, str) else tuple(axes)
  shards = math.prod(mesh.shape[a] for a in axes)
  if batch_size % shards:
    raise ValueError(
      f"data.batch_size={batch_size} cannot be split over the mesh's batch axes {dict((a, mesh.shape[a]) for a in axes)} "
      f"({shards} shards); use a multiple of {shards}, e.g. --config.data.batch_size={max(shards, batch_size // shards * shards)}"
    )


def model_batch(cfg: ModelConfig, batch) -> dict:
  """The keys of a pipeline batch that the model reads (``schema.select``)."""
  return schema.select(cfg.streams, batch)


def create(cfg: ModelConfig, tc: TrainConfig, mesh, seed: int = 0):
  """Sharded model init and an empty optimizer state.

  Returns ``(graphdef, state, state_shardings)``; shardings are a TrainState tree.
  """
  graphdef, params = sharding.init_sharded(lambda: InteractionModel(cfg, rngs=nnx.Rngs(seed)), mesh, cfg.rules)
  params = nnx.to_pure_dict(params)
  param_sh = jax.tree.map(lambda x: x.sharding, params)
  opt = optimizer(tc)
  replicated = NamedSharding(mesh, P())
  with jax.set_mesh(mesh):
    opt_shape = jax.eval_shape(opt.init, params)
    opt_sh = jax.tree.map(lambda _: replicated, opt_shape)
    # Moments follow their parameters' sharding; counters stay replicated.
    opt_sh = _match_param_shardings(opt_shape, params, param_sh, replicated)
    opt_state = jax.jit(opt.init, out_shardings=opt_sh)(params)

  def zero():  # distinct buffers: the state is donated
    return jax.device_put(jnp.zeros((), jnp.int32), replicated)

  state = TrainState(zero(), params, opt_state, zero(), zero())
  shardings = TrainState(replicated, param_sh, opt_sh, replicated, replicated)
  return graphdef, state, shardings


def abstract_create(cfg: ModelConfig, tc: TrainConfig, mesh):
  """Like ``create`` but nothing is allocated: the state is sharded ShapeDtypeStructs (for AOT compiles)."""
  graphdef, abs_params = abstract_model(cfg)
  param_sh = nnx.to_pure_dict(sharding.param_shardings(abs_params, mesh, cfg.rules))
  params = nnx.to_pure_dict(abs_params)
  replicated = NamedSharding(mesh, P())
  opt_shape = jax.eval_shape(optimizer(tc).init, params)
  opt_sh = _match_param_shardings(opt_shape, params, param_sh, replicated)
  scalar = jax.ShapeDtypeStruct((), jnp.int32)
  shapes = TrainState(scalar, params, opt_shape, scalar, scalar)
  shardings = TrainState(replicated, param_sh, opt_sh, replicated, replicated)
  return graphdef, abstract_state(shapes, shardings), shardings


def _match_param_shardings(opt_shape, params, param_sh, replicated):
  """Sub-trees of the optimizer state shaped like the params get the params' shardings."""
  params_def = jax.tree.structure(params)

  def visit(node):
    if jax.tree.structure(node) == params_def:
      return param_sh
    if isinstance(node, tuple) and hasattr(node, "_fields"):
      return type(node)(*(visit(c) for c in node))
    if isinstance(node, tuple | list):
      return type(node)(visit(c) for c in node)
    return jax.tree.map(lambda _: replicated, node)

  return visit(opt_shape)


def abstract_state(state_shapes, shardings):
  """ShapeDtypeStructs carrying target shardings, to restore a checkpoint onto a mesh."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state_shapes, shardings)


def make_train_step(graphdef, cfg: ModelConfig, tc: TrainConfig, mesh, shardings):
  """The jitted ``(state, batch) -> (state, metrics)``."""
  opt = optimizer(tc)
  lr_at = schedule(tc)

  max_offset = tc.time_offset_turns

  def loss_fn(params, batch, rng):
    model = nnx.merge(graphdef, params)
    if max_offset:
      # A window's clock starts anywhere in [0, max_offset] micro-turns: the model learns to react to
      # what it hears and sees, not to how long the session has run (live sessions run for hours).
      offset = jax.random.randint(jax.random.fold_in(rng, 7), batch["first_turn"].shape, 0, max_offset + 1)
      batch = dict(batch, first_turn=batch["first_turn"] + offset.astype(batch["first_turn"].dtype))
    losses = objective.losses(
      model,
      objective.window_outputs(model, batch, rng),
      batch,
      aux_weight=tc.aux_weight,
      z_weight=tc.z_weight,
      transition_weight=tc.transition_weight,
      listen_weight=tc.listen_weight,
    )
    return losses["total"], losses

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def accumulate(params, batch, rng):
    if tc.grad_accum == 1:
      return grad_fn(params, batch, rng)
    micro = jax.tree.map(lambda x: x.reshape(tc.grad_accum, x.shape[0] // tc.grad_accum, *x.shape[1:]), batch)

    def body(acc, xs):
      i, mb = xs
      (loss, aux), grads = grad_fn(params, mb, jax.random.fold_in(rng, i))
      return jax.tree.map(jnp.add, acc, ((loss, aux), grads)), None

    zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(grad_fn, params, jax.tree.map(lambda x: x[0], micro), rng))
    total, _ = jax.lax.scan(body, zeros, (jnp.arange(tc.grad_accum), micro))
    return jax.tree.map(lambda x: x / tc.grad_accum, total)

  def train_step(state: TrainState, batch):
    rng = jax.random.fold_in(jax.random.key(tc.seed), state.step)
    (loss, aux), grads = accumulate(state.params, batch, rng)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, new_opt = opt.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)

    def keep_if_bad(new, old):
      return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)

    new_state = TrainState(
      step=state.step + 1,
      params=keep_if_bad(new_params, state.params),
      opt_state=keep_if_bad(new_opt, state.opt_state),
      skipped=state.skipped + (~finite).astype(jnp.int32),
      bad_streak=jnp.where(finite, 0, state.bad_streak + 1),
    )
    metrics = dict(aux, grad_norm=grad_norm, lr=lr_at(state.step), finite=finite)
    return new_state, metrics

  jitted = jax.jit(
    train_step,
    in_shardings=(shardings, batch_sharding(mesh, cfg.rules)),
    out_shardings=(shardings, NamedSharding(mesh, P())),
    donate_argnums=(0,),
  )

  def run(state, batch):
    # The MoE reads the ambient mesh when the step is traced.
    with jax.set_mesh(mesh):
      return jitted(state, batch)

  run.jitted = jitted
  return run


def global_batch(batch, mesh, rules: sharding.Rules, *, whole: bool = False):
  """This process's share of the batch -> global arrays sharded over the batch axes.

  ``whole``: every process holds the whole global batch and keeps the rows its devices own.
  """
  bsh = batch_sharding(mesh, rules)
  if whole:
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(bsh, x, x.shape), batch)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(bsh, x), batch)
