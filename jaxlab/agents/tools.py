"""Tools with declared effects, calls in canonical form, and the state tools act on.

Every tool declares its **effect**:

- ``read_only``: reads its state and changes nothing (``ls``, ``get_stock_info``, a web search);
- ``idempotent``: changes its state, and calling it again with the same arguments changes nothing
  more (``lockDoors``, ``set_budget_limit``);
- ``mutating``: any other change (``mv``, ``place_order``, ``send_message``, a shell command).

Speculation relies on this: a ``read_only`` tool may run early on the real state; anything else
runs early only on a deep copy of its state (``state_key`` names it in the :class:`ToolState`),
which replaces the real one only when the model's real call matches; a non-read-only tool with
no copyable state is never run early.

A call is compared in canonical form (:meth:`ToolRegistry.canonical`): positional arguments bound
to their parameter names, defaults filled in from the tool's signature, and the arguments
serialised as JSON with sorted keys, so ``sort('a.txt')`` and ``sort(file_name='a.txt')`` are the
same call.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import enum
import inspect
import json
import random
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from jaxlab.agents.latency import LatencyModel
from jaxlab.errors import UnknownNameError, UserError

__all__ = [
    "Effect",
    "Tool",
    "ToolCall",
    "ToolOutput",
    "ToolRegistry",
    "ToolState",
    "ToolCallError",
    "fingerprint",
    "render_output",
    "output_status",
]


class Effect(enum.StrEnum):
    READ_ONLY = "read_only"
    IDEMPOTENT = "idempotent"
    MUTATING = "mutating"


class ToolCallError(UserError):
    """A call names no registered tool or gives arguments its tool does not take."""


@dataclasses.dataclass(frozen=True)
class ToolCall:
    """One call: a tool name and its arguments (a JSON object)."""

    name: str
    arguments: Mapping[str, Any]

    @property
    def key(self) -> str:
        """``name`` + the arguments as JSON with sorted keys (compare canonical calls by it)."""
        return self.name + json.dumps(dict(self.arguments), sort_keys=True, default=str)

    def __str__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.arguments.items())
        return f"{self.name}({args})"


@dataclasses.dataclass(frozen=True)
class Tool:
    """A callable tool.

    Args:
      name: the function name the model calls.
      fn: ``fn(state, **arguments)`` when ``state_key`` is set, else ``fn(**arguments)``; returns
        a JSON-able value (a dict with an ``"error"`` key, or an exception, is an error status).
      effect: see the module docstring.
      state_key: the :class:`ToolState` entry the tool acts on (None: no state of ours).
      description, parameters: the OpenAI function schema's parts (what the model is shown).
      latency: an injected latency model (None: the call takes what ``fn`` takes).
      signature: used to bind positional arguments and fill defaults (default: ``fn``'s without
        the state parameter).
    """

    name: str
    fn: Callable[..., Any]
    effect: Effect
    state_key: str | None = None
    description: str = ""
    parameters: Mapping[str, Any] | None = None
    latency: LatencyModel | None = None
    signature: inspect.Signature | None = None

    def __post_init__(self):
        object.__setattr__(self, "effect", Effect(self.effect))
        if self.signature is None:
            try:
                sig = inspect.signature(self.fn)
            except (TypeError, ValueError):
                sig = None
            if sig is not None and self.state_key is not None:
                params = list(sig.parameters.values())[1:]
                sig = sig.replace(parameters=params)
            object.__setattr__(self, "signature", sig)

    @property
    def copyable(self) -> bool:
        """Whether early runs may use a copy of the tool's state (it has one)."""
        return self.state_key is not None

    def schema(self) -> dict[str, Any]:
        """The ``{"type": "function", "function": {...}}`` entry of a chat request's ``tools``."""
        fn: dict[str, Any] = {"name": self.name}
        if self.description:
            fn["description"] = self.description
        fn["parameters"] = dict(self.parameters or {"type": "object", "properties": {}})
        return {"type": "function", "function": fn}


@dataclasses.dataclass
class ToolOutput:
    """What a call returned: the value, its status ("ok" / "error") and the text the model sees."""

    value: Any
    status: str
    text: str


def render_output(value: Any) -> str:
    """The text of a tool result, as BFCL renders it: strings as they are, dicts as JSON."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict | list):
        try:
            return json.dumps(value)
        except (TypeError, ValueError):
            return str(value)
    return str(value)


def output_status(value: Any) -> str:
    return "error" if isinstance(value, dict) and "error" in value else "ok"


class ToolRegistry:
    """Tools by name; canonical calls; schemas for the chat request."""

    def __init__(self, tools: Sequence[Tool] = ()):
        self._tools: dict[str, Tool] = {}
        for t in tools:
            self.add(t)

    def add(self, tool: Tool) -> Tool:
        if tool.name in self._tools:
            raise ValueError(f"tool {tool.name!r} is registered twice")
        self._tools[tool.name] = tool
        return tool

    def get(self, name: str) -> Tool:
        try:
            return self._tools[name]
        except KeyError:
            raise UnknownNameError(
                f"unknown tool {name!r}; known: {', '.join(sorted(self._tools))}"
            ) from None

    def __contains__(self, name: object) -> bool:
        return name in self._tools

    def __iter__(self):
        return iter(self._tools.values())

    def __len__(self) -> int:
        return len(self._tools)

    def names(self) -> list[str]:
        return sorted(self._tools)

    def schemas(self) -> list[dict[str, Any]]:
        return [t.schema() for t in self._tools.values()]

    def canonical(
        self,
        name: str,
        arguments: Mapping[str, Any] | Sequence[Any] = (),
        keywords: Mapping[str, Any] | None = None,
    ) -> ToolCall:
        """The canonical call: positional ``arguments`` (a sequence) bound to names, keyword ones
        (a mapping, or ``keywords``) checked against the tool's signature, defaults filled in.

        Raises :class:`ToolCallError` for an unknown tool or arguments it does not take.
        """
        if name not in self._tools:
            raise ToolCallError(f"no tool named {name!r}; known: {', '.join(self.names())}")
        tool = self._tools[name]
        if isinstance(arguments, Mapping):
            args, kwargs = (), {**arguments, **(keywords or {})}
        else:
            args, kwargs = tuple(arguments), dict(keywords or {})
        sig = tool.signature
        if sig is None:
            if args:
                raise ToolCallError(f"{name} takes keyword arguments only")
            return ToolCall(name, dict(sorted(kwargs.items())))
        try:
            bound = sig.bind(*args, **kwargs)
        except TypeError as e:
            raise ToolCallError(f"bad arguments for {name}: {e}") from None
        bound.apply_defaults()
        return ToolCall(name, dict(sorted(bound.arguments.items())))


class ToolState:
    """The named state objects a task's tools act on, each with a version that counts the changes
    made to it; one lock per object serialises the calls on it.

    ``versions[key]`` rises by one whenever a non-read-only call runs on the real object or a
    speculative copy replaces it, so a result computed at version v is valid while the version is
    still v.
    """

    def __init__(self, objects: Mapping[str, Any] | None = None):
        self.objects: dict[str, Any] = dict(objects or {})
        self.versions: dict[str, int] = dict.fromkeys(self.objects, 0)
        self.locks: dict[str, threading.RLock] = {k: threading.RLock() for k in self.objects}

    def __contains__(self, key: object) -> bool:
        return key in self.objects

    def copy_of(self, key: str) -> tuple[Any, int]:
        """A deep copy of one object and the version it was taken at."""
        with self.locks[key]:
            return copy.deepcopy(self.objects[key]), self.versions[key]

    def replace(self, key: str, obj: Any, version: int) -> bool:
        """Puts ``obj`` in place of the real object if the real one is still at ``version``;
        returns whether it did."""
        with self.locks[key]:
            if self.versions[key] != version:
                return False
            self.objects[key] = obj
            self.versions[key] += 1
            return True

    def fingerprint(self) -> str:
        """A canonical text of every object's state (see :func:`fingerprint`)."""
        return json.dumps({k: fingerprint(v) for k, v in sorted(self.objects.items())})


def fingerprint(obj: Any, _seen: dict[int, str] | None = None, _path: str = "$") -> Any:
    """A JSON-able canonical form of an object's state, for equality checks.

    Walks objects' attributes (public and private), dicts, lists, tuples and sets; a
    ``random.Random`` is its generator state; timestamps (``datetime``) are left out, since they
    record when a change happened, not what it was; an object met again is named by its first path
    (back references such as a directory's parent).
    """
    seen = {} if _seen is None else _seen
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    if isinstance(obj, datetime.datetime | datetime.date):
        return "<time>"
    if isinstance(obj, random.Random):
        return ["<random>", repr(obj.getstate())]
    if id(obj) in seen:
        return ["<ref>", seen[id(obj)]]
    seen[id(obj)] = _path
    if isinstance(obj, Mapping):
        return {
            str(k): fingerprint(v, seen, f"{_path}.{k}")
            for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))
        }
    if isinstance(obj, list | tuple):
        return [fingerprint(v, seen, f"{_path}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, set | frozenset):
        return sorted((fingerprint(v, seen, _path + "{}") for v in obj), key=repr)
    if hasattr(obj, "__dict__"):
        attrs = vars(obj)
        return {
            "<class>": type(obj).__name__,
            **{
                k: fingerprint(v, seen, f"{_path}.{k}")
                for k, v in sorted(attrs.items())
                if not callable(v) or isinstance(v, random.Random)
            },
        }
    return repr(obj)
