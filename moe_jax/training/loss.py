"""The V3 training objective on packed rows (DeepSeek-V3 report eqs. 17-20 and 24-25):

  L = L_main + lambda * L_MTP + sum over MoE layers of L_bal

  L_main   mean over targets of -log p(t_{i+1} | t_<=i): position i predicts token i+1 when both lie in the same
           document (segment_ids equal and non-zero), so padding and document boundaries are never targets; with
           a `loss_mask` (fine-tuning conversations) only flagged tokens are targets
  L_MTP    (1/J) sum_k L_MTP^k (eq. 25; J the MTP depth); depth k (1-based) at position i predicts token i+k+1, a
           target when token i+k+1 is in position i's document
  L_bal    the alpha-weighted sequence-wise balance loss each MoE layer returns (main layers and MTP blocks)
  L^I      with DeepSeek Sparse Attention, the indexers' KL loss (V3.2; weight config.train.index_loss_weight)
"""

from __future__ import annotations

import jax.numpy as jnp

from moe_jax.model.nll import token_nll


def shifted_targets(tokens_BT, segment_ids_BT, shift: int, loss_mask_BT=None):
  """(targets [B,T], mask [B,T]): targets[i] = tokens[i + shift], valid when in the same non-padding document
  and, with `loss_mask_BT` (the packed rows' per-token flag: a conversation's trained tokens), flagged."""
  T = tokens_BT.shape[1]
  pad = ((0, 0), (0, min(shift, T)))
  targets_BT = jnp.pad(tokens_BT[:, shift:], pad)[:, :T]
  target_seg_BT = jnp.pad(segment_ids_BT[:, shift:], pad)[:, :T]
  mask_BT = (segment_ids_BT != 0) & (target_seg_BT == segment_ids_BT)
  if loss_mask_BT is not None:
    mask_BT = mask_BT & (jnp.pad(loss_mask_BT[:, shift:], pad)[:, :T] != 0)
  return targets_BT, mask_BT


def masked_mean_nll(logits_BTV, tokens_BT, segment_ids_BT, shift: int, loss_mask_BT=None):
  """(mean NLL over valid targets, NLL sum, target count, targets [B,T], mask [B,T])."""
  targets_BT, mask_BT = shifted_targets(tokens_BT, segment_ids_BT, shift, loss_mask_BT)
  nll_BT = token_nll(logits_BTV, targets_BT)
  maskf_BT = mask_BT.astype(jnp.float32)
  total = jnp.sum(nll_BT * maskf_BT)
  count = jnp.sum(maskf_BT)
  return total / jnp.maximum(count, 1.0), total, count, targets_BT, mask_BT


def training_loss(logits_BTV, aux: dict, batch: dict, mtp_weight, index_loss_weight=1.0):
  """(total loss, metrics dict of scalars). With DSA, aux["index_loss"] (the indexers' KL averaged over layers)
  is added with `index_loss_weight`; its gradient reaches only the indexers (moe_jax.layers.indexer)."""
  tokens_BT, seg_BT, lm_BT = batch["tokens"], batch["segment_ids"], batch.get("loss_mask")
  ce, _, count, _, _ = masked_mean_nll(logits_BTV, tokens_BT, seg_BT, 1, lm_BT)
  balance = jnp.sum(aux["balance_loss"]) + jnp.sum(aux.get("mtp_balance_loss", jnp.zeros(())))
  total = ce + balance
  metrics = {"ce": ce, "balance_loss": balance, "target_tokens": count}
  if "mtp_logits" in aux:
    J = aux["mtp_logits"].shape[0]
    mtp = sum(masked_mean_nll(aux["mtp_logits"][k], tokens_BT, seg_BT, k + 2, lm_BT)[0] for k in range(J)) / J
    total = total + mtp_weight * mtp
    metrics["mtp_loss"] = mtp
  else:
    metrics["mtp_loss"] = jnp.zeros(())
  metrics["index_loss"] = aux.get("index_loss", jnp.zeros(()))
  total = total + index_loss_weight * metrics["index_loss"]
  metrics["loss"] = total
  return total, metrics
