"""Attention backends (`config.model.attention_impl`): every backend equals an independent float64 numpy
attention in the forward pass, and the einsum form ("xla") in the MLA layer's output and the gradients of every
MLA parameter, on packed rows with several documents, padding and T not a multiple of the tile; the whole model
trains to the same losses; a backend that cannot run on the platform is refused before anything compiles."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import max_rel_err, tiny_config
from moe_jax.config import validate_model_config
from moe_jax.kernels import attention as attention_kernels
from moe_jax.kernels import cudnn_attention, interpret_kernels
from moe_jax.kernels.blockwise_attention import blockwise_attention
from moe_jax.kernels.cudnn_attention import cudnn_attention as cudnn_attend
from moe_jax.kernels.splash_attention import splash_attention
from moe_jax.layers.attention import MLA, attention_inputs


def _packed_segments(rng, B, T):
  """Rows of 2-4 documents of random lengths, the first row ending in padding (id 0); positions restart per
  document."""
  seg = np.zeros((B, T), np.int32)
  pos = np.zeros((B, T), np.int32)
  for b in range(B):
    live = T - (7 if b == 0 else 0)
    cuts = np.sort(rng.choice(np.arange(1, live), size=rng.integers(1, 4), replace=False))
    bounds = [0, *cuts, live]
    for d, (s, e) in enumerate(zip(bounds[:-1], bounds[1:])):
      seg[b, s:e] = d + 1
      pos[b, s:e] = np.arange(e - s)
  return seg, pos


def _numpy_attention(qn, qr, kn, kr, v, seg, scale):
  """float64, a loop over rows and heads: softmax over s <= t with seg[s] == seg[t]."""
  qn, qr, kn, kr, v = (np.asarray(a, np.float64) for a in (qn, qr, kn, kr, v))
  B, T, H, _ = qn.shape
  out = np.zeros((B, T, H, v.shape[-1]))
  for b in range(B):
    visible = (seg[b][:, None] == seg[b][None, :]) & np.tri(T, dtype=bool)
    for h in range(H):
      s = (qn[b, :, h] @ kn[b, :, h].T + qr[b, :, h] @ kr[b].T) * scale
      s = np.where(visible, s, -np.inf)
      p = np.exp(s - s.max(-1, keepdims=True))
      out[b, :, h] = (p / p.sum(-1, keepdims=True)) @ v[b, :, h]
  return out


def _random_qkv(rng, B, T, H, N=16, R=8, A=12):
  f = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)  # noqa: E731
  return f(B, T, H, N), f(B, T, H, R), f(B, T, H, N), f(B, T, R), f(B, T, H, A)


KERNELS = {
    "blockwise/block=32": lambda *a, scale: blockwise_attention(*a, scale=scale, block=32),
    "blockwise/block=512 (one tile)": lambda *a, scale: blockwise_attention(*a, scale=scale, block=512),
    "cudnn arrangement (run by jax's xla implementation)": lambda *a, scale: cudnn_attend(*a, scale=scale,
                                                                                         implementation="xla"),
    "splash (TPU interpret mode)": lambda *a, scale: splash_attention(*a, scale=scale, interpret=True),
}


@pytest.mark.parametrize("name", list(KERNELS))
def test_kernel_forward_equals_float64_numpy(name):
  rng = np.random.default_rng(0)
  B, T = 2, 100  # T is not a multiple of the 32-token tile nor of splash's 128
  seg, _ = _packed_segments(rng, B, T)
  args = _random_qkv(rng, B, T, H=3)
  out = KERNELS[name](*args, jnp.asarray(seg), scale=0.25)
  assert out.shape == (B, T, 3, 12) and out.dtype == jnp.float32
  assert max_rel_err(out, _numpy_attention(*args, seg, 0.25)) < 1e-5


def _mla_setup(q_lora: bool, impl: str, dtype="float32", T=70, seed=0):
  c = tiny_config(attention_impl=impl, attention_block_size=32, dtype=dtype,
                  q_lora_rank=24 if q_lora else None)
  rng = np.random.default_rng(seed)
  seg, pos = _packed_segments(rng, 2, T)
  x = jnp.asarray(rng.normal(size=(2, T, c.hidden_size)), jnp.float32)
  mla = MLA(c)
  inputs = attention_inputs(c, jnp.asarray(pos), jnp.asarray(seg))
  params = nn.meta.unbox(mla.init(jax.random.PRNGKey(seed), x, inputs))["params"]
  w = jnp.asarray(rng.normal(size=(2, T, c.hidden_size)), jnp.float32) * (seg > 0)[..., None]  # padding: no loss

  def loss(params, x):
    out, _ = mla.apply({"params": params}, x, inputs)
    return (out.astype(jnp.float32) * w).sum()

  return params, x, jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


def _allow_cudnn_on_cpu(monkeypatch):
  """Runs the cudnn backend's arrangement through jax's XLA attention on CPU (cuDNN itself needs a GPU)."""
  monkeypatch.setitem(attention_kernels._NATIVE, "cudnn", None)
  monkeypatch.setattr(cudnn_attention, "_IMPLEMENTATION", "xla")


@pytest.mark.parametrize("q_lora", [True, False])
@pytest.mark.parametrize("impl", ["blockwise", "splash", "cudnn"])
def test_mla_output_and_every_parameter_gradient_equal_xla(impl, q_lora, monkeypatch):
  if impl == "cudnn":
    _allow_cudnn_on_cpu(monkeypatch)
  params, x, f_ref = _mla_setup(q_lora, "xla")
  with interpret_kernels(impl == "splash"):
    _, _, f = _mla_setup(q_lora, impl)
    (val, (g_params, g_x)) = f(params, x)
  (val_ref, (g_params_ref, g_x_ref)) = f_ref(params, x)
  assert abs(float(val) - float(val_ref)) <= 1e-5 * abs(float(val_ref))
  assert max_rel_err(g_x, g_x_ref) < 1e-5
  flat, flat_ref = (jax.tree_util.tree_leaves_with_path(g) for g in (g_params, g_params_ref))
  assert len(flat) == len(flat_ref) >= 8
  for (path, g), (_, g_ref) in zip(flat, flat_ref):
    assert np.any(np.asarray(g_ref) != 0), path
    assert max_rel_err(g, g_ref) < 1e-5, (jax.tree_util.keystr(path), max_rel_err(g, g_ref))


def test_blockwise_in_bfloat16_is_as_close_to_float32_as_xla_in_bfloat16():
  """Stated bound: in bfloat16 compute the output and the gradients stay within 2e-2 (relative to the largest
  value) of float32, and blockwise's error is at most 1.5x the einsum form's (it accumulates in float32; on CPU
  its tiles compute in float32 altogether, so there this checks the casts around it)."""
  params, x, f32 = _mla_setup(True, "xla", "float32")
  errors = {}
  for impl in ("xla", "blockwise"):
    _, _, f = _mla_setup(True, impl, "bfloat16")
    val, (g_params, g_x) = f(params, x)
    val_ref, (g_params_ref, g_x_ref) = f32(params, x)
    errs = [max_rel_err(g_x, g_x_ref)] + [max_rel_err(a, b) for a, b in
                                          zip(jax.tree.leaves(g_params), jax.tree.leaves(g_params_ref))]
    errors[impl] = max(errs)
  assert errors["blockwise"] < 2e-2 and errors["xla"] < 2e-2, errors
  assert errors["blockwise"] <= 1.5 * errors["xla"], errors


def test_blockwise_skips_what_no_query_sees():
  """Tiles above the diagonal are never visited and a tile with no same-document pair is skipped: with every
  key tile's values poisoned by NaN where no query may look, the output stays finite and exact."""
  rng = np.random.default_rng(3)
  B, T = 1, 96
  seg = np.repeat(np.array([1, 2, 3], np.int32), 32)[None]  # three documents, one per 32-token tile
  qn, qr, kn, kr, v = _random_qkv(rng, B, T, H=2)
  out = blockwise_attention(qn, qr, kn, kr, v, jnp.asarray(seg), scale=0.3, block=32)
  ref = _numpy_attention(qn, qr, kn, kr, v, seg, 0.3)
  assert max_rel_err(out, ref) < 1e-5
  # The third document's keys hold NaN: document 1 and 2's tiles must not touch them, nor the other way round.
  out_nan = blockwise_attention(qn, qr, kn.at[:, 64:].set(jnp.nan), kr, v, jnp.asarray(seg), scale=0.3, block=32)
  assert np.all(np.isfinite(np.asarray(out_nan[:, :64])))
  np.testing.assert_array_equal(np.asarray(out_nan[:, :64]), np.asarray(out[:, :64]))


def test_blockwise_peak_memory_is_linear_in_length():
  """Compiled temp memory of forward+backward: the einsum form holds [T, T] scores, blockwise (256-token tiles)
  grows linearly with T and stays under 1/8 of one layer's scores at T=4096."""
  B, H = 1, 4

  def temp_bytes(fn, T):
    args = [jax.ShapeDtypeStruct(s, jnp.float32) for s in ((B, T, H, 32), (B, T, H, 16), (B, T, H, 32), (B, T, 16),
                                                           (B, T, H, 32))]
    g = jax.jit(jax.grad(lambda *a: fn(*a).sum(), argnums=(0, 1, 2, 3, 4)))
    return g.lower(*args, jax.ShapeDtypeStruct((B, T), jnp.int32)).compile().memory_analysis().temp_size_in_bytes

  def dense(qn, qr, kn, kr, v, s):
    T = qn.shape[1]
    visible = (s[:, :, None] == s[:, None, :]) & jnp.tri(T, dtype=bool)[None]
    sc = (jnp.einsum("bthn,bshn->bhts", qn, kn) + jnp.einsum("bthr,bsr->bhts", qr, kr)) * 0.2
    return jnp.einsum("bhts,bsha->btha", jax.nn.softmax(jnp.where(visible[:, None], sc, -1e30), -1), v)

  blockwise = lambda *a: blockwise_attention(*a, scale=0.2, block=256)  # noqa: E731
  scores_bytes = B * H * 4096 * 4096 * 4
  assert temp_bytes(dense, 4096) > scores_bytes
  small, large = temp_bytes(blockwise, 2048), temp_bytes(blockwise, 4096)
  assert large < scores_bytes / 8, (large, scores_bytes)
  assert large < 2.5 * small, (small, large)


def test_model_trains_to_the_same_losses_with_every_cpu_backend(monkeypatch):
  """Five AdamW steps of the debug model cut to 2 layers (1 dense + 1 MoE, and the MTP block) on packed batches:
  losses equal xla's to 1e-4 relative."""
  import optax

  from moe_jax.model import Transformer
  from moe_jax.training.loss import training_loss

  rng = np.random.default_rng(5)
  seg, pos = _packed_segments(rng, 4, 48)
  tokens = jnp.asarray(rng.integers(1, 200, size=seg.shape), jnp.int32)
  seg, pos = jnp.asarray(seg), jnp.asarray(pos)
  _allow_cudnn_on_cpu(monkeypatch)

  def losses(impl):
    c = tiny_config(attention_impl=impl, attention_block_size=16, num_hidden_layers=2)
    model = Transformer(c)
    with interpret_kernels(impl == "splash"):
      variables = nn.meta.unbox(model.init(jax.random.PRNGKey(0), tokens[:1, :4]))
    tx = optax.adamw(3e-3)

    def loss_fn(params):
      logits, aux = model.apply({**variables, "params": params}, tokens, seg, pos)
      return training_loss(logits, aux, {"tokens": tokens, "segment_ids": seg}, 0.3)[0]

    @jax.jit
    def step(params, opt):
      loss, g = jax.value_and_grad(loss_fn)(params)
      updates, opt = tx.update(g, opt, params)
      return optax.apply_updates(params, updates), opt, loss

    params, opt, out = variables["params"], tx.init(variables["params"]), []
    with interpret_kernels(impl == "splash"):
      for _ in range(5):
        params, opt, loss = step(params, opt)
        out.append(float(loss))
    return np.array(out)

  ref = losses("xla")
  assert ref[-1] < ref[0]
  for impl in ("blockwise", "cudnn", "splash"):
    np.testing.assert_allclose(losses(impl), ref, rtol=1e-4, err_msg=impl)


def test_backend_that_cannot_run_here_is_refused_naming_the_platform():
  c = tiny_config(attention_impl="flash")
  with pytest.raises(ValueError, match=r"attention_impl='flash' is not one of \('auto', 'xla', 'blockwise'"):
    validate_model_config(c)
  with pytest.raises(ValueError, match=r"'cudnn' cannot run on platform 'cpu' \(it needs gpu\)"):
    attention_kernels.resolve_attention("cudnn", platform="cpu")
  with pytest.raises(ValueError, match=r"'splash' cannot run on platform 'cpu' \(it needs tpu\).*interpret"):
    attention_kernels.resolve_attention("splash", platform="cpu")
  assert attention_kernels.resolve_attention("splash", platform="cpu", interpret=True) == "splash"
  assert attention_kernels.resolve_attention("auto", platform="tpu") == "splash"
  assert attention_kernels.resolve_attention("auto", platform="cpu") == "blockwise"
  # In a model: raised while tracing the first call, before any compile.
  from moe_jax.model import Transformer
  c = tiny_config(attention_impl="cudnn")
  with pytest.raises(ValueError, match="cannot run on platform 'cpu'"):
    jax.eval_shape(Transformer(c).init, jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))
