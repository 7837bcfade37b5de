"""The decode cache of a whole model: every main layer's latent cache and the drafting MTP module's.

    cache = init_cache(cfg, batch, max_len)
    logits_BTV, aux, cache = model.apply(variables, tokens_BT, cache=cache)       # prefill or decode T tokens
    mtp_logits_BTV, mtp_hidden_BTD, cache = model.apply(variables, aux["hidden"], next_BT, cache, method="mtp_step")

Per layer and token MLA keeps only c_KV and k^R (576 values for V3); the mha/gqa baselines keep every key/value
head's key and value (a KVCache). With `scan_layers` a layer group's caches
are one array with a leading layers axis, which scanned blocks slice (the program does not grow with depth) and
unrolled ones index. It is an explicit pytree in and out, not a mutable flax collection, because
generation carries it through a `lax.while_loop` and speculative decoding rolls it back: `with_length` shrinks
the lengths, and slots past them are never read again and are overwritten next. Sequence b's new tokens go to
slots length_b .. length_b + T - 1 at RoPE positions length_b + t, so sequences of different lengths decode
together. The caller keeps length + T <= max_len.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from moe_jax.config import kv_heads, n_moe_layers, uses_indexer
from moe_jax.layers.attention import KVCache, LatentCache
from moe_jax.layers.base import as_dtype

GROUPS = ("dense_layers", "moe_layers")  # the main model's layer groups, in depth order


class DecodeCache(NamedTuple):
  layers: dict  # {group: LatentCache (MLA) or KVCache (mha/gqa) [L_group, B, S, ...]}
  length_B: jax.Array  # int32: tokens cached per sequence in the main layers
  mtp: LatentCache | KVCache | None  # the first MTP module's block (the drafter); None without MTP
  mtp_length_B: jax.Array  # int32: tokens cached per sequence in the MTP block

  @property
  def max_len(self) -> int:  # slots per sequence (S)
    first = next(iter(self.layers.values()))
    return first[0].shape[-2] if isinstance(first, LatentCache) else first[0].shape[-3]


def init_cache(cfg: Any, batch: int, max_len: int, dtype=None) -> DecodeCache:
  """Empty caches for every main layer and the first MTP module; dtype defaults to the compute dtype."""
  dtype = as_dtype(cfg.dtype) if dtype is None else dtype

  def make(*lead):
    if cfg.attention_type != "mla":  # per key/value head keys and values
      k = kv_heads(cfg)
      return KVCache(jnp.zeros(lead + (batch, max_len, k, cfg.qk_nope_head_dim + cfg.qk_rope_head_dim), dtype),
                     jnp.zeros(lead + (batch, max_len, k, cfg.v_head_dim), dtype))
    index_k = jnp.zeros(lead + (batch, max_len, cfg.index_head_dim), dtype) if uses_indexer(cfg) else None
    return LatentCache(jnp.zeros(lead + (batch, max_len, cfg.kv_lora_rank), dtype),
                       jnp.zeros(lead + (batch, max_len, cfg.qk_rope_head_dim), dtype), index_k)

  sizes = {"dense_layers": cfg.first_k_dense_replace, "moe_layers": n_moe_layers(cfg)}
  layers = {g: make(n) for g, n in sizes.items() if n}
  zeros = jnp.zeros((batch,), jnp.int32)
  return DecodeCache(layers, zeros, make() if cfg.num_nextn_predict_layers else None, zeros)


def with_length(cache: DecodeCache, length_B, mtp_length_B=None) -> DecodeCache:
  """The same cache holding `length_B` tokens per sequence (shrinking it rolls the cache back); the MTP block's
  length follows unless given."""
  length_B = jnp.asarray(length_B, jnp.int32)
  mtp_length_B = length_B if mtp_length_B is None else jnp.asarray(mtp_length_B, jnp.int32)
  return cache._replace(length_B=length_B, mtp_length_B=mtp_length_B)


def write_entries(buf, new, start_B, batch_axis: int = 0):
  """Writes T new entries of each sequence at its own start slot: buf [..., B, S, ...], new [..., B, T, ...]
  (a LatentCache or a KVCache); entries past the last slot are dropped.

  One scatter with explicit (row, slot) indices: the per-row `dynamic_update_slice` under `vmap` became a scatter
  with batching dims, on which XLA:GPU (jaxlib 0.10) fails when the batch is split over devices -- its SPMD
  partitioner aborted the process, and inside shard_map its scatter normalisation rejected the update window
  ("Bounds of the window dimensions of updates must not exceed ..."); XLA:TPU and XLA:CPU took either form."""
  B = start_B.shape[0]

  def write(b, n):
    rows_B1 = jnp.arange(B, dtype=jnp.int32)[:, None]
    slots_BT = start_B[:, None] + jnp.arange(n.shape[batch_axis + 1], dtype=jnp.int32)[None, :]
    at = (slice(None),) * batch_axis + (rows_B1, slots_BT)  # [..., B, T, ...]: the two index dims stay in place
    return b.at[at].set(n.astype(b.dtype), indices_are_sorted=True, unique_indices=True, mode="drop")

  return type(buf)(*(None if b is None else write(b, n) for b, n in zip(buf, new)))


def append_layers(cache: DecodeCache, entries: dict, T: int) -> DecodeCache:
  """`entries` {group: LatentCache [L, B, T, ...]} of T new tokens written at length_B; lengths += T."""
  layers = {g: write_entries(buf, entries[g], cache.length_B, batch_axis=1) for g, buf in cache.layers.items()}
  return cache._replace(layers=layers, length_B=cache.length_B + T)


def append_mtp(cache: DecodeCache, entries, T: int) -> DecodeCache:
  mtp = write_entries(cache.mtp, entries, cache.mtp_length_B)
  return cache._replace(mtp=mtp, mtp_length_B=cache.mtp_length_B + T)


def cache_bytes_per_token(cfg: Any, dtype=jnp.bfloat16) -> int:
  """Per token and layer: MLA (kv_lora_rank + qk_rope_head_dim) x dtype bytes; mha/gqa every key/value head's
  key and value, kv_heads x (qk_nope_head_dim + qk_rope_head_dim + v_head_dim) x dtype bytes."""
  if cfg.get("attention_type", "mla") != "mla":
    return kv_heads(cfg) * (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim + cfg.v_head_dim) * jnp.dtype(dtype).itemsize
  index = cfg.index_head_dim if uses_indexer(cfg) else 0  # DSA: the indexer's key beside c_KV and k^R
  return (cfg.kv_lora_rank + cfg.qk_rope_head_dim + index) * jnp.dtype(dtype).itemsize
