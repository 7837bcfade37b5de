"""Starting a run from trained weights (`config.init_from`) instead of a random initialisation.

`init_from` names a training workdir (its newest checkpoint that verifies) or `hf:DIR` (a published-format
checkpoint, moe_jax.interop.huggingface). On a fresh start the trainer builds its state as usual (so every array
has its sharding), then puts the loaded parameters and routing biases in place and re-initialises the optimiser
state around them; a resumed run reads its own checkpoint and never looks at `init_from` again. Lightning-indexer
parameters the source lacks stay freshly initialised: a V3 run continues as V3.2 (DeepSeek Sparse Attention) by
naming it with `config.model.index_n_heads` set, as V3.2 started from V3.1 (V3.2 report sec. 2.1.1). Any other
difference in the weights' shapes or names is an error naming the array.

Every process reads the whole source (onto its first device) and fills its own shards from it, so a multi-host
run works while the model fits one host's memory. A BPE run that names no tokenizer uses the source workdir's
tokenizer.json (token ids must mean what the weights learned); it is copied into the new workdir before the data
pipeline starts.
"""

from __future__ import annotations

import os
import shutil
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from moe_jax.interop import huggingface
from moe_jax.model.lora import merge_lora, without_lora
from moe_jax.model.variables import merge_variables
from moe_jax.training.finetune import RUNTIME_FIELDS
from moe_jax.training.saved_weights import HF_PREFIX, read_workdir_weights

def is_workdir_source(spec: str | None) -> bool:
  return bool(spec) and not spec.startswith(HF_PREFIX)


def check_source(spec: str) -> None:
  """Raises ValueError naming config.init_from when the source cannot be a checkpoint (before anything is
  built)."""
  path = spec[len(HF_PREFIX):] if spec.startswith(HF_PREFIX) else spec
  marker = "config.json"
  if not os.path.isfile(os.path.join(path, marker)):
    kind = "a published-format checkpoint directory" if spec.startswith(HF_PREFIX) else "a training workdir"
    raise ValueError(f"invalid config: config.init_from={spec!r} is not {kind} (no {marker} in {path}); "
                     f"give a training workdir or {HF_PREFIX}DIR")


def copy_source_tokenizer(config: Any, workdir: str, log: Callable[[str], None]) -> None:
  """A BPE run without config.data.tokenizer_path starting from a workdir takes that run's tokenizer."""
  spec = config.get("init_from")
  if not is_workdir_source(spec) or config.data.tokenizer != "bpe" or config.data.tokenizer_path:
    return
  src, dst = os.path.join(spec, "tokenizer.json"), os.path.join(workdir, "tokenizer.json")
  if os.path.exists(dst) or not os.path.isfile(src):
    return
  shutil.copyfile(src, dst + ".tmp")
  os.replace(dst + ".tmp", dst)
  log(f"tokenizer: {src} (the run the weights come from)")


def _place(tree: Any, shardings: Any) -> Any:
  """Host copies of `tree`'s arrays laid out by `shardings`; each process fills its own devices' shards from its
  copy (every process has read the whole source), so this also works on a multi-host mesh."""
  def one(a, sharding):
    host = np.asarray(jax.device_get(a))
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])
  return jax.tree.map(one, tree, shardings)


def _differing_fields(source_cfg: Any, target_cfg: Any) -> list[str]:
  a, b = source_cfg.to_dict(), target_cfg.to_dict()
  return sorted(k for k in set(a) | set(b) if k not in RUNTIME_FIELDS and a.get(k) != b.get(k))


def initial_state(spec: str, model_config: Any, state: Any, shardings: Any, tx: Any,
                  log: Callable[[str], None]) -> Any:
  """`state` (freshly initialised, step 0) with the parameters and routing biases of `spec` in place and the
  optimiser state initialised around them."""
  if spec.startswith(HF_PREFIX):  # stacked or not as this run's layers are
    path = spec[len(HF_PREFIX):]
    source_cfg, source_vars = huggingface.load(path, jnp.float32, scan_layers=bool(model_config.scan_layers))
    description = f"{path} (published format)"
  else:
    w = read_workdir_weights(spec, log=log)
    source_cfg, source_vars, description = w.model_config, dict(w.variables), w.description
    if source_cfg.get("lora_rank", 0):  # a LoRA fine-tune continues from its merged weights
      source_vars["params"] = merge_lora(source_vars["params"], source_cfg)
      source_cfg = without_lora(source_cfg)
  fresh = {"params": state.params} | ({"router": state.router_bias} if state.router_bias else {})
  variables, left_fresh = merge_variables(source_vars, fresh, f"init_from={spec!r}")
  params = _place(variables["params"], shardings.params)
  router = _place(variables.get("router", {}), shardings.router_bias)
  opt_state = jax.jit(tx.init, out_shardings=shardings.opt_state)(params)
  differ = _differing_fields(source_cfg, model_config)
  log(f"initialised from {description}: {sum(x.size for x in jax.tree.leaves(params)):,} parameters"
      + "".join(f", {n} {kind} arrays freshly initialised" for kind, n in (
          ("indexer", sum("indexer" in p for p in left_fresh)), ("LoRA", sum("_lora_" in p for p in left_fresh)))
                if n)
      + (f"; model config differs in {', '.join(differ)}" if differ else ""))
  return state.replace(params=params, router_bias=router, opt_state=opt_state)
