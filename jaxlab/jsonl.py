"""Reading JSONL inputs (traces, chat data) with errors that name the file and line."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from jaxlab.errors import UserError

__all__ = ["read_jsonl"]


def read_jsonl(path: str | Path, *, what: str = "JSONL file") -> Iterator[tuple[int, Any]]:
    """``(line number, value)`` of each non-blank line of ``path``; :class:`UserError` naming
    the file (missing: ``"{path}: no such {what}"``) or the file and line (not JSON)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such {what}")
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield n, json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{n}: not JSON: {e}") from None
