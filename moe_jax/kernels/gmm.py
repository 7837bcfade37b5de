"""Grouped matmul (gmm): out[m] = lhs[m] @ rhs[group(m)], groups given as sizes of consecutive row blocks.

    gmm : out_MO[m]  = lhs_MI[m] @ rhs_EIO[e(m)]                 (rows of group e are contiguous, in order)
    tgmm: out_EIO[e] = sum_{m in group e} lhs_MI[m]^T dout_MO[m]  (the weight gradient)
The vjp of gmm is  d lhs = gmm(dout, rhs^T)  and  d rhs = tgmm(lhs, dout), which is what the `custom_vjp` below
calls for the tiled and Pallas backends (the others are differentiated by JAX).

Backends (`BACKENDS`):
- "tiled": portable XLA on the tiles layout (`xla_tiled.py`); cost ~ the rows' FLOPs whatever E is. Default on
  CPU, validated on CPU.
- "ragged_dot": `jax.lax.ragged_dot` (JAX's own AD). On CPU it computes every group densely (cost ~ E x the
  active FLOPs); on GPU/TPU the compiler decides. Default on GPU (run on a lent H100 in issue #2's session; see
  docs/benchmarks.md): the only GPU backend validated on a Hopper so far.
- "megablox": jax's own Pallas TPU kernels (`jax.experimental.pallas.ops.tpu.megablox` gmm/tgmm, what MaxText
  runs; `megablox.py`). Default on TPU: upstream ships it as the TPU kernel and our tests ran it in the TPU
  interpreter on CPU (no TPU has been lent to this project).
- "mgpu_ragged_dot": jax's own Pallas Mosaic GPU kernels for Hopper (`ragged_dot_mgpu` /
  `transposed_ragged_dot_mgpu`; `mgpu_ragged_dot.py`). Opt-in until it has run on a lent Hopper.
- "tokamax": openxla's `tokamax.ragged_dot` (its own kernels and AD: Mosaic on TPU/Hopper, Triton, or XLA,
  whichever it finds best), where the optional package installs (`pip install 'moe_jax[tokamax]'`). Opt-in.
- "pallas_tpu": our megablox-style Pallas TPU kernel (`pallas_tpu.py`), kept to compare side by side.
  EXPERIMENTAL: checked only in the TPU interpreter on CPU; never run on a TPU. Opt-in.
- "pallas_mosaic_gpu": Pallas Mosaic GPU (Hopper wgmma) kernel (`pallas_mosaic_gpu.py`). EXPERIMENTAL: opt-in
  until it has been validated on a lent H100 (see docs/benchmarks.md). Kept to compare with jax's own.
- "reference": a loop over experts of masked dense matmuls (E dense matmuls). Only an independent check.

Rows past sum(group_sizes) belong to no group: their output (and their lhs gradient) is zero.
Pallas backends run on CPU only in interpret mode: pass `interpret=True` or use `interpret_kernels()`.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from moe_jax.kernels import megablox, pallas_tpu, xla_tiled
from moe_jax.kernels.interpret import interpret_kernels, interpreting, resolve_for_platform
from moe_jax.kernels.shapes import zero_rows_past_groups
from moe_jax.kernels.vma import cast_varying, match_varying, varying_axes

BACKENDS = ("tiled", "ragged_dot", "megablox", "mgpu_ragged_dot", "tokamax", "pallas_tpu", "pallas_mosaic_gpu",
            "reference")
# Where each backend runs natively. Pallas backends also run anywhere in interpret mode (slow; for tests).
_NATIVE = {"tiled": None, "ragged_dot": None, "reference": None, "tokamax": None, "pallas_tpu": ("tpu",),
           "megablox": ("tpu",), "pallas_mosaic_gpu": ("gpu", "cuda"), "mgpu_ragged_dot": ("gpu", "cuda")}
_NO_INTERPRET = ("mgpu_ragged_dot",)  # Mosaic GPU kernels written for hardware only


def _tokamax_installed() -> bool:
  import importlib.util
  return importlib.util.find_spec("tokamax") is not None


# Run on CPU (Pallas ones interpreted; tokamax where the optional package is installed).
_INTERPRETABLE = tuple(b for b in BACKENDS if b not in _NO_INTERPRET)
SIMULATABLE = tuple(b for b in _INTERPRETABLE if b != "tokamax" or _tokamax_installed())
# `auto` picks only backends validated on that platform (experimental kernels are opt-in).
_AUTO = {"cpu": "tiled", "gpu": "ragged_dot", "cuda": "ragged_dot", "rocm": "ragged_dot", "tpu": "megablox"}

__all__ = ["BACKENDS", "SIMULATABLE", "gmm", "interpret_kernels", "resolve_backend", "tgmm"]


def resolve_backend(backend: str, platform: str | None = None, interpret: bool | None = None) -> str:
  """Maps "auto" to the platform's validated default; raises if `backend` is unknown or cannot run here."""
  if backend == "tokamax" and not _tokamax_installed():
    raise ValueError("gmm backend 'tokamax' needs the optional tokamax package: pip install 'moe_jax[tokamax]'")
  return resolve_for_platform("gmm backend", backend, BACKENDS, _NATIVE, _AUTO, "tiled", _INTERPRETABLE,
                              "backend='auto' or 'tiled'", platform, interpret)


def _reference(lhs_MI, rhs_EIO, group_sizes_E, out_dtype):
  ends_E = jnp.cumsum(group_sizes_E)
  starts_E = ends_E - group_sizes_E
  rows_M = jnp.arange(lhs_MI.shape[0])
  out_MO = jnp.zeros((lhs_MI.shape[0], rhs_EIO.shape[2]), out_dtype)
  for e in range(rhs_EIO.shape[0]):
    in_group_M = (rows_M >= starts_E[e]) & (rows_M < ends_E[e])
    prod_MO = jnp.dot(lhs_MI, rhs_EIO[e], preferred_element_type=out_dtype)
    out_MO = out_MO + jnp.where(in_group_M[:, None], prod_MO, 0)
  return out_MO


def _impl(backend: str, interpret: bool):
  """(gmm, tgmm) forward functions of a custom-vjp backend, each (a, b, group_sizes, out_dtype) -> array."""
  if backend == "tiled":
    return xla_tiled.gmm, xla_tiled.tgmm
  if backend == "pallas_tpu":
    return (partial(pallas_tpu.gmm, interpret=interpret), partial(pallas_tpu.tgmm, interpret=interpret))
  if backend == "megablox":
    return (partial(megablox.gmm, interpret=interpret), partial(megablox.tgmm, interpret=interpret))
  if backend == "mgpu_ragged_dot":
    from moe_jax.kernels import mgpu_ragged_dot  # imports Mosaic GPU modules only when asked for
    return mgpu_ragged_dot.gmm, mgpu_ragged_dot.tgmm
  from moe_jax.kernels import pallas_mosaic_gpu  # imports Mosaic GPU modules only when asked for
  return (partial(pallas_mosaic_gpu.gmm, interpret=interpret), partial(pallas_mosaic_gpu.tgmm, interpret=interpret))


@partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _gmm_vjp(lhs_MI, rhs_EIO, group_sizes_E, backend, out_dtype, interpret):
  return _impl(backend, interpret)[0](lhs_MI, rhs_EIO, group_sizes_E, out_dtype)


def _gmm_vjp_fwd(lhs_MI, rhs_EIO, group_sizes_E, backend, out_dtype, interpret):
  out = _impl(backend, interpret)[0](lhs_MI, rhs_EIO, group_sizes_E, out_dtype)
  return out, (lhs_MI, rhs_EIO, group_sizes_E)


def _gmm_vjp_bwd(backend, out_dtype, interpret, res, dout_MO):
  lhs_MI, rhs_EIO, group_sizes_E = res
  mm, tmm = _impl(backend, interpret)
  dout_MO = dout_MO.astype(lhs_MI.dtype)
  dlhs = mm(dout_MO, jnp.swapaxes(rhs_EIO, 1, 2), group_sizes_E, jnp.float32).astype(lhs_MI.dtype)
  drhs = tmm(lhs_MI, dout_MO, group_sizes_E, rhs_EIO.dtype)
  # Inside shard_map the cotangents must vary over the axes their primals do; kernels whose outputs carry no
  # varying-axes type (Mosaic GPU's) come back invariant, so cast them (the primals were matched in `gmm`).
  return cast_varying(dlhs, varying_axes(lhs_MI)), cast_varying(drhs, varying_axes(rhs_EIO)), None


_gmm_vjp.defvjp(_gmm_vjp_fwd, _gmm_vjp_bwd)


def _check(lhs_MI, rhs_EIO, group_sizes_E):
  if lhs_MI.ndim != 2 or rhs_EIO.ndim != 3 or group_sizes_E.ndim != 1:
    raise ValueError(f"gmm expects lhs [M,I], rhs [E,I,O], group_sizes [E]; got {lhs_MI.shape}, "
                     f"{rhs_EIO.shape}, {group_sizes_E.shape}")
  if lhs_MI.shape[1] != rhs_EIO.shape[1] or rhs_EIO.shape[0] != group_sizes_E.shape[0]:
    raise ValueError(f"gmm shape mismatch: lhs {lhs_MI.shape}, rhs {rhs_EIO.shape}, group_sizes {group_sizes_E.shape}")


def gmm(lhs_MI, rhs_EIO, group_sizes_E, *, backend: str = "auto", preferred_element_type=None,
        interpret: bool | None = None):
  """Grouped matmul. lhs_MI: [M, I] rows sorted by group; rhs_EIO: [E, I, O]; group_sizes_E: int [E] (zeros
  allowed, sum <= M). Returns [M, O] in `preferred_element_type` (default: lhs dtype); rows beyond
  sum(group_sizes_E) are zero."""
  _check(lhs_MI, rhs_EIO, group_sizes_E)
  out_dtype = jnp.dtype(preferred_element_type or lhs_MI.dtype)
  interpret = interpreting() if interpret is None else interpret
  group_sizes_E = group_sizes_E.astype(jnp.int32)
  backend = resolve_backend(backend, interpret=interpret)
  if backend == "reference":
    return _reference(lhs_MI, rhs_EIO, group_sizes_E, out_dtype)
  if backend == "ragged_dot":
    return jax.lax.ragged_dot(lhs_MI, rhs_EIO, group_sizes_E, preferred_element_type=out_dtype)
  if backend == "tokamax":
    import tokamax  # optional extra
    out_MO = tokamax.ragged_dot(lhs_MI, rhs_EIO.astype(lhs_MI.dtype), group_sizes_E, preferred_element_type=out_dtype)
    return zero_rows_past_groups(out_MO, group_sizes_E, out_dtype)
  return _gmm_vjp(*match_varying(lhs_MI, rhs_EIO, group_sizes_E), backend, out_dtype, interpret)


def tgmm(lhs_MI, dout_MO, group_sizes_E, *, backend: str = "auto", preferred_element_type=None,
         interpret: bool | None = None):
  """Transposed grouped matmul: out[e] = lhs[rows of e]^T @ dout[rows of e], [E, I, O]; zero for empty groups.

  "ragged_dot", "tokamax" and "reference" share one reference formulation (a [E, M] membership mask: E times the
  FLOPs); gmm's gradient for those backends comes from JAX's autodiff, not from this function."""
  if lhs_MI.ndim != 2 or dout_MO.ndim != 2 or lhs_MI.shape[0] != dout_MO.shape[0] or group_sizes_E.ndim != 1:
    raise ValueError(f"tgmm expects lhs [M,I], dout [M,O], group_sizes [E]; got {lhs_MI.shape}, "
                     f"{dout_MO.shape}, {group_sizes_E.shape}")
  out_dtype = jnp.dtype(preferred_element_type or lhs_MI.dtype)
  interpret = interpreting() if interpret is None else interpret
  group_sizes_E = group_sizes_E.astype(jnp.int32)
  backend = resolve_backend(backend, interpret=interpret)
  if backend in ("reference", "ragged_dot", "tokamax"):
    ends_E = jnp.cumsum(group_sizes_E)
    rows_M = jnp.arange(lhs_MI.shape[0])
    member_EM = (rows_M[None] >= (ends_E - group_sizes_E)[:, None]) & (rows_M[None] < ends_E[:, None])
    return jnp.einsum("em,mk,mn->ekn", member_EM.astype(lhs_MI.dtype), lhs_MI, dout_MO,
                      preferred_element_type=out_dtype)
  return _impl(backend, interpret)[1](lhs_MI, dout_MO, group_sizes_E, out_dtype)
