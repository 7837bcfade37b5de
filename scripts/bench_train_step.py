"""Times the full train step (forward, backward, AdamW, bias update) of an experiment config per gmm backend and
attention backend.

    python scripts/bench_train_step.py --config=configs/default.py [--backends=tiled,ragged_dot]
                                       [--attention=auto] [--steps=5] [--json]

Prints ms/step, tokens/s and the ratio to the first backend, measured in one run (these machines are noisy:
compare ratios, not absolute numbers across runs). Random tokens, full rows, the config's batch and length.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from bench_common import time_steps, train_step_on_random_rows  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", "configs/default.py", "Experiment config.")
_BACKENDS = flags.DEFINE_list("backends", ["tiled", "ragged_dot"], "gmm backends to compare.")
_ATTENTION = flags.DEFINE_list("attention", ["auto"], "attention_impl values to compare (each with every backend).")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed steps per backend (after one compile step).")
_JSON = flags.DEFINE_bool("json", False, "Print JSON rows instead of a table.")


def time_backend(config, backend: str, steps: int, attention: str = "auto") -> dict:
  config = config.copy_and_resolve_references()
  config.model.gmm_backend = backend
  config.model.attention_impl = attention
  step, state, batch = train_step_on_random_rows(config)
  B, T = batch["tokens"].shape
  _, compile_s, dt = time_steps(step, state, batch, steps)
  return {"backend": backend, "attention": attention, "ms_per_step": 1000 * dt, "tokens_per_sec": B * T / dt, "compile_s": compile_s,
          "experts": config.model.n_routed_experts, "tokens_per_step": B * T, "device": jax.devices()[0].device_kind,
          "jax": jax.__version__}


def main(argv):
  del argv
  rows = [time_backend(_CONFIG.value, b, _STEPS.value, a) for b in _BACKENDS.value for a in _ATTENTION.value]
  for r in rows:
    r["ratio_to_first"] = r["ms_per_step"] / rows[0]["ms_per_step"]
  if _JSON.value:
    for r in rows:
      print(json.dumps(r))
    return
  print(f"{'backend':<12} {'attention':<10} {'ms/step':>9} {'tokens/s':>10} {'ratio':>7} {'compile s':>10}   ({rows[0]['device']}, jax {rows[0]['jax']})")
  for r in rows:
    print(f"{r['backend']:<12} {r['attention']:<10} {r['ms_per_step']:>9.0f} {r['tokens_per_sec']:>10,.0f} {r['ratio_to_first']:>7.2f} {r['compile_s']:>10.1f}")


if __name__ == "__main__":
  app.run(main)
