"""The memory and cost planner: against XLA's compiled memory analysis, exact parameter bytes, V3's cost."""

import json
import math
import os
import subprocess
import sys

import pytest

from configs import debug, deepseek_v2_lite, deepseek_v3
from moe_jax import planning
from moe_jax.model.params import count_params
from moe_jax.sharding import default_rules

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ONE = {"data": 1, "fsdp": 1, "expert": 1, "tensor": 1}


@pytest.mark.parametrize("attention", ["blockwise", "xla"])
@pytest.mark.parametrize("seq_len,batch", [(128, 8), (256, 2), (1024, 1)])
def test_estimate_matches_compiled_memory_analysis(seq_len, batch, attention):
  """Without remat (XLA's CPU scheduler does not realise remat's savings, so only this case is comparable); both
  attention forms: the einsum form's [T, T] scores are residuals, blockwise's score tiles a transient workspace."""
  c = debug.get_config()
  c.model.attention_impl = attention
  est = planning.plan(c.model, ONE, default_rules(), seq_len=seq_len, global_batch=batch, accelerator="cpu",
                      mfu=0.4)
  got = planning.compiled_bytes(c.model, c.train, seq_len, batch)
  compiled = (got["argument_bytes"] + got["temp_bytes"]) / planning.GiB
  assert 0.7 < est["total_gib"] / compiled < 1.4, (est, got)


def test_parameter_bytes_are_exact_and_split_by_the_mesh():
  c = deepseek_v2_lite.get_model_config()
  n = count_params(c)["total_params_with_mtp"]
  assert planning.param_bytes_per_device(c, ONE, default_rules()) == 4 * n
  # Every matrix with an embed dim splits 16 ways over fsdp (MLA's w_uk/w_uv and the norms have none: ~4%).
  split = planning.param_bytes_per_device(c, {**ONE, "fsdp": 16}, default_rules())
  assert 4 * n / 16 <= split < 4 * n / 16 * 1.06
  # Experts over 8 expert shards on top of fsdp=2: expert weights /16, the rest /2.
  mixed = planning.param_bytes_per_device(c, {**ONE, "fsdp": 2, "expert": 8}, default_rules())
  assert 4 * n / 16 < mixed < 4 * n / 2


def test_deepseek_v3_cost_is_the_reports_order_of_magnitude():
  c = deepseek_v3.get_model_config()
  f = planning.flops_per_token(c, 4096)
  # 6 x 37.5B activated (MTP included) + attention at 4K: ~261 GFLOP per token.
  assert 250e9 < f["total"] < 270e9 and 25e9 < f["attention"] < 35e9
  peak = planning.ACCELERATORS["h800"][0]
  hours = f["total"] * 14.8e12 / (peak * 0.4) / 3600
  assert 0.5 < hours / 2.788e6 < 2.0  # the report: 2.788M H800 GPU hours


def test_plan_script_json_row():
  out = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "plan.py"), "--config=configs/deepseek_v2_lite.py",
                        "--mesh=data=1,fsdp=4,expert=8,tensor=2", "--seq_len=512", "--global_batch=64", "--json",
                        "--config.model.remat_policy=full"],
                       capture_output=True, text=True, cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  row = json.loads(out.stdout.strip().splitlines()[-1])
  assert row["devices"] == 64 and row["seqs_per_device"] == 2.0
  assert row["optimizer_gib"] == pytest.approx(2 * row["params_gib"])
  assert math.isfinite(row["step_seconds"]) and row["device_hours"] > 0
