"""The layered house, checked from the source: nothing imports upward, and inference drives the model without
reaching into its layers or the training code (so decoding cannot grow a second copy of a block)."""

import ast
import os

import pytest

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "moe_jax")
# Bottom to top (README "Layering"); a module may import from its own rank and below.
RANK = {"config": 0, "host_memory": 0, "platforms": 0, "kernels": 1, "sharding": 1, "layers": 2, "model": 3, "data": 4, "training": 4,
        "inference": 4, "interop": 4, "planning": 4, "restore": 5, "cli": 5, "aot": 5, "train": 6, "generate": 6, "perplexity": 6,
        "summary": 6, "export": 6, "compile": 6}
FORBIDDEN = {"inference": {"layers", "training"}, "data": {"training", "inference"}}


def _imports(path):
  """moe_jax subpackages a file imports, at module level or inside functions."""
  out = set()
  for node in ast.walk(ast.parse(open(path).read())):
    names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
        [node.module] if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 else [])
    out |= {n.split(".")[1] for n in names if n.startswith("moe_jax.")}
  return out


def _modules():
  for root, _, files in os.walk(PACKAGE):
    for f in files:
      if f.endswith(".py") and f != "__init__.py" or root != PACKAGE and f == "__init__.py":
        rel = os.path.relpath(os.path.join(root, f), PACKAGE)
        yield rel, rel.split(os.sep)[0].removesuffix(".py")


@pytest.mark.parametrize("rel,unit", sorted(_modules()))
def test_no_upward_or_forbidden_imports(rel, unit):
  assert unit in RANK, f"{rel}: add {unit!r} to the layering table (README 'Layering')"
  for target in _imports(os.path.join(PACKAGE, rel)) - {unit}:
    assert RANK[target] <= RANK[unit], f"{rel} ({unit}) imports moe_jax.{target}, a layer above it"
    assert target not in FORBIDDEN.get(unit, ()), f"{rel} ({unit}) must not import moe_jax.{target}"
