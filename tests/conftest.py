"""Test setup: CPU only, float32 matmuls at full precision, and a few shared helpers."""

import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Tests are dominated by XLA compile time on small shapes: the cheapest CPU backend optimisation level makes the
# suite faster overall (measured: the 120-step loss-free-balancing test 84 s -> 63 s). Subprocesses inherit it.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true").strip()
# Make `configs` importable as a package from the repository root.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

from moe_jax.host_memory import keep_host_memory  # noqa: E402

keep_host_memory()  # as the entry points: freed step buffers are reused, not page-faulted in again
