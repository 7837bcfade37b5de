"""The programs a run compiles -- the train step, the eval step, the Generator's prefill + decode -- lowered for a
mesh of any devices (compile-only ones included) from abstract inputs: nothing is allocated.

Each is built exactly as the trainer and the Generator build it (`make_train_step`, `make_eval_step`,
`Generator`'s `_generate`), so what compiles here is what runs there.
"""

from __future__ import annotations

import copy
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from moe_jax.inference.generator import bucket, generation_program, inference_config
from moe_jax.kernels.attention import resolve_attention
from moe_jax.kernels.gmm import resolve_backend
from moe_jax.kernels.interpret import kernels_for
from moe_jax.model import Transformer
from moe_jax.sharding import make_mesh, rules_of
from moe_jax.training import schedules
from moe_jax.training.config import validate_config
from moe_jax.training.state import (abstract_train_state, batch_sharding, batch_ways, check_batch_split,
                                    mesh_context)
from moe_jax.training.step import make_eval_step, make_train_step

STEPS = ("train", "eval", "generate")


def resolved_kernels(model_cfg: Any, devices: Sequence) -> dict:
  """{"gmm_backend", "attention_impl"} as the model will run them on `devices` ("auto" resolved)."""
  with kernels_for(devices):
    return {"gmm_backend": resolve_backend(model_cfg.gmm_backend),
            "attention_impl": resolve_attention(model_cfg.attention_impl)}


def _without_data_paths(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The config as validated for compiling: nothing is read, so a file source needs no paths here (the programs do
  not depend on where the rows come from, only on their shape and on whether they carry a loss mask)."""
  if config.data.get("paths") or config.data.source in ("embedded",):
    return config
  checked = copy.deepcopy(config)
  checked.data.source = "embedded"
  return checked


class Programs:
  """Lowers a config's programs on `devices`. `lower(step)` returns the jax `Lowered` of "train", "eval" or
  "generate"; config errors (mesh sizes, divisibility, batch split, kernel availability) raise before tracing."""

  def __init__(self, config: ml_collections.ConfigDict, devices: Sequence, *, prompt_len: int | None = None,
               new_tokens: int | None = None):
    validate_config(_without_data_paths(config))
    self.config, self.devices = config, list(devices)
    self.mesh: Mesh = make_mesh(config.mesh, self.devices)
    self.rules = rules_of(config.mesh)
    check_batch_split(config.data.batch_size, self.mesh, self.rules)
    self.kernels = resolved_kernels(config.model, self.devices)  # raises for a kernel the platform cannot run
    self.model = Transformer(config.model)
    self.prompt_len = prompt_len or config.data.seq_len
    self.new_tokens = new_tokens or config.data.seq_len
    self.state, self.shardings, self.tx = abstract_train_state(self.model, config.train, self.mesh, self.rules)

  def _batch(self, rows: int, seq: int, sharding: NamedSharding) -> dict:
    keys = ("tokens", "segment_ids", "positions") + (("loss_mask",) if self.config.data.source == "sft_jsonl" else ())
    return {k: jax.ShapeDtypeStruct((rows, seq), jnp.int32, sharding=sharding) for k in keys}

  def tokens(self, step: str) -> int:
    """Tokens one call of `step` processes (global): the model-FLOPs denominator."""
    B, T = self.config.data.batch_size, self.config.data.seq_len
    return {"train": B * T, "eval": B * T, "generate": B * (self.prompt_len + self.new_tokens)}[step]

  def lower(self, step: str):
    if step not in STEPS:
      raise ValueError(f"step {step!r} is not one of {STEPS}")
    return getattr(self, f"_lower_{step}")()

  def _lower_train(self):
    c = self.config
    step = make_train_step(self.model, c, self.tx, schedules.run_end(c), self.mesh, self.rules, self.shardings)
    batch = self._batch(c.data.batch_size, c.data.seq_len, batch_sharding(self.mesh, self.rules))
    return step.lower(self.state, batch)

  def _lower_eval(self):
    c = self.config
    step = make_eval_step(self.model, self.mesh, self.rules, self.shardings)
    batch = self._batch(c.data.batch_size, c.data.seq_len, batch_sharding(self.mesh, self.rules))
    token_bytes = jax.ShapeDtypeStruct((c.model.vocab_size,), jnp.int32, sharding=NamedSharding(self.mesh, P()))
    return step.lower(self.state.params, self.state.router_bias, batch, token_bytes)

  def _lower_generate(self):
    """The Generator's whole program (prefill + the decode while-loop), plain decoding, for a batch of
    config.data.batch_size prompts of `prompt_len` tokens and `new_tokens` new ones (each bucketed as the
    Generator does), the weights sharded as in training."""
    c = self.config
    B, Pb, Nb = bucket(c.data.batch_size, 1), bucket(self.prompt_len), bucket(self.new_tokens)
    program = generation_program(inference_config(c.model), False, Nb)
    variables = {"params": self.state.params, "router": self.state.router_bias}
    rows = batch_sharding(self.mesh, self.rules) if B % batch_ways(self.mesh, self.rules) == 0 else NamedSharding(
        self.mesh, P())
    rep = NamedSharding(self.mesh, P())
    sds = lambda shape, dtype, s=rep: jax.ShapeDtypeStruct(shape, dtype, sharding=s)  # noqa: E731
    args = (variables, sds((B, Pb), jnp.int32, rows), sds((B,), jnp.int32), sds((B,), jnp.bool_), sds((), jnp.int32),
            sds((), jnp.float32), sds((), jnp.int32), sds((), jnp.float32), sds((8,), jnp.int32),
            jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=rep))
    with mesh_context(self.mesh, self.rules):
      return program.lower(*args)
