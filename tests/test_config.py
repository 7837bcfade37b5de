"""Config validation: every impossible combination raises ValueError naming the field, before any tracing."""

import importlib

import pytest

from moe_jax.config import base_model_config, validate_model_config
from moe_jax.model import Transformer

BAD = [
    (dict(num_experts_per_tok=300), r"num_experts_per_tok=300 > n_routed_experts=256"),
    (dict(n_routed_experts=250), r"n_routed_experts=250 is not divisible by n_group=8"),
    (dict(topk_group=9), r"topk_group=9 > n_group=8"),
    (dict(topk_group=1, num_experts_per_tok=40), r"topk_group=1 groups of 32 experts .* < num_experts_per_tok=40"),
    (dict(qk_rope_head_dim=63), r"qk_rope_head_dim=63 must be even"),
    (dict(hidden_size=0), r"hidden_size must be a positive integer"),
    (dict(num_attention_heads=-2), r"num_attention_heads must be a positive integer"),
    (dict(scoring_func="relu"), r"scoring_func='relu' is not one of \('sigmoid', 'softmax'\)"),
    (dict(topk_method="aux"), r"topk_method='aux' is not one of"),
    (dict(remat_policy="some"), r"remat_policy='some' is not one of"),
    (dict(gmm_backend="cuda"), r"gmm_backend='cuda' is not one of"),
    (dict(moe_dispatch="drop"), r"moe_dispatch='drop' is not one of"),
    (dict(first_k_dense_replace=70), r"first_k_dense_replace=70 exceeds num_hidden_layers=61"),
    (dict(moe_layer_freq=2), r"moe_layer_freq=2: only 1 is supported"),
    (dict(attention_bias=True), r"attention_bias=True is not supported"),
    (dict(capacity_factor=0.0), r"capacity_factor=0.0 must be > 0"),
    (dict(q_lora_rank=0), r"q_lora_rank must be a positive integer"),
]


@pytest.mark.parametrize("overrides,message", BAD)
def test_invalid_combinations_raise_on_construction(overrides, message):
  cfg = base_model_config()
  for k, v in overrides.items():
    cfg[k] = v
  with pytest.raises(ValueError, match=message):
    Transformer(cfg)  # raises in __post_init__: nothing traced


def test_rope_scaling_checks():
  cfg = base_model_config()
  cfg.rope_scaling.type = "ntk"
  with pytest.raises(ValueError, match=r"rope_scaling.type='ntk' is not one of \('yarn',\)"):
    validate_model_config(cfg)
  cfg = base_model_config()
  cfg.rope_scaling.beta_slow = 64.0
  with pytest.raises(ValueError, match="beta_fast=32.0 must exceed beta_slow=64.0"):
    validate_model_config(cfg)


def test_unknown_field_is_rejected():
  cfg = base_model_config()
  cfg.unlock()
  cfg.n_experts = 8
  with pytest.raises(ValueError, match=r"unknown fields \['n_experts'\]"):
    validate_model_config(cfg)


@pytest.mark.parametrize("name", ["debug", "deepseek_v2_lite", "deepseek_v3"])
def test_shipped_configs_validate_and_comment_every_field(name):
  module = importlib.import_module(f"configs.{name}")
  validate_model_config(module.get_config().model)
  source = open(module.__file__).read()
  for line in source.splitlines():
    if line.strip().startswith("m.") and "=" in line:
      assert "#" in line, f"configs/{name}.py: field without a comment: {line.strip()}"
