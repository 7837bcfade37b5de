"""Train (or resume) a model and evaluate it on held-out data.

    python -m moe_jax.train --config=configs/default.py --workdir=/tmp/run [--config.train.num_steps=100 ...]

Re-running the same command on the same workdir resumes. SIGTERM/SIGINT save a checkpoint and exit 0. Errors
the user must act on print one line and exit non-zero: 2 diverged, 3 the workdir holds a different run, 4 another
trainer holds the workdir, 5 no checkpoint restores, 6 a checkpoint could not be written, 7 no usable document. Writes WORKDIR/{metrics.jsonl, eval.json,
checkpoints/, tensorboard/, tokenizer.json, config.json}.
"""

from __future__ import annotations


from absl import app, flags, logging
from ml_collections import config_flags

from moe_jax.cli import fail
from moe_jax.data.packing import NoUsableDocuments
from moe_jax.host_memory import keep_host_memory
from moe_jax.platforms import prefer_cpu_without_accelerators
from moe_jax.training import TrainingDiverged, train_and_evaluate
from moe_jax.training.checkpoint import CheckpointsUnreadable, CheckpointWriteError, quiet_orbax_errors
from moe_jax.training.workdir import ConfigMismatch, WorkdirInUse

# Failures that are the user's to act on: one clear message and an exit code, not a traceback.
_EXIT_CODES = {TrainingDiverged: 2, ConfigMismatch: 3, WorkdirInUse: 4, CheckpointsUnreadable: 5,
               CheckpointWriteError: 6, NoUsableDocuments: 7}

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and eval.json.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  prefer_cpu_without_accelerators()  # no plugin noise before jax falls back to the CPU
  keep_host_memory()  # before XLA's threads first allocate: no page faults per step
  logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO; progress lines are printed instead
  quiet_orbax_errors()  # a failed save or restore is reported in one line below
  try:
    result = train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except tuple(_EXIT_CODES) as e:
    fail(e, _EXIT_CODES[type(e)])
  if "preempted" in result:
    print(f"preempted by {result['signal']} at step {result['preempted']}: checkpoint saved", flush=True)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
