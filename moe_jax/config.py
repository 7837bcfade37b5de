"""The model configuration schema, its defaults and its validation.

A model config is an `ml_collections.ConfigDict`. Field names follow the published DeepSeek `config.json`
names wherever one exists, so a DeepSeek config maps onto it 1:1 (`moe_jax.interop.huggingface`). The fields
after the "moe_jax" banner are implementation choices of this codebase, not architecture.

This module sits at the bottom of the import graph: it imports nothing from moe_jax.
"""

from __future__ import annotations

import math
from typing import Any

import ml_collections
from ml_collections.config_dict import placeholder  # a None field the command line can set

SCORING_FUNCS = ("sigmoid", "softmax")
TOPK_METHODS = ("noaux_tc", "greedy", "group_limited_greedy")
DTYPES = ("float32", "bfloat16", "float16")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
MOE_DISPATCHES = ("dropless", "capacity")
DECODE_ATTENTIONS = ("absorbed", "naive")
INDEX_STAGES = ("sparse", "dense_warmup")
ATTENTION_TYPES = ("mla", "mha", "gqa")
ATTENTION_IMPLS = ("auto", "xla", "blockwise", "cudnn", "splash")  # "auto" + kernels.attention.ATTENTION_IMPLS
GMM_BACKENDS = ("auto", "tiled", "ragged_dot", "megablox", "mgpu_ragged_dot", "tokamax", "pallas_tpu",
                "pallas_mosaic_gpu", "reference")  # "auto" + kernels.BACKENDS
HIDDEN_ACTS = ("silu",)
ROPE_SCALING_TYPES = ("yarn",)


def yarn_rope_scaling(
    factor: float = 40.0,
    original_max_position_embeddings: int = 4096,
    beta_fast: float = 32.0,
    beta_slow: float = 1.0,
    mscale: float = 1.0,
    mscale_all_dim: float = 1.0,
) -> ml_collections.ConfigDict:
  """A YaRN `rope_scaling` block, as in DeepSeek's published config.json (defaults: DeepSeek-V3's)."""
  return ml_collections.ConfigDict(
      dict(
          type="yarn",  # the only scaling DeepSeek-V2/V3 use
          factor=float(factor),  # context extension factor s
          original_max_position_embeddings=int(original_max_position_embeddings),  # pre-extension context
          beta_fast=float(beta_fast),  # rotations above which a frequency is kept (extrapolated)
          beta_slow=float(beta_slow),  # rotations below which a frequency is divided by s (interpolated)
          mscale=float(mscale),  # cos/sin scale numerator: (0.1*mscale*ln s + 1) / (0.1*mscale_all_dim*ln s + 1)
          mscale_all_dim=float(mscale_all_dim),  # softmax scale is multiplied by (0.1*mscale_all_dim*ln s + 1)^2
      )
  )


def base_model_config() -> ml_collections.ConfigDict:
  """Every model field with its default. Defaults are DeepSeek-V3's published architecture."""
  c = ml_collections.ConfigDict()
  # --- Architecture (DeepSeek config.json names) -------------------------------------------------------
  c.vocab_size = 129280  # tokenizer vocabulary size V
  c.hidden_size = 7168  # model width d
  c.intermediate_size = 18432  # SwiGLU width of the dense FFN layers
  c.moe_intermediate_size = 2048  # SwiGLU width of each routed (and each shared) expert
  c.num_hidden_layers = 61  # transformer blocks in the main model (MTP modules not counted)
  c.num_attention_heads = 128  # attention heads n_h
  c.num_key_value_heads = placeholder(int)  # gqa only: key/value heads, each shared by num_attention_heads / this
  #                                           query heads
  c.q_lora_rank = 1536  # query compression rank d_c'; None = plain query projection (V2-Lite)
  c.kv_lora_rank = 512  # joint key-value latent rank d_c (the cached c_KV)
  c.qk_nope_head_dim = 128  # per-head query/key dims without RoPE, d_h
  c.qk_rope_head_dim = 64  # decoupled RoPE dims d_h^R (one key shared by all heads); must be even
  c.v_head_dim = 128  # per-head value dims
  c.n_routed_experts = 256  # routed experts N_r per MoE layer
  c.n_shared_experts = 1  # shared experts N_s per MoE layer (fused into one SwiGLU of N_s x width)
  c.num_experts_per_tok = 8  # routed experts per token K_r
  c.first_k_dense_replace = 3  # the first k layers use a dense FFN instead of MoE
  c.moe_layer_freq = 1  # every layer from first_k_dense_replace on is MoE (only 1 is supported)
  c.n_group = 8  # expert groups for group-limited routing (V3: one group per node)
  c.topk_group = 4  # groups kept per token (V3: at most 4 nodes per token)
  c.topk_method = "noaux_tc"  # noaux_tc (V3: biased selection, group score = top-2 sum) | greedy | group_limited_greedy (V2)
  c.scoring_func = "sigmoid"  # expert affinity: sigmoid (V3) | softmax (V2)
  c.norm_topk_prob = True  # normalise the K gating weights to sum to 1
  c.routed_scaling_factor = 2.5  # gating weights are multiplied by this after normalisation
  c.aux_loss_alpha = 0.0001  # weight alpha of the complementary balance loss (V3 eq. 17-20)
  c.seq_aux = True  # balance loss per sequence (V3) rather than per batch
  c.num_nextn_predict_layers = 1  # MTP depth J (0 = no MTP modules)
  c.index_n_heads = placeholder(int)  # DeepSeek Sparse Attention (V3.2): lightning-indexer heads H^I (V3.2: 64);
  #                                     None = dense MLA (V3). The indexer reads c_Q, so it needs q_lora_rank
  c.index_head_dim = 128  # indexer query/key dims D^I (RoPE on the first qk_rope_head_dim, half-split layout)
  c.index_topk = 2048  # with the indexer: each query attends to its top-k scored visible tokens (V3.2: 2048)
  c.index_stage = "sparse"  # sparse: MLA attends to the indexer's top-k (V3.2 sparse training and inference; the
  #                           indexer's input is detached and its KL loss covers the selected tokens) |
  #                           dense_warmup: dense MLA, the indexer learns towards the whole attention distribution
  c.hidden_act = "silu"  # SwiGLU activation
  c.rms_norm_eps = 1e-6  # epsilon of the block and final RMSNorms
  c.rope_theta = 10000.0  # RoPE base
  c.rope_scaling = yarn_rope_scaling()  # YaRN block, or None for plain RoPE
  c.rope_interleave = True  # DeepSeek checkpoints rotate interleaved pairs (x0,x1),(x2,x3),...
  c.max_position_embeddings = 163840  # longest context the model is meant for (informational)
  c.tie_word_embeddings = False  # share the input embedding with the output head
  c.attention_bias = False  # biases on attention projections (not supported: DeepSeek has none)
  c.initializer_range = 0.006  # std of the normal initialiser of all matrices
  # --- moe_jax implementation choices --------------------------------------------------------------------
  c.dtype = "float32"  # compute dtype of activations and matmuls (params are param_dtype)
  c.param_dtype = "float32"  # storage dtype of the parameters
  c.scan_layers = False  # nn.scan over identical layers: faster compiles, params stacked on a 'layers' axis
  c.remat_policy = "none"  # activation checkpointing per block: none | full | dots | dots_no_batch
  c.moe_dispatch = "dropless"  # dropless (sort + grouped matmul) | capacity (GShard token dropping baseline)
  c.capacity_factor = 1.25  # with capacity dispatch: slots per expert = ceil(factor * tokens * K / N_r)
  c.gmm_backend = "auto"  # grouped matmul: auto (validated default per platform) | tiled | ragged_dot |
  #                        megablox (jax's TPU kernel) | mgpu_ragged_dot (jax's Hopper kernel) | tokamax
  #                        (optional extra) | pallas_tpu |
  #                        pallas_mosaic_gpu (ours, experimental) | reference; see moe_jax.kernels
  c.ep_capacity_factor = 0.0  # expert parallelism: all-to-all rows per destination = factor * copies / ways;
  #                             <= 0 = all copies (never overflows); overflow is counted in dropped_fraction
  c.pad_vocab_to_multiple_of = 128  # embedding/head rows padded to a multiple of this, so `tensor` can split them
  #                                   (Megatron's make-vocab-size-divisible-by); padding ids never get a logit
  c.attention_type = "mla"  # mla (DeepSeek-V2/V3: the latent cache) | mha | gqa (per-head keys and values, cached
  #                          per key/value head: the attention experiment's and the paper configs' baselines); mha
  #                          and gqa keep MLA's head dims: q/k = qk_nope_head_dim + qk_rope_head_dim (RoPE on the
  #                          last qk_rope_head_dim of each head), v = v_head_dim; kv_lora/q_lora fields unused
  c.decode_attention = "absorbed"  # MLA over the latent cache: absorbed (W_UK/W_UV folded in) | naive (checking)
  c.attention_impl = "auto"  # attention without a cache (training, scoring): auto (per platform) | xla (einsum,
  #                           full [B,H,T,T] scores; the reference) | blockwise (flash-style, O(T) memory) |
  #                           cudnn (NVIDIA GPUs) | splash (TPUs); see moe_jax.kernels.attention
  c.attention_block_size = 512  # blockwise: query and key tile length (a call of T <= this is one tile)
  # --- LoRA adapters (set by config.finetune when method=lora; moe_jax.layers.lora) ----------------------
  c.lora_rank = 0  # rank r of every adapter; 0 = no adapters
  c.lora_alpha = 16.0  # the adapters' update is scaled by lora_alpha / lora_rank (Hu et al. 2021)
  c.lora_targets = ("attention", "experts")  # which matrices get adapters: attention (every MLA / MHA projection)
  #                                            | experts (routed experts) | shared_experts | mlp (dense layers)
  return c


LORA_TARGETS = ("attention", "experts", "shared_experts", "mlp")


# Fields added after workdirs were first written, with the value that reproduces how those runs were built.
_LEGACY_DEFAULTS = {"pad_vocab_to_multiple_of": 1, "decode_attention": "absorbed", "attention_impl": "xla",
                    "attention_block_size": 512, "attention_type": "mla", "num_key_value_heads": None,
                    "index_n_heads": None, "index_head_dim": 128, "index_topk": 2048, "index_stage": "sparse",
                    "lora_rank": 0, "lora_alpha": 16.0, "lora_targets": ("attention", "experts")}


def complete_model_config(c: Any) -> ml_collections.ConfigDict:
  """A saved model config (e.g. a workdir's config.json) with fields it predates filled in as they behaved then."""
  c = ml_collections.ConfigDict(c.to_dict() if hasattr(c, "to_dict") else c)
  for name, value in _LEGACY_DEFAULTS.items():
    if name not in c:
      c[name] = value
  return c


def padded_vocab_size(c: Any) -> int:
  """Rows of the embedding and head: vocab_size rounded up to a multiple of pad_vocab_to_multiple_of."""
  m = c.pad_vocab_to_multiple_of
  return -(-c.vocab_size // m) * m


def _require(cond: bool, msg: str) -> None:
  if not cond:
    raise ValueError(f"invalid model config: {msg}")


def _positive_int(c: Any, name: str) -> None:
  v = c[name]
  _require(isinstance(v, int) and not isinstance(v, bool) and v > 0, f"{name} must be a positive integer, got {v!r}")


def _one_of(c: Any, name: str, allowed: tuple[str, ...]) -> None:
  _require(c[name] in allowed, f"{name}={c[name]!r} is not one of {allowed}")


def validate_model_config(c: Any) -> None:
  """Raises ValueError naming the field and the constraint for every impossible combination.

  Runs in `Transformer.__post_init__`, i.e. before anything is traced or compiled.
  """
  unknown = set(c.keys()) - set(base_model_config().keys())
  _require(not unknown, f"unknown fields {sorted(unknown)}; the schema is moe_jax.config.base_model_config()")
  missing = set(base_model_config().keys()) - set(c.keys())
  _require(not missing, f"missing fields {sorted(missing)} (a config saved before they existed: fill them with "
           "moe_jax.config.complete_model_config)")
  for name in (
      "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
      "num_attention_heads", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
      "n_routed_experts", "num_experts_per_tok", "n_group", "topk_group", "moe_layer_freq",
  ):  # fmt: skip
    _positive_int(c, name)
  if c.q_lora_rank is not None:
    _positive_int(c, "q_lora_rank")
  for name in ("n_shared_experts", "first_k_dense_replace", "num_nextn_predict_layers"):
    v = c[name]
    _require(isinstance(v, int) and v >= 0, f"{name} must be a non-negative integer, got {v!r}")
  _require(c.first_k_dense_replace <= c.num_hidden_layers,
           f"first_k_dense_replace={c.first_k_dense_replace} exceeds num_hidden_layers={c.num_hidden_layers}")
  _require(c.moe_layer_freq == 1, f"moe_layer_freq={c.moe_layer_freq}: only 1 is supported (every layer after "
           "first_k_dense_replace is MoE, as in all DeepSeek-V2/V3 releases)")
  _require(c.qk_rope_head_dim % 2 == 0, f"qk_rope_head_dim={c.qk_rope_head_dim} must be even (RoPE rotates pairs)")
  _one_of(c, "scoring_func", SCORING_FUNCS)
  _one_of(c, "topk_method", TOPK_METHODS)
  _one_of(c, "hidden_act", HIDDEN_ACTS)
  _one_of(c, "dtype", DTYPES)
  _one_of(c, "param_dtype", DTYPES)
  _one_of(c, "remat_policy", REMAT_POLICIES)
  _one_of(c, "moe_dispatch", MOE_DISPATCHES)
  _one_of(c, "gmm_backend", GMM_BACKENDS)
  _one_of(c, "decode_attention", DECODE_ATTENTIONS)
  _one_of(c, "attention_impl", ATTENTION_IMPLS)
  _one_of(c, "attention_type", ATTENTION_TYPES)
  kv = c.num_key_value_heads
  if c.attention_type == "gqa":
    _require(isinstance(kv, int) and not isinstance(kv, bool) and kv > 0 and c.num_attention_heads % kv == 0,
             f"attention_type='gqa' needs num_key_value_heads dividing num_attention_heads={c.num_attention_heads}, "
             f"got {kv!r}")
  else:
    _require(kv is None or kv == c.num_attention_heads,
             f"num_key_value_heads={kv!r} needs attention_type='gqa' (with {c.attention_type!r} every head has its "
             f"own key: leave it None or = num_attention_heads={c.num_attention_heads})")
  _positive_int(c, "attention_block_size")
  _positive_int(c, "pad_vocab_to_multiple_of")
  if c.index_n_heads is not None:
    _positive_int(c, "index_n_heads")
    _positive_int(c, "index_topk")
    _positive_int(c, "index_head_dim")
    _require(c.q_lora_rank is not None, "index_n_heads (DeepSeek Sparse Attention) needs q_lora_rank: the indexer "
             "reads the query latent c_Q")
    _require(c.index_head_dim % 2 == 0 and c.index_head_dim >= c.qk_rope_head_dim,
             f"index_head_dim={c.index_head_dim} must be even and >= qk_rope_head_dim={c.qk_rope_head_dim} (RoPE "
             "rotates its first qk_rope_head_dim dims)")
    _require(c.attention_type == "mla", f"index_n_heads selects tokens for MLA; attention_type={c.attention_type!r}")
  _one_of(c, "index_stage", INDEX_STAGES)
  _require(not c.attention_bias, "attention_bias=True is not supported (no DeepSeek release uses it)")
  _require(c.num_experts_per_tok <= c.n_routed_experts,
           f"num_experts_per_tok={c.num_experts_per_tok} > n_routed_experts={c.n_routed_experts}")
  _require(c.n_routed_experts % c.n_group == 0,
           f"n_routed_experts={c.n_routed_experts} is not divisible by n_group={c.n_group}")
  _require(c.topk_group <= c.n_group, f"topk_group={c.topk_group} > n_group={c.n_group}")
  if c.topk_method in ("noaux_tc", "group_limited_greedy"):
    per_group = c.n_routed_experts // c.n_group
    _require(c.topk_group * per_group >= c.num_experts_per_tok,
             f"topk_group={c.topk_group} groups of {per_group} experts (n_routed_experts/n_group) hold "
             f"{c.topk_group * per_group} selectable experts < num_experts_per_tok={c.num_experts_per_tok}")
    if c.topk_method == "noaux_tc":
      _require(per_group >= 2 or c.n_group == 1,
               f"noaux_tc scores a group by its top-2 experts: n_routed_experts/n_group={per_group} must be >= 2")
  _require(isinstance(c.lora_rank, int) and c.lora_rank >= 0, f"lora_rank={c.lora_rank!r} must be an integer >= 0")
  _require(c.lora_alpha > 0, f"lora_alpha={c.lora_alpha} must be > 0")
  _require(set(c.lora_targets) <= set(LORA_TARGETS) and (c.lora_rank == 0 or len(c.lora_targets) > 0),
           f"lora_targets={tuple(c.lora_targets)!r} must be a non-empty subset of {LORA_TARGETS}")
  _require(c.routed_scaling_factor > 0, f"routed_scaling_factor={c.routed_scaling_factor} must be > 0")
  _require(c.aux_loss_alpha >= 0, f"aux_loss_alpha={c.aux_loss_alpha} must be >= 0")
  _require(c.rms_norm_eps > 0, f"rms_norm_eps={c.rms_norm_eps} must be > 0")
  _require(c.rope_theta > 0, f"rope_theta={c.rope_theta} must be > 0")
  _require(c.capacity_factor > 0, f"capacity_factor={c.capacity_factor} must be > 0")
  _require(isinstance(c.ep_capacity_factor, (int, float)) and not isinstance(c.ep_capacity_factor, bool),
           f"ep_capacity_factor={c.ep_capacity_factor!r} must be a number (<= 0: buffers never overflow)")
  rs = c.rope_scaling
  if rs is not None:
    _require(rs.get("type") in ROPE_SCALING_TYPES,
             f"rope_scaling.type={rs.get('type')!r} is not one of {ROPE_SCALING_TYPES}")
    for name in ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow"):
      _require(name in rs and rs[name] is not None and rs[name] > 0, f"rope_scaling.{name} must be > 0")
    _require(rs.beta_fast > rs.beta_slow, f"rope_scaling.beta_fast={rs.beta_fast} must exceed beta_slow={rs.beta_slow}")


def yarn_mscale(factor: float, mscale: float) -> float:
  """YaRN's attention temperature 0.1*mscale*ln(s) + 1 (1 when s <= 1), as DeepSeek's code computes it."""
  return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def softmax_scale(c: Any) -> float:
  """1/sqrt(d_h + d_h^R), times mscale(s, mscale_all_dim)^2 under YaRN (DeepSeek-V2 report sec. 2.1; official code)."""
  scale = (c.qk_nope_head_dim + c.qk_rope_head_dim) ** -0.5
  rs = c.rope_scaling
  if rs is not None and rs.get("mscale_all_dim"):
    m = yarn_mscale(rs.factor, rs.mscale_all_dim)
    scale *= m * m
  return scale


def uses_indexer(c: Any) -> bool:
  """DeepSeek Sparse Attention (V3.2): a lightning indexer picks the tokens MLA attends to."""
  return c.get("index_n_heads") is not None


def kv_heads(c: Any) -> int:
  """Key/value heads of mha/gqa attention (MLA's keys come from one shared latent)."""
  return c.num_key_value_heads if c.attention_type == "gqa" else c.num_attention_heads


def n_moe_layers(c: Any) -> int:
  return c.num_hidden_layers - c.first_k_dense_replace


def mtp_block_is_moe(c: Any) -> bool:
  """MTP block k sits at layer index num_hidden_layers + k - 1 in the checkpoint, so it is MoE like the deep layers."""
  return c.num_hidden_layers >= c.first_k_dense_replace
