"""Small name -> function registries, so configs choose variants by name."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

__all__ = ["Registry"]


class Registry:
    """A mapping from names to functions; an unknown name is an error listing the known ones."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, Callable[..., Any]] = {}

    def register(self, name: str, fn: Callable[..., Any] | None = None):
        """Registers ``fn`` under ``name``; usable as a decorator."""

        def add(f):
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = f
            return f

        return add(fn) if fn is not None else add

    def get(self, name: str) -> Callable[..., Any]:
        try:
            return self._items[name]
        except (KeyError, TypeError):
            raise ValueError(
                f"unknown {self.kind} {name!r}; known: {', '.join(self.names())}"
            ) from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
