"""Position-controlled PosIR datasets: one evidence span placed at a chosen relative position inside a
document of a chosen token length.

:func:`build_posir` takes (query, evidence) pairs and filler text (a user's own documents, split into
sentences) and writes, per pair, one document whose length falls in a requested PosIR bucket and whose
evidence sits at a requested relative position, recording its character span. :func:`builtin_items`
and :func:`builtin_filler` generate a small offline corpus (synthetic facts about invented places,
with other facts about the same places as hard negatives), so ``posir build`` / ``posir eval`` run
out of the box. Everything is deterministic given the seed.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from jaxlab.retrieval.data import PosIRData, PosIRError

__all__ = [
    "build_posir",
    "read_items",
    "read_filler",
    "builtin_dataset",
    "builtin_items",
    "builtin_filler",
    "DEFAULT_LENGTHS",
    "split_sentences",
]

# token-length ranges per PosIR bucket (Q1..Q4); documents are drawn uniformly inside the range
DEFAULT_LENGTHS = ((128, 512), (513, 1024), (1025, 1536), (1537, 2048))

_SYLLABLES = (
    "ar",
    "bel",
    "cor",
    "dan",
    "el",
    "fen",
    "gar",
    "hal",
    "is",
    "jor",
    "kel",
    "lin",
    "mor",
    "nes",
    "or",
    "pel",
    "quin",
    "ras",
    "sol",
    "tam",
    "ul",
    "ver",
    "wyn",
    "zan",
)
_ATTRIBUTES = (
    ("access code", lambda r: str(r.integers(1000, 9999))),
    ("founding year", lambda r: str(r.integers(1100, 1990))),
    ("chief engineer", lambda r: _name(r) + " " + _name(r)),
    (
        "main export",
        lambda r: str(
            r.choice(
                (
                    "copper",
                    "wool",
                    "salt",
                    "timber",
                    "glass",
                    "tea",
                    "amber",
                    "silk",
                    "cider",
                    "marble",
                    "cotton",
                )
            )
        ),
    ),
    ("oldest bridge", lambda r: "the " + _name(r) + " bridge"),
    ("population", lambda r: f"{r.integers(2, 900)},{r.integers(100, 999)}"),
    (
        "flag colour",
        lambda r: str(
            r.choice(("crimson", "teal", "ochre", "violet", "silver", "emerald", "indigo", "amber"))
        ),
    ),
    ("harbour master", lambda r: _name(r) + " " + _name(r)),
    ("annual festival", lambda r: "the " + _name(r) + " festival"),
    ("highest peak", lambda r: "Mount " + _name(r)),
)
_NOUNS = (
    "the council",
    "a traveller",
    "the old mill",
    "the market",
    "a merchant",
    "the library",
    "the river",
    "the archive",
    "a farmer",
    "the school",
    "the northern road",
    "the guild",
    "the observatory",
    "a carpenter",
    "the garden",
    "the station",
    "the museum",
    "a weaver",
)
_VERBS = (
    "described",
    "repaired",
    "visited",
    "mentioned",
    "recorded",
    "admired",
    "inspected",
    "painted",
    "measured",
    "rebuilt",
    "celebrated",
    "questioned",
    "mapped",
    "restored",
)
_TAILS = (
    "in the spring",
    "after a long winter",
    "during the annual fair",
    "before the storm",
    "with great care",
    "for many years",
    "at the end of the season",
    "without much notice",
    "in the early morning",
    "near the old gate",
    "as the records show",
    "on a quiet day",
)


def _name(rng) -> str:
    return "".join(rng.choice(_SYLLABLES, size=int(rng.integers(2, 4)))).capitalize()


def builtin_items(n: int, *, seed: int = 0) -> list[tuple[str, str]]:
    """``n`` (query, evidence) pairs about invented places, several attributes per place."""
    rng = np.random.default_rng([seed, 1])
    places = []
    while len(places) < max(1, n // 3):
        p = _name(rng)
        if p not in places:
            places.append(p)
    pairs, seen = [], set()
    while len(pairs) < n:
        place = places[int(rng.integers(len(places)))]
        a = int(rng.integers(len(_ATTRIBUTES)))
        if (place, a) in seen:
            continue
        seen.add((place, a))
        attr, value = _ATTRIBUTES[a]
        pairs.append((f"What is the {attr} of {place}?", f"The {attr} of {place} is {value(rng)}."))
    return pairs


def builtin_dataset(
    n: int, tokenizer, *, seed: int = 0, lengths: Sequence[tuple[int, int]] = DEFAULT_LENGTHS
) -> PosIRData:
    """The built-in corpus: ``n`` queries; as many further facts about the same places (never asked
    about) serve as distractors."""
    pairs = builtin_items(2 * n, seed=seed)
    return build_posir(
        pairs[:n],
        builtin_filler(seed=seed),
        tokenizer,
        lengths=lengths,
        seed=seed,
        distractors=[e for _, e in pairs[n:]],
    )


def builtin_filler(n: int = 600, *, seed: int = 0) -> list[str]:
    """``n`` neutral filler sentences."""
    rng = np.random.default_rng([seed, 2])
    out = []
    for _ in range(n):
        subj, obj = rng.choice(_NOUNS, size=2, replace=False)
        s = f"{subj} {rng.choice(_VERBS)} {obj} {rng.choice(_TAILS)}."
        out.append(s[0].upper() + s[1:])
    return out


def token_ids(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Token ids without special tokens and without length limits (no truncation warnings)."""
    hf = getattr(tokenizer, "hf", tokenizer)
    backend = getattr(hf, "backend_tokenizer", None)
    if backend is not None:  # HF re-applies its truncation/padding settings on every call
        backend.no_truncation()
        backend.no_padding()
        return [e.ids for e in backend.encode_batch(list(texts), add_special_tokens=False)]
    return [list(r) for r in hf(list(texts), add_special_tokens=False)["input_ids"]]


def _read_text(path: Path) -> str:
    """A UTF-8 text file's contents; :class:`PosIRError` naming the file and line otherwise."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise PosIRError(f"{path}:{line}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def read_items(path: str | os.PathLike) -> list[tuple[str, str]]:
    """``(query, evidence)`` pairs from a JSONL file of ``{"query": ..., "evidence": ...}`` objects
    (blank lines skipped); :class:`PosIRError` naming the file and line otherwise."""
    path = Path(path)
    if not path.is_file():
        raise PosIRError(f"{path}: no such file")
    items = []
    for n, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise PosIRError(f"{path}:{n}: not valid JSON ({e})") from None
        if not isinstance(row, dict) or not {"query", "evidence"} <= set(row):
            raise PosIRError(f"{path}:{n}: needs keys 'query' and 'evidence'")
        if not isinstance(row["query"], str) or not isinstance(row["evidence"], str):
            raise PosIRError(f"{path}:{n}: 'query' and 'evidence' must be strings")
        items.append((row["query"], row["evidence"]))
    if not items:
        raise PosIRError(f"{path}: no (query, evidence) items")
    return items


def read_filler(paths: Sequence[str | os.PathLike]) -> list[str]:
    """The sentences of text files, in order: filler for :func:`build_posir`."""
    sentences = []
    for p in map(Path, paths):
        if not p.is_file():
            raise PosIRError(f"{p}: no such file")
        sentences.extend(split_sentences(_read_text(p)))
    return sentences


def split_sentences(text: str) -> list[str]:
    """Sentences of a text (split after . ! ? followed by whitespace)."""
    return [s.strip() for s in re.split(r"(?<=[.!?])\s+", text) if s.strip()]


def build_posir(
    items: Sequence[tuple[str, str]],
    filler: Sequence[str],
    tokenizer,
    *,
    lengths: Sequence[tuple[int, int]] = DEFAULT_LENGTHS,
    seed: int = 0,
    distractors: Sequence[str] = (),
    distractor_rate: float = 0.1,
) -> PosIRData:
    """One document per (query, evidence) pair: a bucket drawn uniformly from ``lengths``, a token
    length uniform in its range, the evidence at a relative position uniform in [0, 1] (inserted at
    the nearest sentence boundary), the rest filler sentences and, with probability
    ``distractor_rate`` per sentence, a ``distractors`` sentence (hard negatives: facts that answer no
    query). ``tokenizer`` counts tokens (no special tokens).
    """
    if not items:
        raise PosIRError("build_posir: no (query, evidence) items")
    if len(filler) < 2:
        raise PosIRError("build_posir: need at least two filler sentences")
    for lo, hi in lengths:
        if not 0 < lo <= hi:
            raise PosIRError(f"build_posir: bad token-length range ({lo}, {hi})")
    rng = np.random.default_rng([seed, 3])

    def count(texts):
        return [len(r) for r in token_ids(tokenizer, texts)]

    filler_tokens = count(filler)
    evidence = [e for _, e in items]
    evidence_tokens = count(evidence)
    distractors = list(distractors)
    distractor_tokens = count(distractors) if distractors else []
    q_ids, q_texts, spans, char_lens, tok_lens = [], [], [], [], []
    c_ids, c_texts, qrels = [], [], {}
    for i, (query, ev) in enumerate(items):
        lo, hi = lengths[int(rng.integers(len(lengths)))]
        target = int(rng.integers(lo, max(lo, hi - 48) + 1))  # room for the last sentence
        sentences, total = [], evidence_tokens[i]
        while total < target:
            if distractors and rng.random() < distractor_rate:
                j = int(rng.integers(len(distractors)))
                sentences.append(distractors[j])
                total += distractor_tokens[j]
            else:
                j = int(rng.integers(len(filler)))
                sentences.append(filler[j])
                total += filler_tokens[j]
        pos = int(round(rng.random() * len(sentences)))
        before, after = " ".join(sentences[:pos]), " ".join(sentences[pos:])
        start = len(before) + (1 if before else 0)
        doc = " ".join(x for x in (before, ev, after) if x)
        assert doc[start : start + len(ev)] == ev
        qid, cid = f"q{i}", f"d{i}"
        q_ids.append(qid)
        q_texts.append(query)
        spans.append((start, start + len(ev)))
        char_lens.append(len(doc))
        c_ids.append(cid)
        c_texts.append(doc)
        qrels[qid] = {cid: 1}
    tok_lens = count(c_texts)
    return PosIRData(
        q_ids,
        q_texts,
        np.asarray(spans, np.int64),
        np.asarray(char_lens, np.int64),
        np.asarray(tok_lens, np.int64),
        c_ids,
        c_texts,
        qrels,
    )
