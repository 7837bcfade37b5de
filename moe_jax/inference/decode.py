"""The whole model over latent caches: prefill and decode steps that give the same logits as `Transformer.apply`.

    caches = init_model_cache(cfg, batch, max_len)
    out, caches = forward_cached(params, cfg, tokens_BT, caches)          # T new tokens per sequence
    mtp_logits_BTV, caches = mtp_forward_cached(params, cfg, out.hidden_BTD, next_tokens_BT, caches)

`params` is the model's parameter tree *with* the routing biases (as `Transformer.apply` takes it; a training
state's `merge_router_bias(state.params, state.router_bias)`), scanned or unrolled. Each main layer and each MTP
block has a `LatentCache` (c_KV and k^R per token: `mla_cache`); the new tokens of sequence b are written at
slots length_b .. length_b + T - 1 and take RoPE positions length_b + t, so sequences of different lengths
decode together. Rolling a cache back (speculative decoding) is setting `length`: slots past it are never read
(the attention mask stops at each token's own slot) and are overwritten by the next append.

Every routed expert runs dropless here whatever `moe_dispatch` the model trained with: capacity dropping would
make a token's output depend on the other tokens in the batch, so decoding would not reproduce the full forward.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
from flax.core import meta

from moe_jax.config import mtp_block_is_moe, n_moe_layers
from moe_jax.inference.mla_cache import LatentCache, init_cache, mla_attend
from moe_jax.layers import MoE, RMSNorm, SwiGLU, rope_cos_sin
from moe_jax.layers.base import as_dtype


class ModelCache(NamedTuple):
  layers: tuple  # LatentCache per main layer, in depth order
  mtp: tuple  # LatentCache per MTP module (empty when the model has none)

  @property
  def length_B(self) -> jax.Array:
    return self.layers[0].length_B


class CachedOutput(NamedTuple):
  logits_BTV: jax.Array  # float32 next-token logits
  hidden_BTD: jax.Array  # the final-normed hidden state: MTP module 1's h^0 input


def inference_config(cfg: Any) -> ml_collections.FrozenConfigDict:
  """The model config decoding runs under: dropless routing, no remat (nothing to differentiate)."""
  c = ml_collections.ConfigDict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)
  c.moe_dispatch = "dropless"
  c.remat_policy = "none"
  return ml_collections.FrozenConfigDict(c)


def init_model_cache(cfg: Any, batch: int, max_len: int, dtype=None) -> ModelCache:
  """Empty caches for every main layer and MTP module; dtype defaults to the compute dtype."""
  dtype = as_dtype(cfg.dtype) if dtype is None else dtype
  make = lambda: init_cache(batch, max_len, cfg, dtype)  # noqa: E731
  return ModelCache(tuple(make() for _ in range(cfg.num_hidden_layers)),
                    tuple(make() for _ in range(cfg.num_nextn_predict_layers)))


def with_length(caches: ModelCache, length_B) -> ModelCache:
  """The same caches holding `length_B` tokens per sequence (shrinking it rolls the caches back)."""
  length_B = jnp.asarray(length_B, jnp.int32)
  set_len = lambda c: c._replace(length_B=length_B)  # noqa: E731
  return ModelCache(tuple(map(set_len, caches.layers)), tuple(map(set_len, caches.mtp)))


def main_layer_params(params: dict, cfg: Any) -> list[tuple[dict, bool]]:
  """[(layer params, is_moe)] in depth order, from scanned (stacked) or unrolled parameter trees."""
  out = []
  for group, n, is_moe in (("dense_layers", cfg.first_k_dense_replace, False),
                           ("moe_layers", n_moe_layers(cfg), True)):
    for i in range(n):
      p = jax.tree.map(lambda a: a[i], params[group]) if group in params else params[f"{group}_{i}"]  # noqa: B023
      out.append((p, is_moe))
  return out


def _norm(p, cfg, x):
  dt = as_dtype(cfg.dtype)
  return RMSNorm(cfg.rms_norm_eps, dt, as_dtype(cfg.param_dtype)).apply({"params": p}, x)


def block_cached(p: dict, cfg: Any, is_moe: bool, x_BTD, cos_BTR, sin_BTR, cache: LatentCache, *, absorb: bool):
  """One block (model/block.py) over the cache: h = x + MLA(norm(x)); out = h + FFN(norm(h))."""
  attn_BTD, cache = mla_attend(p["attn"], cfg, _norm(p["attn_norm"], cfg, x_BTD), cos_BTR, sin_BTR, cache,
                               absorb=absorb)
  h_BTD = x_BTD + attn_BTD
  ffn_in = _norm(p["ffn_norm"], cfg, h_BTD)
  if is_moe:
    valid_BT = jnp.ones(ffn_in.shape[:2], bool)
    f_BTD, _ = MoE(cfg).apply({"params": p["moe"]}, ffn_in, valid_BT)
  else:
    f_BTD = SwiGLU(cfg, cfg.intermediate_size).apply({"params": p["mlp"]}, ffn_in)
  return h_BTD + f_BTD, cache


def _rope_at(cfg, length_B, T):
  return rope_cos_sin(cfg, length_B[:, None] + jnp.arange(T, dtype=jnp.int32)[None, :])


def _embed(params, cfg, tokens_BT):
  return jnp.take(params["embedding"], tokens_BT, axis=0).astype(as_dtype(cfg.dtype))


def _head(params, cfg, h_BTD):
  head_DV = params["embedding"].T if cfg.tie_word_embeddings else params["lm_head"]
  return jnp.einsum("btd,dv->btv", h_BTD, head_DV.astype(h_BTD.dtype), preferred_element_type=jnp.float32)


def forward_cached(params: dict, cfg: Any, tokens_BT, caches: ModelCache, *, absorb: bool = True):
  """Runs T new tokens per sequence through the main model, appending them to every layer's cache.

  cfg: `inference_config(model_config)`. Returns (CachedOutput, caches). The caller keeps length + T <= max_len.
  """
  params = meta.unbox(params)
  cos_BTR, sin_BTR = _rope_at(cfg, caches.length_B, tokens_BT.shape[1])
  x_BTD = _embed(params, cfg, tokens_BT)
  new_layers = []
  for (p, is_moe), cache in zip(main_layer_params(params, cfg), caches.layers):
    x_BTD, cache = block_cached(p, cfg, is_moe, x_BTD, cos_BTR, sin_BTR, cache, absorb=absorb)
    new_layers.append(cache)
  h_BTD = _norm(params["final_norm"], cfg, x_BTD)
  return CachedOutput(_head(params, cfg, h_BTD), h_BTD), caches._replace(layers=tuple(new_layers))


def mtp_forward_cached(params: dict, cfg: Any, hidden_BTD, next_tokens_BT, caches: ModelCache, *, depth: int = 0,
                       absorb: bool = True):
  """MTP module `depth` (0-based) over its cache (V3 report eqs. 21-23).

  At position i it takes h_i (the main model's final-normed hidden state, `CachedOutput.hidden_BTD`, for depth 0)
  and the token t_{i+1} (`next_tokens_BT`), and returns logits for t_{i+2} plus its own normed hidden state:
  (CachedOutput, caches). Its cache holds one entry per position, like a main layer's.
  """
  params = meta.unbox(params)
  p = params[f"mtp_{depth}"]
  cache = caches.mtp[depth]
  cos_BTR, sin_BTR = _rope_at(cfg, cache.length_B, next_tokens_BT.shape[1])
  e_BTD = _norm(p["enorm"], cfg, _embed(params, cfg, next_tokens_BT))
  h_BTD = _norm(p["hnorm"], cfg, hidden_BTD)
  x_BTD = jnp.einsum("btc,cd->btd", jnp.concatenate([e_BTD, h_BTD], axis=-1), p["eh_proj"].astype(e_BTD.dtype))
  x_BTD, cache = block_cached(p["block"], cfg, mtp_block_is_moe(cfg), x_BTD, cos_BTR, sin_BTR, cache, absorb=absorb)
  h_out_BTD = _norm(p["head_norm"], cfg, x_BTD)
  mtp = caches.mtp[:depth] + (cache,) + caches.mtp[depth + 1:]
  return CachedOutput(_head(params, cfg, h_out_BTD), h_out_BTD), caches._replace(mtp=mtp)
