"""Packing tokenised documents into fixed-length rows with segment ids and per-piece positions.

A row of length T holds whole documents back to back; `segment_ids` number them 1, 2, ... within the row (0 marks
padding) and `positions` restart at 0 for each, so with the model's segment mask no token attends across
documents. Each document is [<bos>, t_1, ..., t_n]; the loss predicts token i+1 from token i inside a segment,
so every t_j is a target exactly once.

Rules, in order, for the document at hand (its unplaced remainder):
  1. it fits in the row's free space: place it whole;
  2. it would fit in an empty row: pad the row out, emit it, start a new row (short documents are never split);
  3. it is longer than a row: fill the free space with a piece (if the space is at least MIN_PIECE tokens, else
     pad), emit the row and continue. The next piece repeats the previous piece's last token as its first, so
     no target is lost; such documents are counted as split.

`PackIterDataset` wraps this as a Grain IterDataset whose iterator state is (the parent iterator's state before
the current document, the offset into it, counters): small, JSON-serialisable and exact on restore.
"""

from __future__ import annotations

import collections
from typing import Any, Callable

import grain
import numpy as np

MIN_PIECE = 16


class NoUsableDocuments(ValueError):
  """A whole pass over the documents found none that could be used; the message holds the skip counters."""


class Packer:
  """Builds rows from documents given one at a time; `next_row()` pulls documents through `fetch`.

  `pass_length`: documents in one pass of the (endlessly repeated) source. If that many documents in a row are
  skipped, no document will ever be usable and NoUsableDocuments is raised instead of looping forever."""

  def __init__(self, seq_len: int, fetch: Callable[[], dict | None], pass_length: int = 0):
    if seq_len < MIN_PIECE:
      raise ValueError(f"config.data.seq_len={seq_len} must be >= {MIN_PIECE}")
    self.seq_len, self.fetch, self.pass_length = seq_len, fetch, pass_length
    self._skipped_in_a_row = 0
    self.doc: np.ndarray | None = None  # [<bos>, tokens...] of the current document
    self.mask: np.ndarray | None = None  # which of them are training targets (None: all)
    self.offset = 0  # first token of the current document not yet placed (with the 1-token overlap)
    self.counters: collections.Counter = collections.Counter()

  def _next_doc(self) -> bool:
    while True:
      item = self.fetch()
      if item is None:
        return False
      self.counters["documents_read"] += 1
      if item["skip"] is not None:
        self.counters[f"skipped_{item['skip']}"] += 1
        self._skipped_in_a_row += 1
        if self.pass_length and self._skipped_in_a_row >= self.pass_length:
          skips = {k: v for k, v in self.counters.items() if k.startswith("skipped_")}
          raise NoUsableDocuments(f"none of the {self.pass_length} documents of a full pass is usable (skipped: "
                                  f"{skips}); check config.data.source, paths and text_field")
        continue
      self._skipped_in_a_row = 0
      self.doc, self.mask, self.offset = item["ids"], item.get("mask"), 0
      return True

  def next_row(self) -> dict | None:
    """{"tokens", "segment_ids", "positions", "loss_mask"} int32 [T], or None when the documents are exhausted.
    loss_mask[i] = 1 when token i may be a target (every token of a plain document; a conversation's trained
    tokens); whether it is one is decided by its segment (moe_jax.training.loss)."""
    T = self.seq_len
    tokens, segs, pos = np.zeros(T, np.int32), np.zeros(T, np.int32), np.zeros(T, np.int32)
    loss_mask = np.zeros(T, np.int32)
    fill, seg = 0, 0
    while fill < T:
      if self.doc is None and not self._next_doc():
        break
      rest = self.doc[self.offset:]
      space = T - fill
      if len(rest) <= space:  # rule 1
        n, done = len(rest), True
      elif len(rest) <= T and fill > 0:  # rule 2
        break
      elif space >= MIN_PIECE or fill == 0:  # rule 3
        n, done = space, False
        if self.offset == 0:
          self.counters["documents_split"] += 1
      else:
        break
      seg += 1
      tokens[fill:fill + n], segs[fill:fill + n], pos[fill:fill + n] = rest[:n], seg, np.arange(n)
      loss_mask[fill:fill + n] = 1 if self.mask is None else self.mask[self.offset:self.offset + n]
      fill += n
      if done:
        self.doc = None
      else:
        self.offset += n - 1  # the next piece starts with this piece's last token (context, not a target)
    if fill == 0:
      return None
    self.counters["rows"] += 1
    self.counters["padding_tokens"] += T - fill
    return {"tokens": tokens, "segment_ids": segs, "positions": pos, "loss_mask": loss_mask}


class _PackIterator(grain.DatasetIterator):

  def __init__(self, parent: grain.DatasetIterator, seq_len: int, pass_length: int):
    super().__init__(parent)
    self._doc_state = parent.get_state()  # parent state before the current document was fetched
    self._packer = Packer(seq_len, self._fetch, pass_length)

  def _fetch(self):
    self._doc_state = self._parent.get_state()
    return next(self._parent, None)

  def __next__(self) -> dict:
    row = self._packer.next_row()
    if row is None:
      raise StopIteration
    return row

  @property
  def counters(self) -> dict:
    return dict(self._packer.counters)

  def get_state(self) -> dict:
    p = self._packer
    return {"parent": self._doc_state if p.doc is not None else self._parent.get_state(),
            "has_doc": p.doc is not None, "offset": int(p.offset), "counters": dict(p.counters)}

  def set_state(self, state: dict) -> None:
    p = self._packer
    self._parent.set_state(state["parent"])
    self._doc_state = state["parent"]
    p.doc, p.mask, p.offset = None, None, 0
    p.counters = collections.Counter(state["counters"])
    if state["has_doc"]:
      item = next(self._parent)
      p.doc, p.mask, p.offset = item["ids"], item.get("mask"), state["offset"]


class PackIterDataset(grain.IterDataset):
  """Rows of `seq_len` packed from a dataset of {"ids": int32 [n] (starting with <bos>), "skip": str | None};
  `pass_length` documents make one pass (see Packer)."""

  def __init__(self, parent: grain.IterDataset, seq_len: int, pass_length: int = 0):
    super().__init__(parent)
    self._seq_len, self._pass_length = seq_len, pass_length

  def __iter__(self) -> _PackIterator:
    return _PackIterator(self._parent.__iter__(), self._seq_len, self._pass_length)

  def __str__(self) -> str:
    return f"PackIterDataset(seq_len={self._seq_len})"


def _encode(tokenizer: Any, text: bytes, max_bytes: int) -> np.ndarray:
  """Token ids of `text`, encoded in pieces of at most ~max_bytes cut after a newline (or at a UTF-8 character
  start), so a tokenizer's working memory follows the piece, not a record of any size."""
  if len(text) <= max_bytes:
    return tokenizer.encode(text)
  parts, start = [], 0
  while start < len(text):
    end = min(start + max_bytes, len(text))
    if end < len(text):
      nl = text.rfind(b"\n", start + max_bytes // 2, end)
      end = nl + 1 if nl >= 0 else end
      while end > start + 1 and end < len(text) and (text[end] & 0xC0) == 0x80:
        end -= 1
    parts.append(tokenizer.encode(text[start:end]))
    start = end
  return np.concatenate(parts)


def tokenize_fn(tokenizer: Any, max_bytes: int = 1 << 20) -> Callable[[dict], dict]:
  """Maps a source document to {"ids": [<bos>, ...], "skip", "nbytes"}; pre-tokenised documents pass through.
  Texts longer than `max_bytes` are encoded piece by piece (`_encode`). A conversation (a document with `parts`)
  also gets "mask": which ids are training targets, and "nbytes" counts the trained parts' bytes only."""

  def fn(doc: dict) -> dict:
    if doc["skip"] is not None:
      return {"ids": None, "skip": doc["skip"], "nbytes": 0}
    if doc.get("parts") is not None:  # a conversation: only the trained parts (and their end <bos>) are targets
      ids, mask = [np.asarray([tokenizer.bos_id], np.int32)], [np.zeros(1, bool)]
      for text, trained in doc["parts"]:
        part = _encode(tokenizer, text, max_bytes).astype(np.int32)
        if trained:
          part = np.concatenate([part, [tokenizer.bos_id]]).astype(np.int32)
        ids.append(part)
        mask.append(np.full(len(part), trained))
      nbytes = sum(len(text) for text, trained in doc["parts"] if trained)
      return {"ids": np.concatenate(ids), "mask": np.concatenate(mask), "skip": None, "nbytes": nbytes}
    if doc["tokens"] is not None:
      ids, nbytes = doc["tokens"], None
      if ids.min() < 0 or ids.max() >= tokenizer.vocab_size:
        return {"ids": None, "skip": "token_out_of_range", "nbytes": 0}
    else:
      ids, nbytes = _encode(tokenizer, doc["text"], max_bytes), len(doc["text"])
      if ids.size == 0:
        return {"ids": None, "skip": "empty", "nbytes": 0}
    return {"ids": np.concatenate([[tokenizer.bos_id], ids]).astype(np.int32), "skip": None, "nbytes": nbytes}

  return fn
