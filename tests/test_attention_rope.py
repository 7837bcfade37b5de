"""RoPE/YaRN against transformers' rope initialisers and complex arithmetic; MLA causality and document isolation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from transformers import DeepseekV3Config
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from helpers import init_params, max_rel_err, tiny_config
from moe_jax.config import yarn_rope_scaling
from moe_jax.layers import apply_rope, rope_frequencies
from moe_jax.layers.attention import attention_mask
from moe_jax.model import Block


@pytest.mark.parametrize("mscale", [(1.0, 1.0), (0.707, 0.707), (1.0, 0.5)])
@pytest.mark.parametrize("dim,orig", [(64, 4096), (8, 32)])
def test_yarn_frequencies_match_transformers(mscale, dim, orig):
  cfg = tiny_config(qk_rope_head_dim=dim, rope_scaling=yarn_rope_scaling(40.0, orig, 32.0, 1.0, *mscale))
  hf = DeepseekV3Config(qk_rope_head_dim=dim, rope_parameters=dict(
      rope_type="yarn", rope_theta=10000.0, factor=40.0, original_max_position_embeddings=orig, beta_fast=32,
      beta_slow=1, mscale=mscale[0], mscale_all_dim=mscale[1]))
  hf_inv_freq, hf_factor = ROPE_INIT_FUNCTIONS["yarn"](hf)
  inv_freq, factor = rope_frequencies(cfg)
  np.testing.assert_allclose(inv_freq, hf_inv_freq.numpy(), rtol=1e-6)
  np.testing.assert_allclose(factor, hf_factor, rtol=1e-6)


def test_interleaved_rope_is_complex_rotation():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 5, 3, 8))
  pos = rng.integers(0, 100, size=(2, 5))
  inv = 10000.0 ** (-np.arange(0, 8, 2) / 8)
  ang = pos[..., None] * inv
  out = apply_rope(jnp.asarray(x, jnp.float32), jnp.asarray(np.cos(ang), jnp.float32),
                   jnp.asarray(np.sin(ang), jnp.float32), interleave=True)
  z = (x[..., 0::2] + 1j * x[..., 1::2]) * np.exp(1j * ang)[:, :, None]
  np.testing.assert_allclose(np.asarray(out)[..., 0::2], z.real, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(out)[..., 1::2], z.imag, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("is_moe", [False, True])
def test_block_is_causal(is_moe):
  """d out[t] / d x[s] == 0 for every s > t."""
  cfg = tiny_config()
  B, T, D = 1, 10, cfg.hidden_size
  x = jax.random.normal(jax.random.PRNGKey(0), (B, T, D))
  pos = jnp.arange(T)[None]
  from moe_jax.layers.attention import attention_inputs
  inputs = attention_inputs(cfg, pos, jnp.ones((B, T), jnp.int32))
  valid = jnp.ones((B, T), bool)
  block = Block(cfg, is_moe)
  params = jax.jit(block.init)(jax.random.PRNGKey(1), x, inputs, valid)
  # One compile, T calls: the gradient of output row t (selected by a one-hot weight) w.r.t. every input row.
  grad_row = jax.jit(jax.grad(lambda x_, w_T: jnp.sum(
      block.apply(params, x_, inputs, valid)[0] ** 2 * w_T[None, :, None])))
  dep_TS = np.stack([np.abs(np.asarray(grad_row(x, jnp.eye(T)[t])[0])).max(-1) for t in range(T)])
  assert np.all(dep_TS[np.triu_indices(T, 1)] == 0.0), "an output depends on a later input"
  assert np.all(np.diag(dep_TS) > 0) and np.all(dep_TS[np.tril_indices(T, -1)] > 0)


def test_packed_documents_do_not_interact():
  """A row packing docs A and B (positions reset) gives each doc's logits as if run alone."""
  cfg = tiny_config(num_nextn_predict_layers=0)
  model, variables = init_params(cfg)
  rng = np.random.default_rng(0)
  a, b = rng.integers(0, 256, 7), rng.integers(0, 256, 5)
  packed = np.concatenate([a, b])[None]
  seg = np.array([[1] * 7 + [2] * 5])
  pos = np.array([list(range(7)) + list(range(5))])
  apply = jax.jit(model.apply)
  logits, _ = apply(variables, jnp.asarray(packed), jnp.asarray(seg), jnp.asarray(pos))
  la, _ = apply(variables, jnp.asarray(a[None]))
  lb, _ = apply(variables, jnp.asarray(b[None]))
  assert max_rel_err(logits[0, :7], la[0]) < 1e-5
  assert max_rel_err(logits[0, 7:], lb[0]) < 1e-5


def test_padding_is_excluded_from_expert_load():
  cfg = tiny_config()
  model, variables = init_params(cfg)
  tokens = jnp.asarray(np.random.default_rng(1).integers(0, 256, (2, 12)))
  seg = jnp.asarray([[1] * 12, [1] * 8 + [0] * 4])
  _, aux = jax.jit(model.apply)(variables, tokens, seg)
  np.testing.assert_allclose(np.asarray(aux["expert_load"]).sum(-1), cfg.num_experts_per_tok * 20)
