"""SecurityLingua: a prompt compressor that extracts a prompt's true intention, passed to the
target model in the system prompt as a jailbreak defense (paper 10).

- :mod:`~jaxlab.security.data`: jailbreak pairs from offline packages, the reference's word
  alignment labels, statistics, percentile filter and held-out splits;
- :mod:`~jaxlab.security.compressor`: the keep/drop token classifier on a BERT-style encoder,
  its training and extraction;
- :mod:`~jaxlab.security.defense`: the server's defenses (``none``, ``self-reminder``,
  ``guardrail``, ``securitylingua``) of the chat and completions endpoints;
- :mod:`~jaxlab.security.judge`: a model judge of compliance, scored from the logits of two
  answer words through any OpenAI-compatible endpoint.

``extract_intention(texts)`` uses the compressor that ``python -m jaxlab security train`` writes
by default (``$JAXLAB_CACHE_DIR/security/compressor``), or the one given.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Sequence
from pathlib import Path

from jaxlab.errors import UserError
from jaxlab.paths import cache_dir

__all__ = [
    "extract_intention",
    "default_compressor_dir",
    "Compressor",
    "CompressorConfig",
    "TokenClassifier",
    "train_compressor",
    "make_defense",
    "DEFENSES",
    "build_dataset",
    "SecurityDataConfig",
    "ModelJudge",
]

_LAZY = {
    "Compressor": "jaxlab.security.compressor",
    "CompressorConfig": "jaxlab.security.compressor",
    "TokenClassifier": "jaxlab.security.compressor",
    "train_compressor": "jaxlab.security.compressor",
    "make_defense": "jaxlab.security.defense",
    "DEFENSES": "jaxlab.security.defense",
    "build_dataset": "jaxlab.security.data",
    "SecurityDataConfig": "jaxlab.security.data",
    "ModelJudge": "jaxlab.security.judge",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'jaxlab.security' has no attribute {name!r}")


def default_compressor_dir() -> Path:
    return cache_dir() / "security" / "compressor"


@functools.lru_cache(maxsize=4)
def _load(directory: str):
    from jaxlab.security.compressor import Compressor

    return Compressor.load(directory)


def extract_intention(
    texts: Sequence[str],
    *,
    compressor=None,
    threshold: float = 0.5,
    rate: float | None = None,
) -> list[str]:
    """The intention of each text: its words whose keep probability exceeds ``threshold`` (or,
    with ``rate``, the LLMLingua-2 share), joined by spaces. Batched over all texts' chunks and
    jitted.

    ``compressor``: a :class:`~jaxlab.security.compressor.Compressor`, a directory written by
    ``security train``, or None for :func:`default_compressor_dir`.
    """
    if isinstance(texts, str):
        raise TypeError("extract_intention expects a list of texts; wrap a single text in a list")
    if compressor is None or isinstance(compressor, str | Path):
        directory = Path(compressor) if compressor is not None else default_compressor_dir()
        if not directory.is_dir():
            raise UserError(
                f"no compressor at {directory}: train one with python -m jaxlab security train"
                + ("" if compressor is not None else " (or pass compressor=DIR)")
            )
        compressor = _load(str(directory.resolve()))
    return compressor.extract(list(texts), threshold=threshold, rate=rate)
