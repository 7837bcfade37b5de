"""The training loop: `train_and_evaluate(config, workdir)`.

Re-running on the same workdir resumes from the newest checkpoint that verifies (train state + data position), and
metrics.jsonl is cut back to that step, so a killed-and-resumed run logs exactly the per-step losses of an
uninterrupted one. A workdir belongs to one run (moe_jax.training.workdir): one trainer at a time (a lock), and a
config that differs in what defines the run stops before anything is written. SIGTERM/SIGINT save a checkpoint at
the next step boundary and return (moe_jax.training.preemption). At the end the whole validation split is evaluated and WORKDIR/eval.json written, with the
gzip -9 / xz -9e bits per byte of the same held-out documents beside the model's.
"""

from __future__ import annotations

import copy
import json
import os
import time
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from moe_jax.data.packing import NoUsableDocuments
from moe_jax.data import BatchLoader, eval_rows, load_or_train_tokenizer, train_rows, validation_texts
from moe_jax.model import Transformer
from moe_jax.model.params import count_params
from moe_jax.training import schedules
from moe_jax.training.checkpoint import Checkpointer, abstract_like, write_json
from moe_jax.training.config import validate_config
from moe_jax.training.evaluate import compressor_bits_per_byte, evaluate, token_byte_lengths
from moe_jax.training.metrics import MetricWriter, format_eta, read_jsonl, training_summary, truncate_jsonl
from moe_jax.sharding import make_mesh, rules_of
from moe_jax.training.distributed import maybe_initialize
from moe_jax.training import esft as esft_lib
from moe_jax.training.finetune import (ESFT_METHODS, finetune_config, resolve_model_config, source_model_config,
                                       trainable_count, trainable_selection)
from moe_jax.training.init_from import check_source, copy_source_tokenizer, initial_state
from moe_jax.training.preemption import StopOnSignal
from moe_jax.training.workdir import WorkdirLock, archive_run, check_resume
from moe_jax.training.state import (batch_sharding, check_batch_split, create_train_state, global_batch, replace_optimizer,
                                    replicated_array)
from moe_jax.training.step import make_eval_step, make_train_step


def _general_eval(config, tokenizer, eval_step, state, local_batch, token_bytes, put, log) -> dict:
  """Held-out bits per byte on the data of the run config.init_from names (forgetting), and that run's own
  figure on the same split (its eval.json) as the before."""
  with open(os.path.join(config.init_from, "config.json")) as f:
    data_cfg = ml_collections.ConfigDict(json.load(f)["data"])
  rows, nbytes, _ = eval_rows(data_cfg, tokenizer, jax.process_index(), jax.process_count())
  log(f"general evaluation on the held-out split of {config.init_from} ({len(rows)} rows) ...")
  ev = evaluate(eval_step, state.params, state.router_bias, rows, local_batch, token_bytes, put=put)
  out = {"general_bits_per_byte": ev["bits_per_byte"], "general_eval_bytes": ev["eval_bytes"]}
  before = os.path.join(config.init_from, "eval.json")
  if os.path.isfile(before):
    with open(before) as f:
      out["general_bits_per_byte_before"] = json.load(f).get("bits_per_byte")
  log(f"general held-out bits per byte: {out['general_bits_per_byte']:.4f} (before fine-tuning: "
      f"{out.get('general_bits_per_byte_before') or float('nan'):.4f})")
  return out


class TrainingDiverged(RuntimeError):
  """The loss or gradient norm became non-finite; nothing past the last finite step was saved."""


def _log(msg: str) -> None:
  if jax.process_index() == 0:
    print(msg, flush=True)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, log: Callable[[str], None] = _log) -> dict:
  """Trains (or resumes) and evaluates; returns the final eval dict (also written to WORKDIR/eval.json).

  A SIGTERM or SIGINT stops the run after the current step with a checkpoint; the result is then
  {"preempted": step, "signal": name} and rerunning resumes. Raises ConfigMismatch (the workdir holds another
  run), WorkdirInUse (another trainer writes it), CheckpointsUnreadable, CheckpointWriteError, TrainingDiverged.
  """
  validate_config(config)
  if config.get("init_from"):
    config = _with_checkpoint_model(config, workdir)
  maybe_initialize(config.mesh)
  mesh, rules = make_mesh(config.mesh), rules_of(config.mesh)
  check_batch_split(config.data.batch_size, mesh, rules)
  os.makedirs(workdir, exist_ok=True)
  lock = WorkdirLock(workdir).acquire() if jax.process_index() == 0 else None
  try:
    if config.checkpoint.restore == "never":
      if jax.process_index() == 0:
        archive_run(workdir, log)
      if jax.process_count() > 1:
        multihost_utils.sync_global_devices("archive previous run")
    else:
      check_resume(config.to_dict(), workdir, log)  # before anything is written
    with StopOnSignal(log) as stop:
      return _train_and_evaluate(config, workdir, mesh, rules, stop, log)
  finally:
    if lock is not None:
      lock.release()


def _with_checkpoint_model(config: ml_collections.ConfigDict, workdir: str) -> ml_collections.ConfigDict:
  """A copy of `config` whose model config is the checkpoint's (moe_jax.training.finetune.resolve_model_config):
  on a fresh run read from config.init_from, on a resumed one from the run's own saved config."""
  saved = os.path.join(workdir, "config.json")
  if os.path.exists(saved):
    with open(saved) as f:
      source = ml_collections.ConfigDict(json.load(f)["model"])
  else:
    check_source(config.init_from)
    source = source_model_config(config.init_from)
  config = copy.deepcopy(config)
  config.model = resolve_model_config(config, source)
  validate_config(config)
  return config


def _train_and_evaluate(config, workdir, mesh, rules, stop, log) -> dict:
  t_start = time.time()

  # Data and tokenizer.
  if jax.process_index() == 0:
    copy_source_tokenizer(config, workdir, log)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("tokenizer copied")
  tokenizer = load_or_train_tokenizer(config.data, workdir, log)
  if tokenizer.vocab_size > config.model.vocab_size:
    raise ValueError(f"invalid config: the tokenizer has {tokenizer.vocab_size} ids > config.model.vocab_size="
                     f"{config.model.vocab_size}")
  pidx, pcount = jax.process_index(), jax.process_count()
  if config.data.batch_size % pcount:
    raise ValueError(f"invalid config: config.data.batch_size={config.data.batch_size} is not divisible by the "
                     f"{pcount} processes")
  loader = BatchLoader(train_rows(config.data, tokenizer, config.seed, pidx, pcount), config.data.batch_size,
                       config.data.seq_len)
  val_rows, val_bytes, val_counters = eval_rows(config.data, tokenizer, pidx, pcount)
  if not val_rows:
    raise NoUsableDocuments(f"none of the {val_counters.get('documents_read', 0)} held-out documents is usable "
                            f"(counters: {val_counters}); check config.data.source, paths and text_field")
  if pcount > 1:  # each process holds a share of the held-out documents; the evaluation sums over all of them
    val_bytes = int(np.sum(multihost_utils.process_allgather(np.asarray(val_bytes, np.int64))))
  baselines = compressor_bits_per_byte(validation_texts(config.data))
  token_bytes = replicated_array(token_byte_lengths(tokenizer), mesh)
  log(f"held-out: {val_counters.get('documents_read', 0)} documents, {val_bytes:,} bytes, {len(val_rows)} rows; "
      f"gzip -9 {baselines['gzip_bits_per_byte']:.3f} and xz -9e {baselines['xz_bits_per_byte']:.3f} bits/byte")

  # Model and state.
  model = Transformer(config.model)
  counts = count_params(config.model)
  log(f"model: {counts['total_params_with_mtp'] / 1e6:.2f}M parameters ({counts['active_params_with_mtp'] / 1e6:.2f}M "
      f"activated per token, MTP included); {config.model.n_routed_experts} routed experts, top-"
      f"{config.model.num_experts_per_tok}; compute {config.model.dtype}, on {mesh.devices.flat[0].platform}")
  log(f"mesh: {' x '.join(f'{a}={n}' for a, n in mesh.shape.items())} over {jax.device_count()} devices in "
      f"{pcount} process(es)")
  ft = finetune_config(config)
  esft = ft.method in ESFT_METHODS
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), config.checkpoint.every, config.checkpoint.keep,
                      config.checkpoint.async_save, quarantine=os.path.join(workdir, "quarantine"))
  experts = esft_lib.read_selection(workdir) if esft and ckpt.steps() else None  # a resumed ESFT run's selection
  select = lambda boxed: trainable_selection(boxed, config, config.model, experts)  # noqa: E731
  state, shardings, tx = create_train_state(model, config.train, mesh, rules, config.seed, select)
  restored, start = ckpt.restore_latest(abstract_like(state, shardings), loader, log)
  writer_path = os.path.join(workdir, "metrics.jsonl")
  eval_step = make_eval_step(model, mesh, rules, shardings)
  put = lambda b: global_batch(b, batch_sharding(mesh, rules))  # noqa: E731
  if restored is not None:
    state = restored
    log(f"resumed from step {start} ({int(state.tokens):,} tokens seen)")
  elif config.get("init_from"):
    state = initial_state(config.init_from, config.model, state, shardings, tx, log)
    if esft:  # measure the task's expert relevance with the loaded weights, then build the optimiser for it
      sample = BatchLoader(train_rows(config.data, tokenizer, config.seed, pidx, pcount), config.data.batch_size,
                           config.data.seq_len)
      batches = (put(sample.next_batch(config.data.batch_size // pcount)) for _ in range(ft.esft_sample_batches))
      gate_LE, load_LE = esft_lib.measure(eval_step, state.params, state.router_bias, batches, token_bytes)
      experts = esft_lib.choose(gate_LE, load_LE, ft.method, ft.esft_threshold, config.model.first_k_dense_replace,
                                workdir, log, write=jax.process_index() == 0)
      state, shardings, tx = replace_optimizer(state, model, config.train, mesh, rules, select)
  trained = trainable_count(state.params, select(state.params))
  opt_bytes = sum(x.nbytes for x in jax.tree.leaves(state.opt_state))
  total = sum(x.size for x in jax.tree.leaves(state.params))
  log(f"training {trained:,} of {total:,} parameters ({trained / total:.2%}; finetune.method={ft.method}); "
      f"optimiser state {opt_bytes / 2**20:,.2f} MiB")
  if jax.process_index() == 0:  # every check has passed: the workdir now holds this run
    write_json(os.path.join(workdir, "config.json"), config.to_dict())
    truncate_jsonl(writer_path, start)
  writer = MetricWriter(workdir, tensorboard=config.train.tensorboard and jax.process_index() == 0)

  run_end = schedules.run_end(config)
  train_step = make_train_step(model, config, tx, run_end, mesh, rules, shardings)
  local_batch = config.data.batch_size // pcount
  num_steps, T = config.train.num_steps, config.data.seq_len
  tokens_seen = int(state.tokens)
  window_t, window_tokens, window_start = time.time(), 0, start
  saved = start  # the newest step with a checkpoint
  pending = None  # (step, metrics) of the previous step: checked one step late so the host never stalls the device

  def check(step_done: int, metrics: dict) -> dict:
    host = jax.device_get({k: v for k, v in metrics.items() if k not in ("expert_load",)})
    if not bool(host["finite"]):
      ckpt.wait()
      last = ckpt.steps()
      raise TrainingDiverged(
          f"non-finite loss at step {step_done} (loss={float(host['loss'])}, grad_norm={float(host['grad_norm'])}); "
          f"stopped without saving it. Last checkpoint: {last[-1] if last else 'none'}")
    return host

  def report(step_done: int, metrics: dict) -> None:
    nonlocal window_t, window_tokens, window_start
    host = check(step_done, metrics)
    if step_done % config.train.log_every and step_done != num_steps:
      return
    now = time.time()
    tps = window_tokens / max(now - window_t, 1e-9)
    steps_left = num_steps - step_done
    sec_per_step = (now - window_t) / max(step_done - window_start, 1)
    row = {k: host[k] for k in ("loss", "ce", "mtp_loss", "balance_loss", "index_loss", "learning_rate", "grad_norm",
                                 "max_vio", "max_vio_per_layer", "mtp_weight", "bias_update_rate", "dropped_fraction")}
    load = np.asarray(jax.device_get(metrics["expert_load"]))
    row |= {"tokens_per_sec": tps, "tokens_seen": tokens_seen,
            "expert_load": (load / np.maximum(load.sum(-1, keepdims=True), 1)).round(5)}
    if jax.process_index() == 0:
      writer.write(step_done, row)
    if row["dropped_fraction"] > 0 and config.model.moe_dispatch == "dropless":
      log(f"WARNING: {row['dropped_fraction']:.2%} of token-copies overflowed the expert-parallel all-to-all "
          f"buffer at step {step_done}; raise config.model.ep_capacity_factor (<= 0 never overflows)")
    log(f"step {step_done:>6}/{num_steps} | loss {row['loss']:.4f} | ce {row['ce']:.4f} | mtp {row['mtp_loss']:.4f} | "
        f"max_vio {row['max_vio']:.3f} | lr {row['learning_rate']:.2e} | {tps:,.0f} tok/s | "
        f"eta {format_eta(steps_left * sec_per_step)}")
    window_t, window_tokens, window_start = now, 0, step_done

  for step in range(start, num_steps):
    rows = schedules.batch_rows(config, step, tokens_seen)
    batch = put(loader.next_batch(rows // pcount))
    state, metrics = train_step(state, batch)
    tokens_seen += rows * T
    window_tokens += rows * T
    if pending is not None:
      report(*pending)
    pending = (step + 1, metrics)
    if config.checkpoint.every and (step + 1) % config.checkpoint.every == 0 and step + 1 < num_steps:
      report(*pending)  # a checkpoint is only written after its step is known to be finite
      pending = None
      ckpt.save(step + 1, state, loader)
      saved = step + 1
    if stop.requested() and step + 1 < num_steps:
      if pending is not None:
        report(*pending)
      if saved != step + 1:
        ckpt.save(step + 1, state, loader, force=True)
      ckpt.close()
      writer.close()
      log(f"stopped by {stop.signal or 'a signal on another process'} after step {step + 1} with a checkpoint; "
          "rerun the same command to resume")
      return {"preempted": step + 1, "signal": stop.signal}
    if config.train.eval_every and (step + 1) % config.train.eval_every == 0 and step + 1 < num_steps:
      ev = evaluate(eval_step, state.params, state.router_bias, val_rows, local_batch, token_bytes,
                    config.train.eval_batches, put=put)
      if jax.process_index() == 0:
        writer.write(step + 1, ev)
      log(f"eval @ {step + 1}: loss {ev['eval_loss']:.4f} | {ev['bits_per_byte']:.3f} bits/byte "
          f"(first {config.train.eval_batches} batches) | global max_vio {ev.get('max_vio_global', 0):.3f}")
  if pending is not None:
    report(*pending)
  if start < num_steps:
    ckpt.save(num_steps, state, loader, force=True)
  ckpt.close()

  log(f"final evaluation on all {len(val_rows)} held-out rows ...")
  ev = evaluate(eval_step, state.params, state.router_bias, val_rows, local_batch, token_bytes, put=put)
  if ev["eval_bytes"] != val_bytes:
    raise AssertionError(f"bits-per-byte accounting: {ev['eval_bytes']} target bytes != {val_bytes} document bytes")
  result = {"step": int(state.step), "bits_per_byte": ev["bits_per_byte"],
            "gzip_bits_per_byte": baselines["gzip_bits_per_byte"], "xz_bits_per_byte": baselines["xz_bits_per_byte"],
            "eval_loss": ev["eval_loss"], "eval_perplexity": ev["eval_perplexity"], "eval_tokens": ev["eval_tokens"],
            "eval_bytes": ev["eval_bytes"], "max_vio_global": ev.get("max_vio_global"),
            "max_vio_global_per_layer": ev.get("max_vio_global_per_layer"), "tokens_seen": tokens_seen,
            **training_summary(read_jsonl(writer_path)),
            "data": loader.counters(), "trainable_params": trained, "total_params": total,
            "optimizer_state_bytes": opt_bytes, "finetune_method": ft.method,
            "wall_seconds_this_run": time.time() - t_start}
  if ft.general_eval:
    result.update(_general_eval(config, tokenizer, eval_step, state, local_batch, token_bytes, put, log))
  if jax.process_index() == 0:
    writer.write(int(state.step), ev, prefix="final_")
    write_json(os.path.join(workdir, "eval.json"), result)
  writer.close()
  log("")
  log(f"held-out bits per byte after {result['step']} steps ({ev['eval_bytes']:,} bytes):")
  log(f"  moe_jax  {result['bits_per_byte']:.3f}")
  log(f"  gzip -9  {result['gzip_bits_per_byte']:.3f}")
  log(f"  xz -9e   {result['xz_bits_per_byte']:.3f}")
  log(f"wrote {os.path.join(workdir, 'eval.json')}")
  return result
