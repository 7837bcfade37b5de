"""keep_host_memory: a compiled step's freed temporary buffer is reused, not mapped and page-faulted in again."""

import os
import platform
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A step whose temporary (a 64 MiB matmul result that feeds a second matmul) is freed at its end; the minor page
# faults of 10 calls after 5 warm-up calls are printed.
_PROGRAM = """
import resource, sys
sys.path.insert(0, {root!r})
from moe_jax.host_memory import keep_host_memory
applied = keep_host_memory()
import jax, jax.numpy as jnp
step = jax.jit(lambda x, w, v: jnp.tanh(x @ w) @ v)
x, w, v = (jax.random.normal(jax.random.key(i), s) for i, s in enumerate([(8192, 256), (256, 2048), (2048, 8)]))
for _ in range(5):
  step(x, w, v).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
  step(x, w, v).block_until_ready()
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(keep: str) -> tuple[bool, int]:
  env = dict(os.environ, MOE_JAX_KEEP_HOST_MEMORY=keep, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  out = subprocess.run([sys.executable, "-c", _PROGRAM.format(root=ROOT)], env=env, capture_output=True,
                       text=True, timeout=300, check=True).stdout.split()
  return out[0] == "True", int(out[1])


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc malloc only")
def test_freed_step_buffers_are_reused_not_faulted_in():
  applied, faults = _faults("1")
  opted_out, faults_default = _faults("0")
  assert applied and not opted_out
  # Without it every call maps its 64 MiB temporary afresh: 16,384 faults of 4 KiB per call (fewer where the
  # kernel backs it with huge pages). With it the heap is reused: no faults, or one growth of the heap when a call
  # allocates before the previous one has freed (seen under pytest).
  assert faults_default > 0
  assert 5 * faults <= faults_default, (faults, faults_default)
