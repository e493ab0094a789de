"""PosIR's on-disk layout: read, validate and write.

One dataset is a folder with::

    queries.parquet      _id, text, pos_char_span [start, end], pos_char_length, pos_token_length
    corpus.parquet       _id, text
    qrels/test.parquet   query-id, corpus-id, score

``pos_char_span`` is the character span of the evidence inside the query's positive document,
``pos_char_length`` that document's length in characters and ``pos_token_length`` in tokens. A folder
whose sub-folders hold datasets (``<lang>/<domain>/``) is a collection; :func:`find_datasets` lists them.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from jaxlab.errors import UserError

__all__ = ["PosIRData", "PosIRError", "load_posir", "save_posir", "find_datasets"]

_QUERY_COLUMNS = ("_id", "text", "pos_char_span", "pos_char_length", "pos_token_length")
_CORPUS_COLUMNS = ("_id", "text")
_QREL_COLUMNS = ("query-id", "corpus-id", "score")


class PosIRError(UserError):
    """A PosIR dataset that is missing, malformed or inconsistent; the message names file and row."""


@dataclasses.dataclass
class PosIRData:
    """A PosIR dataset in memory (rows in file order)."""

    query_ids: list[str]
    query_texts: list[str]
    spans: np.ndarray  # [Q, 2] int64 character span of the evidence in the positive document
    doc_char_lengths: np.ndarray  # [Q] int64
    doc_token_lengths: np.ndarray  # [Q] int64
    corpus_ids: list[str]
    corpus_texts: list[str]
    qrels: dict[str, dict[str, int]]  # query id -> {corpus id: score}

    def __len__(self) -> int:
        return len(self.query_ids)

    def positive(self, i: int) -> str:
        """The corpus id of query i's positive document (the highest-scored one)."""
        rel = self.qrels[self.query_ids[i]]
        return max(rel, key=rel.get)

    @property
    def relative_positions(self) -> np.ndarray:
        """Span midpoint / document length, clipped to [0, 1] (PosIR's ``relpos``)."""
        mid = self.spans.sum(axis=1) / 2.0
        return np.clip(mid / np.maximum(self.doc_char_lengths, 1), 0.0, 1.0)


def _read(path: Path, columns: tuple[str, ...]) -> pa.Table:
    if not path.is_file():
        raise PosIRError(
            f"{path}: missing (a PosIR dataset needs queries.parquet, corpus.parquet "
            "and qrels/test.parquet)"
        )
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise PosIRError(f"{path}: not a readable parquet file ({e})") from None
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise PosIRError(f"{path}: missing columns {missing}; has {table.column_names}")
    return table


def load_posir(path: str | Path, *, check_lengths: bool = True) -> PosIRData:
    """Read and validate one dataset folder; any inconsistency is a :class:`PosIRError`."""
    root = Path(path)
    if not root.is_dir():
        raise PosIRError(f"{root}: not a directory")
    qt = _read(root / "queries.parquet", _QUERY_COLUMNS)
    ct = _read(root / "corpus.parquet", _CORPUS_COLUMNS)
    rt = _read(root / "qrels" / "test.parquet", _QREL_COLUMNS)
    q_ids = [str(x) for x in qt.column("_id").to_pylist()]
    c_ids = [str(x) for x in ct.column("_id").to_pylist()]
    if not q_ids:  # metrics over no queries would be NaN
        raise PosIRError(f"{root / 'queries.parquet'}: holds no queries")
    if not c_ids:
        raise PosIRError(f"{root / 'corpus.parquet'}: holds no documents")
    for name, ids in (("queries.parquet", q_ids), ("corpus.parquet", c_ids)):
        seen = set()
        for row, i in enumerate(ids):
            if i in seen:
                raise PosIRError(f"{root / name}: duplicate _id {i!r} at row {row}")
            seen.add(i)
    spans_raw = qt.column("pos_char_span").to_pylist()
    spans = np.zeros((len(q_ids), 2), np.int64)
    for row, sp in enumerate(spans_raw):
        if sp is None or len(sp) != 2:
            raise PosIRError(
                f"{root / 'queries.parquet'}: row {row} ({q_ids[row]!r}): "
                f"pos_char_span must be [start, end], got {sp!r}"
            )
        spans[row] = sp
    char_len = np.asarray(qt.column("pos_char_length").to_pylist(), np.int64)
    tok_len = np.asarray(qt.column("pos_token_length").to_pylist(), np.int64)
    bad = np.flatnonzero(
        (spans[:, 0] < 0) | (spans[:, 1] <= spans[:, 0]) | (spans[:, 1] > char_len)
    )
    if bad.size:
        r = int(bad[0])
        raise PosIRError(
            f"{root / 'queries.parquet'}: row {r} ({q_ids[r]!r}): pos_char_span "
            f"{spans[r].tolist()} is not inside [0, pos_char_length={char_len[r]}]"
        )
    corpus_text = [str(x) for x in ct.column("text").to_pylist()]
    c_index = {c: i for i, c in enumerate(c_ids)}
    qrels: dict[str, dict[str, int]] = {}
    q_set = set(q_ids)
    for row, (qi, ci, sc) in enumerate(zip(*(rt.column(c).to_pylist() for c in _QREL_COLUMNS))):
        qi, ci = str(qi), str(ci)
        if qi not in q_set:
            raise PosIRError(f"{root / 'qrels/test.parquet'}: row {row}: unknown query-id {qi!r}")
        if ci not in c_index:
            raise PosIRError(f"{root / 'qrels/test.parquet'}: row {row}: unknown corpus-id {ci!r}")
        qrels.setdefault(qi, {})[ci] = int(sc)
    data = PosIRData(
        q_ids,
        [str(x) for x in qt.column("text").to_pylist()],
        spans,
        char_len,
        tok_len,
        c_ids,
        corpus_text,
        qrels,
    )
    for row, qi in enumerate(q_ids):
        if not qrels.get(qi) or max(qrels[qi].values()) <= 0:
            raise PosIRError(
                f"{root / 'qrels/test.parquet'}: query {qi!r} has no positive document"
            )
        if check_lengths:
            doc = corpus_text[c_index[data.positive(row)]]
            if len(doc) != char_len[row]:
                raise PosIRError(
                    f"{root / 'queries.parquet'}: row {row} ({qi!r}): pos_char_length {char_len[row]} "
                    f"but its positive document {data.positive(row)!r} has {len(doc)} characters"
                )
    return data


def save_posir(data: PosIRData, path: str | Path) -> Path:
    """Write a dataset in PosIR's layout (creating the folder)."""
    root = Path(path)
    (root / "qrels").mkdir(parents=True, exist_ok=True)
    pq.write_table(
        pa.table(
            {
                "_id": data.query_ids,
                "text": data.query_texts,
                "pos_char_span": [list(map(int, s)) for s in data.spans],
                "pos_char_length": data.doc_char_lengths.astype(np.int64),
                "pos_token_length": data.doc_token_lengths.astype(np.int64),
            }
        ),
        root / "queries.parquet",
    )
    pq.write_table(
        pa.table({"_id": data.corpus_ids, "text": data.corpus_texts}), root / "corpus.parquet"
    )
    rows = [(q, c, s) for q, rel in data.qrels.items() for c, s in rel.items()]
    pq.write_table(
        pa.table(
            {
                "query-id": [r[0] for r in rows],
                "corpus-id": [r[1] for r in rows],
                "score": np.asarray([r[2] for r in rows], np.int64),
            }
        ),
        root / "qrels" / "test.parquet",
    )
    return root


def find_datasets(path: str | Path) -> list[Path]:
    """Dataset folders under ``path`` (itself, or ``<lang>/<domain>/`` sub-folders), sorted."""
    root = Path(path)
    if (root / "queries.parquet").exists():
        return [root]
    found = sorted(p.parent for p in root.rglob("queries.parquet"))
    if not found:
        raise PosIRError(f"{root}: no PosIR dataset (queries.parquet) found")
    return found
