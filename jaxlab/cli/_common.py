"""What the command modules share: the command record, the help formatter, config and output
arguments."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import math
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from jaxlab.errors import UserError, check_output

__all__ = [
    "Command",
    "HelpFormatter",
    "RegistryChoices",
    "add_parser",
    "registry_option",
    "add_config_args",
    "add_dtype_arg",
    "dtype_overrides",
    "add_overwrite_arg",
    "check_outputs",
    "require_decoder",
    "positive_int",
    "non_negative_int",
    "non_negative_float",
]


@dataclasses.dataclass(frozen=True)
class Command:
    """One subcommand: ``add_arguments(parser)`` declares its arguments, ``run(args)`` runs it."""

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], None]


class RegistryChoices(Sequence[str]):
    """An option's ``choices``: the names of a registry (``"package.module:REGISTRY"``), read the
    first time argparse needs them (to check a given value or to show this command's help), so
    building the parser imports no area and ``--help`` stays fast."""

    def __init__(self, target: str):
        self.target = target
        self._names: list[str] | None = None

    def names(self) -> list[str]:
        if self._names is None:
            module, _, attr = self.target.partition(":")
            self._names = getattr(importlib.import_module(module), attr).names()
        return self._names

    def __contains__(self, value: object) -> bool:
        return value in self.names()

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())

    def __getitem__(self, i):
        return self.names()[i]


def registry_option(p: argparse.ArgumentParser, flag: str, target: str, **kwargs) -> None:
    """An option whose value is a name in the registry ``target`` (``"module:REGISTRY"``)."""
    kwargs.setdefault("metavar", "NAME")
    p.add_argument(flag, choices=RegistryChoices(target), **kwargs)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` shows each option's default (not where it is None, False or empty) and the
    names a registry option takes."""

    def _get_help_string(self, action):
        text = action.help or ""
        if isinstance(action.choices, RegistryChoices) and "%(choices)" not in text:
            text += " (one of: %(choices)s)"
        default = action.default
        if default in (None, argparse.SUPPRESS) or default is False or default == [] or not text:
            return text
        if "%(default)" not in text and action.option_strings:
            text += " (default: %(default)s)"
        return text


def add_parser(subparsers, name: str, help: str, **kwargs) -> argparse.ArgumentParser:
    """A sub-parser with jaxlab's help formatter (argparse does not pass it down)."""
    kwargs.setdefault("description", help)
    return subparsers.add_parser(name, help=help, formatter_class=HelpFormatter, **kwargs)


def add_config_args(p: argparse.ArgumentParser, default: str | None) -> None:
    p.add_argument("--config", default=default, help="YAML config file")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config value, e.g. --set train.lr=1e-5 (repeatable)",
    )


def add_dtype_arg(p: argparse.ArgumentParser) -> None:
    """``--dtype``: the compute dtype, shorthand for ``--set dtype=...`` (weights and optimizer
    state keep the config's ``param_dtype``, float32 by default)."""
    from jaxlab.config import DTYPES

    p.add_argument(
        "--dtype",
        choices=list(DTYPES),
        default=None,
        help="compute dtype (bfloat16 on GPUs: float32 master weights, bfloat16 activations)",
    )


def dtype_overrides(args: argparse.Namespace) -> list[str]:
    """``args.overrides`` with ``--dtype`` appended as ``dtype=...``."""
    dtype = getattr(args, "dtype", None)
    return list(args.overrides) + ([f"dtype={dtype}"] if dtype else [])


def positive_int(text: str) -> int:
    """argparse ``type``: an integer >= 1 (argparse names the option when it is not)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text}")
    return value


def non_negative_int(text: str) -> int:
    """argparse ``type``: an integer >= 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text}")
    return value


def non_negative_float(text: str) -> float:
    """argparse ``type``: a finite number >= 0 (no NaN, no infinity)."""
    value = float(text)
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def add_overwrite_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--overwrite", action="store_true", help="replace outputs that exist")


def _flag_of(args: argparse.Namespace, path) -> str | None:
    """The option that gave ``path`` (``--out``), or None for a path the command derived."""
    for name, value in vars(args).items():
        if isinstance(value, str | os.PathLike) and os.fspath(value) == os.fspath(path):
            return "--" + name.replace("_", "-")
        if isinstance(value, list) and os.fspath(path) in [
            os.fspath(v) for v in value if isinstance(v, str | os.PathLike)
        ]:
            return "--" + name.replace("_", "-")
    return None


def check_outputs(args: argparse.Namespace, *paths, kind: str = "file") -> None:
    """Before any work: an existing output is an error naming ``--overwrite`` unless it was given.

    A path the user gave (an option's value) is also checked for its ``kind``: a ``"file"`` output
    must not be a folder and its folder must exist; a ``"dir"`` output must not be a file. The
    errors name the option. Paths the command derives inside a folder it makes are checked for
    existence only."""
    for path in paths:
        if path is None:
            continue
        flag = _flag_of(args, path)
        if flag is not None:
            p = Path(path)
            if kind == "file" and p.is_dir():
                raise UserError(f"{flag} {path}: is a folder; give the path of a file to write")
            if kind == "file" and not p.parent.is_dir():
                raise UserError(f"{flag} {path}: the folder {p.parent} does not exist")
            if kind == "dir" and p.exists() and not p.is_dir():
                raise UserError(f"{flag} {path}: exists and is not a folder")
        check_output(path, args.overwrite, flag="--overwrite")


def require_decoder(model, name: str) -> None:
    from jaxlab.models import Decoder

    if not isinstance(model, Decoder):
        raise UserError(
            f"{name} is a {type(model).__name__}, not a decoder LM; this command needs a decoder"
        )
