"""Running an experiment: every (variant, seed) through the normal trainer into WORKDIR/<variant>/seed<k>/.

    run_experiment(EXPERIMENT, "/tmp/exp", scale="cpu", seeds=3, only=None, overrides={})

Before anything trains, every run's config is built and validated, the workdir is checked to hold this
experiment at this scale (WORKDIR/experiment.json), and every run that already has a config.json is compared
with the config it would get now (moe_jax.training.workdir.config_changes): a difference is an error naming the
run and the fields. Finished runs (eval.json at the configured step) are skipped, interrupted ones resume from
their checkpoint, and a run that diverges is recorded (failed.json) and the sweep goes on. Runs share one BPE
tokenizer (WORKDIR/tokenizer.json: the training split does not depend on the seed) and one persistent XLA
compilation cache (WORKDIR/compile_cache: the seeds of a variant compile the same program).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from typing import Any, Callable, NamedTuple

import jax
import ml_collections

from experiments.framework import overrides as ov
from experiments.framework.spec import SCALES, Experiment
from moe_jax.data import load_or_train_tokenizer, validation_texts
from moe_jax.inference import cache_bytes_per_token, speculative_acceptance
from moe_jax.model.params import count_params
from moe_jax.restore import load_workdir
from moe_jax.training import TrainingDiverged, train_and_evaluate
from moe_jax.training.checkpoint import write_json
from moe_jax.training.config import validate_config
from moe_jax.training.metrics import format_eta
from moe_jax.training.workdir import config_changes

MANIFEST = "experiment.json"
EXTRA = "experiment_metrics.json"  # per run: metrics the runner adds after training (acceptance, cache, params)
FAILED = "failed.json"


class ExperimentError(ValueError):
  """Bad input to the runner or the report: an unknown name, a workdir of another experiment, a changed config."""


class Run(NamedTuple):
  variant: str
  seed: int
  config: ml_collections.ConfigDict
  workdir: str

  @property
  def name(self) -> str:
    return f"{self.variant}/seed{self.seed}"


def run_dir(workdir: str, variant: str, seed: int) -> str:
  return os.path.join(workdir, variant, f"seed{seed}")


def parse_only(only: str | None, variants: list[str], seeds: int) -> tuple[str | None, int | None]:
  if not only:
    return None, None
  variant, _, seed = only.partition("/")
  if variant not in variants:
    raise ExperimentError(f"--only={only!r}: no variant {variant!r}; the variants are {variants}")
  if not seed:
    return variant, None
  seed = seed.removeprefix("seed")
  if not seed.isdigit() or int(seed) >= seeds:
    raise ExperimentError(f"--only={only!r}: the seed must be one of 0..{seeds - 1} (--seeds={seeds})")
  return variant, int(seed)


def plan(exp: Experiment, workdir: str, scale: str, seeds: int, only: str | None,
         flags: dict[str, Any]) -> list[Run]:
  """Every run's config, validated; raises ExperimentError before anything is written."""
  if scale not in SCALES:
    raise ExperimentError(f"--scale={scale!r} is not one of {SCALES}")
  if seeds < 1:
    raise ExperimentError(f"--seeds={seeds} must be >= 1")
  try:
    base = exp.base(scale)
    variants = exp.variants(scale, base)
  except ValueError as e:
    raise ExperimentError(str(e)) from None
  want_variant, want_seed = parse_only(only, list(variants), seeds)
  workdir = os.path.abspath(workdir)
  runs = []
  for seed in range(seeds):  # seed-major: after the first pass every variant has one run to compare
    for variant, changes in variants.items():
      if want_variant not in (None, variant) or want_seed not in (None, seed):
        continue
      try:
        cfg = ov.apply(ov.apply(base, changes), flags)
        cfg.seed = seed
        if cfg.data.tokenizer == "bpe" and not cfg.data.tokenizer_path:
          cfg.data.tokenizer_path = os.path.join(workdir, "tokenizer.json")  # shared by every run
        validate_config(cfg)
      except ValueError as e:
        raise ExperimentError(f"{exp.name} {variant}/seed{seed}: {e}") from None
      runs.append(Run(variant, seed, cfg, run_dir(workdir, variant, seed)))
  return runs


def check_workdir(exp: Experiment, workdir: str, scale: str, runs: list[Run]) -> None:
  """The workdir holds this experiment at this scale (or nothing), and no run there has another config."""
  manifest = os.path.join(workdir, MANIFEST)
  if os.path.isfile(manifest):
    with open(manifest) as f:
      held = json.load(f)
    if held.get("experiment") != exp.name or held.get("scale") != scale:
      raise ExperimentError(f"{workdir} holds experiment {held.get('experiment')!r} at scale {held.get('scale')!r}, "
                            f"not {exp.name!r} at {scale!r}; use another --workdir")
  elif os.path.isdir(workdir) and os.listdir(workdir):
    raise ExperimentError(f"{workdir} is not empty and holds no {MANIFEST}: it is not an experiment workdir; use an "
                          "empty or new --workdir")
  problems = []
  for r in runs:
    path = os.path.join(r.workdir, "config.json")
    if os.path.isfile(path):
      with open(path) as f:
        binding, _ = config_changes(json.load(f), r.config.to_dict())
      if binding:
        fields = ", ".join(f"{k}: {old!r} (there) != {new!r}" for k, old, new in binding[:5])
        problems.append(f"  {r.name}: {fields}")
  if problems:
    raise ExperimentError(f"{len(problems)} run(s) in {workdir} were made with a different config than "
                          f"{exp.name} would give them now (different --config flags or a changed experiment):\n"
                          + "\n".join(problems) + "\nNothing was trained. Rerun with the flags those runs used, "
                          "or use a new --workdir")


def finished(run: Run) -> bool:
  path = os.path.join(run.workdir, "eval.json")
  if not os.path.isfile(path):
    return False
  with open(path) as f:
    return json.load(f).get("step") == run.config.train.num_steps


def extra_metrics(exp: Experiment, run: Run, log: Callable[[str], None]) -> dict:
  """What the trainer does not write: parameter counts, decode cache bytes, MTP acceptance on held-out prompts."""
  m = run.config.model
  counts = count_params(m)
  out = {"total_params": counts["total_params"], "active_params": counts["active_params"],
         "cache_bytes_per_token": cache_bytes_per_token(m) * m.num_hidden_layers}
  if exp.mtp_acceptance and m.num_nextn_predict_layers > 0:
    loaded = load_workdir(run.workdir)
    docs = [[loaded.tokenizer.bos_id] + loaded.tokenizer.encode(t).tolist() for t in validation_texts(run.config.data)]
    out |= speculative_acceptance(loaded.variables, loaded.config, docs)
    log(f"[{run.name}] MTP speculative acceptance {out['acceptance_rate']:.3f} "
        f"({out['accepted']}/{out['drafted']} drafts, {out['prompts']} held-out prompts)")
  return out


def _train_shared_tokenizer(data_cfg, workdir: str, log) -> None:
  """WORKDIR/tokenizer.json, trained in a private directory and moved into place in one rename: `--only` jobs
  on several hosts may train it at once (BPE training is deterministic, so they write the same file)."""
  data = ml_collections.ConfigDict(data_cfg.to_dict())
  data.tokenizer_path = None
  tmp = tempfile.mkdtemp(prefix=".tokenizer-", dir=workdir)
  try:
    load_or_train_tokenizer(data, tmp, log)
    os.replace(os.path.join(tmp, "tokenizer.json"), os.path.join(workdir, "tokenizer.json"))
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def _enable_compile_cache(workdir: str) -> None:
  if jax.config.jax_compilation_cache_dir:  # the user chose one
    return
  jax.config.update("jax_compilation_cache_dir", os.path.join(workdir, "compile_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def run_experiment(exp: Experiment, workdir: str, *, scale: str = "cpu", seeds: int | None = None,
                   only: str | None = None, flags: dict[str, Any] | None = None,
                   log: Callable[[str], None] = print) -> dict:
  """Trains every planned run that is not finished; returns {"done", "failed", "preempted", "total"}."""
  workdir = os.path.abspath(workdir)
  seeds = exp.seeds if seeds is None else seeds
  runs = plan(exp, workdir, scale, seeds, only, flags or {})
  check_workdir(exp, workdir, scale, runs)
  os.makedirs(workdir, exist_ok=True)
  write_json(os.path.join(workdir, MANIFEST), {"experiment": exp.name, "scale": scale, "title": exp.title})
  _enable_compile_cache(workdir)
  first = runs[0].config
  if first.data.tokenizer_path == os.path.join(workdir, "tokenizer.json") and not os.path.isfile(first.data.tokenizer_path):
    _train_shared_tokenizer(first.data, workdir, log)

  todo = [r for r in runs if not finished(r)]
  log(f"{exp.name} ({scale}): {len(runs)} run(s), {len(runs) - len(todo)} already finished, {len(todo)} to train "
      f"in {workdir}")
  failed, durations = [], []
  for i, r in enumerate(todo):
    t0 = time.time()
    prefix = f"[{r.name}] "
    log(f"{prefix}run {len(runs) - len(todo) + i + 1}/{len(runs)}")
    try:
      result = train_and_evaluate(r.config, r.workdir, log=lambda m, p=prefix: log(p + m if m else m))
    except TrainingDiverged as e:
      write_json(os.path.join(r.workdir, FAILED), {"error": str(e), "time": time.time()})
      log(f"{prefix}FAILED: {e}")
      failed.append(r.name)
      continue
    if "preempted" in result:
      log(f"{prefix}stopped by {result['signal']}; rerun the same command to resume the sweep")
      return {"done": len(runs) - len(todo) + i, "failed": failed, "preempted": r.name, "total": len(runs)}
    if os.path.exists(os.path.join(r.workdir, FAILED)):
      os.remove(os.path.join(r.workdir, FAILED))
    write_json(os.path.join(r.workdir, EXTRA), extra_metrics(exp, r, log))
    durations.append(time.time() - t0)
    left = len(todo) - i - 1
    eta = format_eta(left * sum(durations) / len(durations))
    log(f"{prefix}done in {format_eta(durations[-1])}: {result['bits_per_byte']:.4f} bits/byte, MaxVio_global "
        f"{result['max_vio_global'] or 0:.3f} | {len(runs) - left}/{len(runs)} runs done, ETA {eta}")
  for r in runs:  # a run finished by an earlier sweep that died before writing its extras
    if finished(r) and not os.path.isfile(os.path.join(r.workdir, EXTRA)):
      write_json(os.path.join(r.workdir, EXTRA), extra_metrics(exp, r, log))
  return {"done": len(runs) - len(failed), "failed": failed, "preempted": None, "total": len(runs)}
