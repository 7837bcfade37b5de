"""Debug: a tiny DeepSeek-V3-shaped model (every mechanism on: q_lora, YaRN, group-limited sigmoid routing,
shared experts, a dense first layer, one MTP module) that runs in seconds on CPU, and a matching experiment
config (byte tokenizer, short rows) for tests, the quickstart notebook and smoke runs:

    python -m moe_jax.train --config=configs/debug.py --workdir=/tmp/moe_jax_debug
"""

import ml_collections
from ml_collections.config_dict import placeholder

from moe_jax.config import base_model_config, yarn_rope_scaling
from moe_jax.sharding import base_mesh_config
from moe_jax.training.config import base_checkpoint_config, base_data_config, base_train_config


def get_model_config() -> ml_collections.ConfigDict:
  m = base_model_config()
  m.vocab_size = 257  # bytes + <bos> (the byte tokenizer)
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
  config.seed = 0  # init and data order
  config.init_from = placeholder(str)  # start from trained weights: a training workdir or hf:DIR (None: random init)
  config.model = get_model_config()  # the model (moe_jax.config schema)
  config.data = base_data_config()  # fields documented in moe_jax.training.config
  config.data.tokenizer = "byte"  # no tokenizer training
  config.data.seq_len = 64  # short rows
  config.data.batch_size = 8  # rows per step
  config.train = base_train_config()
  config.train.num_steps = 40  # a smoke run
  config.train.log_every = 5  # progress cadence
  config.train.eval_every = 0  # evaluate at the end only
  config.train.eval_batches = 4  # periodic eval size (when eval_every > 0)
  config.train.learning_rate = 3e-3  # tiny model, large LR
  config.train.warmup_steps = 10  # short warm-up
  config.train.lr_final = 3e-4  # cosine to 10% of peak
  config.checkpoint = base_checkpoint_config()
  config.checkpoint.every = 20  # steps between checkpoints
  config.checkpoint.keep = 2  # newest kept

  config.mesh = base_mesh_config()  # default: every device on `data`; e.g. --config.mesh.expert=4 for EP
  return config
