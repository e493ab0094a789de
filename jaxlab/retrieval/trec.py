"""The field's interchange formats for retrieval results: TREC run and qrels files, mteb results.

* A run file has one line per retrieved document, ``qid Q0 docid rank score tag``, best first.
  trec_eval (and pytrec_eval / ir_measures over it) ignores the rank column and re-sorts each query's
  documents by score, breaking ties by document id in *descending* byte order; :func:`trec_order`
  ranks the same way, so metrics computed by jaxlab and by those tools agree, ties included.
* A qrels file has one line per judgement, ``qid 0 docid relevance``.
* An mteb results file is the JSON that ``mteb`` writes per task under
  ``<results>/<model>/<revision>/<task>.json``: ``scores[split]`` is a list of per-subset dicts with
  ``main_score``, ``ndcg_at_10``, ``recall_at_10``, ... as fractions in [0, 1].
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from pathlib import Path

from jaxlab.errors import UserError

__all__ = [
    "Run",
    "Qrels",
    "trec_order",
    "write_trec_run",
    "read_trec_run",
    "write_trec_qrels",
    "read_trec_qrels",
    "mteb_result",
    "write_mteb_result",
]

Run = Mapping[str, Mapping[str, float]]  # query id -> {document id: score}
Qrels = Mapping[str, Mapping[str, int]]  # query id -> {document id: relevance}

_ID = re.compile(r"^\S+$")


def trec_order(scores: Mapping[str, float]) -> list[str]:
    """Document ids ranked as trec_eval ranks them: score descending, ties by id descending."""
    return sorted(scores, key=lambda d: (-scores[d], _Desc(d)))


class _Desc:
    """A sort key that orders strings by descending byte order (trec_eval's ``strcmp`` on ties)."""

    __slots__ = ("b",)

    def __init__(self, s: str):
        self.b = s.encode()

    def __lt__(self, other: _Desc) -> bool:
        return self.b > other.b

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Desc) and self.b == other.b


def _check_id(kind: str, value: str) -> str:
    if not isinstance(value, str) or not _ID.match(value):
        raise UserError(
            f"TREC files separate fields by whitespace: {kind} {value!r} must be a non-empty "
            "string without spaces"
        )
    return value


def write_trec_run(path: str | Path, run: Run, *, tag: str = "jaxlab") -> Path:
    """Writes ``run`` as a TREC run file (each query's documents in :func:`trec_order`, rank from 1).
    Scores are written with ``repr`` so that they read back exactly."""
    _check_id("tag", tag)
    path = Path(path)
    lines = []
    for qid, scores in run.items():
        _check_id("query id", qid)
        for rank, doc in enumerate(trec_order(scores), start=1):
            score = float(scores[doc])
            if not math.isfinite(score):
                raise UserError(f"run: query {qid!r} document {doc!r} has score {score}")
            lines.append(f"{qid} Q0 {_check_id('document id', doc)} {rank} {score!r} {tag}\n")
    path.write_text("".join(lines))
    return path


def _fields(path: Path, count: int, what: str):
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != count:
            raise UserError(f"{path}:{n}: a {what} line has {count} fields, got {len(parts)}")
        yield n, parts


def read_trec_run(path: str | Path) -> dict[str, dict[str, float]]:
    """A TREC run file as ``{query id: {document id: score}}``."""
    path = Path(path)
    run: dict[str, dict[str, float]] = {}
    for n, (qid, _, doc, _rank, score, _tag) in _fields(
        path, 6, "run (qid Q0 docid rank score tag)"
    ):
        try:
            run.setdefault(qid, {})[doc] = float(score)
        except ValueError:
            raise UserError(f"{path}:{n}: score {score!r} is not a number") from None
    return run


def write_trec_qrels(path: str | Path, qrels: Qrels) -> Path:
    """Writes ``qrels`` as a TREC qrels file (``qid 0 docid relevance``)."""
    path = Path(path)
    lines = [
        f"{_check_id('query id', q)} 0 {_check_id('document id', d)} {int(r)}\n"
        for q, rel in qrels.items()
        for d, r in rel.items()
    ]
    path.write_text("".join(lines))
    return path


def read_trec_qrels(path: str | Path) -> dict[str, dict[str, int]]:
    """A TREC qrels file as ``{query id: {document id: relevance}}``."""
    path = Path(path)
    qrels: dict[str, dict[str, int]] = {}
    for n, (qid, _, doc, rel) in _fields(path, 4, "qrels (qid 0 docid relevance)"):
        try:
            qrels.setdefault(qid, {})[doc] = int(rel)
        except ValueError:
            raise UserError(f"{path}:{n}: relevance {rel!r} is not an integer") from None
    return qrels


def mteb_result(
    scores: Mapping[str, float],
    *,
    task_name: str,
    evaluation_time: float | None = None,
    split: str = "test",
    hf_subset: str = "default",
    languages: tuple[str, ...] = ("eng-Latn",),
    main_score: str = "ndcg_at_10",
    dataset_revision: str = "local",
) -> dict:
    """One task's results in mteb's layout. ``scores`` maps mteb metric names (``ndcg_at_10``,
    ``recall_at_100``, ...) to fractions in [0, 1]."""
    if main_score not in scores:
        raise ValueError(f"main_score {main_score!r} is not among the scores {sorted(scores)}")
    entry = {k: float(v) for k, v in scores.items()}
    entry.update(main_score=entry[main_score], hf_subset=hf_subset, languages=list(languages))
    return {
        "dataset_revision": dataset_revision,
        "task_name": task_name,
        "mteb_version": None,
        "scores": {split: [entry]},
        "evaluation_time": evaluation_time,
        "kg_co2_emissions": None,
    }


def write_mteb_result(
    results_dir: str | Path,
    result: dict,
    *,
    model_name: str,
    revision: str = "no_revision_available",
) -> Path:
    """Writes ``result`` (from :func:`mteb_result`) where mteb puts it:
    ``<results_dir>/<model_name with / as __>/<revision>/<task_name>.json``."""
    folder = Path(results_dir) / model_name.replace("/", "__") / revision
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{result['task_name']}.json"
    path.write_text(json.dumps(result, indent=2))
    return path
