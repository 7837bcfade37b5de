"""The train state and its creation, already placed: eval_shape -> shardings -> jit(init, out_shardings=...).

TrainState
  step         int32 []      optimiser steps taken
  tokens       float32 []    token slots (live rows x seq_len) consumed: the clock of token-based schedules
  params       the model parameters *without* the routing biases (what the optimiser sees)
  router_bias  {"path/e_score_correction_bias": float32 [E] or [L, E]}: loss-free balancing state, no gradient
  opt_state    optax state of `params`

Sharding here is plain data parallelism: parameters replicated, the batch split over every device on a 1-axis
'data' mesh. (Logical-axis rules for FSDP, tensor and expert parallelism plug in at `state_shardings`.)
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from moe_jax.training.balancing import split_router_bias
from moe_jax.training.optimizer import decay_mask, make_optimizer


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  tokens: jax.Array
  params: Any
  router_bias: Any
  opt_state: Any


def make_mesh() -> Mesh:
  return Mesh(np.asarray(jax.devices()), ("data",))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P("data"))


def create_train_state(model: nn.Module, train_cfg: Any, mesh: Mesh, seed: int):
  """(state, state shardings, optimizer). Parameters are initialised directly into their shardings."""
  dummy = jnp.zeros((1, 8), jnp.int32)
  boxed = jax.eval_shape(model.init, jax.random.PRNGKey(0), dummy)["params"]
  boxed_wo_bias, _ = split_router_bias(boxed)
  tx = make_optimizer(train_cfg, decay_mask(boxed_wo_bias))

  def init_fn(rng):
    params = nn.meta.unbox(model.init(rng, dummy)["params"])
    params, bias = split_router_bias(params)
    return TrainState(step=jnp.zeros((), jnp.int32), tokens=jnp.zeros((), jnp.float32), params=params,
                      router_bias=bias, opt_state=tx.init(params))

  abstract = jax.eval_shape(init_fn, jax.random.PRNGKey(seed))
  shardings = jax.tree.map(lambda _: NamedSharding(mesh, P()), abstract)
  state = jax.jit(init_fn, out_shardings=shardings)(jax.random.PRNGKey(seed))
  return state, shardings, tx
