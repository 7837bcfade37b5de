"""The Loss-Free Balancing paper's 1B model and run (Wang et al. 2024, arXiv 2408.15664, sec. 4.1 and Table 1):
hidden 1024, 8 heads, 9 MoE layers of 2 shared + 64 routed experts (top-6, granularity 16/3: each expert 3/16 of
an 8/3-d SwiGLU FFN = 512 wide), sigmoid gate, vocabulary 32,064; sequence 2,048, batch 1,152, 40K steps (~94B
tokens), LR 1e-3 cosine to 1e-4 after 1,000 warm-up steps. The paper's loss-free balancing (u = 1e-3) is on; the
experiments' variants switch it for the auxiliary-loss baseline.

The paper's attention is multi-head (DeepSeekMoE's backbone): here `mha` with MLA's split head (64 no-RoPE +
64 RoPE query/key dims, 128 value dims: 8 x 128 = hidden). Parameters (jax.eval_shape, tests/test_paper_configs.py):
1.04B total, 0.18B activated per token.

Data from flags: --config.data.source=jsonl --config.data.paths="('/data/pile/train-*.jsonl',)" (a BPE of
32,064 ids is trained on the training split unless --config.data.tokenizer_path gives one).

Mesh: a TPU v5p-64 (32 chips, 95 GB) as data=4 x fsdp=8 holds the whole batch (36 sequences per chip):
37.8 GiB per chip, 86 sequences would fit (scripts/plan.py --config=configs/paper/lfb_1b.py
--mesh=data=4,fsdp=8,expert=1,tensor=1 --accelerator=tpu-v5p --seq_len=2048 --global_batch=1152; checked in
tests/test_paper_configs.py). On 8 x H100 (fsdp=8) one sequence fits (2.0 GiB of state + 1.1 GiB per sequence,
68 sequences at most) but the 144 per device do not: that needs gradient accumulation, which the trainer does not
have yet.
"""

import ml_collections
from ml_collections.config_dict import placeholder

from moe_jax.config import base_model_config
from moe_jax.sharding import base_mesh_config
from moe_jax.training.config import base_checkpoint_config, base_data_config, base_train_config

VOCAB = 32064


def get_model_config() -> ml_collections.ConfigDict:
  m = base_model_config()
  m.vocab_size = VOCAB  # the paper's tokenizer
  m.hidden_size = 1024  # model width
  m.intermediate_size = 2730  # an 8/3-d SwiGLU (unused: every layer is MoE)
  m.moe_intermediate_size = 512  # 3/16 of 2730 (granularity 16/3)
  m.num_hidden_layers = 9  # 9 MoE layers
  m.first_k_dense_replace = 0  # every layer MoE
  m.num_attention_heads = 8  # 8 heads of 128
  m.attention_type = "mha"  # the paper's multi-head attention
  m.q_lora_rank = None  # (MLA only)
  m.kv_lora_rank = 512  # (MLA only; unused by mha)
  m.qk_nope_head_dim = 64  # per-head query/key dims without RoPE
  m.qk_rope_head_dim = 64  # per-head RoPE dims: 64 + 64 = 128-dim keys
  m.v_head_dim = 128  # per-head value dims
  m.n_routed_experts = 64  # routed experts
  m.n_shared_experts = 2  # shared experts
  m.num_experts_per_tok = 6  # top-6
  m.n_group = 1  # plain top-K
  m.topk_group = 1
  m.topk_method = "noaux_tc"  # biased selection (loss-free balancing)
  m.scoring_func = "sigmoid"  # the paper's gate
  m.norm_topk_prob = True  # the K gates normalised
  m.routed_scaling_factor = 1.0  # no extra scale
  m.aux_loss_alpha = 0.0  # loss-free: no auxiliary loss (the baseline variant sets 1e-3)
  m.seq_aux = False  # when an auxiliary loss is on: over the batch
  m.num_nextn_predict_layers = 0  # no MTP
  m.rope_scaling = None  # native context
  m.max_position_embeddings = 2048  # = data.seq_len
  m.initializer_range = 0.006  # DeepSeekMoE's init std
  m.dtype = "bfloat16"  # accelerator compute
  m.remat_policy = "full"  # activations rematerialised: 144 sequences per device per step
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
  config.data.seq_len = 2048  # the paper's sequence length
  config.data.batch_size = 1152  # the paper's batch (sequences)
  config.data.shuffle_window = 4096  # packed rows shuffled together
  config.train = base_train_config()
  config.train.num_steps = 40000  # ~94B tokens
  config.train.log_every = 50  # metrics.jsonl cadence (MaxVio_batch is averaged over these)
  config.train.eval_every = 2000  # periodic held-out estimate
  config.train.eval_batches = 16  # its size; the final evaluation covers the whole held-out split
  config.train.learning_rate = 1e-3  # peak LR
  config.train.warmup_steps = 1000  # linear warm-up
  config.train.lr_decay_start = 1000  # cosine from the end of warm-up ...
  config.train.lr_final = 1e-4  # ... to 1e-4 at the end
  config.train.bias_update_rate = 1e-3  # the paper's u
  config.train.mtp_weight = 0.0  # no MTP
  config.checkpoint = base_checkpoint_config()
  config.checkpoint.every = 1000  # steps between checkpoints
  config.checkpoint.keep = 3  # newest kept
  config.mesh = base_mesh_config()
  config.mesh.data = -1  # v5p-64: 4 (32 chips / fsdp)
  config.mesh.fsdp = 8  # parameters, gradients and Adam state split 8 ways
  return config
