"""How often the MTP module's draft is accepted: greedy speculative decoding from held-out prompts.

DeepSeek-V3 report sec. 5.4.3: decoding with the first MTP module as the drafter, the second token is accepted
85-90% of the time, ~1.8x tokens per step. Here every held-out document that is long enough gives one prompt (its
first `prompt_len` tokens, <bos> included); the model continues it greedily with speculative decoding
(`Generator`, temperature 0: a draft is accepted iff it is the main model's argmax, so the text is exactly what
plain greedy decoding writes) and the drafts accepted are counted over all prompts.
"""

from __future__ import annotations

from typing import Any, Sequence

from moe_jax.inference.generator import Generator


def speculative_acceptance(variables: Any, model_config: Any, docs: Sequence[Sequence[int]], *, prompt_len: int = 32,
                           max_new_tokens: int = 32, max_prompts: int = 16) -> dict:
  """{"acceptance_rate", "tokens_per_step", "drafted", "accepted", "prompts"} over up to `max_prompts` documents
  of at least prompt_len + 1 tokens (token id lists, <bos> first). Raises ValueError without an MTP module or
  without a long enough document."""
  if model_config.num_nextn_predict_layers < 1:
    raise ValueError("speculative acceptance needs an MTP module (num_nextn_predict_layers >= 1)")
  prompts = [list(map(int, d[:prompt_len])) for d in docs if len(d) > prompt_len][:max_prompts]
  if not prompts:
    raise ValueError(f"no held-out document has more than prompt_len={prompt_len} tokens")
  gen = Generator(variables, model_config, max_len=prompt_len + max_new_tokens)
  stats = gen.generate(prompts, max_new_tokens=max_new_tokens, speculative=True).stats
  return {"acceptance_rate": stats["acceptance_rate"], "tokens_per_step": stats["tokens_per_step"],
          "drafted": stats["drafted"], "accepted": stats["accepted"], "prompts": len(prompts)}
