"""Held-out evaluation: loss, perplexity, bits per byte, global MaxVio; and the compressor baselines.

bits per byte = sum over held-out targets of -log2 p(target) / bytes of those targets. Every document starts
with <bos>, so its targets are exactly its tokens and the byte count is the document's UTF-8 size: the same
bytes `gzip -9` and `xz -9e` compress (the validation documents concatenated) in `compressor_bits_per_byte`.
"""

from __future__ import annotations

import lzma
import math
import zlib
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from moe_jax.data.pipeline import stack_rows
from moe_jax.training.balancing import max_violation


def compressor_bits_per_byte(texts: list[bytes]) -> dict:
  """gzip -9 (DEFLATE, zlib level 9) and xz -9e (LZMA2 preset 9 | extreme) on the concatenated texts."""
  data = b"".join(texts)
  n = max(len(data), 1)
  gz = zlib.compressobj(9, zlib.DEFLATED, 31)  # wbits 31: the gzip container, as `gzip -9` writes
  gz_bytes = len(gz.compress(data) + gz.flush())
  xz_bytes = len(lzma.compress(data, format=lzma.FORMAT_XZ, preset=9 | lzma.PRESET_EXTREME))
  return {"gzip_bits_per_byte": 8 * gz_bytes / n, "xz_bits_per_byte": 8 * xz_bytes / n, "bytes": len(data)}


def token_byte_lengths(tokenizer: Any) -> np.ndarray:
  """[V] int32: bytes each token id stands for (0 for <bos>)."""
  lengths = np.zeros(tokenizer.vocab_size, np.int32)
  for i in range(tokenizer.vocab_size):
    if i != tokenizer.bos_id:
      lengths[i] = len(tokenizer.decode_token(i))
  return lengths


def batches_of(rows: list[dict], batch_size: int, limit: int | None = None, count: int | None = None):
  """Rows stacked into [batch_size, T] batches, the last one padded with segment-0 rows; with `count`, exactly
  that many batches (all-padding ones after the rows run out: every process must run the same steps)."""
  n = len(rows) if limit is None else min(len(rows), limit * batch_size)
  T = len(rows[0]["tokens"])
  count = -(-n // batch_size) if count is None else count
  for i in range(count):
    yield stack_rows(rows[i * batch_size:min((i + 1) * batch_size, n)], batch_size, T)


def _agreed_count(n_rows: int, batch_size: int, max_batches: int | None) -> int:
  """Batches every process runs: the most any process needs (collectives must match across processes)."""
  count = -(-n_rows // batch_size)
  if max_batches is not None:
    count = min(count, max_batches)
  if jax.process_count() > 1:
    count = int(np.max(multihost_utils.process_allgather(np.asarray(count))))
  return count


def evaluate(eval_step, params, bias, rows: list[dict], batch_size: int, token_bytes, max_batches: int | None = None,
             put=None) -> dict:
  """Sums the eval step over this process's rows (all of them when max_batches is None), `batch_size` rows per
  process and step; `put` turns the host batch into global arrays (multi-process)."""
  nll, targets, nbytes, load = 0.0, 0.0, 0.0, None
  count = _agreed_count(len(rows), batch_size, max_batches)
  for batch in batches_of(rows, batch_size, max_batches, count):
    out = eval_step(params, bias, batch if put is None else put(batch), token_bytes)
    nll += float(out["nll_sum"])
    targets += float(out["targets"])
    nbytes += float(out["bytes"])
    l = np.asarray(out["expert_load"], np.float64)
    load = l if load is None else load + l
  loss = nll / max(targets, 1.0)
  result = {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0)),
            "bits_per_byte": nll / math.log(2) / max(nbytes, 1.0), "eval_tokens": int(targets),
            "eval_bytes": int(nbytes)}
  if load is not None and load.shape[0]:
    vio = np.asarray(max_violation(load))
    result["max_vio_global"] = float(vio.mean())
    result["max_vio_global_per_layer"] = vio.tolist()
  return result
