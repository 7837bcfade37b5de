"""Every gmm backend x attention implementation a user can pick, compiled deviceless for a 4-chip TPU v5p and 8
H100s: the debug config's train step (and per gmm backend its decode program) on a mesh with expert and tensor
parallelism -- the full cross product behind tests/test_compile.py's one-of-each. A table, or --json rows.

    python scripts/compile_matrix.py [--platforms=tpu,gpu] [--steps=train,generate] [--json]
"""

from __future__ import annotations

import json
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from configs import debug  # noqa: E402
from moe_jax.aot.compile import compile_for_target  # noqa: E402
from moe_jax.aot.targets import GiB  # noqa: E402

_PLATFORMS = flags.DEFINE_list("platforms", ["tpu", "gpu"], "tpu (v5p-8 as expert=2 x tensor=2) and/or gpu "
                               "(h100-8 as data=2 x expert=2 x tensor=2).")
_STEPS = flags.DEFINE_list("steps", ["train", "generate"], "train: every gmm x attention; generate: every gmm.")
_JSON = flags.DEFINE_bool("json", False, "One JSON row per compile.")

TARGETS = {"tpu": "v5p-8", "gpu": "h100-8"}
GMM = {"tpu": ("auto", "tiled", "ragged_dot", "megablox", "pallas_tpu", "reference"),
       "gpu": ("auto", "tiled", "ragged_dot", "mgpu_ragged_dot", "pallas_mosaic_gpu", "reference")}
ATTENTION = {"tpu": ("auto", "xla", "blockwise", "splash"), "gpu": ("auto", "xla", "blockwise", "cudnn")}


def config(platform: str, gmm: str, attention: str):
  c = debug.get_config()
  c.mesh.expert, c.mesh.tensor = 2, 2
  if platform == "gpu":
    c.mesh.data, c.model.dtype = 2, "bfloat16"
  c.model.gmm_backend, c.model.attention_impl = gmm, attention
  return c


def main(argv):
  del argv
  rows = []
  for platform in _PLATFORMS.value:
    for step in _STEPS.value:
      attentions = ATTENTION[platform] if step == "train" else ("auto",)  # decoding attends in XLA over the cache
      for gmm in GMM[platform]:
        for attention in attentions:
          t0 = time.perf_counter()
          r = compile_for_target(config(platform, gmm, attention), TARGETS[platform], [step])
          s = r["steps"][step]
          row = {"target": TARGETS[platform], "step": step, "gmm": gmm, "attention": attention,
                 "resolved": f"{r['gmm_backend']}/{r['attention_impl']}", "compiled": s["compiled"],
                 "compile_seconds": round(s["compile_seconds"], 1), "seconds": round(time.perf_counter() - t0, 1),
                 "total_gib": s["memory"]["total_bytes"] / GiB if s["compiled"] else None,
                 "flops_ratio": s.get("flops_ratio"), "error": s.get("error")}
          rows.append(row)
          if _JSON.value:
            print(json.dumps(row), flush=True)
          else:
            print(f"{row['target']:<8}{step:<10}{gmm:<19}{attention:<11}{row['resolved']:<30}"
                  f"{'yes' if row['compiled'] else 'NO':<5}{row['compile_seconds']:>7.1f}s"
                  + (f"  {row['error'][:100]}" if row["error"] else ""), flush=True)
  failed = [r for r in rows if not r["compiled"]]
  print(f"{len(rows) - len(failed)} compiled, {len(failed)} failed", file=sys.stderr)
  sys.exit(1 if failed else 0)


if __name__ == "__main__":
  app.run(main)
