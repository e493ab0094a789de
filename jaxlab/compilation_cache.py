"""JAX's persistent compilation cache under the jaxlab cache directory.

The ``jaxlab`` command turns it on when it starts (:func:`enable_compilation_cache` in the CLI's
``main``): a command is a short process that compiles the same prefill / decode / train steps each
time it runs, and reading them back from disk saves that compile time (see ``docs/benchmarks.md``).
Importing jaxlab as a library changes no global JAX setting; programs built on jaxlab call
:func:`enable_compilation_cache` themselves if they want the same.

* Directory: ``jaxlab.paths.cache_dir() / "jax-compilation-cache"`` (``$JAXLAB_CACHE_DIR``,
  default ``~/.cache/jaxlab``). A directory already given to JAX (``JAX_COMPILATION_CACHE_DIR`` or
  ``jax.config.update``) is left as it is.
* Kept: computations that took at least 0.1 s to compile (JAX's default is 1 s, which misses the
  ~0.5-1.5 s prefill and decode steps of a small model on a fast CPU), whatever their size; the
  directory is capped at 2 GiB, least recently used entries evicted first. JAX's own environment
  variables (``JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS``, ``JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES``,
  ``JAX_COMPILATION_CACHE_MAX_SIZE``) override these.
* Off: ``JAXLAB_COMPILATION_CACHE=0`` (or ``false`` / ``no`` / ``off``).
"""

from __future__ import annotations

import os
from pathlib import Path

from jaxlab.paths import cache_dir

__all__ = ["SWITCH_ENV", "enable_compilation_cache", "compilation_cache_enabled_by_env"]

SWITCH_ENV = "JAXLAB_COMPILATION_CACHE"

MIN_COMPILE_TIME_S = 0.1
MIN_ENTRY_SIZE_BYTES = -1  # no size floor: the compile-time floor decides what is worth keeping
MAX_SIZE_BYTES = 2 << 30

# jax option -> (jaxlab's value, the JAX environment variable that overrides it)
_SETTINGS = {
    "jax_persistent_cache_min_compile_time_secs": (
        MIN_COMPILE_TIME_S,
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS",
    ),
    "jax_persistent_cache_min_entry_size_bytes": (
        MIN_ENTRY_SIZE_BYTES,
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES",
    ),
    "jax_compilation_cache_max_size": (MAX_SIZE_BYTES, "JAX_COMPILATION_CACHE_MAX_SIZE"),
}


def compilation_cache_enabled_by_env() -> bool:
    """False when ``$JAXLAB_COMPILATION_CACHE`` is ``0``, ``false``, ``no`` or ``off``."""
    return os.environ.get(SWITCH_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def enable_compilation_cache(directory: str | Path | None = None) -> Path | None:
    """Points JAX's persistent compilation cache at ``directory`` (default: the jaxlab cache
    directory's ``jax-compilation-cache``) with the settings above; returns the directory in use,
    or None when the switch turns it off or the directory cannot be created (a read-only home).

    Call it before the first compilation: JAX reads the setting when it first compiles.
    """
    if not compilation_cache_enabled_by_env():
        return None
    import jax

    current = jax.config.jax_compilation_cache_dir
    if current:  # the user's own choice
        return Path(current)
    path = Path(directory) if directory is not None else cache_dir() / "jax-compilation-cache"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    jax.config.update("jax_compilation_cache_dir", str(path))
    for option, (value, env) in _SETTINGS.items():
        if env not in os.environ:
            jax.config.update(option, value)
    return path
