"""Runs in its own process with 8 fake CPU devices (XLA_FLAGS must be set before jax starts), so the main test
process keeps one device. Prints one JSON object with everything tests/test_sharding.py checks.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/sharding_worker.py OUT_DIR
"""

import json
import os
import re
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402
from flax.traverse_util import flatten_dict  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

from configs import debug  # noqa: E402
from moe_jax.model import Transformer  # noqa: E402
from moe_jax.sharding import make_mesh, rules_of  # noqa: E402
from moe_jax.training.checkpoint import abstract_like  # noqa: E402
from moe_jax.training.state import batch_sharding, create_train_state, global_batch  # noqa: E402
from moe_jax.training.step import make_train_step  # noqa: E402

MESHES = {"one": dict(data=1), "data8": dict(data=8), "fsdp8": dict(fsdp=8, data=1),
          "data2_expert4": dict(data=2, expert=4), "fsdp2_expert2_tensor2": dict(fsdp=2, expert=2, tensor=2, data=1)}
STEPS, B, T = 5, 8, 16


def config(mesh: dict):
  c = debug.get_config()
  # vocab_size stays the debug config's 257 (bytes + <bos>): its embedding and head are padded to a multiple of
  # pad_vocab_to_multiple_of, so tensor=2 splits them.
  c.model.rope_scaling = None
  c.model.num_hidden_layers = 2  # 1 dense + 1 MoE (+ the MoE MTP block): every kind of layer, short compiles
  c.data.batch_size = B
  c.data.seq_len = T
  c.train.num_steps = 100
  c.train.warmup_steps = 2
  c.train.learning_rate = 3e-3
  c.train.bias_update_rate = 0.01
  for k, v in mesh.items():
    c.mesh[k] = v
  return c


def batches():
  rng = np.random.default_rng(0)
  out = []
  for _ in range(STEPS):
    seg = np.ones((B, T), np.int32)
    seg[1, T // 2:] = 2  # a packed row
    seg[3, T - 3:] = 0  # padding
    pos = np.where(seg == 2, np.arange(T) - T // 2, np.arange(T)).astype(np.int32)
    out.append({"tokens": rng.integers(1, 257, (B, T)).astype(np.int32), "segment_ids": seg, "positions": pos})
  return out


def build(mesh_kw: dict, devices=None):
  c = config(mesh_kw)
  mesh, rules = make_mesh(c.mesh, devices), rules_of(c.mesh)
  model = Transformer(c.model)
  state, shardings, tx = create_train_state(model, c.train, mesh, rules, c.seed)
  step = make_train_step(model, c, tx, c.train.num_steps, mesh, rules, shardings)
  return c, mesh, rules, state, shardings, step


def run(name: str) -> dict:
  devices = jax.devices()[:1] if name == "one" else None
  c, mesh, rules, state, shardings, step = build(MESHES[name], devices)
  losses, biases, vios = [], [], []
  for b in batches():
    state, m = step(state, global_batch(b, batch_sharding(mesh, rules)))
    losses.append(float(m["loss"]))
    vios.append(float(m["max_vio"]))
    biases.append({k: np.asarray(v).tolist() for k, v in flatten_dict(state.router_bias, sep="/").items()})
  emb = np.asarray(state.params["embedding"])
  out = {"losses": losses, "biases": biases, "max_vio": vios, "embedding_sum": float(np.abs(emb).sum()),
         "dropped": float(m["dropped_fraction"]), "vocab": [c.model.vocab_size, int(emb.shape[0])],
         "embedding_spec": str(state.params["embedding"].sharding.spec)}
  if name == "data2_expert4":
    w = state.params["moe_layers_0"]["moe"]["wi_gate"]
    full = np.asarray(w)
    shards = []
    for s in w.addressable_shards:
      coords = {a: int(i) for a, i in zip(mesh.axis_names, np.argwhere(mesh.devices == s.device)[0])}
      sl = s.index[0]
      shards.append({"expert_coord": coords["expert"], "start": sl.start, "stop": sl.stop, "shape": list(s.data.shape),
                     "equal": bool(np.array_equal(np.asarray(s.data), full[sl]))})
    out["expert_shards"] = shards
    hlo = step.lower(state, global_batch(batches()[0], batch_sharding(mesh, rules))).compile().as_text()
    E, D, F = c.model.n_routed_experts, c.model.hidden_size, c.model.moe_intermediate_size
    out["all_to_all_count"] = len(re.findall(r"\ball-to-all(?:-start)?\(", hlo))
    out["full_expert_all_gathers"] = [ln.strip()[:200] for ln in hlo.splitlines()
                                      if "all-gather" in ln and re.search(rf"\[{E},({D},{F}|{F},{D})\]", ln)]
    out["local_expert_shape"] = list(w.addressable_shards[0].data.shape)
  return out, state, shardings


def resharding(tmpdir: str) -> dict:
  """Save on {data=2, expert=4}, restore on 1 device and compare; save there, restore on {fsdp=2,expert=2,tensor=2}."""
  _, _, _, state8, _, _ = build(MESHES["data2_expert4"])
  mgr = ocp.CheckpointManager(os.path.join(tmpdir, "a"))
  mgr.save(0, args=ocp.args.StandardSave(state8))
  mgr.wait_until_finished()
  _, _, _, like1, sh1, _ = build(MESHES["one"], jax.devices()[:1])
  one = mgr.restore(0, args=ocp.args.StandardRestore(abstract_like(like1, sh1)))
  same1 = all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(jax.tree.leaves(state8), jax.tree.leaves(one)))
  devs1 = {d.id for leaf in jax.tree.leaves(one) for d in leaf.sharding.device_set}
  mgr2 = ocp.CheckpointManager(os.path.join(tmpdir, "b"))
  mgr2.save(0, args=ocp.args.StandardSave(one))
  mgr2.wait_until_finished()
  _, _, _, like8, sh8, _ = build(MESHES["fsdp2_expert2_tensor2"])
  back = mgr2.restore(0, args=ocp.args.StandardRestore(abstract_like(like8, sh8)))
  same8 = all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(jax.tree.leaves(state8), jax.tree.leaves(back)))
  spec = str(back.params["moe_layers_0"]["moe"]["wi_gate"].sharding.spec)
  return {"to_one_equal": same1, "one_devices": sorted(devs1), "back_equal": same8, "back_spec": spec}


def silu(x):
  return x / (1 + np.exp(-x))


def dispatch_checks() -> dict:
  """The all-to-all dispatch alone on {data=2, expert=4}: exact vs the 1-device dropless dispatch, and with a
  small buffer the overflow equals a numpy recount and the output a numpy loop over the kept copies."""
  import jax.numpy as jnp
  from moe_jax.layers.dispatch import dropless_dispatch
  from moe_jax.layers.expert_parallel import mesh_plan, sharded_dropless_dispatch
  from moe_jax.training.state import mesh_context

  c = config(MESHES["data2_expert4"])
  mesh, rules = make_mesh(c.mesh), rules_of(c.mesh)
  rng = np.random.default_rng(3)
  Tn, K, E, D, F, n = 64, 2, 8, 16, 8, 4
  x = rng.normal(size=(Tn, D)).astype(np.float32)
  # Skewed routing: experts 0-1 (device 0) are popular, so small buffers overflow.
  p = np.array([6, 5, 1, 1, 1, 1, 1, 1], float)
  idx = np.stack([rng.choice(E, K, replace=False, p=p / p.sum()) for _ in range(Tn)]).astype(np.int32)
  w = rng.uniform(0.2, 1.0, size=(Tn, K)).astype(np.float32)
  wg, wu = (rng.normal(size=(E, D, F)).astype(np.float32) * 0.3 for _ in range(2))
  wd = rng.normal(size=(E, F, D)).astype(np.float32) * 0.3
  out = {}
  with mesh_context(mesh, rules):
    plan = mesh_plan()
    for factor in (0.0, 1.0):
      f = jax.jit(lambda *a, fac=factor: sharded_dropless_dispatch(*a, plan, capacity_factor=fac, backend="tiled"))
      y, dropped = f(x, idx, w, wg, wu, wd)
      out[factor] = (np.asarray(y, np.float64), float(dropped))
  y_ref = np.asarray(dropless_dispatch(jnp.asarray(x), idx, w, wg, wu, wd, backend="reference"), np.float64)
  # numpy: each of the 8 devices holds Tn/8 consecutive tokens; copies sorted by expert; C per destination.
  per_dev, E_loc = Tn // 8, E // n
  C = int(np.ceil(1.0 * per_dev * K / n))
  y_np = np.zeros((Tn, D))
  overflow = 0
  for dev in range(8):
    toks = np.arange(dev * per_dev, (dev + 1) * per_dev)
    flat = idx[toks].reshape(-1)
    order = np.argsort(flat, kind="stable")
    seen = np.zeros(n, int)
    for m in order:
      t, k = toks[m // K], m % K
      e = flat[m]
      dest = e // E_loc
      seen[dest] += 1
      if seen[dest] > C:
        overflow += 1
        continue
      h = silu(x[t] @ wg[e].astype(np.float64)) * (x[t] @ wu[e].astype(np.float64))
      y_np[t] += w[t, k] * (h @ wd[e])
  return {"exact_max_err": float(np.max(np.abs(out[0.0][0] - y_ref)) / np.max(np.abs(y_ref))),
          "exact_dropped": out[0.0][1], "small_dropped": out[1.0][1],
          "expected_dropped": overflow / (Tn * K),
          "small_max_err": float(np.max(np.abs(out[1.0][0] - y_np)) / np.max(np.abs(y_np)))}


def kernel_checks() -> dict:
  """The Pallas kernels on a mesh, in interpret mode, values and gradients against one device's reference:
  megablox and pallas_tpu inside the expert-parallel shard_map (unchecked vma: its transpose must still be exact
  through the tensor psum and the all-to-alls) on {fsdp=2, expert=2, tensor=2}; splash attention per shard
  (batch over data x fsdp x expert, heads over tensor) against the einsum attention."""
  import jax.numpy as jnp
  from moe_jax.kernels import interpret_kernels
  from moe_jax.kernels.attention import attend
  from moe_jax.kernels.blockwise_attention import blockwise_attention
  from moe_jax.layers.dispatch import dropless_dispatch
  from moe_jax.layers.expert_parallel import mesh_plan, sharded_dropless_dispatch
  from moe_jax.training.state import mesh_context

  c = config(MESHES["fsdp2_expert2_tensor2"])
  mesh, rules = make_mesh(c.mesh), rules_of(c.mesh)
  rng = np.random.default_rng(5)
  Tn, K, E, D, F = 64, 2, 8, 32, 16
  x = rng.normal(size=(Tn, D)).astype(np.float32)
  idx = np.stack([rng.choice(E, K, replace=False) for _ in range(Tn)]).astype(np.int32)
  w = rng.uniform(0.2, 1.0, size=(Tn, K)).astype(np.float32)
  wg, wu = (rng.normal(size=(E, D, F)).astype(np.float32) * 0.3 for _ in range(2))
  wd = rng.normal(size=(E, F, D)).astype(np.float32) * 0.3
  r = rng.normal(size=(Tn, D)).astype(np.float32)

  idx_j = jnp.asarray(idx)

  def loss(fn):
    return lambda x, w, wg, wu, wd: jnp.sum(fn(x, idx_j, w, wg, wu, wd) * r)

  ref = jax.jit(jax.value_and_grad(loss(lambda *a: dropless_dispatch(*a, backend="reference")), argnums=(0, 1, 2, 3,
                                                                                                          4)))
  want = jax.device_get(ref(x, w, wg, wu, wd))
  out = {}
  with mesh_context(mesh, rules), interpret_kernels():
    plan = mesh_plan()
    for backend in ("megablox", "pallas_tpu"):
      f = loss(lambda *a, b=backend: sharded_dropless_dispatch(*a, plan, backend=b)[0])
      got = jax.device_get(jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3, 4)))(x, w, wg, wu, wd))
      errs = [abs(float(got[0]) - float(want[0])) / abs(float(want[0]))]
      errs += [float(np.max(np.abs(g - h)) / np.max(np.abs(h))) for g, h in zip(got[1], want[1])]
      out[backend] = max(errs)
  # Splash per shard: B=8 rows over 4 batch ways, H=4 heads over tensor=2; two documents per row.
  B, T, H, N, R, A = 8, 128, 4, 16, 8, 16
  q_n, k_n = (rng.normal(size=(B, T, H, N)).astype(np.float32) for _ in range(2))
  q_r = rng.normal(size=(B, T, H, R)).astype(np.float32)
  k_r = rng.normal(size=(B, T, R)).astype(np.float32)
  v = rng.normal(size=(B, T, H, A)).astype(np.float32)
  seg = np.where(np.arange(T)[None] < 50 + 5 * np.arange(B)[:, None], 1, 2).astype(np.int32)
  cot = rng.normal(size=(B, T, H, A)).astype(np.float32)

  def attn_loss(impl):
    fn = (lambda *a: blockwise_attention(*a, seg, scale=0.2, block=32)) if impl == "blockwise" else (
        lambda *a: attend("splash", *a[:4], a[4], seg, scale=0.2))
    return lambda *a: jnp.sum(fn(*a) * cot)

  args = (q_n, q_r, k_n, k_r, v)
  want = jax.device_get(jax.jit(jax.value_and_grad(attn_loss("blockwise"), argnums=(0, 1, 2, 3, 4)))(*args))
  with mesh_context(mesh, rules), interpret_kernels():
    got = jax.device_get(jax.jit(jax.value_and_grad(attn_loss("splash"), argnums=(0, 1, 2, 3, 4)))(*args))
  errs = [abs(float(got[0]) - float(want[0])) / abs(float(want[0]))]
  errs += [float(np.max(np.abs(g - h)) / np.max(np.abs(h))) for g, h in zip(got[1], want[1])]
  out["splash"] = max(errs)
  return out


def errors() -> dict:
  out = {}
  for name, kw in {"bad_count": dict(data=3), "bad_dim": dict(tensor=8, data=1)}.items():
    try:
      build(kw)
      out[name] = None
    except ValueError as e:
      out[name] = str(e)
  return out


if __name__ == "__main__":
  if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
  # Tiny programs: XLA's CPU optimisation passes cost more compile time (~40%) than they save.
  os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
  import time
  result = {"devices": jax.device_count()}
  t0 = time.time()
  for name in MESHES:
    result[name] = run(name)[0]
    print(f"{name}: {time.time() - t0:.1f}s", file=sys.stderr, flush=True)
  result["resharding"] = resharding(sys.argv[1])
  result["errors"] = errors()
  result["dispatch"] = dispatch_checks()
  t0 = time.time()
  result["kernels"] = kernel_checks()
  print(f"kernels on the mesh: {time.time() - t0:.1f}s", file=sys.stderr, flush=True)
  print("RESULT " + json.dumps(result))
