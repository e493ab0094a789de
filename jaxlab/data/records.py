"""Users' own text records: plain text, JSONL and parquet files, with errors naming file and line.

* ``.txt`` (any other suffix too): one record per line, ``{"text": line}`` (blank lines skipped),
  or with ``documents="blank_line"`` one record per paragraph (runs of lines between blank lines);
* ``.jsonl`` / ``.json``: one JSON object per line;
* ``.parquet``: one record per row.

A record is a ``dict``; :func:`record_texts` picks one string field and names the file and line (or
row) of a record that lacks it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from jaxlab.errors import UserError
from jaxlab.jsonl import read_jsonl

__all__ = ["RecordError", "TEXT_FORMATS", "file_format", "iter_records", "record_texts"]

TEXT_FORMATS = ("txt", "jsonl", "parquet")


class RecordError(UserError):
    """A record that cannot be read or lacks what is needed; the message names file and line."""


def file_format(path: str | os.PathLike) -> str:
    """``"jsonl"``, ``"parquet"`` or ``"txt"`` from the file name."""
    suffix = Path(path).suffix.lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        return "jsonl"
    if suffix in (".parquet", ".pq"):
        return "parquet"
    return "txt"


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise RecordError(f"{path}:{line}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def iter_records(
    path: str | os.PathLike, *, documents: str = "line"
) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(location, record)`` of each record of a file, location ``"file:line"`` (``"file:row
    N"`` for parquet, 1-based). ``documents`` (text files): ``"line"`` or ``"blank_line"``."""
    path = Path(path)
    if not path.is_file():
        raise RecordError(f"{path}: no such file")
    fmt = file_format(path)
    if fmt == "jsonl":
        for n, value in read_jsonl(path):
            if not isinstance(value, dict):
                raise RecordError(f"{path}:{n}: expected a JSON object, got {type(value).__name__}")
            yield f"{path}:{n}", value
    elif fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(path)
        except (pa.ArrowInvalid, OSError) as e:
            raise RecordError(f"{path}: not a readable parquet file ({e})") from None
        row = 0
        for batch in pf.iter_batches(batch_size=1024):
            for record in batch.to_pylist():
                row += 1
                yield f"{path}:row {row}", record
    else:
        if documents not in ("line", "blank_line"):
            raise ValueError(f"documents must be 'line' or 'blank_line', got {documents!r}")
        lines = _read_text(path).splitlines()
        if documents == "line":
            for n, line in enumerate(lines, 1):
                if line.strip():
                    yield f"{path}:{n}", {"text": line}
            return
        start, para = None, []
        for n, line in enumerate([*lines, ""], 1):
            if line.strip():
                start = start or n
                para.append(line)
            elif para:
                yield f"{path}:{start}", {"text": "\n".join(para)}
                start, para = None, []


def record_texts(
    paths: Sequence[str | os.PathLike] | str | os.PathLike,
    *,
    field: str = "text",
    documents: str = "line",
) -> Iterator[tuple[str, dict[str, Any], str]]:
    """``(location, record, text)`` of every record of ``paths``; a record whose ``field`` is
    missing or not a string is a :class:`RecordError` naming file and line."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    for path in paths:
        for where, record in iter_records(path, documents=documents):
            text = record.get(field)
            if not isinstance(text, str):
                got = "missing" if field not in record else f"a {type(text).__name__}"
                raise RecordError(
                    f"{where}: field {field!r} is {got}; each record needs a string {field!r}"
                    + (f" (has {sorted(record)})" if isinstance(record, dict) else "")
                )
            yield where, record, text
