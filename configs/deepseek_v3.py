"""DeepSeek-V3 (671B total, 37B activated): the published architecture (config.json of deepseek-ai/DeepSeek-V3).

Too large to instantiate on a workstation; used with jax.eval_shape (summary, planner) and as the reference shape.
"""

import ml_collections

from moe_jax.config import base_model_config, yarn_rope_scaling


def get_model_config() -> ml_collections.ConfigDict:
  m = base_model_config()  # the schema's defaults are V3's; restated here so this file is the full record
  m.vocab_size = 129280  # tokenizer vocabulary
  m.hidden_size = 7168  # model width
  m.intermediate_size = 18432  # dense FFN width (first 3 layers)
  m.moe_intermediate_size = 2048  # per-expert width
  m.num_hidden_layers = 61  # blocks (+1 MTP module)
  m.num_attention_heads = 128  # heads
  m.q_lora_rank = 1536  # query latent rank
  m.kv_lora_rank = 512  # kv latent rank (cached)
  m.qk_nope_head_dim = 128  # per-head no-RoPE dims
  m.qk_rope_head_dim = 64  # shared RoPE key dims
  m.v_head_dim = 128  # per-head value dims
  m.n_routed_experts = 256  # routed experts per MoE layer
  m.n_shared_experts = 1  # shared experts per MoE layer
  m.num_experts_per_tok = 8  # top-K
  m.first_k_dense_replace = 3  # dense layers before the MoE layers
  m.n_group = 8  # expert groups (one per node)
  m.topk_group = 4  # at most 4 groups (nodes) per token
  m.topk_method = "noaux_tc"  # biased selection, group score = top-2 sum
  m.scoring_func = "sigmoid"  # sigmoid affinities
  m.norm_topk_prob = True  # normalise the top-K weights
  m.routed_scaling_factor = 2.5  # gating scale
  m.aux_loss_alpha = 0.0001  # sequence-wise balance loss weight
  m.seq_aux = True  # per sequence
  m.num_nextn_predict_layers = 1  # MTP depth
  m.rms_norm_eps = 1e-6  # norm epsilon
  m.rope_theta = 10000.0  # RoPE base
  m.rope_scaling = yarn_rope_scaling(40.0, 4096, 32.0, 1.0, 1.0, 1.0)  # YaRN 4K -> 160K
  m.max_position_embeddings = 163840  # extended context
  m.initializer_range = 0.006  # init std (V3 report sec. 4.2)
  m.dtype = "bfloat16"  # compute dtype
  m.scan_layers = True  # 58 identical MoE layers: scan them
  return m


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.model = get_model_config()  # the model (moe_jax.config schema)
  return config
