"""Debug: a tiny DeepSeek-V3-shaped model (every mechanism on: q_lora, YaRN, group-limited sigmoid routing,
shared experts, a dense first layer, one MTP module) that runs in seconds on CPU."""

import ml_collections

from moe_jax.config import base_model_config, yarn_rope_scaling


def get_model_config() -> ml_collections.ConfigDict:
  m = base_model_config()
  m.vocab_size = 256  # bytes
  m.hidden_size = 64  # model width
  m.intermediate_size = 128  # dense FFN width
  m.moe_intermediate_size = 32  # per-expert width
  m.num_hidden_layers = 3  # 1 dense + 2 MoE
  m.num_attention_heads = 4  # heads
  m.q_lora_rank = 32  # query latent rank
  m.kv_lora_rank = 16  # kv latent rank
  m.qk_nope_head_dim = 16  # per-head no-RoPE dims
  m.qk_rope_head_dim = 8  # shared RoPE key dims
  m.v_head_dim = 16  # per-head value dims
  m.n_routed_experts = 8  # routed experts
  m.n_shared_experts = 1  # shared experts
  m.num_experts_per_tok = 2  # top-K
  m.first_k_dense_replace = 1  # one dense layer
  m.n_group = 4  # expert groups
  m.topk_group = 2  # kept groups
  m.num_nextn_predict_layers = 1  # MTP depth
  m.rope_scaling = yarn_rope_scaling(factor=4.0, original_max_position_embeddings=64)  # YaRN on
  m.max_position_embeddings = 256  # context the model is meant for
  m.initializer_range = 0.02  # init std
  return m


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.model = get_model_config()  # the model (moe_jax.config schema)
  return config
