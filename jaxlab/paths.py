"""Where jaxlab keeps its files: the one cache directory and the shipped configs.

* :func:`cache_dir`: ``$JAXLAB_CACHE_DIR``, default ``~/.cache/jaxlab``. Everything jaxlab caches
  lives under it: GGUF tokenizers (``tokenizers/``), the native CPU kernels when the package
  directory is read-only, and JAX's persistent compilation cache (``jax-compilation-cache/``).
* :func:`configs_dir`: the experiment configs installed with the package (``jaxlab/configs``);
  ``jaxlab.config.load_config`` finds them by name (``"lm_tiny"``, ``"rl/tiny_sorted"``).

No jax import here: the CLI reads these before it decides what to load.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["CACHE_DIR_ENV", "cache_dir", "configs_dir"]

CACHE_DIR_ENV = "JAXLAB_CACHE_DIR"


def cache_dir() -> Path:
    """``$JAXLAB_CACHE_DIR`` if set (and not empty), else ``~/.cache/jaxlab``. Not created here."""
    value = os.environ.get(CACHE_DIR_ENV)
    return Path(value).expanduser() if value else Path.home() / ".cache" / "jaxlab"


def configs_dir() -> Path:
    """The directory of the shipped YAML configs (package data)."""
    return Path(__file__).resolve().parent / "configs"
