"""Kernels: the grouped matmul behind every routed-expert computation, and the permutes around it.

`gmm(lhs_MI, rhs_EIO, group_sizes_E, backend=...)` multiplies consecutive row blocks of `lhs_MI` (rows sorted
by expert, `group_sizes_E[e]` rows for expert e) by their expert's matrix `rhs_EIO[e]`; `tgmm` is its weight
gradient. Backends are named in `BACKENDS` (`SIMULATABLE`: those that also run on CPU, Pallas ones in interpret
mode); "auto" picks the validated default for the current platform. `attention` holds the attention backends.
`layout` maps token-copies to buffer slots (rows, expert-aligned tiles, or fixed-capacity groups);
`permute`/`unpermute` move rows between tokens and slots with gather-only gradients; `tile_gmm` is the portable
matmul on the tiles layout.
"""

from moe_jax.kernels.gmm import BACKENDS, SIMULATABLE, gmm, interpret_kernels, resolve_backend, tgmm
from moe_jax.kernels.layout import Layout, capacity_layout, live_tiles, rows_layout, tile_rows_for, tiles_layout
from moe_jax.kernels.permute import permute, unpermute
from moe_jax.kernels.xla_tiled import tile_gmm

__all__ = ["BACKENDS", "SIMULATABLE", "Layout", "gmm", "interpret_kernels", "live_tiles", "permute", "resolve_backend",
           "capacity_layout", "rows_layout", "tgmm", "tile_gmm", "tile_rows_for", "tiles_layout", "unpermute"]
