"""Full-size configs checked with jax.eval_shape: exact parameter counts, no memory."""

import json
import os
import subprocess
import sys

from configs import deepseek_v2_lite, deepseek_v3
from moe_jax.model.params import count_params, param_shapes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_deepseek_v3_counts():
  c = count_params(deepseek_v3.get_model_config())
  assert abs(c["total_params"] / 671e9 - 1) < 0.005  # the report's 671B
  assert 36.0e9 < c["active_params"] < 38.0e9  # the report's 37B (36.6B without the input embedding)
  assert c["total_params"] == 671_026_419_200  # computed from the published shapes
  assert abs(c["stored_params_hf"] / 685e9 - 1) < 0.005  # the released checkpoint with its MTP layer


def test_deepseek_v2_lite_counts():
  c = count_params(deepseek_v2_lite.get_model_config())
  assert abs(c["total_params"] / 15.7e9 - 1) < 0.005
  assert abs(c["active_params"] / 2.45e9 - 1) < 0.01  # "2.4B activated"
  assert c["total_params_with_mtp"] == c["total_params"]  # V2 has no MTP


def test_v3_shapes_and_logical_axes():
  cfg = deepseek_v3.get_model_config()
  shapes = param_shapes(cfg, boxed=True)
  experts = shapes["moe_layers"]["moe"]["wi_gate"]
  assert experts.value.shape == (58, 256, 7168, 2048)
  assert experts.names == ("layers", "expert", "embed", "expert_mlp")
  assert shapes["moe_layers"]["attn"]["w_uk"].value.shape == (58, 512, 128, 128)


def test_summary_cli_json():
  pythonpath = os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))
  out = subprocess.run([sys.executable, "-m", "moe_jax.summary", "--config=configs/deepseek_v3.py", "--json"],
                       cwd=ROOT, capture_output=True, text=True, check=True, env={**os.environ, "PYTHONPATH": pythonpath})
  row = json.loads(out.stdout.strip().splitlines()[-1])
  assert row["total_params"] == 671_026_419_200
  assert row["total_params_with_mtp"] > row["total_params"] > row["active_params"]
