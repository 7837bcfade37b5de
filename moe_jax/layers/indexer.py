"""DeepSeek Sparse Attention's lightning indexer (DeepSeek-V3.2-Exp report, sec. 2.1): which tokens MLA attends to.

With h_t the block input and c_Q the query latent MLA already computes (q_norm(W_DQ h_t)):
  q^I_t,j = RoPE(W^IQ_j c_Q_t)          [H^I heads, D^I]   (RoPE on the first d^R dims, half-split layout)
  k^I_s   = RoPE(LayerNorm(W^IK h_s))   [D^I], one key per token, shared by the heads (cached for decoding)
  w_t,j   = (W^w h_t)_j / sqrt(H^I)     per-token head weights
  I_t,s   = sum_j w_t,j * ReLU(q^I_t,j . k^I_s / sqrt(D^I))
and query t attends to the top-`index_topk` visible tokens s by I_t,s (all of them when fewer are visible).

Visible = what dense MLA would see: causal, the same document (segment_ids), the valid cache slots. The selection
is a top-k, so no gradient reaches the indexer through the language-modelling loss; V3.2 trains it with its own
KL loss towards the main attention. Scores in float32 (the release scores in FP8 after a Hadamard rotation, which
preserves dot products; transformers' reference skips both, as here).

Training (V3.2 report sec. 2.1.1): the indexer learns by  L^I = sum_t KL(p_t || softmax(I_t)),  p_t the main
attention of query t summed over heads and L1-normalised (a stopped gradient). Dense warm-up
(`index_stage="dense_warmup"`): attention stays dense, the KL covers every visible token, and only the indexer
trains (`config.train.trainable="indexer"`). Sparse training (`"sparse"`): attention uses the selection, the KL
covers the selected tokens only, and the indexer's inputs are detached so L^I moves only the indexer while the
language-modelling loss moves everything else (`index_kl_divergence`; MLA sows it into the "losses" collection).

Here: `Indexer` (the module) computes q^I, w and k^I per token; `index_scores` / `visible_scores` the scores;
`select_top_k` the selection as masks (MLA's mask form; the gathered form, moe_jax.layers.sparse_attention,
scores and selects per query block itself). Parameter names follow the release (wq_b, wk, k_norm, weights_proj).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from moe_jax.layers.base import as_dtype, normal_init, param, project
from moe_jax.layers.rope import apply_rope

INDEX_NORM_EPS = 1e-6  # the release's LayerNorm eps


class IndexerKeyNorm(nn.Module):
  """LayerNorm with scale and bias over the indexer key dims (the release uses LayerNorm here, not RMSNorm)."""

  @nn.compact
  def __call__(self, x):
    D = x.shape[-1]
    scale = param(self, "scale", (D,), ("index_head",), nn.initializers.ones, jnp.float32)
    bias = param(self, "bias", (D,), ("index_head",), nn.initializers.zeros, jnp.float32)
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    return (x32 - mean) * jax.lax.rsqrt(var + INDEX_NORM_EPS) * scale + bias


class IndexerProjections(NamedTuple):
  """What the indexer computes per token of a call (float32); shape letters h = indexer heads H^I, d = D^I."""
  q_BThd: jax.Array  # queries q^I (RoPE'd)
  w_BTh: jax.Array  # per-token head weights w (with the 1/sqrt(H^I))
  k_BTd: jax.Array  # the tokens' keys k^I (RoPE'd): cached for decoding


class Indexer(nn.Module):
  config: Any

  def _rope(self, x, inputs):
    R = self.config.qk_rope_head_dim
    rot = apply_rope(x[..., :R], inputs.cos_BTR, inputs.sin_BTR, interleave=False)
    return jnp.concatenate([rot, x[..., R:]], axis=-1)

  @nn.compact
  def __call__(self, x_BTD, cq_BTQ, inputs) -> IndexerProjections:
    c = self.config
    D, Q, Hi, Di = c.hidden_size, c.q_lora_rank, c.index_n_heads, c.index_head_dim
    init, pdtype = normal_init(c), as_dtype(c.param_dtype)
    f32 = jnp.float32
    wq_b = param(self, "wq_b", (Q, Hi, Di), ("q_lora", "index_heads", "index_head"), init, pdtype)
    wk = param(self, "wk", (D, Di), ("embed", "index_head"), init, pdtype)
    # float32 as transformers keeps it: the head weights scale every score
    w_proj = param(self, "weights_proj", (D, Hi), ("embed", "index_heads"), init, jnp.float32)
    q_BThd = self._rope(project(cq_BTQ.astype(f32), wq_b.astype(f32)), inputs)
    k_BTd = self._rope(IndexerKeyNorm(name="k_norm")(project(x_BTD.astype(f32), wk.astype(f32))), inputs)
    w_BTh = project(x_BTD.astype(f32), w_proj) * Hi ** -0.5
    return IndexerProjections(q_BThd, w_BTh, k_BTd)


def index_scores(q_BThd, w_BTh, k_BSd):
  """I [B, T, S] float32 = sum_h w_t,h ReLU(q_t,h . k_s / sqrt(D^I))."""
  dots_BThS = jnp.einsum("bthd,bsd->bths", q_BThd, k_BSd.astype(jnp.float32)) * q_BThd.shape[-1] ** -0.5
  return jnp.einsum("bth,bths->bts", w_BTh, jax.nn.relu(dots_BThS))


def visible_scores(proj: IndexerProjections, keys: list, visible: list):
  """The scores I over all key blocks [B, T, sum S_i] float32, -inf where not visible. keys / visible: the key
  blocks ([B, S_i, D^I]) and their [B, 1, T | 1, S_i] visibility, the call's own tokens last."""
  return jnp.concatenate([jnp.where(vis[:, 0], index_scores(proj.q_BThd, proj.w_BTh, k_BSd), -jnp.inf)
                          for k_BSd, vis in zip(keys, visible)], axis=-1)


def select_top_k(all_BTS, visible: list, topk: int):
  """The mask form of the selection: per key block [B, 1, T, S_i] bool, the top-k of `visible_scores`."""
  k = min(topk, all_BTS.shape[-1])
  _, top_BTK = jax.lax.top_k(all_BTS, k)
  chosen_BTS = jnp.put_along_axis(jnp.zeros(all_BTS.shape, bool), top_BTK, True, axis=-1, inplace=False)
  out, start = [], 0
  for vis in visible:
    S = vis.shape[-1]
    out.append(chosen_BTS[:, None, :, start:start + S] & vis)  # never a token dense MLA would not see
    start += S
  return out


def index_kl_per_query(probs_BHTS, scores_BTS, support_BTS):
  """KL(p_t || softmax over the support of I_t) [B, T] float32, p_t = the attention probabilities averaged over
  heads (a stopped gradient; they sum to 1 over the support already)."""
  f32 = jnp.float32
  p_BTS = jax.lax.stop_gradient(jnp.mean(probs_BHTS.astype(f32), axis=1))
  logq_BTS = jax.nn.log_softmax(jnp.where(support_BTS, scores_BTS, jnp.finfo(f32).min), axis=-1)
  logp_BTS = jnp.log(jnp.where(p_BTS > 0, p_BTS, 1.0))
  return jnp.sum(jnp.where(support_BTS & (p_BTS > 0), p_BTS * (logp_BTS - logq_BTS), 0.0), axis=-1)


def mean_over_queries(kl_BT, query_valid_BT):
  valid = query_valid_BT.astype(jnp.float32)
  return jnp.sum(kl_BT * valid) / jnp.maximum(jnp.sum(valid), 1.0)


def index_kl_divergence(probs_BHTS, scores_BTS, support_BTS, query_valid_BT):
  """L^I: the mean over valid queries of `index_kl_per_query`."""
  return mean_over_queries(index_kl_per_query(probs_BHTS, scores_BTS, support_BTS), query_valid_BT)
