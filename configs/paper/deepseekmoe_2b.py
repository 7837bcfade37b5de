"""DeepSeekMoE's 2B validation model and run (Dai et al. 2024, arXiv 2401.06066, sec. 4.1): 9 layers, hidden
1,280, 10 heads x 128 (multi-head attention), every FFN an MoE of 1 shared + 63 routed experts, 7 routed activated;
total expert parameters 16x a standard FFN, activated 2x (each expert is 1/4 of a standard FFN: 864 wide, 1/4 of
an 8/3-d SwiGLU rounded up); softmax gate, plain top-K, gates not renormalised, the expert-level balance loss with
alpha = 0.01; init std 0.006; an 8K BPE vocabulary (the paper's validation tokenizer). 100B tokens: batch 2K
sequences x 2K tokens, 25K steps, max LR 1.08e-3 after 2K warm-up steps, x0.316 at 80% and at 90% of the steps.
Parameters (jax.eval_shape, tests/test_paper_configs.py): 1.99B total, 0.31B activated (paper: ~2.0B / ~0.3B).

Data from flags: --config.data.source=jsonl --config.data.paths="('/data/pile/train-*.jsonl',)".

Mesh: a TPU v5p-64 (32 chips) as data=4 x fsdp=8 holds the whole batch (64 sequences per chip): 68.2 GiB per
chip, 84 sequences would fit (scripts/plan.py, as for lfb_1b.py; checked in tests/test_paper_configs.py). 8 x H100:
one sequence fits, 256 per device need gradient accumulation (not in the trainer yet).
"""

import ml_collections
from ml_collections.config_dict import placeholder

from moe_jax.config import base_model_config
from moe_jax.sharding import base_mesh_config
from moe_jax.training.config import base_checkpoint_config, base_data_config, base_train_config

VOCAB = 8192
STEPS = 25000
LR = 1.08e-3


def get_model_config() -> ml_collections.ConfigDict:
  m = base_model_config()
  m.vocab_size = VOCAB  # 8K BPE
  m.hidden_size = 1280  # model width
  m.intermediate_size = 3456  # a standard 8/3-d SwiGLU (the dense baseline's width is 2x this; unused here)
  m.moe_intermediate_size = 864  # 1/4 of a standard FFN
  m.num_hidden_layers = 9  # 9 layers
  m.first_k_dense_replace = 0  # every FFN is MoE
  m.num_attention_heads = 10  # 10 heads of 128
  m.attention_type = "mha"  # the paper's multi-head attention
  m.q_lora_rank = None  # (MLA only)
  m.kv_lora_rank = 512  # (MLA only; unused by mha)
  m.qk_nope_head_dim = 64  # per-head query/key dims without RoPE
  m.qk_rope_head_dim = 64  # per-head RoPE dims: 128-dim keys
  m.v_head_dim = 128  # per-head value dims
  m.n_routed_experts = 63  # routed experts
  m.n_shared_experts = 1  # one shared expert
  m.num_experts_per_tok = 7  # 7 routed activated (+ the shared one = 2 standard FFNs)
  m.n_group = 1  # plain top-K
  m.topk_group = 1
  m.topk_method = "greedy"  # no selection bias
  m.scoring_func = "softmax"  # the paper's gate
  m.norm_topk_prob = False  # gates not renormalised
  m.routed_scaling_factor = 1.0  # no extra scale
  m.aux_loss_alpha = 0.01  # expert-level balance factor
  m.seq_aux = False  # over the batch
  m.num_nextn_predict_layers = 0  # no MTP
  m.rope_scaling = None  # native context
  m.max_position_embeddings = 2048  # = data.seq_len
  m.initializer_range = 0.006  # the paper's init std
  m.dtype = "bfloat16"  # accelerator compute
  m.remat_policy = "full"  # activations rematerialised
  return m


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0  # init and data order
  config.init_from = placeholder(str)  # start from trained weights: a training workdir or hf:DIR (None: random init)
  config.model = get_model_config()
  config.data = base_data_config()
  config.data.source = "jsonl"  # give --config.data.paths
  config.data.tokenizer = "bpe"  # trained on the training split (or --config.data.tokenizer_path)
  config.data.bpe_vocab_size = VOCAB  # = model.vocab_size
  config.data.seq_len = 2048  # 2K tokens per sequence
  config.data.batch_size = 2048  # 2K sequences per step
  config.data.shuffle_window = 4096  # packed rows shuffled together
  config.train = base_train_config()
  config.train.num_steps = STEPS  # 100B tokens
  config.train.log_every = 50  # metrics.jsonl cadence
  config.train.eval_every = 2000  # periodic held-out estimate
  config.train.eval_batches = 16  # its size; the final evaluation covers the whole held-out split
  config.train.learning_rate = LR  # max LR
  config.train.warmup_steps = 2000  # linear warm-up
  config.train.lr_final = LR  # no cosine (= learning_rate): a multi-step schedule
  config.train.lr_tail = ((int(0.8 * STEPS), LR * 0.316), (int(0.9 * STEPS), LR * 0.316 ** 2))  # x0.316 twice
  config.train.bias_update_rate = 0.0  # no loss-free balancing (greedy routing has no bias)
  config.train.mtp_weight = 0.0  # no MTP
  config.checkpoint = base_checkpoint_config()
  config.checkpoint.every = 1000  # steps between checkpoints
  config.checkpoint.keep = 3  # newest kept
  config.mesh = base_mesh_config()
  config.mesh.data = -1  # v5p-64: 4 (32 chips / fsdp)
  config.mesh.fsdp = 8  # parameters, gradients and Adam state split 8 ways
  return config
