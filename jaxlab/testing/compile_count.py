"""Counting XLA compilations, to test that shapes are bucketed and nothing retraces."""

from __future__ import annotations

import contextlib
import logging

import jax

__all__ = ["count_compilations"]


class _Counter(logging.Handler):
    def __init__(self):
        super().__init__(level=logging.DEBUG)
        self.names: list[str] = []

    def emit(self, record):
        msg = record.getMessage()
        if msg.startswith("Compiling "):
            self.names.append(msg.split(" ")[1])


@contextlib.contextmanager
def count_compilations():
    """Yields a list that collects the names of functions compiled inside the block."""
    handler = _Counter()
    logger = logging.getLogger("jax")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        with jax.log_compiles(True):
            yield handler.names
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
