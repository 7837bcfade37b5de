"""Compile a config for hardware this host does not have (TPU pods, H100/H200 clusters) and say whether it fits.

    python -m moe_jax.compile --config=configs/debug.py --target=v5p-8 --config.mesh.expert=2 --config.mesh.tensor=2
    python -m moe_jax.compile --config=configs/deepseek_v3.py --target=h100-256 --steps=train --json

--target: v4-N, v5e-N, v5p-N, v6e-N (Google Cloud accelerator types: N counts TensorCores on v4/v5p, chips on
v5e/v6e), h100-N, h200-N (N GPUs). The real compilers run here (libtpu: `pip install 'moe_jax[tpu]'`; jax's CUDA 12
plugin, ptxas and cuDNN: `pip install 'moe_jax[cuda]'`), on compile-only devices; nothing is allocated. Per step:
compile seconds, per-device bytes against the device's HBM, collectives, FLOPs beside the planner's. Exit status 1
(one line per step naming the step, the device and the bytes) when a step does not compile or does not fit; 2 for
a bad flag or config.
"""

from __future__ import annotations

import json
import os
import sys

# This program never runs anything on an accelerator: the host CPU traces and the compile-only devices compile.
# (Without it jax's CUDA plugin refuses to load on a machine with no CUDA driver, and no H100 target is there.)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from moe_jax.aot.compile import compile_for_target, failures  # noqa: E402
from moe_jax.aot.programs import STEPS  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).")
_TARGET = flags.DEFINE_string("target", None, "Hardware: v4-N, v5e-N, v5p-N, v6e-N, h100-N or h200-N.")
_STEPS = flags.DEFINE_list("steps", list(STEPS), f"Programs to compile, of {STEPS}.")
_SLICES = flags.DEFINE_integer("num_slices", 1, "TPU slices (multislice over DCN); the mesh spans them all.")
_PROMPT = flags.DEFINE_integer("prompt_len", None, "generate: prompt tokens (default config.data.seq_len).")
_NEW = flags.DEFINE_integer("new_tokens", None, "generate: new tokens (default config.data.seq_len).")
_JSON = flags.DEFINE_bool("json", False, "End the output with one JSON object (the report).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  log = lambda m: print(m, file=sys.stderr if _JSON.value else sys.stdout, flush=True)  # noqa: E731
  try:
    result = compile_for_target(_CONFIG.value, _TARGET.value, _STEPS.value, num_slices=_SLICES.value,
                                prompt_len=_PROMPT.value, new_tokens=_NEW.value, log=log)
  except (ValueError, RuntimeError) as e:
    print(f"ERROR: {e}", file=sys.stderr, flush=True)
    sys.exit(2)
  bad = failures(result)
  for line in bad:
    print(f"ERROR: {line}", file=sys.stderr, flush=True)
  if _JSON.value:
    print(json.dumps(result), flush=True)
  sys.exit(1 if bad else 0)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "target"])
  app.run(main)
