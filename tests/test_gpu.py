"""Checks that only an NVIDIA GPU can run: the GPU grouped-matmul kernels and cuDNN attention on the hardware,
against float64 numpy loops and the einsum attention. Skipped on CPU (CI); run on a lent GPU with

    python -m pytest -q tests/test_gpu.py
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytestmark = pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs an NVIDIA GPU")

from test_attention_backends import _mla_setup, _numpy_attention, _packed_segments, _random_qkv  # noqa: E402
from test_kernels import _np_gmm, _np_tgmm  # noqa: E402

from helpers import max_rel_err  # noqa: E402
from moe_jax.kernels import gmm, tgmm  # noqa: E402
from moe_jax.kernels.attention import attend  # noqa: E402


@pytest.mark.parametrize("backend", ["ragged_dot", "tiled", "mgpu_ragged_dot", "pallas_mosaic_gpu"])
def test_gpu_gmm_backends_equal_float64_loop(backend):
  """bf16 inputs, float32 output, V3-like feature sizes (I=512, O=256), 8 experts with empty ones and sizes
  that are no multiple of any tile."""
  sizes = [300, 0, 1025, 7, 0, 512, 129, 600]
  rng = np.random.default_rng(0)
  M, I, O = sum(sizes) + 50, 512, 256
  rnd = lambda *s: np.asarray(jnp.asarray(rng.normal(size=s), jnp.bfloat16).astype(jnp.float32))  # noqa: E731
  lhs, rhs, cot = rnd(M, I), rnd(len(sizes), I, O), rnd(M, O)
  gs = jnp.asarray(sizes, jnp.int32)
  bf = lambda a: jnp.asarray(a, jnp.bfloat16)  # noqa: E731
  out = jax.jit(lambda a, b: gmm(a, b, gs, backend=backend, preferred_element_type=jnp.float32))(bf(lhs), bf(rhs))
  d_rhs = jax.jit(lambda a, c: tgmm(a, c, gs, backend=backend, preferred_element_type=jnp.float32))(bf(lhs), bf(cot))
  live = sum(sizes)
  assert max_rel_err(out, _np_gmm(lhs, rhs, sizes)) < 1e-2
  assert np.all(np.asarray(out)[live:] == 0)
  assert max_rel_err(d_rhs, _np_tgmm(lhs, cot * (np.arange(M) < live)[:, None], sizes)) < 1e-2


@pytest.mark.parametrize("impl", ["cudnn", "blockwise"])
def test_gpu_attention_kernels_equal_float64(impl):
  rng = np.random.default_rng(0)
  B, T = 2, 300
  seg, _ = _packed_segments(rng, B, T)
  args = _random_qkv(rng, B, T, H=4, N=128, R=64, A=128)
  bf = [a.astype(jnp.bfloat16) for a in args]
  out = jax.jit(lambda *a: attend(impl, *a, jnp.asarray(seg), scale=192**-0.5, block=128))(*bf)
  assert max_rel_err(out.astype(jnp.float32), _numpy_attention(*bf, seg, 192**-0.5)) < 2e-2


@pytest.mark.parametrize("impl", ["cudnn", "blockwise"])
def test_gpu_mla_gradients_equal_xla_in_bfloat16(impl):
  params, x, f_ref = _mla_setup(True, "xla", "float32", T=256)
  _, _, f = _mla_setup(True, impl, "bfloat16", T=256)
  _, (g_params, g_x) = f(params, x)
  _, (g_params_ref, g_x_ref) = f_ref(params, x)
  assert max_rel_err(g_x, g_x_ref) < 3e-2
  for g, g_ref in zip(jax.tree.leaves(g_params), jax.tree.leaves(g_params_ref)):
    assert max_rel_err(g, g_ref) < 3e-2
