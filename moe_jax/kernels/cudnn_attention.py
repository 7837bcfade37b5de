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

_IMPLEMENTATION = "cudnn"  # tests set "xla" to check the arrangement on CPU


def cudnn_attention(q_nope_BTHN, q_rope_BTHR, k_nope_BTHN, k_rope_BTR, v_BTHA, segment_ids_BT, *, scale: float,
                    implementation: str | None = None):
  B, T, H, _ = q_nope_BTHN.shape
  A = v_BTHA.shape[-1]
  q_BTHK = jnp.concatenate([q_nope_BTHN, q_rope_BTHR], axis=-1)
  k_rope_BTHR = jnp.broadcast_to(k_rope_BTR[:, :, None, :], (B, T, H, k_rope_BTR.shape[-1]))
  k_BTHK = jnp.concatenate([k_nope_BTHN, k_rope_BTHR.astype(k_nope_BTHN.dtype)], axis=-1)
  width = q_BTHK.shape[-1]
  if width < A:
    raise ValueError(f"cudnn attention pads v to the q/k head dim; v_head_dim={A} exceeds it ({width})")
  v_BTHK = jnp.pad(v_BTHA, ((0, 0), (0, 0), (0, 0), (0, width - A)))
  same_doc_B1TT = (segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :])[:, None]
  o_BTHK = jax.nn.dot_product_attention(q_BTHK, k_BTHK, v_BTHK, mask=same_doc_B1TT, scale=scale, is_causal=True,
                                        implementation=implementation or _IMPLEMENTATION)
  return o_BTHK[..., :A]
