"""Grouped-matmul throughput: our kernel vs jax.lax.ragged_dot vs tokamax vs a dense matmul of the same FLOPs.

Two tables, every number measured in this one run (compare ratios; these machines are noisy):
1. shapes: DeepSeek-V3's expert matmuls (K=7168 -> N=2048 "up" and 2048 -> 7168 "down", 256 experts, top-8)
   at several token counts, plus a small shape; forward (gmm) and backward (d lhs + d rhs) TFLOP/s and the
   ratio to the dense matmul (the ceiling).
2. experts: fixed tokens and top-k (so fixed active FLOPs) as E goes 8 -> 256; time as a ratio to E=8.

    python scripts/bench_gmm.py                         # this platform's defaults (CPU: the small shape)
    python scripts/bench_gmm.py --shapes=v3 --tokens=4096,16384,65536 --json
"""

from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from moe_jax.kernels import gmm  # noqa: E402

_ON_CPU = jax.default_backend() == "cpu"
_SHAPES = flags.DEFINE_list("shapes", ["small"] if _ON_CPU else ["v3", "small"],
                            "Shape sets: v3 (K,N = 7168,2048 and 2048,7168; E=256) and/or small (512,256; E=64).")
_TOKENS = flags.DEFINE_list("tokens", ["2048"] if _ON_CPU else ["4096", "16384", "65536"], "Tokens per call.")
_TOPK = flags.DEFINE_integer("topk", 8, "Experts per token (copies = tokens x topk).")
_EXPERTS = flags.DEFINE_list("experts", ["8", "32", "256"], "Expert counts for the flatness table.")
_SWEEP_SHAPE = flags.DEFINE_string("sweep_shape", "small" if _ON_CPU else "v3_up", "Shape for the expert sweep.")
_KERNEL = flags.DEFINE_string("kernel", "auto", "Our backend: auto | tiled | pallas_mosaic_gpu | pallas_tpu.")
_VARIANTS = flags.DEFINE_list("variants", ["ours", "ragged_dot", "tokamax", "dense"], "Rows to time.")
_DTYPE = flags.DEFINE_string("dtype", "float32" if _ON_CPU else "bfloat16", "Input dtype (accumulation in f32).")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed calls (median reported).")
_BACKWARD = flags.DEFINE_bool("backward", True, "Also time the backward pass (d lhs + d rhs).")
_JSON = flags.DEFINE_bool("json", False, "Print JSON rows instead of tables.")
_RAGGED_MAX_E = flags.DEFINE_integer("ragged_max_experts", 32 if _ON_CPU else 4096,
                                     "Skip ragged_dot above this E (on CPU it costs ~E x the dense matmul).")

SHAPES = {"v3_up": (7168, 2048, 256), "v3_down": (2048, 7168, 256), "small": (512, 256, 64)}


def _group_sizes(copies: int, experts: int, seed: int = 0) -> np.ndarray:
  """Uniform routing: each copy picks an expert at random (V3 trains near balance)."""
  return np.bincount(np.random.default_rng(seed).integers(0, experts, copies), minlength=experts).astype(np.int32)


def _tokamax_ragged_dot():
  try:
    import tokamax  # noqa: PLC0415
  except ImportError:
    return None
  return lambda a, b, g: tokamax.ragged_dot(a, b, g, preferred_element_type=jnp.float32)


def _op(variant: str):
  """(lhs [M,I], rhs [E,I,O], group_sizes) -> [M, O] f32 for one variant, or None if unavailable."""
  if variant == "ours":
    return lambda a, b, g: gmm(a, b, g, backend=_KERNEL.value, preferred_element_type=jnp.float32)
  if variant == "ragged_dot":
    return lambda a, b, g: jax.lax.ragged_dot(a, b, g, preferred_element_type=jnp.float32)
  if variant == "tokamax":
    return _tokamax_ragged_dot()
  if variant == "dense":  # the same FLOPs as one [M, I] @ [K, N]: the ceiling
    return lambda a, b, g: jnp.dot(a, b[0], preferred_element_type=jnp.float32)
  raise ValueError(f"--variants: unknown {variant!r}; allowed: ours, ragged_dot, tokamax, dense")


def _time(fn, args, repeats: int) -> float | None:
  try:
    out = fn(*args)
  except jax.errors.JaxRuntimeError as e:  # e.g. ragged_dot's backward running out of memory
    print(f"  failed: {str(e).splitlines()[0][:120]}", file=sys.stderr)
    return None
  jax.block_until_ready(out)
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


def measure(variant: str, K: int, N: int, E: int, tokens: int) -> list[dict]:
  op = _op(variant)
  M = tokens * _TOPK.value
  base = {"variant": variant, "K": K, "N": N, "experts": E, "tokens": tokens, "rows": M, "dtype": _DTYPE.value,
          "device": jax.devices()[0].device_kind, "jax": jax.__version__}
  if op is None or (variant == "ragged_dot" and E > _RAGGED_MAX_E.value):
    note = "not installed" if op is None else f"skipped: E > --ragged_max_experts={_RAGGED_MAX_E.value}"
    return [dict(base, pass_=p, seconds=None, tflops=None, note=note) for p in ("fwd", "bwd")]
  print(f"  timing {variant} K={K} N={N} E={E} tokens={tokens}", file=sys.stderr, flush=True)
  dtype = jnp.dtype(_DTYPE.value)
  k1, k2 = jax.random.split(jax.random.key(0))
  lhs = jax.random.normal(k1, (M, K), dtype)
  rhs = (jax.random.normal(k2, (E, K, N), dtype) / np.sqrt(K)).astype(dtype)
  gs = jnp.asarray(_group_sizes(M, E))
  rows = []
  fwd = jax.jit(op)
  rows.append(dict(base, pass_="fwd", seconds=_time(fwd, (lhs, rhs, gs), _REPEATS.value), flops=2 * M * K * N))
  if _BACKWARD.value:
    cot = jax.random.normal(jax.random.key(1), (M, N), jnp.float32)

    def bwd(a, b, g, c):
      _, vjp = jax.vjp(lambda a_, b_: op(a_, b_, g), a, b)
      return vjp(c)
    rows.append(dict(base, pass_="bwd", seconds=_time(jax.jit(bwd), (lhs, rhs, gs, cot), _REPEATS.value),
                     flops=4 * M * K * N))
  for r in rows:
    r["tflops"] = r["flops"] / r["seconds"] / 1e12 if r["seconds"] else None
  return rows


def main(argv):
  del argv
  shape_rows, sweep_rows = [], []
  names = [n for s in _SHAPES.value for n in (("v3_up", "v3_down") if s == "v3" else (s,))]
  for name in names:
    K, N, E = SHAPES[name]
    for tokens in map(int, _TOKENS.value):
      rows = {v: measure(v, K, N, E, tokens) for v in _VARIANTS.value}
      dense = {r["pass_"]: r["seconds"] for r in rows.get("dense", [])}
      for v, rs in rows.items():
        for r in rs:
          r["table"], r["shape"] = "shapes", name
          r["ratio_to_dense"] = (dense[r["pass_"]] / r["seconds"]) if r["seconds"] and r["pass_"] in dense else None
          shape_rows.append(r)
  K, N, _ = SHAPES[_SWEEP_SHAPE.value]
  tokens = int(_TOKENS.value[0])
  for v in [v for v in _VARIANTS.value if v != "dense"]:
    firsts = {}  # time at the first E, per pass
    for E in map(int, _EXPERTS.value):
      for r in measure(v, K, N, E, tokens):
        r["table"], r["shape"] = "experts", _SWEEP_SHAPE.value
        if r["seconds"] is not None:
          r["ratio_to_first_E"] = r["seconds"] / firsts.setdefault(r["pass_"], r["seconds"])
        sweep_rows.append(r)
  if _JSON.value:
    for r in shape_rows + sweep_rows:
      print(json.dumps(r))
    return
  dev = jax.devices()[0].device_kind
  print(f"grouped matmul, {dev}, jax {jax.__version__}, {_DTYPE.value} in / f32 accumulate, top-{_TOPK.value}, "
        f"our kernel = {_KERNEL.value}")
  print(f"{'shape':<8} {'tokens':>6} {'variant':<11} {'pass':<4} {'ms':>9} {'TFLOP/s':>8} {'vs dense':>8}")
  for r in shape_rows:
    ms = f"{1e3 * r['seconds']:9.2f}" if r["seconds"] else f"{'n/a':>9}"
    tf = f"{r['tflops']:8.3f}" if r["tflops"] else f"{'n/a':>8}"
    rd = f"{r['ratio_to_dense']:8.2f}" if r.get("ratio_to_dense") else f"{'':>8}"
    print(f"{r['shape']:<8} {r['tokens']:>6} {r['variant']:<11} {r['pass_']:<4} {ms} {tf} {rd}")
  print(f"\nexpert sweep: {_SWEEP_SHAPE.value} (K={K}, N={N}), {tokens} tokens x top-{_TOPK.value}: fixed active "
        "FLOPs; time / time at the first E")
  print(f"{'variant':<11} {'pass':<4} " + " ".join(f"{'E=' + e:>16}" for e in _EXPERTS.value))
  for v in [v for v in _VARIANTS.value if v != "dense"]:
    for p in ("fwd", "bwd") if _BACKWARD.value else ("fwd",):
      cells = []
      for r in (r for r in sweep_rows if r["variant"] == v and r["pass_"] == p):
        cells.append(f"{1e3 * r['seconds']:8.1f}ms x{r['ratio_to_first_E']:4.2f}" if r["seconds"] else "n/a")
      print(f"{v:<11} {p:<4} " + " ".join(f"{c:>16}" for c in cells))


if __name__ == "__main__":
  app.run(main)
