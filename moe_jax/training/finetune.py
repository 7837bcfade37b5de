"""Fine-tuning from a checkpoint: `config.finetune` and what it decides -- the model config, which parameters
train, and (ESFT) which experts.

  config.finetune.method  full       every parameter trains (or config.train.trainable's subset)
                          esft_gate  Expert-Specialized Fine-Tuning (Wang et al. 2024, "Let the Expert Stick to His
                          esft_token  Last", sec. 3): per MoE layer, the routed experts most relevant to the task train;
                                     attention, shared experts, routers, embeddings and the other experts are frozen
                          lora       low-rank adapters on a frozen base (moe_jax.layers.lora)

The model config comes from the checkpoint `config.init_from` names (`resolve_model_config`): a field the run's
config sets away from the schema default must agree with the checkpoint, except the runtime fields (dtype,
attention kernels, remat, ...), the balance-loss weight, the LoRA fields and -- when the checkpoint has no
indexer -- the DSA fields (a V3 checkpoint continues as V3.2). ESFT's relevance and selection live in
moe_jax.training.esft.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import flax.linen as nn
import jax
import ml_collections

from moe_jax.config import LORA_TARGETS, base_model_config, complete_model_config
from moe_jax.interop import huggingface
from moe_jax.layers.lora import A_SUFFIX, B_SUFFIX
from moe_jax.training.optimizer import Rows, trainable_mask
from moe_jax.training.saved_weights import HF_PREFIX

METHODS = ("full", "esft_gate", "esft_token", "lora")
ESFT_METHODS = ("esft_gate", "esft_token")
ROUTED_EXPERT_WEIGHTS = ("wi_gate", "wi_up", "wo")  # under .../moe/: the stacked [E, ...] routed experts


def base_finetune_config() -> ml_collections.ConfigDict:
  f = ml_collections.ConfigDict()
  f.method = "full"  # full | esft_gate | esft_token | lora (see moe_jax.training.finetune)
  f.esft_threshold = 0.2  # ESFT: per layer, the fewest experts whose share of the layer's relevance reaches this
  f.esft_sample_batches = 8  # ESFT: training batches of the task data the relevance is measured on
  f.lora_rank = 8  # LoRA: adapter rank r
  f.lora_alpha = 16.0  # LoRA: the update is scaled by alpha / r
  f.lora_targets = ("attention", "experts")  # LoRA: attention | experts | shared_experts | mlp
  f.general_eval = False  # also evaluate on the held-out split of the run init_from names (its config.data):
  #                         eval.json's general_bits_per_byte (after) and general_bits_per_byte_before (forgetting)
  return f


def finetune_config(config: Any) -> ml_collections.ConfigDict:
  """config.finetune, or the defaults (method full) for a config without one."""
  return config.finetune if "finetune" in config else base_finetune_config()


def _require(cond: bool, msg: str) -> None:
  if not cond:
    raise ValueError(f"invalid config: {msg}")


def validate_finetune_config(config: Any) -> None:
  if "finetune" not in config:
    return
  f = config.finetune
  unknown = set(f.keys()) - set(base_finetune_config().keys())
  _require(not unknown, f"unknown fields config.finetune.{sorted(unknown)}; see moe_jax.training.finetune")
  _require(f.method in METHODS, f"config.finetune.method={f.method!r} is not one of {METHODS}")
  _require(f.method == "full" or config.get("init_from"),
           f"config.finetune.method={f.method!r} fine-tunes a checkpoint: set config.init_from (a training workdir "
           "or hf:DIR)")
  _require(0 < f.esft_threshold <= 1, f"config.finetune.esft_threshold={f.esft_threshold} must be in (0, 1]")
  _require(isinstance(f.esft_sample_batches, int) and f.esft_sample_batches >= 1,
           f"config.finetune.esft_sample_batches={f.esft_sample_batches!r} must be an integer >= 1")
  _require(isinstance(f.lora_rank, int) and f.lora_rank >= 1, f"config.finetune.lora_rank={f.lora_rank!r} must be "
           "an integer >= 1")
  _require(f.lora_alpha > 0, f"config.finetune.lora_alpha={f.lora_alpha} must be > 0")
  _require(len(f.lora_targets) > 0 and set(f.lora_targets) <= set(LORA_TARGETS),
           f"config.finetune.lora_targets={tuple(f.lora_targets)!r} must be a non-empty subset of {LORA_TARGETS}")
  _require(f.method == "full" or config.train.trainable == "all",
           f"config.finetune.method={f.method!r} decides what trains; leave config.train.trainable='all'")
  _require(f.method not in ESFT_METHODS or config.model.get("n_routed_experts", 0) > 0,
           "ESFT needs routed experts")
  _require(not f.general_eval or (config.get("init_from") and not config.init_from.startswith(HF_PREFIX)),
           "config.finetune.general_eval evaluates on the data of the run config.init_from names: it needs a "
           "training workdir there (a published checkpoint has no data config)")


def freezes_router(config: Any) -> bool:
  """True when the routers are frozen, so the routing biases hold too (loss-free balancing off)."""
  return config.train.trainable != "all" or finetune_config(config).method != "full"


# Fields that may differ from the checkpoint's: how the model computes, not what its weights mean.
RUNTIME_FIELDS = ("dtype", "param_dtype", "attention_impl", "attention_block_size", "scan_layers", "remat_policy",
                  "moe_dispatch", "capacity_factor", "gmm_backend", "ep_capacity_factor", "index_stage",
                  "decode_attention", "initializer_range", "aux_loss_alpha", "seq_aux", "max_position_embeddings",
                  "lora_rank", "lora_alpha", "lora_targets")
_DSA_FIELDS = ("index_n_heads", "index_head_dim", "index_topk")


def source_model_config(spec: str) -> ml_collections.ConfigDict:
  """The model config of a training workdir or hf:DIR (merged LoRA adapters count as plain weights)."""
  if spec.startswith(HF_PREFIX):
    return huggingface.load_config(spec[len(HF_PREFIX):])
  with open(os.path.join(spec, "config.json")) as f:
    cfg = complete_model_config(json.load(f)["model"])
  cfg.lora_rank = 0
  return cfg


def _same(a, b) -> bool:
  norm = lambda v: list(v) if isinstance(v, (tuple, list)) else v  # noqa: E731  (JSON turns tuples into lists)
  return norm(a) == norm(b)


def resolve_model_config(config: Any, source: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The run's model config: the checkpoint's, with the run's own settings of the fields that may differ, and
  LoRA's from config.finetune. Raises ValueError naming every field the run sets against the checkpoint."""
  default = base_model_config().to_dict()
  run, src = config.model.to_dict(), complete_model_config(source).to_dict()
  allowed = set(RUNTIME_FIELDS) | (set(_DSA_FIELDS) if src.get("index_n_heads") is None else set())
  clash = [f"config.model.{k}={run[k]!r} (the checkpoint has {src.get(k)!r})" for k in sorted(run)
           if not _same(run[k], default.get(k)) and not _same(run[k], src.get(k)) and k not in allowed]
  if clash:
    raise ValueError(f"invalid config: the model config comes from config.init_from={config.init_from!r}, and the "
                     f"run sets fields that change its architecture: {'; '.join(clash)}. Drop these overrides (only "
                     f"{', '.join(RUNTIME_FIELDS)} and, on a checkpoint without an indexer, the DSA fields may differ)")
  out = dict(src)
  out.update({k: run[k] for k in run if k in allowed and not _same(run[k], default.get(k))})
  f = finetune_config(config)
  if f.method == "lora":
    out.update(lora_rank=f.lora_rank, lora_alpha=f.lora_alpha, lora_targets=tuple(f.lora_targets))
  else:
    out["lora_rank"] = 0
  return ml_collections.ConfigDict(out)


def _path_names(path) -> list[str]:
  return [str(getattr(k, "key", k)) for k in path]


def moe_layer_of(names: list[str]) -> int | None:
  """The MoE-layer ordinal (0 = the first MoE layer) of an unscanned layer's routed-expert weight; -1 for the
  scanned stack; None for anything else (MTP modules included)."""
  if len(names) == 3 and names[1] == "moe" and names[2] in ROUTED_EXPERT_WEIGHTS:
    if names[0] == "moe_layers":
      return -1
    if names[0].startswith("moe_layers_"):
      return int(names[0][len("moe_layers_"):])
  return None


def trainable_selection(boxed_params: Any, config: Any, model_cfg: Any, esft_experts: dict | None) -> Any:
  """One leaf per parameter (of a boxed or a plain tree): True (trains), False (frozen) or optimizer.Rows (ESFT: the
  selected experts' rows); None when everything trains (the plain optimiser). `esft_experts` maps the published layer index
  (model.layers.<i>) to expert ids; None under ESFT = nothing trains yet (before the selection is made)."""
  method = finetune_config(config).method
  is_leaf = lambda x: isinstance(x, nn.Partitioned)  # noqa: E731
  if method == "full":
    return None if config.train.trainable == "all" else trainable_mask(boxed_params, config.train.trainable)
  if method == "lora":
    return jax.tree_util.tree_map_with_path(
        lambda path, _: _path_names(path)[-1].endswith((A_SUFFIX, B_SUFFIX)), boxed_params, is_leaf=is_leaf)
  E, first = model_cfg.n_routed_experts, model_cfg.first_k_dense_replace

  def one(path, leaf):
    j = moe_layer_of(_path_names(path))
    if j is None or esft_experts is None:
      return False
    if j >= 0:
      return Rows(sorted(esft_experts.get(str(first + j), [])), lead=1)
    n_layers = getattr(leaf, "value", leaf).shape[0]  # boxed (abstract) or plain parameters
    return Rows([l * E + e for l in range(n_layers) for e in sorted(esft_experts.get(str(first + l), []))], lead=2)

  return jax.tree_util.tree_map_with_path(one, boxed_params, is_leaf=is_leaf)


def trainable_count(params: Any, selection: Any) -> int:
  """Parameters the optimiser updates under `selection` (all of them when it is None)."""
  leaves, treedef = jax.tree.flatten(params)
  if selection is None:
    return sum(x.size for x in leaves)
  total = 0
  for x, s in zip(leaves, treedef.flatten_up_to(selection)):
    if isinstance(s, Rows):
      total += len(s.index) * math.prod(x.shape[s.lead:])
    elif s:
      total += x.size
  return total
