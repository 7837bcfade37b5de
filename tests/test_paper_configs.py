"""The paper-scale configs (configs/paper/) against the papers' parameter counts (jax.eval_shape: nothing is
allocated), their stated architectures, and the planner's verdict on the mesh each file names."""

import importlib

import pytest

from moe_jax import planning
from moe_jax.model.params import count_params
from moe_jax.sharding import rules_of
from moe_jax.training.config import validate_config

# (total, activated) the papers give, and the tolerance of the rounded figure ("1B", "3B", "~2.0B / ~0.3B").
PAPERS = {"lfb_1b": (1.0e9, None, 0.06), "lfb_3b": (3.0e9, None, 0.06), "deepseekmoe_2b": (2.0e9, 0.3e9, 0.06)}


@pytest.mark.parametrize("name", sorted(PAPERS))
def test_parameter_counts_match_the_papers(name):
  cfg = importlib.import_module(f"configs.paper.{name}").get_config()
  counts = count_params(cfg.model)
  total, active, tol = PAPERS[name]
  assert abs(counts["total_params"] / total - 1) < tol, counts["total_params"]
  if active:
    assert abs(counts["active_params"] / active - 1) < tol + 0.04, counts["active_params"]


def test_stated_architectures():
  lfb = importlib.import_module("configs.paper.lfb_1b").get_config().model
  assert (lfb.hidden_size, lfb.num_attention_heads, lfb.num_hidden_layers, lfb.first_k_dense_replace) == (1024, 8, 9, 0)
  assert (lfb.n_shared_experts, lfb.n_routed_experts, lfb.num_experts_per_tok, lfb.vocab_size) == (2, 64, 6, 32064)
  assert lfb.scoring_func == "sigmoid" and lfb.attention_type == "mha"
  ds = importlib.import_module("configs.paper.deepseekmoe_2b").get_config()
  m = ds.model
  assert (m.hidden_size, m.num_hidden_layers, m.n_shared_experts, m.n_routed_experts, m.num_experts_per_tok) == \
      (1280, 9, 1, 63, 7)
  # total expert parameters 16 standard FFNs, activated 2 (each expert a quarter of one)
  assert (m.n_routed_experts + m.n_shared_experts) / 4 == 16 and (m.num_experts_per_tok + m.n_shared_experts) / 4 == 2
  assert ds.data.seq_len * ds.data.batch_size * ds.train.num_steps == pytest.approx(100e9, rel=0.05)


@pytest.mark.parametrize("name", sorted(PAPERS))
def test_configs_validate_once_given_data(name):
  cfg = importlib.import_module(f"configs.paper.{name}").get_config()
  with pytest.raises(ValueError, match="needs config.data.paths"):
    validate_config(cfg)
  cfg.data.paths = ("/data/train-*.jsonl",)
  validate_config(cfg)


@pytest.mark.parametrize("name", sorted(PAPERS))
def test_the_whole_batch_fits_a_v5p_64_as_noted(name):
  cfg = importlib.import_module(f"configs.paper.{name}").get_config()
  assert (cfg.mesh.data, cfg.mesh.fsdp) == (-1, 8)  # 32 chips: data=4
  row = planning.plan(cfg.model, {"data": 4, "fsdp": 8, "expert": 1, "tensor": 1}, rules_of(cfg.mesh),
                      seq_len=cfg.data.seq_len, global_batch=cfg.data.batch_size, accelerator="tpu-v5p", mfu=0.4)
  assert row["fits_batch"] and row["max_seqs_per_device"] >= cfg.data.batch_size // 32
