"""The experiment runner and report (experiments/): a smoke sweep through real subprocesses, the statistics
against hand computations, every experiment's configs validated, and bad input stopped with a clear error before
anything trains."""

import csv
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A few steps of a small model on a small synthetic corpus (byte tokenizer): compile time dominates.
SMOKE = ["--seeds=1", "--config.data.source=text", "--config.data.tokenizer=byte", "--config.model.vocab_size=257",
         "--config.data.seq_len=32", "--config.data.batch_size=4", "--config.train.num_steps=4",
         "--config.train.warmup_steps=1", "--config.train.lr_decay_start=1", "--config.train.log_every=1",
         "--config.checkpoint.every=2"]


def _cli(module, *args, check=True):
  env = dict(os.environ, PYTHONPATH=ROOT)
  p = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                     timeout=600)
  if check and p.returncode:
    raise AssertionError(f"{module} {args} exited {p.returncode}:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
  return p


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
  """The mtp experiment's depth0 and depth1 (one seed each, two --only jobs as a cluster would run them), then
  the report."""
  base = tmp_path_factory.mktemp("exp")
  rng = np.random.default_rng(0)
  words = ["alpha", "beta", "gamma", "delta", "expert", "router", "token", "layer", "def", "return", "(", ")", ":"]
  corpus = base / "corpus"
  corpus.mkdir()
  for i in range(60):
    (corpus / f"doc{i}.txt").write_text(" ".join(rng.choice(words, 300)))
  workdir = str(base / "mtp")
  data = f"--config.data.paths=('{corpus}/*.txt',)"
  out = [_cli("experiments.run", "mtp", f"--workdir={workdir}", f"--only={v}", *SMOKE, data).stdout
         for v in ("depth0", "depth1/seed0")]
  report = _cli("experiments.report", "mtp", f"--workdir={workdir}").stdout
  return {"workdir": workdir, "data": data, "run_out": out, "report_out": report, "base": base}


def test_smoke_sweep_writes_results_summary_and_plots(smoke):
  w = smoke["workdir"]
  with open(os.path.join(w, "results.csv")) as f:
    rows = list(csv.DictReader(f))
  assert [(r["variant"], r["seed"], r["status"]) for r in rows] == [("depth0", "0", "done"), ("depth1", "0", "done")]
  for r in rows:
    for col in ("bits_per_byte", "eval_loss", "max_vio_global", "max_vio_batch", "tokens_per_sec"):
      assert math.isfinite(float(r[col])), (col, r[col])
  assert rows[0]["acceptance_rate"] == "" and 0.0 <= float(rows[1]["acceptance_rate"]) <= 1.0
  summary = open(os.path.join(w, "summary.md")).read()
  assert "| depth0 | 1 |" in summary and "The papers' claims" in summary and "depth1 − depth0" in summary
  for png in ("bits_per_byte.png", "acceptance_rate.png", "curve_ce.png", "curve_mtp_loss.png"):
    with open(os.path.join(w, png), "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n", png
  # MaxVio_batch in eval.json is the mean of the per-step max_vio the trainer logged (computed here from the file)
  run = os.path.join(w, "depth1", "seed0")
  logged = [json.loads(ln) for ln in open(os.path.join(run, "metrics.jsonl"))]
  vio = [r["max_vio"] for r in logged if "loss" in r]
  assert len(vio) == 4
  assert json.load(open(os.path.join(run, "eval.json")))["max_vio_batch"] == pytest.approx(np.mean(vio))
  assert "2/3 runs done" not in smoke["run_out"][0]  # --only=depth0 plans one run
  assert "1/1 runs done" in smoke["run_out"][1]


def test_rerun_skips_finished_runs(smoke):
  p = _cli("experiments.run", "mtp", f"--workdir={smoke['workdir']}", "--only=depth0", *SMOKE, smoke["data"])
  assert "1 already finished, 0 to train" in p.stdout


def test_sigterm_stops_the_sweep_with_a_checkpoint_and_a_rerun_finishes_it(smoke):
  """A real SIGTERM mid-run: exit 0 after a checkpoint; the same command then finishes that run and the next,
  and the interrupted run's metrics.jsonl holds every logged step exactly once."""
  import signal
  import time
  workdir = str(smoke["base"] / "sigterm")
  args = ["mtp", f"--workdir={workdir}", "--only=depth0", *SMOKE, smoke["data"], "--seeds=2",
          "--config.train.num_steps=40", "--config.checkpoint.every=5"]
  env = dict(os.environ, PYTHONPATH=ROOT)
  proc = subprocess.Popen([sys.executable, "-m", "experiments.run", *args], cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  metrics = os.path.join(workdir, "depth0", "seed0", "metrics.jsonl")
  deadline = time.time() + 300
  while time.time() < deadline and not (os.path.exists(metrics) and sum(1 for _ in open(metrics)) >= 8):
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0 and "stopped by SIGTERM" in out, out[-2000:]
  assert not os.path.exists(os.path.join(workdir, "depth0", "seed0", "eval.json"))
  out = _cli("experiments.run", *args).stdout
  assert "0 already finished, 2 to train" in out and "all 2 run(s) finished" in out
  steps = [json.loads(ln)["step"] for ln in open(metrics) if "loss" in json.loads(ln)]
  assert steps == list(range(1, 41))


def test_bad_input_is_one_error_before_training(smoke, tmp_path):
  w = smoke["workdir"]
  mtime = os.path.getmtime(os.path.join(w, "depth0", "seed0", "config.json"))
  cases = [
      (["nosuch", f"--workdir={tmp_path / 'a'}"], "unknown experiment 'nosuch'"),
      (["mtp", f"--workdir={tmp_path / 'b'}", "--only=depth9"], "no variant 'depth9'"),
      (["mtp", f"--workdir={tmp_path / 'c'}", "--only=depth1/seed7"], "seed must be one of 0..2"),
      (["mtp", f"--workdir={tmp_path / 'd'}", "--config.train.num_stepz=3"], "did you mean config.train.num_steps"),
      (["mtp", f"--workdir={tmp_path / 'e'}", "--config.train.num_steps=many"], "expected a int"),
      (["balancing", f"--workdir={w}", *SMOKE, smoke["data"]], "holds experiment 'mtp'"),
      (["mtp", f"--workdir={w}", "--only=depth0", *SMOKE, smoke["data"], "--config.train.learning_rate=0.01"],
       "depth0/seed0: train.learning_rate"),
      (["mtp", f"--workdir={os.path.join(w, 'depth0', 'seed0')}"], "not an experiment workdir"),
  ]
  for args, message in cases:
    p = _cli("experiments.run", *args, check=False)
    assert p.returncode == 1 and message in p.stderr, (args, p.stdout[-2000:], p.stderr[-2000:])
    assert "Traceback" not in p.stderr
  assert os.path.getmtime(os.path.join(w, "depth0", "seed0", "config.json")) == mtime  # nothing was written
  p = _cli("experiments.report", "balancing", f"--workdir={w}", check=False)
  assert p.returncode == 1 and "holds experiment 'mtp', not 'balancing'" in p.stderr


def test_list_prints_every_experiment_and_variant():
  out = _cli("experiments.run", "--list").stdout
  for name in ("balancing", "bias_update", "mtp", "moe_architecture", "attention", "balance_loss_scope", "esft"):
    assert f"{name}:" in out
  assert "loss_free_seq_aux" in out and "model.aux_loss_alpha=0.0001" in out


@pytest.mark.parametrize("name", ["balancing", "bias_update", "mtp", "moe_architecture", "attention", "balance_loss_scope"])
def test_every_cpu_run_config_is_valid(name, tmp_path):
  from experiments.framework import registry
  from experiments.framework.sweep import plan
  exp = registry.get(name)
  exp.check("cpu")
  runs = plan(exp, str(tmp_path), "cpu", exp.seeds, None, {})
  assert len(runs) == exp.seeds * len(exp.variant_overrides("cpu")) and exp.seeds >= 3
  assert sorted({r.config.seed for r in runs}) == list(range(exp.seeds))
  paper = plan(exp, str(tmp_path), "paper", 1, None, {"data.paths": ("/data/train-*.jsonl",)})  # --scale=paper
  assert len(paper) == len(exp.variant_overrides("paper")) and paper[0].config.data.seq_len == 2048


def test_esft_experiment_runs_are_valid_fine_tuning_configs(tmp_path):
  """The ESFT sweep: 4 methods x 3 seeds from the base workdir, forgetting measured; CPU scale only."""
  from experiments.framework import registry
  from experiments.framework.sweep import ExperimentError, plan
  exp = registry.get("esft")
  exp.check("cpu")
  runs = plan(exp, str(tmp_path), "cpu", exp.seeds, None, {})
  assert sorted({r.config.finetune.method for r in runs}) == ["esft_gate", "esft_token", "full", "lora"]
  assert len(runs) == 12 and all(r.config.finetune.general_eval and r.config.init_from for r in runs)
  with pytest.raises(ExperimentError, match="cpu only"):
    plan(exp, str(tmp_path), "paper", 1, None, {})


def test_moe_architecture_variants_activate_equal_width():
  from experiments.framework import registry
  from experiments.framework.sweep import plan
  widths = {}
  for r in plan(registry.get("moe_architecture"), "/tmp/unused", "cpu", 1, None, {}):
    m = r.config.model
    if m.first_k_dense_replace == m.num_hidden_layers:
      widths[r.variant] = m.intermediate_size
    else:
      widths[r.variant] = (m.num_experts_per_tok + m.n_shared_experts) * m.moe_intermediate_size
  assert len(set(widths.values())) == 1, widths


def _rows(values: dict) -> list[dict]:
  return [{"variant": v, "seed": s, "status": "done", "bits_per_byte": x} for v, xs in values.items()
          for s, x in enumerate(xs)]


def test_claim_statistics_match_hand_computation():
  from experiments.framework.results import judge
  from experiments.framework.spec import Claim
  a, b = [1.50, 1.52, 1.47], [1.55, 1.53, 1.56]
  c = Claim("a beats b", "bits_per_byte", "a", "b", "lower", "paper")
  j = judge(c, _rows({"a": a, "b": b}))
  d = [x - y for x, y in zip(a, b)]  # paired by seed
  assert j["paired"] and j["n"] == 3
  assert j["diff"] == pytest.approx(sum(d) / 3)
  assert j["se"] == pytest.approx(np.std(d, ddof=1) / math.sqrt(3))
  assert j["matches"] is True and j["beyond_2se"] == (abs(j["diff"]) > 2 * j["se"])
  # Unequal seeds: Welch's standard error of the difference of means.
  rows = _rows({"a": a, "b": b[:2]})
  j = judge(c, rows)
  se = math.sqrt(np.var(a, ddof=1) / 3 + np.var(b[:2], ddof=1) / 2)
  assert not j["paired"] and j["se"] == pytest.approx(se) and j["diff"] == pytest.approx(np.mean(a) - np.mean(b[:2]))
  assert judge(Claim("x", "bits_per_byte", "b", "a", "lower", "p"), _rows({"a": a, "b": b}))["matches"] is False
  band = judge(Claim("in band", "bits_per_byte", "a", None, "within", "p", band=(1.45, 1.55)), _rows({"a": a}))
  assert band["matches"] is True and band["diff"] == pytest.approx(np.mean(a))


def test_overrides_keep_field_types():
  from experiments.framework import overrides as ov
  from experiments.framework.presets import cpu_base
  base = cpu_base()
  flags = ov.parse_flags(base, ["--config.train.num_steps=7", "--config.model.seq_aux", "false",
                                "--config.train.learning_rate=1e-3", "--config.data.paths=('a', 'b')"])
  assert flags == {"train.num_steps": 7, "model.seq_aux": False, "train.learning_rate": 1e-3, "data.paths": ("a", "b")}
  cfg = ov.apply(base, flags)
  assert cfg.train.num_steps == 7 and base.train.num_steps == 300  # a copy
  with pytest.raises(ValueError, match="unexpected argument"):
    ov.parse_flags(base, ["--workdirr=x"])


def test_experiments_notebook_shows_a_workdir(smoke, monkeypatch):
  nbclient = pytest.importorskip("nbclient")
  import nbformat
  path = os.path.join(ROOT, "notebooks", "experiments.ipynb")
  nb = nbformat.read(path, as_version=4)
  monkeypatch.setenv("MOE_JAX_EXPERIMENT_WORKDIR", smoke["workdir"])
  nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                          resources={"metadata": {"path": os.path.dirname(path)}}).execute()
  text = "".join(str(o.get("text", "")) + str(o.get("data", {}).get("text/markdown", ""))
                 for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
  images = sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
  assert "mtp: multi-token prediction" in text and "| depth1 | 0 | done |" in text and "The papers' claims" in text
  assert images >= 4


def test_shared_tokenizer_is_moved_into_place_whole(tmp_path):
  from experiments.framework.presets import cpu_base
  from experiments.framework.sweep import _train_shared_tokenizer
  from moe_jax.data import BPETokenizer
  corpus = tmp_path / "corpus"
  corpus.mkdir()
  rng = np.random.default_rng(0)
  for i in range(30):
    (corpus / f"d{i}.txt").write_text(" ".join(rng.choice(["expert", "router", "token", "def", "x"], 200)))
  data = cpu_base().data
  data.source, data.paths, data.bpe_vocab_size = "text", (f"{corpus}/*.txt",), 300
  data.tokenizer_path = str(tmp_path / "tokenizer.json")  # as the runner plans it
  _train_shared_tokenizer(data, str(tmp_path), lambda m: None)
  assert 257 < BPETokenizer.load(str(tmp_path / "tokenizer.json")).vocab_size <= 300  # few merges in 5 words
  assert sorted(os.listdir(tmp_path)) == ["corpus", "tokenizer.json"]  # no temporary directory left
