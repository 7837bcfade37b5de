"""The whole model, MTP included, against the float64 numpy rendering of the report's equations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import init_params, max_rel_err, merged_params, random_bias, tiny_config, to_numpy64
import numpy_reference as ref


@pytest.fixture(scope="module")
def setup():
  cfg = tiny_config(num_nextn_predict_layers=2)
  model, variables = init_params(cfg)
  variables = random_bias(variables)
  tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(2, 12))
  logits, aux = jax.jit(model.apply)(variables, jnp.asarray(tokens))
  return cfg, model, variables, tokens, logits, aux


def test_logits_and_mtp_match_numpy_reference(setup):
  cfg, _, variables, tokens, logits, aux = setup
  p64 = to_numpy64(merged_params(variables))
  for b in range(tokens.shape[0]):
    ref_logits, ref_mtp = ref.forward(p64, tokens[b], cfg)
    assert max_rel_err(logits[b], ref_logits) < 1e-4
    assert aux["mtp_logits"].shape == (2,) + logits.shape
    assert max_rel_err(aux["mtp_logits"][:, b], ref_mtp) < 1e-4


def test_mtp_shares_embedding_and_head(setup):
  cfg, model, variables, tokens, _, _ = setup
  params = variables["params"]
  for k in range(cfg.num_nextn_predict_layers):
    assert not {"embedding", "lm_head"} & set(params[f"mtp_{k}"]), "MTP modules must not own embedding/head"

  def mtp_sum(head):
    _, aux = model.apply({**variables, "params": {**params, "lm_head": head}}, jnp.asarray(tokens))
    return jnp.sum(aux["mtp_logits"][1] ** 2)

  g = jax.grad(mtp_sum)(params["lm_head"])
  assert float(jnp.max(jnp.abs(g))) > 0, "MTP logits must depend on the shared output head"


def test_mtp_depth_k_uses_token_i_plus_k(setup):
  """Changing token j changes depth-k MTP logits only at positions >= j - k (causal over the shifted input)."""
  cfg, model, variables, tokens, _, aux = setup
  j = 8
  changed = tokens.copy()
  changed[:, j] = (changed[:, j] + 1) % cfg.vocab_size
  _, aux2 = model.apply(variables, jnp.asarray(changed))
  for k in (1, 2):
    diff = np.abs(np.asarray(aux2["mtp_logits"][k - 1] - aux["mtp_logits"][k - 1])).max(axis=(0, 2))
    assert np.all(diff[: j - k] < 1e-6) and diff[j - k] > 1e-6
