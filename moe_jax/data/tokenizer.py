"""Tokenizers that need no downloads: raw bytes, or a byte-level BPE trained locally with `tokenizers`.

Both reserve one id for <bos>, which starts every document so that its first real token is predicted too:
bits per byte then count every byte of the held-out text exactly once.

  byte  ids 0..255 are the bytes, 256 is <bos>; vocab_size 257
  bpe   byte-level BPE (GPT-2 style pre-tokenisation, lossless on any UTF-8); <bos> is id 0. Trained on the
        training split and saved as WORKDIR/tokenizer.json (reused on resume), or loaded from
        config.data.tokenizer_path.
"""

from __future__ import annotations

import os
from typing import Iterable, Protocol

import numpy as np

TOKENIZERS = ("byte", "bpe")
BOS = "<bos>"


class Tokenizer(Protocol):
  vocab_size: int
  bos_id: int

  def encode(self, text: bytes) -> np.ndarray: ...

  def decode(self, ids: Iterable[int]) -> bytes: ...

  def decode_token(self, i: int) -> bytes: ...


class ByteTokenizer:
  vocab_size = 257
  bos_id = 256

  def encode(self, text: bytes) -> np.ndarray:
    return np.frombuffer(text, np.uint8).astype(np.int32)

  def decode(self, ids: Iterable[int]) -> bytes:
    return bytes(int(i) for i in ids if 0 <= int(i) < 256)

  def decode_token(self, i: int) -> bytes:
    return bytes([i]) if 0 <= i < 256 else b""


class BPETokenizer:
  """A `tokenizers` byte-level BPE: ours (<bos> = "<bos>") or a published checkpoint's (`load_published`)."""

  def __init__(self, tokenizer, bos_token: str = BOS):
    self._tok = tokenizer
    self.vocab_size = tokenizer.get_vocab_size()
    bos = tokenizer.token_to_id(bos_token)
    if bos is None:
      raise ValueError(f"tokenizer has no {bos_token} token; train one with moe_jax.data.tokenizer.train_bpe")
    self.bos_id, self.bos_token = bos, bos_token
    self._special = {i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special}
    self._byte_strings: list[bytes] | None = None

  @classmethod
  def load(cls, path: str) -> "BPETokenizer":
    from tokenizers import Tokenizer as HFTokenizer

    if not os.path.isfile(path):
      raise FileNotFoundError(f"tokenizer file {path!r} does not exist")
    directory = os.path.dirname(path)
    if os.path.basename(path) == "tokenizer.json" and os.path.isfile(os.path.join(directory, "tokenizer_config.json")):
      return load_published(directory)  # a published checkpoint's: its <bos> is tokenizer_config.json's bos_token
    return cls(HFTokenizer.from_file(path))

  def save(self, path: str) -> None:
    tmp = path + ".tmp"
    self._tok.save(tmp)
    os.replace(tmp, path)  # atomic: a killed run never leaves half a tokenizer behind

  def encode(self, text: bytes) -> np.ndarray:
    return np.asarray(self._tok.encode(text.decode("utf-8"), add_special_tokens=False).ids, np.int32)

  def decode(self, ids: Iterable[int]) -> bytes:
    return b"".join(self.decode_token(int(i)) for i in ids)

  def decode_token(self, i: int) -> bytes:
    """The exact bytes of one token (a token may hold part of a UTF-8 character, so no text decoding)."""
    if self._byte_strings is None:
      inverse = _byte_level_inverse()

      def token_bytes(j: int) -> bytes:
        t = self._tok.id_to_token(j)
        if t is None or j in self._special:
          return b""
        if all(ch in inverse for ch in t):  # byte-level symbols (ours, DeepSeek's)
          return bytes(inverse[ch] for ch in t)
        return self._tok.decode([j], skip_special_tokens=False).encode("utf-8")  # an added plain-text token

      self._byte_strings = [token_bytes(j) for j in range(self.vocab_size)]
    # ids past the tokenizer's are the model's padding rows (DeepSeek-V3: 129,280 rows, 128,815 tokens)
    return self._byte_strings[i] if 0 <= i < self.vocab_size else b""


def load_published(directory: str) -> BPETokenizer | None:
  """A published checkpoint's tokenizer: DIR/tokenizer.json, with <bos> = tokenizer_config.json's `bos_token`
  (DeepSeek-V3: "<｜begin▁of▁sentence｜>"); None when DIR has no tokenizer.json. Raises ValueError when the
  config names no bos_token or the tokenizer lacks it."""
  import json  # noqa: PLC0415
  from tokenizers import Tokenizer as HFTokenizer  # noqa: PLC0415

  path = os.path.join(directory, "tokenizer.json")
  if not os.path.isfile(path):
    return None
  bos = None
  config_path = os.path.join(directory, "tokenizer_config.json")
  if os.path.isfile(config_path):
    with open(config_path) as f:
      bos = json.load(f).get("bos_token")
  bos = bos.get("content") if isinstance(bos, dict) else bos
  if not bos:
    raise ValueError(f"{config_path} names no bos_token; the model's documents start with one")
  return BPETokenizer(HFTokenizer.from_file(path), bos)


def save_published(tokenizer: "BPETokenizer", directory: str) -> list[str]:
  """Writes `tokenizer` as a published checkpoint carries it (tokenizer.json, and tokenizer_config.json naming
  its <bos>), so `load_published(directory)` returns the same ids. Returns the files written."""
  import json  # noqa: PLC0415

  tok_path, cfg_path = os.path.join(directory, "tokenizer.json"), os.path.join(directory, "tokenizer_config.json")
  tokenizer.save(tok_path)
  with open(cfg_path + ".tmp", "w") as f:
    json.dump({"bos_token": tokenizer.bos_token, "tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": False},
              f, indent=1)
  os.replace(cfg_path + ".tmp", cfg_path)
  return [tok_path, cfg_path]


def _byte_level_inverse() -> dict[str, int]:
  """GPT-2's byte -> printable character table, inverted (what ByteLevel pre-tokenisation maps bytes to)."""
  printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
  chars = printable[:]
  n = 0
  for b in range(256):
    if b not in printable:
      printable.append(b)
      chars.append(256 + n)
      n += 1
  return {chr(c): b for b, c in zip(printable, chars)}


def train_bpe(texts: Iterable[bytes], vocab_size: int) -> BPETokenizer:
  """A byte-level BPE with `vocab_size` ids (<bos> included) learned from `texts`."""
  from tokenizers import Tokenizer as HFTokenizer
  from tokenizers import decoders, models, pre_tokenizers, trainers

  if vocab_size < 257 + 1:
    raise ValueError(f"config.data.bpe_vocab_size={vocab_size} must be > 257 (256 byte symbols + <bos>)")
  tok = HFTokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS], show_progress=False,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator((t.decode("utf-8") for t in texts), trainer=trainer)
  return BPETokenizer(tok)
