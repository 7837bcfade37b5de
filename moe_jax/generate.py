"""Generate from a trained model, plain or with MTP speculative decoding.

    python -m moe_jax.generate --checkpoint=/tmp/moe_jax_default --prompt="def main(" --max_new_tokens=64
    python -m moe_jax.generate --checkpoint=hf:/path/to/DeepSeek-V3 --prompt="def main(" --speculative --json

--checkpoint: a training workdir (its newest checkpoint, or --step) or hf:DIR (published format). --prompt is
encoded after <bos> with the run's tokenizer, or a published checkpoint's tokenizer.json (its <bos> named by
tokenizer_config.json); --prompt_ids are used as given. --json prints one object:
tokens (generated ids), text (when a tokenizer is known), finish_reason and the statistics (tokens_per_step,
acceptance_rate when speculative, seconds; the first call's seconds include compilation).
"""

from __future__ import annotations

import json
import sys

from absl import app, flags, logging

from moe_jax.cli import load_model_or_exit
from moe_jax.host_memory import keep_host_memory
from moe_jax.platforms import prefer_cpu_without_accelerators
from moe_jax.inference import Generator, Sampling

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Training workdir, or hf:DIR for a published-format checkpoint.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step of a workdir (default: the newest).")
_PROMPT = flags.DEFINE_string("prompt", None, "Prompt text (needs the run's tokenizer).")
_PROMPT_IDS = flags.DEFINE_list("prompt_ids", None, "Prompt token ids, comma-separated.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 64, "Tokens to generate at most.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "Sampling temperature; 0 is greedy.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Keep the k most likely tokens (0: all).")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass (1: all).")
_STOP = flags.DEFINE_list("stop_ids", [], "Token ids that end generation (emitted, then stop).")
_SPECULATIVE = flags.DEFINE_bool("speculative", False, "Draft with the MTP module, verify with the main model.")
_NAIVE = flags.DEFINE_bool("naive_attention", False, "Rebuild per-head K/V instead of weight absorption (checking).")
_MAX_LEN = flags.DEFINE_integer("max_len", None, "Longest sequence allowed (default: max_position_embeddings).")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_JSON = flags.DEFINE_bool("json", False, "Print one JSON object.")


def _prompt_ids(tokenizer) -> list[int]:
  if (_PROMPT.value is None) == (_PROMPT_IDS.value is None):
    raise app.UsageError("give exactly one of --prompt and --prompt_ids")
  if _PROMPT_IDS.value is not None:
    try:
      return [int(t) for t in _PROMPT_IDS.value]
    except ValueError as e:
      raise app.UsageError(f"--prompt_ids must be comma-separated integers: {e}") from None
  if tokenizer is None:
    raise app.UsageError("--prompt needs a tokenizer, and this checkpoint has none moe_jax can read; "
                         "pass --prompt_ids")
  return [tokenizer.bos_id] + tokenizer.encode(_PROMPT.value.encode()).tolist()


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  prefer_cpu_without_accelerators()  # no plugin noise before jax falls back to the CPU
  keep_host_memory()  # before XLA's threads first allocate: no page faults per step
  logging.set_verbosity(logging.WARNING)  # Orbax logs its restore at INFO
  model = load_model_or_exit(_CHECKPOINT.value, _STEP.value)
  prompt = _prompt_ids(model.tokenizer)
  gen = Generator(model.variables, model.config, max_len=_MAX_LEN.value, absorb=not _NAIVE.value)
  result = gen.generate([prompt], max_new_tokens=_MAX_NEW.value,
                        sampling=Sampling(_TEMPERATURE.value, _TOP_K.value, _TOP_P.value),
                        stop_tokens=[int(t) for t in _STOP.value], speculative=_SPECULATIVE.value, seed=_SEED.value)
  tokens = result.tokens[0]
  out = {"checkpoint": model.description, "prompt_ids": prompt, "tokens": tokens,
         "finish_reason": result.finish_reason[0], **result.stats}
  if model.tokenizer is not None:
    out["text"] = model.tokenizer.decode(tokens).decode("utf-8", errors="replace")
  if _JSON.value:
    print(json.dumps(out))
  else:
    print(f"[{model.description}] {len(tokens)} tokens, {result.finish_reason[0]}, "
          f"{result.stats['tokens_per_step']:.2f} tokens per main-model step"
          + (f", acceptance {result.stats['acceptance_rate']:.1%}" if _SPECULATIVE.value else ""), file=sys.stderr)
    print(out.get("text", " ".join(map(str, tokens))))
  sys.stdout.flush()


if __name__ == "__main__":
  flags.mark_flag_as_required("checkpoint")
  app.run(main)
