"""kd_jax: knowledge distillation toward edge devices, in JAX/Flax."""

__version__ = "0.1.0"
