"""chatgot_jax: a JAX/Flax reimplementation of ChatGoT, a character-level GPT."""

import os

# XLA:CPU's YNNPACK fusions ran this model's train step ~15% slower than XLA's
# own dot emitters on the project's CPU machines (python -m chatgot_jax.bench);
# they are turned off unless the user's XLA_FLAGS already choose. The flag only
# concerns the CPU backend and must be set before JAX starts its backends.
if "xla_cpu_experimental_ynn_fusion_type" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_cpu_experimental_ynn_fusion_type=").strip()

__version__ = "0.1.0"
