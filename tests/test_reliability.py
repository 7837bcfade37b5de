"""A run's history is never lost and bad input fails loudly (docs/reliability.md): each scenario reproduced as a
user meets it -- a changed config, damaged checkpoints, SIGTERM, a second trainer, a full disk (a real tmpfs),
unusable data, a huge document, broken safetensors files and config.json files."""

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import tracemalloc

import numpy as np
import pytest

from configs import debug
from moe_jax.data import ByteTokenizer, build_source, train_rows
from moe_jax.data.packing import NoUsableDocuments
from moe_jax.training import train_and_evaluate
from moe_jax.training.checkpoint import CheckpointsUnreadable
from moe_jax.training.workdir import ConfigMismatch, WorkdirInUse

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), JAX_PLATFORMS="cpu")
QUIET = lambda _: None  # noqa: E731


def _corpus(root):
  from moe_jax.data import embedded_corpus_files
  d = root / "corpus"
  d.mkdir(exist_ok=True)
  for i, (_, path) in enumerate([f for f in embedded_corpus_files() if 2000 < os.path.getsize(f[1]) < 6000][:30]):
    shutil.copy(path, d / f"f{i:03d}.txt")
  return str(d) + "/*.txt"


def _config(root, **train):
  c = debug.get_config()
  c.data.source, c.data.paths, c.data.validation_fraction = "text", (_corpus(root),), 0.15
  c.data.batch_size, c.data.seq_len = 4, 32
  c.train.tensorboard, c.train.log_every, c.train.num_steps = False, 1, 4
  c.checkpoint.every, c.checkpoint.keep = 2, 3
  for k, v in train.items():
    c.train[k] = v
  return c


def _cli_overrides(root, steps, every=100):
  return ["--config.data.source=text", f"--config.data.paths=('{_corpus(root)}',)",
          "--config.data.validation_fraction=0.15", "--config.data.batch_size=4", "--config.data.seq_len=32",
          f"--config.train.num_steps={steps}", "--config.train.log_every=1", "--config.train.tensorboard=False",
          f"--config.checkpoint.every={every}"]


def _train_cmd(work, overrides):
  return [sys.executable, "-m", "moe_jax.train", "--config=configs/debug.py", f"--workdir={work}"] + overrides


def _losses(work):
  path = os.path.join(work, "metrics.jsonl")
  if not os.path.exists(path):
    return {}
  rows = [json.loads(line) for line in open(path) if line.strip().endswith("}")]
  return {r["step"]: r["loss"] for r in rows if "loss" in r}


def _snapshot(work):
  """Every file of a workdir (but its lock) with its bytes: 'nothing was written' is checked against this."""
  out = {}
  for root, _, files in os.walk(work):
    for f in files:
      if f != ".lock":
        p = os.path.join(root, f)
        out[os.path.relpath(p, work)] = open(p, "rb").read()
  return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A 4-step run with checkpoints at 2 and 4; tests work on copies."""
  root = tmp_path_factory.mktemp("trained")
  train_and_evaluate(_config(root), str(root / "work"), log=QUIET)
  return root


def _copy(trained, tmp_path):
  shutil.copytree(trained / "work", tmp_path / "work")
  return str(tmp_path / "work")


def _damage(work, step, how):
  """how='truncate': every file of the step's state emptied; 'bytes': 64 random bytes written into the middle of
  its largest data file (which Orbax and tensorstore do not notice)."""
  files = [os.path.join(r, f) for r, _, fs in os.walk(os.path.join(work, "checkpoints", str(step), "state")) for f in fs]
  if how == "truncate":
    for f in files:
      open(f, "wb").close()
    return
  big = max(files, key=os.path.getsize)
  with open(big, "r+b") as f:
    f.seek(os.path.getsize(big) // 2)
    f.write(np.random.default_rng(step).integers(0, 256, 64, dtype=np.uint8).tobytes())


# -- 1. a workdir belongs to one run --------------------------------------------------------------------------------

def test_a_changed_model_stops_before_writing_and_harmless_changes_resume(trained, tmp_path):
  work = _copy(trained, tmp_path)
  before = _snapshot(work)
  c = _config(trained, num_steps=8)
  c.model.hidden_size = 32
  c.data.seq_len = 64
  with pytest.raises(ConfigMismatch) as e:
    train_and_evaluate(c, work, log=QUIET)
  assert "model.hidden_size: 64 (saved) != 32" in str(e.value) and "data.seq_len: 32 (saved) != 64" in str(e.value)
  assert _snapshot(work) == before  # config.json, metrics, checkpoints untouched
  logs = []
  result = train_and_evaluate(_config(trained, num_steps=6, log_every=2), work, log=logs.append)
  assert any("train.num_steps changed: 4 -> 6" in line for line in logs), logs
  assert any("resumed from step 4" in line for line in logs)
  assert result["step"] == 6 and json.load(open(os.path.join(work, "config.json")))["train"]["num_steps"] == 6


# -- 2. never restart from scratch silently; restore=never archives ------------------------------------------------

def test_no_restorable_checkpoint_is_an_error_and_restore_never_keeps_the_old_run(trained, tmp_path):
  work = _copy(trained, tmp_path)
  for step in (2, 4):
    _damage(work, step, "truncate")
  before = _snapshot(work)
  with pytest.raises(CheckpointsUnreadable) as e:
    train_and_evaluate(_config(trained), work, log=QUIET)
  assert "step 4:" in str(e.value) and "step 2:" in str(e.value) and "restore=never" in str(e.value)
  assert _snapshot(work) == before
  c = _config(trained)
  c.checkpoint.restore = "never"
  train_and_evaluate(c, work, log=QUIET)
  (previous,) = os.listdir(os.path.join(work, "previous"))
  kept = _snapshot(os.path.join(work, "previous", previous))
  assert kept == {k: v for k, v in before.items() if k.split(os.sep)[0] in ("checkpoints", "metrics.jsonl",
                                                                             "eval.json", "config.json")}
  assert sorted(_losses(work)) == [1, 2, 3, 4]


# -- 3 + 4. damaged bytes are detected by the fingerprint; the step is quarantined, not blocking -------------------

def test_random_bytes_in_a_checkpoint_are_caught_and_the_step_quarantined(trained, tmp_path):
  work = _copy(trained, tmp_path)
  _damage(work, 4, "bytes")
  logs = []
  result = train_and_evaluate(_config(trained), work, log=logs.append)
  assert any("differ from the fingerprint" in line for line in logs), logs
  assert any("resumed from step 2" in line for line in logs)
  (moved,) = os.listdir(os.path.join(work, "quarantine"))
  assert moved.startswith("4-") and "fingerprint" in open(os.path.join(work, "quarantine", moved, "REASON")).read()
  steps = sorted(int(n) for n in os.listdir(os.path.join(work, "checkpoints")) if n.isdigit())
  assert result["step"] == 4 and steps == [2, 4]  # step 4 trained and saved again (no StepAlreadyExistsError)
  assert _losses(work) == _losses(str(trained / "work"))  # steps 3, 4 retrained from step 2: the same losses


def test_generate_falls_back_to_a_readable_checkpoint_and_reports_in_a_few_lines(trained, tmp_path):
  from moe_jax import restore
  work = _copy(trained, tmp_path)
  _damage(work, 4, "truncate")
  logs = []
  assert restore.load_model(work, log=logs.append).description.endswith("@ step 2")
  assert any("checkpoints/4 is unreadable" in line for line in logs)
  _damage(work, 2, "truncate")
  out = subprocess.run([sys.executable, "-m", "moe_jax.generate", f"--checkpoint={work}", "--prompt_ids=1,2"],
                       cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
  assert out.returncode == 1 and "no checkpoint under" in out.stderr and "step 2:" in out.stderr
  assert len(out.stderr.strip().splitlines()) <= 6, out.stderr


# -- 5 + 6. SIGTERM saves and exits 0; one writer per workdir --------------------------------------------------------

def test_sigterm_saves_exits_zero_and_resumes_identically_and_a_second_trainer_is_refused(trained, tmp_path):
  ref, run = str(tmp_path / "ref"), str(tmp_path / "run")
  overrides = _cli_overrides(trained, steps=24)
  subprocess.run(_train_cmd(ref, overrides), cwd=REPO, env=ENV, check=True, capture_output=True, timeout=600)
  proc = subprocess.Popen(_train_cmd(run, overrides), cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  deadline = time.time() + 300
  while time.time() < deadline and max(_losses(run), default=0) < 3:
    time.sleep(0.05)
  with pytest.raises(WorkdirInUse, match=f'"pid": {proc.pid}'):
    train_and_evaluate(_config(trained, num_steps=24), run, log=QUIET)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0, out[-3000:]
  stopped = max(_losses(run))
  assert stopped < 24 and f"preempted by SIGTERM at step {stopped}" in out
  assert str(stopped) in os.listdir(os.path.join(run, "checkpoints"))  # saved although checkpoint.every=100
  subprocess.run(_train_cmd(run, overrides), cwd=REPO, env=ENV, check=True, capture_output=True, timeout=600)
  a, b = _losses(ref), _losses(run)
  assert sorted(b) == list(range(1, 25)) and a == b  # bit-identical per-step losses


def test_the_first_ctrl_c_requests_a_stop_and_the_second_interrupts():
  import threading
  from moe_jax.training.preemption import StopOnSignal
  if threading.current_thread() is not threading.main_thread():
    pytest.skip("signal handlers can only be installed from the main thread")
  logs, before = [], signal.getsignal(signal.SIGINT)
  with StopOnSignal(logs.append) as stop:
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.05)  # the handler runs at the next bytecode boundary
    assert stop.requested() and stop.signal == "SIGINT" and "Ctrl-C again" in logs[0]
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGINT)
      time.sleep(1)
  assert signal.getsignal(signal.SIGINT) is before  # restored on exit


def test_a_dead_holders_lock_is_stale_and_taken_over(tmp_path):
  from moe_jax.training.workdir import WorkdirLock
  holder = subprocess.Popen([sys.executable, "-c", "import sys, time; sys.path.insert(0, sys.argv[1]);"
                             "from moe_jax.training.workdir import WorkdirLock; WorkdirLock(sys.argv[2]).acquire();"
                             "print('held', flush=True); time.sleep(600)", REPO, str(tmp_path)],
                            stdout=subprocess.PIPE, text=True, env=ENV)
  assert holder.stdout.readline().strip() == "held"
  with pytest.raises(WorkdirInUse, match=f'"pid": {holder.pid}'):
    WorkdirLock(str(tmp_path)).acquire()
  holder.kill()
  holder.wait()
  lock = WorkdirLock(str(tmp_path)).acquire()  # the kernel released the dead holder's flock
  assert f'"pid": {holder.pid}' in lock.stale
  lock.release()


# -- 7. a full disk: one line, earlier checkpoints intact ----------------------------------------------------------

def test_disk_full_while_saving_is_one_clear_line_and_earlier_checkpoints_restore(trained, tmp_path):
  if shutil.which("unshare") is None or subprocess.run(["unshare", "-rm", "true"]).returncode != 0:
    pytest.skip("needs unshare -rm to mount a private tmpfs")
  mnt = tmp_path / "mnt"
  mnt.mkdir()
  overrides = " ".join(f'"{o}"' for o in _cli_overrides(trained, steps=12, every=1) + ["--config.checkpoint.keep=20"])
  script = (f"mount -t tmpfs -o size=5m tmpfs {mnt} && cd {REPO} && "
            f"{sys.executable} -m moe_jax.train --config=configs/debug.py --workdir={mnt}/w {overrides} "
            f"> {tmp_path}/out.txt 2> {tmp_path}/err.txt; echo $? > {tmp_path}/rc.txt; "
            f"{sys.executable} -c 'from moe_jax import restore; print(restore.load_model(\"{mnt}/w\").description)' "
            f"> {tmp_path}/load.txt 2>&1; ls {mnt}/w/checkpoints > {tmp_path}/ls.txt")
  subprocess.run(["unshare", "-rm", "sh", "-c", script], env=ENV, timeout=600, check=True)
  err = (tmp_path / "err.txt").read_text()
  assert (tmp_path / "rc.txt").read_text().strip() == "6", err[-3000:]
  assert len(err.strip().splitlines()) == 1 and "No space left on device" in err and "are intact" in err, err[-3000:]
  assert "@ step" in (tmp_path / "load.txt").read_text(), (tmp_path / "load.txt").read_text()
  assert "tmp" not in (tmp_path / "ls.txt").read_text()  # the partial write was removed


# -- 8 + 9. data that cannot be used, one file, a huge document ----------------------------------------------------

def test_a_corpus_with_no_usable_document_raises_instead_of_spinning(tmp_path):
  path = tmp_path / "docs.jsonl"
  path.write_text("".join(json.dumps({"body": f"document {i}"}) + "\n" for i in range(40)))
  c = debug.get_config()
  c.data.source, c.data.paths, c.data.validation_fraction = "jsonl", (str(path),), 0.1
  it = train_rows(c.data, ByteTokenizer(), 0)
  with pytest.raises(NoUsableDocuments, match="skipped_missing_field"):
    next(it)
  out = subprocess.run(_train_cmd(tmp_path / "w", ["--config.data.source=jsonl", f"--config.data.paths=('{path}',)"]),
                       cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
  assert out.returncode == 7 and "is usable" in out.stderr and "Traceback" not in out.stderr, out.stderr[-2000:]


def test_a_one_file_corpus_is_split_into_pieces_that_cover_it_exactly(tmp_path):
  text = "".join(f"line {i}: {'x' * (i % 50)}\n" for i in range(3000)).encode()
  (tmp_path / "input.txt").write_bytes(text)
  c = debug.get_config()
  c.data.source, c.data.paths = "text", (str(tmp_path / "input.txt"),)
  train, val = build_source(c.data, "train"), build_source(c.data, "validation")
  assert len(train) > 20 and len(val) >= 1  # 105 KB in 4 KiB pieces
  pieces = {d["key"]: d["text"] for src in (train, val) for d in (src[i] for i in range(len(src)))}
  ordered = sorted(pieces, key=lambda k: int(k.split("#")[1]))
  assert b"".join(pieces[k] for k in ordered) == text  # nothing lost, nothing twice
  assert all(pieces[k].endswith(b"\n") for k in ordered)  # cut at line ends


def test_memory_follows_the_piece_not_a_huge_single_line_document(tmp_path, monkeypatch):
  monkeypatch.setattr("moe_jax.data.pipeline.READ_AHEAD_BYTES", 16 << 20)
  rng = np.random.default_rng(0)
  (tmp_path / "huge.txt").write_bytes(rng.integers(97, 123, 24 << 20, dtype=np.uint8).tobytes())  # 24 MB, no newline
  shutil.copy(os.path.join(REPO, "README.md"), tmp_path / "readme.txt")
  c = debug.get_config()
  c.data.source, c.data.paths, c.data.validation_fraction = "text", (str(tmp_path / "*.txt"),), 0.2
  c.data.max_document_bytes = 256 << 10
  it = train_rows(c.data, ByteTokenizer(), 0)
  tracemalloc.start()
  for _ in range(200):
    next(it)
  peak = tracemalloc.get_traced_memory()[1]
  tracemalloc.stop()
  assert peak < 48 << 20, f"{peak / 2**20:.0f} MiB for a 24 MB document"  # whole: 24 MB text + 96 MB of ids


# -- 10 + 11. published-format files -------------------------------------------------------------------------------

def _rewrite_header(path, edit):
  raw = open(path, "rb").read()
  n = struct.unpack("<Q", raw[:8])[0]
  header = json.loads(raw[8:8 + n])
  data = raw[8 + n:]
  header = edit(header) or header
  blob = json.dumps(header).encode()
  blob += b" " * (-len(blob) % 8)
  open(path, "wb").write(struct.pack("<Q", len(blob)) + blob + data)


@pytest.mark.parametrize("damage,message", [
    ("overlap", "invalid offset"), ("beyond", "offset"), ("nbytes", "TensorInvalidInfo|invalid"),
    ("header_length", "not a valid safetensors file"), ("not_json", "not a valid safetensors file"),
])
def test_safetensors_breaking_the_format_rules_are_refused_naming_the_file(tmp_path, damage, message):
  from moe_jax.interop.safetensors_io import InvalidSafetensors, SafetensorsCheckpoint, write_file
  rng = np.random.default_rng(0)
  path = str(tmp_path / "model.safetensors")
  write_file(path, {"a": rng.normal(size=(4, 8)).astype(np.float32), "b": rng.normal(size=(16,)).astype(np.float32)})
  if damage == "overlap":
    _rewrite_header(path, lambda h: h["b"].update(data_offsets=[0, 64]))
  elif damage == "beyond":
    _rewrite_header(path, lambda h: h["b"].update(data_offsets=[128, 10**6]))
  elif damage == "nbytes":
    _rewrite_header(path, lambda h: h["a"].update(shape=[4, 9]))
  elif damage == "header_length":
    raw = open(path, "rb").read()
    open(path, "wb").write(struct.pack("<Q", 10**9) + raw[8:])
  else:
    raw = open(path, "rb").read()
    open(path, "wb").write(raw[:8] + b"{" * 8 + raw[16:])
  with pytest.raises(InvalidSafetensors, match=message) as e:
    SafetensorsCheckpoint(str(tmp_path))
  assert path in str(e.value)


def test_config_json_sizes_are_checked_against_the_tensors_before_allocating(tmp_path):
  from helpers import init_params, tiny_config
  from moe_jax.interop import huggingface
  cfg = tiny_config()
  _, variables = init_params(cfg)
  huggingface.save(cfg, variables, str(tmp_path / "ok"))
  for field, value, message in (("n_routed_experts", 4_000_000, "tensors hold experts 0..7"),
                                ("num_hidden_layers", 100_000, "tensors hold layers 0..3"),
                                ("hidden_size", 64.9, "hidden_size=64.9 must be an integer"),
                                ("vocab_size", 300, "model.embed_tokens.weight is")):
    d = tmp_path / field
    shutil.copytree(tmp_path / "ok", d)
    hf = json.load(open(d / "config.json"))
    hf[field] = value
    json.dump(hf, open(d / "config.json", "w"))
    t0 = time.time()
    with pytest.raises(ValueError, match=message):
      huggingface.load(str(d))
    assert time.time() - t0 < 10


# -- the smaller ones ------------------------------------------------------------------------------------------------

def test_perplexity_and_parquet_inputs_fail_with_the_file_named(tmp_path):
  from moe_jax.perplexity import read_documents
  (tmp_path / "empty.txt").write_bytes(b"")
  with pytest.raises(ValueError, match="no text to score"):
    read_documents(str(tmp_path / "empty.txt"), "text")
  (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"text": oops}\n')
  with pytest.raises(ValueError, match=r"bad.jsonl:2: not valid JSON"):
    read_documents(str(tmp_path / "bad.jsonl"), "text")
  (tmp_path / "not.parquet").write_text("just text")
  c = debug.get_config()
  c.data.source, c.data.paths = "parquet", (str(tmp_path / "not.parquet"),)
  with pytest.raises(ValueError, match="not.parquet is not a readable Parquet file"):
    build_source(c.data, "train")
  for flag in ("--batch_size=0", "--seq_len=0"):
    out = subprocess.run([sys.executable, "-m", "moe_jax.perplexity", "--checkpoint=x", "--data=y", flag],
                         cwd=REPO, env=ENV, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "must be >= 1" in out.stderr, out.stderr[-1000:]
