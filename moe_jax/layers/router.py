"""The DeepSeekMoE router (gate): affinities, group-limited top-K selection, gating weights, balance statistics.

DeepSeek-V3 report sec. 2.1.2, eqs. 12-16 (sigmoid, "noaux_tc"):
  s_i,t = sigmoid(u_t . e_i)                               affinity of token t to routed expert i
  selection uses s_i,t + b_i                               b = e_score_correction_bias: selection only, no gradient
  group score = sum of the two largest biased affinities   keep `topk_group` of `n_group` groups (node-limited routing)
  TopK over the experts of the kept groups
  g_i,t = s_i,t / sum_{j in TopK} s_j,t  (norm_topk_prob), times routed_scaling_factor
DeepSeek-V2 (softmax): s = softmax(u_t . e); "greedy" = plain top-K; "group_limited_greedy" = group score is the
group's max affinity (V2 report sec. 2.2.3); no bias; weights normalised only when norm_topk_prob and K > 1.

Also returned: the tokens routed to each expert (the load, for loss-free balancing and MaxVio) and the
complementary sequence-wise balance loss (V3 eqs. 17-20):
  f_i = N_r / (K_r T) sum_t 1[i in TopK(t)],   P_i = (1/T) sum_t s'_i,t with s' = s / sum_j s_j,
  L_bal = alpha * sum_i f_i P_i,  averaged over sequences (or over the whole batch when seq_aux is False).
Padding tokens (valid=False) are excluded from load and loss.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from moe_jax.layers.base import normal_init, param, project


BIAS_COLLECTION = "router"  # the variable collection of the routing biases (not "params")
BIAS_NAME = "e_score_correction_bias"  # the published checkpoints' name


class RouterOutput(NamedTuple):
  topk_idx_BTK: jax.Array  # int32 chosen experts
  topk_weight_BTK: jax.Array  # float32 gating weights g
  expert_load_E: jax.Array  # float32 token-copies routed to each expert (valid tokens only)
  balance_loss: jax.Array  # float32 scalar, already multiplied by aux_loss_alpha


def select_experts(scores_BTE, bias_E, cfg: Any):
  """Returns (topk_idx [B,T,K], topk_weight [B,T,K]) from unbiased affinities and the selection bias."""
  E, K, G = cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.n_group
  choice_BTE = scores_BTE if bias_E is None else scores_BTE + bias_E
  if cfg.topk_method in ("noaux_tc", "group_limited_greedy") and G > 1:
    by_group = choice_BTE.reshape(choice_BTE.shape[:-1] + (G, E // G))  # [B, T, G, E/G]
    if cfg.topk_method == "noaux_tc":
      group_score_BTG = jnp.sum(jax.lax.top_k(by_group, 2)[0], axis=-1)
    else:
      group_score_BTG = jnp.max(by_group, axis=-1)
    _, kept_BTk = jax.lax.top_k(group_score_BTG, cfg.topk_group)
    keep_BTG = jnp.zeros_like(group_score_BTG, dtype=bool)
    keep_BTG = jnp.put_along_axis(keep_BTG, kept_BTk, True, axis=-1, inplace=False)
    keep_BTE = jnp.repeat(keep_BTG, E // G, axis=-1)
    choice_BTE = jnp.where(keep_BTE, choice_BTE, -jnp.inf)
  _, topk_idx_BTK = jax.lax.top_k(choice_BTE, K)
  weight_BTK = jnp.take_along_axis(scores_BTE, topk_idx_BTK, axis=-1)
  if cfg.norm_topk_prob and (cfg.scoring_func == "sigmoid" or K > 1):
    weight_BTK = weight_BTK / (jnp.sum(weight_BTK, axis=-1, keepdims=True) + 1e-20)
  return topk_idx_BTK.astype(jnp.int32), weight_BTK * cfg.routed_scaling_factor


def balance_statistics(scores_BTE, topk_idx_BTK, valid_BT, cfg: Any):
  """(expert_load [E], alpha-weighted balance loss) -- V3 eqs. 17-20, padding excluded."""
  B, T, E = scores_BTE.shape
  K = cfg.num_experts_per_tok
  valid_BT = valid_BT.astype(jnp.float32)
  # Token-copies per (row, expert) by scatter-add: no [tokens, experts] one-hot.
  rows_BTK = jnp.broadcast_to(jnp.arange(B)[:, None, None], topk_idx_BTK.shape)
  counts_BE = jnp.zeros((B, E), jnp.float32).at[rows_BTK, topk_idx_BTK].add(
      jnp.broadcast_to(valid_BT[..., None], topk_idx_BTK.shape))
  load_E = jnp.sum(counts_BE, axis=0)
  # s' normalises the affinities over all routed experts (a no-op for softmax scores).
  s_norm_BTE = scores_BTE / (jnp.sum(scores_BTE, axis=-1, keepdims=True) + 1e-20)
  prob_sum_BE = jnp.einsum("bte,bt->be", s_norm_BTE, valid_BT)
  n_tok_B = jnp.sum(valid_BT, axis=1)
  if not cfg.seq_aux:  # one "sequence" = the whole batch
    counts_BE, prob_sum_BE, n_tok_B = load_E[None], jnp.sum(prob_sum_BE, 0, keepdims=True), jnp.sum(n_tok_B, keepdims=True)
  denom_B = jnp.maximum(n_tok_B, 1.0)
  f_BE = counts_BE * (E / K) / denom_B[:, None]
  p_BE = prob_sum_BE / denom_B[:, None]
  per_seq_B = jnp.sum(f_BE * p_BE, axis=-1)
  has_tok_B = (n_tok_B > 0).astype(jnp.float32)
  loss = jnp.sum(per_seq_B * has_tok_B) / jnp.maximum(jnp.sum(has_tok_B), 1.0)
  return load_E, cfg.aux_loss_alpha * loss


class Router(nn.Module):
  config: Any

  @nn.compact
  def __call__(self, x_BTD, valid_BT) -> RouterOutput:
    c = self.config
    E = c.n_routed_experts
    kernel = param(self, "kernel", (c.hidden_size, E), ("embed", "router_expert"), normal_init(c), jnp.float32)
    # Routing in float32 whatever the compute dtype: near-ties between experts must not flip with rounding.
    logits_BTE = project(x_BTD.astype(jnp.float32), kernel.astype(jnp.float32))
    if c.scoring_func == "sigmoid":
      scores_BTE = jax.nn.sigmoid(logits_BTE)
    else:
      scores_BTE = jax.nn.softmax(logits_BTE, axis=-1)
    bias_E = None
    if c.topk_method == "noaux_tc":
      # Loss-free balancing moves the bias outside the gradient, so it lives in its own collection, never seen
      # by autodiff or the optimiser; stop_gradient also keeps it out of a gradient taken over it by hand.
      if not self.is_initializing() and not self.has_variable(BIAS_COLLECTION, BIAS_NAME):
        raise ValueError(f"{self.path}: the routing bias {BIAS_NAME} lives in the {BIAS_COLLECTION!r} variable "
                         f"collection; apply the model with {{'params': ..., {BIAS_COLLECTION!r}: ...}} (the whole "
                         "variables dict init returned)")
      bias = self.variable(BIAS_COLLECTION, BIAS_NAME, nn.with_logical_partitioning(
          lambda: jnp.zeros((E,), jnp.float32), ("router_expert",)))
      bias_E = jax.lax.stop_gradient(bias.value)
    topk_idx_BTK, topk_weight_BTK = select_experts(scores_BTE, bias_E, c)
    load_E, balance_loss = balance_statistics(scores_BTE, topk_idx_BTK, valid_BT, c)
    return RouterOutput(topk_idx_BTK, topk_weight_BTK, load_E, balance_loss)
