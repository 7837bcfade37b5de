"""Decoding benchmarks: MLA's latent-cache size, absorbed vs naive decode attention, MTP speculative decoding,
and how generation's compile time grows with depth.

    python scripts/bench_decode.py [--contexts=1024,4096,16384,32768] [--workdir=/tmp/moe_jax_default] [--json]
    python scripts/bench_decode.py --benches=compile [--depths=4,16,61]

1. Cache bytes per token and layer for the published shapes: (kv_lora_rank + qk_rope_head_dim) x dtype bytes,
   beside what MHA (2 x heads x 128) and GQA with 8 KV heads (2 x 8 x 128) would cache at the same head dim.
2. One MLA layer at DeepSeek-V3's dims decoding one token against a cache of N tokens (batch --batch):
   absorbed (attention over c_KV directly) vs naive (per-head K and V rebuilt for all N cached tokens), median of
   --repeats, and their ratio, in one run.
3. On the model trained by the main command (--workdir; skipped when it has no checkpoint): greedy and sampled
   generation from held-out prompts, plain vs MTP speculative: acceptance rate, tokens per main-model step, and
   wall-clock speed-up (compiled, warm).
4. Compile + first call of `Generator.generate` (one prompt, 8 new tokens, greedy) for a scanned debug-width
   model at each of --depths layers, the warm call's time, and each depth's first call over the shallowest's.
"""

from __future__ import annotations

import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
from absl import app, flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # configs/

from configs import deepseek_v2_lite, deepseek_v3  # noqa: E402
from bench_common import emit, median_seconds  # noqa: E402 - scripts/
from configs import debug  # noqa: E402
from moe_jax.inference import Generator, Sampling, cache_bytes_per_token  # noqa: E402
from moe_jax.layers import MLA  # noqa: E402
from moe_jax.layers.attention import LatentCache, attention_inputs  # noqa: E402
from moe_jax.model import Transformer  # noqa: E402

_CONTEXTS = flags.DEFINE_list("contexts", ["1024", "4096", "16384", "32768"], "Cached tokens per decode step.")
_BATCH = flags.DEFINE_integer("batch", 1, "Sequences decoded together in the attention benchmark.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed repetitions (median).")
_DTYPE = flags.DEFINE_string("dtype", None, "Compute/cache dtype (default: bfloat16 on accelerators, float32 on CPU).")
_WORKDIR = flags.DEFINE_string("workdir", "/tmp/moe_jax_default", "Training workdir for the speculative benchmark.")
_PROMPTS = flags.DEFINE_integer("prompts", 8, "Held-out prompts for the speculative benchmark.")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 32, "Prompt tokens (after <bos>).")
_NEW = flags.DEFINE_integer("new_tokens", 64, "Generated tokens per prompt.")
_BENCHES = flags.DEFINE_list("benches", ["cache", "attention", "speculative", "compile"], "Which parts to run.")
_DEPTHS = flags.DEFINE_list("depths", ["4", "16", "61"], "Main-model layers of the compile-time benchmark.")
_JSON = flags.DEFINE_bool("json", False, "One JSON row per measurement.")


def cache_rows(dtype) -> list[dict]:
  rows = []
  for name, cfg in (("deepseek_v3", deepseek_v3.get_model_config()), ("deepseek_v2_lite",
                                                                       deepseek_v2_lite.get_model_config())):
    values = cfg.kv_lora_rank + cfg.qk_rope_head_dim
    per_layer = cache_bytes_per_token(cfg, dtype)
    assert per_layer == values * jnp.dtype(dtype).itemsize
    mha, gqa8 = 2 * cfg.num_attention_heads * 128, 2 * 8 * 128
    rows.append({"bench": "cache", "model": name, "dtype": jnp.dtype(dtype).name, "layers": cfg.num_hidden_layers,
                 "mla_values_per_token_layer": values, "mla_bytes_per_token_layer": per_layer,
                 "mla_bytes_per_token": per_layer * cfg.num_hidden_layers, "mha_values_per_token_layer": mha,
                 "gqa8_values_per_token_layer": gqa8, "mha_over_mla": mha / values, "gqa8_over_mla": gqa8 / values})
  return rows


def _time(fn, *args) -> float:
  return median_seconds(fn, *args, repeats=_REPEATS.value)


def attention_rows(dtype) -> list[dict]:
  cfg = deepseek_v3.get_model_config()
  cfg.dtype = cfg.param_dtype = jnp.dtype(dtype).name
  B = _BATCH.value
  x = jax.random.normal(jax.random.key(0), (B, 1, cfg.hidden_size), dtype)
  one = jnp.ones((B, 1), jnp.int32)
  params = jax.jit(MLA(cfg).init)(jax.random.key(1), x, attention_inputs(cfg, 0 * one, one))["params"]
  rows = []
  for n in map(int, _CONTEXTS.value):
    k1, k2 = jax.random.split(jax.random.key(n))
    cache = LatentCache(jax.random.normal(k1, (B, n, cfg.kv_lora_rank), dtype),
                        jax.random.normal(k2, (B, n, cfg.qk_rope_head_dim), dtype))
    inputs = attention_inputs(cfg, (n - 1) * one, one, jnp.full((B,), n - 1, jnp.int32), n)
    row = {"bench": "decode_attention", "dims": "deepseek_v3", "context": n, "batch": B, "dtype": jnp.dtype(dtype).name}
    for form in ("absorbed", "naive"):  # everything is an argument: nothing may be constant-folded at compile time
      layer = MLA(ml_collections.ConfigDict(cfg.to_dict() | {"decode_attention": form}))
      step = jax.jit(lambda p, x_, in_, cache_, m=layer: m.apply({"params": p}, x_, in_, cache_)[0])
      row[f"{form}_ms"] = 1e3 * _time(step, params, x, inputs, cache)
    row["naive_over_absorbed"] = row["naive_ms"] / row["absorbed_ms"]
    rows.append(row)
    _emit([row])
  return rows


def speculative_rows() -> list[dict]:
  from moe_jax.data import validation_texts  # noqa: PLC0415 - only this benchmark needs the corpus
  from moe_jax.restore import load_model  # noqa: PLC0415

  try:
    model = load_model(_WORKDIR.value)
  except FileNotFoundError as e:
    print(f"skipping the speculative benchmark: {e}", file=sys.stderr)
    return []
  import ml_collections  # noqa: PLC0415
  with open(os.path.join(_WORKDIR.value, "config.json")) as f:
    data_cfg = ml_collections.ConfigDict(json.load(f)).data
  tok = model.tokenizer
  prompts = []
  for text in validation_texts(data_cfg):
    ids = tok.encode(text).tolist()
    if len(ids) >= _PROMPT_LEN.value + _NEW.value:
      prompts.append([tok.bos_id] + ids[:_PROMPT_LEN.value])
    if len(prompts) == _PROMPTS.value:
      break
  gen = Generator(model.variables, model.config)
  rows = []
  for label, sampling in (("greedy", Sampling()), ("temperature_1", Sampling(temperature=1.0))):
    for batch in (1, len(prompts)):
      groups = [prompts[i:i + batch] for i in range(0, len(prompts), batch)]
      row = {"bench": "speculative", "model": model.description, "sampling": label, "batch": batch,
             "prompts": len(prompts), "new_tokens": _NEW.value}
      for spec in (False, True):
        gen.generate(groups[0], max_new_tokens=_NEW.value, sampling=sampling, speculative=spec)  # compile
        seconds, steps, generated, drafted, accepted, outs = 0.0, 0, 0, 0, 0, []
        for g in groups:
          r = gen.generate(g, max_new_tokens=_NEW.value, sampling=sampling, speculative=spec)
          seconds += r.stats["seconds"]
          steps += r.stats["main_model_steps"]
          generated += r.stats["generated_tokens"] - len(g)
          drafted += r.stats.get("drafted", 0)
          accepted += r.stats.get("accepted", 0)
          outs += r.tokens
        key = "speculative" if spec else "plain"
        row[f"{key}_seconds"] = seconds
        row[f"{key}_tokens_per_step"] = generated / steps
        if spec:
          row["acceptance_rate"] = accepted / drafted
        else:
          plain_outs = outs
      row["speedup"] = row["plain_seconds"] / row["speculative_seconds"]
      if label == "greedy":
        row["identical_to_plain"] = outs == plain_outs
      rows.append(row)
      _emit([row])
  return rows


def compile_rows() -> list[dict]:
  """Compile + first call of Generator.generate for a scanned debug-width model at several depths."""
  rows, first = [], None
  for depth in [1] + list(map(int, _DEPTHS.value)):  # depth 1 first, unreported: the process's one-time jit warm-up
    cfg = debug.get_model_config()
    cfg.num_hidden_layers, cfg.scan_layers = depth, True
    variables = jax.jit(Transformer(cfg).init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
    gen = Generator(variables, cfg, max_len=64)
    t0 = time.perf_counter()
    gen.generate([[1, 2, 3]], max_new_tokens=8)
    cold = time.perf_counter() - t0
    t0 = time.perf_counter()
    gen.generate([[1, 2, 3]], max_new_tokens=8)
    warm = time.perf_counter() - t0
    if depth == 1:
      continue
    first = first or cold
    row = {"bench": "generate_compile", "layers": depth, "scan_layers": True, "first_call_s": cold,
           "warm_call_s": warm, "first_call_over_shallowest": cold / first}
    rows.append(row)
    _emit([row])
  return rows


def _emit(rows):
  for r in rows:
    emit(r, _JSON.value)


def main(argv):
  del argv
  platform = jax.default_backend()
  dtype = jnp.dtype(_DTYPE.value or ("float32" if platform == "cpu" else "bfloat16"))
  print(f"# device: {jax.devices()[0].device_kind} ({platform}), jax {jax.__version__}", file=sys.stderr)
  if "cache" in _BENCHES.value:
    _emit(cache_rows(jnp.bfloat16))
  if "attention" in _BENCHES.value:
    attention_rows(dtype)
  if "speculative" in _BENCHES.value:
    speculative_rows()
  if "compile" in _BENCHES.value:
    compile_rows()


if __name__ == "__main__":
  app.run(main)
