"""Attention: MLA against multi-head, grouped-query and multi-query attention -- quality and decode cache size.

DeepSeek-V2 report (arXiv 2405.04434), sec. 2.1 and Appendix D: MHA beats GQA and MQA on hard benchmarks (D.1,
7B dense models), and MLA beats MHA while caching far less per token (D.2; Table 1: MLA caches
(d_c + d_h^R) = 4.5 d_h values per token and layer, MHA 2 n_h d_h). At V3's dims that is 576 values against
32,768 for MHA with 128-dim keys: ~57x.

The baselines keep MLA's head dims (moe_jax.layers.attention.GQA: 4 heads, 48-dim keys of which 16 RoPE, 32-dim
values) and differ in what they cache: per token and layer MLA 32 + 16 = 48 values, MHA 4 x (48 + 32) = 320,
GQA (2 key/value heads) 160, MQA (1) 80. Attention parameters per layer: MLA 51,200, MHA 81,920, GQA 61,440,
MQA 51,200 (the whole models: within ~6% of each other; results.csv has the counts).
"""

from experiments.framework.presets import base_for
from experiments.framework.spec import Claim, Experiment


def variants(scale, base):
  del scale
  H = base.model.num_attention_heads
  return {
      "mla": {"model.attention_type": "mla"},
      "mha": {"model.attention_type": "mha"},
      "gqa": {"model.attention_type": "gqa", "model.num_key_value_heads": H // 2},
      "mqa": {"model.attention_type": "gqa", "model.num_key_value_heads": 1},
  }


PAPER = "DeepSeek-V2 (arXiv 2405.04434)"

EXPERIMENT = Experiment(
    name="attention",
    title="MLA vs multi-head vs grouped-query vs multi-query attention: quality and decode cache bytes",
    base=lambda scale: base_for(scale, "lfb_1b"),
    variants=variants,
    claims=(
        Claim("MLA is at least as good as MHA", "bits_per_byte", "mla", "mha", "lower",
              f"{PAPER} Appendix D.2: MLA better than MHA (small and large MoE models)"),
        Claim("MHA beats GQA", "bits_per_byte", "mha", "gqa", "lower",
              f"{PAPER} Appendix D.1: MHA > GQA > MQA on hard benchmarks (7B dense)"),
        Claim("GQA beats MQA", "bits_per_byte", "gqa", "mqa", "lower", f"{PAPER} Appendix D.1"),
        Claim("MLA caches far less than MHA per token", "cache_bytes_per_token", "mla", "mha", "lower",
              f"{PAPER} Table 1: 4.5 d_h vs 2 n_h d_h values per layer (57x less at V3's dims)"),
    ),
    metrics=("bits_per_byte", "eval_loss", "cache_bytes_per_token", "total_params", "active_params",
             "tokens_per_sec"),
    charts=("bits_per_byte", "cache_bytes_per_token"),
    curves=("ce",),
)
