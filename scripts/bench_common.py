"""What the train-step benchmarks share (bench_train_step.py, bench_peer.py, bench_mfu.py); no flags here, so
each script can import it beside its own."""

from __future__ import annotations

import json
import statistics
import sys
import time

import jax
import numpy as np

from moe_jax.host_memory import keep_host_memory
from moe_jax.model import Transformer
from moe_jax.sharding import make_mesh, rules_of
from moe_jax.training.state import create_train_state
from moe_jax.training.step import make_train_step

keep_host_memory()  # every benchmark importing this measures with the entry points' allocator settings


def train_step_on_random_rows(config, tokens=None):
  """(the jitted train step, its initial state, a batch of full rows: `tokens`, or random ids of the config's
  batch and length)."""
  model, mesh, rules = Transformer(config.model), make_mesh(config.mesh), rules_of(config.mesh)
  state, shardings, tx = create_train_state(model, config.train, mesh, rules, 0)
  step = make_train_step(model, config, tx, config.train.num_steps, mesh, rules, shardings)
  if tokens is None:
    shape = (config.data.batch_size, config.data.seq_len)
    tokens = np.random.default_rng(0).integers(0, config.model.vocab_size, shape).astype(np.int32)
  B, T = tokens.shape
  batch = {"tokens": tokens, "segment_ids": np.ones((B, T), np.int32),
           "positions": np.tile(np.arange(T, dtype=np.int32), (B, 1))}
  return step, state, batch


def time_steps(step, state, batch, steps: int, warmup: int = 0):
  """(state after, seconds of the first (compiling) call, seconds per step over `steps` timed steps after
  `warmup` more untimed ones)."""
  t0 = time.perf_counter()
  state, m = step(state, batch)
  jax.block_until_ready(m)
  compile_s = time.perf_counter() - t0
  for _ in range(warmup):
    state, m = step(state, batch)
  jax.block_until_ready(m)
  t0 = time.perf_counter()
  for _ in range(steps):
    state, m = step(state, batch)
  jax.block_until_ready(m)
  return state, compile_s, (time.perf_counter() - t0) / steps


def median_seconds(fn, *args, repeats: int) -> float:
  """Median wall time of `fn(*args)` over `repeats` calls after one compiling, warming call."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def emit(row: dict, as_json: bool) -> None:
  """One measurement: a JSON line, or key=value pairs (floats to 4 significant digits)."""
  if as_json:
    print(json.dumps(row))
  else:
    print("  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
  sys.stdout.flush()
