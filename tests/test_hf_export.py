"""Export to the published checkpoint format: a model trained here (debug config, a few optimiser steps with
loss-free bias updates) is saved with `huggingface.save`, loaded by transformers (code nobody here wrote), and
its logits equal ours; `load` reads back the identical parameters; bad inputs are refused before writing."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax.traverse_util import flatten_dict
from transformers import AutoModelForCausalLM

from configs import debug
from helpers import init_params, max_rel_err, random_bias, tiny_config
from moe_jax import restore
from moe_jax.interop import huggingface
from moe_jax.interop.safetensors_io import SafetensorsCheckpoint
from moe_jax.model import Transformer
from moe_jax.sharding import make_mesh, rules_of
from moe_jax.training.state import create_train_state
from moe_jax.training.step import make_train_step

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _trained(scan: bool):
  """Debug-config model after 3 AdamW steps (bias_update_rate > 0, so the routing biases moved too)."""
  c = debug.get_config()
  c.model.scan_layers = scan
  c.model.dtype = "float32"
  c.train.bias_update_rate = 0.01
  mesh, rules = make_mesh(c.mesh), rules_of(c.mesh)
  model = Transformer(c.model)
  state, shardings, tx = create_train_state(model, c.train, mesh, rules, seed=0)
  step = make_train_step(model, c, tx, c.train.num_steps, mesh, rules, shardings)
  rng = np.random.default_rng(0)
  B, T = 4, 32
  for _ in range(3):
    batch = {"tokens": rng.integers(0, c.model.vocab_size, (B, T)).astype(np.int32),
             "segment_ids": np.ones((B, T), np.int32), "positions": np.tile(np.arange(T, dtype=np.int32), (B, 1))}
    state, _ = step(state, batch)
  assert int(state.step) == 3
  variables = {"params": state.params, "router": state.router_bias}
  biases = [v for k, v in flatten_dict(variables, sep="/").items() if k.endswith("e_score_correction_bias")]
  assert max(float(jnp.abs(b).max()) for b in biases) > 0  # the balancing state is part of what is exported
  return c.model, model, variables


def _hf_logits(path, tokens):
  hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
  with torch.no_grad():
    return hf(torch.as_tensor(tokens)).logits.numpy()


@pytest.mark.parametrize("scan", [False, True])
def test_trained_model_round_trips_through_transformers(scan, tmp_path):
  if scan:  # the scanned (stacked) layout from a random init: one training compile per suite is enough
    cfg = tiny_config(dtype="float32", scan_layers=True, initializer_range=0.1)
    model, variables = init_params(cfg)
    variables = random_bias(variables)
  else:
    cfg, model, variables = _trained(scan)
  path = str(tmp_path / "export")
  files = huggingface.save(cfg, variables, path, max_shard_bytes=300_000)
  assert len(files) > 1 and os.path.exists(os.path.join(path, "model.safetensors.index.json"))
  hf_cfg = json.load(open(os.path.join(path, "config.json")))
  assert hf_cfg["model_type"] == "deepseek_v3" and hf_cfg["rope_scaling"]["type"] == "yarn"
  # The MTP module is checkpoint layer num_hidden_layers, with its own copies of the embedding and head.
  keys = set(SafetensorsCheckpoint(path).keys())
  L = cfg.num_hidden_layers
  assert {f"model.layers.{L}.eh_proj.weight", f"model.layers.{L}.embed_tokens.weight",
          f"model.layers.{L}.shared_head.head.weight", f"model.layers.{L}.mlp.experts.7.down_proj.weight"} <= keys
  tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 40))
  ours, _ = jax.jit(model.apply)(variables, jnp.asarray(tokens))
  assert max_rel_err(ours, _hf_logits(path, tokens)) <= 1e-4
  cfg2, variables2 = huggingface.load(path, jnp.float32, scan_layers=scan)
  assert cfg2.num_nextn_predict_layers == cfg.num_nextn_predict_layers
  jax.tree.map(np.testing.assert_array_equal, variables2, jax.tree.map(np.asarray, variables))
  if not scan:  # what `python -m moe_jax.generate --checkpoint=hf:DIR` loads
    loaded = restore.load_model("hf:" + path)
    assert loaded.tokenizer is None and loaded.config.vocab_size == cfg.vocab_size
    jax.tree.map(np.testing.assert_array_equal, loaded.variables, jax.tree.map(np.asarray, variables))


def test_v2_softmax_model_exports_as_deepseek_v2(tmp_path):
  cfg = tiny_config(scoring_func="softmax", topk_method="group_limited_greedy", norm_topk_prob=False,
                    routed_scaling_factor=1.5, num_nextn_predict_layers=0, q_lora_rank=None, dtype="float32",
                    initializer_range=0.1)
  model, variables = init_params(cfg)
  assert "router" not in variables  # softmax routing has no selection bias
  huggingface.save(cfg, variables, str(tmp_path), dtype=jnp.bfloat16)
  hf_cfg = json.load(open(tmp_path / "config.json"))
  assert hf_cfg["model_type"] == "deepseek_v2" and hf_cfg["q_lora_rank"] is None
  ckpt = SafetensorsCheckpoint(str(tmp_path))
  assert ckpt.get("model.embed_tokens.weight").dtype == jnp.bfloat16
  tokens = np.random.default_rng(2).integers(0, cfg.vocab_size, (2, 24))
  bf16_variables = jax.tree.map(lambda a: a.astype(jnp.bfloat16).astype(jnp.float32), variables)
  ours, _ = jax.jit(model.apply)(bf16_variables, jnp.asarray(tokens))
  assert max_rel_err(ours, _hf_logits(str(tmp_path), tokens)) <= 1e-4


def test_save_refuses_mismatched_params_and_unpublished_configs(tmp_path):
  cfg = tiny_config()
  _, variables = init_params(cfg)
  variables = random_bias(variables)
  broken = {**variables, "params": dict(variables["params"])}
  broken["params"].pop("final_norm")
  with pytest.raises(ValueError, match="missing .*final_norm/scale"):
    huggingface.save(cfg, broken, str(tmp_path / "a"))
  assert not os.path.exists(tmp_path / "a")
  odd = tiny_config(scoring_func="softmax")  # softmax scores with V3's noaux_tc selection: no published format
  with pytest.raises(ValueError, match="no published checkpoint format"):
    huggingface.save(odd, {}, str(tmp_path / "b"))
  huggingface.save(cfg, variables, str(tmp_path / "c"))
  with pytest.raises(FileExistsError, match="overwrite=True"):
    huggingface.save(cfg, variables, str(tmp_path / "c"))


def test_v32_sparse_attention_model_round_trips_and_generates_like_transformers(tmp_path):
  """A DSA model (index_topk below the lengths used) exports as deepseek_v32; transformers' logits and greedy
  generation (with its own indexer-key cache) equal ours, plain and MTP-speculative."""
  from transformers import DeepseekV32ForCausalLM

  from moe_jax.inference import Generator
  from moe_jax.interop.hf_layout import checkpoint_layout
  cfg = tiny_config(dtype="float32", initializer_range=0.1, index_n_heads=16, index_head_dim=16, index_topk=5)
  model, variables = init_params(cfg)
  variables = random_bias(variables)
  huggingface.save(cfg, variables, str(tmp_path))
  hf_cfg = json.load(open(tmp_path / "config.json"))
  assert hf_cfg["model_type"] == "deepseek_v32" and hf_cfg["index_topk"] == 5
  assert "model.layers.1.self_attn.indexer.weights_proj.weight" in checkpoint_layout(cfg)
  hf = DeepseekV32ForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
  tokens = np.random.default_rng(3).integers(0, cfg.vocab_size, (2, 20))
  ours, _ = jax.jit(model.apply)(variables, jnp.asarray(tokens))
  with torch.no_grad():
    assert max_rel_err(ours, hf(torch.as_tensor(tokens)).logits.numpy()) <= 1e-4
    want = hf.generate(torch.as_tensor(tokens[:1, :8]), max_new_tokens=12, do_sample=False)[0, 8:].tolist()
  gen = Generator(variables, cfg, max_len=32)
  assert gen.generate([tokens[0, :8].tolist()], max_new_tokens=12).tokens[0] == want
  assert gen.generate([tokens[0, :8].tolist()], max_new_tokens=12, speculative=True).tokens[0] == want
  cfg2, variables2 = huggingface.load(str(tmp_path), jnp.float32)
  assert cfg2.index_n_heads == 16 and cfg2.index_topk == 5
  jax.tree.map(np.testing.assert_array_equal, variables2, jax.tree.map(np.asarray, variables))
