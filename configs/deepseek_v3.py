"""DeepSeek-V3 (671B total, 37B activated): the published architecture (config.json of deepseek-ai/DeepSeek-V3),
and its pre-training run's shape (V3 report sec. 4.2: 4K tokens, 15,360 sequences per step) on its 2,048-GPU mesh.

Too large to instantiate on a workstation; used with jax.eval_shape (summary, planner), as the reference shape,
and compiled deviceless for real targets (docs/compile.md), e.g. on 256 H100s, one sequence per GPU:

    python -m moe_jax.compile --config=configs/deepseek_v3.py --target=h100-256 --steps=train \
        --config.mesh.fsdp=4 --config.mesh.expert=64 --config.mesh.tensor=1 --config.data.batch_size=256
"""

import ml_collections
from ml_collections.config_dict import placeholder

from moe_jax.config import base_model_config, yarn_rope_scaling
from moe_jax.sharding import base_mesh_config
from moe_jax.training.config import base_checkpoint_config, base_data_config, base_train_config


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
  config.seed = 0  # init and data order
  config.init_from = placeholder(str)  # start from trained weights: a training workdir or hf:DIR (None: random init)
  config.model = get_model_config()  # the model (moe_jax.config schema)
  config.model.remat_policy = "full"  # activations rematerialised (61 layers x 4K tokens)
  config.data = base_data_config()
  config.data.source = "jsonl"  # give --config.data.paths
  config.data.tokenizer = "bpe"  # or --config.data.tokenizer_path=<the published tokenizer.json>
  config.data.bpe_vocab_size = 128000  # <= model.vocab_size
  config.data.seq_len = 4096  # V3 pre-training's sequence length
  config.data.batch_size = 15360  # V3's batch after its batch-size warm-up (sequences per step)
  config.train = base_train_config()
  config.train.learning_rate = 2.2e-4  # V3's peak LR
  config.checkpoint = base_checkpoint_config()
  config.mesh = base_mesh_config()
  config.mesh.data = -1  # the rest (1 on V3's 2,048 GPUs)
  config.mesh.fsdp = 8  # parameters and optimiser state split on the model dim
  config.mesh.expert = 64  # 4 routed experts per device (V3 sec. 3.2: EP64 over 8 nodes)
  config.mesh.tensor = 4  # attention heads, FFN widths and vocabulary split 4 ways
  return config
