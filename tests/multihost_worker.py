"""One process of a multi-process CPU job (tests/test_sharding.py starts N of them on this machine).

    python tests/multihost_worker.py PROCESS_ID NUM_PROCESSES PORT WORKDIR

Phase 1: the 5 synthetic steps of tests/sharding_worker.py on mesh {data=2, expert=4} spanning all processes'
CPU devices, each process feeding its own rows; then an Orbax save by all processes, a restore, one more step.
Phase 2: the real trainer (Grain input sharded by process, Orbax checkpoints written by every process, the
whole-split evaluation) for 4 steps. Process 0 prints one RESULT line.
"""

import json
import os
import sys
import time

pid, nproc, port, workdir = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
os.environ["JAX_PLATFORMS"] = "cpu"
# Tiny programs: XLA's CPU optimisation passes cost more compile time than they save (tests/sharding_worker.py).
os.environ["XLA_FLAGS"] = (f"--xla_force_host_platform_device_count={8 // nproc} --xla_backend_optimization_level=0 "
                           "--xla_llvm_disable_expensive_passes=true")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

import sharding_worker as sw  # noqa: E402
from moe_jax.training import train_and_evaluate  # noqa: E402
from moe_jax.training.checkpoint import abstract_like  # noqa: E402
from moe_jax.training.distributed import maybe_initialize  # noqa: E402
from moe_jax.training.state import batch_sharding, global_batch  # noqa: E402


def local_rows(batch: dict) -> dict:
  rows = sw.B // jax.process_count()
  return {k: v[jax.process_index() * rows:(jax.process_index() + 1) * rows] for k, v in batch.items()}


def main():
  mesh_kw = dict(sw.MESHES["data2_expert4"], coordinator_address=f"127.0.0.1:{port}", num_processes=nproc,
                 process_id=pid)
  assert maybe_initialize(sw.config(mesh_kw).mesh)
  c, mesh, rules, state, shardings, step = sw.build(sw.MESHES["data2_expert4"])
  bs = batch_sharding(mesh, rules)
  losses = []
  batches = sw.batches()
  for b in batches:
    state, m = step(state, global_batch(local_rows(b), bs))
    losses.append(float(m["loss"]))
  mgr = ocp.CheckpointManager(os.path.join(workdir, "synthetic"))
  mgr.save(5, args=ocp.args.StandardSave(state))
  mgr.wait_until_finished()
  restored = mgr.restore(5, args=ocp.args.StandardRestore(abstract_like(state, shardings)))
  same = all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in
             zip(jax.tree.leaves(jax.device_get(state)), jax.tree.leaves(jax.device_get(restored))))
  _, m_restored = step(restored, global_batch(local_rows(batches[0]), bs))
  _, m_cont = step(state, global_batch(local_rows(batches[0]), bs))

  cfg = sw.config(dict(data=-1, expert=4))
  cfg.model.vocab_size = 257
  # A small jsonl corpus (process 0 writes it before the barrier): the whole-split final evaluation stays short.
  corpus = os.path.join(workdir, "corpus.jsonl")
  if jax.process_index() == 0:
    rng = np.random.default_rng(0)
    words = ["expert", "router", "token", "latent", "cache", "mesh", "shard", "bias", "loss", "step"]
    with open(corpus + ".tmp", "w") as f:
      for i in range(60):
        f.write(json.dumps({"text": " ".join(rng.choice(words, 40)) + f" #{i}"}) + "\n")
    os.replace(corpus + ".tmp", corpus)
  multihost_utils.sync_global_devices("corpus written")
  cfg.data.source = "jsonl"
  cfg.data.paths = (corpus,)
  cfg.data.validation_fraction = 0.1
  cfg.data.tokenizer = "byte"
  cfg.data.batch_size = 8
  cfg.data.seq_len = 64
  cfg.train.num_steps = 4
  cfg.train.eval_every = 0
  cfg.train.eval_batches = 1
  cfg.train.tensorboard = False
  cfg.checkpoint.every = 2
  cfg.checkpoint.async_save = False
  logs = []
  run_dir = os.path.join(workdir, "trainer")
  t0 = time.time()
  first = train_and_evaluate(cfg, run_dir, log=logs.append)
  if jax.process_index() == 0:
    print("RESULT " + json.dumps({
        "trainer_seconds": time.time() - t0, "processes": jax.process_count(), "devices": jax.device_count(), "local_devices": jax.local_device_count(),
        "losses": losses, "restored_equal": same, "loss_after_restore": float(m_restored["loss"]),
        "loss_continued": float(m_cont["loss"]), "trainer_step": first["step"],
        "bits_per_byte": first["bits_per_byte"], "eval_bytes": first["eval_bytes"],
        "mesh_line": [line for line in logs if line.startswith("mesh:")],
        "checkpoints": sorted(os.listdir(os.path.join(run_dir, "checkpoints")))}), flush=True)


if __name__ == "__main__":
  main()
