"""xar-jax: xAR (next-X prediction) in JAX/Flax."""

__version__ = "0.1.0"
