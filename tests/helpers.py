"""Shared test helpers: tiny configs, jitted init, numpy conversion."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from configs import debug
from moe_jax.model import Transformer


def tiny_config(**overrides):
  c = debug.get_model_config()
  for k, v in overrides.items():
    c[k] = v
  return c


_INIT_CACHE = {}


def init_params(cfg, seed=0):
  """(Transformer(cfg), unboxed variables {"params", "router"}); cached per config so tests share one compile."""
  key = (cfg.to_json(), seed)
  if key not in _INIT_CACHE:
    model = Transformer(cfg)
    variables = jax.jit(model.init)(jax.random.PRNGKey(seed), jnp.zeros((1, 4), jnp.int32))
    _INIT_CACHE[key] = nn.meta.unbox(dict(variables))
  return Transformer(cfg), _INIT_CACHE[key]


def to_numpy64(tree):
  return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


def random_bias(variables, seed=1, scale=0.3):
  """Gives every router a non-zero e_score_correction_bias (so tests exercise biased selection)."""
  rng = np.random.default_rng(seed)

  def visit(tree):
    if isinstance(tree, dict):
      return {k: (jnp.asarray(rng.normal(size=v.shape) * scale, v.dtype) if k == "e_score_correction_bias"
                  else visit(v)) for k, v in tree.items()}
    return tree

  return visit(variables)


def merged_params(variables):
  """The params tree with the "router" collection's biases merged in at the same paths (as the numpy reference
  and the published checkpoints hold them)."""
  from flax import traverse_util
  flat = traverse_util.flatten_dict(variables["params"])
  flat.update(traverse_util.flatten_dict(variables.get("router", {})))
  return traverse_util.unflatten_dict(flat)


def max_rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def logged_losses(work):
  """{step: loss} from a training workdir's metrics.jsonl."""
  import json
  import os
  return {r["step"]: r["loss"] for r in map(json.loads, open(os.path.join(work, "metrics.jsonl"))) if "loss" in r}


def kill_9_past_step(proc, work, step, checkpoint=None, timeout=300):
  """SIGKILL a training subprocess once its metrics.jsonl has logged `step` (a few steps past a checkpoint, mid-
  run) and, with `checkpoint`, that step's checkpoint is finalised (saves are asynchronous); asserts it was still
  running."""
  import os
  import signal
  import time
  deadline = time.time() + timeout
  while time.time() < deadline:
    if (os.path.exists(os.path.join(work, "metrics.jsonl")) and max(logged_losses(work), default=0) >= step
        and (checkpoint is None or os.path.isdir(os.path.join(work, "checkpoints", str(checkpoint))))):
      break
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
