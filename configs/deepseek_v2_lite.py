"""DeepSeek-V2-Lite (15.7B total, 2.4B activated): the published architecture (deepseek-ai/DeepSeek-V2-Lite)."""

import ml_collections

from moe_jax.config import base_model_config, yarn_rope_scaling


def get_model_config() -> ml_collections.ConfigDict:
  m = base_model_config()
  m.vocab_size = 102400  # tokenizer vocabulary
  m.hidden_size = 2048  # model width
  m.intermediate_size = 10944  # dense FFN width (first layer)
  m.moe_intermediate_size = 1408  # per-expert width
  m.num_hidden_layers = 27  # blocks
  m.num_attention_heads = 16  # heads
  m.q_lora_rank = None  # no query compression: plain q projection
  m.kv_lora_rank = 512  # kv latent rank (cached)
  m.qk_nope_head_dim = 128  # per-head no-RoPE dims
  m.qk_rope_head_dim = 64  # shared RoPE key dims
  m.v_head_dim = 128  # per-head value dims
  m.n_routed_experts = 64  # routed experts per MoE layer
  m.n_shared_experts = 2  # shared experts per MoE layer
  m.num_experts_per_tok = 6  # top-K
  m.first_k_dense_replace = 1  # one dense layer
  m.n_group = 1  # no grouping
  m.topk_group = 1  # no grouping
  m.topk_method = "greedy"  # plain top-K
  m.scoring_func = "softmax"  # softmax affinities (V2)
  m.norm_topk_prob = False  # weights not renormalised
  m.routed_scaling_factor = 1.0  # no gating scale
  m.aux_loss_alpha = 0.001  # V2's expert-level balance loss weight
  m.seq_aux = True  # per sequence
  m.num_nextn_predict_layers = 0  # no MTP
  m.rms_norm_eps = 1e-6  # norm epsilon
  m.rope_theta = 10000.0  # RoPE base
  m.rope_scaling = yarn_rope_scaling(40.0, 4096, 32.0, 1.0, 0.707, 0.707)  # YaRN 4K -> 160K
  m.max_position_embeddings = 163840  # extended context
  m.initializer_range = 0.02  # init std
  m.dtype = "bfloat16"  # compute dtype
  m.scan_layers = True  # 26 identical MoE layers: scan them
  return m


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.model = get_model_config()  # the model (moe_jax.config schema)
  return config
