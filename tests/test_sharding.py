"""Data / FSDP / expert / tensor parallelism on 8 fake CPU devices (run in a subprocess: tests/sharding_worker.py),
node-limited routing, and the mesh config checks."""

import fcntl
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import debug, deepseek_v3
from moe_jax.layers.expert_parallel import expert_device, max_devices_per_token
from moe_jax.layers.router import select_experts
from moe_jax.sharding import base_mesh_config, mesh_shape, rules_of
from moe_jax.training.config import validate_config

HERE = os.path.dirname(os.path.abspath(__file__))
MESHES = ("data8", "fsdp8", "data2_expert4", "fsdp2_expert2_tensor2")


def _run_worker(ckpt_dir) -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8")
  proc = subprocess.run([sys.executable, os.path.join(HERE, "sharding_worker.py"), str(ckpt_dir)],
                        capture_output=True, text=True, env=env, timeout=1200)
  lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
  assert proc.returncode == 0 and lines, proc.stderr[-4000:]
  return json.loads(lines[-1][len("RESULT "):])


@pytest.fixture(scope="session")
def worker(tmp_path_factory):
  """The 8-device subprocess's results, computed once per test run. Under xdist the tests of this module may land
  on several workers (each with its own session), so the first one runs the subprocess under a file lock in the
  run's shared temp directory and the others wait for and read its results instead of recomputing them."""
  if not os.environ.get("PYTEST_XDIST_WORKER"):
    return _run_worker(tmp_path_factory.mktemp("ck"))
  shared = tmp_path_factory.getbasetemp().parent  # this run's directory, common to its xdist workers
  with open(shared / "sharding_worker.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    cached = shared / "sharding_worker.json"
    if not cached.exists():
      cached.write_text(json.dumps(_run_worker(tmp_path_factory.mktemp("ck"))))
    return json.loads(cached.read_text())


@pytest.mark.parametrize("name", MESHES)
def test_five_steps_match_one_device(worker, name):
  one, got = worker["one"], worker[name]
  np.testing.assert_allclose(got["losses"], one["losses"], rtol=1e-4)
  assert got["losses"][0] != got["losses"][-1]  # it trained
  assert got["biases"] == one["biases"]  # identical loss-free bias updates: loads reduced over the whole mesh
  np.testing.assert_allclose(got["max_vio"], one["max_vio"], rtol=1e-6)
  np.testing.assert_allclose(got["embedding_sum"], one["embedding_sum"], rtol=1e-4)
  assert got["dropped"] == 0.0
  assert got["vocab"] == [257, 384]  # the true vocabulary (bytes + <bos>), padded to a multiple of 128


def test_padded_vocabulary_splits_over_tensor(worker):
  assert worker["fsdp2_expert2_tensor2"]["embedding_spec"] == "P('tensor', 'fsdp')"


def test_experts_live_only_on_their_shard_and_dispatch_is_all_to_all(worker):
  r = worker["data2_expert4"]
  assert r["local_expert_shape"] == [2, 64, 32]  # 8 experts / 4 expert shards
  for s in r["expert_shards"]:
    assert (s["start"], s["stop"]) == (2 * s["expert_coord"], 2 * s["expert_coord"] + 2) and s["equal"]
  assert r["all_to_all_count"] >= 4  # x and expert ids out, results back, and their transposes
  assert r["full_expert_all_gathers"] == []


def test_dispatch_exact_and_overflow_counted(worker):
  d = worker["dispatch"]
  assert d["exact_max_err"] < 1e-6 and d["exact_dropped"] == 0.0
  assert d["small_dropped"] == pytest.approx(d["expected_dropped"]) and d["small_dropped"] > 0.1
  assert d["small_max_err"] < 1e-5  # the kept copies are exactly the ones a numpy recount keeps


def test_checkpoint_reshards_between_meshes(worker):
  r = worker["resharding"]
  assert r["to_one_equal"] and r["one_devices"] == [0]
  assert r["back_equal"] and r["back_spec"] == "P('expert', 'fsdp', 'tensor')"


def test_bad_meshes_raise_naming_both_sides(worker):
  e = worker["errors"]
  assert "data=3" in e["bad_count"] and "8 are available" in e["bad_count"]
  assert "w_uk" in e["bad_dim"] and "'heads'" in e["bad_dim"] and "tensor" in e["bad_dim"]


def test_mesh_shape_resolution_and_validation():
  m = base_mesh_config()
  assert mesh_shape(m, 8) == {"data": 8, "fsdp": 1, "expert": 1, "tensor": 1}
  m.expert, m.tensor = 4, 2
  assert mesh_shape(m, 16) == {"data": 2, "fsdp": 1, "expert": 4, "tensor": 2}
  with pytest.raises(ValueError, match="does not divide the 12 devices"):
    mesh_shape(m, 12)
  m.data = -1
  m.fsdp = -1
  with pytest.raises(ValueError, match="only one mesh axis may be -1"):
    mesh_shape(m, 8)
  c = debug.get_config()
  c.mesh.expert = 3
  with pytest.raises(ValueError, match="n_routed_experts=8 is not divisible by config.mesh.expert=3"):
    validate_config(c)
  c = debug.get_config()
  c.mesh.rules = (("batch", "pipeline"),)
  with pytest.raises(ValueError, match="pipeline"):
    rules_of(c.mesh)


@pytest.mark.parametrize("n_devices,bound", [(8, 2), (16, 4), (4, 2)])
def test_node_limited_routing_bounds_destination_devices(n_devices, bound):
  """Groups laid out over devices in order: a token limited to topk_group groups reaches <= bound devices."""
  c = deepseek_v3.get_model_config()
  c.n_routed_experts, c.num_experts_per_tok, c.n_group, c.topk_group = 64, 8, 8, 2
  assert max_devices_per_token(c, n_devices) == bound
  rng = np.random.default_rng(0)
  scores = jax.nn.sigmoid(rng.normal(size=(1, 4096, 64)).astype(np.float32))
  bias = rng.normal(size=(64,)).astype(np.float32) * 0.1
  idx, _ = select_experts(scores, bias, c)
  dev = np.asarray(expert_device(idx, 64, n_devices))[0]
  per_token = np.array([len(set(row)) for row in dev])
  assert per_token.max() <= bound
  assert per_token.max() == bound  # the bound is tight
  c.topk_method = "greedy"  # without group limiting, tokens spread over more devices
  idx, _ = select_experts(scores, bias, c)
  dev = np.asarray(expert_device(idx, 64, n_devices))[0]
  assert max(len(set(row)) for row in dev) > bound


def _free_port() -> int:
  import socket
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_form_one_mesh_and_match_one_process(worker, tmp_path):
  """jax.distributed with 2 local processes x 4 CPU devices: mesh {data=2, expert=4} across both; the losses
  equal the single-process 8-device run, Orbax saves/restores from every process (and training continues
  identically from the restored state), and the trainer (Grain input sharded by process) runs and checkpoints."""
  port = _free_port()
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  procs = [subprocess.Popen([sys.executable, os.path.join(HERE, "multihost_worker.py"), str(p), "2", str(port),
                             str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
           for p in range(2)]
  outs = []
  try:
    for p in procs:
      outs.append(p.communicate(timeout=1200))
  finally:
    for p in procs:
      p.kill()
  assert all(p.returncode == 0 for p in procs), "\n".join(err[-3000:] for _, err in outs)
  line = [ln for ln in outs[0][0].splitlines() if ln.startswith("RESULT ")][-1]
  r = json.loads(line[len("RESULT "):])
  assert (r["processes"], r["devices"], r["local_devices"]) == (2, 8, 4)
  np.testing.assert_allclose(r["losses"], worker["data2_expert4"]["losses"], rtol=1e-4)
  np.testing.assert_allclose(r["losses"], worker["one"]["losses"], rtol=1e-4)
  assert r["restored_equal"] and r["loss_after_restore"] == r["loss_continued"]
  assert r["trainer_step"] == 4 and r["checkpoints"] == ["2", "4"] and np.isfinite(r["bits_per_byte"])
  assert r["mesh_line"] == ["mesh: data=2 x fsdp=1 x expert=4 x tensor=1 over 8 devices in 2 process(es)"]


def test_pallas_kernels_on_the_mesh_match_one_device_values_and_gradients(worker):
  """megablox / pallas_tpu inside the expert-parallel shard_map and splash per shard, interpreted on 8 CPU devices:
  loss and every gradient within float32 summation error of the one-device reference (tests/sharding_worker.py)."""
  for name, err in worker["kernels"].items():
    assert err < 1e-4, (name, err)
