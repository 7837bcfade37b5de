"""Parity with transformers' DeepseekV3ForCausalLM / DeepseekV2ForCausalLM / DeepseekV32ForCausalLM (an implementation nobody here wrote):
tiny random models saved with save_pretrained, loaded with moe_jax.interop.huggingface.load, logits compared in
float32 (max error relative to the largest logit <= 1e-4)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from hf_models import hf_logits, make_v2, make_v3, make_v32
from helpers import max_rel_err
from moe_jax.interop import huggingface
from moe_jax.layers.router import select_experts
from moe_jax.model import Transformer

pytestmark = pytest.mark.filterwarnings("ignore:.*holds no MTP layer")

CASES = {
    "v3_qlora_yarn": lambda p: make_v3(p),
    "v3_no_qlora_no_yarn": lambda p: make_v3(p, q_lora_rank=None, yarn=False),
    "v3_unnormalised": lambda p: make_v3(p, norm_topk_prob=False, routed_scaling_factor=1.0, seed=3),
    "v2_softmax_greedy": lambda p: make_v2(p),
    "v32_dsa_yarn": lambda p: make_v32(p),
    "v32_dsa_no_yarn": lambda p: make_v32(p, yarn=False, seed=2),
    "v2_group_limited_qlora": lambda p: make_v2(p, topk_method="group_limited_greedy", q_lora_rank=24, seed=1),
}


def _tokens(vocab, seed=0):
  return np.random.default_rng(seed).integers(0, vocab, size=(2, 24))


# Every case unrolled; the scanned (stacked) parameter layout on one V3 and one V2 case.
PARAMS = [(c, False) for c in sorted(CASES)] + [("v3_qlora_yarn", True), ("v2_softmax_greedy", True)]


@pytest.mark.parametrize("case,scan", PARAMS)
def test_logits_match_transformers(case, scan, tmp_path):
  hf = CASES[case](str(tmp_path))
  cfg, variables = huggingface.load(str(tmp_path), jnp.float32, scan_layers=scan)
  tokens = _tokens(cfg.vocab_size)
  logits, _ = jax.jit(Transformer(cfg).apply)(variables, jnp.asarray(tokens))
  assert max_rel_err(logits, hf_logits(hf, tokens)) <= 1e-4


def test_group_limit_and_bias_actually_change_routing(tmp_path):
  """The V3 parity case must exercise the features it claims: groups and bias alter the chosen experts."""
  hf = make_v3(str(tmp_path))
  cfg, variables = huggingface.load(str(tmp_path))
  layer = hf.model.layers[1]
  x = torch.randn(64, cfg.hidden_size)
  scores = jax.nn.sigmoid(jnp.asarray((x @ layer.mlp.gate.weight.detach().T).numpy()))[None]
  bias = jnp.asarray(variables["router"]["moe_layers_0"]["moe"]["router"]["e_score_correction_bias"])
  assert float(jnp.abs(bias).max()) > 0
  grouped, _ = select_experts(scores, bias, cfg)
  ungrouped_cfg = cfg.copy_and_resolve_references()
  ungrouped_cfg.n_group, ungrouped_cfg.topk_group = 1, 1
  ungrouped, _ = select_experts(scores, bias, ungrouped_cfg)
  unbiased, _ = select_experts(scores, None, cfg)
  same = lambda a, b: np.all(np.sort(np.asarray(a), -1) == np.sort(np.asarray(b), -1), axis=-1)
  assert not same(grouped, ungrouped).all(), "group limiting never changed a choice"
  assert not same(grouped, unbiased).all(), "the bias never changed a choice"
