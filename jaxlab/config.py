"""Typed dataclass configs, loaded from YAML with dotted command-line overrides.

Every experiment config is a (possibly nested) dataclass whose ``__post_init__`` validates its own
fields. A YAML file maps onto it key by key:

    kind: lm_train          # which registered config class the file holds
    model:
      num_layers: 2
    train:
      lr: 1.0e-3

and ``--set train.lr=1e-5`` overrides one leaf, its value parsed as YAML (so ``1e-5``, ``true``,
``[1, 2]`` and ``null`` all work). An unknown key, a value of the wrong type or a value that fails
validation raises :class:`ConfigError` naming the dotted key, what was given and what is allowed.

The configs shipped with jaxlab (``jaxlab/configs/``, also ``configs/`` in a checkout) load by name
from any directory: ``load_config("lm_tiny")``, ``load_config("rl/tiny_sorted")``, or by their
checkout path ``load_config("configs/lm_tiny.yaml")``; a file that exists is always read as given.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml

from jaxlab.errors import ConfigError
from jaxlab.paths import configs_dir
from jaxlab.registry import Registry

T = TypeVar("T")

__all__ = [
    "ConfigError",
    "CONFIG_KINDS",
    "register_config",
    "config_kinds",
    "config_kind_of",
    "from_dict",
    "to_dict",
    "apply_overrides",
    "load_config",
    "resolve_config_path",
    "shipped_configs",
    "check",
    "check_positive",
]


# The top-level config classes by the ``kind`` a YAML file names. jaxlab's own are declared here
# by module path, so a file of any kind loads without importing its module first.
CONFIG_KINDS: Registry[type] = Registry("config kind")
CONFIG_KINDS.register_lazy("lm_train", "jaxlab.train:LMTrainConfig")
CONFIG_KINDS.register_lazy("rl_train", "jaxlab.rl.trainer:RLTrainConfig")
CONFIG_KINDS.register_lazy("rl_sdpo", "jaxlab.rl.self_distill:SDPOTrainConfig")
CONFIG_KINDS.register_lazy("rl_multiturn", "jaxlab.rl.multiturn:MultiTurnConfig")
CONFIG_KINDS.register_lazy("sft", "jaxlab.sft:SFTConfig")


def register_config(kind: str):
    """Class decorator: makes a top-level config class loadable from a YAML file with ``kind: NAME``."""
    return CONFIG_KINDS.register(kind)


def config_kinds() -> dict[str, type]:
    """The registered top-level config classes by kind name (imports the modules declaring them)."""
    return dict(CONFIG_KINDS.items())


def config_kind_of(config: Any) -> str:
    """The registered kind name of a top-level config instance."""
    for kind, cls in CONFIG_KINDS.items():
        if isinstance(config, cls):
            return kind
    raise ConfigError(f"{type(config).__name__} is not a registered config kind")


def check(condition: bool, field: str, message: str) -> None:
    """Validation helper for ``__post_init__``: raises ConfigError naming the field."""
    if not condition:
        raise ConfigError(f"{field}: {message}")


def check_positive(config: Any, *names: str) -> None:
    """``check`` that each named field of ``config`` is > 0."""
    for name in names:
        value = getattr(config, name)
        check(value > 0, name, f"must be positive, got {value}")


DTYPES = ("float32", "bfloat16", "float16", "float64")


def check_dtype(value: Any, field: str) -> None:
    """``check`` that ``value`` names a floating dtype jaxlab computes in (:data:`DTYPES`)."""
    check(value in DTYPES, field, f"{value!r} is not one of {list(DTYPES)}")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Converts a YAML value to the annotated type ``tp``, or raises ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        options = [arg for arg in args if arg is not type(None)]
        if len(options) == 1:  # Optional[X]: X's own error names the nested key
            return _convert(value, options[0], key)
        for arg in options:
            try:
                return _convert(value, arg, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: {value!r} is not a valid {_type_name(tp)}")
    if origin is typing.Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{key}: {value!r} is not one of {list(allowed)}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping for {tp.__name__}, got {value!r}")
        return _from_mapping(tp, value, prefix=key + ".")
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{key}: expected {len(args)} items, got {len(value)}")
            return tuple(_convert(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(args, value)))
        item_tp = args[0] if args else Any
        items = [_convert(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        _, vt = typing.get_args(tp) or (Any, Any)
        return {str(k): _convert(v, vt, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-5" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{key}: expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{key}: expected {tp.__name__}, got {value!r}")
    return value


def _from_mapping(cls: type[T], data: Mapping[str, Any], prefix: str = "") -> T:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        raise ConfigError(
            f"unknown key {prefix}{unknown[0]!s} for {cls.__name__}; "
            f"known keys: {', '.join(sorted(fields))}"
        )
    kwargs = {name: _convert(val, hints[name], prefix + name) for name, val in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{prefix}{e}") from None
    except TypeError as e:  # a required field is missing
        raise ConfigError(f"{prefix.rstrip('.') or cls.__name__}: {e}") from None


def from_dict(cls: type[T], data: Mapping[str, Any], *, prefix: str = "") -> T:
    """Builds config ``cls`` from a nested mapping, validating keys, types and values.

    ``prefix`` (e.g. ``"model.ring."``) starts the dotted keys that error messages name.
    """
    return _from_mapping(cls, data, prefix=prefix)


def to_dict(config: Any) -> dict[str, Any]:
    """The nested plain-dict form of a config (for YAML, JSON metrics headers, checkpoints)."""
    out = dataclasses.asdict(config)

    def plain(x):
        if isinstance(x, tuple):
            return [plain(v) for v in x]
        if isinstance(x, list):
            return [plain(v) for v in x]
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        return x

    return plain(out)


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.path=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not p for p in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {key}: cannot parse value {raw!r}: {e}") from None
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Applies ``a.b.c=value`` overrides to a nested dict (in place) and returns it."""
    for text in overrides:
        path, value = _parse_override(text)
        node = data
        for i, part in enumerate(path[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise ConfigError(
                    f"override {'.'.join(path)}: {'.'.join(path[: i + 1])} is not a section"
                )
            node = child
        node[path[-1]] = value
    return data


def shipped_configs() -> list[str]:
    """Names of the configs shipped with jaxlab, e.g. ``["lm_tiny", ..., "rl/tiny_sorted"]``."""
    root = configs_dir()
    return sorted(p.relative_to(root).with_suffix("").as_posix() for p in root.rglob("*.yaml"))


def resolve_config_path(path: str | Path) -> Path:
    """The config file ``path`` names: the file itself when it exists, else the shipped config of
    that name (``"lm_tiny"``, ``"rl/tiny_sorted.yaml"`` or ``"configs/rl/tiny_sorted.yaml"``).
    Raises ConfigError listing the shipped names when neither exists."""
    given = Path(path)
    if given.is_file():
        return given
    if not given.is_absolute():
        parts = given.parts[1:] if given.parts[:1] == ("configs",) else given.parts
        if parts:
            name = Path(*parts)
            candidate = configs_dir() / (
                name if name.suffix == ".yaml" else name.parent / f"{name.name}.yaml"
            )
            if candidate.is_file():
                return candidate
    raise ConfigError(
        f"config file {path} does not exist (nor a shipped config of that name; shipped: "
        f"{', '.join(shipped_configs())})"
    )


def load_config(
    path: str | Path | None = None,
    overrides: Iterable[str] = (),
    *,
    cls: type[T] | None = None,
) -> T:
    """Loads a config from a YAML file (or only from defaults) and applies dotted overrides.

    Args:
      path: a YAML file, or the name of a shipped config (:func:`resolve_config_path`); its
        ``kind`` key selects the registered class unless ``cls`` is given.
      overrides: ``key.path=value`` strings, applied in order.
      cls: the config class; required when ``path`` is None.
    """
    data: dict[str, Any] = {}
    if path is not None:
        path = resolve_config_path(path)
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(
                f"{path}: the top level must be a mapping, got {type(loaded).__name__}"
            )
        data = loaded
    kind = data.pop("kind", None)
    known = ", ".join(CONFIG_KINDS.names())
    if cls is None:
        if kind is None:
            raise ConfigError(f"{path}: missing 'kind'; known kinds: {known}")
        if kind not in CONFIG_KINDS:
            raise ConfigError(f"{path}: unknown kind {kind!r}; known kinds: {known}")
        cls = CONFIG_KINDS.get(kind)
    elif kind is not None and kind in CONFIG_KINDS and CONFIG_KINDS.get(kind) is not cls:
        raise ConfigError(f"{path}: holds kind {kind!r}, but a {cls.__name__} was asked for")
    apply_overrides(data, overrides)
    try:
        return from_dict(cls, data)
    except ConfigError as e:
        where = f"{path}: " if path is not None else ""
        raise ConfigError(f"{where}{e}") from None
