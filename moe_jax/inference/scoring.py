"""Perplexity and bits per byte of a model on documents.

Each document is [<bos>] + its tokens, and every token after <bos> is a target exactly once: the document is
cut into windows of `seq_len` inputs, window j reading tokens jS .. jS+S-1 and predicting tokens jS+1 .. jS+S
(RoPE positions restart at 0 in every window, so no window exceeds the model's context). Routed experts run
dropless whatever the training dispatch was. Bits per byte divides
the summed -log2 p by the documents' UTF-8 bytes, as the trainer's held-out evaluation does.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from moe_jax.inference.generator import inference_config
from moe_jax.model import Transformer
from moe_jax.model.nll import token_nll
from moe_jax.model.variables import as_variables


def windows(docs: Sequence[Sequence[int]], seq_len: int):
  """Yields (inputs [S], targets [S], n_targets) per window; short windows are padded (targets beyond n unused)."""
  for doc in docs:
    doc = np.asarray(doc, np.int32)
    for start in range(0, len(doc) - 1, seq_len):
      chunk = doc[start:start + seq_len + 1]
      n = len(chunk) - 1
      inputs, targets = np.zeros(seq_len, np.int32), np.zeros(seq_len, np.int32)
      inputs[:n], targets[:n] = chunk[:-1], chunk[1:]
      yield inputs, targets, n


def evaluate_perplexity(variables: Any, model_config: Any, docs: Sequence[Sequence[int]], n_bytes: int, *,
                        seq_len: int, batch_size: int = 8, log: Callable[[str], None] | None = None) -> dict:
  """docs: token ids per document, <bos> first. Returns nll (nats per token), perplexity, bits_per_byte, counts.
  variables: {"params": ..., "router": ...} (or a params tree)."""
  model = Transformer(inference_config(model_config))  # dropless: a token's score never depends on the batch
  variables = as_variables(variables)

  @jax.jit
  def nll_sum(tokens_BT, targets_BT, mask_BT):
    logits_BTV, _ = model.apply(variables, tokens_BT, mask_BT.astype(jnp.int32), mtp=False)
    return jnp.sum(jnp.where(mask_BT, token_nll(logits_BTV, targets_BT), 0.0))

  rows = list(windows(docs, seq_len))
  total_nll, total_targets, t0 = 0.0, 0, time.time()
  n_batches = -(-len(rows) // batch_size)
  for b in range(n_batches):
    chunk = rows[b * batch_size:(b + 1) * batch_size]
    chunk += [(np.zeros(seq_len, np.int32), np.zeros(seq_len, np.int32), 0)] * (batch_size - len(chunk))
    tokens = np.stack([r[0] for r in chunk])
    targets = np.stack([r[1] for r in chunk])
    mask = np.arange(seq_len)[None, :] < np.asarray([r[2] for r in chunk])[:, None]
    total_nll += float(nll_sum(tokens, targets, mask))
    total_targets += int(mask.sum())
    if log and (b + 1 == n_batches or (b + 1) % max(1, n_batches // 10) == 0):
      log(f"perplexity: {b + 1}/{n_batches} batches, {total_targets:,} tokens, {time.time() - t0:.0f} s")
  nll = total_nll / max(total_targets, 1)
  return {"documents": len(docs), "tokens": total_targets, "bytes": n_bytes, "nll": nll,
          "perplexity": math.exp(min(nll, 50.0)), "bits_per_byte": total_nll / math.log(2) / max(n_bytes, 1)}
