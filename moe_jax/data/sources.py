"""Document sources: random-access lists of documents for Grain, and the deterministic train/validation split.

Every source is a sequence of documents addressed by index; `source[i]` returns a dict
  {"key": str, "text": bytes | None, "tokens": int32 array | None, "skip": str | None}
with exactly one of text/tokens set, or `skip` naming why the document is unusable (counted by the packer,
never a crash). Keys are stable names ("relative/path.py", "file.jsonl:17") used for the split.

Kinds (config.data.source):
  embedded     the running interpreter's standard library: sysconfig stdlib, *.py, without test/, tests/,
               site-packages (12.6 MB, 799 files on Python 3.11)
  text         files matching config.data.paths globs, one document per file (UTF-8); a file larger than
               config.data.max_document_bytes is several documents ("path#k"), cut at line ends, so memory
               follows the piece, not the file. A corpus of one file is cut into ~100 pieces (>= 4 KiB), so that
               some can be held out
  jsonl        JSON lines; the document is the string at config.data.text_field
  sft_jsonl    JSON lines of conversations for fine-tuning, {"prompt", "response"} or {"messages": [{"role",
               "content"}, ...]}, rendered in a plain chat format (`render_conversation`); the loss covers only
               the assistant's tokens (the documents carry `parts`, the packed rows a `loss_mask`)
  parquet      Parquet files; the document is the string column config.data.text_field (needs pyarrow)
  array_record ArrayRecord files of pre-tokenised documents, one record = little-endian int32 token ids

The split: a document is held out when hash(key) falls in the lowest `validation_fraction` of the hash range
(SHA-1, stable across machines and Python versions), never by position, so adding files does not move others.
When that holds out nothing (a corpus of a few documents), the document with the lowest hash is held out.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import sysconfig
from typing import Any, Sequence

import numpy as np

SOURCES = ("embedded", "text", "jsonl", "sft_jsonl", "parquet", "array_record")
SPLITS = ("train", "validation")
_EXCLUDED_DIRS = ("test", "tests", "site-packages")


def is_validation(key: str, fraction: float) -> bool:
  h = int.from_bytes(hashlib.sha1(key.encode("utf-8")).digest()[:8], "big")
  return h < fraction * 2**64


def embedded_corpus_files() -> list[tuple[str, str]]:
  """(relative path, absolute path) of the stdlib's *.py files, sorted by relative path."""
  root = sysconfig.get_paths()["stdlib"]
  out = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if d not in _EXCLUDED_DIRS)
    for f in filenames:
      if f.endswith(".py"):
        path = os.path.join(dirpath, f)
        out.append((os.path.relpath(path, root), path))
  return sorted(out)


def _expand_globs(patterns: Sequence[str], what: str) -> list[str]:
  if not patterns:
    raise ValueError(f"config.data.paths is empty: the {what} source needs at least one path or glob")
  files = []
  for pattern in patterns:
    matched = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
    matched = [m for m in matched if os.path.isfile(m)]
    if not matched:
      raise FileNotFoundError(f"config.data.paths: {pattern!r} matches no file")
    files.extend(matched)
  return files


def _text_doc(key: str, data: bytes) -> dict:
  try:
    data.decode("utf-8")
  except UnicodeDecodeError:
    return {"key": key, "text": None, "tokens": None, "skip": "undecodable"}
  if not data:
    return {"key": key, "text": None, "tokens": None, "skip": "empty"}
  return {"key": key, "text": data, "tokens": None, "skip": None}


def _cut(f, pos: int, size: int, window: int) -> int:
  """Where a piece boundary near byte `pos` falls: after the first newline in [pos, pos + window), else at the
  first UTF-8 character start from pos. Pieces k and k+1 agree on their boundary without reading each other."""
  if pos <= 0 or pos >= size:
    return min(max(pos, 0), size)
  f.seek(pos)
  data = f.read(window)
  nl = data.find(b"\n")
  if nl >= 0:
    return pos + nl + 1
  i = 0
  while i < len(data) and (data[i] & 0xC0) == 0x80:  # UTF-8 continuation byte
    i += 1
  return pos + i


class FileSource:
  """One document per file (the embedded corpus and plain-text globs), or per piece of `piece_bytes` of a larger
  file: piece k covers [cut(k M), cut((k+1) M)) with `_cut`'s window M/4 < M, so no piece is empty or straddled."""

  def __init__(self, files: Sequence[tuple[str, str]], piece_bytes: int = 1 << 20):
    self.piece_bytes = piece_bytes
    self.pieces: list[tuple[str, str, int, int]] = []  # (key, path, piece, pieces in the file)
    for key, path in files:
      n = max(1, -(-os.path.getsize(path) // piece_bytes))
      self.pieces += [(key if n == 1 else f"{key}#{k}", path, k, n) for k in range(n)]

  def keys(self) -> list[str]:
    return [p[0] for p in self.pieces]

  def __len__(self) -> int:
    return len(self.pieces)

  def __getitem__(self, i: int) -> dict:
    key, path, k, n = self.pieces[i]
    with open(path, "rb") as f:
      if n == 1:
        return _text_doc(key, f.read())
      size, m = os.fstat(f.fileno()).st_size, self.piece_bytes
      start, end = _cut(f, k * m, size, m // 4), _cut(f, (k + 1) * m, size, m // 4) if k + 1 < n else size
      f.seek(start)
      return _text_doc(key, f.read(max(end - start, 0)))


class JsonlSource:
  """One document per line of JSON-lines files; line offsets are indexed once, lines parsed on access."""

  def __init__(self, files: Sequence[str], text_field: str):
    self.text_field = text_field
    self.index: list[tuple[int, int, int]] = []  # (file number, byte offset, line number)
    self.files = list(files)
    for fi, path in enumerate(self.files):
      with open(path, "rb") as f:
        data = f.read()
      starts = np.concatenate([[0], np.flatnonzero(np.frombuffer(data, np.uint8) == ord("\n")) + 1])
      for line_no, start in enumerate(starts):
        if start < len(data) and data[start:start + 1] not in (b"\n", b"\r"):
          self.index.append((fi, int(start), line_no + 1))

  def keys(self) -> list[str]:
    return [f"{self.files[fi]}:{ln}" for fi, _, ln in self.index]

  def __len__(self) -> int:
    return len(self.index)

  def __getitem__(self, i: int) -> dict:
    fi, start, line_no = self.index[i]
    key = f"{self.files[fi]}:{line_no}"
    with open(self.files[fi], "rb") as f:
      f.seek(start)
      line = f.readline()
    try:
      record = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
      return {"key": key, "text": None, "tokens": None, "skip": "bad_json"}
    return self._document(key, record)

  def _document(self, key: str, record: Any) -> dict:
    value = record.get(self.text_field) if isinstance(record, dict) else None
    if value is None:
      return {"key": key, "text": None, "tokens": None, "skip": "missing_field"}
    if not isinstance(value, str):
      return {"key": key, "text": None, "tokens": None, "skip": "not_a_string"}
    return _text_doc(key, value.encode("utf-8"))


ROLES = {"system": "System", "user": "User", "assistant": "Assistant"}


def render_conversation(record: Any) -> list[tuple[bytes, bool]] | str:
  """The SFT chat format: [(text, trained)] parts, or the skip reason.

    {"prompt": P, "response": R}        ->  "User: P\n\nAssistant: " (context)  R (trained)
    {"messages": [{"role", "content"}]}  ->  "System: ...\n\n", "User: ...\n\nAssistant: " (context), each
                                            assistant content (trained), "\n\n" between turns (context)
  Every trained part is followed by <bos> as its end-of-turn token (also trained: the model learns to stop, and
  generation stops on it); roles are system | user | assistant, and the last message must be the assistant's."""
  if not isinstance(record, dict):
    return "missing_field"
  if "messages" in record:
    msgs = record["messages"]
    if not isinstance(msgs, list) or not msgs:
      return "missing_field"
  elif "prompt" in record and "response" in record:
    msgs = [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["response"]}]
  else:
    return "missing_field"
  parts, context = [], ""
  for m in msgs:
    if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
      return "bad_message"
    if m["role"] == "assistant":
      if not m["content"]:
        return "empty"
      parts += [((context + "Assistant: ").encode("utf-8"), False), (m["content"].encode("utf-8"), True)]
      context = "\n\n"
    else:
      context += f"{ROLES[m['role']]}: {m['content']}\n\n"
  if not parts or msgs[-1]["role"] != "assistant":
    return "no_response"
  return parts


class SftJsonlSource(JsonlSource):
  """Conversations for supervised fine-tuning, one per JSON line (`render_conversation`): each document carries
  its `parts`, and only the assistant's parts are training targets."""

  def __init__(self, files: Sequence[str]):
    super().__init__(files, text_field="")

  def _document(self, key: str, record: Any) -> dict:
    parts = render_conversation(record)
    if isinstance(parts, str):
      return {"key": key, "text": None, "tokens": None, "skip": parts}
    return {"key": key, "text": b"".join(t for t, _ in parts), "tokens": None, "skip": None, "parts": parts}


class ParquetSource:
  """One document per row of a string column; rows are read one row group at a time (cached)."""

  def __init__(self, files: Sequence[str], text_field: str):
    import pyarrow.parquet as pq  # optional dependency, only needed for this source

    self.files, self.text_field = list(files), text_field
    self.groups: list[tuple[int, int, int]] = []  # (file number, row group, rows)
    for fi, path in enumerate(self.files):
      try:
        meta = pq.ParquetFile(path)
      except Exception as e:  # noqa: BLE001 - pyarrow's ArrowInvalid and OSError name neither the file nor the source
        raise ValueError(f"config.data.source='parquet': {path} is not a readable Parquet file "
                         f"({type(e).__name__}: {e})") from None
      if text_field not in meta.schema_arrow.names:
        raise ValueError(f"config.data.text_field={text_field!r} is not a column of {path} "
                         f"(columns: {meta.schema_arrow.names})")
      for g in range(meta.num_row_groups):
        self.groups.append((fi, g, meta.metadata.row_group(g).num_rows))
    self.ends = np.cumsum([n for _, _, n in self.groups])
    self._cache: tuple[int, list] | None = None

  def __len__(self) -> int:
    return int(self.ends[-1]) if len(self.ends) else 0

  def keys(self) -> list[str]:
    return [f"{self.files[fi]}:{g}:{r}" for fi, g, n in self.groups for r in range(n)]

  def __getitem__(self, i: int) -> dict:
    import pyarrow.parquet as pq

    gi = int(np.searchsorted(self.ends, i, side="right"))
    fi, g, _ = self.groups[gi]
    row = i - (int(self.ends[gi - 1]) if gi else 0)
    if self._cache is None or self._cache[0] != gi:
      table = pq.ParquetFile(self.files[fi]).read_row_group(g, columns=[self.text_field])
      self._cache = (gi, table.column(0).to_pylist())
    value = self._cache[1][row]
    key = f"{self.files[fi]}:{g}:{row}"
    if not isinstance(value, str):
      return {"key": key, "text": None, "tokens": None, "skip": "missing_field" if value is None else "not_a_string"}
    return _text_doc(key, value.encode("utf-8"))


class ArrayRecordSource:
  """Pre-tokenised documents: one ArrayRecord record = the document's token ids as little-endian int32."""

  def __init__(self, files: Sequence[str]):
    from grain.sources import ArrayRecordDataSource

    self.files = list(files)
    self.source = ArrayRecordDataSource(self.files)
    counts = [len(ArrayRecordDataSource([f])) for f in self.files]
    self._keys = [f"{f}:{r}" for f, n in zip(self.files, counts) for r in range(n)]

  def __len__(self) -> int:
    return len(self.source)

  def keys(self) -> list[str]:
    return self._keys

  def __getitem__(self, i: int) -> dict:
    record = self.source[i]
    key = self._keys[i]
    if len(record) % 4:
      return {"key": key, "text": None, "tokens": None, "skip": "bad_record"}
    tokens = np.frombuffer(record, "<i4").astype(np.int32)
    if tokens.size == 0:
      return {"key": key, "text": None, "tokens": None, "skip": "empty"}
    return {"key": key, "text": None, "tokens": tokens, "skip": None}


def write_array_record(path: str, documents: Sequence[Sequence[int]]) -> None:
  """Writes pre-tokenised documents in the format ArrayRecordSource reads."""
  from array_record.python.array_record_module import ArrayRecordWriter

  writer = ArrayRecordWriter(path, "group_size:1")
  for doc in documents:
    writer.write(np.asarray(doc, "<i4").tobytes())
  writer.close()


class Subset:
  """A fixed subset of a source's indices (one split)."""

  def __init__(self, source: Any, indices: Sequence[int]):
    self.source, self.indices = source, list(indices)

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, i: int) -> dict:
    return self.source[self.indices[i]]


def build_source(data_cfg: Any, split: str) -> Subset:
  """The documents of `split` ("train" | "validation") for config.data. Raises on missing or empty input."""
  if split not in SPLITS:
    raise ValueError(f"split={split!r} is not one of {SPLITS}")
  kind = data_cfg.source
  if kind == "embedded":
    source = FileSource(embedded_corpus_files(), data_cfg.max_document_bytes)
    keys = source.keys()
  elif kind == "text":
    paths = _expand_globs(data_cfg.paths, kind)
    files = [(os.path.relpath(p, os.path.commonpath(paths) if len(paths) > 1 else os.path.dirname(p)), p)
             for p in paths]
    piece = data_cfg.max_document_bytes
    if len(files) == 1:  # one file: cut it so that a share can be held out
      piece = min(piece, max(4096, -(-os.path.getsize(files[0][1]) // 100)))
    source = FileSource(files, piece)
    keys = source.keys()
  elif kind == "jsonl":
    source = JsonlSource(_expand_globs(data_cfg.paths, kind), data_cfg.text_field)
    keys = source.keys()
  elif kind == "sft_jsonl":
    source = SftJsonlSource(_expand_globs(data_cfg.paths, kind))
    keys = source.keys()
  elif kind == "parquet":
    source = ParquetSource(_expand_globs(data_cfg.paths, kind), data_cfg.text_field)
    keys = source.keys()
  elif kind == "array_record":
    source = ArrayRecordSource(_expand_globs(data_cfg.paths, kind))
    keys = source.keys()
  else:
    raise ValueError(f"config.data.source={kind!r} is not one of {SOURCES}")
  if not keys:
    raise ValueError(f"config.data.source={kind!r}: the corpus is empty (no documents found)")
  held_out = [is_validation(k, data_cfg.validation_fraction) for k in keys]
  if not any(held_out) and len(keys) > 1:  # too few documents for the fraction: hold out the lowest hash
    held_out[min(range(len(keys)), key=lambda i: hashlib.sha1(keys[i].encode("utf-8")).digest())] = True
  want_val = split == "validation"
  indices = [i for i, v in enumerate(held_out) if v == want_val]
  if not indices:
    raise ValueError(f"config.data.source={kind!r}: the {split} split is empty ({len(keys)} documents, "
                     f"validation_fraction={data_cfg.validation_fraction})")
  return Subset(source, indices)
