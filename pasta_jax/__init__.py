"""pasta_jax: JAX/Flax implementation of PASTA (Preference Adaptive and Sequential Text-to-image Agent)."""

__version__ = "0.1.0"
