"""moe_jax: DeepSeek-V3-style Mixture-of-Experts language models in JAX/Flax.

Layers (bottom to top): config -> kernels -> layers -> model -> interop / (training, inference) -> entry points.
"""

__version__ = "0.1.0"
