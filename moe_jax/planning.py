"""Memory and cost planner: per-device bytes and time per step of a model on a mesh, all from `jax.eval_shape`.

Per device (numbers per accelerator, nothing allocated):
  parameters    every parameter's shard (its logical axes through the mesh rules) x param_dtype bytes
  gradients     the same shards, in param_dtype (the train step differentiates the float params)
  optimiser     Adam's two moments per parameter shard, in param_dtype (optax scale_by_adam)
  activations   what autodiff saves for the backward pass, per sequence of `seq_len` tokens on the device:
                `saved_residuals` of one dense block and one MoE block under the config's remat policy (traced
                abstractly with heads and FFN widths divided by the tensor axis), times the layer counts, plus
                the float32 logits and, with remat, one block's full residuals (re-materialised while that
                block's backward runs); routed rows are the device's own T*K token-copies (balanced EP).
FLOPs per token (training) = 6 * N_active (MTP modules included) + 6 * D * V per MTP head
                             + 3 * 2 * n_h * (d_qk + d_v) * T/2 per attention layer (causal QK^T and AV).
Time per step = FLOPs per step / (devices * peak * MFU).

Limits, stated where they matter: the attention here is not a flash kernel, so its [T, T] scores are saved
per head (they dominate at long context); there is no pipeline axis or gradient accumulation, so the
micro-batch is the per-device batch.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from moe_jax.config import n_moe_layers
from moe_jax.kernels.attention import resolve_attention
from moe_jax.kernels.blockwise_attention import block_size_for
from moe_jax.layers.attention import attention_inputs
from moe_jax.model.block import block_class
from moe_jax.model.params import count_params, param_shapes
from moe_jax.sharding import batch_axes, param_specs, shard_shape

GiB = 2 ** 30
# Dense BF16 peak FLOP/s (no sparsity) and memory per device (a TPU chip, a GPU) as JAX sees it: the GPUs' device
# memory as the driver reports it (an "80 GB" H100 holds 79.1 GiB), the TPUs' HBM per chip. moe_jax.aot's targets
# read the same table, so the planner and the compiler's fit answers compare against one number.
ACCELERATORS = {
    "h800": (989e12, 84_942_979_072), "h100": (989e12, 84_942_979_072), "h200": (989e12, 150_754_820_096),
    "a100": (312e12, 85_899_345_920), "tpu-v5p": (459e12, 95 * GiB), "tpu-v4": (275e12, 32 * GiB),
    "tpu-v5e": (197e12, 16 * GiB), "tpu-v6e": (918e12, 32 * GiB), "cpu": (1e11, 24e9),
}


def _bytes(dtype) -> int:
  return jnp.dtype(dtype).itemsize


def param_bytes_per_device(model_cfg: Any, sizes: dict, rules: Sequence, boxed: Any = None) -> int:
  boxed = param_shapes(model_cfg, boxed=True) if boxed is None else boxed
  specs = param_specs(boxed, rules, sizes)
  item = _bytes(model_cfg.param_dtype)
  return sum(math.prod(shard_shape(shape, spec, sizes)) * item for shape, _, spec in specs.values())


def _local_config(model_cfg: Any, tensor: int) -> ml_collections.FrozenConfigDict:
  c = ml_collections.ConfigDict(model_cfg.to_dict() if hasattr(model_cfg, "to_dict") else model_cfg)
  c.num_attention_heads = max(1, c.num_attention_heads // tensor)
  if c.get("attention_type") == "gqa":
    c.num_key_value_heads = max(1, c.num_key_value_heads // tensor)
  c.intermediate_size = max(1, c.intermediate_size // tensor)
  c.moe_intermediate_size = max(1, c.moe_intermediate_size // tensor)
  if c.gmm_backend in ("auto", "tiled"):
    c.gmm_backend = "ragged_dot"  # what accelerators run by default; the residual count does not depend on it
  return ml_collections.FrozenConfigDict(c)


def block_residual_bytes(model_cfg: Any, seq_len: int, tensor: int, is_moe: bool, remat: bool = True) -> int:
  """Bytes autodiff saves for one block and one sequence (parameters excluded), from `saved_residuals`."""
  from jax._src.ad_checkpoint import saved_residuals  # the public printer's engine; returns (aval, origin)

  c = _local_config(model_cfg, tensor)
  if not remat:
    c = ml_collections.FrozenConfigDict({**c.to_dict(), "remat_policy": "none"})
  blk = block_class(c, scanned=False)(c, is_moe)
  T, D = seq_len, c.hidden_size
  x = jax.ShapeDtypeStruct((1, T, D), jnp.dtype(c.dtype))
  seg = jnp.ones((1, T), jnp.int32)
  pos = jnp.arange(T, dtype=jnp.int32)[None]

  def run(p, x):
    return blk.apply(p, x, attention_inputs(c, pos, seg), seg != 0)[0]

  params = jax.eval_shape(lambda: blk.init(jax.random.PRNGKey(0), jnp.zeros((1, T, D), c.dtype),
                                           attention_inputs(c, pos, seg), seg != 0))
  res = saved_residuals(run, params, x)
  return sum(int(np.prod(a.shape)) * a.dtype.itemsize for a, origin in res if "argument" not in origin)


def attention_workspace_bytes(model_cfg: Any, seq_len: int, tensor: int, accelerator: str) -> int:
  """One sequence's transient score tiles of the blockwise backend (float32 [tile x tile] per head: scores,
  probabilities, their cotangents and the elementwise steps between; ~8 such arrays are live at once in XLA CPU's
  compiled backward, measured against `compiled_bytes`): recomputed, so no residual counts them. The einsum
  form's [T, T] scores are residuals (counted), and fused kernels (cudnn, splash) keep theirs on chip."""
  platform = "cpu" if accelerator == "cpu" else "tpu" if accelerator.startswith("tpu") else "gpu"
  if resolve_attention(model_cfg.attention_impl, platform=platform, interpret=True) != "blockwise":
    return 0
  tile = block_size_for(seq_len, model_cfg.attention_block_size)
  heads = max(1, model_cfg.num_attention_heads // tensor)
  return 8 * heads * tile * tile * 4


def flops_per_token(model_cfg: Any, seq_len: int) -> dict:
  c = model_cfg
  counts = count_params(c)
  mtp = c.num_nextn_predict_layers
  dense = 6 * counts["active_params_with_mtp"] + 6 * mtp * c.hidden_size * c.vocab_size
  layers = c.num_hidden_layers + mtp
  d_qk = c.qk_nope_head_dim + c.qk_rope_head_dim
  attn = 3 * 2 * c.num_attention_heads * (d_qk + c.v_head_dim) * (seq_len / 2) * layers
  return {"matmul": float(dense), "attention": float(attn), "total": float(dense + attn),
          "active_params_with_mtp": counts["active_params_with_mtp"], "total_params": counts["total_params"]}


def plan(model_cfg: Any, sizes: dict, rules: Sequence, *, seq_len: int, global_batch: int, accelerator: str,
         mfu: float, total_tokens: float | None = None, _cache: dict | None = None) -> dict:
  """One mesh's row: per-device GiB of each part, FLOPs and time per step, and whether it fits: with one
  sequence per device (`fits_one_seq`, what micro-batching would need) and with the whole per-device batch."""
  if accelerator not in ACCELERATORS:
    raise ValueError(f"accelerator {accelerator!r} is not one of {sorted(ACCELERATORS)}")
  peak, hbm = ACCELERATORS[accelerator]
  n_dev = math.prod(sizes.values())
  cache = {} if _cache is None else _cache
  if "boxed" not in cache:
    cache["boxed"] = param_shapes(model_cfg, boxed=True)
  p = param_bytes_per_device(model_cfg, sizes, rules, cache["boxed"])
  t = sizes.get("tensor", 1)
  key = (t, seq_len)
  if key not in cache:
    dense_l, moe_l = model_cfg.first_k_dense_replace, n_moe_layers(model_cfg) + model_cfg.num_nextn_predict_layers
    saved = (dense_l * (block_residual_bytes(model_cfg, seq_len, t, False) if dense_l else 0)
             + moe_l * block_residual_bytes(model_cfg, seq_len, t, True))
    # With remat, one block's backward re-materialises its full residuals on top of what every block saved.
    transient = 0 if model_cfg.remat_policy == "none" else block_residual_bytes(model_cfg, seq_len, t, True, False)
    logits = (1 + model_cfg.num_nextn_predict_layers) * seq_len * model_cfg.vocab_size // t * 4 * 2
    cache[key] = saved + transient + logits + attention_workspace_bytes(model_cfg, seq_len, t, accelerator)
  act_per_seq = cache[key]
  split = math.prod(sizes[a] for a in batch_axes(rules))
  seqs = global_batch / split
  fixed = 4 * p  # params + grads + two Adam moments
  act = act_per_seq * math.ceil(seqs)
  f = flops_per_token(model_cfg, seq_len)
  step_flops = f["total"] * global_batch * seq_len
  step_s = step_flops / (n_dev * peak * mfu)
  row = {"mesh": dict(sizes), "devices": n_dev, "params_gib": p / GiB, "grads_gib": p / GiB,
         "optimizer_gib": 2 * p / GiB, "activations_per_seq_gib": act_per_seq / GiB,
         "seqs_per_device": seqs, "activations_gib": act / GiB, "total_gib": (fixed + act) / GiB,
         "fits_one_seq": fixed + act_per_seq <= hbm, "fits_batch": fixed + act <= hbm, "max_seqs_per_device": max(0, int((hbm - fixed) // act_per_seq)),
         "flops_per_token": f["total"], "attention_flops_per_token": f["attention"], "step_seconds": step_s}
  if total_tokens:
    steps = total_tokens / (global_batch * seq_len)
    row["device_hours"] = steps * step_s * n_dev / 3600
  return row


def candidate_meshes(n_devices: int, n_experts: int, tensors=(1, 2, 4, 8)) -> list[dict]:
  """Meshes worth comparing: tensor in `tensors`, expert a power of two dividing E, the rest on fsdp or data."""
  out = []
  for t in tensors:
    if n_devices % t:
      continue
    e = 1
    while e <= n_experts and n_devices % (t * e) == 0:
      if n_experts % e == 0:
        rest = n_devices // (t * e)
        out.append({"data": rest, "fsdp": 1, "expert": e, "tensor": t})
        if rest > 1:
          out.append({"data": 1, "fsdp": rest, "expert": e, "tensor": t})
      e *= 2
  return out


def compiled_bytes(model_cfg: Any, train_cfg: Any, seq_len: int, batch: int) -> dict:
  """XLA's memory analysis of the compiled train step on one device: the check of `plan` at a scaled-down size
  (it initialises the state for real, so keep the model small)."""
  from moe_jax.model import Transformer
  from moe_jax.sharding import base_mesh_config, make_mesh, rules_of
  from moe_jax.training.state import create_train_state
  from moe_jax.training.step import make_train_step

  mesh_cfg = base_mesh_config()
  mesh, rules = make_mesh(mesh_cfg, jax.devices()[:1]), rules_of(mesh_cfg)
  model = Transformer(model_cfg)
  state, shardings, tx = create_train_state(model, train_cfg, mesh, rules, 0)
  config = ml_collections.ConfigDict({"train": train_cfg, "model": model_cfg})
  step = make_train_step(model, config, tx, 1000, mesh, rules, shardings)
  batch_ = {k: jax.ShapeDtypeStruct((batch, seq_len), jnp.int32) for k in ("tokens", "segment_ids", "positions")}
  ma = step.lower(state, batch_).compile().memory_analysis()
  return {"argument_bytes": ma.argument_size_in_bytes, "temp_bytes": ma.temp_size_in_bytes,
          "output_bytes": ma.output_size_in_bytes}


def format_rows(rows: list[dict], accelerator: str) -> str:
  hbm = ACCELERATORS[accelerator][1] / GiB
  head = (f"{'mesh (data,fsdp,expert,tensor)':<32}{'params':>8}{'grads':>8}{'adam':>8}{'act/seq':>9}{'seqs':>7}"
          f"{'total':>10}{'fits 1 seq':>11}{'max seqs':>9}{'s/step':>8}{'dev-hours':>11}")
  lines = [f"per-device GiB on {accelerator} ({ACCELERATORS[accelerator][1] / 1e9:.0f} GB = {hbm:.1f} GiB)", head,
           "-" * len(head)]
  for r in rows:
    m = r["mesh"]
    name = f"{m['data']},{m['fsdp']},{m['expert']},{m['tensor']}"
    if "error" in r:
      lines.append(f"{name:<32}  cannot split: {r['error'][len('invalid config: '):][:80]}")
      continue
    lines.append(f"{name:<32}{r['params_gib']:>8.1f}{r['grads_gib']:>8.1f}{r['optimizer_gib']:>8.1f}"
                 f"{r['activations_per_seq_gib']:>9.1f}{r['seqs_per_device']:>7.1f}{r['total_gib']:>10.1f}"
                 f"{'yes' if r['fits_one_seq'] else 'no':>11}{r['max_seqs_per_device']:>9}{r['step_seconds']:>8.2f}"
                 f"{r.get('device_hours', float('nan')) / 1e6:>10.3f}M")
  if rows and "flops_per_token" in rows[0]:
    r = rows[0]
    lines.append(f"FLOPs per token (training): {r['flops_per_token'] / 1e9:.1f} G "
                 f"(attention {r['attention_flops_per_token'] / 1e9:.1f} G)")
  return "\n".join(lines)
