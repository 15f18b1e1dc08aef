"""JAX's persistent compilation cache for the command-line entry points.

train.py, sample.py, the sweep and the bench compile the same programs run after
run; with the cache a later run loads them from disk instead of recompiling.

    CHATGOT_JAX_COMPILE_CACHE unset   $XDG_CACHE_HOME/chatgot-jax/jax (~/.cache/...)
    CHATGOT_JAX_COMPILE_CACHE=DIR     that directory
    CHATGOT_JAX_COMPILE_CACHE=off     no cache

A JAX_COMPILATION_CACHE_DIR the user set already wins. The cache is JAX's own
(keyed by the program, the jax/jaxlib version, the backend and the XLA flags),
so a stale entry is never used. Applied through the environment, before JAX is
imported (cpu_tuning.prepare_process).
"""

import os

SWITCH = "CHATGOT_JAX_COMPILE_CACHE"


def cache_dir(environ=os.environ) -> str | None:
    """The directory the entry points' compilation cache uses, or None when off."""
    choice = environ.get(SWITCH, "")
    if choice == "off":
        return None
    if choice:
        return choice
    base = environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "chatgot-jax", "jax")


def use_compile_cache(environ=os.environ) -> None:
    """Sets JAX_COMPILATION_CACHE_DIR (unless set, or the switch is off)."""
    if "JAX_COMPILATION_CACHE_DIR" in environ:
        return
    path = cache_dir(environ)
    if path is not None:
        environ["JAX_COMPILATION_CACHE_DIR"] = path
