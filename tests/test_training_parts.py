"""Training pieces against independent references: losses (float64 numpy), the loss-free bias update
(hand-computed), MaxVio, weight-decay mask, schedules at their boundaries, config validation."""

import math

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import debug
from moe_jax.training import schedules
from flax import traverse_util

from moe_jax.training.balancing import max_violation, update_router_bias
from moe_jax.training.config import validate_config
from moe_jax.training.loss import training_loss
from moe_jax.training.optimizer import decay_mask
from tests.helpers import init_params, tiny_config


def _np_nll(logits, t):
  logits = logits.astype(np.float64)
  m = logits.max(-1, keepdims=True)
  lse = np.log(np.exp(logits - m).sum(-1)) + m[..., 0]
  return lse - logits[t]


def test_training_loss_matches_float64_numpy():
  rng = np.random.default_rng(0)
  B, T, V, D = 3, 20, 11, 2
  tokens = rng.integers(0, V, (B, T)).astype(np.int32)
  seg = np.array([[1] * 7 + [2] * 9 + [0] * 4, [1] * 20, [1] * 3 + [2] * 3 + [3] * 14], np.int32)
  logits = rng.normal(size=(B, T, V)).astype(np.float32) * 3
  mtp_logits = rng.normal(size=(D, B, T, V)).astype(np.float32) * 3
  aux = {"balance_loss": jnp.asarray([0.01, 0.02]), "mtp_balance_loss": jnp.asarray([0.005]),
         "mtp_logits": jnp.asarray(mtp_logits)}
  batch = {"tokens": jnp.asarray(tokens), "segment_ids": jnp.asarray(seg)}
  total, m = jax.jit(training_loss)(jnp.asarray(logits), aux, batch, 0.3)

  def ref_ce(lg, shift):
    s, n = 0.0, 0
    for b in range(B):
      for i in range(T - shift):
        if seg[b, i] != 0 and seg[b, i + shift] == seg[b, i]:
          s += _np_nll(lg[b, i], tokens[b, i + shift])
          n += 1
    return s / n

  ce = ref_ce(logits, 1)
  mtp = np.mean([ref_ce(mtp_logits[k], k + 2) for k in range(D)])
  np.testing.assert_allclose(float(m["ce"]), ce, rtol=1e-5)
  np.testing.assert_allclose(float(m["mtp_loss"]), mtp, rtol=1e-5)
  np.testing.assert_allclose(float(total), ce + 0.3 * mtp + 0.035, rtol=1e-5)


def test_bias_update_hand_computed():
  tree = lambda flat: traverse_util.unflatten_dict(flat, sep="/")  # noqa: E731 - the "router" collection's shape
  bias = tree({"moe_layers_0/moe/router/e_score_correction_bias": jnp.asarray([0.0, 0.5, -0.2, 0.1]),
               "moe_layers_1/moe/router/e_score_correction_bias": jnp.zeros(4),
               "mtp_0/block/moe/router/e_score_correction_bias": jnp.zeros(4)})
  aux = {"expert_load": jnp.asarray([[10.0, 2.0, 4.0, 4.0], [5.0, 5.0, 5.0, 5.0]]),
         "mtp_expert_load": jnp.asarray([[0.0, 0.0, 1.0, 7.0]])}
  new = traverse_util.flatten_dict(update_router_bias(bias, aux, 0.001), sep="/")
  # layer 0: mean 5 -> sign(5 - load) = [-1, +1, +1, +1]
  np.testing.assert_allclose(new["moe_layers_0/moe/router/e_score_correction_bias"],
                             [-0.001, 0.501, -0.199, 0.101], atol=1e-7)
  np.testing.assert_array_equal(new["moe_layers_1/moe/router/e_score_correction_bias"], np.zeros(4))  # balanced
  np.testing.assert_allclose(new["mtp_0/block/moe/router/e_score_correction_bias"], [0.001, 0.001, 0.001, -0.001])
  # Scanned layers: one [L, E] bias driven by the [L, E] loads row by row.
  stacked = tree({"moe_layers/moe/router/e_score_correction_bias": jnp.zeros((2, 4))})
  out = update_router_bias(stacked, aux, 0.5)["moe_layers"]["moe"]["router"]["e_score_correction_bias"]
  np.testing.assert_allclose(out, [[-0.5, 0.5, 0.5, 0.5], [0, 0, 0, 0]])


def test_bias_update_proportional_hand_computed():
  tree = lambda flat: traverse_util.unflatten_dict(flat, sep="/")  # noqa: E731
  bias = tree({"moe_layers_0/moe/router/e_score_correction_bias": jnp.asarray([0.0, 0.5, -0.2, 0.1]),
               "moe_layers_1/moe/router/e_score_correction_bias": jnp.zeros(4)})
  aux = {"expert_load": jnp.asarray([[10.0, 2.0, 4.0, 4.0], [0.0, 0.0, 0.0, 0.0]])}
  new = traverse_util.flatten_dict(update_router_bias(bias, aux, 0.01, "proportional"), sep="/")
  # layer 0: mean 5 -> (5 - load) / 5 = [-1, 0.6, 0.2, 0.2]; layer 1 saw no tokens: no move (not NaN)
  np.testing.assert_allclose(new["moe_layers_0/moe/router/e_score_correction_bias"],
                             [-0.01, 0.506, -0.198, 0.102], atol=1e-7)
  np.testing.assert_array_equal(new["moe_layers_1/moe/router/e_score_correction_bias"], np.zeros(4))
  with pytest.raises(ValueError, match="not one of"):
    update_router_bias(bias, aux, 0.01, "multiplicative")


def test_training_summary_from_metric_rows():
  from moe_jax.training.metrics import training_summary
  rows = [{"step": 10, "loss": 5.0, "max_vio": 2.0, "tokens_per_sec": 100.0},  # the compile window: not in the median
          {"step": 20, "loss": 4.0, "max_vio": 1.0, "tokens_per_sec": 900.0},
          {"step": 20, "eval_loss": 4.1, "bits_per_byte": 2.0},  # an eval row: not a training batch
          {"step": 30, "loss": 3.0, "max_vio": 0.5, "tokens_per_sec": 1000.0},
          {"step": 40, "loss": 3.0, "max_vio": 0.3, "tokens_per_sec": 5000.0}]
  s = training_summary(rows)
  assert s["max_vio_batch"] == pytest.approx((2.0 + 1.0 + 0.5 + 0.3) / 4)
  assert s["tokens_per_sec"] == 1000.0 and s["logged_steps"] == 4
  assert training_summary([]) == {}


def test_max_violation():
  load = jnp.asarray([[10.0, 2.0, 4.0, 4.0], [5.0, 5.0, 5.0, 5.0], [0.0, 0.0, 0.0, 0.0]])
  np.testing.assert_allclose(max_violation(load), [10 / 5 - 1, 0.0, 0.0])


def test_router_bias_is_outside_params_and_gets_no_gradient():
  cfg = tiny_config()
  model, variables = init_params(cfg)
  variables = jax.tree.map(jnp.asarray, variables)
  trainable, bias = variables["params"], traverse_util.flatten_dict(variables["router"], sep="/")
  assert len(bias) == 3 and all(k.endswith("e_score_correction_bias") for k in bias)
  assert "e_score_correction_bias" not in str(jax.tree_util.tree_structure(trainable))
  bias = jax.tree.map(lambda v: v + 0.3, variables["router"])
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 16)), jnp.int32)

  def f(b):
    logits, aux = model.apply({"params": trainable, "router": b}, tokens)
    return jnp.sum(logits ** 2) + jnp.sum(aux["balance_loss"])

  grads = jax.jit(jax.grad(f))(bias)
  for g in jax.tree.leaves(grads):
    np.testing.assert_array_equal(g, 0.0)


def test_weight_decay_mask_matrices_only():
  for scan in (False, True):
    cfg = tiny_config(scan_layers=scan)
    from moe_jax.model import Transformer

    boxed = jax.eval_shape(Transformer(cfg).init, jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))["params"]
    mask = {"/".join(str(getattr(k, "key", k)) for k in path): v
            for path, v in jax.tree_util.tree_flatten_with_path(decay_mask(boxed))[0]}
    assert mask and not any(k.endswith("e_score_correction_bias") for k in mask)
    for k, v in mask.items():
      assert v == (not k.endswith("scale")), k  # norm scales (even stacked [layers, d]) are the only vectors
    assert any(v for v in mask.values())


def _cfg(**train):
  c = debug.get_config()
  for k, v in train.items():
    c.train[k] = v
  return c


def test_learning_rate_schedule_boundaries():
  c = _cfg(num_steps=1000, warmup_steps=100, learning_rate=1e-3, lr_final=1e-4, lr_decay_start=400,
           lr_decay_length=400, lr_tail=((900, 5e-5),))
  lr = lambda s: float(schedules.learning_rate(c, s, 0, 1000))  # noqa: E731
  assert lr(0) == pytest.approx(1e-5)
  assert lr(49) == pytest.approx(5e-4)
  assert lr(99) == pytest.approx(1e-3) and lr(400) == pytest.approx(1e-3)
  assert lr(600) == pytest.approx(1e-4 + 0.5 * 9e-4)  # half-way through the cosine
  assert lr(800) == pytest.approx(1e-4) and lr(899) == pytest.approx(1e-4)
  assert lr(900) == pytest.approx(5e-5)
  # -1 = decay to the end of training, in token units with a batch ramp.
  c = _cfg(num_steps=10, schedule_unit="tokens", lr_decay_start=0, lr_decay_length=-1, warmup_steps=0,
           batch_size_start=2, batch_warmup=8 * 64 * 3)
  end = schedules.run_end(c)
  assert end == schedules.total_tokens(c) and end < 10 * 8 * 64
  assert float(schedules.learning_rate(c, 10, end, end)) == pytest.approx(c.train.lr_final)


def test_batch_mtp_and_bias_schedules_boundaries():
  c = _cfg(batch_size_start=2, batch_warmup=100, schedule_unit="steps", mtp_weight=0.3, mtp_weight_after=0.1,
           mtp_weight_switch=50, bias_update_rate=0.001, bias_update_stop=70)
  assert schedules.batch_rows(c, 0, 0) == 2
  assert schedules.batch_rows(c, 50, 0) == 5  # 2 + 0.5 * (8 - 2)
  assert schedules.batch_rows(c, 100, 0) == 8 and schedules.batch_rows(c, 10**6, 0) == 8
  assert float(schedules.mtp_weight(c, 49, 0)) == pytest.approx(0.3)
  assert float(schedules.mtp_weight(c, 50, 0)) == pytest.approx(0.1)
  assert float(schedules.bias_update_rate(c, 69, 0)) == pytest.approx(0.001)
  assert float(schedules.bias_update_rate(c, 70, 0)) == 0.0
  c = _cfg(schedule_unit="tokens", mtp_weight_switch=1000)
  assert float(schedules.mtp_weight(c, 10**6, 999)) == pytest.approx(0.3)
  assert float(schedules.mtp_weight(c, 0, 1000)) == pytest.approx(0.1)


@pytest.mark.parametrize("section,field,value,match", [
    ("train", "num_steps", 0, "config.train.num_steps=0 must be an integer >= 1"),
    ("train", "schedule_unit", "epochs", "schedule_unit='epochs' is not one of"),
    ("train", "batch_warmup", -1, "batch_warmup=-1 must be >= 0"),
    ("train", "lr_final", 1.0, "lr_final=1.0 must be in"),
    ("data", "source", "web", "config.data.source='web' is not one of"),
    ("data", "tokenizer", "sentencepiece", "tokenizer='sentencepiece' is not one of"),
    ("data", "seq_len", 4, "seq_len=4 must be an integer >= 16"),
    ("data", "validation_fraction", 0.0, "validation_fraction=0.0 must be in"),
    ("checkpoint", "keep", 0, "config.checkpoint.keep=0"),
    ("model", "vocab_size", 100, "vocab_size=100 < 257"),
])
def test_invalid_config_raises_naming_the_field(section, field, value, match):
  c = debug.get_config()
  c[section][field] = value
  with pytest.raises(ValueError, match=match):
    validate_config(c)


def test_invalid_config_combinations():
  c = debug.get_config()
  c.model.topk_method = "greedy"
  c.model.scoring_func = "softmax"
  c.model.n_group = 1
  c.model.topk_group = 1
  with pytest.raises(ValueError, match="bias_update_rate=0.001 needs config.model.topk_method='noaux_tc'"):
    validate_config(c)
  c = debug.get_config()
  c.data.source = "text"
  with pytest.raises(ValueError, match="needs config.data.paths"):
    validate_config(c)
  c = debug.get_config()
  c.train.unknown_knob = 1
  with pytest.raises(ValueError, match="unknown fields"):
    validate_config(c)
  validate_config(debug.get_config())
