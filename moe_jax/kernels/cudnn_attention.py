"""MLA attention through jax's cuDNN fused attention (`jax.nn.dot_product_attention(implementation="cudnn")`).

cuDNN's fused kernel takes one head dim for q, k and v. MLA's q/k carry N + R dims (192 in V3), v has A (128):
q = [q^C; q^R], k = [k^C; k^R broadcast over heads], and v is zero-padded to N + R dims (the output's padded
dims are exactly zero and are sliced off). Documents of a packed row are separated by a boolean mask (cuDNN
applies it as a bias), causal order by the kernel's causal mask.

NOT YET VALIDATED ON A GPU: no GPU was lent while this was written. Tests run the same arrangement through
`implementation="xla"` on CPU (`_IMPLEMENTATION` below), which checks the padding and masking logic but not
cuDNN itself.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from moe_jax.kernels.attention import joint_qk

_IMPLEMENTATION = "cudnn"  # tests set "xla" to check the arrangement on CPU


def cudnn_attention(q_nope_BTHN, q_rope_BTHR, k_nope_BTHN, k_rope_BTR, v_BTHA, segment_ids_BT, *, scale: float,
                    implementation: str | None = None):
  implementation = implementation or _IMPLEMENTATION
  if implementation == "cudnn" and q_nope_BTHN.dtype not in (jnp.bfloat16, jnp.float16):
    # Raised while tracing, before anything compiles (cuDNN would fail later with "Unsupported dtype").
    raise ValueError(f"attention_impl='cudnn' needs config.model.dtype bfloat16 or float16, got "
                     f"{jnp.dtype(q_nope_BTHN.dtype).name}: cuDNN's fused attention has no float32 kernel; use "
                     "attention_impl='blockwise' (or 'auto') for float32")
  A = v_BTHA.shape[-1]
  q_BTHK, k_BTHK = joint_qk(q_nope_BTHN, q_rope_BTHR, k_nope_BTHN, k_rope_BTR)
  width = q_BTHK.shape[-1]
  if width < A:
    raise ValueError(f"cudnn attention pads v to the q/k head dim; v_head_dim={A} exceeds it ({width})")
  v_BTHK = jnp.pad(v_BTHA, ((0, 0), (0, 0), (0, 0), (0, width - A)))
  same_doc_B1TT = (segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :])[:, None]
  o_BTHK = jax.nn.dot_product_attention(q_BTHK, k_BTHK, v_BTHK, mask=same_doc_B1TT, scale=scale, is_causal=True,
                                        implementation=implementation)
  return o_BTHK[..., :A]
