"""The exceptions a user can cause: a bad path, a corrupt file, a wrong shape, an unknown name.

Every error meant for the person running jaxlab derives from :class:`UserError`. The command line
prints those as one ``error: ...`` line and exits with status 2; anything else is a bug in jaxlab
and keeps its traceback. :class:`UserError` is a :class:`ValueError`, so code that catches
``ValueError`` keeps working.

Area-specific subclasses live with their area (``jaxlab.models.LoadError``,
``jaxlab.sky.SkyFormatError``, ``jaxlab.retrieval.PosIRError``, ``jaxlab.checkpoint.CheckpointError``);
the ones every area shares are here.
"""

from __future__ import annotations

import os

__all__ = [
    "UserError",
    "ConfigError",
    "UnknownNameError",
    "OutputExistsError",
    "check_output",
]


class UserError(ValueError):
    """An error the user can fix; the message says what was wrong and what would be right."""


class ConfigError(UserError):
    """A config file, override or value is invalid. The message names the key."""


class UnknownNameError(UserError):
    """A name that is not in a registry; the message lists the known names."""


class OutputExistsError(UserError, FileExistsError):
    """An output path exists and replacing it was not asked for."""


def check_output(path: str | os.PathLike, overwrite: bool, *, flag: str = "overwrite=True") -> None:
    """Raises :class:`OutputExistsError` when ``path`` exists and ``overwrite`` is false.

    ``flag`` is how the caller asks to replace it (``"--overwrite"`` on the command line).
    """
    if not overwrite and os.path.lexists(path):
        raise OutputExistsError(f"{os.fspath(path)} exists; pass {flag} to replace it")
