"""The MHA / GQA baselines (config.attention_type): the whole model against the float64 numpy rendering (loops
over heads, query head h reading key/value head h // group), cached decoding equal to the full forward, the
kernel path equal to the einsum path, and the cache sizes against the formula."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import init_params, max_rel_err, merged_params, random_bias, tiny_config, to_numpy64
import numpy_reference as ref
from moe_jax.config import validate_model_config
from moe_jax.inference import Generator, cache_bytes_per_token, init_cache
from moe_jax.layers.attention import KVCache


def _config(kind, **kw):
  kv = {"mha": None, "gqa": 2}[kind]
  return tiny_config(attention_type=kind, num_key_value_heads=kv, num_nextn_predict_layers=1, **kw)


@pytest.mark.parametrize("kind", ["mha", "gqa"])
def test_model_matches_numpy_reference_with_documents(kind):
  cfg = _config(kind)
  model, variables = init_params(cfg)
  variables = random_bias(variables)
  tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(2, 12))
  seg = np.array([[1] * 5 + [2] * 7, [1] * 12])
  pos = np.array([list(range(5)) + list(range(7)), list(range(12))])
  logits, aux = jax.jit(model.apply)(variables, jnp.asarray(tokens), jnp.asarray(seg), jnp.asarray(pos))
  p64 = to_numpy64(merged_params(variables))
  assert p64["dense_layers_0"]["attn"]["wk"].shape[1] == (cfg.num_key_value_heads or cfg.num_attention_heads)
  for b in range(2):
    want, want_mtp = ref.forward(p64, tokens[b], cfg, pos[b], seg[b])
    assert max_rel_err(logits[b], want) < 1e-4
    assert max_rel_err(aux["mtp_logits"][:, b], want_mtp) < 1e-4


@pytest.mark.parametrize("kind", ["mha", "gqa"])
def test_prefill_and_decode_over_the_kv_cache_equal_the_full_forward(kind):
  cfg = _config(kind)
  model, variables = init_params(cfg)
  tokens = jnp.asarray(np.random.default_rng(1).integers(0, cfg.vocab_size, size=(2, 9)))
  full, _ = model.apply(variables, tokens)
  cache = init_cache(cfg, 2, 16, jnp.float32)
  assert isinstance(cache.layers["moe_layers"], KVCache) and cache.max_len == 16
  apply = jax.jit(model.apply)
  out, _, cache = apply(variables, tokens[:, :5], cache=cache)
  outs = [out]
  for t in range(5, 9):
    out, _, cache = apply(variables, tokens[:, t:t + 1], cache=cache)
    outs.append(out)
  chex.assert_trees_all_close(jnp.concatenate(outs, 1), full, rtol=2e-5, atol=2e-5)


def test_blockwise_kernel_path_equals_the_einsum_path():
  cfg = _config("gqa", attention_impl="xla")
  model, variables = init_params(cfg)
  tokens = jnp.asarray(np.random.default_rng(2).integers(0, cfg.vocab_size, size=(2, 12)))
  seg = jnp.asarray([[1] * 5 + [2] * 7, [1] * 12])
  want, _ = model.apply(variables, tokens, seg)
  cfg_b = _config("gqa", attention_impl="blockwise", attention_block_size=4)  # several tiles
  from moe_jax.model import Transformer
  got, _ = Transformer(cfg_b).apply(variables, tokens, seg)
  chex.assert_trees_all_close(got, want, rtol=2e-5, atol=2e-5)


def test_generation_plain_and_speculative_agree():
  cfg = _config("gqa")
  _, variables = init_params(cfg)
  gen = Generator(variables, cfg, max_len=32)
  prompts = [[1, 5, 9, 3], [2, 7]]
  plain = gen.generate(prompts, max_new_tokens=8)
  spec = gen.generate(prompts, max_new_tokens=8, speculative=True)
  assert plain.tokens == spec.tokens


def test_cache_bytes_and_config_errors():
  from configs import deepseek_v3
  v3 = deepseek_v3.get_model_config()
  mla = cache_bytes_per_token(v3)
  v3.attention_type = "mha"
  mha = cache_bytes_per_token(v3)
  assert (mla, mha) == (576 * 2, 128 * (192 + 128) * 2)  # 71x at V3's head dims (192-dim keys, 128-dim values)
  v3.attention_type, v3.num_key_value_heads = "gqa", 8
  assert cache_bytes_per_token(v3) == 8 * 320 * 2
  bad = tiny_config(attention_type="gqa", num_key_value_heads=3)
  with pytest.raises(ValueError, match="num_key_value_heads dividing num_attention_heads"):
    validate_model_config(bad)
  with pytest.raises(ValueError, match="needs attention_type='gqa'"):
    validate_model_config(tiny_config(num_key_value_heads=2))
  with pytest.raises(ValueError, match="attention_type='rnn' is not one of"):
    validate_model_config(tiny_config(attention_type="rnn"))
  from moe_jax.interop.hf_config import hf_config_from_model
  with pytest.raises(ValueError, match="no DeepSeek-V2/V3 checkpoint format"):
    hf_config_from_model(tiny_config(attention_type="mha"))
