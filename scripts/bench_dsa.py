"""DeepSeek Sparse Attention vs dense MLA, one attention layer, as the context grows (V3.2 report sec. 2-3).

    python scripts/bench_dsa.py [--contexts=1024,...,32768] [--prefill_contexts=1024,...,8192] [--topk=2048]
                                [--heads=16] [--index_heads=8] [--max_gib=8] [--json]

V3's attention head dims (kv_lora_rank 512, qk_rope_head_dim 64, qk_nope_head_dim 128, v_head_dim 128, index
head dims 128) with --heads MLA heads and --index_heads indexer heads (V3.2: 128 and 64; fewer on CPU) and a
narrower model (--hidden, --q_lora) so the projections do not swamp the attention. Variants:
  dsa             index_topk=--topk, the gathered form (moe_jax.layers.sparse_attention)
  dense           dense MLA, the einsum form (full [T, T] scores; decoding: the absorbed latent-cache form)
  dense_blockwise dense MLA, the blockwise kernel (no [T, T] scores; prefill and training only)
1. decode: one token against a cache of N tokens (random cache, index keys included): median time; DSA's main
   attention reads --topk latents, its indexer scores all N keys.
2. prefill: the forward over T tokens: median time, and the compiled temporary memory.
3. train: forward + backward over T tokens: the compiled temporary memory only (nothing runs).
A variant whose compiled temporary memory exceeds --max_gib is reported but not run.
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import ml_collections
from absl import app, flags

from bench_common import emit, median_seconds  # scripts/ (also keeps the entry points' host-memory settings)
from moe_jax.config import base_model_config
from moe_jax.layers import MLA
from moe_jax.layers.attention import LatentCache, attention_inputs

_CONTEXTS = flags.DEFINE_list("contexts", ["1024", "2048", "4096", "8192", "16384", "32768"], "Decode: cached tokens.")
_PREFILL = flags.DEFINE_list("prefill_contexts", ["1024", "2048", "4096", "8192"], "Prefill/train: tokens per call.")
_TRAIN = flags.DEFINE_list("train_contexts", ["4096", "16384", "32768"], "Train: tokens (compile only).")
_TOPK = flags.DEFINE_integer("topk", 2048, "index_topk: tokens each query attends to (V3.2: 2048).")
_HEADS = flags.DEFINE_integer("heads", 16, "MLA heads (V3: 128).")
_INDEX_HEADS = flags.DEFINE_integer("index_heads", 8, "Indexer heads (V3.2: 64).")
_HIDDEN = flags.DEFINE_integer("hidden", 1024, "Model width (V3: 7168).")
_Q_LORA = flags.DEFINE_integer("q_lora", 512, "Query latent rank (V3: 1536).")
_BLOCK = flags.DEFINE_integer("block", 512, "attention_block_size: DSA's query block, blockwise's tile.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed repetitions (median).")
_MAX_GIB = flags.DEFINE_float("max_gib", 8.0, "Run only variants whose compiled temporary memory is below this.")
_DTYPE = flags.DEFINE_string("dtype", None, "Compute dtype (default: bfloat16 on accelerators, float32 on CPU).")
_BENCHES = flags.DEFINE_list("benches", ["decode", "prefill", "train"], "Which parts to run.")
_JSON = flags.DEFINE_bool("json", False, "One JSON row per measurement.")

GIB = 1 << 30


def _config(variant: str, dtype) -> ml_collections.ConfigDict:
  c = base_model_config()
  c.update(hidden_size=_HIDDEN.value, num_attention_heads=_HEADS.value, q_lora_rank=_Q_LORA.value, kv_lora_rank=512,
           qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128, dtype=dtype.name, param_dtype=dtype.name,
           max_position_embeddings=1 << 17, attention_block_size=_BLOCK.value,
           attention_impl="blockwise" if variant == "dense_blockwise" else "xla")
  c.rope_scaling = None
  if variant == "dsa":
    c.update(index_n_heads=_INDEX_HEADS.value, index_head_dim=128, index_topk=_TOPK.value)
  return c


def _params(cfg, dtype):
  x = jnp.zeros((1, 1, cfg.hidden_size), dtype)
  one = jnp.ones((1, 1), jnp.int32)
  return jax.jit(MLA(cfg).init)(jax.random.key(1), x, attention_inputs(cfg, 0 * one, one))["params"]


def _time(fn, *args) -> float:
  return median_seconds(fn, *args, repeats=_REPEATS.value)


def _temp_gib(fn, *args) -> float:
  return fn.lower(*args).compile().memory_analysis().temp_size_in_bytes / GIB


def decode_rows(dtype) -> None:
  variants = ("dsa", "dense")
  cfgs = {v: _config(v, dtype) for v in variants}
  params = {v: _params(cfgs[v], dtype) for v in variants}
  x = jax.random.normal(jax.random.key(0), (1, 1, _HIDDEN.value), dtype)
  one = jnp.ones((1, 1), jnp.int32)
  for n in map(int, _CONTEXTS.value):
    ks = jax.random.split(jax.random.key(n), 3)
    row = {"bench": "decode", "context": n, "topk": _TOPK.value, "heads": _HEADS.value,
           "index_heads": _INDEX_HEADS.value, "dtype": dtype.name}
    for v in variants:
      cfg = cfgs[v]
      cache = LatentCache(jax.random.normal(ks[0], (1, n, 512), dtype), jax.random.normal(ks[1], (1, n, 64), dtype),
                          jax.random.normal(ks[2], (1, n, 128), dtype) if v == "dsa" else None)
      inputs = attention_inputs(cfg, (n - 1) * one, one, jnp.full((1,), n - 1, jnp.int32), n)
      step = jax.jit(lambda p, x_, in_, c_, m=MLA(cfg): m.apply({"params": p}, x_, in_, c_)[0])
      row[f"{v}_ms"] = 1e3 * _time(step, params[v], x, inputs, cache)
    row["dense_over_dsa"] = row["dense_ms"] / row["dsa_ms"]
    _emit(row)


def _forward(cfg):
  layer = MLA(cfg)

  def f(p, x_BTD):
    B, T = x_BTD.shape[:2]
    pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    return layer.apply({"params": p}, x_BTD, attention_inputs(cfg, pos, jnp.ones((B, T), jnp.int32)))[0]
  return f


def prefill_rows(dtype, train: bool) -> None:
  variants = ("dsa", "dense", "dense_blockwise")
  cfgs = {v: _config(v, dtype) for v in variants}
  params = {v: _params(cfgs[v], dtype) for v in variants}
  for T in map(int, (_TRAIN if train else _PREFILL).value):
    x = jax.random.normal(jax.random.key(T), (1, T, _HIDDEN.value), dtype)
    row = {"bench": "train" if train else "prefill", "tokens": T, "topk": _TOPK.value, "heads": _HEADS.value,
           "index_heads": _INDEX_HEADS.value, "dtype": dtype.name}
    for v in variants:
      f = _forward(cfgs[v])
      if train:
        fn = jax.jit(jax.grad(lambda p, x_, f=f: jnp.sum(f(p, x_).astype(jnp.float32) ** 2), argnums=(0, 1)))
      else:
        fn = jax.jit(f)
      gib = _temp_gib(fn, params[v], x)
      row[f"{v}_temp_gib"] = round(gib, 3)
      if not train:
        row[f"{v}_ms"] = 1e3 * _time(fn, params[v], x) if gib <= _MAX_GIB.value else None
    if not train and row["dsa_ms"] and row["dense_blockwise_ms"]:
      row["dense_blockwise_over_dsa"] = row["dense_blockwise_ms"] / row["dsa_ms"]
    _emit(row)


def _emit(row: dict) -> None:
  emit(row, _JSON.value)


def main(argv):
  del argv
  platform = jax.default_backend()
  dtype = jnp.dtype(_DTYPE.value or ("float32" if platform == "cpu" else "bfloat16"))
  print(f"# device: {jax.devices()[0].device_kind} ({platform}), jax {jax.__version__}; V3 attention head dims, "
        f"{_HEADS.value} heads, {_INDEX_HEADS.value} indexer heads, top-{_TOPK.value}", file=sys.stderr)
  if "decode" in _BENCHES.value:
    decode_rows(dtype)
  if "prefill" in _BENCHES.value:
    prefill_rows(dtype, train=False)
  if "train" in _BENCHES.value:
    prefill_rows(dtype, train=True)


if __name__ == "__main__":
  app.run(main)
