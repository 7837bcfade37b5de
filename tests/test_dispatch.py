"""Grouped matmul and MoE dispatch against float64 numpy loops over experts."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax.kernels import BACKENDS, gmm
from moe_jax.layers.dispatch import capacity_dispatch, dropless_dispatch, expert_capacity
from numpy_reference import silu


def _np_gmm(lhs, rhs, sizes):
  out = np.zeros((lhs.shape[0], rhs.shape[2]))
  start = 0
  for e, n in enumerate(sizes):
    out[start:start + n] = lhs[start:start + n].astype(np.float64) @ rhs[e].astype(np.float64)
    start += n
  return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sizes", [[3, 0, 5, 0, 4], [0, 0, 17, 0, 0], [1, 2, 3, 4, 5]])
def test_gmm_forward_and_grads(backend, sizes):
  rng = np.random.default_rng(0)
  M = sum(sizes) + 3  # three padding rows past the last group
  lhs = rng.normal(size=(M, 6)).astype(np.float32)
  rhs = rng.normal(size=(5, 6, 7)).astype(np.float32)
  gs = jnp.asarray(sizes, jnp.int32)
  out = gmm(jnp.asarray(lhs), jnp.asarray(rhs), gs, backend=backend)
  np.testing.assert_allclose(out, _np_gmm(lhs, rhs, sizes), rtol=1e-5, atol=1e-5)
  assert np.all(np.asarray(out)[sum(sizes):] == 0)
  cot = rng.normal(size=(M, 7))
  cot[sum(sizes):] = 0
  g_lhs, g_rhs = jax.grad(lambda a, b: jnp.sum(gmm(a, b, gs, backend=backend) * cot), (0, 1))(
      jnp.asarray(lhs), jnp.asarray(rhs))
  exp_lhs = np.zeros_like(lhs, np.float64)
  exp_rhs = np.zeros_like(rhs, np.float64)
  start = 0
  for e, n in enumerate(sizes):
    exp_lhs[start:start + n] = cot[start:start + n] @ rhs[e].T
    exp_rhs[e] = lhs[start:start + n].T.astype(np.float64) @ cot[start:start + n]
    start += n
  np.testing.assert_allclose(g_lhs, exp_lhs, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(g_rhs, exp_rhs, rtol=1e-4, atol=1e-4)


def test_gmm_bfloat16():
  rng = np.random.default_rng(1)
  lhs, rhs, sizes = rng.normal(size=(20, 16)), rng.normal(size=(3, 16, 8)), [7, 0, 13]
  out = gmm(jnp.asarray(lhs, jnp.bfloat16), jnp.asarray(rhs, jnp.bfloat16), jnp.asarray(sizes),
            preferred_element_type=jnp.float32)
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(out, _np_gmm(lhs, rhs, sizes), rtol=0.05, atol=0.3)


def test_unknown_backend_names_backend_and_platform():
  with pytest.raises(ValueError, match=r"gmm backend 'triton' is not one of .* \(platform 'cpu'\)"):
    gmm(jnp.ones((2, 2)), jnp.ones((1, 2, 2)), jnp.asarray([2]), backend="triton")


def _experts(E=6, D=8, F=5, seed=0):
  rng = np.random.default_rng(seed)
  return [rng.normal(size=s).astype(np.float32) * 0.5 for s in ((E, D, F), (E, D, F), (E, F, D))]


def _np_moe(x, idx, w, wg, wu, wd, keep=None):
  x = x.astype(np.float64)
  out = np.zeros_like(x)
  for t in range(x.shape[0]):
    for k in range(idx.shape[1]):
      if keep is not None and not keep[t, k]:
        continue
      e = idx[t, k]
      out[t] += w[t, k] * ((silu(x[t] @ wg[e]) * (x[t] @ wu[e])) @ wd[e])
  return out


def _routing(T=24, K=2, E=6, seed=0, skip=(1, 4)):
  rng = np.random.default_rng(seed)
  allowed = [e for e in range(E) if e not in skip]  # experts 1 and 4 stay empty
  idx = np.stack([rng.choice(allowed, K, replace=False) for _ in range(T)]).astype(np.int32)
  return idx, rng.random((T, K)).astype(np.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropless_matches_loop_reference_with_empty_experts(backend):
  wg, wu, wd = _experts()
  idx, w = _routing()
  x = np.random.default_rng(3).normal(size=(24, 8)).astype(np.float32)
  y = dropless_dispatch(jnp.asarray(x), jnp.asarray(idx), jnp.asarray(w), wg, wu, wd, backend=backend)
  np.testing.assert_allclose(y, _np_moe(x, idx, w, wg, wu, wd), rtol=1e-5, atol=1e-5)


def test_dropless_gradients_equal_across_backends():
  wg, wu, wd = _experts()
  idx, w = _routing()
  x = jnp.asarray(np.random.default_rng(3).normal(size=(24, 8)), jnp.float32)

  def loss(backend):
    return lambda x, w_, g: jnp.sum(dropless_dispatch(x, jnp.asarray(idx), w_, g, wu, wd, backend=backend) ** 2)

  grads = [jax.grad(loss(b), (0, 1, 2))(x, jnp.asarray(w), jnp.asarray(wg)) for b in BACKENDS]
  chex.assert_trees_all_close(grads[0], grads[1], rtol=1e-4, atol=1e-5)


def test_capacity_drops_exactly_the_overflow():
  E, K, T = 6, 2, 24
  wg, wu, wd = _experts(E)
  idx, w = _routing(T, K, E, skip=(1,))
  x = np.random.default_rng(4).normal(size=(T, 8)).astype(np.float32)
  factor = 0.75
  C = expert_capacity(T, K, E, factor)
  # Reference: copies claim slots in priority order (all k=0 before k=1, tokens in order).
  keep = np.zeros((T, K), bool)
  used = np.zeros(E, int)
  for k in range(K):
    for t in range(T):
      e = idx[t, k]
      if used[e] < C:
        keep[t, k], used[e] = True, used[e] + 1
  assert 0 < (~keep).sum() < T * K, "the test must drop some copies but not all"
  y, dropped = capacity_dispatch(jnp.asarray(x), jnp.asarray(idx), jnp.asarray(w), wg, wu, wd, capacity_factor=factor)
  np.testing.assert_allclose(y, _np_moe(x, idx, w, wg, wu, wd, keep), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(float(dropped), (~keep).mean(), rtol=1e-6)
  # With ample capacity nothing is dropped and capacity equals dropless.
  y2, dropped2 = capacity_dispatch(jnp.asarray(x), jnp.asarray(idx), jnp.asarray(w), wg, wu, wd, capacity_factor=E)
  assert float(dropped2) == 0.0
  np.testing.assert_allclose(y2, _np_moe(x, idx, w, wg, wu, wd), rtol=1e-5, atol=1e-5)
