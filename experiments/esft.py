"""Expert-Specialized Fine-Tuning against full fine-tuning and LoRA, at equal steps.

ESFT (Wang et al. 2024, "Let the Expert Stick to His Last", arXiv 2407.01906), on DeepSeek-V2-Lite: tuning only the
experts most relevant to a task (by average gate score, ESFT-Gate, or token selection ratio, ESFT-Token) matches or
beats full fine-tuning on the task, beats LoRA, keeps general ability far better, and trains far fewer parameters.
Here: the default model (configs/default.py, trained on the standard library without its tests) fine-tuned on a
shifted domain -- the standard library's own test/ files -- with each method; the task is held-out bits per byte on
test/ files, forgetting is held-out bits per byte on the default corpus's validation split before and after.

The base model is a normal training workdir, BASE_WORKDIR (scripts/esft_experiment.sh trains it first:
python -m moe_jax.train --config=configs/default.py --workdir=experiments/runs/esft_base); --config.init_from
names another.
"""

import json
import os
import sys
import sysconfig

from configs import finetune
from experiments.framework.presets import ROOT
from experiments.framework.spec import Claim, Experiment

BASE_WORKDIR = os.path.join(ROOT, "experiments", "runs", "esft_base")
TASK_FILES = os.path.join(sysconfig.get_paths()["stdlib"], "test", "test_*.py")  # excluded by the default corpus


def base(scale):
  if scale != "cpu":
    raise ValueError("esft runs at --scale=cpu only (the default model); fine-tune a published checkpoint with "
                     "configs/finetune.py for larger scales")
  c = finetune.get_config()
  c.init_from = BASE_WORKDIR  # the default model's workdir
  c.finetune.method = "full"  # each variant sets its method
  c.finetune.esft_threshold = 0.35  # ~3 of 8 experts per layer: ESFT's few-experts regime at top-2 of 8
  c.finetune.esft_sample_batches = 8  # 16K tokens of task data for the relevance
  c.finetune.lora_rank = 8  # LoRA on every attention projection and every routed expert
  c.finetune.general_eval = True  # forgetting: the default corpus's held-out split, before and after
  c.data.source = "text"  # the stdlib's test/test_*.py files, one document each
  c.data.paths = (TASK_FILES,)
  c.data.tokenizer = "bpe"
  c.data.tokenizer_path = os.path.join(BASE_WORKDIR, "tokenizer.json")  # the base model's tokenizer
  c.data.seq_len = 128  # as the base model was trained
  c.data.batch_size = 16  # 2,048 token slots per step
  c.train.num_steps = 150  # ~0.3M token slots per run
  c.train.log_every = 10  # curves
  c.train.eval_every = 0  # the final evaluation covers the whole held-out split
  c.train.warmup_steps = 10  # linear warm-up
  c.train.lr_decay_start = 10  # cosine to 10% from there
  c.train.learning_rate = 1e-3  # one LR for every method (a small model; ESFT's paper also shares one per task)
  c.train.lr_final = 1e-4
  c.train.tensorboard = False
  c.checkpoint.every = 50  # a killed sweep loses at most 50 steps of a run
  c.checkpoint.keep = 1
  return c


def variants(scale, base_cfg):
  del scale, base_cfg
  return {m: {"finetune.method": m} for m in ("full", "esft_gate", "esft_token", "lora")}


PAPER = "ESFT (arXiv 2407.01906)"

EXPERIMENT = Experiment(
    name="esft",
    title="fine-tuning on a shifted domain: full vs ESFT-Gate vs ESFT-Token vs LoRA (task, forgetting, parameters)",
    base=base,
    variants=variants,
    claims=(
        Claim("ESFT-Gate matches or beats full fine-tuning on the task", "bits_per_byte", "esft_gate", "full", "lower",
              f"{PAPER} Table 2: task average 51.0 (ESFT-Gate) vs 50.8 (FFT) on V2-Lite"),
        Claim("ESFT-Token matches or beats full fine-tuning on the task", "bits_per_byte", "esft_token", "full",
              "lower", f"{PAPER} Table 2: 51.7 (ESFT-Token) vs 50.8 (FFT)"),
        Claim("ESFT-Gate forgets less than full fine-tuning", "general_bits_per_byte", "esft_gate", "full", "lower",
              f"{PAPER} Table 2: general average 60.6 (ESFT-Gate) vs 58.8 (FFT), 61.5 before"),
        Claim("ESFT-Token forgets less than full fine-tuning", "general_bits_per_byte", "esft_token", "full", "lower",
              f"{PAPER} Table 2: 61.5 (ESFT-Token) vs 58.8 (FFT)"),
        Claim("ESFT-Gate beats LoRA on the task", "bits_per_byte", "esft_gate", "lora", "lower",
              f"{PAPER} Table 2: 51.0 (ESFT-Gate) vs 44.9 (LoRA)"),
        Claim("ESFT trains far fewer parameters than full fine-tuning", "trainable_params", "esft_gate", "full",
              "lower", f"{PAPER} sec. 5: ~75-95% fewer trained parameters"),
    ),
    metrics=("bits_per_byte", "general_bits_per_byte", "general_bits_per_byte_before", "trainable_params",
             "optimizer_state_bytes", "tokens_per_sec"),
    charts=("bits_per_byte", "general_bits_per_byte"),
    curves=("ce",),
)


def base_task_bits_per_byte(init_from: str = BASE_WORKDIR) -> dict:
  """The base model's held-out bits per byte on the task split, before any fine-tuning (the sweep's reference)."""
  import jax.numpy as jnp
  from moe_jax.data import eval_rows
  from moe_jax.model import Transformer
  from moe_jax.restore import load_workdir
  from moe_jax.sharding import make_mesh, rules_of
  from moe_jax.training.evaluate import evaluate, token_byte_lengths
  from moe_jax.training.state import create_train_state
  from moe_jax.training.step import make_eval_step
  cfg = base("cpu")
  loaded = load_workdir(init_from)
  rows, nbytes, _ = eval_rows(cfg.data, loaded.tokenizer, 0, 1)
  model, mesh, rules = Transformer(loaded.config), make_mesh(cfg.mesh), rules_of(cfg.mesh)
  _, shardings, _ = create_train_state(model, cfg.train, mesh, rules, 0)
  ev = evaluate(make_eval_step(model, mesh, rules, shardings), loaded.variables["params"],
                loaded.variables.get("router", {}), rows, cfg.data.batch_size,
                jnp.asarray(token_byte_lengths(loaded.tokenizer)))
  assert ev["eval_bytes"] == nbytes
  return {"task_bits_per_byte_before": ev["bits_per_byte"], "task_eval_bytes": nbytes}


if __name__ == "__main__":  # python -m experiments.esft [BASE_WORKDIR]: the task's bits/byte before fine-tuning
  print(json.dumps(base_task_bits_per_byte(*sys.argv[1:2])))
