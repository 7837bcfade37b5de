"""Times one MLA layer's forward+backward per attention backend as the sequence grows, and its compiled memory.

    python scripts/bench_attention.py [--lengths=512,1024,2048,4096,8192] [--impls=xla,blockwise] [--heads=4]
                                      [--batch=1] [--block=512] [--repeats=3] [--dtype=float32] [--json]

DeepSeek-V3's attention dims (d_h 128, d_h^R 64, d_v 128, kv latent 512, q latent 1536) with `--heads` heads
(V3 has 128; the CPU default is 4) and model width 1024 (projections are a small part at these lengths).
One packed row of T tokens in 4 documents. Per (backend, T): median ms of fwd+bwd, and the compiled step's
temp memory (XLA's memory analysis: everything the step allocates beyond its arguments and outputs). Ratios are
to `xla` at the same T, measured in one run (compare ratios; these machines are noisy). A backend that fails to
compile or run (e.g. out of memory) is reported as such, not skipped silently.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from moe_jax.config import base_model_config  # noqa: E402
from moe_jax.kernels.attention import _NATIVE  # noqa: E402
from moe_jax.layers.attention import MLA, attention_inputs  # noqa: E402

_LENGTHS = flags.DEFINE_list("lengths", ["512", "1024", "2048", "4096", "8192"], "Sequence lengths T.")
_IMPLS = flags.DEFINE_list("impls", None, "Backends (default: every one that runs natively here).")
_HEADS = flags.DEFINE_integer("heads", None, "Attention heads (default: 4 on CPU, 128 on accelerators).")
_BATCH = flags.DEFINE_integer("batch", 1, "Rows.")
_BLOCK = flags.DEFINE_integer("block", 512, "blockwise tile length (config.model.attention_block_size).")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed repetitions (after one compile run); the median is kept.")
_DTYPE = flags.DEFINE_string("dtype", None, "Compute dtype (default: float32 on CPU, bfloat16 on accelerators).")
_JSON = flags.DEFINE_bool("json", False, "Print JSON rows instead of a table.")


def _config(impl: str, heads: int, dtype: str, block: int):
  c = base_model_config()
  c.hidden_size, c.num_attention_heads, c.rope_scaling = 1024, heads, None
  c.attention_impl, c.attention_block_size, c.dtype = impl, block, dtype
  return c


def measure(impl: str, T: int, heads: int, batch: int, dtype: str, block: int, repeats: int) -> dict:
  c = _config(impl, heads, dtype, block)
  row = {"impl": impl, "T": T, "heads": heads, "batch": batch, "dtype": dtype, "block": block,
         "device": jax.devices()[0].device_kind, "jax": jax.__version__}
  rng = np.random.default_rng(0)
  seg_BT = np.repeat(np.arange(1, 5, dtype=np.int32), -(-T // 4))[:T][None].repeat(batch, 0)
  pos_BT = np.concatenate([np.arange((seg_BT[0] == d).sum()) for d in range(1, 5)]).astype(np.int32)[None]
  x_BTD = jnp.asarray(rng.normal(size=(batch, T, c.hidden_size)), c.dtype)
  inputs = attention_inputs(c, jnp.asarray(pos_BT.repeat(batch, 0)), jnp.asarray(seg_BT))
  mla = MLA(c)
  small = attention_inputs(c, jnp.arange(8, dtype=jnp.int32)[None], jnp.ones((1, 8), jnp.int32))
  try:
    variables = jax.jit(lambda: nn.meta.unbox(mla.init(jax.random.PRNGKey(0), x_BTD[:1, :8], small)))()
    step = jax.jit(jax.grad(lambda p, x: mla.apply(p, x, inputs)[0].astype(jnp.float32).sum(), argnums=(0, 1)))
    compiled = step.lower(variables, x_BTD).compile()
    mem = compiled.memory_analysis()
    row["temp_mib"] = mem.temp_size_in_bytes / 2**20 if mem is not None else float("nan")
    jax.block_until_ready(compiled(variables, x_BTD))
    times = []
    for _ in range(repeats):
      t0 = time.perf_counter()
      jax.block_until_ready(compiled(variables, x_BTD))
      times.append(time.perf_counter() - t0)
    row["ms"] = 1000 * statistics.median(times)
  except Exception as e:  # noqa: BLE001 -- reported as a row: "did not run" is a result
    row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
  return row


def main(argv):
  del argv
  platform = jax.default_backend()
  impls = _IMPLS.value or [i for i, native in _NATIVE.items() if native is None or platform in native]
  heads = _HEADS.value or (4 if platform == "cpu" else 128)
  dtype = _DTYPE.value or ("float32" if platform == "cpu" else "bfloat16")
  rows = []
  for T in (int(t) for t in _LENGTHS.value):
    group = [measure(i, T, heads, _BATCH.value, dtype, _BLOCK.value, _REPEATS.value) for i in impls]
    ref = next((r for r in group if r["impl"] == "xla" and "ms" in r), None)
    for r in group:
      if ref is not None and "ms" in r:
        r["time_vs_xla"] = r["ms"] / ref["ms"]
        r["temp_vs_xla"] = r["temp_mib"] / ref["temp_mib"] if ref["temp_mib"] else float("nan")
      rows.append(r)
      if _JSON.value:
        print(json.dumps(r), flush=True)
      else:
        if len(rows) == 1:
          print(f"MLA layer fwd+bwd, {heads} heads, batch {_BATCH.value}, {dtype} ({r['device']}, jax {r['jax']})")
          print(f"{'backend':<10} {'T':>6} {'ms':>10} {'temp MiB':>10} {'time/xla':>9} {'temp/xla':>9}")
        if "error" in r:
          print(f"{r['impl']:<10} {T:>6}   did not run: {r['error']}", flush=True)
        else:
          print(f"{r['impl']:<10} {T:>6} {r['ms']:>10.1f} {r['temp_mib']:>10.1f} {r.get('time_vs_xla', float('nan')):>9.2f} "
                f"{r.get('temp_vs_xla', float('nan')):>9.3f}", flush=True)


if __name__ == "__main__":
  app.run(main)
