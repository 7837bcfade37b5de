"""moe_jax.kernels: gmm / tgmm on every backend (Pallas ones in interpret mode), layouts and permutes, against
float64 numpy loops over experts."""

import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax import kernels
from moe_jax.kernels import SIMULATABLE, gmm, interpret_kernels, pallas_mosaic_gpu, pallas_tpu, tgmm

# Group sizes: empty experts, one huge expert, sizes that are no multiple of any tile, all empty.
CASES = [[3, 0, 5, 0, 4], [0, 0, 150, 0, 0], [1, 70, 0, 129, 5], [0, 0, 0]]


def _np_gmm(lhs, rhs, sizes):
  out, start = np.zeros((lhs.shape[0], rhs.shape[2])), 0
  for e, n in enumerate(sizes):
    out[start:start + n] = lhs[start:start + n].astype(np.float64) @ rhs[e].astype(np.float64)
    start += n
  return out


def _np_tgmm(lhs, dout, sizes):
  out, start = np.zeros((len(sizes), lhs.shape[1], dout.shape[1])), 0
  for e, n in enumerate(sizes):
    out[e] = lhs[start:start + n].T.astype(np.float64) @ dout[start:start + n].astype(np.float64)
    start += n
  return out


def _draw(sizes, K, N, dtype, seed):
  rng = np.random.default_rng(seed)
  M = sum(sizes) + 3  # three padding rows past the last group
  lhs = rng.normal(size=(M, K)).astype(np.float32)
  rhs = rng.normal(size=(len(sizes), K, N)).astype(np.float32)
  cot = rng.normal(size=(M, N)).astype(np.float32)
  # Inputs rounded to the test dtype so the float64 reference sees exactly what the kernel sees.
  lhs, rhs, cot = (np.asarray(jnp.asarray(a, dtype).astype(jnp.float32)) for a in (lhs, rhs, cot))
  return lhs, rhs, cot


@pytest.mark.parametrize("backend", SIMULATABLE)
@pytest.mark.parametrize("case", range(len(CASES)))
def test_gmm_forward_and_both_gradients_match_float64_loop(backend, case):
  sizes = CASES[case]
  lhs, rhs, cot = _draw(sizes, 24, 40, jnp.float32, case)
  gs = jnp.asarray(sizes, jnp.int32)
  def run(a, b, c):
    out, vjp = jax.vjp(lambda a_, b_: gmm(a_, b_, gs, backend=backend), a, b)
    return (out,) + vjp(c)
  with interpret_kernels():
    out, g_lhs, g_rhs = jax.jit(run)(jnp.asarray(lhs), jnp.asarray(rhs), jnp.asarray(cot))
  M, live = lhs.shape[0], sum(sizes)
  np.testing.assert_allclose(out, _np_gmm(lhs, rhs, sizes), rtol=1e-4, atol=1e-4)
  assert np.all(np.asarray(out)[live:] == 0), "rows past the groups must be zero"
  cot_live = cot.astype(np.float64) * (np.arange(M) < live)[:, None]  # padding rows' output is not read
  exp_lhs = np.zeros_like(lhs, np.float64)
  start = 0
  for e, n in enumerate(sizes):
    exp_lhs[start:start + n] = cot_live[start:start + n] @ rhs[e].T.astype(np.float64)
    start += n
  np.testing.assert_allclose(g_lhs, exp_lhs, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(g_rhs, _np_tgmm(lhs, cot_live, sizes), rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("backend", SIMULATABLE)
def test_gmm_bfloat16_inputs_float32_accumulation(backend):
  sizes = [40, 0, 90, 1]
  lhs, rhs, cot = _draw(sizes, 64, 32, jnp.bfloat16, 7)
  gs = jnp.asarray(sizes, jnp.int32)
  with interpret_kernels():  # jitted: eager calls into interpreted kernels can deadlock (see test_dispatch.py)
    out, d_rhs = jax.jit(lambda l, r, c: (gmm(l, r, gs, backend=backend, preferred_element_type=jnp.float32),
                                          tgmm(l, c, gs, backend=backend, preferred_element_type=jnp.float32)))(
        jnp.asarray(lhs, jnp.bfloat16), jnp.asarray(rhs, jnp.bfloat16), jnp.asarray(cot, jnp.bfloat16))
  assert out.dtype == jnp.float32 and d_rhs.dtype == jnp.float32
  # Exact products of bf16 inputs, summed in float32: only summation-order error remains.
  np.testing.assert_allclose(out, _np_gmm(lhs, rhs, sizes), rtol=1e-4, atol=1e-3)
  np.testing.assert_allclose(d_rhs, _np_tgmm(lhs, cot, sizes), rtol=1e-4, atol=1e-3)


def test_pallas_tpu_kernel_with_tiles_straddling_groups():
  """Small tiles so that row tiles straddle up to three groups and K, N need several blocks."""
  sizes = [5, 0, 23, 1, 0, 2, 17, 0]
  lhs, rhs, cot = _draw(sizes, 40, 24, jnp.float32, 11)
  gs = jnp.asarray(sizes, jnp.int32)
  out = pallas_tpu.gmm(jnp.asarray(lhs), jnp.asarray(rhs), gs, jnp.float32, tiling=(8, 16, 8), interpret=True)
  jax.block_until_ready(out)  # one interpreted kernel at a time (their callbacks dispatch work of their own)
  d_rhs = pallas_tpu.tgmm(jnp.asarray(lhs), jnp.asarray(cot), gs, jnp.float32, tiling=(8, 16, 8), interpret=True)
  np.testing.assert_allclose(out, _np_gmm(lhs, rhs, sizes), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(d_rhs, _np_tgmm(lhs, cot, sizes), rtol=1e-4, atol=1e-4)
  group_W, m_tile_W, live = pallas_tpu.work_items(gs, lhs.shape[0], 8)
  # Every (group, row tile) overlap is visited exactly once; the static bound is ceil(M/tm) + E - 1.
  starts = np.cumsum([0] + sizes)
  expected = [(e, m) for e, n in enumerate(sizes) if n
              for m in range(starts[e] // 8, (starts[e] + n - 1) // 8 + 1)]
  assert list(zip(np.asarray(group_W)[:int(live)], np.asarray(m_tile_W)[:int(live)])) == expected
  assert group_W.shape[0] == -(-lhs.shape[0] // 8) + len(sizes) - 1


def test_mosaic_gpu_tile_kernel_persistent_grid_skips_dead_tiles():
  """More work items than persistent CTAs, several K steps and column blocks; dead tiles are not written."""
  rng = np.random.default_rng(5)
  X, R, K, N, E = 5, 64, 48, 64, 3
  lhs = jnp.asarray(rng.normal(size=(X, R, K)), jnp.bfloat16)
  rhs = jnp.asarray(rng.normal(size=(E, K, N)), jnp.bfloat16)
  group = np.array([0, 0, 2, 2, 2], np.int32)
  out = pallas_mosaic_gpu.tile_gmm(lhs, rhs, jnp.asarray(group), jnp.asarray(4), jnp.float32, interpret=True,
                                   tn=32, tk=16, num_sms=3)
  exp = np.einsum("xrk,xkn->xrn", np.asarray(lhs, np.float64), np.asarray(rhs, np.float64)[group])
  np.testing.assert_allclose(np.asarray(out)[:4], exp[:4], rtol=1e-4, atol=1e-3)
  assert not np.allclose(np.asarray(out)[4], exp[4]), "the dead tile must be skipped"


def _np_layout_check(expert_M, lay, E):
  M = expert_M.shape[0]
  copy_of_slot, slot_of_copy = np.asarray(lay.copy_of_slot_P), np.asarray(lay.slot_of_copy_M)
  live = copy_of_slot < M
  assert sorted(copy_of_slot[live].tolist()) == list(range(M)), "each copy sits in exactly one slot"
  np.testing.assert_array_equal(copy_of_slot[slot_of_copy], np.arange(M))
  np.testing.assert_array_equal(np.asarray(lay.group_sizes_E), np.bincount(expert_M, minlength=E))
  return copy_of_slot, live


def test_layouts_sort_copies_by_expert_and_align_tiles():
  rng = np.random.default_rng(2)
  E, M, R = 6, 90, 8
  expert_M = rng.choice([0, 2, 3, 5], size=M).astype(np.int32)  # experts 1 and 4 empty
  rows = kernels.rows_layout(jnp.asarray(expert_M), E)
  copy_of_slot, _ = _np_layout_check(expert_M, rows, E)
  np.testing.assert_array_equal(copy_of_slot, np.argsort(expert_M, kind="stable"))
  tiles = kernels.tiles_layout(jnp.asarray(expert_M), E, R)
  copy_of_slot, live = _np_layout_check(expert_M, tiles, E)
  assert copy_of_slot.shape[0] == (-(-M // R) + E) * R
  slot_tile = np.arange(copy_of_slot.shape[0]) // R
  np.testing.assert_array_equal(np.asarray(tiles.tile_group_X)[slot_tile[live]], expert_M[copy_of_slot[live]])
  assert np.all(np.diff(copy_of_slot[live]) != 0)


def test_permute_unpermute_values_and_gradients():
  """Against the plain gather + weighted sum differentiated by JAX (scatter-add transposes)."""
  rng = np.random.default_rng(4)
  T, K, E, D = 13, 3, 5, 6
  idx = jnp.asarray(np.stack([rng.choice(E, K, replace=False) for _ in range(T)]), jnp.int32)
  x = jnp.asarray(rng.normal(size=(T, D)), jnp.float32)
  w = jnp.asarray(rng.random((T, K)), jnp.float32)
  lay = kernels.tiles_layout(idx.reshape(-1), E, 4)
  scale = jnp.asarray(rng.normal(size=(lay.num_slots, D)), jnp.float32)

  def fused(x, w):
    xs = kernels.permute(x, lay.copy_of_slot_P, lay.slot_of_copy_M, K)
    return kernels.unpermute(jnp.tanh(xs * scale), w, lay.copy_of_slot_P, lay.slot_of_copy_M)

  def plain(x, w):
    M = T * K
    live = lay.copy_of_slot_P < M
    xs = jnp.where(live[:, None], x[jnp.minimum(lay.copy_of_slot_P, M - 1) // K], 0)
    ys = jnp.tanh(xs * scale)
    return jnp.einsum("tkd,tk->td", ys[lay.slot_of_copy_M].reshape(T, K, D), w)

  chex.assert_trees_all_close(fused(x, w), plain(x, w), rtol=1e-6, atol=1e-6)
  loss = lambda f: lambda x, w: jnp.sum(jnp.sin(f(x, w)))
  chex.assert_trees_all_close(jax.grad(loss(fused), (0, 1))(x, w), jax.grad(loss(plain), (0, 1))(x, w),
                              rtol=1e-5, atol=1e-6)


def test_backend_errors_name_backend_and_platform():
  with pytest.raises(ValueError, match=r"gmm backend 'triton' is not one of .* \(platform 'cpu'\)"):
    gmm(jnp.ones((2, 2)), jnp.ones((1, 2, 2)), jnp.asarray([2]), backend="triton")
  for backend in ("pallas_tpu", "pallas_mosaic_gpu", "megablox", "mgpu_ragged_dot"):
    with pytest.raises(ValueError, match=rf"gmm backend '{backend}' cannot run on platform 'cpu'"):
      gmm(jnp.ones((2, 2)), jnp.ones((1, 2, 2)), jnp.asarray([2]), backend=backend)
  gmm_module = sys.modules["moe_jax.kernels.gmm"]  # (the package's `gmm` attribute is the function)
  with pytest.MonkeyPatch.context() as mp, pytest.raises(ValueError, match=r"moe_jax\[tokamax\]"):
    mp.setattr(gmm_module, "_tokamax_installed", lambda: False)
    gmm(jnp.ones((2, 2)), jnp.ones((1, 2, 2)), jnp.asarray([2]), backend="tokamax")
  with interpret_kernels(), pytest.raises(ValueError, match="no interpret mode"):
    gmm(jnp.ones((2, 2)), jnp.ones((1, 2, 2)), jnp.asarray([2]), backend="mgpu_ragged_dot")


def test_auto_picks_only_validated_backends():
  assert kernels.resolve_backend("auto", "cpu") == "tiled"
  for platform in ("gpu", "cuda"):
    assert kernels.resolve_backend("auto", platform) == "ragged_dot"  # experimental kernels stay opt-in
  assert kernels.resolve_backend("auto", "tpu") == "megablox"  # upstream's TPU kernel, run here in interpret mode


def test_tiled_gmm_traces_once_per_shape():
  fn = jax.jit(chex.assert_max_traces(lambda a, b, g: gmm(a, b, g, backend="tiled"), n=1))
  rng = np.random.default_rng(0)
  a, b = jnp.asarray(rng.normal(size=(20, 8)), jnp.float32), jnp.asarray(rng.normal(size=(3, 8, 4)), jnp.float32)
  for sizes in ([5, 5, 10], [0, 20, 0], [1, 2, 3]):  # group sizes are data: no retrace
    fn(a, b, jnp.asarray(sizes, jnp.int32))


@pytest.mark.parametrize("formulation", ["loop", "batched"])
def test_tiled_formulations_with_chunking(monkeypatch, formulation):
  """Both platform formulations of the tiled backend; a tiny chunk budget makes "batched" loop over chunks."""
  monkeypatch.setattr(kernels.xla_tiled, "_FORCE_FORMULATION", formulation)
  monkeypatch.setattr(kernels.xla_tiled, "_CHUNK_BYTES", 3 * 16 * 8 * 4)
  sizes = [30, 0, 77, 12]
  lhs, rhs, cot = _draw(sizes, 16, 8, jnp.float32, 3)
  gs = jnp.asarray(sizes, jnp.int32)
  out, vjp = jax.vjp(lambda a, b: gmm(a, b, gs, backend="tiled"), jnp.asarray(lhs), jnp.asarray(rhs))
  g_lhs, g_rhs = vjp(jnp.asarray(cot))
  live = (np.arange(lhs.shape[0]) < sum(sizes))[:, None]
  np.testing.assert_allclose(out, _np_gmm(lhs, rhs, sizes), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(g_rhs, _np_tgmm(lhs, cot * live, sizes), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(g_lhs, _np_gmm(cot * live, np.swapaxes(rhs, 1, 2), sizes), rtol=1e-4, atol=1e-4)


def test_mosaic_gpu_tgmm_kernel_walks_each_experts_tiles():
  """Several K and N blocks, more work items than CTAs, an empty expert (zeros) and dead tiles (ignored)."""
  rng = np.random.default_rng(6)
  X, R, K, N, E = 5, 64, 128, 32, 4
  lhs = jnp.asarray(rng.normal(size=(X, R, K)), jnp.bfloat16)
  dout = jnp.asarray(rng.normal(size=(X, R, N)), jnp.bfloat16)
  group = np.array([0, 0, 2, 3, 3], np.int32)  # expert 1 empty; tile 4 dead (live = 4)
  out = pallas_mosaic_gpu.tile_tgmm(lhs, dout, jnp.asarray(group), jnp.asarray(4), E, jnp.float32, interpret=True,
                                    tk=64, tn=16, num_sms=5)
  l64, d64 = np.asarray(lhs, np.float64), np.asarray(dout, np.float64)
  exp = np.zeros((E, K, N))
  for x in range(4):
    exp[group[x]] += l64[x].T @ d64[x]
  np.testing.assert_allclose(out, exp, rtol=1e-4, atol=1e-3)
