"""Model FLOPs utilisation of one train step on one device, and where the step's time goes.

    python scripts/bench_mfu.py [--config=configs/bench_1b.py] [--preset=cpu] [--steps=5] [--peak_tflops=...]
                                [--profile] [--json] [--config.model.gmm_backend=...]

Times the full train step (forward, backward, AdamW, loss-free bias update) on random full rows, then reports
tokens/s, the model FLOPs per token (`moe_jax.planning.flops_per_token`: 6 x activated parameters incl. MTP +
causal attention), achieved TFLOP/s and MFU against the device's dense bf16 peak (`planning.ACCELERATORS`, or
`--peak_tflops`). With `--profile`, one traced step's device op time is split by the ops' name scopes into
attention, routed experts (the grouped matmuls), dispatch (layout, permute, unpermute), router, shared experts,
dense FFN, output heads and the rest (optimizer, norms, embedding). `--preset=cpu` shrinks the model (4 layers,
width 256, 16 experts) and rows (512 tokens) so that a CPU finishes in a minute or two.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from bench_common import time_steps, train_step_on_random_rows  # noqa: E402
from moe_jax.model.params import count_params  # noqa: E402
from moe_jax.planning import ACCELERATORS, flops_per_token  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", "configs/bench_1b.py", "Experiment config.")
_PRESET = flags.DEFINE_enum("preset", None, ["cpu"], "cpu: a reduced model and row length for CPUs.")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed steps (after two warm-up steps).")
_PEAK = flags.DEFINE_float("peak_tflops", None, "Device peak (dense bf16 TFLOP/s); default from the device kind.")
_PROFILE = flags.DEFINE_bool("profile", True, "Trace one step and split its op time by name scope.")
_JSON = flags.DEFINE_bool("json", False, "Print one JSON row instead of a table.")

# Name-scope fragments -> category, first match wins (op names carry the module path of the Flax modules).
_CATEGORIES = (("routed_experts", "routed experts (gmm)"), ("dispatch", "dispatch (layout, permute)"),
               ("router", "router"), ("shared_experts", "shared experts"), ("attn", "attention (MLA)"),
               ("/mlp/", "dense FFN"), ("_head", "output heads"))


def _cpu_preset(config):
  m = config.model
  m.hidden_size, m.intermediate_size, m.moe_intermediate_size = 256, 1024, 128
  m.num_hidden_layers, m.num_attention_heads, m.q_lora_rank, m.kv_lora_rank = 4, 4, 128, 64
  m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim = 32, 16, 32
  m.n_routed_experts, m.num_experts_per_tok, m.n_group, m.topk_group = 16, 4, 4, 2
  m.vocab_size, m.dtype = 4096, "float32"
  config.data.seq_len, config.data.batch_size = 512, 4
  m.max_position_embeddings = 512
  return config


def _peak_flops(kind: str) -> tuple[float, str]:
  if _PEAK.value:
    return _PEAK.value * 1e12, "--peak_tflops"
  k = kind.lower().replace(" ", "")
  for name, (peak, _) in ACCELERATORS.items():
    if name.replace("-", "") in k:
      return peak, name
  return ACCELERATORS["cpu"][0], "cpu (nominal 0.1 TFLOP/s)"


def _breakdown(step, state, batch) -> tuple[dict, object]:
  """(ms per category over one traced step, the state after it)."""
  hlo = step.lower(state, batch).compile().as_text()
  scope_of = {m.group(1): m.group(2) for m in re.finditer(
      r"%?([\w.\-]+) = [^\n]*?metadata=\{[^}\n]*?op_name=\"([^\"]+)\"", hlo)}
  # A while/conditional/call's event spans the ops of its body, which have events of their own: counting both
  # would count the routed experts' tile loops twice.
  control_flow = set(re.findall(r"%?([\w.\-]+) = [^\n]*? (?:while|conditional|call)\(%", hlo))
  with tempfile.TemporaryDirectory() as d:
    jax.profiler.start_trace(d)
    state, m = step(state, batch)
    jax.block_until_ready(m)
    jax.profiler.stop_trace()
    trace = sorted(glob.glob(os.path.join(d, "**", "*.trace.json.gz"), recursive=True))[-1]
    events = json.load(gzip.open(trace))["traceEvents"]
  totals = collections.Counter()
  for e in events:
    if e.get("ph") != "X" or "dur" not in e:
      continue
    name = (e.get("args") or {}).get("hlo_op") or e["name"]
    scope = scope_of.get(name)
    if scope is None or name in control_flow:
      continue  # runtime bookkeeping (executor, waits), not an op of the step; or a loop counted by its body
    category = next((c for key, c in _CATEGORIES if key in scope), "other (optimizer, norms, embedding, loss)")
    totals[category] += e["dur"] / 1000
  return dict(totals), state


def main(argv):
  del argv
  config = _CONFIG.value.copy_and_resolve_references()
  if _PRESET.value == "cpu":
    config = _cpu_preset(config)
  c = config.model
  step, state, batch = train_step_on_random_rows(config)
  B, T = batch["tokens"].shape
  state, compile_s, dt = time_steps(step, state, batch, _STEPS.value, warmup=1)
  kind = jax.devices()[0].device_kind
  peak, peak_source = _peak_flops(kind)
  fpt = flops_per_token(c, T)
  counts = count_params(c)
  row = {"config": _CONFIG.value.get("name", None) or "bench_1b" + ("/cpu" if _PRESET.value else ""),
         "total_params": counts["total_params_with_mtp"], "active_params": counts["active_params_with_mtp"],
         "tokens_per_step": B * T, "ms_per_step": 1000 * dt, "tokens_per_sec": B * T / dt,
         "model_flops_per_token": fpt["total"], "tflops": fpt["total"] * B * T / dt / 1e12,
         "mfu": fpt["total"] * B * T / dt / peak, "peak_tflops": peak / 1e12, "peak_from": peak_source,
         "compile_s": compile_s, "attention_impl": c.attention_impl, "gmm_backend": c.gmm_backend, "dtype": c.dtype,
         "device": kind, "jax": jax.__version__,
         # what the device allocator saw, to set beside `python -m moe_jax.compile`'s compiled per-device bytes
         "peak_bytes_in_use": (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use")}
  if _PROFILE.value:
    row["breakdown_ms"], state = _breakdown(step, state, batch)
  if _JSON.value:
    print(json.dumps(row))
    return
  print(f"{row['config']}: {row['total_params'] / 1e9:.2f}B total, {row['active_params'] / 1e6:.0f}M active "
        f"(MTP incl.), {B} x {T} tokens, {c.dtype}; attention {c.attention_impl}, gmm {c.gmm_backend} "
        f"({kind}, jax {jax.__version__})")
  print(f"  {row['ms_per_step']:.1f} ms/step, {row['tokens_per_sec']:,.0f} tokens/s, "
        f"{row['model_flops_per_token'] / 1e9:.2f} GFLOP/token -> {row['tflops']:.2f} TFLOP/s, "
        f"MFU {100 * row['mfu']:.1f}% of {row['peak_tflops']:.3g} TFLOP/s ({peak_source}); compile {compile_s:.0f} s")
  if "breakdown_ms" in row:
    total = sum(row["breakdown_ms"].values())
    print(f"  op time of one step, by name scope (summed over threads/streams; {total:.0f} ms):")
    for k, v in sorted(row["breakdown_ms"].items(), key=lambda kv: -kv[1]):
      print(f"    {k:<44} {v:>9.1f} ms  {100 * v / total:5.1f}%")


if __name__ == "__main__":
  app.run(main)
