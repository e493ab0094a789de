"""``python -m jaxlab <command>``: one CLI, a subcommand per area, ``--help`` everywhere.

Each area's subcommands live in their own module here (``models``: demo / generate / chat /
embed, ``train``, ``rl``, ``security``, ``serve``, ``sky``, ``posir``, ``agents``, ``config``); the work itself stays in the
areas. Commands import their area lazily, so ``--help`` is fast and a command only pays for what it uses.

Errors a user can cause (:class:`jaxlab.errors.UserError`: a bad path, a corrupt file, an unknown
name, an output that exists) and errors of the machine (``OSError``: a full disk, a permission)
print one ``error: ...`` line and exit with status 2; anything else, ``ValueError`` and
``TypeError`` included, is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys

from jaxlab.cli import (
    agents,
    analyze,
    config,
    export,
    models,
    posir,
    rl,
    security,
    serve,
    sft,
    sky,
    train,
)
from jaxlab.cli._common import Command, HelpFormatter
from jaxlab.compilation_cache import enable_compilation_cache
from jaxlab.distributed import initialize
from jaxlab.errors import UserError

__all__ = ["main", "build_parser", "COMMANDS", "Command"]

COMMANDS: list[Command] = [
    *models.COMMANDS,
    posir.COMMAND,
    rl.COMMAND,
    security.COMMAND,
    serve.COMMAND,
    sky.COMMAND,
    agents.COMMAND,
    train.COMMAND,
    sft.COMMAND,
    analyze.COMMAND,
    export.COMMAND,
    config.COMMAND,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m jaxlab",
        description="jaxlab: research systems in JAX/Flax",
        formatter_class=HelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for cmd in COMMANDS:
        p = sub.add_parser(
            cmd.name, help=cmd.help, description=cmd.help, formatter_class=HelpFormatter
        )
        cmd.add_arguments(p)
        p.set_defaults(_run=cmd.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs one command; returns the exit status (0, or 2 for a user error)."""
    args = build_parser().parse_args(argv)
    enable_compilation_cache()  # on unless JAXLAB_COMPILATION_CACHE=0 (jaxlab.compilation_cache)
    try:
        initialize()  # joins a multi-host job's processes (jaxlab.distributed); else a no-op
        args._run(args)
    except (UserError, OSError) as e:  # a user's mistake or the machine's (disk full, permissions)
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
