"""Router properties against a per-token numpy reference and the V3 balance-loss equations."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import tiny_config
from moe_jax.layers.router import Router, balance_statistics, select_experts
import numpy_reference as ref


def _cfg(**kw):
  return tiny_config(n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2, **kw)


def _scores(shape, seed=0):
  return jax.nn.sigmoid(jax.random.normal(jax.random.PRNGKey(seed), shape) * 2)


def test_v3_selection_matches_per_token_reference():
  cfg = _cfg()
  logits = np.random.default_rng(0).normal(size=(3, 10, 16)) * 2
  bias = np.random.default_rng(1).normal(size=16) * 0.5
  idx, w = select_experts(jax.nn.sigmoid(jnp.asarray(logits, jnp.float32)), jnp.asarray(bias, jnp.float32), cfg)
  for b in range(3):
    for t in range(10):
      chosen, weights = ref.route(logits[b, t], bias, cfg)
      order = np.argsort(chosen)
      got = np.argsort(np.asarray(idx[b, t]))
      np.testing.assert_array_equal(np.asarray(idx[b, t])[got], np.asarray(chosen)[order])
      np.testing.assert_allclose(np.asarray(w[b, t])[got], weights[order], rtol=1e-5)


def test_chosen_experts_lie_in_kept_groups_and_weights_sum_to_scale():
  cfg = _cfg()
  s = _scores((4, 32, 16))
  bias = jax.random.normal(jax.random.PRNGKey(3), (16,)) * 0.3
  idx, w = select_experts(s, bias, cfg)
  groups = np.asarray(idx) // (16 // 4)
  assert max(len(set(g)) for g in groups.reshape(-1, 4)) <= cfg.topk_group
  biased = np.asarray(s + bias).reshape(4, 32, 4, 4)
  gscore = np.sort(biased, -1)[..., -2:].sum(-1)
  kept = np.argsort(-gscore, -1)[..., :2]
  for g, k in zip(groups.reshape(-1, 4), kept.reshape(-1, 2)):
    assert set(g) <= set(k)
  np.testing.assert_allclose(np.asarray(w).sum(-1), cfg.routed_scaling_factor, rtol=1e-5)


def test_bias_changes_choice_not_weight_formula():
  cfg = _cfg()
  s = _scores((2, 64, 16), seed=5)
  bias = jnp.zeros(16).at[3].set(10.0)  # expert 3 always selected once biased
  idx0, _ = select_experts(s, None, cfg)
  idx1, w1 = select_experts(s, bias, cfg)
  assert np.all(np.any(np.asarray(idx1) == 3, -1)) and not np.all(np.any(np.asarray(idx0) == 3, -1))
  chosen_scores = np.take_along_axis(np.asarray(s), np.asarray(idx1), -1)  # unbiased affinities
  expect = chosen_scores / chosen_scores.sum(-1, keepdims=True) * cfg.routed_scaling_factor
  np.testing.assert_allclose(np.asarray(w1), expect, rtol=1e-5)


def test_softmax_greedy_is_plain_topk_without_normalisation():
  cfg = _cfg(scoring_func="softmax", topk_method="greedy", norm_topk_prob=False, routed_scaling_factor=1.5)
  s = jax.nn.softmax(jax.random.normal(jax.random.PRNGKey(2), (2, 8, 16)), -1)
  idx, w = select_experts(s, None, cfg)
  top = np.argsort(-np.asarray(s), -1)[..., :4]
  np.testing.assert_array_equal(np.sort(np.asarray(idx), -1), np.sort(top, -1))
  np.testing.assert_allclose(np.asarray(w), np.take_along_axis(np.asarray(s), np.asarray(idx), -1) * 1.5, rtol=1e-6)


@pytest.mark.parametrize("seq_aux", [True, False])
def test_balance_loss_and_load_match_equations(seq_aux):
  cfg = _cfg(seq_aux=seq_aux, aux_loss_alpha=0.01)
  s = _scores((3, 20, 16), seed=7)
  idx, _ = select_experts(s, None, cfg)
  valid = np.ones((3, 20), bool)
  valid[1, 15:] = False  # padding at the end of row 1
  load, loss = balance_statistics(s, idx, jnp.asarray(valid), cfg)
  s64, idx64 = np.asarray(s, np.float64), np.asarray(idx)
  E, K = 16, 4
  rows = [(b,) for b in range(3)] if seq_aux else [tuple(range(3))]
  per = []
  for r in rows:
    toks = [(b, t) for b in r for t in range(20) if valid[b, t]]
    T = len(toks)
    f = np.zeros(E)
    P = np.zeros(E)
    for b, t in toks:
      for e in idx64[b, t]:
        f[e] += E / (K * T)
      P += s64[b, t] / s64[b, t].sum() / T
    per.append((f * P).sum())
  np.testing.assert_allclose(float(loss), 0.01 * np.mean(per), rtol=1e-5)
  expect_load = np.zeros(E)
  for b in range(3):
    for t in range(20):
      if valid[b, t]:
        np.add.at(expect_load, idx64[b, t], 1)
  np.testing.assert_array_equal(np.asarray(load), expect_load)


def test_router_bias_gets_no_gradient():
  cfg = _cfg()
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, cfg.hidden_size))
  valid = jnp.ones((2, 8), bool)
  variables = nn.meta.unbox(Router(cfg).init(jax.random.PRNGKey(1), x, valid))
  assert set(variables["router"]) == {"e_score_correction_bias"} and "e_score_correction_bias" not in variables["params"]
  variables["router"] = {"e_score_correction_bias": jnp.linspace(-0.3, 0.3, cfg.n_routed_experts)}

  def loss(v):
    out = Router(cfg).apply(v, x, valid)
    return jnp.sum(out.topk_weight_BTK ** 2) + out.balance_loss

  g = jax.grad(loss)(variables)
  assert float(jnp.abs(g["router"]["e_score_correction_bias"]).max()) == 0.0
  assert float(jnp.abs(g["params"]["kernel"]).max()) > 0.0
