"""Kernels: the grouped matmul behind every routed-expert computation.

`gmm(lhs_MK, rhs_EKN, group_sizes_E, backend=...)` multiplies consecutive row blocks of `lhs_MK` (rows sorted
by expert, `group_sizes_E[e]` rows for expert e) by their expert's matrix `rhs_EKN[e]`. Backends are named in
`BACKENDS`; "auto" picks the default for the current platform.
"""

from moe_jax.kernels.gmm import BACKENDS, gmm, resolve_backend

__all__ = ["BACKENDS", "gmm", "resolve_backend"]
