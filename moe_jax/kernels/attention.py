"""Causal MLA self-attention backends for training and scoring: which one runs where.

    o_t,h = sum_{s <= t, same document} softmax_s(scale * (q^C_t,h . k^C_s,h + q^R_t,h . k^R_s)) v_s,h

`attend(impl, ...)` computes it for one call's T tokens (no cache) with
- "blockwise": flash-style tiles in plain JAX, O(T * block) memory (`blockwise_attention.py`); every platform.
- "cudnn": jax's cuDNN fused attention (`cudnn_attention.py`); NVIDIA GPUs only.
- "splash": jax's Pallas TPU splash attention (`splash_attention.py`); TPUs, or anywhere in interpret mode.
"xla" is the einsum form in `moe_jax.layers.attention` (the full [B, H, T, T] scores; the tests' reference), which
also serves every call over a decode cache. "auto" (`resolve_attention`) picks, per platform, the backend that
is validated there and fastest (docs/benchmarks.md): see `_AUTO`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from moe_jax.kernels.blockwise_attention import blockwise_attention
from moe_jax.kernels.interpret import interpreting, resolve_for_platform
from moe_jax.sharding import split_of, traced_mesh_sizes

ATTENTION_IMPLS = ("xla", "blockwise", "cudnn", "splash")
_NATIVE = {"xla": None, "blockwise": None, "cudnn": ("gpu", "cuda"), "splash": ("tpu",)}
# cpu: blockwise measured faster than xla at every T of the default run and bench_attention (docs/benchmarks.md).
# gpu: blockwise (plain XLA ops, O(T) memory) until cudnn has run on a lent GPU. tpu: splash, upstream's TPU
# kernel, whose tests here ran in its interpret mode.
_AUTO = {"cpu": "blockwise", "gpu": "blockwise", "cuda": "blockwise", "rocm": "blockwise", "tpu": "splash"}


def resolve_attention(impl: str, platform: str | None = None, interpret: bool | None = None) -> str:
  """Maps "auto" to the platform's default; raises naming the platform if `impl` is unknown or cannot run here."""
  return resolve_for_platform("attention_impl", impl, ATTENTION_IMPLS, _NATIVE, _AUTO, "blockwise", ("splash",),
                              "'auto', 'blockwise' or 'xla'", platform, interpret)


def joint_qk(q_nope_BTHN, q_rope_BTHR, k_nope_BTHN, k_rope_BTR):
  """One head dim for q and k, as fused kernels (cuDNN, splash) take them: q = [q^C; q^R], k = [k^C; k^R] with
  the shared RoPE key broadcast over heads. Returns (q [B, T, H, N+R], k [B, T, H, N+R])."""
  B, T, H, _ = k_nope_BTHN.shape
  k_rope_BTHR = jnp.broadcast_to(k_rope_BTR[:, :, None, :], (B, T, H, k_rope_BTR.shape[-1]))
  return (jnp.concatenate([q_nope_BTHN, q_rope_BTHR], axis=-1),
          jnp.concatenate([k_nope_BTHN, k_rope_BTHR.astype(k_nope_BTHN.dtype)], axis=-1))


def per_shard(fn, q_nope_BTHN, q_rope_BTHR, k_nope_BTHN, k_rope_BTR, v_BTHA, segment_ids_BT):
  """`fn` (an attention kernel) on each device's block of batch rows and heads, inside `jax.shard_map`.

  Pallas and cuDNN custom calls cannot be partitioned by XLA's SPMD pass ("Mosaic kernels cannot be automatically
  partitioned"), so on a multi-device mesh they run per shard: rows split over the rules' batch axes, heads over
  the `heads` axis (tensor), as the surrounding activations already are; attention needs no communication
  across either. check_vma is off because the kernels' out_shapes carry no varying-axes types; with no
  collective inside, shard_map's unchecked transpose is exact (a replicated dim's cotangent is averaged back)."""
  args = (q_nope_BTHN, q_rope_BTHR, k_nope_BTHN, k_rope_BTR, v_BTHA, segment_ids_BT)
  sizes = traced_mesh_sizes()
  if sizes is None:
    return fn(*args)
  batch = split_of("batch", q_nope_BTHN.shape[0], sizes)
  heads = split_of("heads", q_nope_BTHN.shape[2], sizes)
  bthx = P(batch, None, heads, None)
  specs = (bthx, bthx, bthx, P(batch, None, None), bthx, P(batch, None))
  return jax.shard_map(fn, in_specs=specs, out_specs=bthx, check_vma=False)(*args)


def attend(impl: str, q_nope_BTHN, q_rope_BTHR, k_nope_BTHN, k_rope_BTR, v_BTHA, segment_ids_BT, *, scale: float,
           block: int = 512):
  """o [B, T, H, A] by backend `impl` (already resolved, not "xla"): causal within each segment id. The library
  kernels (cudnn, splash) run per shard on a mesh (`per_shard`); blockwise is plain XLA, partitioned by XLA."""
  args = (q_nope_BTHN, q_rope_BTHR, k_nope_BTHN, k_rope_BTR, v_BTHA, segment_ids_BT)
  if impl == "blockwise":
    return blockwise_attention(*args, scale=scale, block=block)
  if impl == "cudnn":
    from moe_jax.kernels.cudnn_attention import cudnn_attention
    return per_shard(lambda *a: cudnn_attention(*a, scale=scale), *args)
  if impl == "splash":
    from moe_jax.kernels.splash_attention import splash_attention
    interpret = interpreting()
    return per_shard(lambda *a: splash_attention(*a, scale=scale, interpret=interpret), *args)
  raise ValueError(f"attend() takes a resolved kernel backend, got {impl!r}")
