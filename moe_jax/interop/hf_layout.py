"""The tensor layout of DeepSeek-V2/V3/V3.2 checkpoints (HF names) and how each maps onto moe_jax parameters.

`checkpoint_layout(cfg)` returns {hf_key: HFTensor}. An HFTensor knows its HF shape, how to cut the (torch-layout,
[out, in]) array into moe_jax variables (`assign`: a list of (path, index -- into a stacked leading axis, the true-
vocabulary rows, or () -- , array)), and the inverse (`export`: builds the HF array from a parameter getter).
Loading iterates the checkpoint through this table, export iterates the table; missing and unexpected names fall out
of comparing key sets. Layer i is `dense_layers[_i]` for i < first_k_dense_replace, else `moe_layers[_j]`;
MTP module k is checkpoint layer `num_hidden_layers + k`. Paths are inside the variables' collections: the
routing biases (`e_score_correction_bias`) in "router", everything else in "params" (`collection_of`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from moe_jax.config import mtp_block_is_moe, uses_indexer
from moe_jax.layers.router import BIAS_COLLECTION, BIAS_NAME

Assignment = tuple[tuple[str, ...], tuple, np.ndarray]


def collection_of(path: tuple[str, ...]) -> str:
  """The variable collection a layout path lives in."""
  return BIAS_COLLECTION if path[-1] == BIAS_NAME else "params"


Getter = Callable[[tuple, tuple], np.ndarray]  # (param path, index) -> that parameter (slice)


@dataclass(frozen=True)
class HFTensor:
  shape: tuple[int, ...]
  assign: Callable[[np.ndarray], list[Assignment]]  # HF array -> parameter pieces
  export: Callable[[Getter], np.ndarray]  # parameters -> HF array
  quantizable: bool = False  # a 2-D projection that the FP8 release stores with weight_scale_inv


def _linear(path, index=()):
  """torch Linear weight [out, in] <-> kernel [in, out]."""
  return (lambda w: [(path, index, w.T)]), (lambda get: get(path, index).T)


def _vector(path, index=()):
  return (lambda w: [(path, index, w)]), (lambda get: get(path, index))


def _split_heads(path_a, path_b, heads, dim_a, index=()):
  """[H*(a+b), in] <-> ([in, H, a], [in, H, b])."""
  def assign(w):
    w = w.T.reshape(w.shape[1], heads, -1)
    return [(path_a, index, w[:, :, :dim_a]), (path_b, index, w[:, :, dim_a:])]

  def export(get):
    w = np.concatenate([get(path_a, index), get(path_b, index)], axis=2)
    return w.reshape(w.shape[0], -1).T
  return assign, export


def _split_cols(path_a, path_b, dim_a, index=()):
  """[a+b, in] <-> ([in, a], [in, b])."""
  return ((lambda w: [(path_a, index, w[:dim_a].T), (path_b, index, w[dim_a:].T)]),
          (lambda get: np.concatenate([get(path_a, index).T, get(path_b, index).T], axis=0)))


def _out_proj(path, index, heads, v_dim, d):
  """o_proj [D, H*V] <-> wo [H, V, D]."""
  return (lambda w: [(path, index, w.T.reshape(heads, v_dim, d))]), (lambda get: get(path, index).reshape(-1, d).T)


def _heads_linear(path, heads, index=()):
  """[H*d, in] <-> [in, H, d]."""
  return ((lambda w: [(path, index, w.T.reshape(w.shape[1], heads, -1))]),
          (lambda get: get(path, index).reshape(get(path, index).shape[0], -1).T))


def _copy_of(path, index=()):
  """A tensor the checkpoint repeats (the MTP layer's embedding / head): nothing to load, exported from `path`."""
  return (lambda w: []), (lambda get: get(path, index))


def _block_layout(cfg: Any, hf_prefix: str, prefix: tuple[str, ...], idx: tuple[int, ...], is_moe: bool) -> dict:
  H, N, R, V, D = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.hidden_size
  C, E, F = cfg.kv_lora_rank, cfg.n_routed_experts, cfg.moe_intermediate_size
  a = prefix + ("attn",)
  t = {
      "input_layernorm.weight": HFTensor((D,), *_vector(prefix + ("attn_norm", "scale"), idx)),
      "post_attention_layernorm.weight": HFTensor((D,), *_vector(prefix + ("ffn_norm", "scale"), idx)),
      "self_attn.kv_a_proj_with_mqa.weight": HFTensor(
          (C + R, D), *_split_cols(a + ("w_dkv",), a + ("w_kr",), C, idx), True),
      "self_attn.kv_a_layernorm.weight": HFTensor((C,), *_vector(a + ("kv_norm", "scale"), idx)),
      "self_attn.kv_b_proj.weight": HFTensor(
          (H * (N + V), C), *_split_heads(a + ("w_uk",), a + ("w_uv",), H, N, idx), True),
      "self_attn.o_proj.weight": HFTensor(
          (D, H * V), *_out_proj(a + ("wo",), idx, H, V, D), True),
  }
  if cfg.q_lora_rank is not None:
    Q = cfg.q_lora_rank
    t["self_attn.q_a_proj.weight"] = HFTensor((Q, D), *_linear(a + ("wq_a",), idx), True)
    t["self_attn.q_a_layernorm.weight"] = HFTensor((Q,), *_vector(a + ("q_norm", "scale"), idx))
    t["self_attn.q_b_proj.weight"] = HFTensor(
        (H * (N + R), Q), *_split_heads(a + ("wq_b_nope",), a + ("wq_b_rope",), H, N, idx), True)
  else:
    t["self_attn.q_proj.weight"] = HFTensor(
        (H * (N + R), D), *_split_heads(a + ("wq_nope",), a + ("wq_rope",), H, N, idx), True)
  if uses_indexer(cfg):  # V3.2's lightning indexer (moe_jax.layers.indexer)
    Q, Hi, Di, x = cfg.q_lora_rank, cfg.index_n_heads, cfg.index_head_dim, a + ("indexer",)
    t["self_attn.indexer.wq_b.weight"] = HFTensor((Hi * Di, Q), *_heads_linear(x + ("wq_b",), Hi, idx))
    t["self_attn.indexer.wk.weight"] = HFTensor((Di, D), *_linear(x + ("wk",), idx))
    t["self_attn.indexer.k_norm.weight"] = HFTensor((Di,), *_vector(x + ("k_norm", "scale"), idx))
    t["self_attn.indexer.k_norm.bias"] = HFTensor((Di,), *_vector(x + ("k_norm", "bias"), idx))
    t["self_attn.indexer.weights_proj.weight"] = HFTensor((Hi, D), *_linear(x + ("weights_proj",), idx))
  if not is_moe:
    m, Fd = prefix + ("mlp",), cfg.intermediate_size
    t["mlp.gate_proj.weight"] = HFTensor((Fd, D), *_linear(m + ("wi_gate",), idx), True)
    t["mlp.up_proj.weight"] = HFTensor((Fd, D), *_linear(m + ("wi_up",), idx), True)
    t["mlp.down_proj.weight"] = HFTensor((D, Fd), *_linear(m + ("wo",), idx), True)
  else:
    m = prefix + ("moe",)
    t["mlp.gate.weight"] = HFTensor((E, D), *_linear(m + ("router", "kernel"), idx))
    if cfg.topk_method == "noaux_tc":
      t["mlp.gate.e_score_correction_bias"] = HFTensor((E,), *_vector(m + ("router", BIAS_NAME), idx))
    for e in range(E):
      ex = f"mlp.experts.{e}."
      t[ex + "gate_proj.weight"] = HFTensor((F, D), *_linear(m + ("wi_gate",), idx + (e,)), True)
      t[ex + "up_proj.weight"] = HFTensor((F, D), *_linear(m + ("wi_up",), idx + (e,)), True)
      t[ex + "down_proj.weight"] = HFTensor((D, F), *_linear(m + ("wo",), idx + (e,)), True)
    if cfg.n_shared_experts > 0:
      s, Fs = m + ("shared_experts",), F * cfg.n_shared_experts
      t["mlp.shared_experts.gate_proj.weight"] = HFTensor((Fs, D), *_linear(s + ("wi_gate",), idx), True)
      t["mlp.shared_experts.up_proj.weight"] = HFTensor((Fs, D), *_linear(s + ("wi_up",), idx), True)
      t["mlp.shared_experts.down_proj.weight"] = HFTensor((D, Fs), *_linear(s + ("wo",), idx), True)
  return {hf_prefix + k: v for k, v in t.items()}


def checkpoint_layout(cfg: Any, num_mtp: int | None = None) -> dict[str, HFTensor]:
  """Every tensor a DeepSeek-V2/V3 checkpoint of this config holds (with `num_mtp` MTP layers, default the config's)."""
  V, D, L = cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers
  num_mtp = cfg.num_nextn_predict_layers if num_mtp is None else num_mtp
  # The checkpoint holds the true vocabulary; the embedding and head may carry padding rows beyond it.
  rows, cols = (slice(0, V),), (slice(None), slice(0, V))
  t = {
      "model.embed_tokens.weight": HFTensor((V, D), *_vector(("embedding",), rows)),
      "model.norm.weight": HFTensor((D,), *_vector(("final_norm", "scale"))),
  }
  if not cfg.tie_word_embeddings:
    t["lm_head.weight"] = HFTensor((V, D), *_linear(("lm_head",), cols))
  for i in range(L):
    is_moe = i >= cfg.first_k_dense_replace
    group, j = ("moe_layers", i - cfg.first_k_dense_replace) if is_moe else ("dense_layers", i)
    prefix, idx = ((group,), (j,)) if cfg.scan_layers else ((f"{group}_{j}",), ())
    t.update(_block_layout(cfg, f"model.layers.{i}.", prefix, idx, is_moe))
  for k in range(num_mtp):
    hp, p = f"model.layers.{L + k}.", (f"mtp_{k}",)
    t.update(_block_layout(cfg, hp, p + ("block",), (), mtp_block_is_moe(cfg)))
    t[hp + "enorm.weight"] = HFTensor((D,), *_vector(p + ("enorm", "scale")))
    t[hp + "hnorm.weight"] = HFTensor((D,), *_vector(p + ("hnorm", "scale")))
    t[hp + "eh_proj.weight"] = HFTensor((D, 2 * D), *_linear(p + ("eh_proj",)), True)
    t[hp + "shared_head.norm.weight"] = HFTensor((D,), *_vector(p + ("head_norm", "scale")))
    # The MTP layer stores its own copies of the embedding and head; moe_jax shares the main model's.
    t[hp + "embed_tokens.weight"] = HFTensor((V, D), *_copy_of(("embedding",), rows))
    head = _copy_of(("embedding",), rows) if cfg.tie_word_embeddings else _linear(("lm_head",), cols)
    t[hp + "shared_head.head.weight"] = HFTensor((V, D), lambda w: [], head[1])
  return t


def mtp_layers_present(keys, cfg: Any) -> int:
  """How many MTP layers (checkpoint layers >= num_hidden_layers) the keys hold."""
  L = cfg.num_hidden_layers
  found = set()
  for k in keys:
    if k.startswith("model.layers."):
      i = int(k.split(".")[2])
      if i >= L:
        found.add(i)
  return len(found)
