"""chatgot_jax: a JAX/Flax reimplementation of ChatGoT, a character-level GPT."""

__version__ = "0.1.0"
