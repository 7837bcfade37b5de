"""A model for inference from a training workdir or a published-format (HF) checkpoint directory.

    model = restore.load_model("/tmp/moe_jax_default")        # WORKDIR of `moe_jax.train`: newest checkpoint
    model = restore.load_model("hf:/path/to/DeepSeek-V3")      # config.json + safetensors
    model.config, model.variables ({"params", "router"}), model.tokenizer (None for hf:), model.description

From a workdir only the parameters and routing biases are read (an Orbax partial restore: no optimiser state,
no data iterator), onto this process's first device, and checked against the fingerprint recorded at save time.
Without --step, a newest checkpoint that does not restore is reported and the one before it used, as training
does; when none restores, CheckpointsUnreadable lists each step and its error in a few lines. The tokenizer is the one the run trained with
(WORKDIR/tokenizer.json, config.data.tokenizer_path, or bytes).
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
from moe_jax.data import load_tokenizer
from moe_jax.interop import huggingface
from moe_jax.model import Transformer
from moe_jax.training.checkpoint import CheckpointsUnreadable, describe, router_bias_as_saved
from moe_jax.training.fingerprint import mismatches
from moe_jax.training.init_from import HF_PREFIX



class LoadedModel(NamedTuple):
  config: Any  # model config
  variables: dict  # {"params": ..., "router": ...} (no "router" for models without a selection bias)
  tokenizer: Any  # moe_jax.data tokenizer, or None when the checkpoint carries none we can read
  description: str  # where it came from (path, step)


def _tokenizer(config: ml_collections.ConfigDict, workdir: str):
  tok = load_tokenizer(config.data, workdir)
  if tok is None:  # never train one here: it would not be the tokenizer the model learned
    raise FileNotFoundError(f"the run used a BPE tokenizer but {workdir}/tokenizer.json does not exist")
  return tok


def _checkpoint_steps(ckpt_dir: str) -> list[int]:
  if not os.path.isdir(ckpt_dir):
    return []
  return sorted(int(n) for n in os.listdir(ckpt_dir)
                if n.isdigit() and os.path.exists(os.path.join(ckpt_dir, n, "state", "commit_success.txt")))


def load_workdir(workdir: str, step: int | None = None, log: Callable[[str], None] | None = None) -> LoadedModel:
  workdir = os.path.abspath(workdir)  # Orbax reads absolute paths only
  config_path = os.path.join(workdir, "config.json")
  if not os.path.isfile(config_path):
    raise FileNotFoundError(f"{workdir} is not a training workdir (no config.json); for a published-format "
                            f"checkpoint write --checkpoint={HF_PREFIX}{workdir}")
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
    return LoadedModel(model_config, variables, _tokenizer(config, workdir), f"{workdir} @ step {s}")
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


def load_model(spec: str, *, step: int | None = None, dtype: Any = jnp.float32,
               log: Callable[[str], None] | None = None) -> LoadedModel:
  """`spec`: a training workdir, or `hf:DIR` for a DeepseekV2/V3 checkpoint (loaded in `dtype`)."""
  if spec.startswith(HF_PREFIX):
    path = spec[len(HF_PREFIX):]
    cfg, variables = huggingface.load(path, dtype)
    return LoadedModel(cfg, variables, None, f"{path} (published format)")
  return load_workdir(spec, step, log)
