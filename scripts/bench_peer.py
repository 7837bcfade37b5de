"""Times moe_jax's whole train step against transformers' eager-PyTorch DeepseekV3ForCausalLM on one config.

    python scripts/bench_peer.py [--config=configs/default.py] [--batch=32] [--seq_len=128] [--steps=5] [--json]

Both sides: the config's model with MTP off, float32, the same random batch of full rows, forward + backward +
AdamW, on this machine's CPU threads (torch uses all of them, as XLA does). transformers' model is built from
`hf_config_from_model`, i.e. the same architecture (MLA, shared + routed experts, group-limited sigmoid routing).
Prints ms/step and tokens/s for each and moe_jax's speed-up (>1: moe_jax is faster), measured in one run.
"""

from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from bench_common import train_step_on_random_rows  # noqa: E402
from moe_jax.interop.hf_config import hf_config_from_model  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", "configs/default.py", "Experiment config (its model is used).")
_BATCH = flags.DEFINE_integer("batch", None, "Rows per step (default: the config's).")
_SEQ = flags.DEFINE_integer("seq_len", None, "Tokens per row (default: the config's).")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed steps per side (after two warm-up steps).")
_JSON = flags.DEFINE_bool("json", False, "Print JSON rows instead of a table.")


def _time(step, steps: int) -> float:
  for _ in range(2):
    step()
  t0 = time.perf_counter()
  for _ in range(steps):
    step()
  return (time.perf_counter() - t0) / steps


def time_moe_jax(config, tokens: np.ndarray, steps: int) -> float:
  train_step, state, batch = train_step_on_random_rows(config, tokens)
  box = {"state": state}

  def step():
    box["state"], m = train_step(box["state"], batch)
    jax.block_until_ready(m)

  return _time(step, steps)


def time_transformers(config, tokens: np.ndarray, steps: int) -> float:
  import torch
  from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

  hf = hf_config_from_model(config.model)
  hf.pop("architectures", None)
  torch.manual_seed(0)
  model = DeepseekV3ForCausalLM(DeepseekV3Config(**hf)).train()
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
  ids = torch.as_tensor(tokens, dtype=torch.long)

  def step():
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)

  return _time(step, steps)


def main(argv):
  del argv
  config = _CONFIG.value.copy_and_resolve_references()
  config.model.num_nextn_predict_layers = 0
  config.model.dtype = config.model.param_dtype = "float32"
  B, T = _BATCH.value or config.data.batch_size, _SEQ.value or config.data.seq_len
  tokens = np.random.default_rng(0).integers(0, config.model.vocab_size, (B, T)).astype(np.int32)
  ours = time_moe_jax(config, tokens, _STEPS.value)
  theirs = time_transformers(config, tokens, _STEPS.value)
  import torch
  import transformers
  row = {"batch": B, "seq_len": T, "moe_jax_ms": 1000 * ours, "transformers_ms": 1000 * theirs,
         "moe_jax_tokens_per_sec": B * T / ours, "transformers_tokens_per_sec": B * T / theirs,
         "speedup": theirs / ours, "attention_impl": config.model.attention_impl, "gmm_backend": config.model.gmm_backend,
         "device": jax.devices()[0].device_kind, "jax": jax.__version__, "torch": torch.__version__,
         "transformers": transformers.__version__, "torch_threads": torch.get_num_threads()}
  if _JSON.value:
    print(json.dumps(row))
    return
  print(f"train step, {B} x {T} tokens, float32, MTP off ({row['device']}; jax {row['jax']}, torch {row['torch']}, "
        f"transformers {row['transformers']}, {row['torch_threads']} torch threads)")
  print(f"{'':<14} {'ms/step':>9} {'tokens/s':>10}")
  print(f"{'moe_jax':<14} {row['moe_jax_ms']:>9.0f} {row['moe_jax_tokens_per_sec']:>10,.0f}")
  print(f"{'transformers':<14} {row['transformers_ms']:>9.0f} {row['transformers_tokens_per_sec']:>10,.0f}")
  print(f"moe_jax speed-up: x{row['speedup']:.2f}")


if __name__ == "__main__":
  app.run(main)
