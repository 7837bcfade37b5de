"""Tiny random transformers DeepSeek models saved locally (no downloads), for parity and loading tests."""

import numpy as np
import torch
from transformers import (DeepseekV2Config, DeepseekV2ForCausalLM, DeepseekV3Config, DeepseekV3ForCausalLM,
                          DeepseekV32Config, DeepseekV32ForCausalLM)

COMMON = dict(vocab_size=96, hidden_size=48, intermediate_size=80, moe_intermediate_size=20, num_hidden_layers=3,
              num_attention_heads=4, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12,
              n_shared_experts=1, first_k_dense_replace=1, max_position_embeddings=64, initializer_range=0.1)
YARN = dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=16, beta_fast=32,
            beta_slow=1, mscale=0.707, mscale_all_dim=0.707)


def make_v3(path, *, q_lora_rank=24, yarn=True, seed=0, **kw):
  torch.manual_seed(seed)
  args = dict(COMMON, q_lora_rank=q_lora_rank, n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2,
              norm_topk_prob=True, routed_scaling_factor=2.5)
  args.update(kw)
  args["rope_parameters"] = YARN if yarn else dict(rope_type="default", rope_theta=10000.0)
  model = DeepseekV3ForCausalLM(DeepseekV3Config(**args)).eval()
  with torch.no_grad():  # a non-zero selection bias, as after loss-free balancing
    for layer in model.model.layers[args["first_k_dense_replace"]:]:
      layer.mlp.gate.e_score_correction_bias.copy_(torch.randn(args["n_routed_experts"]) * 0.3)
  model.save_pretrained(path)
  return model


def make_v32(path, *, yarn=True, seed=0, index_topk=5, **kw):
  """A tiny DeepseekV32ForCausalLM: V3 plus the DSA indexer, with index_topk below the test's sequence length so
  the selection really cuts. Ties would let torch's and XLA's top-k pick different tokens (which one wins a tie is
  each library's own choice): the indexer's weights are scaled up so scores are far apart, and 16 heads make an
  exact tie at 0 (every head's ReLU zero for a key) rare (2^-16 per pair)."""
  torch.manual_seed(seed)
  args = dict(COMMON, q_lora_rank=24, n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2,
              norm_topk_prob=True, routed_scaling_factor=2.5, index_n_heads=16, index_head_dim=16,
              index_topk=index_topk)
  args.update(kw)
  args["rope_parameters"] = YARN if yarn else dict(rope_type="default", rope_theta=10000.0)
  model = DeepseekV32ForCausalLM(DeepseekV32Config(**args)).eval()
  with torch.no_grad():
    for layer in model.model.layers:
      for name in ("wq_b", "wk", "weights_proj"):
        getattr(layer.self_attn.indexer, name).weight.mul_(8.0)
      layer.self_attn.indexer.k_norm.bias.copy_(torch.randn(args["index_head_dim"]) * 0.5)
    for layer in model.model.layers[args["first_k_dense_replace"]:]:
      layer.mlp.gate.e_score_correction_bias.copy_(torch.randn(args["n_routed_experts"]) * 0.3)
  model.save_pretrained(path)
  return model


def make_v2(path, *, topk_method="greedy", q_lora_rank=None, yarn=True, seed=0, **kw):
  torch.manual_seed(seed)
  args = dict(COMMON, q_lora_rank=q_lora_rank, n_routed_experts=12, num_experts_per_tok=3, topk_method=topk_method,
              routed_scaling_factor=1.5, norm_topk_prob=False)
  if topk_method == "group_limited_greedy":
    args.update(n_group=4, topk_group=2)
  args.update(kw)
  args["rope_parameters"] = YARN if yarn else dict(rope_type="default", rope_theta=10000.0)
  model = DeepseekV2ForCausalLM(DeepseekV2Config(**args)).eval()
  model.save_pretrained(path)
  return model


def hf_logits(model, tokens: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    return model(torch.as_tensor(tokens)).logits.numpy()
