"""Base configs of the experiments: the CPU preset every experiment starts from, and the paper-scale configs.

The CPU preset is the default model (configs/default.py: MLA, a dense first layer, shared + fine-grained routed
experts, sigmoid routing, loss-free balancing plus the sequence-wise loss) made small enough that one run of 300
steps (~0.6M token slots) takes ~1.5 minutes on the 2-core CPU, so an experiment of 4-6 variants x 3 seeds
finishes in ~20-30 minutes. Routing is plain top-K (one expert group), as in the Loss-Free Balancing and
DeepSeekMoE papers' models; MTP is off except in the `mtp` experiment.
"""

from __future__ import annotations

import importlib
import os

import ml_collections

from configs import default

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PAPER_CONFIGS = os.path.join(ROOT, "configs", "paper")


def cpu_base() -> ml_collections.ConfigDict:
  c = default.get_config()
  m = c.model
  m.num_hidden_layers = 3  # 1 dense + 2 MoE layers
  m.n_routed_experts = 16  # routed experts per MoE layer
  m.num_experts_per_tok = 4  # top-4
  m.moe_intermediate_size = 64  # per-expert width (d/2): 4 routed + 1 shared = 320 activated FFN width
  m.n_shared_experts = 1  # one shared expert
  m.n_group = 1  # plain top-K (no group-limited routing), as the papers' small models
  m.topk_group = 1
  m.num_nextn_predict_layers = 0  # MTP off (the mtp experiment turns it on)
  c.data.batch_size = 16  # 2,048 token slots per step
  c.train.num_steps = 300  # ~0.6M token slots, ~70 s of training
  c.train.warmup_steps = 30  # linear warm-up
  c.train.lr_decay_start = 30  # cosine from the end of warm-up to the end
  c.train.log_every = 10  # metrics.jsonl rows: MaxVio_batch and the curves are sampled every 10 steps
  c.train.eval_every = 0  # the final evaluation covers the whole held-out split
  c.train.tensorboard = False  # metrics.jsonl is what the report reads
  c.checkpoint.every = 100  # a killed sweep loses at most 100 steps of a run
  c.checkpoint.keep = 1  # one checkpoint per run: 45 runs stay small on disk
  return c


def paper_base(name: str) -> ml_collections.ConfigDict:
  """configs/paper/<name>.py's get_config(); a clear error when it does not exist."""
  path = os.path.join(PAPER_CONFIGS, f"{name}.py")
  if not os.path.isfile(path):
    have = sorted(f[:-3] for f in os.listdir(PAPER_CONFIGS) if f.endswith(".py") and f != "__init__.py") \
        if os.path.isdir(PAPER_CONFIGS) else []
    raise ValueError(f"--scale=paper needs configs/paper/{name}.py, which does not exist yet (there are: {have})")
  return importlib.import_module(f"configs.paper.{name}").get_config()


def base_for(scale: str, paper: str) -> ml_collections.ConfigDict:
  """The CPU preset, or configs/paper/<paper>.py at --scale=paper."""
  return cpu_base() if scale == "cpu" else paper_base(paper)
