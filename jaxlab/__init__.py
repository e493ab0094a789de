"""jaxlab: JAX/Flax reimplementations of recent research systems (see the README).

Import the areas you use (``jaxlab.models``, ``jaxlab.generation``, ``jaxlab.rl``, ...); importing
``jaxlab`` itself loads nothing heavy and changes no JAX setting. ``jaxlab.__version__`` is the
installed distribution's version, or the checkout's ``pyproject.toml`` version when jaxlab runs
from a source tree that is not installed.
"""

from __future__ import annotations

import functools

__all__ = ["__version__"]


@functools.cache
def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("jaxlab")
    except metadata.PackageNotFoundError:
        import tomllib
        from pathlib import Path

        pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
        return tomllib.loads(pyproject.read_text())["project"]["version"]


def __getattr__(name: str):
    if name == "__version__":  # read lazily: package metadata lookups cost a few ms
        return _version()
    raise AttributeError(f"module 'jaxlab' has no attribute {name!r}")
