"""The training forward over a window and its losses.

Dimension legend: B batch, N micro-turns, n slots of one stream, T = N * S
tokens, D d_model, V text vocabulary.

A batch is a dict: one [B, N, n, ...] array per stream (see ``layout``), plus
``first_turn`` [B] (absolute micro-turn of the window's start) and optionally
``turn_mask`` [B, N] (1 for real turns).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from interaction import layout, moe
from interaction.model import InteractionModel


def num_turns_of(model: InteractionModel, batch) -> int:
  return batch[model.order[0].name].shape[1]


def outputs_from_embeddings(model: InteractionModel, x_BTD, positions_BT, batch, rng):
  """Per-slot predictions of every output stream from embedded window tokens.

  Returns ``{stream: [B, N, n]}`` log-probabilities of the targets for text
  streams and flow-matching losses for audio streams, plus ``"moe"`` stats.
  """
  h_BTD, _, stats = model.forward(x_BTD, positions_BT)
  num_turns = num_turns_of(model, batch)
  out = {"moe": stats}
  if "heard" in batch:
    out["heard"] = heard_logprobs(model, h_BTD, batch["heard"], num_turns)
  for i, spec in enumerate(model.order):
    if spec.direction != "out":
      continue
    h_BNnD = h_BTD[:, model.prediction_index(spec.name, num_turns)]
    if spec.kind == "text":
      logp_BNnV = jax.nn.log_softmax(model.text_logits(h_BNnD), axis=-1)
      target_BNn = batch[spec.name]
      out[spec.name] = jnp.take_along_axis(logp_BNnV, target_BNn[..., None], axis=-1)[..., 0]
    else:
      out[spec.name] = model.flow_heads[spec.name].loss(h_BNnD, batch[spec.name], jax.random.fold_in(rng, i))
  return out


def heard_logprobs(model: InteractionModel, h_BTD, heard_BNn, num_turns: int):
  """[B, N, n] log-probability, at each input-audio token, of the transcript byte laid out there.

  The listening target (``data_pipeline.featurize.heard_text``): the hidden state of an audio
  frame predicts the bytes of the word just heard through the shared text head. Training only:
  no serving path reads it, and nothing of it is ever an input.
  """
  spec = model.cfg.stream("audio", "in")
  h_BNnD = h_BTD[:, layout.token_index(model.order, spec.name, num_turns)]
  logp_BNnV = jax.nn.log_softmax(model.text_logits(h_BNnD), axis=-1)
  return jnp.take_along_axis(logp_BNnV, jnp.maximum(heard_BNn, 0)[..., None], axis=-1)[..., 0]


def window_outputs(model: InteractionModel, batch, rng):
  """The training forward: embed the window, run the decoder without a cache, score outputs."""
  num_turns = num_turns_of(model, batch)
  first_turn = batch["first_turn"]
  x_BTD = model.embed_window({s.name: batch[s.name] for s in model.order}, first_turn, num_turns)
  return outputs_from_embeddings(model, x_BTD, model.window_positions(first_turn, num_turns), batch, rng)


def transition_weights(silent_BNn, weight: float):
  """``weight`` where an output stream starts or stops (a slot whose silence differs from the slot before), else 1.

  These few slots decide *when* the model speaks (turn taking, barge-in, interjections);
  under plain cross-entropy or flow matching they drown in the silent-to-silent and
  voiced-to-voiced slots around them.
  """
  b, n, k = silent_BNn.shape
  silent = silent_BNn.reshape(b, n * k)
  change = jnp.concatenate([jnp.zeros((b, 1), bool), silent[:, 1:] != silent[:, :-1]], axis=1)
  return jnp.where(change, weight, 1.0).reshape(b, n, k)


def silent_slots(spec, target):
  """[B, N, n] True where an output target slot is silent (``StreamSpec.silent``: PAD text, or a mel frame
  with no channel above mid-range)."""
  return spec.silent(target)


def losses(
  model: InteractionModel,
  outputs,
  batch,
  *,
  aux_weight: float = 0.01,
  z_weight: float = 1e-3,
  transition_weight: float = 1.0,
  listen_weight: float = 0.0,
):
  """Scalar losses: text cross-entropy, flow matching, MoE auxiliaries, and the total.

  ``text_ce`` and ``flow`` are the plain losses (comparable across runs); ``listen_ce``
  (when the batch has ``heard`` targets) is the listening loss, added with ``listen_weight``; with
  ``transition_weight`` != 1 the total weights every output stream's slots by
  ``transition_weights`` (where speech starts or stops, in text and in audio).
  """
  first = next(iter(v for k, v in outputs.items() if k not in ("moe", "heard")))
  mask_BN = batch.get("turn_mask")
  mask_BN = jnp.ones(first.shape[:2], jnp.float32) if mask_BN is None else mask_BN.astype(jnp.float32)
  denom = jnp.maximum(jnp.sum(mask_BN), 1.0)
  text_ce, flow, total = 0.0, 0.0, 0.0
  for spec in model.order:
    if spec.direction != "out":
      continue
    # Text outputs are log-probabilities, audio outputs flow-matching losses.
    sign = -1.0 if spec.kind == "text" else 1.0
    value = sign * jnp.sum(jnp.mean(outputs[spec.name], axis=-1) * mask_BN) / denom
    if spec.kind == "text":
      text_ce = text_ce + value
    else:
      flow = flow + value
    if transition_weight != 1.0:
      w_BNn = transition_weights(silent_slots(spec, batch[spec.name]), transition_weight) * mask_BN[..., None]
      total = total + sign * jnp.sum(w_BNn * outputs[spec.name]) / jnp.maximum(jnp.sum(w_BNn), 1.0)
    else:
      total = total + value
  result = {"text_ce": text_ce, "flow": flow}
  if "heard" in outputs:
    # Slots with no word timings (HEARD_UNKNOWN, -1) carry no listening target.
    known_BNn = (batch["heard"] >= 0) & (mask_BN[..., None] > 0)
    result["listen_ce"] = -jnp.sum(jnp.where(known_BNn, outputs["heard"], 0.0)) / jnp.maximum(jnp.sum(known_BNn), 1)
    if listen_weight:
      total = total + listen_weight * result["listen_ce"]
  if outputs["moe"] is not None:
    # Stats are stacked over layers: losses per layer, averaged.
    per_layer = jax.vmap(lambda s: moe.router_losses(s, model.cfg.experts_per_token))(outputs["moe"])
    result["load_balance"] = jnp.mean(per_layer["load_balance_loss"])
    result["router_z"] = jnp.mean(per_layer["router_z_loss"])
    result["expert_load"] = per_layer["expert_load"]
    total = total + aux_weight * result["load_balance"] + z_weight * result["router_z"]
  result["total"] = total
  return result
