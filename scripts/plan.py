"""Memory and cost planner: per-device bytes (params, grads, Adam, activations) and time per step.

    python scripts/plan.py --config=configs/deepseek_v3.py --devices=2048 --accelerator=h800 \\
        --seq_len=4096 --global_batch=15360 --tokens=14.8e12 [--mesh=data=1,fsdp=8,expert=64,tensor=4] [--json]

Without --mesh it compares candidate meshes for --devices (see moe_jax.planning.candidate_meshes) and marks
which fit the accelerator's memory. --check_compiled also compiles the train step for the given (small!)
config on one local device and prints XLA's memory analysis beside the estimate.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from moe_jax import planning  # noqa: E402
from moe_jax.sharding import MESH_AXES, default_rules, rules_of  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file with config.model (configs/*.py).")
_MESH = flags.DEFINE_string("mesh", None, "e.g. data=1,fsdp=8,expert=64,tensor=4; default: compare candidates.")
_DEVICES = flags.DEFINE_integer("devices", 2048, "Devices to plan for (without --mesh).")
_ACCEL = flags.DEFINE_enum("accelerator", "h800", sorted(planning.ACCELERATORS), "Peak FLOP/s and memory.")
_MFU = flags.DEFINE_float("mfu", 0.4, "Model FLOPs utilisation assumed for the step time.")
_SEQ = flags.DEFINE_integer("seq_len", 4096, "Tokens per sequence.")
_BATCH = flags.DEFINE_integer("global_batch", 15360, "Sequences per optimiser step (V3: 15360).")
_TOKENS = flags.DEFINE_float("tokens", 14.8e12, "Training tokens, for device-hours (V3: 14.8T).")
_JSON = flags.DEFINE_bool("json", False, "Print one JSON row per mesh.")
_CHECK = flags.DEFINE_bool("check_compiled", False, "Compare with XLA's compiled memory analysis (small configs).")


def _parse_mesh(text: str) -> dict:
  sizes = {a: 1 for a in MESH_AXES}
  for part in text.split(","):
    name, _, value = part.partition("=")
    if name not in sizes or not value.isdigit():
      raise app.UsageError(f"--mesh part {part!r}: expected AXIS=N with AXIS in {MESH_AXES}")
    sizes[name] = int(value)
  return sizes


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  rules = rules_of(config.mesh) if "mesh" in config else default_rules()
  meshes = [_parse_mesh(_MESH.value)] if _MESH.value else planning.candidate_meshes(
      _DEVICES.value, config.model.n_routed_experts)
  cache, rows = {}, []
  for sizes in meshes:
    try:
      rows.append(planning.plan(config.model, sizes, rules, seq_len=_SEQ.value, global_batch=_BATCH.value,
                                accelerator=_ACCEL.value, mfu=_MFU.value, total_tokens=_TOKENS.value, _cache=cache))
    except ValueError as e:  # a dim the mesh cannot split: say so and go on
      rows.append({"mesh": sizes, "error": str(e)})
  if _JSON.value:
    for r in rows:
      print(json.dumps(r))
  else:
    print(planning.format_rows(rows, _ACCEL.value))
  if _CHECK.value:
    got = planning.compiled_bytes(config.model, config.train, _SEQ.value, _BATCH.value)
    est = rows[0]
    total = (got["argument_bytes"] + got["temp_bytes"]) / planning.GiB
    print(f"compiled (1 device): arguments {got['argument_bytes'] / planning.GiB:.3f} GiB + temp "
          f"{got['temp_bytes'] / planning.GiB:.3f} GiB = {total:.3f} GiB; estimate {est['total_gib']:.3f} GiB "
          f"(ratio {est['total_gib'] / total:.2f})")


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)
