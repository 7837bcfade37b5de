"""The train state and its creation, already sharded: eval_shape -> shardings -> jit(init, out_shardings=...).

TrainState
  step         int32 []      optimiser steps taken
  tokens       float32 []    token slots (live rows x seq_len) consumed: the clock of token-based schedules
  params       the model's "params" collection (what the optimiser sees)
  router_bias  the model's "router" collection: the routing biases e_score_correction_bias, float32 [E] or [L, E]
               per MoE layer (loss-free balancing state: no gradient, no optimiser state)
  opt_state    optax state of `params`

Every parameter is split by its logical axis names through the rules in `config.mesh.rules`
(moe_jax.sharding); Adam's moments follow their parameter; counters and routing biases are replicated.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from moe_jax.kernels.interpret import kernels_for
from moe_jax.sharding import batch_axes, logical_shardings, param_specs
from moe_jax.training.optimizer import decay_mask, make_optimizer, trainable_mask


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  tokens: jax.Array
  params: Any
  router_bias: Any
  opt_state: Any


def batch_sharding(mesh: Mesh, rules: Sequence) -> NamedSharding:
  """Rows of a [B, T] batch split over the rules' batch axes (data x fsdp x expert by default)."""
  return NamedSharding(mesh, P(batch_axes(rules) or None))


def batch_ways(mesh: Mesh, rules: Sequence) -> int:
  """How many ways the rules split a batch's rows on `mesh` (data x fsdp x expert by default)."""
  return math.prod(mesh.shape[a] for a in batch_axes(rules))


def check_batch_split(batch_size: int, mesh: Mesh, rules: Sequence) -> None:
  """Raises naming config.data.batch_size, the mesh and the batch axes when the rows do not split evenly."""
  split = batch_ways(mesh, rules)
  if batch_size % split:
    raise ValueError(f"invalid config: config.data.batch_size={batch_size} is not divisible by the {split} ways the "
                     f"batch is split (mesh {dict(mesh.shape)}, batch axes {batch_axes(rules)})")


@contextlib.contextmanager
def mesh_context(mesh: Mesh, rules: Sequence):
  """The mesh and logical-axis rules a step is traced under (activation constraints, expert parallelism), and
  kernels chosen for the mesh's devices (moe_jax.kernels.interpret.kernels_for), not the default backend's."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules), kernels_for(mesh.devices.flat):
    yield


def _abstract_params(model: nn.Module, mesh: Mesh, rules: Sequence):
  """(boxed abstract params, their specs) -- raises naming the parameter when a split dim is not divisible."""
  with kernels_for(mesh.devices.flat):  # the model is traced with the kernels of the mesh it is created for
    boxed = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"]
  return boxed, param_specs(boxed, rules, dict(mesh.shape))


def _chosen(boxed: Any, train_cfg: Any, selection: Callable[[Any], Any] | None) -> Any:
  """What trains: `selection(boxed)`, or by default config.train.trainable (all, or the DSA indexers only)."""
  if selection is not None:
    return selection(boxed)
  trainable = train_cfg.get("trainable", "all")
  return None if trainable == "all" else trainable_mask(boxed, trainable)


def _state_init(model: nn.Module, train_cfg: Any, mesh: Mesh, rules: Sequence, selection):
  """(init_fn rng -> TrainState, its abstract value's shardings, the optimizer): what creating a state needs."""
  dummy = jnp.zeros((1, 8), jnp.int32)
  boxed, specs = _abstract_params(model, mesh, rules)
  tx = make_optimizer(train_cfg, decay_mask(boxed), _chosen(boxed, train_cfg, selection))

  def init_fn(rng):
    with kernels_for(mesh.devices.flat):
      variables = nn.meta.unbox(model.init(rng, dummy))
    params = variables["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), tokens=jnp.zeros((), jnp.float32), params=params,
                      router_bias=variables.get("router", {}), opt_state=tx.init(params))

  abstract = jax.eval_shape(init_fn, jax.random.PRNGKey(0))
  return init_fn, logical_shardings(abstract, specs, mesh), tx, abstract


def create_train_state(model: nn.Module, train_cfg: Any, mesh: Mesh, rules: Sequence, seed: int,
                       selection: Callable[[Any], Any] | None = None):
  """(state, state shardings, optimizer). Parameters are initialised directly into their shardings.

  `selection(boxed params)` says what trains (moe_jax.training.optimizer.restrict_to; a None result = everything);
  without it, config.train.trainable does.
  Raises ValueError naming the parameter and the mesh axes when a split dim is not divisible.
  """
  init_fn, shardings, tx, _ = _state_init(model, train_cfg, mesh, rules, selection)
  state = jax.jit(init_fn, out_shardings=shardings)(jax.random.PRNGKey(seed))
  return state, shardings, tx


def abstract_train_state(model: nn.Module, train_cfg: Any, mesh: Mesh, rules: Sequence,
                         selection: Callable[[Any], Any] | None = None):
  """(state of jax.ShapeDtypeStructs carrying their shardings, state shardings, optimizer): what
  `create_train_state` would make, with nothing allocated -- for compiling ahead of time on any mesh, including
  one of compile-only devices (moe_jax.aot)."""
  _, shardings, tx, abstract = _state_init(model, train_cfg, mesh, rules, selection)
  state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
  return state, shardings, tx


def replace_optimizer(state: TrainState, model: nn.Module, train_cfg: Any, mesh: Mesh, rules: Sequence,
                      selection: Callable[[Any], Any] | None):
  """(state with a fresh optimiser state for a new `selection`, its shardings, the optimizer): ESFT decides what
  trains only once the weights are loaded. Moments of gathered rows ([rows, ...]) are replicated."""
  boxed, specs = _abstract_params(model, mesh, rules)
  tx = make_optimizer(train_cfg, decay_mask(boxed), _chosen(boxed, train_cfg, selection))
  abstract = jax.eval_shape(lambda p: state.replace(opt_state=tx.init(p)), state.params)
  shardings = logical_shardings(abstract, specs, mesh)
  opt_state = jax.jit(tx.init, out_shardings=shardings.opt_state)(state.params)
  return state.replace(opt_state=opt_state), shardings, tx


def global_batch(local_batch: dict, sharding: NamedSharding) -> dict:
  """This process's rows (numpy) -> global jax.Arrays split by `sharding`; processes hold consecutive row blocks."""
  return jax.tree.map(lambda a: jax.make_array_from_process_local_data(sharding, a), local_batch)


def replicated_array(value, mesh: Mesh) -> jax.Array:
  """A host value every process holds in full -> one global array replicated over the mesh."""
  return jax.make_array_from_process_local_data(NamedSharding(mesh, P()), value)
