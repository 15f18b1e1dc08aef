"""chatgot_jax: a JAX/Flax reimplementation of ChatGoT, a character-level GPT.

Importing the package has no side effects on the process; the command-line
entry points apply the CPU tuning of chatgot_jax.cpu_tuning explicitly.
"""

__version__ = "0.1.0"
