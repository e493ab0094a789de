"""The one name -> variant table every area uses (losses, layouts, schedulers, models, config kinds).

Variants are chosen by name (``mode="delta_l"``, ``layout="striped"``): each area keeps a
:class:`Registry` of them, and command-line ``choices``, config validation and error messages all
read the names from it, so a new variant registered in one place is known everywhere.

    LAYOUTS = Registry("ring layout")

    @LAYOUTS.register("striped")
    def _striped(num_blocks, world): ...

    LAYOUTS.get("spiral")  # UnknownNameError: unknown ring layout 'spiral'; known: contiguous, ...

An entry may also be declared lazily as ``"package.module:attribute"``: the name is known at once
(for ``--help`` and validation) and the module is imported only when the entry is first used, so
no registration depends on which modules happen to have been imported.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar, overload

from jaxlab.errors import ConfigError, UnknownNameError

__all__ = ["Registry"]

T = TypeVar("T")


class Registry(Generic[T]):
    """A mapping from names to values; an unknown name is an error listing the known ones.

    Args:
      kind: what the entries are, in words ("ring layout"); error messages use it.
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}
        self._lazy: dict[str, str] = {}

    @overload
    def register(self, name: str) -> Callable[[T], T]: ...

    @overload
    def register(self, name: str, value: T) -> T: ...

    def register(self, name: str, value: Any = None) -> Any:
        """Registers ``value`` under ``name`` and returns it; without ``value``, a decorator.

        A name holds one value: registering another under it is an error, registering the same one
        again does nothing. A value that a lazy declaration of the same name points to (same module
        and qualified name) takes the declaration's place.
        """

        def add(v):
            if not isinstance(name, str) or not name:
                raise TypeError(f"{self.kind} names are non-empty strings, got {name!r}")
            if self._items.get(name) is v:
                return v
            if name in self._lazy and self._lazy[name] == _target_of(v):
                del self._lazy[name]
            elif name in self:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = v
            return v

        return add(value) if value is not None else add

    def register_lazy(self, name: str, target: str) -> None:
        """Declares ``name`` as the attribute ``target = "package.module:attribute"``, imported on
        first use."""
        module, sep, attr = target.partition(":")
        if not sep or not module or not attr:
            raise ValueError(f"lazy {self.kind} {name!r}: target must be 'module:attribute'")
        if name in self:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._lazy[name] = target

    def get(self, name: str) -> T:
        """The value registered under ``name``; :class:`UnknownNameError` listing the known names
        otherwise."""
        try:
            return self._items[name]
        except (KeyError, TypeError):
            pass
        if isinstance(name, str) and name in self._lazy:
            target = self._lazy[name]
            module, _, attr = target.partition(":")
            value = importlib.import_module(module)
            for part in attr.split("."):
                value = getattr(value, part)
            self._lazy.pop(name, None)  # importing the module may have registered it already
            self._items.setdefault(name, value)
            return self._items[name]
        raise UnknownNameError(f"unknown {self.kind} {name!r}; known: {', '.join(self.names())}")

    def check(self, name: Any, field: str) -> None:
        """Config validation: raises :class:`~jaxlab.errors.ConfigError` naming ``field`` when
        ``name`` is not registered."""
        if name not in self:
            raise ConfigError(
                f"{field}: {name!r} is not one of the registered {self.kind} names: "
                f"{', '.join(self.names())}"
            )

    def names(self) -> list[str]:
        """The registered names, sorted (the CLI's ``choices``)."""
        return sorted([*self._items, *self._lazy])

    def items(self) -> list[tuple[str, T]]:
        """``(name, value)`` pairs in name order (imports lazy entries)."""
        return [(n, self.get(n)) for n in self.names()]

    def __contains__(self, name: object) -> bool:
        try:
            return name in self._items or name in self._lazy
        except TypeError:  # unhashable
            return False

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items) + len(self._lazy)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self.names())})"


def _target_of(value: Any) -> str | None:
    module, qualname = getattr(value, "__module__", None), getattr(value, "__qualname__", None)
    return f"{module}:{qualname}" if module and qualname else None
