"""Fine-tuning (issue 18): LoRA's zero start and merge, ESFT's expert selection against a numpy rendering, frozen
weights bit-identical after fine-tuning, a killed ESFT run resuming exactly, and a LoRA fine-tune of a
transformers-made checkpoint exported back to transformers with equal logits."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

import numpy_reference as ref
from configs import debug, finetune
from helpers import init_params, kill_9_past_step, logged_losses, max_rel_err, merged_params, random_bias, tiny_config
from moe_jax.model.lora import merge_lora, without_lora
from moe_jax.model.variables import merge_variables
from moe_jax.training import esft, train_and_evaluate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def test_lora_starts_as_the_base_model_and_merges_into_the_adapter_forms_logits():
  """Zero-initialised B: the adapted model's logits are the base model's bit for bit. Random B: the merged
  weights (numpy, moe_jax.model.lora) give the adapter form's logits, and a merged expert / attention-output
  weight equals W + (alpha/r) A B computed per expert in float64."""
  base_cfg = tiny_config(scan_layers=True, initializer_range=0.1)
  lora_cfg = tiny_config(scan_layers=True, initializer_range=0.1, lora_rank=3, lora_alpha=6.0,
                         lora_targets=("attention", "experts", "shared_experts", "mlp"))
  base_model, base_vars = init_params(base_cfg)
  base_vars = random_bias(base_vars)
  lora_model, fresh = init_params(lora_cfg, seed=1)
  variables, left = merge_variables(base_vars, fresh)
  assert left and all("_lora_" in p for p in left)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, base_cfg.vocab_size, (2, 24)))
  want, _ = jax.jit(base_model.apply)(base_vars, tokens)
  got, _ = jax.jit(lora_model.apply)(variables, tokens)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))

  rng = np.random.default_rng(2)
  flat = flatten_dict(variables["params"])
  flat = {k: (jnp.asarray(rng.normal(size=v.shape) * 0.3, v.dtype) if k[-1].endswith("_lora_b") else v)
          for k, v in flat.items()}
  from flax.traverse_util import unflatten_dict
  adapted = {"params": unflatten_dict(flat), "router": variables["router"]}
  adapter_logits, _ = jax.jit(lora_model.apply)(adapted, tokens)
  merged = merge_lora(jax.device_get(adapted["params"]), lora_cfg)
  assert not any("_lora_" in "/".join(k) for k in flatten_dict(merged))
  merged_logits, _ = jax.jit(base_model.apply)({"params": merged, "router": adapted["router"]}, tokens)
  assert max_rel_err(merged_logits, adapter_logits) < 1e-5
  assert max_rel_err(adapter_logits, want) > 1e-2  # the adapters do change the model
  s = 6.0 / 3
  p = {"/".join(k): np.asarray(v, np.float64) for k, v in flat.items()}
  m = {"/".join(k): np.asarray(v, np.float64) for k, v in flatten_dict(merged).items()}
  for layer in range(2):
    for e in range(lora_cfg.n_routed_experts):
      w = p["moe_layers/moe/wi_up"][layer, e] + s * (p["moe_layers/moe/wi_up_lora_a"][layer, e]
                                                     @ p["moe_layers/moe/wi_up_lora_b"][layer, e])
      np.testing.assert_allclose(m["moe_layers/moe/wi_up"][layer, e], w, rtol=1e-5, atol=1e-6)
    H, A, D = p["moe_layers/attn/wo"].shape[1:]
    w = p["moe_layers/attn/wo"][layer].reshape(H * A, D) + s * (
        p["moe_layers/attn/wo_lora_a"][layer].reshape(H * A, -1) @ p["moe_layers/attn/wo_lora_b"][layer])
    np.testing.assert_allclose(m["moe_layers/attn/wo"][layer].reshape(H * A, D), w, rtol=1e-5, atol=1e-6)
  assert without_lora(lora_cfg).lora_rank == 0


def test_row_restricted_adam_equals_adam_on_the_selected_rows_alone():
  """optimizer.restrict_to with Rows over a scanned [layers, E, d, f] stack: the selected (layer, expert) rows get
  exactly what AdamW (clipping over the trained part, decay) gives those rows as separate arrays; every other row
  and the frozen leaf get zero; Adam's moments hold only the selected rows."""
  import ml_collections
  from moe_jax.training.optimizer import Rows, make_optimizer
  cfg = ml_collections.ConfigDict(dict(grad_clip_norm=0.5, adam_b1=0.9, adam_b2=0.95, adam_eps=1e-8, weight_decay=0.1))
  rng = np.random.default_rng(0)
  params = {"w": jnp.asarray(rng.normal(size=(3, 4, 5, 2)), jnp.float32), "frozen": jnp.ones((5,), jnp.float32)}
  pairs = [(0, 1), (2, 0), (2, 3)]  # (layer, expert)
  sel = {"w": Rows([l * 4 + e for l, e in pairs], lead=2), "frozen": False}
  tx = make_optimizer(cfg, {"w": True, "frozen": False}, sel)
  alone = make_optimizer(cfg, {"rows": True}, None)
  state, ref_state = tx.init(params), alone.init({"rows": jnp.stack([params["w"][l, e] for l, e in pairs])})
  assert [x.shape for x in jax.tree.leaves(state) if x.ndim] == [(3, 5, 2), (3, 5, 2)]
  for _ in range(3):
    grads = {"w": jnp.asarray(rng.normal(size=(3, 4, 5, 2)), jnp.float32),
             "frozen": jnp.asarray(rng.normal(size=(5,)), jnp.float32)}
    rows = {"rows": jnp.stack([grads["w"][l, e] for l, e in pairs])}
    upd, state = tx.update(grads, state, params)
    ref_upd, ref_state = alone.update(rows, ref_state, {"rows": jnp.stack([params["w"][l, e] for l, e in pairs])})
    for i, (l, e) in enumerate(pairs):
      np.testing.assert_array_equal(np.asarray(upd["w"][l, e]), np.asarray(ref_upd["rows"][i]))
    others = [(l, e) for l in range(3) for e in range(4) if (l, e) not in pairs]
    assert all(not np.asarray(upd["w"][l, e]).any() for l, e in others) and not np.asarray(upd["frozen"]).any()


def test_esft_selection_equals_a_numpy_rendering_of_relevance_and_the_threshold_rule():
  """On a fixed batch: each routed expert's gate-score sum and selection count per MoE layer from the float64
  numpy model (its own router, loop over tokens), normalised, and the fewest experts whose relevance reaches p
  taken greedily; moe_jax's statistics (the eval step's gate_sum / expert_load) and esft.choose agree."""
  cfg = tiny_config(initializer_range=0.2)
  model, variables = init_params(cfg)
  variables = random_bias(variables)
  B, T = 3, 20
  tokens = np.random.default_rng(3).integers(0, cfg.vocab_size, (B, T))
  _, aux = jax.jit(lambda v, t: model.apply(v, t, mtp=False))(variables, jnp.asarray(tokens))
  L, E = cfg.num_hidden_layers - cfg.first_k_dense_replace, cfg.n_routed_experts
  calls = []
  real_route = ref.route
  try:
    ref.route = lambda logits, bias, c: calls.append(real_route(logits, bias, c)) or calls[-1]
    params = jax.tree.map(lambda a: np.asarray(a, np.float64), merged_params(variables))
    for b in range(B):
      ref.forward(params, tokens[b], cfg)
  finally:
    ref.route = real_route
  gate, load = np.zeros((L, E)), np.zeros((L, E))
  per_seq = len(calls) // B  # the main model's MoE layers, then the MTP module's
  for b in range(B):
    for layer in range(L):
      for t in range(T):
        chosen, w = calls[b * per_seq + layer * T + t]
        gate[layer, chosen] += w
        load[layer, chosen] += 1
  np.testing.assert_allclose(np.asarray(aux["gate_sum"]), gate, rtol=2e-5)
  np.testing.assert_array_equal(np.asarray(aux["expert_load"]), load)
  p = 0.55
  for method in ("esft_gate", "esft_token"):
    want = {}
    for layer in range(L):
      r = (gate if method == "esft_gate" else load)[layer]
      r = r / r.sum()
      order = sorted(range(E), key=lambda e: (-r[e], e))  # noqa: B023
      picked, total = [], 0.0
      while total < p:
        picked.append(order[len(picked)])
        total += r[picked[-1]]
      want[str(cfg.first_k_dense_replace + layer)] = sorted(picked)
    got = esft.choose(np.asarray(aux["gate_sum"]), np.asarray(aux["expert_load"]), method, p,
                      cfg.first_k_dense_replace, "", lambda _: None, write=False)
    assert got == want and any(len(v) > 1 for v in want.values()), method


def _base_run(tmp_path, corpus):
  c = debug.get_config()
  c.data.source, c.data.paths, c.data.validation_fraction = "text", (corpus,), 0.15
  c.data.batch_size, c.data.seq_len = 8, 64
  c.train.num_steps, c.train.tensorboard, c.checkpoint.every = 3, False, 0
  c.train.bias_update_rate = 0.01
  work = str(tmp_path / "base")
  train_and_evaluate(c, work, log=lambda _: None)
  return work


def _corpus(tmp_path):
  from test_train_loop import _corpus as corpus
  return corpus(tmp_path)


def _weights(work):
  from moe_jax.restore import load_model
  return {"/".join(k): np.asarray(v) for k, v in flatten_dict(load_model(work).variables).items()}


def test_esft_trains_only_the_selected_experts_and_resumes_exactly_after_kill_9(tmp_path):
  """configs/finetune.py through the CLI, method esft_token from a workdir: WORKDIR/esft_experts.json names the
  selected experts per published layer index; after fine-tuning, every other weight (attention, norms, shared
  experts, routers, embeddings, the unselected experts' rows) and every routing bias is bit-identical to the
  base run's, while each selected expert changed; a run killed with SIGKILL mid-way and rerun logs exactly the
  per-step losses of an uninterrupted one (the selection is read back, not measured again)."""
  corpus = _corpus(tmp_path)
  base = _base_run(tmp_path, corpus)
  overrides = [f"--config.init_from={base}", "--config.finetune.method=esft_token",
               "--config.finetune.esft_threshold=0.4", "--config.finetune.esft_sample_batches=2",
               "--config.data.source=text", f"--config.data.paths=('{corpus}',)", "--config.data.tokenizer=byte",
               "--config.data.validation_fraction=0.15", "--config.data.batch_size=8", "--config.data.seq_len=64",
               "--config.train.num_steps=10", "--config.train.log_every=1", "--config.train.tensorboard=False",
               "--config.train.warmup_steps=2", "--config.train.lr_decay_start=2", "--config.train.learning_rate=3e-3",
               "--config.checkpoint.every=4", "--config.checkpoint.keep=2"]
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), JAX_PLATFORMS="cpu",
             JAX_COMPILATION_CACHE_DIR=str(tmp_path / "xla_cache"))
  cmd = lambda work: [sys.executable, "-m", "moe_jax.train", "--config=configs/finetune.py",  # noqa: E731
                      f"--workdir={work}"] + overrides
  ref_dir, run = str(tmp_path / "ref"), str(tmp_path / "run")
  out = subprocess.run(cmd(ref_dir), cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "ESFT (esft_token, p=0.4): layer 1: experts" in out.stdout and "optimiser state" in out.stdout
  selection = json.load(open(os.path.join(ref_dir, "esft_experts.json")))
  assert sorted(selection) == ["1", "2"] and all(0 < len(v) < 8 for v in selection.values())

  before, after = _weights(base), _weights(ref_dir)
  assert before.keys() == after.keys()
  for name, w0 in before.items():
    w1 = after[name]
    layer = {"params/moe_layers_0/moe/": "1", "params/moe_layers_1/moe/": "2"}.get(name.rsplit("/", 1)[0] + "/")
    if layer is not None and name.rsplit("/", 1)[1] in ("wi_gate", "wi_up", "wo"):
      chosen = selection[layer]
      others = [e for e in range(w0.shape[0]) if e not in chosen]
      np.testing.assert_array_equal(w1[others], w0[others], err_msg=name)
      assert all(not np.array_equal(w1[e], w0[e]) for e in chosen), name
    else:
      np.testing.assert_array_equal(w1, w0, err_msg=name)
  ev = json.load(open(os.path.join(ref_dir, "eval.json")))
  assert ev["trainable_params"] == sum(len(v) for v in selection.values()) * 3 * 64 * 32
  assert ev["finetune_method"] == "esft_token"

  proc = subprocess.Popen(cmd(run), cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  kill_9_past_step(proc, run, 6, checkpoint=4)
  out = subprocess.run(cmd(run), cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0 and "resumed from step" in out.stdout and "ESFT (" not in out.stdout, out.stderr[-3000:]
  a, b = logged_losses(ref_dir), logged_losses(run)
  assert sorted(a) == sorted(b) == list(range(1, 11)) and a == b
  assert json.load(open(os.path.join(run, "eval.json")))["bits_per_byte"] == ev["bits_per_byte"]


def test_lora_fine_tune_of_a_transformers_checkpoint_exports_to_transformers_with_equal_logits(tmp_path):
  """A tiny transformers-made DeepSeek-V3 checkpoint, LoRA-fine-tuned from hf:DIR with configs/finetune.py (the
  model config comes from the checkpoint): the base weights and routing biases stay bit-identical, the adapters
  train; `python -m moe_jax.export` merges them, and transformers' logits on the export equal moe_jax's adapter-
  form logits of the fine-tuning workdir. A run overriding an architecture field stops before anything is written."""
  from hf_models import make_v3
  from moe_jax.interop import huggingface
  from moe_jax.restore import load_model
  from test_hf_export import _hf_logits
  src = str(tmp_path / "hf_src")
  make_v3(src, vocab_size=300)
  c = finetune.get_config()
  c.init_from = "hf:" + src
  c.finetune.method, c.finetune.lora_rank, c.finetune.lora_targets = "lora", 4, ("attention", "experts", "mlp")
  c.data.source, c.data.paths, c.data.tokenizer = "text", (_corpus(tmp_path),), "byte"
  c.data.validation_fraction, c.data.batch_size, c.data.seq_len = 0.15, 4, 32
  c.train.num_steps, c.train.warmup_steps, c.train.lr_decay_start, c.train.learning_rate = 3, 1, 1, 1e-2
  c.train.tensorboard, c.checkpoint.every = False, 0
  work = str(tmp_path / "lora")
  train_and_evaluate(c, work, log=lambda _: None)
  saved_model = json.load(open(os.path.join(work, "config.json")))["model"]
  assert saved_model["lora_rank"] == 4 and saved_model["hidden_size"] == 48 and saved_model["vocab_size"] == 300
  _, source = huggingface.load(src, jnp.float32)
  want = {"/".join(k): np.asarray(v) for k, v in flatten_dict(source).items()}
  got = _weights(work)
  assert set(want) < set(got)
  for name, w in want.items():
    np.testing.assert_array_equal(got[name], w, err_msg=name)
  assert all(np.abs(v).max() > 0 for k, v in got.items() if k.endswith("_lora_b"))

  out_dir = str(tmp_path / "export")
  out = subprocess.run([sys.executable, "-m", "moe_jax.export", f"--checkpoint={work}", f"--out={out_dir}"],
                       cwd=REPO, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-2000:]
  loaded = load_model(work)
  tokens = np.random.default_rng(1).integers(0, 300, (2, 24))
  from moe_jax.model import Transformer
  model = Transformer(loaded.config)
  ours, _ = jax.jit(lambda v, t: model.apply(v, t, mtp=False))(loaded.variables, jnp.asarray(tokens))
  assert max_rel_err(_hf_logits(out_dir, tokens), ours) <= 1e-4

  bad = finetune.get_config()
  bad.init_from, bad.data = "hf:" + src, c.data
  bad.model.num_hidden_layers = 5
  with pytest.raises(ValueError, match=r"config.model.num_hidden_layers=5 \(the checkpoint has 3\)"):
    train_and_evaluate(bad, str(tmp_path / "bad"), log=lambda _: None)
  assert not os.path.exists(tmp_path / "bad" / "config.json")
