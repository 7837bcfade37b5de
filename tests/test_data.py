"""Data: packing rules and segment ids, every token a target once, iterator resume exactness, the sources,
the split, tokenizers, and the clear errors / counted skips for bad input."""

import collections
import json
import os

import ml_collections
import numpy as np
import pytest

from moe_jax.data import BatchLoader, build_source, eval_rows, load_or_train_tokenizer, packer_counters, train_rows
from moe_jax.data.packing import MIN_PIECE, Packer
from moe_jax.data.sources import embedded_corpus_files, is_validation, write_array_record
from moe_jax.data.tokenizer import ByteTokenizer, train_bpe
from moe_jax.training.config import base_data_config


def _packer(docs, T):
  items = iter([{"ids": np.asarray(d, np.int32), "skip": None} for d in docs])
  return Packer(T, lambda: next(items, None))


def _rows(packer):
  out = []
  while (r := packer.next_row()) is not None:
    out.append(r)
  return out


def _targets_per_doc(rows):
  """Rebuilds (first token of each segment piece, targets) from rows using the loss's rule."""
  pieces = []
  for r in rows:
    seg, tok = r["segment_ids"], r["tokens"]
    for s in np.unique(seg[seg > 0]):
      idx = np.flatnonzero(seg == s)
      assert np.array_equal(idx, np.arange(idx[0], idx[-1] + 1)), "a segment must be contiguous"
      assert np.array_equal(r["positions"][idx], np.arange(len(idx))), "positions restart at 0 per piece"
      pieces.append(tok[idx])
  return pieces


def test_packing_short_docs_whole_long_docs_split_every_token_a_target_once():
  rng = np.random.default_rng(0)
  T = 32
  lengths = [5, 30, 3, 70, 17, 32, 33, 1, 100, 12]
  docs = [np.concatenate([[999], rng.integers(0, 50, n)]) for n in lengths]  # 999 = <bos>
  p = _packer(docs, T)
  rows = _rows(p)
  for r in rows:
    assert r["tokens"].shape == (T,)
  pieces = _targets_per_doc(rows)
  # Stitch pieces back: each piece after the first repeats the previous piece's last token.
  rebuilt, cur = [], None
  for piece in pieces:
    if piece[0] == 999:
      if cur is not None:
        rebuilt.append(cur)
      cur = list(piece)
    else:
      assert piece[0] == cur[-1]
      cur.extend(piece[1:])
  rebuilt.append(cur)
  assert [list(d) for d in docs] == rebuilt
  # Targets: (piece length - 1) per piece = the document's real tokens, exactly once.
  assert sum(len(x) - 1 for x in pieces) == sum(lengths)
  # Short documents (<= T with <bos>) are never split; longer ones are, and counted.
  whole = [len(x) for x in pieces if x[0] == 999]
  for n in lengths:
    if n + 1 <= T:
      assert n + 1 in whole
  assert p.counters["documents_split"] == sum(n + 1 > T for n in lengths)
  assert all(len(x) >= 2 for x in pieces)


def test_packing_min_piece_and_padding():
  T = 64
  docs = [np.arange(60), np.arange(200)]  # 4 free slots < MIN_PIECE: pad rather than start a 4-token piece
  rows = _rows(_packer(docs, T))
  assert (rows[0]["segment_ids"] == 0).sum() == T - 60 and T - 60 < MIN_PIECE
  assert rows[1]["segment_ids"][0] == 1 and rows[1]["tokens"][0] == 0


def _write_corpus(tmp_path, n=30, seed=0, max_words=400):
  rng = np.random.default_rng(seed)
  words = ["def", "return", "self", "import", "class", "x", "=", "(", ")", ":", "\n", "    ", "if", "for"]
  d = tmp_path / "corpus"
  d.mkdir(exist_ok=True)
  for i in range(n):
    text = " ".join(rng.choice(words, size=rng.integers(20, max_words)))
    (d / f"f{i:03d}.txt").write_text(text)
  return d


def _data_cfg(**kw):
  d = base_data_config()
  d.tokenizer = "byte"
  d.seq_len = 64
  d.batch_size = 4
  d.validation_fraction = 0.2
  for k, v in kw.items():
    d[k] = v
  return d


def test_iterator_resume_is_exact_across_epochs(tmp_path):
  d = _data_cfg(source="text", paths=(str(_write_corpus(tmp_path, n=12, max_words=60)) + "/*.txt",))
  tok = ByteTokenizer()
  it = train_rows(d, tok, seed=3)
  states, rows = [], []
  for _ in range(150):  # several epochs of this small corpus
    states.append(it.get_state())
    rows.append(next(it))
  assert packer_counters(it)["documents_read"] > 3 * len(build_source(d, "train"))
  for k in (0, 1, 37, 99, 149):
    it2 = train_rows(d, tok, seed=3)
    it2.set_state(json.loads(json.dumps(states[k])))  # the state survives JSON (the checkpoint format)
    for j in range(k, min(k + 20, 150)):
      r = next(it2)
      for key in ("tokens", "segment_ids", "positions"):
        np.testing.assert_array_equal(r[key], rows[j][key])
  # Another epoch has another order; another seed another stream.
  other = train_rows(d, tok, seed=4)
  assert not all(np.array_equal(next(other)["tokens"], rows[j]["tokens"]) for j in range(5))


def test_batch_loader_pads_rows_and_saves_state(tmp_path):
  d = _data_cfg(source="text", paths=(str(_write_corpus(tmp_path)) + "/*.txt",))
  loader = BatchLoader(train_rows(d, ByteTokenizer(), 0), 4, 64)
  b = loader.next_batch(3)
  assert b["tokens"].shape == (4, 64)
  assert (b["segment_ids"][3] == 0).all() and (b["segment_ids"][:3] > 0).any()
  state = loader.get_state()
  nxt = loader.next_batch(4)
  loader2 = BatchLoader(train_rows(d, ByteTokenizer(), 0), 4, 64)
  loader2.set_state(state)
  np.testing.assert_array_equal(loader2.next_batch(4)["tokens"], nxt["tokens"])


def test_split_is_by_hash_of_key_and_stable():
  files = embedded_corpus_files()
  assert len(files) > 100 and all(k.endswith(".py") for k, _ in files)
  assert not any(part in ("test", "tests", "site-packages") for k, _ in files for part in k.split(os.sep)[:-1])
  held = [k for k, _ in files if is_validation(k, 0.05)]
  assert 0.02 < len(held) / len(files) < 0.09
  assert is_validation("a/b.py", 0.05) == is_validation("a/b.py", 0.05)
  # Nested: a larger fraction holds out a superset.
  assert set(held) <= {k for k, _ in files if is_validation(k, 0.2)}


def test_eval_rows_cover_every_validation_byte(tmp_path):
  d = _data_cfg(source="text", paths=(str(_write_corpus(tmp_path)) + "/*.txt",))
  tok = ByteTokenizer()
  rows, nbytes, counters = eval_rows(d, tok)
  src = build_source(d, "validation")
  assert nbytes == sum(len(src[i]["text"]) for i in range(len(src)))
  targets = 0
  for r in rows:
    s = r["segment_ids"]
    targets += int(np.sum((s[:-1] != 0) & (s[:-1] == s[1:])))
  assert targets == nbytes  # byte tokenizer: one target per byte


def test_jsonl_missing_field_and_bad_lines_are_counted_skips(tmp_path):
  p = tmp_path / "data.jsonl"
  lines = [json.dumps({"text": f"document number {i} " * 5}) for i in range(40)]
  lines[3] = json.dumps({"body": "no text field"})
  lines[7] = "{not json"
  lines[9] = json.dumps({"text": 17})
  p.write_text("\n".join(lines) + "\n")
  # Keys hold the (random) tmp path, and one line is always held out (the lowest hash, when the fraction holds out
  # none): a bad line lands in either split, so both splits' counters are added.
  d = _data_cfg(source="jsonl", paths=(str(p),), validation_fraction=1e-12)
  it = train_rows(d, ByteTokenizer(), 0)
  for _ in range(200):  # more than an epoch
    next(it)
  c = collections.Counter(packer_counters(it)) + collections.Counter(eval_rows(d, ByteTokenizer())[2])
  assert c["skipped_missing_field"] >= 1 and c["skipped_bad_json"] >= 1 and c["skipped_not_a_string"] >= 1, c


def test_undecodable_and_empty_files_are_counted_skips(tmp_path):
  d = tmp_path / "c"
  d.mkdir()
  for i in range(20):
    (d / f"ok{i}.txt").write_text("hello world " * 20)
  (d / "latin1.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
  (d / "empty.txt").write_bytes(b"")
  cfg = _data_cfg(source="text", paths=(str(d) + "/*.txt",), validation_fraction=1e-12)  # no bad file held out
  it = train_rows(cfg, ByteTokenizer(), 0)
  for _ in range(120):  # more than an epoch
    next(it)
  assert packer_counters(it).get("skipped_undecodable", 0) >= 1 and packer_counters(it).get("skipped_empty", 0) >= 1


def test_parquet_and_array_record_sources(tmp_path):
  pa = pytest.importorskip("pyarrow")
  import pyarrow.parquet as pq

  texts = [f"row {i}: " + "abc " * (i % 7 + 1) for i in range(50)]
  pq.write_table(pa.table({"content": texts, "other": list(range(50))}), tmp_path / "d.parquet", row_group_size=16)
  d = _data_cfg(source="parquet", paths=(str(tmp_path / "d.parquet"),), text_field="content")
  src = build_source(d, "train")
  got = {src[i]["text"].decode() for i in range(len(src))} | {
      v["text"].decode() for v in (build_source(d, "validation")[i] for i in range(len(build_source(d, "validation"))))}
  assert got == set(texts)
  with pytest.raises(ValueError, match="text_field='nope' is not a column"):
    build_source(_data_cfg(source="parquet", paths=(str(tmp_path / "d.parquet"),), text_field="nope"), "train")

  docs = [list(np.random.default_rng(i).integers(0, 256, 10 + i)) for i in range(30)]
  write_array_record(str(tmp_path / "d.array_record"), docs)
  d = _data_cfg(source="array_record", paths=(str(tmp_path / "d.array_record"),))
  src = build_source(d, "train")
  got = [list(src[i]["tokens"]) for i in range(len(src))]
  assert all(g in docs for g in got) and len(got) > 15
  rows, nbytes, _ = eval_rows(d, ByteTokenizer())
  assert nbytes > 0 and rows


@pytest.mark.parametrize("source,paths,match", [
    ("text", (), "config.data.paths is empty"),
    ("text", ("/nonexistent/dir/*.txt",), "matches no file"),
    ("jsonl", ("/nonexistent.jsonl",), "matches no file"),
    ("bogus", (), "config.data.source='bogus' is not one of"),
])
def test_bad_source_config_raises_clear_error(source, paths, match):
  with pytest.raises((ValueError, FileNotFoundError), match=match):
    build_source(_data_cfg(source=source, paths=paths), "train")


def test_empty_corpus_raises(tmp_path):
  p = tmp_path / "empty.jsonl"
  p.write_text("\n\n")
  with pytest.raises(ValueError, match="corpus is empty"):
    build_source(_data_cfg(source="jsonl", paths=(str(p),)), "train")


def test_bpe_roundtrip_and_token_bytes(tmp_path):
  texts = [("def f(x):\n    return x + 1  # é✓\n" * (i + 1)).encode() for i in range(20)]
  tok = train_bpe(texts, 300)
  assert tok.vocab_size <= 300
  for t in texts[:3] + ["日本語 mixed ünïcode\n".encode()]:
    ids = tok.encode(t)
    assert tok.decode(ids) == t
    assert sum(len(tok.decode_token(int(i))) for i in ids) == len(t)
  tok.save(str(tmp_path / "tokenizer.json"))
  cfg = _data_cfg(tokenizer="bpe", tokenizer_path=str(tmp_path / "tokenizer.json"))
  again = load_or_train_tokenizer(cfg, None)
  assert list(again.encode(texts[0])) == list(tok.encode(texts[0]))
  with pytest.raises(FileNotFoundError, match="does not exist"):
    load_or_train_tokenizer(_data_cfg(tokenizer="bpe", tokenizer_path=str(tmp_path / "none.json")), None)
  # as a published checkpoint carries it (moe_jax.export): the same ids, <bos> and bytes back
  from moe_jax.data.tokenizer import load_published, save_published
  save_published(tok, str(tmp_path))
  pub = load_published(str(tmp_path))
  assert pub.bos_id == tok.bos_id and list(pub.encode(texts[1])) == list(tok.encode(texts[1]))
  assert pub.decode(tok.encode(texts[1])) == texts[1] and pub.decode([tok.bos_id, tok.vocab_size + 3]) == b""
  # config.data.tokenizer_path naming a published checkpoint's tokenizer.json: <bos> is its config's bos_token
  import json
  from tokenizers import Tokenizer
  hf_tok = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
  hf_tok.add_special_tokens(["<｜begin▁of▁sentence｜>"])
  (tmp_path / "ckpt").mkdir()
  hf_tok.save(str(tmp_path / "ckpt" / "tokenizer.json"))
  (tmp_path / "ckpt" / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<｜begin▁of▁sentence｜>"}))
  ds = load_or_train_tokenizer(_data_cfg(tokenizer="bpe", tokenizer_path=str(tmp_path / "ckpt" / "tokenizer.json")),
                               None)
  assert ds.bos_id == hf_tok.token_to_id("<｜begin▁of▁sentence｜>") != tok.bos_id


def test_bpe_trained_in_workdir_is_reused(tmp_path):
  d = _data_cfg(source="text", paths=(str(_write_corpus(tmp_path)) + "/*.txt",), tokenizer="bpe", bpe_vocab_size=300)
  work = tmp_path / "work"
  work.mkdir()
  tok = load_or_train_tokenizer(d, str(work), log=lambda _: None)
  assert (work / "tokenizer.json").exists()
  mtime = os.path.getmtime(work / "tokenizer.json")
  tok2 = load_or_train_tokenizer(d, str(work), log=lambda _: None)
  assert os.path.getmtime(work / "tokenizer.json") == mtime and tok2.vocab_size == tok.vocab_size


def test_sft_conversations_pack_with_a_response_only_loss_mask(tmp_path):
  """Two formats, bad records counted and skipped, and the packed rows' loss_mask against a hand rendering: only
  the assistant's bytes and the <bos> that ends each reply are targets, several conversations in one row."""
  from moe_jax.data.packing import tokenize_fn
  from moe_jax.data.sources import SftJsonlSource
  from moe_jax.training.loss import shifted_targets
  records = [{"prompt": "2+2?", "response": "4"},
             {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                           {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"},
                           {"role": "assistant", "content": "Ciao"}]},
             "not json", {"text": "no conversation"}, {"messages": [{"role": "user", "content": "alone"}]},
             {"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}]
  path = tmp_path / "sft.jsonl"
  path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n")
  source = SftJsonlSource([str(path)])
  tok = ByteTokenizer()
  fn = tokenize_fn(tok)
  items = [fn(source[i]) for i in range(len(source))]
  pending = list(items)
  packer = Packer(128, lambda: pending.pop(0) if pending else None)
  row = packer.next_row()
  assert packer.next_row() is None

  def rendered(parts):  # (text, trained) -> ids and mask as the chat format defines them, by hand
    ids, mask = [tok.bos_id], [0]
    for text, trained in parts:
      ids += list(text.encode()) + ([tok.bos_id] if trained else [])
      mask += [int(trained)] * (len(text.encode()) + int(trained))
    return ids, mask

  a = rendered([("User: 2+2?\n\nAssistant: ", False), ("4", True)])
  b = rendered([("System: Be brief.\n\nUser: Hi\n\nAssistant: ", False), ("Hello", True),
                ("\n\nUser: Bye\n\nAssistant: ", False), ("Ciao", True)])
  n = len(a[0]) + len(b[0])
  assert list(row["tokens"][:n]) == a[0] + b[0] and list(row["loss_mask"][:n]) == a[1] + b[1]
  assert list(row["segment_ids"][:n]) == [1] * len(a[0]) + [2] * len(b[0]) and not row["loss_mask"][n:].any()
  assert {k: v for k, v in packer.counters.items() if k.startswith("skipped")} == {
      "skipped_bad_json": 1, "skipped_missing_field": 1, "skipped_no_response": 1, "skipped_bad_message": 1}
  assert items[0]["nbytes"] == 1 and items[1]["nbytes"] == len("Hello") + len("Ciao")  # what bits/byte counts
  # the targets: token i+1 of the same conversation, flagged
  _, mask = shifted_targets(row["tokens"][None], row["segment_ids"][None], 1, row["loss_mask"][None])
  targets = [int(row["tokens"][i + 1]) for i in np.flatnonzero(np.asarray(mask[0]))]
  assert bytes(t for t in targets if t < 256) == b"4HelloCiao" and targets.count(tok.bos_id) == 3


def test_sft_data_with_no_usable_conversation_stops_with_the_counters(tmp_path):
  from moe_jax.data.packing import NoUsableDocuments
  (tmp_path / "bad.jsonl").write_text("\n".join(json.dumps(r) for r in [
      {"prompt": "only a prompt"}, {"messages": []}, {"messages": [{"role": "user", "content": "no reply"}]}] * 4))
  cfg = _data_cfg(source="sft_jsonl", paths=(str(tmp_path / "bad.jsonl"),), tokenizer="byte",
                  validation_fraction=0.3)
  with pytest.raises(NoUsableDocuments, match="skipped_missing_field.*skipped_no_response|skipped_no_response"):
    next(train_rows(cfg, ByteTokenizer(), 0))
