"""DeepSeek-V2/V3/V3.2 `config.json` <-> moe_jax model ConfigDict.

Fields with the same name copy over 1:1. The differences handled here:
- RoPE: published configs write `rope_theta` plus `rope_scaling` ({"type": "yarn", ...}); transformers >= 5
  writes `rope_parameters` ({"rope_type": ..., "rope_theta": ..., ...}). Both are read.
- V3.2 (`deepseek_v32`) is V3 plus DeepSeek Sparse Attention: `index_n_heads`, `index_head_dim`, `index_topk`
  (in moe_jax a V3 config has index_n_heads None); its MLA always rotates interleaved pairs.
- transformers' V3 config may call the MTP depth `num_mtp_layers`; V2 configs leave `n_group`/`topk_group`
  empty (no grouping) and have no `scoring_func` (V2 is softmax) nor `rope_interleave` (V2 always interleaves).
"""

from __future__ import annotations

from typing import Any

import ml_collections

from moe_jax.config import base_model_config, uses_indexer, yarn_rope_scaling

MODEL_TYPES = ("deepseek_v2", "deepseek_v3", "deepseek_v32")
_INDEX_FIELDS = ("index_n_heads", "index_head_dim", "index_topk")  # V3.2 only
# Fields that are architecture (copied from config.json); the rest of the schema is moe_jax's own.
_ARCH_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
    "num_attention_heads", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
    "n_routed_experts", "n_shared_experts", "num_experts_per_tok", "first_k_dense_replace", "moe_layer_freq",
    "n_group", "topk_group", "topk_method", "scoring_func", "norm_topk_prob", "routed_scaling_factor",
    "aux_loss_alpha", "seq_aux", "num_nextn_predict_layers", "hidden_act", "rms_norm_eps", "rope_interleave",
    "max_position_embeddings", "tie_word_embeddings", "attention_bias", "initializer_range",
)  # fmt: skip


def _rope_from_hf(hf: dict) -> tuple[float, Any]:
  params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
  theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
  rope_type = params.get("rope_type", params.get("type", "default"))
  if rope_type in (None, "default"):
    return float(theta), None
  if rope_type != "yarn":
    raise ValueError(f"config.json rope type {rope_type!r} is not supported (DeepSeek uses 'yarn' or none)")
  return float(theta), yarn_rope_scaling(
      factor=params["factor"],
      original_max_position_embeddings=params["original_max_position_embeddings"],
      beta_fast=params.get("beta_fast") or 32.0,
      beta_slow=params.get("beta_slow") or 1.0,
      mscale=params.get("mscale") or 0.0,
      mscale_all_dim=params.get("mscale_all_dim") or 0.0,
  )


# Sizes that must be integers >= 1 / >= 0 (a float like 64.9 is an error, not truncated).
_POSITIVE = ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
             "num_attention_heads", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
             "n_routed_experts", "num_experts_per_tok", "moe_layer_freq", "max_position_embeddings")
_NON_NEGATIVE = ("n_shared_experts", "first_k_dense_replace", "num_nextn_predict_layers", "num_mtp_layers")


def check_sizes(hf: dict) -> None:
  """Raises ValueError naming the field when a size in config.json is not an integer in range."""
  for names, low in ((_POSITIVE, 1), (_NON_NEGATIVE, 0)):
    for name in names:
      v = hf.get(name)
      if v is None:
        continue
      if isinstance(v, bool) or not isinstance(v, (int, float)) or v != int(v) or v < low:
        raise ValueError(f"config.json {name}={v!r} must be an integer >= {low}")
  for name in ("q_lora_rank", "n_group", "topk_group"):
    v = hf.get(name)
    if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or v != int(v) or v < 1):
      raise ValueError(f"config.json {name}={v!r} must be an integer >= 1 or null")


def model_config_from_hf(hf: dict) -> ml_collections.ConfigDict:
  """A moe_jax model config from a parsed DeepseekV2/V3 config.json (sizes checked by `check_sizes`)."""
  check_sizes(hf)
  model_type = hf.get("model_type")
  if model_type not in MODEL_TYPES:
    raise ValueError(f"config.json model_type={model_type!r} is not one of {MODEL_TYPES}")
  c = base_model_config()
  v2 = model_type == "deepseek_v2"
  # V2 defaults where its config.json is silent.
  if v2:
    c.scoring_func, c.topk_method, c.norm_topk_prob, c.routed_scaling_factor = "softmax", "greedy", False, 1.0
    c.num_nextn_predict_layers, c.first_k_dense_replace, c.aux_loss_alpha = 0, 0, 0.001
  hf = dict(hf)
  if "num_nextn_predict_layers" not in hf and "num_mtp_layers" in hf:
    hf["num_nextn_predict_layers"] = hf["num_mtp_layers"]
  fields = _ARCH_FIELDS + (_INDEX_FIELDS if model_type == "deepseek_v32" else ())
  for name in fields:
    if hf.get(name) is not None:
      c[name] = type(c[name])(hf[name]) if c[name] is not None and not isinstance(c[name], bool) else hf[name]
  if hf.get("q_lora_rank") is None:
    c.q_lora_rank = None
  if hf.get("n_group") is None:
    c.n_group, c.topk_group = 1, 1
  if v2 or model_type == "deepseek_v32":
    c.rope_interleave = True
  c.rope_theta, c.rope_scaling = _rope_from_hf(hf)
  return c


def fp8_block_size(hf: dict) -> tuple[int, int]:
  q = hf.get("quantization_config") or {}
  return tuple(q.get("weight_block_size") or (128, 128))


def hf_config_from_model(cfg: Any, dtype: str = "float32") -> dict:
  """The DeepseekV3/V2 config.json for a moe_jax model config (the inverse of `model_config_from_hf`).

  V3 (`deepseek_v3`) is sigmoid scoring with noaux_tc selection; V2 (`deepseek_v2`) is softmax with greedy or
  group_limited_greedy. Other combinations have no published format and raise. RoPE is written both ways
  (`rope_parameters`, as transformers >= 5 writes, and the releases' `rope_theta` + `rope_scaling`).
  """
  if cfg.get("attention_type", "mla") != "mla":
    raise ValueError(f"attention_type={cfg.attention_type!r} has no DeepSeek-V2/V3 checkpoint format (they use MLA)")
  if cfg.scoring_func == "sigmoid" and cfg.topk_method == "noaux_tc" and uses_indexer(cfg):
    model_type, arch = "deepseek_v32", "DeepseekV32ForCausalLM"
    if not cfg.rope_interleave:
      raise ValueError("rope_interleave=False cannot be exported as deepseek_v32 (V3.2 always interleaves)")
  elif uses_indexer(cfg):
    raise ValueError("a model with the DSA indexer exports only as deepseek_v32: sigmoid + noaux_tc routing")
  elif cfg.scoring_func == "sigmoid" and cfg.topk_method == "noaux_tc":
    model_type, arch = "deepseek_v3", "DeepseekV3ForCausalLM"
  elif cfg.scoring_func == "softmax" and cfg.topk_method in ("greedy", "group_limited_greedy"):
    model_type, arch = "deepseek_v2", "DeepseekV2ForCausalLM"
    if not cfg.rope_interleave:
      raise ValueError("rope_interleave=False cannot be exported as deepseek_v2 (V2 always interleaves)")
  else:
    raise ValueError(f"scoring_func={cfg.scoring_func!r} with topk_method={cfg.topk_method!r} has no published "
                     "checkpoint format: deepseek_v3 is sigmoid + noaux_tc, deepseek_v2 is softmax + greedy or "
                     "group_limited_greedy")
  hf = {name: cfg[name] for name in _ARCH_FIELDS}
  hf.update(model_type=model_type, architectures=[arch], torch_dtype=dtype, dtype=dtype,
            num_key_value_heads=cfg.num_attention_heads, rope_theta=float(cfg.rope_theta))
  if model_type == "deepseek_v2":
    hf.pop("rope_interleave")
    hf.pop("num_nextn_predict_layers")
  if model_type == "deepseek_v32":
    hf.pop("rope_interleave")
    hf.update({name: cfg[name] for name in _INDEX_FIELDS})
  if cfg.topk_method == "greedy" or cfg.n_group <= 1:
    hf["n_group"], hf["topk_group"] = (None, None) if model_type == "deepseek_v2" else (1, 1)
  if cfg.rope_scaling is None:
    hf["rope_scaling"] = None
    hf["rope_parameters"] = {"rope_type": "default", "rope_theta": float(cfg.rope_theta)}
  else:
    yarn = {k: v for k, v in dict(cfg.rope_scaling).items() if k != "type"}
    hf["rope_scaling"] = {"type": "yarn", **yarn}
    hf["rope_parameters"] = {"rope_type": "yarn", "rope_theta": float(cfg.rope_theta), **yarn}
  return hf
