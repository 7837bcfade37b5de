"""The planner beside the compiler: per-device bytes of a config's train step on a real target, estimated by
`moe_jax.planning.plan` and measured by XLA's buffer assignment (deviceless, `moe_jax.aot`).

    python scripts/plan_vs_compile.py --config=configs/paper/lfb_1b.py --target=v5p-64 [--config.x.y=v ...] [--json]

One row: the mesh, the planner's parameters + gradients + Adam, activations and total; the compiler's arguments,
temporaries and total; their ratio; fits by each; the FLOPs ratio and the compile time. Results are recorded in
docs/benchmarks.md ("Planner vs compiler").
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from moe_jax.aot.compile import compile_for_target  # noqa: E402
from moe_jax.aot.targets import GiB, parse_target, target_devices  # noqa: E402
from moe_jax.kernels.interpret import kernels_for  # noqa: E402
from moe_jax import planning  # noqa: E402
from moe_jax.sharding import mesh_shape, rules_of  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.")
_TARGET = flags.DEFINE_string("target", None, "v5p-64, h100-8, ...")
_JSON = flags.DEFINE_bool("json", False, "Print the row as JSON.")

def main(argv):
  del argv
  config, target = _CONFIG.value, parse_target(_TARGET.value)
  result = compile_for_target(config, target, ("train",), log=lambda m: print(m, file=sys.stderr, flush=True))
  row = result["steps"]["train"]
  sizes = mesh_shape(config.mesh, target.devices)
  with kernels_for(target_devices(target)):
    est = planning.plan(config.model, sizes, rules_of(config.mesh), seq_len=config.data.seq_len,
                        global_batch=config.data.batch_size, accelerator=target.planner_accelerator, mfu=0.4)
  out = {"config": next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--config=")), None),
         "target": target.name, "mesh": sizes, "batch": config.data.batch_size, "seq_len": config.data.seq_len,
         "remat": config.model.remat_policy, "planner_state_gib": est["params_gib"] * 4,
         "planner_activations_gib": est["activations_gib"], "planner_total_gib": est["total_gib"],
         "planner_fits": est["fits_batch"]}
  if row["compiled"]:
    m = row["memory"]
    out |= {"compiler_argument_gib": m["argument_bytes"] / GiB, "compiler_temp_gib": m["temp_bytes"] / GiB,
            "compiler_total_gib": m["total_bytes"] / GiB, "compiler_fits": row["fits"],
            "compiler_over_planner": m["total_bytes"] / GiB / est["total_gib"], "flops_ratio": row["flops_ratio"],
            "compile_seconds": row["compile_seconds"], "collectives": row["collectives"]}
  else:
    out["error"] = row["error"]
  if _JSON.value:
    print(json.dumps(out))
  else:
    for k, v in out.items():
      print(f"{k:<24} {v:.3f}" if isinstance(v, float) else f"{k:<24} {v}")


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "target"])
  app.run(main)
