"""Load and save DeepSeek-V2/V3 checkpoints in the published (HF) format: config.json + safetensors.

    model_config, variables = moe_jax.interop.huggingface.load("/path/to/DeepSeek-V3", dtype=jnp.bfloat16)
    logits, aux = Transformer(model_config).apply(variables, tokens)      # {"params": ..., "router": ...}
    moe_jax.interop.huggingface.save(model_config, variables, "/path/to/export")   # loads in transformers

Handles single-file and sharded (`model.safetensors.index.json`) checkpoints, the V3 release's FP8 e4m3 weights
with 128x128-block `weight_scale_inv` (dequantised on load), per-expert tensors, the MTP layer stored as layer
`num_hidden_layers`, and rope settings under `rope_scaling` or `rope_parameters`. Tensors are read one at a time
(memory-mapped) into preallocated parameter buffers, so the checkpoint is never held twice in host memory.
The routing biases `e_score_correction_bias` are the model's "router" collection; the checkpoint holds the true
vocabulary, and the embedding / head padding rows (`pad_vocab_to_multiple_of`) are zero after loading.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax.core import meta
from flax.traverse_util import unflatten_dict

from moe_jax.config import padded_vocab_size
from moe_jax.interop.hf_config import fp8_block_size, hf_config_from_model, model_config_from_hf
from moe_jax.interop.hf_layout import checkpoint_layout, collection_of, mtp_layers_present
from moe_jax.interop.safetensors_io import SafetensorsCheckpoint, dequantize_fp8_blockwise, write_file
from moe_jax.model.lora import merge_lora, without_lora
from moe_jax.model.params import variable_shapes
from moe_jax.model.variables import as_variables, flat_variables

log = logging.getLogger(__name__)
_SCALE_SUFFIX = "_scale_inv"  # FP8 release: "<name>.weight" + "<name>.weight_scale_inv"
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers some exporters write; recomputed from the config


def _name_list(names, limit: int = 12) -> str:
  names = sorted(names)
  more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
  return ", ".join(names[:limit]) + more


def load_config(path: str) -> Any:
  """The model config of a checkpoint directory, as `load` builds the model (MTP off when config.json announces
  MTP layers the checkpoint does not hold); reads config.json and the safetensors headers only."""
  return _config_and_tensors(path)[0]


def _config_and_tensors(path: str):
  """(model config, the opened checkpoint, config.json as parsed)."""
  config_path = os.path.join(path, "config.json")
  if not os.path.exists(config_path):
    raise FileNotFoundError(f"no config.json in {path!r}")
  with open(config_path) as f:
    hf = json.load(f)
  cfg = model_config_from_hf(hf)
  ckpt = SafetensorsCheckpoint(path)
  _check_sizes_against_tensors(path, cfg, ckpt)  # before anything is allocated from config.json's sizes
  n_mtp = mtp_layers_present(set(ckpt.keys()), cfg)
  if cfg.num_nextn_predict_layers and n_mtp == 0:
    warnings.warn(f"{path}: config.json announces num_nextn_predict_layers={cfg.num_nextn_predict_layers} but the "
                  "checkpoint holds no MTP layer; loading the main model with MTP off", stacklevel=3)
    cfg.num_nextn_predict_layers = 0
  elif n_mtp != cfg.num_nextn_predict_layers:
    raise ValueError(f"{path}: checkpoint holds {n_mtp} layers past num_hidden_layers={cfg.num_hidden_layers}, "
                     f"config.json says num_nextn_predict_layers={cfg.num_nextn_predict_layers}")
  return cfg, ckpt, hf


def load(path: str, dtype: Any = jnp.float32, *, scan_layers: bool = False) -> tuple[Any, dict]:
  """(model_config, variables {"params": ..., "router": ...}) of a DeepseekV2/V3ForCausalLM checkpoint directory.

  dtype: the parameters' storage and compute dtype (routers stay float32). scan_layers: stack identical layers
  for `nn.scan`. If config.json announces MTP layers that the checkpoint does not hold (transformers neither
  builds nor saves them), the model is loaded with MTP off and a warning; any other missing or unexpected
  tensor raises ValueError naming them.
  """
  cfg, ckpt, hf = _config_and_tensors(path)
  cfg.scan_layers = scan_layers
  cfg.dtype = cfg.param_dtype = jnp.dtype(dtype).name
  keys = set(ckpt.keys())
  layout = checkpoint_layout(cfg)
  scales = {k for k in keys if k.endswith(_SCALE_SUFFIX)}
  data = {k for k in keys - scales if not k.endswith(_IGNORED_SUFFIXES)}
  missing = layout.keys() - data
  unexpected = (data - layout.keys()) | {k for k in scales if k[: -len(_SCALE_SUFFIX)] not in layout}
  if missing or unexpected:
    raise ValueError(f"{path}: checkpoint does not match its config.json.\n  missing ({len(missing)}): "
                     f"{_name_list(missing)}\n  unexpected ({len(unexpected)}): {_name_list(unexpected)}")

  targets = flat_variables(variable_shapes(cfg))
  buffers: dict[tuple[str, ...], np.ndarray] = {}
  filled = dict.fromkeys(targets, 0)
  # Padding rows of the embedding and head are not in the checkpoint: zeros, counted as filled.
  padding = (padded_vocab_size(cfg) - cfg.vocab_size) * cfg.hidden_size
  for p in (("embedding",), ("lm_head",)):
    if p in targets and padding:
      buffers[p] = np.zeros(targets[p].shape, targets[p].dtype)
      filled[p] = padding
  block = fp8_block_size(hf)
  order = [k for k in ckpt.keys() if k in layout]  # file order: sequential reads
  t0, next_report = time.time(), 0.1
  for n_done, key in enumerate(order, 1):
    spec = layout[key]
    w = ckpt.get(key)
    if w.shape != spec.shape:
      raise ValueError(f"{key}: shape {w.shape} in the checkpoint, {spec.shape} expected from config.json")
    if key + _SCALE_SUFFIX in keys:
      w = dequantize_fp8_blockwise(w, np.asarray(ckpt.get(key + _SCALE_SUFFIX)), block)
    elif w.dtype in (ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2):
      raise ValueError(f"{key} is FP8 but has no {key + _SCALE_SUFFIX}")
    for ppath, index, arr in spec.assign(w):
      if ppath not in targets:
        raise ValueError(f"{key} maps to parameter {'/'.join(ppath)}, which the model does not have")
      if ppath not in buffers:
        buffers[ppath] = np.empty(targets[ppath].shape, targets[ppath].dtype)
      dest = buffers[ppath][index]  # index () selects the whole array
      if arr.shape != dest.shape:
        raise ValueError(f"{key} -> {'/'.join(ppath)}{list(index)}: shape {arr.shape} != {dest.shape}")
      dest[...] = arr.astype(targets[ppath].dtype)
      filled[ppath] += arr.size
    if n_done / len(order) >= next_report:
      log.info("loaded %d/%d tensors (%.0f s)", n_done, len(order), time.time() - t0)
      next_report += 0.1
  unfilled = [p for p, n in filled.items() if n != int(np.prod(targets[p].shape, dtype=np.int64))]
  if unfilled:
    raise ValueError(f"{path}: parameters not (fully) covered by the checkpoint: "
                     f"{_name_list('/'.join(p) for p in unfilled)}")
  variables: dict[str, dict] = {}
  for p in list(buffers):  # hand buffers to JAX one at a time, freeing each host copy
    variables.setdefault(collection_of(p), {})[p] = jax.device_put(buffers.pop(p))
  return cfg, {k: unflatten_dict(v) for k, v in variables.items()}


def _check_sizes_against_tensors(path: str, cfg: Any, ckpt: SafetensorsCheckpoint) -> None:
  """config.json's layer count, expert count, vocabulary and width against the tensors the files hold, from the
  names and headers alone. Building the layout or the parameter shapes of a config claiming 4,000,000 experts or
  100,000 layers would take minutes and gigabytes before any mismatch showed."""
  layers, experts = set(), set()
  for key in ckpt.keys():
    m = re.match(r"model\.layers\.(\d+)\.(?:mlp\.experts\.(\d+)\.)?", key)
    if m:
      layers.add(int(m.group(1)))
      if m.group(2) is not None:
        experts.add(int(m.group(2)))
  problems = []
  main = {i for i in layers if i < cfg.num_hidden_layers}
  if len(main) != cfg.num_hidden_layers or len(layers) > cfg.num_hidden_layers + max(cfg.num_nextn_predict_layers, 0):
    problems.append(f"num_hidden_layers={cfg.num_hidden_layers} (+{cfg.num_nextn_predict_layers} MTP), but the "
                    f"tensors hold layers {_ranges(layers)}")
  moe_layers = cfg.num_hidden_layers > cfg.first_k_dense_replace
  if moe_layers and experts and (len(experts) != cfg.n_routed_experts or max(experts) != cfg.n_routed_experts - 1):
    problems.append(f"n_routed_experts={cfg.n_routed_experts}, but the tensors hold experts {_ranges(experts)}")
  if moe_layers and not experts and cfg.n_routed_experts:
    problems.append(f"n_routed_experts={cfg.n_routed_experts}, but the tensors hold no expert")
  if "model.embed_tokens.weight" in ckpt:
    got = ckpt.shape("model.embed_tokens.weight")
    if got != (cfg.vocab_size, cfg.hidden_size):
      problems.append(f"vocab_size x hidden_size = {(cfg.vocab_size, cfg.hidden_size)}, but "
                      f"model.embed_tokens.weight is {got}")
  if problems:
    raise ValueError(f"{path}: config.json does not match the tensors:\n  " + "\n  ".join(problems))


def _ranges(ids: set) -> str:
  if not ids:
    return "none"
  ids, out, start = sorted(ids), [], None
  for i, v in enumerate(ids):
    start = v if start is None else start
    if i + 1 == len(ids) or ids[i + 1] != v + 1:
      out.append(f"{start}" if start == v else f"{start}..{v}")
      start = None
  return ", ".join(out[:6]) + (" ..." if len(out) > 6 else "")


def save(config: Any, variables: Any, path: str, *, dtype: Any = None, max_shard_bytes: int = 4 << 30,
         overwrite: bool = False) -> list[str]:
  """Writes `variables` of a model with `config` as a DeepseekV3/V2 checkpoint that transformers and `load` read.

  variables: {"params": ..., "router": ...} (a train state's `{"params": state.params, "router":
  state.router_bias}`), scanned or unrolled (as `config.scan_layers` says), boxed or not, on any devices. Written:
  config.json, per-expert tensors, the MTP modules as layers num_hidden_layers.. (with the copies of the embedding
  and head the format repeats; a LoRA model's adapters merged into their weights, moe_jax.model.lora), in files of
  at most `max_shard_bytes` (model.safetensors, or model-0000k-of-0000n.safetensors plus
  model.safetensors.index.json). dtype: storage dtype (default: each
  parameter's own); the routing biases stay float32, as in the V3 release. Returns the files written. Raises before
  writing anything when the parameter tree does not match the config.
  """
  config_path = os.path.join(path, "config.json")
  if os.path.exists(config_path) and not overwrite:
    raise FileExistsError(f"{path} already holds a checkpoint (config.json); pass overwrite=True to replace it")
  hf = hf_config_from_model(config)  # raises for configs with no published format
  variables = as_variables(meta.unbox(variables))
  if config.get("lora_rank", 0):
    variables = {**variables, "params": merge_lora(jax.device_get(variables["params"]), config)}
    config = without_lora(config)
  flat = flat_variables(variables)
  expect = flat_variables(variable_shapes(config))
  missing, unexpected = expect.keys() - flat.keys(), flat.keys() - expect.keys()
  if missing or unexpected:
    raise ValueError(f"params do not match the config.\n  missing ({len(missing)}): "
                     f"{_name_list('/'.join(p) for p in missing)}\n  unexpected ({len(unexpected)}): "
                     f"{_name_list('/'.join(p) for p in unexpected)}")
  for p, spec in expect.items():
    if tuple(flat[p].shape) != tuple(spec.shape):
      raise ValueError(f"parameter {'/'.join(p)} has shape {tuple(flat[p].shape)}; the config gives {spec.shape}")
  def get(ppath, index):
    # Slice on the device and copy only that piece: a host cache of whole parameters would end up holding the
    # model (every stacked layer and expert array) instead of one shard.
    return np.asarray(jax.device_get(flat[ppath][index] if index else flat[ppath]))

  def storage_dtype(key, arr):
    if key.endswith("e_score_correction_bias"):
      return np.dtype(np.float32)
    return arr.dtype if dtype is None else np.dtype(jnp.dtype(dtype))

  layout = checkpoint_layout(config)
  nominal = np.dtype(jnp.dtype(dtype or next(iter(flat.values())).dtype))
  hf |= {"torch_dtype": nominal.name, "dtype": nominal.name}
  # Plan the shards from shapes alone, then write them one at a time (only one shard is ever held in memory).
  plan, size = [[]], 0
  for key, spec in layout.items():
    nbytes = int(np.prod(spec.shape)) * nominal.itemsize
    if plan[-1] and size + nbytes > max_shard_bytes:
      plan.append([])
      size = 0
    plan[-1].append(key)
    size += nbytes
  os.makedirs(path, exist_ok=True)
  n = len(plan)
  names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
  weight_map, total, t0 = {}, 0, time.time()
  for i, (keys, name) in enumerate(zip(plan, names)):
    tensors = {}
    for key in keys:
      arr = np.asarray(layout[key].export(get))
      if arr.shape != layout[key].shape:
        raise AssertionError(f"{key}: exported shape {arr.shape} != {layout[key].shape}")
      tensors[key] = np.ascontiguousarray(arr.astype(storage_dtype(key, arr)))
    total += write_file(os.path.join(path, name), tensors, {"format": "pt"})
    weight_map.update(dict.fromkeys(keys, name))
    log.info("wrote %s (%d/%d, %.0f s)", name, i + 1, n, time.time() - t0)
  if n > 1:
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
      json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
  with open(config_path, "w") as f:
    json.dump(hf, f, indent=2)
  return names
