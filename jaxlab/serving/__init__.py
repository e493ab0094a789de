"""An OpenAI-compatible server over the generation Engine (chat and text completions, streaming,
tool calls). :mod:`jaxlab.serving.tools` holds the tool-call prompt format and its parsers.

Layout (one module per concern, in the manner of vLLM's entrypoints):

- :mod:`~jaxlab.serving.server`: :func:`serve` (what ``python -m jaxlab serve`` runs),
  :class:`BackgroundServer` (a server in a thread) and :func:`create_state` (model, Engine,
  engine loop, metrics);
- :mod:`~jaxlab.serving.app`: :func:`build_app`, the FastAPI routes, API key and lifespan;
- :mod:`~jaxlab.serving.serving_chat` / :mod:`~jaxlab.serving.serving_completions`: the two
  generation endpoints; :mod:`~jaxlab.serving.base` what they share;
- :mod:`~jaxlab.serving.protocol`: request models, SamplingParams mapping, response pieces;
- :mod:`~jaxlab.serving.engine_loop`: the thread that drives the Engine and feeds asyncio;
- :mod:`~jaxlab.serving.metrics` (Prometheus) and :mod:`~jaxlab.serving.errors` (OpenAI's error
  shape).

The HTTP modules import FastAPI; ``import jaxlab.serving`` and :mod:`jaxlab.serving.tools` do not,
so the names below are loaded on first use.
"""

from __future__ import annotations

import importlib

__all__ = [
    "serve",
    "BackgroundServer",
    "create_state",
    "build_app",
    "ServerState",
    "EngineLoop",
    "OpenAIError",
]

_LAZY = {
    "serve": "jaxlab.serving.server",
    "create_state": "jaxlab.serving.server",
    "BackgroundServer": "jaxlab.serving.server",
    "build_app": "jaxlab.serving.app",
    "ServerState": "jaxlab.serving.base",
    "EngineLoop": "jaxlab.serving.engine_loop",
    "OpenAIError": "jaxlab.serving.errors",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'jaxlab.serving' has no attribute {name!r}")
