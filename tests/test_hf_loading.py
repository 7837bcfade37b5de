"""Loading the published checkpoint format: sharded index, FP8 blocks with weight_scale_inv, the MTP layer,
rope_scaling vs rope_parameters, and clear errors for missing / unexpected tensors."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax.traverse_util import flatten_dict
from safetensors.torch import save_file

from hf_models import make_v3
from moe_jax.interop import huggingface
from moe_jax.interop.safetensors_io import SafetensorsCheckpoint, dequantize_fp8_blockwise

pytestmark = pytest.mark.filterwarnings("ignore:.*holds no MTP layer")
BLOCK = 8  # small FP8 blocks so the tiny weights span several (the release uses 128)


def _read_all(path):
  ckpt = SafetensorsCheckpoint(path)
  return {k: np.array(ckpt.get(k)) for k in ckpt.keys()}


def _quantize(w):
  """Blockwise e4m3 as DeepSeek-V3's release: w ~= q * scale_inv (per 8x8 block here)."""
  out_dim, in_dim = w.shape
  sb = np.zeros((-(-out_dim // BLOCK), -(-in_dim // BLOCK)), np.float32)
  for i in range(sb.shape[0]):
    for j in range(sb.shape[1]):
      sb[i, j] = max(np.abs(w[i * BLOCK:(i + 1) * BLOCK, j * BLOCK:(j + 1) * BLOCK]).max() / 448.0, 1e-12)
  full = np.repeat(np.repeat(sb, BLOCK, 0), BLOCK, 1)[:out_dim, :in_dim]
  q = torch.from_numpy(w / full).to(torch.float8_e4m3fn)
  return q, torch.from_numpy(sb)


def _write(path, tensors, hf_config, shards=2):
  """Writes tensors (numpy or torch) as `shards` files plus model.safetensors.index.json."""
  os.makedirs(path, exist_ok=True)
  names = sorted(tensors)
  weight_map = {}
  for s in range(shards):
    part = {n: (t if isinstance(t, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(t)))
            for n in names[s::shards] for t in [tensors[n]]}
    fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
    save_file(part, os.path.join(path, fname))
    weight_map.update({n: fname for n in part})
  with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {}, "weight_map": weight_map}, f)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(hf_config, f)


@pytest.fixture(scope="module")
def release_like(tmp_path_factory):
  """A V3 checkpoint shaped like the release: FP8 projections, an MTP layer, sharded, rope under rope_scaling."""
  base = str(tmp_path_factory.mktemp("base"))
  make_v3(base)
  tensors = _read_all(base)
  hf_config = json.load(open(os.path.join(base, "config.json")))
  L, D, V = hf_config["num_hidden_layers"], hf_config["hidden_size"], hf_config["vocab_size"]
  rng = np.random.default_rng(0)
  # An MTP layer (transformers does not build one): a copy of the last layer's block plus the MTP-only tensors.
  for k, v in list(tensors.items()):
    if k.startswith(f"model.layers.{L - 1}."):
      tensors[k.replace(f"layers.{L - 1}.", f"layers.{L}.")] = v + rng.normal(size=v.shape).astype(np.float32) * 0.01
  mtp = f"model.layers.{L}."
  tensors[mtp + "enorm.weight"] = rng.normal(size=D).astype(np.float32)
  tensors[mtp + "hnorm.weight"] = rng.normal(size=D).astype(np.float32)
  tensors[mtp + "eh_proj.weight"] = rng.normal(size=(D, 2 * D)).astype(np.float32)
  tensors[mtp + "shared_head.norm.weight"] = rng.normal(size=D).astype(np.float32)
  tensors[mtp + "embed_tokens.weight"] = tensors["model.embed_tokens.weight"].copy()
  tensors[mtp + "shared_head.head.weight"] = tensors["lm_head.weight"].copy()
  # Published config.json style: rope_theta + rope_scaling{"type": "yarn"}, FP8 quantization_config.
  rope = hf_config.pop("rope_parameters")
  hf_config["rope_theta"] = rope.pop("rope_theta")
  rope["type"] = rope.pop("rope_type")
  hf_config["rope_scaling"] = rope
  hf_config["num_nextn_predict_layers"] = 1
  hf_config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [BLOCK, BLOCK]}
  expected = dict(tensors)
  stored = {}
  for k, v in tensors.items():
    if k.endswith("proj.weight") and "layernorm" not in k:
      q, s = _quantize(v)
      stored[k], stored[k + "_scale_inv"] = q, s
      expected[k] = dequantize_fp8_blockwise(q.float().numpy(), s.numpy(), (BLOCK, BLOCK))
    else:
      stored[k] = v
  path = str(tmp_path_factory.mktemp("release"))
  _write(path, stored, hf_config)
  return path, expected, hf_config


def test_release_format_loads_fp8_mtp_sharded(release_like):
  path, expected, hf_config = release_like
  cfg, variables = huggingface.load(path)
  params = variables["params"]
  assert cfg.num_nextn_predict_layers == 1 and cfg.rope_scaling.factor == 4.0 and cfg.rope_scaling.type == "yarn"
  L, H, N = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.qk_nope_head_dim
  mtp = params["mtp_0"]
  np.testing.assert_array_equal(mtp["eh_proj"], expected[f"model.layers.{L}.eh_proj.weight"].T)
  np.testing.assert_array_equal(mtp["enorm"]["scale"], expected[f"model.layers.{L}.enorm.weight"])
  np.testing.assert_array_equal(mtp["head_norm"]["scale"], expected[f"model.layers.{L}.shared_head.norm.weight"])
  # An FP8 projection, dequantised with its 8x8 block scales, then split into W_UK / W_UV per head.
  kv_b = expected["model.layers.1.self_attn.kv_b_proj.weight"].T.reshape(cfg.kv_lora_rank, H, -1)
  np.testing.assert_allclose(params["moe_layers_0"]["attn"]["w_uk"], kv_b[:, :, :N], rtol=1e-6)
  np.testing.assert_allclose(params["moe_layers_0"]["attn"]["w_uv"], kv_b[:, :, N:], rtol=1e-6)
  # A routed expert's weights land at its index of the stacked [E, D, F] array.
  np.testing.assert_allclose(params["moe_layers_1"]["moe"]["wi_up"][5],
                             expected["model.layers.2.mlp.experts.5.up_proj.weight"].T, rtol=1e-6)
  np.testing.assert_allclose(mtp["block"]["moe"]["wo"][3],
                             expected[f"model.layers.{L}.mlp.experts.3.down_proj.weight"].T, rtol=1e-6)
  for leaf in flatten_dict(variables).values():
    assert np.all(np.isfinite(leaf))


def test_bfloat16_load(release_like):
  cfg, variables = huggingface.load(release_like[0], jnp.bfloat16)
  params = variables["params"]
  assert cfg.dtype == "bfloat16"
  assert params["embedding"].dtype == jnp.bfloat16
  assert params["moe_layers_0"]["moe"]["router"]["kernel"].dtype == jnp.float32  # routing stays float32


def _variant(src, dst, drop=(), add=None):
  tensors = _read_all(src)
  for k in drop:
    tensors.pop(k)
  tensors.update(add or {})
  _write(dst, tensors, json.load(open(os.path.join(src, "config.json"))), shards=1)


def test_missing_and_unexpected_tensors_are_named(tmp_path):
  base = str(tmp_path / "base")
  make_v3(base)
  _variant(base, str(tmp_path / "missing"), drop=["model.layers.2.mlp.experts.7.up_proj.weight"])
  with pytest.raises(ValueError, match=r"missing \(1\): model\.layers\.2\.mlp\.experts\.7\.up_proj\.weight"):
    huggingface.load(str(tmp_path / "missing"))
  _variant(base, str(tmp_path / "extra"), add={"model.layers.0.mlp.bogus.weight": np.zeros(3, np.float32)})
  with pytest.raises(ValueError, match=r"unexpected \(1\): model\.layers\.0\.mlp\.bogus\.weight"):
    huggingface.load(str(tmp_path / "extra"))


def test_mtp_announced_but_absent_warns(tmp_path):
  make_v3(str(tmp_path))
  with pytest.warns(UserWarning, match="holds no MTP layer"):
    cfg, variables = huggingface.load(str(tmp_path))
  assert cfg.num_nextn_predict_layers == 0 and "mtp_0" not in variables["params"]


def test_fp8_without_scale_is_an_error(tmp_path):
  base = str(tmp_path / "base")
  make_v3(base)
  key = "model.layers.0.mlp.up_proj.weight"
  w = torch.from_numpy(_read_all(base)[key]).to(torch.float8_e4m3fn)
  _variant(base, str(tmp_path / "bad"), add={key: w})
  with pytest.raises(ValueError, match="is FP8 but has no"):
    huggingface.load(str(tmp_path / "bad"))


def test_missing_directory_and_config(tmp_path):
  with pytest.raises(FileNotFoundError, match="config.json"):
    huggingface.load(str(tmp_path))


def test_generate_with_text_uses_the_published_tokenizer(tmp_path):
  """`generate --checkpoint=hf:DIR --prompt=TEXT` encodes with DIR/tokenizer.json after the <bos> that
  tokenizer_config.json names (DeepSeek's "<｜begin▁of▁sentence｜>", not id 0 here), as a user runs it."""
  import subprocess
  import sys
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  bos = "<｜begin▁of▁sentence｜>"
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=280, special_tokens=["<pad>", bos], show_progress=False,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(["def main(args):\n    return args\n"] * 20, trainer=trainer)
  path = str(tmp_path / "ckpt")
  make_v3(path, vocab_size=300)
  tok.save(os.path.join(path, "tokenizer.json"))
  with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
    json.dump({"bos_token": {"content": bos, "__type": "AddedToken"}, "eos_token": "<pad>"}, f)
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=repo)
  out = subprocess.run([sys.executable, "-m", "moe_jax.generate", f"--checkpoint=hf:{path}", "--prompt=def main(",
                        "--max_new_tokens=3", "--json"], capture_output=True, text=True, cwd=repo, env=env,
                       timeout=600)
  assert out.returncode == 0, out.stderr[-2000:]
  got = json.loads(out.stdout.strip().splitlines()[-1])
  assert got["prompt_ids"] == [tok.token_to_id(bos)] + tok.encode("def main(", add_special_tokens=False).ids
  assert got["prompt_ids"][0] == 1 and isinstance(got["text"], str)
