"""The weights of a training workdir's checkpoint, without its optimiser state or data position.

Only the parameters and routing biases are read (an Orbax partial restore), onto this process's first device, and
checked against the fingerprint recorded at save time. Without `step`, a newest checkpoint that does not restore
is reported and the one before it used, as training does; when none restores, CheckpointsUnreadable lists each
step and its error. Used by inference (moe_jax.restore) and by runs that start from trained weights
(moe_jax.training.init_from).
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp
from flax.core import meta

from moe_jax.config import complete_model_config
from moe_jax.model import Transformer
from moe_jax.training.checkpoint import CheckpointsUnreadable, describe, router_bias_as_saved
from moe_jax.training.fingerprint import mismatches

HF_PREFIX = "hf:"  # marks a published-format checkpoint directory (moe_jax.interop.huggingface), not a workdir


class WorkdirWeights(NamedTuple):
  config: Any  # the run's whole config (config.json)
  model_config: Any  # its model config, with fields it predates filled in
  variables: dict  # {"params": ..., "router": ...} (no "router" for models without a selection bias)
  step: int
  description: str  # "WORKDIR @ step N"


def _checkpoint_steps(ckpt_dir: str) -> list[int]:
  if not os.path.isdir(ckpt_dir):
    return []
  return sorted(int(n) for n in os.listdir(ckpt_dir)
                if n.isdigit() and os.path.exists(os.path.join(ckpt_dir, n, "state", "commit_success.txt")))


def read_workdir_weights(workdir: str, step: int | None = None,
                         log: Callable[[str], None] | None = None) -> WorkdirWeights:
  """The newest checkpoint of `workdir` that restores (or `step`'s): its parameters and routing biases. Raises
  FileNotFoundError (not a workdir, no checkpoint), ValueError (no such step), CheckpointsUnreadable."""
  workdir = os.path.abspath(workdir)  # Orbax reads absolute paths only
  config_path = os.path.join(workdir, "config.json")
  if not os.path.isfile(config_path):
    raise FileNotFoundError(f"{workdir} is not a training workdir (no config.json); for a published-format "
                            f"checkpoint give {HF_PREFIX}{workdir}")
  with open(config_path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  ckpt_dir = os.path.join(workdir, "checkpoints")
  steps = _checkpoint_steps(ckpt_dir)
  if not steps:
    raise FileNotFoundError(f"no complete checkpoint under {ckpt_dir}")
  if step is not None and step not in steps:
    raise ValueError(f"no checkpoint for step {step} under {ckpt_dir}; available: {steps}")
  model_config = complete_model_config(config.model)  # a config.json older than some fields
  abstract = meta.unbox(jax.eval_shape(Transformer(model_config).init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))
  failed = []
  for s in ([step] if step is not None else reversed(steps)):
    try:
      variables = _restore_variables(os.path.join(ckpt_dir, str(s)), abstract)
    except Exception as e:  # noqa: BLE001 - reported; an older checkpoint may serve
      failed.append((s, describe(e) if not isinstance(e, ValueError) else f"ValueError: {e}"))
      if log:
        log(f"WARNING: checkpoint {os.path.join(ckpt_dir, str(s))} is unreadable ({failed[-1][1]})")
      continue
    return WorkdirWeights(config, model_config, variables, s, f"{workdir} @ step {s}")
  lines = "\n".join(f"  step {s}: {r}" for s, r in failed)
  raise CheckpointsUnreadable(f"no checkpoint under {ckpt_dir} restores:\n{lines}")


def _restore_variables(step_dir: str, abstract: dict) -> dict:
  router = abstract.get("router", {})
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  state_dir = os.path.join(step_dir, "state")
  saved, convert = router_bias_as_saved(state_dir, router)  # a run from before the "router" collection converts
  item = {"params": abstract["params"], "router_bias": saved}
  restore_args = jax.tree.map(lambda a: ocp.ArrayRestoreArgs(dtype=a.dtype, sharding=device), item)
  restored = ocp.PyTreeCheckpointer().restore(
      state_dir, args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True))
  prints_dir = os.path.join(step_dir, "fingerprint", "metadata")
  if os.path.isfile(prints_dir):
    with open(prints_dir) as f:
      prints = json.load(f)
    prints = {k: v for k, v in prints.items() if k.split("/")[0] in restored}  # only what was read
    bad = mismatches(prints, restored)
    if bad:
      raise ValueError(f"{len(bad)} array(s) differ from the fingerprint recorded at save time (damaged on disk): "
                       f"{', '.join(bad[:4])}{' ...' if len(bad) > 4 else ''}")
  if convert is not None:
    restored["router_bias"] = convert(restored["router_bias"])
  return {"params": restored["params"]} | ({"router": restored["router_bias"]} if router else {})
