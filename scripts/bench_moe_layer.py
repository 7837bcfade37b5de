"""Forward+backward time of one DeepSeekMoE layer as the number of routed experts grows at fixed active compute.

Tokens, top-K, model width and expert width stay fixed, so the FLOPs that a perfect dropless implementation
spends are constant; each dispatch backend's time is printed as a ratio to its own E=8 time.

    python scripts/bench_moe_layer.py [--experts=8,64,256] [--tokens=2048] [--json]
"""

from __future__ import annotations

import json
import time

import jax
import jax.numpy as jnp
from absl import app, flags

from moe_jax.config import base_model_config
from moe_jax.layers import MoE

_EXPERTS = flags.DEFINE_list("experts", ["8", "64", "256"], "Routed expert counts to compare.")
_TOKENS = flags.DEFINE_integer("tokens", 2048, "Tokens per step (batch x length).")
_HIDDEN = flags.DEFINE_integer("hidden", 256, "Model width d.")
_WIDTH = flags.DEFINE_integer("expert_width", 128, "moe_intermediate_size.")
_TOPK = flags.DEFINE_integer("topk", 8, "num_experts_per_tok.")
_BACKENDS = flags.DEFINE_list("backends", ["dropless/ragged_dot", "capacity"],
                              "dispatch[/gmm backend] variants; dropless/reference is an O(E) loop.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed repetitions (median reported).")
_JSON = flags.DEFINE_bool("json", False, "Print one JSON row per measurement instead of a table.")


def layer_config(num_experts: int, variant: str):
  c = base_model_config()
  c.hidden_size, c.moe_intermediate_size, c.num_experts_per_tok = _HIDDEN.value, _WIDTH.value, _TOPK.value
  c.n_routed_experts, c.n_group, c.topk_group, c.n_shared_experts = num_experts, 1, 1, 0
  dispatch, _, backend = variant.partition("/")
  c.moe_dispatch, c.gmm_backend, c.capacity_factor = dispatch, backend or "auto", 1.25
  return c


def time_fwd_bwd(cfg, tokens: int, repeats: int) -> float:
  x = jax.random.normal(jax.random.PRNGKey(0), (1, tokens, cfg.hidden_size))
  valid = jnp.ones((1, tokens), bool)
  layer = MoE(cfg)
  params = jax.jit(layer.init)(jax.random.PRNGKey(1), x, valid)

  @jax.jit
  def step(p, x):
    def loss(p, x):
      y, stats = layer.apply(p, x, valid)
      return jnp.mean(y ** 2) + stats.balance_loss
    return jax.grad(loss, argnums=(0, 1))(p, x)

  jax.block_until_ready(step(params, x))  # compile
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(step(params, x))
    times.append(time.perf_counter() - t0)
  return sorted(times)[len(times) // 2]


def main(argv):
  del argv
  experts = [int(e) for e in _EXPERTS.value]
  rows = []
  for variant in _BACKENDS.value:
    base = None
    for e in experts:
      t = time_fwd_bwd(layer_config(e, variant), _TOKENS.value, _REPEATS.value)
      base = base or t
      row = dict(variant=variant, experts=e, tokens=_TOKENS.value, hidden=_HIDDEN.value, expert_width=_WIDTH.value,
                 topk=_TOPK.value, seconds=t, ratio_to_first=t / base, device=jax.devices()[0].device_kind,
                 jax=jax.__version__)
      rows.append(row)
      if _JSON.value:
        print(json.dumps(row), flush=True)
  if not _JSON.value:
    print(f"MoE layer fwd+bwd, tokens={_TOKENS.value} d={_HIDDEN.value} F={_WIDTH.value} K={_TOPK.value} "
          f"on {jax.devices()[0].device_kind} (jax {jax.__version__})")
    print(f"{'variant':<22}" + "".join(f"{'E=' + str(e):>16}" for e in experts))
    for variant in _BACKENDS.value:
      cells = [r for r in rows if r["variant"] == variant]
      print(f"{variant:<22}" + "".join(f"{r['seconds'] * 1e3:>9.1f}ms x{r['ratio_to_first']:<5.2f}" for r in cells))


if __name__ == "__main__":
  app.run(main)
