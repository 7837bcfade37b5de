"""The train step and the loop: one compile, state donation, non-finite handling, end-to-end runs with
eval.json and metrics.jsonl, checkpoint fallback, kill -9 and resume with identical losses, and loss-free
balancing lowering MaxVio."""

import json
import os
import shutil
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import debug
from helpers import kill_9_past_step
from moe_jax.data import BatchLoader, ByteTokenizer, train_rows
from moe_jax.model import Transformer
from moe_jax.training import TrainingDiverged, train_and_evaluate
from moe_jax.training.checkpoint import Checkpointer, abstract_like
from moe_jax.sharding import make_mesh, rules_of
from moe_jax.training.state import batch_sharding, create_train_state
from moe_jax.training.step import make_train_step, train_step_fn

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _corpus(tmp_path, n=40, seed=0):
  """Small Python-like files copied from the embedded corpus (real code, deterministic choice)."""
  from moe_jax.data import embedded_corpus_files

  d = tmp_path / "corpus"
  d.mkdir(exist_ok=True)
  files = [f for f in embedded_corpus_files() if 2000 < os.path.getsize(f[1]) < 8000][:n]
  for i, (_, path) in enumerate(files):
    shutil.copy(path, d / f"f{i:03d}.txt")
  return str(d) + "/*.txt"


def _config(tmp_path, **train):
  c = debug.get_config()
  c.data.source = "text"
  c.data.paths = (_corpus(tmp_path),)
  c.data.validation_fraction = 0.15
  c.train.tensorboard = False
  c.train.log_every = 1
  for k, v in train.items():
    c.train[k] = v
  return c


def _batches(c, n, tmp_path):
  loader = BatchLoader(train_rows(c.data, ByteTokenizer(), 0), c.data.batch_size, c.data.seq_len)
  return [loader.next_batch(rows) for rows in [c.data.batch_size, 3, c.data.batch_size, 5][:n]]


def test_train_step_traces_once_moves_bias_by_gamma_and_donates(tmp_path):
  c = _config(tmp_path, bias_update_rate=0.01)
  model, mesh, rules = Transformer(c.model), make_mesh(c.mesh), rules_of(c.mesh)
  state, shardings, tx = create_train_state(model, c.train, mesh, rules, 0)
  fn = chex.assert_max_traces(train_step_fn(model, c, tx, c.train.num_steps), n=1)
  step = jax.jit(fn, in_shardings=(shardings, batch_sharding(mesh, rules)), out_shardings=(shardings, None),
                 donate_argnums=(0,))
  flat = lambda tree: __import__("flax").traverse_util.flatten_dict(tree, sep="/")  # noqa: E731
  bias0 = flat(jax.tree.map(np.asarray, state.router_bias))
  params0 = jax.tree.map(np.asarray, state.params)
  for i, batch in enumerate(_batches(c, 4, tmp_path)):  # live rows vary (batch warm-up padding): same shapes
    old = state
    state, m = step(state, batch)
    assert bool(m["finite"])
    if i == 0:
      assert len(bias0) == 3  # the "router" collection: two MoE layers and the MTP block
      for k, b in flat(state.router_bias).items():
        delta = np.asarray(b) - bias0[k]
        np.testing.assert_allclose(np.abs(delta), 0.01, rtol=1e-5)  # every expert moves by exactly gamma
        assert len(np.unique(np.sign(delta))) == 2  # some up, some down
  assert int(state.step) == 4
  assert float(state.tokens) == (8 + 3 + 8 + 5) * c.data.seq_len
  moved = jax.tree.map(lambda a, b: not np.allclose(a, b), params0, jax.tree.map(np.asarray, state.params))
  assert all(jax.tree.leaves(moved)), {k: v for k, v in __import__("flax").traverse_util.flatten_dict(moved, sep="/").items() if not v}
  # The routing bias never enters the optimiser state.
  assert "e_score_correction_bias" not in str(jax.tree_util.tree_structure(state.opt_state))
  # Vocabulary padding (257 ids -> 384 rows): the padding rows never get a gradient, so they are still exactly 0.
  V = c.model.vocab_size
  assert state.params["embedding"].shape[0] == 384 and state.params["lm_head"].shape[1] == 384
  assert not np.any(np.asarray(state.params["embedding"])[V:]) and not np.any(np.asarray(state.params["lm_head"])[:, V:])
  assert np.all(np.any(np.asarray(state.params["embedding"])[:V] != 0, axis=1))


def test_make_train_step_donates_the_state(tmp_path):
  c = _config(tmp_path)
  model, mesh, rules = Transformer(c.model), make_mesh(c.mesh), rules_of(c.mesh)
  state, shardings, tx = create_train_state(model, c.train, mesh, rules, 0)
  step = make_train_step(model, c, tx, c.train.num_steps, mesh, rules, shardings)
  new, _ = step(state, _batches(c, 1, tmp_path)[0])
  assert all(a.is_deleted() for a in jax.tree.leaves(state))
  assert not any(a.is_deleted() for a in jax.tree.leaves(new))


def test_non_finite_step_returns_input_state(tmp_path):
  c = _config(tmp_path)
  model, mesh, rules = Transformer(c.model), make_mesh(c.mesh), rules_of(c.mesh)
  state, shardings, tx = create_train_state(model, c.train, mesh, rules, 0)
  bad_params = jax.tree.map(lambda a: a, state.params)
  bad_params["embedding"] = bad_params["embedding"].at[0, 0].set(jnp.nan)
  state = state.replace(params=bad_params)
  batch = _batches(c, 1, tmp_path)[0]
  batch["tokens"][:, :] = 0  # every row reads the NaN embedding row
  new, m = jax.jit(train_step_fn(model, c, tx, c.train.num_steps))(state, batch)
  assert not bool(m["finite"])
  assert int(new.step) == 0
  chex.assert_trees_all_equal(new.router_bias, state.router_bias)


def test_train_and_evaluate_end_to_end_then_resume_is_a_no_op(tmp_path):
  c = _config(tmp_path, num_steps=12, eval_every=6, eval_batches=2)
  c.checkpoint.every = 5
  work = str(tmp_path / "work")
  logs = []
  result = train_and_evaluate(c, work, log=logs.append)
  ev = json.load(open(os.path.join(work, "eval.json")))
  for key in ("bits_per_byte", "gzip_bits_per_byte", "xz_bits_per_byte", "step"):
    assert key in ev
  assert ev["step"] == 12 and 0 < ev["bits_per_byte"] < 8.5 and 1.0 < ev["gzip_bits_per_byte"] < 8
  assert any("gzip -9" in line for line in logs) and any("eta" in line for line in logs)
  rows = [json.loads(l) for l in open(os.path.join(work, "metrics.jsonl"))]
  train_rows_ = [r for r in rows if "loss" in r]
  assert [r["step"] for r in train_rows_] == list(range(1, 13))
  for key in ("loss", "ce", "mtp_loss", "balance_loss", "learning_rate", "grad_norm", "tokens_per_sec", "max_vio",
              "max_vio_per_layer", "expert_load"):
    assert key in train_rows_[0], key
  assert len(train_rows_[0]["expert_load"]) == 3  # 2 MoE layers + the MTP block
  np.testing.assert_allclose(np.sum(train_rows_[0]["expert_load"], axis=1), 1.0, atol=1e-3)
  assert any("eval_loss" in r and r["step"] == 6 for r in rows)
  assert sorted(os.listdir(os.path.join(work, "checkpoints"))) == ["10", "12"]  # keep=2
  # Same command again: resumes at the end, trains nothing, reports the same numbers.
  again = train_and_evaluate(c, work, log=lambda _: None)
  assert again["bits_per_byte"] == pytest.approx(result["bits_per_byte"], rel=1e-6)
  # The workdir serves inference: the generate entry point as users run it, speculative, with --json.
  out = subprocess.run([sys.executable, "-m", "moe_jax.generate", f"--checkpoint={work}", "--prompt=def f(",
                        "--max_new_tokens=6", "--speculative", "--json"], capture_output=True, text=True, cwd=REPO,
                       timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  gen = json.loads(out.stdout.strip().splitlines()[-1])
  assert len(gen["tokens"]) == 6 and 0 <= gen["acceptance_rate"] <= 1 and gen["checkpoint"].endswith("step 12")
  assert isinstance(gen["text"], str) and gen["prompt_ids"][0] == 256  # <bos> of the byte tokenizer
  docs = tmp_path / "docs.jsonl"
  docs.write_text(json.dumps({"text": "def f(x):\n    return x + 1\n"}) + "\n" + json.dumps({"text": "import os"}) + "\n")
  out = subprocess.run([sys.executable, "-m", "moe_jax.perplexity", f"--checkpoint={work}", f"--data={docs}", "--json"],
                       capture_output=True, text=True, cwd=REPO, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  ppl = json.loads(out.stdout.strip().splitlines()[-1])
  assert ppl["documents"] == 2 and ppl["tokens"] == ppl["bytes"] == 36  # byte tokenizer: one target per byte
  assert 0 < ppl["bits_per_byte"] < 12 and ppl["perplexity"] > 1


def test_corrupted_latest_checkpoint_falls_back_to_previous(tmp_path):
  c = _config(tmp_path)
  model, mesh, rules = Transformer(c.model), make_mesh(c.mesh), rules_of(c.mesh)
  state, shardings, tx = create_train_state(model, c.train, mesh, rules, 0)
  loader = BatchLoader(train_rows(c.data, ByteTokenizer(), 0), c.data.batch_size, c.data.seq_len)
  ck = Checkpointer(str(tmp_path / "ck"), every=1, keep=3)
  loader.next_batch(8)
  ck.save(1, state, loader)
  state2 = state.replace(step=state.step + 1)
  loader.next_batch(8)
  ck.save(2, state2, loader)
  ck.close()
  # Corrupt step 2: truncate every file of its state.
  for root, _, files in os.walk(tmp_path / "ck" / "2" / "state"):
    for f in files:
      open(os.path.join(root, f), "wb").close()
  logs = []
  ck = Checkpointer(str(tmp_path / "ck"), every=1, keep=3)
  fresh = BatchLoader(train_rows(c.data, ByteTokenizer(), 0), c.data.batch_size, c.data.seq_len)
  restored, step = ck.restore_latest(abstract_like(state, shardings), fresh, log=logs.append)
  assert step == 1 and int(restored.step) == 0
  assert any("unreadable" in l and "/2" in l for l in logs)
  ref = BatchLoader(train_rows(c.data, ByteTokenizer(), 0), c.data.batch_size, c.data.seq_len)
  ref.next_batch(8)
  np.testing.assert_array_equal(fresh.next_batch(8)["tokens"], ref.next_batch(8)["tokens"])
  ck.close()


def test_workdir_from_before_the_router_collection_restores(tmp_path):
  """A run written before the routing biases became the "router" collection (its train state held them as one
  flat {"path/e_score_correction_bias": array} dict) and before vocabulary padding (config.json has no
  pad_vocab_to_multiple_of; 257 embedding rows) restores for training and for inference, converted; resuming it
  under the padded default stops at once and says which flag resumes it."""
  from flax.traverse_util import flatten_dict
  from moe_jax import restore
  c = _config(tmp_path, num_steps=6)
  c.model.pad_vocab_to_multiple_of = 1
  model, mesh, rules = Transformer(c.model), make_mesh(c.mesh), rules_of(c.mesh)
  state, shardings, tx = create_train_state(model, c.train, mesh, rules, 0)
  state = state.replace(router_bias=jax.tree.map(lambda b: b + jnp.linspace(-0.2, 0.3, b.shape[-1]),
                                                 state.router_bias))
  loader = BatchLoader(train_rows(c.data, ByteTokenizer(), 0), c.data.batch_size, c.data.seq_len)
  work = tmp_path / "old"
  ck = Checkpointer(str(work / "checkpoints"), every=1, keep=3)
  ck.save(3, state.replace(router_bias=flatten_dict(state.router_bias, sep="/")), loader, force=True)
  ck.close()
  old = c.to_dict()
  for field in ("pad_vocab_to_multiple_of", "decode_attention"):
    del old["model"][field]
  (work / "config.json").write_text(json.dumps(old))
  logs = []
  ck = Checkpointer(str(work / "checkpoints"), every=1, keep=3)
  fresh = BatchLoader(train_rows(c.data, ByteTokenizer(), 0), c.data.batch_size, c.data.seq_len)
  restored, step = ck.restore_latest(abstract_like(state, shardings), fresh, log=logs.append)
  ck.close()
  assert step == 3 and any("earlier layout" in line for line in logs), logs
  chex.assert_trees_all_equal(restored.router_bias, state.router_bias)
  chex.assert_trees_all_equal(restored.params, state.params)
  loaded = restore.load_model(str(work))
  assert loaded.config.pad_vocab_to_multiple_of == 1 and loaded.variables["params"]["embedding"].shape[0] == 257
  chex.assert_trees_all_equal(loaded.variables["router"], jax.device_get(state.router_bias))
  padded = _config(tmp_path, num_steps=6)
  with pytest.raises(ValueError, match="pad_vocab_to_multiple_of=1"):
    train_and_evaluate(padded, str(work), log=lambda _: None)


def test_non_finite_loss_stops_with_a_clear_message(tmp_path):
  c = _config(tmp_path, num_steps=6, learning_rate=1e6, warmup_steps=0, grad_clip_norm=1e30)
  c.checkpoint.every = 0
  with pytest.raises(TrainingDiverged, match=r"non-finite loss at step \d+"):
    train_and_evaluate(c, str(tmp_path / "work"), log=lambda _: None)
  assert not os.path.exists(tmp_path / "work" / "eval.json")


def _train_cmd(work, config_overrides):
  return [sys.executable, "-m", "moe_jax.train", "--config=configs/debug.py", f"--workdir={work}"] + config_overrides


def _losses(work):
  return {r["step"]: r["loss"] for r in map(json.loads, open(os.path.join(work, "metrics.jsonl"))) if "loss" in r}


def test_kill_and_resume_gives_identical_losses(tmp_path):
  overrides = ["--config.data.source=text", f"--config.data.paths=('{_corpus(tmp_path)}',)",
               "--config.data.validation_fraction=0.15", "--config.data.batch_size=16", "--config.data.seq_len=128",
               "--config.train.num_steps=40", "--config.train.log_every=1", "--config.train.tensorboard=False",
               "--config.checkpoint.every=4", "--config.checkpoint.keep=2"]
  # one persistent compile cache for the three runs of the same program (the later two skip compiling)
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), JAX_PLATFORMS="cpu",
             JAX_COMPILATION_CACHE_DIR=str(tmp_path / "xla_cache"))
  ref, run = str(tmp_path / "ref"), str(tmp_path / "run")
  subprocess.run(_train_cmd(ref, overrides), cwd=REPO, env=env, check=True, capture_output=True, timeout=600)
  proc = subprocess.Popen(_train_cmd(run, overrides), cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  kill_9_past_step(proc, run, 10)  # a few steps past a checkpoint, mid-run
  assert max(_losses(run)) < 40
  subprocess.run(_train_cmd(run, overrides), cwd=REPO, env=env, check=True, capture_output=True, timeout=600)
  a, b = _losses(ref), _losses(run)
  assert sorted(a) == sorted(b) == list(range(1, 41))
  assert a == b  # bit-identical per-step losses
  ea, eb = (json.load(open(os.path.join(w, "eval.json"))) for w in (ref, run))
  assert ea["bits_per_byte"] == eb["bits_per_byte"]


def test_loss_free_balancing_lowers_global_max_vio(tmp_path):
  """Debug model, same data and seed, with and without the bias update: global MaxVio on held-out data."""
  results = {}
  for name, rate in (("off", 0.0), ("loss_free", 0.01)):
    c = _config(tmp_path, num_steps=60, bias_update_rate=rate, warmup_steps=5)
    c.model.aux_loss_alpha = 0.0  # isolate the bias: no balance loss in either run
    c.checkpoint.every = 0
    results[name] = train_and_evaluate(c, str(tmp_path / name), log=lambda _: None)
  off, on = results["off"]["max_vio_global"], results["loss_free"]["max_vio_global"]
  print(f"global MaxVio: balancing off {off:.3f}, loss-free {on:.3f}")
  assert on < 0.5 * off


def test_bfloat16_compute_keeps_float32_params_and_optimizer_state(tmp_path):
  c = _config(tmp_path)
  c.model.dtype = "bfloat16"
  model, mesh, rules = Transformer(c.model), make_mesh(c.mesh), rules_of(c.mesh)
  state, shardings, tx = create_train_state(model, c.train, mesh, rules, 0)
  step = make_train_step(model, c, tx, c.train.num_steps, mesh, rules, shardings)
  for batch in _batches(c, 2, tmp_path):
    state, m = step(state, batch)
    assert bool(m["finite"]) and 3.0 < float(m["ce"]) < 7.0
  for leaf in jax.tree.leaves((state.params, state.opt_state, state.router_bias)):
    if jnp.issubdtype(leaf.dtype, jnp.floating):
      assert leaf.dtype == jnp.float32


def test_init_from_a_workdir_continues_as_dsa_with_the_model_frozen(tmp_path, monkeypatch):
  """A V3 run continues as V3.2: config.init_from names its workdir, the indexers start fresh, and in the
  dense warm-up stage with only the indexers trainable the held-out result is the source run's,
  while the indexers move. A source that is not a workdir, or a model whose shapes differ, stops first."""
  src = str(tmp_path / "v3")
  base = _config(tmp_path, num_steps=3)
  base.data.batch_size, base.data.seq_len, base.checkpoint.every = 4, 32, 0
  first = train_and_evaluate(base, src, log=lambda _: None)
  monkeypatch.chdir(tmp_path)  # a relative path, as typed on a command line
  c = _config(tmp_path, num_steps=2, trainable="indexer", learning_rate=1e-2, warmup_steps=0)
  c.init_from = "v3"
  c.data.batch_size, c.data.seq_len, c.checkpoint.every = 4, 32, 0
  c.model.update(index_n_heads=2, index_head_dim=16, index_topk=8, index_stage="dense_warmup")
  logs = []
  warm = train_and_evaluate(c, str(tmp_path / "v32"), log=logs.append)
  assert any("initialised from" in l and "indexer arrays freshly initialised" in l for l in logs), logs
  # (the DSA model attends in the einsum form, the source may use another backend: equal up to rounding)
  assert warm["bits_per_byte"] == pytest.approx(first["bits_per_byte"], rel=1e-6)
  rows = [json.loads(l) for l in open(tmp_path / "v32" / "metrics.jsonl") if '"index_loss"' in l]
  assert len(rows) == 2 and all(r["index_loss"] > 0 for r in rows) and rows[1]["index_loss"] != rows[0]["index_loss"]
  # the same weights through the published format, exported as a user does: bit for bit in float32
  from flax.traverse_util import flatten_dict
  from moe_jax.interop import huggingface
  from moe_jax.restore import load_model
  out = subprocess.run([sys.executable, "-m", "moe_jax.export", f"--checkpoint={src}", f"--out={tmp_path / 'hf'}"],
                       cwd=REPO, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0 and "byte tokenizer" in out.stderr, out.stderr[-2000:]
  want = flatten_dict(load_model(src).variables)
  got = flatten_dict(huggingface.load(str(tmp_path / "hf"), scan_layers=base.model.scan_layers)[1])
  assert want.keys() == got.keys() and all(np.array_equal(want[k], got[k]) for k in want)
  hf = _config(tmp_path, num_steps=1)
  hf.init_from = "hf:" + str(tmp_path / "hf")
  hf.data.batch_size, hf.data.seq_len, hf.checkpoint.every = 4, 32, 0
  logs = []
  train_and_evaluate(hf, str(tmp_path / "from_hf"), log=logs.append)
  assert any(l.startswith("initialised from") and "published format" in l for l in logs), logs
  bad = _config(tmp_path)
  bad.init_from = str(tmp_path / "nowhere")
  with pytest.raises(ValueError, match="config.init_from=.*not a training workdir"):
    train_and_evaluate(bad, str(tmp_path / "bad1"), log=lambda _: None)
  other = _config(tmp_path)
  other.init_from = src
  other.data.batch_size, other.data.seq_len = 4, 32
  other.model.v_head_dim = 8
  with pytest.raises(ValueError, match=r"config.model.v_head_dim=8 \(the checkpoint has 16\)"):
    train_and_evaluate(other, str(tmp_path / "bad2"), log=lambda _: None)
  assert not os.path.exists(tmp_path / "bad2" / "config.json")  # nothing of a run was written


def test_fine_tuning_on_conversations_trains_on_the_replies_only(tmp_path):
  """config.data.source=sft_jsonl end to end: the run trains and evaluates, and the held-out bits per byte count
  exactly the assistant replies' bytes (the trainer checks its byte accounting against the documents')."""
  rng = np.random.default_rng(0)
  words = ["def", "return", "value", "list", "print", "(x)", "+", "1", "loop", "class"]
  lines = []
  for i in range(60):
    q, r = " ".join(rng.choice(words, 8)), " ".join(rng.choice(words, 12))
    lines.append(json.dumps({"prompt": f"q{i}: {q}", "response": r}) if i % 2 else
                 json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": r}]}))
  (tmp_path / "chat.jsonl").write_text("\n".join(lines) + "\n")
  c = _config(tmp_path, num_steps=3)
  c.data.source, c.data.paths, c.data.validation_fraction = "sft_jsonl", (str(tmp_path / "chat.jsonl"),), 0.2
  c.data.batch_size, c.data.seq_len, c.checkpoint.every = 4, 64, 0
  result = train_and_evaluate(c, str(tmp_path / "sft"), log=lambda _: None)
  from moe_jax.data import build_source
  val = build_source(c.data, "validation")
  replies = sum(len(t) for i in range(len(val)) for t, trained in val[i]["parts"] if trained)
  assert result["eval_bytes"] == replies and 0 < result["bits_per_byte"] < 9
