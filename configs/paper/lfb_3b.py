"""The Loss-Free Balancing paper's 3B model and run (Wang et al. 2024, arXiv 2408.15664, sec. 4.1 and Table 1):
hidden 1280, 10 heads, 11 MoE layers of 2 shared + 64 routed experts (top-6, granularity 4), sigmoid gate,
vocabulary 32,064; sequence 2,048, batch 1,728, 56,514 steps (200B tokens), multi-step LR 7.8e-4 -> 2.47e-4 ->
7.8e-5. The paper gives neither the standard FFN width the granularity divides nor the LR steps' positions: the
experts are 1,024 wide (1/4 of a 4,096-wide FFN), the width that gives the paper's 3B total, and the LR steps sit
at 80% and 90% of training, as in DeepSeekMoE's and DeepSeek LLM's multi-step schedules.

The paper's attention is multi-head (DeepSeekMoE's backbone): here `mha` with MLA's split head (64 no-RoPE +
64 RoPE query/key dims, 128 value dims: 8 x 128 = hidden). Parameters (jax.eval_shape, tests/test_paper_configs.py):
3.01B total, 0.46B activated per token.

Data from flags: --config.data.source=jsonl --config.data.paths="('/data/pile/train-*.jsonl',)" (a BPE of
32,064 ids is trained on the training split unless --config.data.tokenizer_path gives one).

Mesh: a TPU v5p-64 (32 chips) as data=4 x fsdp=8 holds the whole batch (54 sequences per chip): 85.7 GiB of
88.5 per chip (scripts/plan.py, as for lfb_1b.py; checked in tests/test_paper_configs.py). 8 x H100: one sequence
fits, 216 per device need gradient accumulation (not in the trainer yet).
"""

import ml_collections

from configs.paper import lfb_1b

STEPS = 56514


def get_config() -> ml_collections.ConfigDict:
  """The 1B run (lfb_1b.py) with the 3B model, batch, length and LR schedule."""
  config = lfb_1b.get_config()
  m = config.model
  m.hidden_size = 1280  # model width
  m.intermediate_size = 4096  # the standard FFN the granularity divides (unused: every layer is MoE)
  m.moe_intermediate_size = 1024  # 1/4 of 4096 (granularity 4)
  m.num_hidden_layers = 11  # 11 MoE layers
  m.num_attention_heads = 10  # 10 heads of 128
  config.data.batch_size = 1728  # the paper's batch (sequences)
  config.train.num_steps = STEPS  # 200B tokens
  config.train.learning_rate = 7.8e-4  # first LR step
  config.train.lr_final = 7.8e-4  # no cosine (= learning_rate): a multi-step schedule
  config.train.lr_tail = ((int(0.8 * STEPS), 2.47e-4), (int(0.9 * STEPS), 7.8e-5))  # at 80% and 90% of the steps
  return config
