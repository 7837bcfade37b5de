"""The DeepSeek-V2/V3 decoder-only Transformer with optional MTP modules: one definition trains, prefills, decodes.

  logits, aux = Transformer(model_config).apply(variables, tokens_BT, segment_ids_BT, positions_BT)
  logits, aux, cache = Transformer(model_config).apply(variables, tokens_BT, cache=cache)      # over a cache
  mtp_logits, mtp_hidden, cache = Transformer(model_config).apply(variables, aux["hidden"], next_tokens_BT, cache,
                                                                  method="mtp_step")

variables: {"params": ..., "router": ...} (moe_jax.model.variables; "router" only with topk_method="noaux_tc").

tokens: int32 [B, T]. segment_ids: int [B, T], tokens attend only within their segment and 0 marks padding
(excluded from expert loads and the balance loss); default all ones. positions: int [B, T], the RoPE position
of each token within its document; default 0..T-1. With a `cache` (moe_jax.model.cache) the T tokens continue
each sequence at its cached length (positions length_b + t); segment ids and positions are then not taken.

logits: float32 [B, T, V], V = vocab_size (the embedding and head carry pad_vocab_to_multiple_of padding rows,
which never get a logit). aux (a dict of arrays):
  expert_load      [L_moe, E]  token-copies routed to each expert, per MoE layer (padding excluded)
  balance_loss     [L_moe]     alpha-weighted sequence-wise balance loss per MoE layer
  dropped_fraction [L_moe]     token-copies dropped by capacity dispatch (0 for dropless)
  gate_sum         [L_moe, E]  sum of each expert's gating weights over the valid tokens (ESFT's relevance)
  and, when the config has MTP modules (num_nextn_predict_layers = J > 0) and `mtp=True`:
  mtp_logits       [J, B, T, V] float32; depth k (0-based) at position i predicts token i + k + 2
  mtp_expert_load [J, E], mtp_balance_loss [J], mtp_dropped_fraction [J], mtp_gate_sum [J, E]  (zeros-width when
  MTP blocks are dense)
  with a cache instead: hidden [B, T, D], the final-normed hidden state (the drafting MTP module's h^0 input).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from moe_jax.config import n_moe_layers, padded_vocab_size, validate_model_config
from moe_jax.layers import RMSNorm
from moe_jax.layers.attention import attention_inputs
from moe_jax.layers.base import as_dtype, constrain, normal_init, param, project
from moe_jax.model import cache as cache_lib
from moe_jax.model.block import block_class
from moe_jax.model.mtp import MTPModule

_STAT_KEYS = ("expert_load", "balance_loss", "dropped_fraction", "gate_sum")


def _stack_stats(stats_list, num_experts: int):
  if not stats_list:
    return {"expert_load": jnp.zeros((0, num_experts)), "balance_loss": jnp.zeros((0,)),
            "dropped_fraction": jnp.zeros((0,)), "gate_sum": jnp.zeros((0, num_experts))}
  return {k: jnp.stack([getattr(s, k) for s in stats_list]) for k in _STAT_KEYS}


def _layer_stack(c: Any, is_moe: bool, n: int):
  """n identical blocks: one nn.scan (params, routing biases and caches stacked on a leading 'layers' axis) or a
  list (name_0, name_1, ...)."""
  if n == 0:
    return None
  if not c.scan_layers:
    return [block_class(c, scanned=False)(c, is_moe) for _ in range(n)]
  scanned = nn.scan(
      block_class(c, scanned=True),
      variable_axes={"params": 0, "router": 0, "losses": 0},  # losses: what layers sow (the DSA indexer's KL)
      split_rngs={"params": True},
      in_axes=(nn.broadcast, nn.broadcast, 0),  # attention inputs and valid shared; each layer's own cache
      length=n,
      metadata_params={nn.PARTITION_NAME: "layers"},
  )
  return scanned(c, is_moe)


def _vocab_rows_only(init, vocab_size: int, axis: int):
  """`init`, with the padding rows (ids >= vocab_size) zero. They are never looked up and their logits are cut
  off, so they get no gradient and (AdamW on a zero gradient and a zero weight moves nothing) stay zero: the
  published format, which holds only the true vocabulary, round-trips bit for bit."""
  def fn(key, shape, dtype):
    w = init(key, shape, dtype)
    keep = jnp.arange(shape[axis]) < vocab_size
    return jnp.where(keep[:, None] if axis == 0 else keep[None, :], w, jnp.zeros((), dtype))
  return fn


class Transformer(nn.Module):
  config: Any  # a model ConfigDict (moe_jax.config.base_model_config schema); validated and frozen on construction

  def __post_init__(self):
    validate_model_config(self.config)
    if not isinstance(self.config, ml_collections.FrozenConfigDict):
      object.__setattr__(self, "config", ml_collections.FrozenConfigDict(self.config))
    super().__post_init__()

  def setup(self):
    c = self.config
    pdtype, init = as_dtype(c.param_dtype), normal_init(c)
    V, D = padded_vocab_size(c), c.hidden_size
    self.embedding = param(self, "embedding", (V, D), ("vocab", "embed"), _vocab_rows_only(init, c.vocab_size, 0),
                           pdtype)
    if not c.tie_word_embeddings:
      self.lm_head = param(self, "lm_head", (D, V), ("embed", "vocab"), _vocab_rows_only(init, c.vocab_size, 1),
                           pdtype)
    self.dense_layers = _layer_stack(c, False, c.first_k_dense_replace)
    self.moe_layers = _layer_stack(c, True, n_moe_layers(c))
    self.final_norm = RMSNorm(c.rms_norm_eps, as_dtype(c.dtype), pdtype)
    self.mtp = [MTPModule(c) for _ in range(c.num_nextn_predict_layers)]

  def _lookup_table(self):
    # The lookup reads a gathered (replicated) copy of the table: a row gather from a table split on vocab and
    # embed makes XLA's SPMD partitioner fall back to replicating the result anyway, with extra copies.
    return constrain(self.embedding, (None, None))

  def _head(self, h_BTD):
    """float32 logits over the true vocabulary (the padding rows' columns are cut off)."""
    c = self.config
    head_DV = self.embedding.T if c.tie_word_embeddings else self.lm_head
    logits_BTV = project(h_BTD, head_DV.astype(h_BTD.dtype), preferred_element_type=jnp.float32)
    return logits_BTV[..., :c.vocab_size] if logits_BTV.shape[-1] != c.vocab_size else logits_BTV

  def _run(self, group: str, x_BTD, inputs, valid_BT, caches):
    """A layer group over x: (x, [MoEStats per layer or one stacked], new cache entries or None)."""
    stack = getattr(self, group)
    if stack is None:
      return x_BTD, [], None
    if self.config.scan_layers:
      x_BTD, (stats, entries) = stack(x_BTD, inputs, valid_BT, caches)
      return x_BTD, ([] if stats is None else [stats]), entries
    stats_list, entries = [], []
    for i, block in enumerate(stack):
      x_BTD, (stats, new) = block(x_BTD, inputs, valid_BT, None if caches is None else jax.tree.map(
          lambda a: a[i], caches))  # noqa: B023
      stats_list += [] if stats is None else [stats]
      entries.append(new)
    return x_BTD, stats_list, (None if caches is None else jax.tree.map(lambda *xs: jnp.stack(xs), *entries))

  def __call__(self, tokens_BT, segment_ids_BT=None, positions_BT=None, *, mtp: bool = True,
               cache: cache_lib.DecodeCache | None = None):
    c = self.config
    if tokens_BT.ndim != 2 or not jnp.issubdtype(tokens_BT.dtype, jnp.integer):
      raise ValueError(f"tokens must be an integer array [batch, seq]; got {tokens_BT.dtype} {tokens_BT.shape}")
    B, T = tokens_BT.shape
    if cache is not None and (segment_ids_BT is not None or positions_BT is not None):
      raise ValueError("with a cache the tokens continue each sequence at its cached length; segment_ids and "
                       "positions are not taken")
    start_B = jnp.zeros((B,), jnp.int32) if cache is None else cache.length_B
    positions_BT = start_B[:, None] + jnp.arange(T, dtype=jnp.int32)[None, :] if positions_BT is None else positions_BT
    segment_ids_BT = jnp.ones((B, T), jnp.int32) if segment_ids_BT is None else segment_ids_BT
    for name, arr in (("segment_ids", segment_ids_BT), ("positions", positions_BT)):
      if arr.shape != (B, T):
        raise ValueError(f"{name} shape {arr.shape} != tokens shape {(B, T)}")
    inputs = attention_inputs(c, positions_BT, segment_ids_BT, None if cache is None else cache.length_B,
                              0 if cache is None else cache.max_len)
    valid_BT = segment_ids_BT != 0
    table_VD = self._lookup_table()
    x_BTD = constrain(jnp.take(table_VD, tokens_BT, axis=0).astype(as_dtype(c.dtype)), ("batch", "length", "embed"))
    moe_stats, entries = [], {}
    for group in cache_lib.GROUPS:
      caches = None if cache is None else cache.layers.get(group)
      x_BTD, stats, entries[group] = self._run(group, x_BTD, inputs, valid_BT, caches)
      moe_stats += stats
    h_BTD = self.final_norm(x_BTD)
    logits_BTV = self._head(h_BTD)
    if c.scan_layers and moe_stats:
      aux = {k: getattr(moe_stats[0], k) for k in _STAT_KEYS}
    else:
      aux = _stack_stats(moe_stats, c.n_routed_experts)
    if cache is not None:
      aux["hidden"] = h_BTD
      return logits_BTV, aux, cache_lib.append_layers(cache, entries, T)

    if c.num_nextn_predict_layers > 0 and (mtp or self.is_initializing()):
      mtp_logits, mtp_stats = [], []
      for k, module in enumerate(self.mtp, start=1):
        # Input at position i is token i+k; positions past the row end get token 0 and are never targets.
        shifted_BT = jnp.pad(tokens_BT[:, k:], ((0, 0), (0, min(k, T))))[:, :T]
        h_BTD, logits_k, stats, _ = module(h_BTD, shifted_BT, table_VD, self._head, inputs, valid_BT)
        mtp_logits.append(logits_k)
        if stats is not None:
          mtp_stats.append(stats)
      aux["mtp_logits"] = jnp.stack(mtp_logits)
      aux.update({f"mtp_{k}": v for k, v in _stack_stats(mtp_stats, c.n_routed_experts).items()})
    return logits_BTV, aux

  def mtp_step(self, hidden_BTD, next_tokens_BT, cache: cache_lib.DecodeCache):
    """The first MTP module over its cache (V3 report eqs. 21-23), for drafting.

    At position i it reads h_i (the main model's final-normed hidden state, `aux["hidden"]` of the cached call)
    and t_{i+1} (`next_tokens_BT`) and returns logits for t_{i+2}, its own normed hidden state and the cache
    with T entries appended at `cache.mtp_length_B`: (logits [B,T,V] float32, hidden [B,T,D], cache).
    """
    if not self.mtp:
      raise ValueError("this model has no MTP module (num_nextn_predict_layers=0)")
    B, T = next_tokens_BT.shape
    positions_BT = cache.mtp_length_B[:, None] + jnp.arange(T, dtype=jnp.int32)[None, :]
    inputs = attention_inputs(self.config, positions_BT, jnp.ones((B, T), jnp.int32), cache.mtp_length_B,
                              cache.max_len)
    h_BTD, logits_BTV, _, entries = self.mtp[0](hidden_BTD, next_tokens_BT, self._lookup_table(), self._head,
                                                inputs, jnp.ones((B, T), bool), cache.mtp)
    return logits_BTV, h_BTD, cache_lib.append_mtp(cache, entries, T)
