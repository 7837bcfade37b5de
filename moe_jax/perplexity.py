"""Perplexity and bits per byte of a trained model on a text or jsonl file.

    python -m moe_jax.perplexity --checkpoint=/tmp/moe_jax_default --data=notes.txt [--json]
    python -m moe_jax.perplexity --checkpoint=/tmp/run --data=docs.jsonl --text_field=text --seq_len=128

A .jsonl file is one document per line (its `--text_field`); any other file is one document. Each document is
scored after <bos> in windows of --seq_len tokens (default: the model's max_position_embeddings), every token
a target once (moe_jax.inference.scoring).
"""

from __future__ import annotations

import json
import sys

from absl import app, flags, logging

from moe_jax.cli import fail, load_model_or_exit
from moe_jax.host_memory import keep_host_memory
from moe_jax.platforms import prefer_cpu_without_accelerators
from moe_jax.inference.scoring import evaluate_perplexity

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Training workdir, or hf:DIR with its tokenizer.json.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")
_DATA = flags.DEFINE_string("data", None, "A text file (one document) or .jsonl file (one document per line).")
_TEXT_FIELD = flags.DEFINE_string("text_field", "text", "The jsonl field holding the text.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", None, "Tokens per window (default: max_position_embeddings).")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Windows per forward pass.")
_JSON = flags.DEFINE_bool("json", False, "Print one JSON object.")


flags.register_validator("batch_size", lambda v: v >= 1, "--batch_size must be >= 1")
flags.register_validator("seq_len", lambda v: v is None or v >= 1, "--seq_len must be >= 1 (omit it for the default)")


def read_documents(path: str, text_field: str) -> list[bytes]:
  """The documents of `path`; raises ValueError naming file:line for a bad JSON line, and for a file with no text."""
  if not path.endswith(".jsonl"):
    with open(path, "rb") as f:
      docs = [f.read()]
  else:
    docs = []
    with open(path, "rb") as f:
      for n, line in enumerate(f, 1):
        if not line.strip():
          continue
        try:
          obj = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
          raise ValueError(f"{path}:{n}: not valid JSON ({e})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get(text_field), str):
          fields = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
          raise ValueError(f"{path}:{n}: no string field {text_field!r} (fields: {fields})")
        docs.append(obj[text_field].encode())
  if not any(docs):
    raise ValueError(f"{path} holds no text to score (perplexity needs at least one token)")
  return docs


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  prefer_cpu_without_accelerators()  # no plugin noise before jax falls back to the CPU
  keep_host_memory()  # before XLA's threads first allocate: no page faults per step
  logging.set_verbosity(logging.WARNING)
  try:
    texts = read_documents(_DATA.value, _TEXT_FIELD.value)
  except (OSError, ValueError) as e:
    fail(e)
  model = load_model_or_exit(_CHECKPOINT.value, _STEP.value)
  if model.tokenizer is None:
    raise app.UsageError(f"{_CHECKPOINT.value} carries no tokenizer moe_jax can read; use a training workdir")
  tok = model.tokenizer
  docs = [[tok.bos_id] + tok.encode(t).tolist() for t in texts]
  log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
  result = evaluate_perplexity(model.variables, model.config, docs, sum(map(len, texts)),
                               seq_len=_SEQ_LEN.value or model.config.max_position_embeddings,
                               batch_size=_BATCH.value, log=None if _JSON.value else log)
  result = {"checkpoint": model.description, "data": _DATA.value, **result}
  if _JSON.value:
    print(json.dumps(result))
  else:
    print(f"{result['documents']} documents, {result['tokens']:,} tokens, {result['bytes']:,} bytes: "
          f"perplexity {result['perplexity']:.3f}, {result['bits_per_byte']:.4f} bits/byte")


if __name__ == "__main__":
  flags.mark_flags_as_required(["checkpoint", "data"])
  app.run(main)
