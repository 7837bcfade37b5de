"""Default: a small DeepSeek-V3-architecture model trained on the embedded corpus (the Python standard library)
in ~15 minutes on a 2-core CPU, ending below `xz -9e` in held-out bits per byte (1.465 vs 1.538). Every V3
mechanism is live: MLA with q/kv compression and decoupled RoPE, shared + fine-grained routed experts with
sigmoid, group-limited routing, auxiliary-loss-free balancing plus the sequence-wise balance loss, and one MTP
module.

    python -m moe_jax.train --config=configs/default.py --workdir=/tmp/moe_jax_default
"""

import ml_collections
from ml_collections.config_dict import placeholder

from moe_jax.config import base_model_config
from moe_jax.sharding import base_mesh_config
from moe_jax.training.config import base_checkpoint_config, base_data_config, base_train_config

VOCAB = 2048  # BPE vocabulary: the tokenizer's size and the model's


def get_model_config() -> ml_collections.ConfigDict:
  m = base_model_config()
  m.vocab_size = VOCAB  # = config.data.bpe_vocab_size
  m.hidden_size = 128  # model width d
  m.intermediate_size = 512  # the dense layer's SwiGLU width
  m.moe_intermediate_size = 128  # per-expert SwiGLU width (fine-grained: d)
  m.num_hidden_layers = 4  # 1 dense + 3 MoE
  m.num_attention_heads = 4  # MLA heads
  m.q_lora_rank = 64  # query latent
  m.kv_lora_rank = 32  # joint kv latent (what decoding caches)
  m.qk_nope_head_dim = 32  # per-head no-RoPE query/key dims
  m.qk_rope_head_dim = 16  # decoupled RoPE key dims (shared across heads)
  m.v_head_dim = 32  # per-head value dims
  m.n_routed_experts = 8  # routed experts
  m.n_shared_experts = 1  # shared experts
  m.num_experts_per_tok = 2  # routed experts per token
  m.first_k_dense_replace = 1  # the first layer is dense, as V3's first 3
  m.n_group = 4  # expert groups for group-limited routing
  m.topk_group = 2  # groups each token may use
  m.num_nextn_predict_layers = 1  # one MTP module (V3)
  m.rope_scaling = None  # no YaRN: training runs at its native context
  m.max_position_embeddings = 128  # = data.seq_len
  m.initializer_range = 0.02  # init std for a narrow model
  m.dtype = "float32"  # compute dtype: float32 is faster than bfloat16 on CPU; use bfloat16 on GPU/TPU
  return m


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0  # init and data order
  config.init_from = placeholder(str)  # start from trained weights: a training workdir or hf:DIR (None: random init)
  config.model = get_model_config()  # moe_jax.config schema

  config.data = base_data_config()  # moe_jax.training.config.base_data_config documents every field
  config.data.source = "embedded"  # the running Python's stdlib, 5% of files held out by path hash
  config.data.tokenizer = "bpe"  # trained on the training split (a few seconds), saved in the workdir
  config.data.bpe_vocab_size = VOCAB  # = model.vocab_size
  config.data.seq_len = 128  # tokens per packed row (~400 bytes): on CPU, more rows beat longer context
  config.data.batch_size = 32  # rows per step (4096 token slots)
  config.data.shuffle_window = 512  # rows shuffled together after packing

  config.train = base_train_config()
  config.train.num_steps = 1100  # ~4.5M token slots, ~14 minutes on a 2-core CPU (1.465 bits/byte; xz -9e 1.538)
  config.train.log_every = 20  # progress and metrics.jsonl cadence
  config.train.eval_every = 200  # periodic held-out estimate on eval_batches batches
  config.train.eval_batches = 8  # the final evaluation uses the whole held-out split
  config.train.learning_rate = 2e-3  # peak LR: a small model takes a large one
  config.train.warmup_steps = 30  # linear LR warm-up
  config.train.lr_decay_start = 30  # cosine from the end of warm-up ...
  config.train.lr_decay_length = -1  # ... to the end of training
  config.train.lr_final = 3e-4  # 10% of peak, as V3's 2.2e-4 -> 2.2e-5
  config.train.bias_update_rate = 0.001  # loss-free balancing gamma (V3)

  config.checkpoint = base_checkpoint_config()
  config.checkpoint.every = 200  # steps between checkpoints
  config.checkpoint.keep = 2  # newest kept

  config.mesh = base_mesh_config()  # default: every device on `data`; e.g. --config.mesh.expert=4 for EP
  return config
