"""Epistemic markers: the published word lists, the two counting conventions, token-level masks,
and the surface forms a tokenizer has for each marker.

Two conventions are in use, and they count different things:

``"substring"`` (Kim, Luo et al., "Why self-distillation (sometimes) degrades reasoning",
  ``eval/check_epistemic_tokens.py``): the 10 words of :data:`SUBSTRING_WORDS`, each counted with
  ``text.lower().count(word)``, i.e. non-overlapping lowercase substrings. Inflections and longer
  words that contain a marker count: "checking", "checked", "unchecked", "waiting", "awaited",
  "hmmm" (once), "mighty".

``"word_boundary"`` (Kim, Luo et al., "Understanding reasoning in LLMs through strategic information
  allocation under uncertainty", ``eval/utils/epistemic_controls.py``): the 13 words of
  :data:`WORD_BOUNDARY_WORDS` (the 10 above plus "guess", "sure", "correct"), each counted with the
  case-insensitive regex ``(?<![A-Za-z])word(?![A-Za-z])``: a match may not touch a letter on
  either side (digits, underscores and punctuation are boundaries). "checking", "hmmm",
  "incorrect" and "correctly" do not count; "sure" and "correct" do, where the substring
  convention ignores them.

Per-response, per-problem and per-1k-token rates follow the reference scripts: totals divided by
the number of responses, of problems, and of generated tokens (times 1000).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from jaxlab.errors import UserError
from jaxlab.registry import Registry

__all__ = [
    "SUBSTRING_WORDS",
    "WORD_BOUNDARY_WORDS",
    "EPISTEMIC_WORDS",
    "CONVENTIONS",
    "SURFACE_PREFIXES",
    "SURFACE_SUFFIXES",
    "count_epistemic",
    "count_epistemic_by_word",
    "marker_spans",
    "EpistemicStats",
    "epistemic_stats",
    "token_char_offsets",
    "spans_to_token_mask",
    "epistemic_token_mask",
    "expand_surface_forms",
    "single_token_surface_ids",
]

# The 10-word list of the self-distillation analysis (substring counts).
SUBSTRING_WORDS: tuple[str, ...] = (
    "wait",
    "hmm",
    "perhaps",
    "maybe",
    "actually",
    "alternatively",
    "seems",
    "might",
    "likely",
    "check",
)
# The 13-word list of the information-allocation paper (word-boundary regex), in its order.
WORD_BOUNDARY_WORDS: tuple[str, ...] = (
    "wait",
    "hmm",
    "perhaps",
    "maybe",
    "actually",
    "alternatively",
    "seems",
    "might",
    "likely",
    "guess",
    "sure",
    "correct",
    "check",
)
# The default marker set of the interventions (suppression, masks): the 13 words.
EPISTEMIC_WORDS = WORD_BOUNDARY_WORDS

# How the reference expands a marker into surface forms for the suppression logit bias.
SURFACE_PREFIXES: tuple[str, ...] = ("", " ", "\n", "\n ", "\t")
SURFACE_SUFFIXES: tuple[str, ...] = ("", ".", ",", ":", ";", "!", "?")


@dataclasses.dataclass(frozen=True)
class Convention:
    """A counting convention: its default word list and how it finds one word in a text."""

    name: str
    words: tuple[str, ...]

    def spans(self, text: str, word: str) -> list[tuple[int, int]]:
        """Character spans ``[start, end)`` of the occurrences of ``word`` that count."""
        if self.name == "substring":
            low, w, out, i = text.lower(), word.lower(), [], 0
            if len(low) != len(text):  # a character whose lowercase changes length: map back
                return _substring_spans_unicode(text, w)
            while True:
                i = low.find(w, i)
                if i < 0:
                    return out
                out.append((i, i + len(w)))
                i += len(w)  # str.count counts non-overlapping occurrences
        pattern = re.compile(rf"(?i)(?<![A-Za-z]){re.escape(word)}(?![A-Za-z])")
        return [m.span() for m in pattern.finditer(text)]


def _substring_spans_unicode(text: str, word: str) -> list[tuple[int, int]]:
    # Rare: lower() changed the length (e.g. "İ"). Count on the lowered text as the reference
    # does, and map each span back through per-character lowered lengths.
    starts, pos = [], 0
    for ch in text:
        starts.append(pos)
        pos += len(ch.lower())
    starts.append(pos)
    low = text.lower()
    out, i = [], 0
    while True:
        i = low.find(word, i)
        if i < 0:
            return out
        a = max(k for k in range(len(text) + 1) if starts[k] <= i)
        b = min(k for k in range(len(text) + 1) if starts[k] >= i + len(word))
        out.append((a, b))
        i += len(word)


CONVENTIONS: Registry[Convention] = Registry("epistemic counting convention")
CONVENTIONS.register("substring", Convention("substring", SUBSTRING_WORDS))
CONVENTIONS.register("word_boundary", Convention("word_boundary", WORD_BOUNDARY_WORDS))


def _words(convention: Convention, words: Iterable[str] | None) -> tuple[str, ...]:
    words = convention.words if words is None else tuple(words)
    if isinstance(words, str) or not all(isinstance(w, str) and w for w in words):
        raise UserError(f"words must be a list of non-empty strings, got {words!r}")
    return words


def count_epistemic_by_word(
    text: str, convention: str = "substring", words: Iterable[str] | None = None
) -> dict[str, int]:
    """Occurrences of each marker word in ``text`` under ``convention`` (see the module docstring);
    ``words`` replaces the convention's own list."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    conv = CONVENTIONS.get(convention)
    return {w: len(conv.spans(text, w)) for w in _words(conv, words)}


def count_epistemic(
    text: str, convention: str = "substring", words: Iterable[str] | None = None
) -> int:
    """The number of epistemic markers in ``text``: ``"substring"`` (10 words, lowercase substring
    counts) or ``"word_boundary"`` (13 words, letters may not touch a match)."""
    return sum(count_epistemic_by_word(text, convention, words).values())


def marker_spans(
    text: str, convention: str = "word_boundary", words: Iterable[str] | None = None
) -> list[tuple[int, int, str]]:
    """``(start, end, word)`` character spans of the markers that count, sorted by start."""
    conv = CONVENTIONS.get(convention)
    found = [(a, b, w) for w in _words(conv, words) for a, b in conv.spans(text, w)]
    return sorted(found)


@dataclasses.dataclass(frozen=True)
class EpistemicStats:
    """Marker counts over problems × responses, as the reference scripts report them."""

    convention: str
    total: int
    num_problems: int
    num_responses: int
    num_tokens: int | None
    per_response: float  # total / responses
    per_problem: float  # total / problems
    per_1k_tokens: float | None  # 1000 · total / generated tokens (None without token counts)
    by_word: dict[str, int]
    per_problem_totals: list[int]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def epistemic_stats(
    responses: Sequence[Sequence[str]],
    *,
    convention: str = "substring",
    token_counts: Sequence[Sequence[int]] | None = None,
    words: Iterable[str] | None = None,
) -> EpistemicStats:
    """Counts over ``responses[problem][sample]`` (texts); ``token_counts`` has the same nesting
    and gives each response's generated-token count (for the per-1k-token rate)."""
    if isinstance(responses, str) or any(isinstance(r, str) for r in responses):
        raise UserError("responses must be nested as [problem][response] lists of texts")
    conv = CONVENTIONS.get(convention)
    ws = _words(conv, words)
    by_word = dict.fromkeys(ws, 0)
    per_problem, n_resp = [], 0
    for texts in responses:
        total = 0
        for text in texts:
            for w, c in count_epistemic_by_word(text, convention, ws).items():
                by_word[w] += c
                total += c
            n_resp += 1
        per_problem.append(total)
    total = sum(per_problem)
    n_tok = None
    if token_counts is not None:
        if [len(t) for t in token_counts] != [len(r) for r in responses]:
            raise UserError("token_counts must have the same [problem][response] nesting")
        n_tok = int(sum(sum(t) for t in token_counts))
    return EpistemicStats(
        convention=convention,
        total=total,
        num_problems=len(responses),
        num_responses=n_resp,
        num_tokens=n_tok,
        per_response=total / n_resp if n_resp else 0.0,
        per_problem=total / len(responses) if responses else 0.0,
        per_1k_tokens=(1000.0 * total / n_tok if n_tok else 0.0) if n_tok is not None else None,
        by_word=by_word,
        per_problem_totals=per_problem,
    )


# -- token level ------------------------------------------------------------------------------


def token_char_offsets(tokenizer, token_ids: Sequence[int]) -> np.ndarray:
    """``[T, 2]`` character spans of each token in ``tokenizer.decode(token_ids)``.

    Token t covers ``[len(decode(ids[:t])), len(decode(ids[:t+1])))``: prefix decoding, so byte-level
    merges and tokenizers that change spacing are handled; a token that completes a multi-byte
    character gets the whole character, the bytes before it an empty span.
    """
    ids = [int(i) for i in token_ids]
    ends, last = [], 0
    for t in range(len(ids)):
        text = tokenizer.decode(ids[: t + 1])
        n = len(text.rstrip("\ufffd"))  # an incomplete UTF-8 character is not there yet
        last = max(last, n)
        ends.append(last)
    starts = [0, *ends[:-1]]
    return np.asarray(list(zip(starts, ends)), np.int64).reshape(len(ids), 2)


def spans_to_token_mask(spans: Iterable[tuple[int, int]], offsets: np.ndarray) -> np.ndarray:
    """``[T]`` bool: token t overlaps some character span ``[a, b)`` (``offsets`` ``[T, 2]``)."""
    offsets = np.asarray(offsets)
    if offsets.ndim != 2 or offsets.shape[-1] != 2:
        raise ValueError(f"offsets must be [T, 2], got shape {offsets.shape}")
    mask = np.zeros(len(offsets), bool)
    for a, b in spans:
        mask |= (offsets[:, 0] < b) & (offsets[:, 1] > a) & (offsets[:, 1] > offsets[:, 0])
    return mask


def epistemic_token_mask(
    tokenizer,
    token_ids: Sequence[int],
    convention: str = "word_boundary",
    words: Iterable[str] | None = None,
) -> np.ndarray:
    """``[T]`` bool: which of ``token_ids`` (a generated response) belong to a marker that counts
    under ``convention``; a token that covers part of a marker counts as epistemic."""
    offsets = token_char_offsets(tokenizer, token_ids)
    text = tokenizer.decode([int(i) for i in token_ids])
    spans = [(a, b) for a, b, _ in marker_spans(text, convention, words)]
    return spans_to_token_mask(spans, offsets)


# -- surface forms ----------------------------------------------------------------------------


def expand_surface_forms(
    word: str,
    prefixes: Sequence[str] = SURFACE_PREFIXES,
    suffixes: Sequence[str] = SURFACE_SUFFIXES,
) -> set[str]:
    """The surface forms the reference suppresses for ``word``: lower, Capitalized and UPPER case,
    each with every prefix (nothing, space, newline, newline + space, tab) and with or without every
    suffix (``. , : ; ! ?``). 3 cases × 5 prefixes × 8 endings = 120 strings (fewer when cases
    coincide)."""
    bases = {word.lower(), word.capitalize(), word.upper()}
    return {p + b + s for p in prefixes for b in bases for s in ("", *suffixes)}


def single_token_surface_ids(
    tokenizer, words: Iterable[str] = EPISTEMIC_WORDS
) -> tuple[list[int], dict[str, list[str]]]:
    """Token ids of every surface form (:func:`expand_surface_forms`) that the tokenizer encodes as
    exactly one token, and per word the surfaces that did. Forms that take several tokens are not
    blocked (as in the reference): suppression then acts on the first piece only if that piece is
    itself a listed single-token surface."""
    ids: set[int] = set()
    matched: dict[str, list[str]] = {}
    for word in words:
        matched[word] = []
        for surface in sorted(expand_surface_forms(word)):
            enc = tokenizer.encode(surface, add_special_tokens=False)
            if len(enc) == 1:
                ids.add(int(enc[0]))
                matched[word].append(surface)
    return sorted(ids), matched
