"""chatgot_jax: a JAX/Flax reimplementation of ChatGoT, a character-level GPT.

    import chatgot_jax
    chatgot_jax.train(variant="tiny", out="runs/nb", max_steps=200)   # -> summary dict
    model = chatgot_jax.load("runs/nb")                               # chatgot_jax.api.Model
    model.generate("HAMLET: ", max_new_tokens=200)[0]

Importing the package has no side effects on the process and does not import
JAX (the API imports it on first use); the command-line entry points apply the
CPU tuning of chatgot_jax.cpu_tuning explicitly.
"""

__version__ = "0.1.0"

from chatgot_jax.api import Model, load, train  # noqa: E402
__all__ = ["Model", "load", "train", "__version__"]
