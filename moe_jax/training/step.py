"""The pure train and eval steps. `make_train_step` returns a function jitted once, with explicit shardings and
the state donated; every schedule is computed inside from (state.step, state.tokens), so nothing about the
step's inputs changes shape or type from one step to the next and it never recompiles.

A step whose loss or gradient norm is not finite returns the *input* state unchanged (and reports
`finite=False`), so the trainer can stop without anything corrupt reaching a checkpoint.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from moe_jax.config import uses_indexer
from moe_jax.training import schedules
from moe_jax.training.balancing import all_expert_loads, max_violation, update_router_bias
from moe_jax.training.finetune import freezes_router
from moe_jax.training.loss import masked_mean_nll, training_loss
from moe_jax.training.state import TrainState, batch_sharding, mesh_context


def train_step_fn(model: nn.Module, config: Any, tx: optax.GradientTransformation, run_end: float):
  """The un-jitted step: (state, batch) -> (state, metrics)."""

  def step(state: TrainState, batch: dict):
    lr = schedules.learning_rate(config, state.step, state.tokens, run_end)
    lam = schedules.mtp_weight(config, state.step, state.tokens)
    gamma = schedules.bias_update_rate(config, state.step, state.tokens)
    if freezes_router(config):  # frozen routers keep their routing biases too
      gamma = jnp.zeros_like(gamma)
    dsa = uses_indexer(config.model)

    def loss_fn(params):
      variables = {"params": params, "router": state.router_bias}
      args = (batch["tokens"], batch["segment_ids"], batch["positions"])
      if dsa:  # the layers sow the indexer's KL loss (moe_jax.layers.indexer)
        (logits, aux), sown = model.apply(variables, *args, mutable=["losses"])
        kl = [jnp.sum(v) for v in jax.tree.leaves(sown.get("losses", {}))]
        aux = {**aux, "index_loss": sum(kl) / max(len(kl), 1)}
      else:
        logits, aux = model.apply(variables, *args)
      loss, metrics = training_loss(logits, aux, batch, lam, config.train.index_loss_weight)
      stats = {k: v for k, v in aux.items() if k not in ("mtp_logits", "index_loss")}
      return loss, (metrics, stats)

    (loss, (metrics, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    grad_norm = optax.tree.norm(grads)
    direction, opt_state = tx.update(grads, state.opt_state, state.params)
    params = jax.tree.map(lambda p, d: (p - lr * d).astype(p.dtype), state.params, direction)
    bias = update_router_bias(state.router_bias, stats, gamma, config.train.bias_update_rule)
    live_rows = jnp.sum(jnp.any(batch["segment_ids"] != 0, axis=1))
    new = TrainState(step=state.step + 1, tokens=state.tokens + (live_rows * batch["tokens"].shape[1]).astype(jnp.float32),
                     params=params, router_bias=bias, opt_state=opt_state)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    new = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, state)
    loads_LE = all_expert_loads(stats)
    metrics.update(
        grad_norm=grad_norm, learning_rate=lr, mtp_weight=lam, bias_update_rate=gamma, finite=finite,
        expert_load=loads_LE, max_vio_per_layer=max_violation(loads_LE),
        dropped_fraction=jnp.mean(stats["dropped_fraction"]) if stats["dropped_fraction"].size else jnp.zeros(()),
    )
    metrics["max_vio"] = jnp.mean(metrics["max_vio_per_layer"]) if loads_LE.shape[0] else jnp.zeros(())
    return new, metrics

  return step


class _InMesh:
  """A jitted function that is traced (and run) under the mesh and logical-axis rules it was built for."""

  def __init__(self, jitted, mesh: Mesh, rules):
    self.jitted, self.mesh, self.rules = jitted, mesh, rules

  def __call__(self, *args):
    with mesh_context(self.mesh, self.rules):
      return self.jitted(*args)

  def lower(self, *args):
    with mesh_context(self.mesh, self.rules):
      return self.jitted.lower(*args)


def make_train_step(model, config, tx, run_end: float, mesh: Mesh, rules, state_shardings):
  replicated = NamedSharding(mesh, P())
  jitted = jax.jit(
      train_step_fn(model, config, tx, run_end),
      in_shardings=(state_shardings, batch_sharding(mesh, rules)),
      out_shardings=(state_shardings, replicated),
      donate_argnums=(0,),
  )
  return _InMesh(jitted, mesh, rules)


def make_eval_step(model: nn.Module, mesh: Mesh, rules, state_shardings):
  """(params, router_bias, batch, token_bytes [V]) -> sums over the batch: nll, targets, bytes, expert loads and
  gate sums (ESFT's relevance)."""

  def step(params, bias, batch, token_bytes_V):
    logits, aux = model.apply({"params": params, "router": bias}, batch["tokens"],
                              batch["segment_ids"], batch["positions"], mtp=False)
    _, nll_sum, count, targets_BT, mask_BT = masked_mean_nll(logits, batch["tokens"], batch["segment_ids"], 1,
                                                             batch.get("loss_mask"))
    nbytes = jnp.sum(jnp.where(mask_BT, token_bytes_V[targets_BT], 0))
    return {"nll_sum": nll_sum, "targets": count, "bytes": nbytes.astype(jnp.float32),
            "expert_load": aux["expert_load"], "gate_sum": aux["gate_sum"]}

  replicated = NamedSharding(mesh, P())
  return _InMesh(jax.jit(step, in_shardings=(state_shardings.params, state_shardings.router_bias,
                                             batch_sharding(mesh, rules), replicated), out_shardings=replicated),
                 mesh, rules)
