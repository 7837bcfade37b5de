"""Config validation: every impossible combination raises ValueError naming the field, before any tracing."""

import importlib

import ml_collections
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


def test_every_unset_field_can_be_set_from_the_command_line():
  """ml_collections cannot override a plain None field from the command line ("Type NoneType ... is not
  supported"): every field that defaults to None is a typed placeholder, and the flags parse."""
  import os
  from absl import flags
  from ml_collections import config_flags
  from ml_collections.config_dict import FieldReference
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  argv = ["prog", "--config=" + os.path.join(repo, "configs", "default.py"), "--config.init_from=/runs/v3",
          "--config.model.index_n_heads=4", "--config.data.tokenizer_path=t.json", "--config.mesh.num_processes=2",
          "--config.mesh.coordinator_address=host:1234", "--config.mesh.process_id=1",
          "--config.model.num_key_value_heads=2"]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", flag_values=fv, sys_argv=argv)  # as absl.app.run parses sys.argv
  fv(argv)
  c = fv.config
  assert (c.init_from, c.model.index_n_heads, c.data.tokenizer_path, c.mesh.num_processes,
          c.mesh.coordinator_address, c.mesh.process_id, c.model.num_key_value_heads) == (
              "/runs/v3", 4, "t.json", 2, "host:1234", 1, 2)

  def untyped_nones(cfg, prefix=""):
    for name in cfg.keys():
      field = cfg._fields[name]  # noqa: SLF001
      if isinstance(field, ml_collections.ConfigDict):
        yield from untyped_nones(field, f"{prefix}{name}.")
      elif field is None or (isinstance(field, FieldReference) and field.get_type() is type(None)):
        yield prefix + name
  from configs import default
  # rope_scaling is a dict or None (no YaRN), set in a config file, not by one flag
  assert list(untyped_nones(default.get_config())) == ["model.rope_scaling"]
