"""Model summary: parameter counts (total, activated per token, with MTP) and a per-component table.

    python -m moe_jax.summary --config=configs/deepseek_v3.py [--json] [--config.model.n_routed_experts=64]

All numbers come from jax.eval_shape: nothing is allocated, so the 671B config runs on a laptop.
"""

from __future__ import annotations

import json
import sys

from absl import app, flags
from ml_collections import config_flags

from moe_jax.model.params import count_params
from moe_jax.platforms import prefer_cpu_without_accelerators

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (uses config.model).")
_JSON = flags.DEFINE_bool("json", False, "Print one JSON object instead of a table.")


def format_table(counts: dict) -> str:
  lines = [f"{'component':<20} {'total':>18} {'activated/token':>18}"]
  for name, (total, active) in sorted(counts["components"].items(), key=lambda kv: -kv[1][0]):
    lines.append(f"{name:<20} {total:>18,} {active:>18,}")
  lines.append("")
  for key in ("total_params", "active_params", "total_params_with_mtp", "active_params_with_mtp", "stored_params_hf"):
    lines.append(f"{key:<24} {counts[key]:>18,}  ({counts[key] / 1e9:.2f}B)")
  return "\n".join(lines)


def main(argv):
  del argv
  prefer_cpu_without_accelerators()  # no plugin noise before jax falls back to the CPU
  counts = count_params(_CONFIG.value.model)
  if _JSON.value:
    print(json.dumps({k: v for k, v in counts.items() if k != "components"} |
                     {"components": {k: {"total": t, "active": a} for k, (t, a) in counts["components"].items()}}))
  else:
    print(format_table(counts))
  sys.stdout.flush()


if __name__ == "__main__":
  flags.mark_flag_as_required("config")
  app.run(main)
