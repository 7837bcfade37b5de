"""Varying-manual-axes (vma) bookkeeping for kernels that run inside `jax.shard_map`.

Inside shard_map every value carries the mesh axes it varies over. A loop's carry must vary over the same axes as
its body's output, and a custom_vjp's cotangents over the same axes as its inputs. Both hold if a kernel's
differentiable inputs are first cast to the union of their axes (`match_varying`, whose transpose JAX derives:
a psum over the added axes) and loop carries start from `zeros_varying`. Outside shard_map these are no-ops.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def varying_axes(x) -> frozenset:
  """Mesh axes x varies over (empty outside shard_map). jax 0.10 keeps them in `aval.manual_axis_type.varying`;
  other versions in `aval.vma`."""
  aval = jax.typeof(x)
  mat = getattr(aval, "manual_axis_type", None)
  if mat is not None and hasattr(mat, "varying"):
    return frozenset(mat.varying)
  return frozenset(getattr(aval, "vma", None) or ())


def cast_varying(x, axes: frozenset):
  """x cast to vary over `axes` too (a no-op for the axes it already varies over)."""
  missing = frozenset(axes) - varying_axes(x)
  return jax.lax.pcast(x, tuple(sorted(missing)), to="varying") if missing else x


def match_varying(*xs):
  """Each of xs cast to vary over the union of their varying axes."""
  axes = frozenset().union(*(varying_axes(x) for x in xs))
  return tuple(cast_varying(x, axes) for x in xs) if axes else xs


def zeros_varying(shape, dtype, *operands):
  """Zeros that vary over every axis any of `operands` varies over: a loop carry typed like the body's output."""
  return cast_varying(jnp.zeros(shape, dtype), frozenset().union(*(varying_axes(x) for x in operands)))
