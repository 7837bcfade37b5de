"""The Grain input pipeline: source -> (process shard) -> seeded shuffle, new order each epoch -> tokenize -> pack
-> shuffle rows within a window.

Rows are shuffled again after packing because a long document fills many consecutive rows: without it, one
batch would hold a handful of documents and its gradient would be needlessly noisy.

  it = train_rows(config.data, tokenizer, seed, process_index, process_count)   # endless, checkpointable
  row = next(it)            # {"tokens", "segment_ids", "positions", "loss_mask"}: int32 [seq_len]
  state = it.get_state()    # JSON-serialisable; it.set_state(state) continues at exactly the next row

Batching is done by the trainer (`BatchLoader`) so the number of live rows can follow the batch-size schedule
while the step function keeps one shape.
"""

from __future__ import annotations

import json
import os
from typing import Any

import grain
import numpy as np

from moe_jax.data.packing import PackIterDataset, Packer, tokenize_fn
from moe_jax.data.sources import build_source
from moe_jax.data.tokenizer import TOKENIZERS, BPETokenizer, ByteTokenizer, train_bpe


def saved_tokenizer_path(workdir: str | None) -> str | None:
  return os.path.join(workdir, "tokenizer.json") if workdir else None


def load_tokenizer(data_cfg: Any, workdir: str | None):
  """byte, a BPE from config.data.tokenizer_path or WORKDIR/tokenizer.json; None when a BPE is yet to be trained."""
  if data_cfg.tokenizer not in TOKENIZERS:
    raise ValueError(f"config.data.tokenizer={data_cfg.tokenizer!r} is not one of {TOKENIZERS}")
  if data_cfg.tokenizer == "byte":
    return ByteTokenizer()
  if data_cfg.tokenizer_path:
    return BPETokenizer.load(data_cfg.tokenizer_path)
  saved = saved_tokenizer_path(workdir)
  if saved and os.path.isfile(saved):
    return BPETokenizer.load(saved)
  return None


def load_or_train_tokenizer(data_cfg: Any, workdir: str | None, log=print):
  """`load_tokenizer`, or a new BPE trained here on the training split (and saved as WORKDIR/tokenizer.json)."""
  tok = load_tokenizer(data_cfg, workdir)
  if tok is not None:
    return tok
  saved = saved_tokenizer_path(workdir)
  docs = build_source(data_cfg, "train")
  texts = []
  for i in range(len(docs)):
    d = docs[i]
    if d["text"] is not None:
      texts.append(d["text"])
  if not texts:
    raise ValueError(f"config.data.source={data_cfg.source!r}: no text documents to train a BPE tokenizer on")
  log(f"training a {data_cfg.bpe_vocab_size}-token byte-level BPE on {len(texts)} documents "
      f"({sum(map(len, texts)) / 1e6:.1f} MB)")
  tok = train_bpe(texts, data_cfg.bpe_vocab_size)
  if saved:
    tok.save(saved)
  return tok


def _documents(data_cfg: Any, split: str, process_index: int, process_count: int) -> grain.MapDataset:
  source = build_source(data_cfg, split)
  ds = grain.MapDataset.source(source)
  if process_count > 1:
    ds = ds[process_index::process_count]
  return ds


READ_AHEAD_BYTES = 256 << 20  # tokenised documents held ahead of the packer, at most (int32 ids)


def read_options(data_cfg: Any) -> grain.ReadOptions:
  """Grain's read-ahead sized by bytes: as many documents as fit READ_AHEAD_BYTES at the largest document size
  (4 bytes per id, at most one id per byte), instead of Grain's default of 500 documents whatever their size."""
  docs = READ_AHEAD_BYTES // (4 * data_cfg.max_document_bytes)
  return grain.ReadOptions(num_threads=min(16, os.cpu_count() or 1), prefetch_buffer_size=int(min(max(docs, 4), 500)))


def train_rows(data_cfg: Any, tokenizer, seed: int, process_index: int = 0,
               process_count: int = 1) -> grain.DatasetIterator:
  """Endless packed training rows for this process; a new shuffle of the documents every epoch."""
  ds = _documents(data_cfg, "train", process_index, process_count)
  pass_length = len(ds)
  ds = ds.shuffle(seed=seed).repeat(None).map(tokenize_fn(tokenizer, data_cfg.max_document_bytes))
  rows = PackIterDataset(ds.to_iter_dataset(read_options(data_cfg)), data_cfg.seq_len, pass_length)
  if data_cfg.shuffle_window > 1:
    rows = grain.experimental.WindowShuffleIterDataset(rows, window_size=data_cfg.shuffle_window, seed=seed + 1)
  return iter(rows)


def eval_rows(data_cfg: Any, tokenizer, process_index: int = 0, process_count: int = 1):
  """(rows, held-out byte count, packer counters): one ordered pass over this process's validation documents.

  The byte count is that of the documents actually used (skipped ones excluded), so bits per byte compare
  with a compressor run on the same documents.
  """
  ds = _documents(data_cfg, "validation", process_index, process_count).map(
      tokenize_fn(tokenizer, data_cfg.max_document_bytes))
  used = []

  def fetch():
    if len(used) == len(ds):
      return None
    used.append(ds[len(used)])
    return used[-1]

  packer = Packer(data_cfg.seq_len, fetch)
  rows = []
  while (row := packer.next_row()) is not None:
    rows.append(row)
  nbytes = sum(item["nbytes"] if item["nbytes"] is not None else len(tokenizer.decode(item["ids"][1:]))
               for item in used if item["skip"] is None)
  return rows, nbytes, dict(packer.counters)


def validation_texts(data_cfg: Any) -> list[bytes]:
  """The raw bytes of the validation documents that have text (for the gzip/xz baselines)."""
  source = build_source(data_cfg, "validation")
  return [d["text"] for d in (source[i] for i in range(len(source))) if d["text"] is not None]


ROW_KEYS = ("tokens", "segment_ids", "positions", "loss_mask")


def stack_rows(rows: list[dict], batch_size: int, seq_len: int) -> dict:
  """[batch_size, seq_len] int32 arrays per key; rows past len(rows) are padding (segment 0)."""
  batch = {k: np.zeros((batch_size, seq_len), np.int32) for k in ROW_KEYS}
  for r, row in enumerate(rows):
    for k in ROW_KEYS:
      batch[k][r] = row[k]
  return batch


class BatchLoader:
  """Stacks `live_rows` rows into a [batch_size, T] batch (the remaining rows are padding, segment 0).

  `get_state()` is the row iterator's position right after the batch most recently returned; the trainer
  saves it with the train state of the step that consumed that batch (grain.checkpoint.CheckpointHandler).
  """

  def __init__(self, rows: grain.DatasetIterator, batch_size: int, seq_len: int):
    self.rows, self.batch_size, self.seq_len = rows, batch_size, seq_len
    self.state_after_last = rows.get_state()

  def next_batch(self, live_rows: int) -> dict:
    if not 1 <= live_rows <= self.batch_size:
      raise ValueError(f"live_rows={live_rows} not in [1, {self.batch_size}]")
    batch = stack_rows([next(self.rows) for _ in range(live_rows)], self.batch_size, self.seq_len)
    self.state_after_last = self.rows.get_state()
    return batch

  # The protocol of grain.checkpoint.CheckpointHandler for non-DatasetIterator items: bytes in and out.
  def get_state(self) -> bytes:
    return json.dumps(self.state_after_last).encode()

  def set_state(self, state: bytes) -> None:
    self.rows.set_state(json.loads(state))
    self.state_after_last = self.rows.get_state()

  def start_prefetch(self) -> None:  # called by grain's handler after restore
    pass

  def counters(self) -> dict:
    return packer_counters(self.rows)


def packer_counters(it: grain.DatasetIterator) -> dict:
  """Documents read / skipped (by reason) / split, rows and padding, from the packer under `it`."""
  while not hasattr(it, "counters"):
    it = it._parent  # noqa: SLF001 - grain iterators keep their parent here
  return it.counters
