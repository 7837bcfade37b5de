"""DeepSeek Sparse Attention (V3.2): the lightning indexer's selection against a float64 numpy rendering, the whole
model with index_topk below the sequence length against the numpy reference, cached decoding equal to the full
forward, and the config checks."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import traverse_util

from helpers import init_params, max_rel_err, merged_params, random_bias, tiny_config, to_numpy64
import numpy_reference as ref
from moe_jax.config import validate_model_config
from moe_jax.inference import Generator, cache_bytes_per_token, init_cache
from moe_jax.layers.attention import attention_inputs, attention_mask
from moe_jax.layers.indexer import Indexer, select_top_k, visible_scores

DSA = dict(index_n_heads=4, index_head_dim=16, index_topk=4)


def _spread_indexer(variables, scale=30.0):
  """Indexer weights scaled up so scores are far apart: no near-tie can flip between float32 and float64."""
  flat = traverse_util.flatten_dict(variables["params"], sep="/")
  flat = {k: (v * scale if "/indexer/" in k and not k.endswith("k_norm/scale") else v) for k, v in flat.items()}
  flat = {k: (v + 0.5 * jax.random.normal(jax.random.key(len(k)), v.shape) if k.endswith("k_norm/bias") else v)
          for k, v in flat.items()}
  return {**variables, "params": traverse_util.unflatten_dict(flat, sep="/")}


def _docs():
  seg = np.array([[1] * 5 + [2] * 9, [1] * 14])
  pos = np.array([list(range(5)) + list(range(9)), list(range(14))])
  return seg, pos


def test_indexer_selection_matches_numpy_top_k():
  cfg = tiny_config(**DSA)
  B, T = 2, 14
  seg, pos = _docs()
  x = jax.random.normal(jax.random.key(0), (B, T, cfg.hidden_size))
  cq = jax.random.normal(jax.random.key(1), (B, T, cfg.q_lora_rank))
  inputs = attention_inputs(cfg, jnp.asarray(pos), jnp.asarray(seg))
  mod = Indexer(cfg)
  params = nn.meta.unbox(mod.init(jax.random.key(2), x, cq, inputs)["params"])
  params = jax.tree.map(lambda a: a * 30.0, params)
  proj = mod.apply({"params": params}, x, cq, inputs)
  keys = proj.k_BTd
  vis = [attention_mask(jnp.asarray(seg))]
  (selected,) = select_top_k(visible_scores(proj, [keys], vis), vis, cfg.index_topk)
  assert selected.shape == (B, 1, T, T) and keys.shape == (B, T, cfg.index_head_dim)
  p64 = to_numpy64(params)
  freq = ref.yarn_inv_freq(cfg)
  for b in range(B):
    want = ref.index_selection(p64, np.asarray(x[b], np.float64), np.asarray(cq[b], np.float64), pos[b], seg[b], cfg,
                               freq)
    got = [set(np.flatnonzero(np.asarray(selected[b, 0, t]))) for t in range(T)]
    assert got == want
  assert max(len(s) for s in got) == cfg.index_topk  # the top-k really cuts


@pytest.fixture(scope="module")
def dsa_model():
  cfg = tiny_config(num_nextn_predict_layers=1, **DSA)
  model, variables = init_params(cfg)
  return cfg, model, _spread_indexer(random_bias(variables))


def test_model_with_sparse_attention_matches_numpy_reference(dsa_model):
  cfg, model, variables = dsa_model
  tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(2, 14))
  seg, pos = _docs()
  logits, aux = jax.jit(model.apply)(variables, jnp.asarray(tokens), jnp.asarray(seg), jnp.asarray(pos))
  p64 = to_numpy64(merged_params(variables))
  for b in range(2):
    want, want_mtp = ref.forward(p64, tokens[b], cfg, pos[b], seg[b])
    assert max_rel_err(logits[b], want) < 1e-4
    assert max_rel_err(aux["mtp_logits"][:, b], want_mtp) < 1e-4
  dense_cfg = tiny_config(num_nextn_predict_layers=1)  # the same weights without the indexer differ: it selects
  dense = {"params": {k: v for k, v in variables["params"].items()}, "router": variables["router"]}
  for name, layer in dense["params"].items():
    if isinstance(layer, dict) and "attn" in layer:
      dense["params"][name] = {**layer, "attn": {k: v for k, v in layer["attn"].items() if k != "indexer"}}
  from moe_jax.model import Transformer
  dense_logits, _ = jax.jit(Transformer(dense_cfg).apply)(dense, jnp.asarray(tokens), jnp.asarray(seg),
                                                          jnp.asarray(pos))
  assert max_rel_err(dense_logits, logits) > 1e-3


def test_prefill_and_decode_with_the_indexer_equal_the_full_forward(dsa_model):
  cfg, model, variables = dsa_model
  tokens = jnp.asarray(np.random.default_rng(1).integers(0, cfg.vocab_size, size=(2, 12)))
  full, _ = jax.jit(model.apply)(variables, tokens)
  cache = init_cache(cfg, 2, 16, jnp.float32)
  assert cache.layers["moe_layers"].index_k_BSd.shape == (2, 2, 16, cfg.index_head_dim)
  apply = jax.jit(model.apply)
  out, _, cache = apply(variables, tokens[:, :6], cache=cache)
  outs = [out]
  for t in range(6, 12):  # decoding well past index_topk = 4 visible tokens
    out, _, cache = apply(variables, tokens[:, t:t + 1], cache=cache)
    outs.append(out)
  chex.assert_trees_all_close(jnp.concatenate(outs, 1), full, rtol=2e-5, atol=2e-5)
  gen = Generator(variables, cfg, max_len=32)
  prompts = [[1, 5, 9, 3, 7, 2], [2, 7]]
  assert gen.generate(prompts, max_new_tokens=8).tokens == gen.generate(prompts, max_new_tokens=8,
                                                                         speculative=True).tokens


def test_cache_bytes_and_config_errors():
  from configs import deepseek_v3
  v32 = deepseek_v3.get_model_config()
  v32.index_n_heads, v32.index_head_dim, v32.index_topk = 64, 128, 2048
  assert cache_bytes_per_token(v32) == (512 + 64 + 128) * 2  # the indexer key beside MLA's 576 values
  for bad, message in [(dict(DSA, index_topk=0), "index_topk must be a positive integer"),
                       (dict(DSA, index_head_dim=6), "index_head_dim=6 must be even and >= qk_rope_head_dim=8"),
                       (dict(DSA, index_head_dim=15), "must be even"),
                       (dict(DSA, q_lora_rank=None), "needs q_lora_rank")]:
    with pytest.raises(ValueError, match=message):
      validate_model_config(tiny_config(**bad))


def _train_setup(stage, trainable):
  from configs import debug
  from moe_jax.model import Transformer
  from moe_jax.sharding import make_mesh, rules_of
  from moe_jax.training.state import create_train_state
  from moe_jax.training.step import make_train_step
  c = debug.get_config()
  c.model.update(index_n_heads=4, index_head_dim=16, index_topk=4, index_stage=stage, dtype="float32")
  c.train.trainable = trainable
  c.train.bias_update_rate = 0.01
  c.train.learning_rate, c.train.warmup_steps = 3e-3, 1
  mesh, rules = make_mesh(c.mesh), rules_of(c.mesh)
  model = Transformer(c.model)
  state, shardings, tx = create_train_state(model, c.train, mesh, rules, seed=0)
  step = make_train_step(model, c, tx, 100, mesh, rules, shardings)
  rng = np.random.default_rng(0)
  B, T = 4, 24
  batch = {"tokens": rng.integers(0, c.model.vocab_size, (B, T)).astype(np.int32),
           "segment_ids": np.repeat([[1] * 10 + [2] * 14], B, 0).astype(np.int32),
           "positions": np.repeat([list(range(10)) + list(range(14))], B, 0).astype(np.int32)}
  return c, model, state, step, batch


def test_dense_warmup_trains_only_the_indexers_towards_the_attention():
  c, _, state, step, batch = _train_setup("dense_warmup", "indexer")
  before = jax.tree.map(np.asarray, {"params": state.params, "router": state.router_bias})
  losses = []
  for _ in range(8):
    state, m = step(state, batch)
    losses.append(float(m["index_loss"]))
  assert losses[-1] < 0.8 * losses[0], losses  # the indexer learns the attention distribution
  after = traverse_util.flatten_dict({"params": state.params, "router": state.router_bias}, sep="/")
  changed = {k for k, v in traverse_util.flatten_dict(before, sep="/").items()
             if not np.array_equal(v, np.asarray(after[k]))}
  assert changed and all("/indexer/" in k for k in changed), sorted(changed)[:5]  # main model and biases frozen


def test_sparse_stage_keeps_the_two_losses_apart():
  """Sparse training: the LM loss never reaches the indexer (its selection is a top-k) and the indexer's KL never
  reaches the main model (its inputs are detached)."""
  c, model, state, _, batch = _train_setup("sparse", "all")
  variables = {"params": state.params, "router": state.router_bias}
  args = (batch["tokens"], batch["segment_ids"], batch["positions"])

  def parts(params):
    (logits, aux), sown = model.apply({**variables, "params": params}, *args, mutable=["losses"])
    from moe_jax.training.loss import masked_mean_nll
    kl = sum(jnp.sum(v) for v in jax.tree.leaves(sown["losses"]))
    return masked_mean_nll(logits, batch["tokens"], batch["segment_ids"], 1)[0], kl

  grads = jax.jit(lambda p: (jax.grad(lambda q: parts(q)[0])(p), jax.grad(lambda q: parts(q)[1])(p), parts(p)[1]))
  g_lm, g_kl, kl_value = grads(state.params)
  g_lm, g_kl = (traverse_util.flatten_dict(g, sep="/") for g in (g_lm, g_kl))
  for k in g_lm:
    if "/indexer/" in k:
      assert not np.any(np.asarray(g_lm[k])), k
      assert np.any(np.asarray(g_kl[k])), k
    else:
      assert not np.any(np.asarray(g_kl[k])), k
  assert float(kl_value) > 0


def test_index_kl_matches_a_numpy_rendering():
  """KL(p || softmax(I)) with p the head-averaged attention, over the support, averaged over valid queries."""
  from moe_jax.layers.indexer import index_kl_divergence
  rng = np.random.default_rng(4)
  B, H, T, S = 2, 3, 5, 7
  support = rng.random((B, T, S)) < 0.6
  support[..., 0] = True
  logits = rng.normal(size=(B, H, T, S))
  probs = np.where(support[:, None], np.exp(logits), 0.0)
  probs /= probs.sum(-1, keepdims=True)
  scores = rng.normal(size=(B, T, S)) * 2
  valid = rng.random((B, T)) < 0.8
  got = float(index_kl_divergence(jnp.asarray(probs, jnp.float32), jnp.asarray(scores, jnp.float32),
                                  jnp.asarray(support), jnp.asarray(valid)))
  total, n = 0.0, 0
  for b in range(B):
    for t in range(T):
      if not valid[b, t]:
        continue
      s = np.flatnonzero(support[b, t])
      p = probs[b][:, t][:, s].mean(0)
      q = np.exp(scores[b, t, s]) / np.exp(scores[b, t, s]).sum()
      total += float(np.sum(p * np.log(p / q)))
      n += 1
  assert got == pytest.approx(total / n, rel=1e-5)


def test_a_v3_model_becomes_v32_with_fresh_indexers():
  """V3 variables + new indexers: in the dense warm-up stage the V3.2 model computes exactly the V3 logits (the
  indexer only adds its loss), and nothing but indexer parameters is new."""
  from moe_jax.model import Transformer
  from moe_jax.model.variables import add_indexers
  v3_cfg = tiny_config(num_nextn_predict_layers=1, attention_impl="xla")  # the einsum form, as DSA runs
  _, v3 = init_params(v3_cfg)
  v3 = random_bias(v3)
  v32_cfg = tiny_config(num_nextn_predict_layers=1, attention_impl="xla", index_stage="dense_warmup", **DSA)
  v32 = add_indexers(v3, v32_cfg)
  new = set(traverse_util.flatten_dict(v32["params"], sep="/")) - set(traverse_util.flatten_dict(v3["params"], sep="/"))
  assert new and all("/indexer/" in k for k in new)
  tokens = jnp.asarray(np.random.default_rng(5).integers(0, v3_cfg.vocab_size, size=(2, 12)))
  want, _ = jax.jit(Transformer(v3_cfg).apply)(v3, tokens)
  got, _ = jax.jit(Transformer(v32_cfg).apply)(v32, tokens)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  with pytest.raises(ValueError, match="not a DSA indexer or LoRA parameter"):
    add_indexers(v3, tiny_config(num_nextn_predict_layers=2, **DSA))


def test_gathered_sparse_attention_matches_numpy_and_the_mask_form():
  """The gathered form (query blocks of 4 over 11 queries: padding included; a cache block with 3 of 5 slots
  valid; two documents) against a float64 numpy loop over queries, and its gradients against the mask form's."""
  from moe_jax.layers.attention import LatentCache, _attend
  from moe_jax.layers.indexer import IndexerProjections
  from moe_jax.layers.sparse_attention import attend_selected
  rng = np.random.default_rng(7)
  B, S, T, H, C, R, h, d, k = 2, 5, 11, 3, 6, 4, 2, 8, 4
  f = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)  # noqa: E731
  q_lat, q_rope = f(B, T, H, C), f(B, T, H, R)
  ckv_c, kpe_c, ckv_n, kpe_n = f(B, S, C), f(B, S, R), f(B, T, C), f(B, T, R)
  proj = IndexerProjections(f(B, T, h, d), f(B, T, h), f(B, T, d))
  ik_c = f(B, S, d)
  seg = jnp.asarray([[1] * 4 + [2] * 7, [1] * 11])
  cached = jnp.asarray([[True] * 3 + [False] * 2] * B)[:, None, None, :]
  scale = 0.3

  eye = jnp.broadcast_to(jnp.eye(C)[:, None, :], (C, H, C))  # W_UK = W_UV = I: q~ = q^C, o = the latent sum

  def gathered(q_lat, ckv_c, ckv_n):
    return attend_selected(q_lat, q_rope, eye, eye, [ckv_c, ckv_n], [kpe_c, kpe_n], proj.q_BThd, proj.w_BTh,
                           [ik_c, proj.k_BTd], cached, seg, topk=k, scale=scale, block=4, with_kl=True)

  o, kl = jax.jit(gathered)(q_lat, ckv_c, ckv_n)
  a = lambda x: np.asarray(x, np.float64)  # noqa: E731
  for b in range(B):
    for t in range(T):
      vis = [s for s in range(3)] + [S + s for s in range(t + 1) if seg[b, s] == seg[b, t]]
      ik = np.concatenate([a(ik_c[b]), a(proj.k_BTd[b])])
      dots = np.maximum(a(proj.q_BThd[b, t]) @ ik[vis].T / np.sqrt(d), 0)
      score = a(proj.w_BTh[b, t]) @ dots
      top = np.argsort(-score)[:k]
      keys = [vis[i] for i in top]
      ckv = np.concatenate([a(ckv_c[b]), a(ckv_n[b])])[keys]
      kpe = np.concatenate([a(kpe_c[b]), a(kpe_n[b])])[keys]
      logits = (a(q_lat[b, t]) @ ckv.T + a(q_rope[b, t]) @ kpe.T) * scale
      p = np.exp(logits - logits.max(-1, keepdims=True))
      p /= p.sum(-1, keepdims=True)
      np.testing.assert_allclose(a(o[b, t]), p @ ckv, rtol=1e-4, atol=1e-5)
      pm = p.mean(0)
      q = np.exp(score[top] - score[top].max())
      q /= q.sum()
      assert float(kl[b, t]) == pytest.approx(float(np.sum(pm * np.log(pm / q))), rel=1e-4, abs=1e-6)

  def mask_form(q_lat, ckv_c, ckv_n):  # the dense scores with the selection as a mask, naive form
    new_vis = attention_mask(seg)
    sel = select_top_k(visible_scores(proj, [ik_c, proj.k_BTd], [cached, new_vis]), [cached, new_vis], k)
    blocks = [(LatentCache(ckv_c, kpe_c), sel[0]), (LatentCache(ckv_n, kpe_n), sel[1])]
    return _attend(q_lat, q_rope, blocks, eye, eye, False, scale, jnp.float32)[0]

  np.testing.assert_allclose(np.asarray(mask_form(q_lat, ckv_c, ckv_n)), np.asarray(o), rtol=1e-5, atol=1e-5)
  r = f(B, T, H, C)
  g_want = jax.grad(lambda *x: jnp.sum(mask_form(*x) * r), argnums=(0, 1, 2))(q_lat, ckv_c, ckv_n)
  g_got = jax.grad(lambda *x: jnp.sum(gathered(*x)[0] * r), argnums=(0, 1, 2))(q_lat, ckv_c, ckv_n)
  chex.assert_trees_all_close(g_got, g_want, rtol=1e-4, atol=1e-5)
