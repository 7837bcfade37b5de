"""Train (or resume) a model and evaluate it on held-out data.

    python -m moe_jax.train --config=configs/default.py --workdir=/tmp/run [--config.train.num_steps=100 ...]

Re-running the same command on the same workdir resumes. Writes WORKDIR/{metrics.jsonl, eval.json,
checkpoints/, tensorboard/, tokenizer.json, config.json}.
"""

from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from moe_jax.training import TrainingDiverged, train_and_evaluate

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and eval.json.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO; progress lines are printed instead
  try:
    train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except TrainingDiverged as e:
    print(f"ERROR: {e}", file=sys.stderr, flush=True)
    sys.exit(2)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
