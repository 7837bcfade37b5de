"""Test setup: CPU only, float32 matmuls at full precision, and a few shared helpers."""

import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Make `configs` importable as a package from the repository root.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
