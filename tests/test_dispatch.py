"""MoE dispatch (dropless with every gmm backend, capacity) against float64 numpy loops over experts; the gmm
kernels themselves are tested in test_kernels.py."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax.kernels import SIMULATABLE, interpret_kernels
from moe_jax.layers.dispatch import capacity_dispatch, dropless_dispatch, expert_capacity
from numpy_reference import silu


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


@pytest.mark.parametrize("backend", SIMULATABLE)
def test_dropless_matches_loop_reference_with_empty_experts(backend):
  wg, wu, wd = _experts()
  idx, w = _routing()
  x = np.random.default_rng(3).normal(size=(24, 8)).astype(np.float32)
  # Pallas backends run in interpret mode on CPU. Jitted: run eagerly, the main thread's next op could queue
  # behind the interpreted kernel whose io_callbacks dispatch ops of their own, and both wait (seen once in CI).
  with interpret_kernels():
    y = jax.jit(lambda *a: dropless_dispatch(*a, backend=backend))(jnp.asarray(x), jnp.asarray(idx), jnp.asarray(w),
                                                                   wg, wu, wd)
  np.testing.assert_allclose(y, _np_moe(x, idx, w, wg, wu, wd), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", [b for b in SIMULATABLE if b != "reference"])
def test_dropless_gradients_equal_reference(backend):
  """Gradients through permute, gmm's custom vjp and unpermute equal autodiff of the loop-over-experts gmm."""
  wg, wu, wd = _experts()
  idx, w = _routing()
  x = jnp.asarray(np.random.default_rng(3).normal(size=(24, 8)), jnp.float32)
  args = (x, jnp.asarray(w), jnp.asarray(wg), jnp.asarray(wu), jnp.asarray(wd))

  def loss(backend):
    return lambda *a: jnp.sum(jnp.sin(dropless_dispatch(a[0], jnp.asarray(idx), *a[1:], backend=backend)))

  with interpret_kernels():
    got = jax.jit(jax.grad(loss(backend), range(5)))(*args)
  want = jax.jit(jax.grad(loss("reference"), range(5)))(*args)
  chex.assert_trees_all_close(got, want, rtol=1e-4, atol=1e-5)


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
