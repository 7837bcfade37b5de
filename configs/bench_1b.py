"""A ~1B-total DeepSeek-V3-shaped MoE for speed measurements on one accelerator (`scripts/bench_mfu.py`):
MLA with q/kv compression and V3's head dims, 64 routed + 1 shared experts top-6 (8 groups, 4 kept), a dense
first layer, one MTP module, 4K-token rows, bfloat16 compute with float32 parameters.

    python scripts/bench_mfu.py --config=configs/bench_1b.py                 # accelerators
    python scripts/bench_mfu.py --config=configs/bench_1b.py --preset=cpu    # a reduced preset for the CPU

Every field not set here is DeepSeek-V3's (moe_jax.config.base_model_config).
"""

import ml_collections

from configs import default

SEQ_LEN = 4096  # tokens per row


def get_model_config() -> ml_collections.ConfigDict:
  m = default.get_model_config()  # V3 architecture switches (sigmoid, noaux_tc, MTP) at small sizes ...
  m.vocab_size = 32768  # ... resized: a 32K vocabulary keeps the head from dominating a 1B model
  m.hidden_size = 1024  # model width
  m.intermediate_size = 4096  # the dense layer's SwiGLU width
  m.moe_intermediate_size = 512  # per-expert width (fine-grained: d/2)
  m.num_hidden_layers = 8  # 1 dense + 7 MoE
  m.num_attention_heads = 16  # MLA heads
  m.q_lora_rank = 512  # query latent
  m.kv_lora_rank = 256  # kv latent
  m.qk_nope_head_dim = 128  # V3's per-head dims
  m.qk_rope_head_dim = 64
  m.v_head_dim = 128
  m.n_routed_experts = 64  # routed experts
  m.n_shared_experts = 1  # shared experts
  m.num_experts_per_tok = 6  # top-K
  m.first_k_dense_replace = 1  # one dense layer
  m.n_group = 8  # expert groups
  m.topk_group = 4  # groups kept per token
  m.num_nextn_predict_layers = 1  # one MTP module
  m.max_position_embeddings = SEQ_LEN  # = the rows' length
  m.initializer_range = 0.006  # V3's init std
  m.dtype = "bfloat16"  # compute dtype on accelerators (params stay float32)
  m.remat_policy = "none"  # one 4K row fits without activation checkpointing
  return m


def get_config() -> ml_collections.ConfigDict:
  config = default.get_config()
  config.model = get_model_config()
  config.data.seq_len = SEQ_LEN  # one 4K row per step on one device
  config.data.batch_size = 1
  return config
