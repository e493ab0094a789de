"""A local web: BM25 search and page fetch over a corpus of documents, as read-only tools.

:class:`Corpus` holds pages ``(url, title, text)``; :func:`markdown_corpus` splits Markdown files
into one page per section (``doc://<file>#<heading-slug>``). :func:`bm25_scores` is Okapi BM25
with the non-negative idf ``ln(1 + (N - n_t + 0.5) / (n_t + 0.5))``::

    score(q, d) = sum_{t in q} idf(t) * f(t, d) * (k1 + 1) / (f(t, d) + k1 * (1 - b + b * |d| / avgdl))

:func:`search_tools` returns ``web_search(query, k)`` (urls, titles and snippets of the best ``k``
pages) and ``fetch(url)`` (a page's text) with the ``web_search`` / ``fetch`` latency profiles.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from jaxlab.agents.latency import LatencyModel, latency_profile
from jaxlab.agents.tools import Effect, Tool

__all__ = ["Page", "Corpus", "tokenize", "bm25_scores", "markdown_corpus", "search_tools"]

_TOKEN = re.compile(r"[a-z0-9]+")


def tokenize(text: str) -> list[str]:
    """Lower-cased alphanumeric runs."""
    return _TOKEN.findall(text.lower())


@dataclasses.dataclass(frozen=True)
class Page:
    url: str
    title: str
    text: str


class Corpus:
    """Pages indexed for BM25 (``k1``, ``b`` its parameters)."""

    def __init__(self, pages: Sequence[Page], *, k1: float = 1.5, b: float = 0.75):
        if not pages:
            raise ValueError("a corpus needs at least one page")
        urls = [p.url for p in pages]
        if len(set(urls)) != len(urls):
            raise ValueError("page urls must be unique")
        self.pages = list(pages)
        self.by_url = {p.url: p for p in pages}
        self.k1, self.b = k1, b
        self.docs = [collections.Counter(tokenize(p.title + " " + p.text)) for p in pages]
        self.lengths = np.array([sum(d.values()) for d in self.docs], np.float64)
        self.df = collections.Counter(t for d in self.docs for t in d)

    def scores(self, query: str) -> np.ndarray:
        """BM25 score of every page for ``query``: ``[N]`` float64."""
        return bm25_scores(tokenize(query), self.docs, self.df, self.lengths, k1=self.k1, b=self.b)

    def search(self, query: str, k: int = 5) -> list[tuple[Page, float]]:
        """The best ``k`` pages with a positive score, best first (ties: corpus order)."""
        s = self.scores(query)
        order = sorted(range(len(s)), key=lambda i: (-s[i], i))
        return [(self.pages[i], float(s[i])) for i in order[:k] if s[i] > 0]


def bm25_scores(
    query: Sequence[str],
    docs: Sequence[collections.Counter],
    df: collections.Counter,
    lengths: np.ndarray,
    *,
    k1: float = 1.5,
    b: float = 0.75,
) -> np.ndarray:
    """Okapi BM25 of ``query`` tokens against term-count ``docs`` (``[N]`` float64)."""
    n = len(docs)
    avgdl = float(lengths.mean())
    out = np.zeros(n, np.float64)
    for term in query:
        nt = df.get(term, 0)
        if nt == 0:
            continue
        idf = math.log(1.0 + (n - nt + 0.5) / (nt + 0.5))
        f = np.array([d.get(term, 0) for d in docs], np.float64)
        out += idf * f * (k1 + 1) / (f + k1 * (1 - b + b * lengths / avgdl))
    return out


def _slug(text: str) -> str:
    return "-".join(tokenize(text)) or "section"


def markdown_corpus(paths: Iterable[str | Path]) -> Corpus:
    """One page per Markdown section (a ``#`` heading and the text under it) of each file."""
    pages: list[Page] = []
    for path in paths:
        path = Path(path)
        sections: list[tuple[str, list[str]]] = [(path.stem, [])]
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.startswith("#"):
                sections.append((line.lstrip("#").strip(), []))
            else:
                sections[-1][1].append(line)
        seen: collections.Counter = collections.Counter()
        for title, lines in sections:
            text = "\n".join(lines).strip()
            if not text:
                continue
            slug = _slug(title)
            seen[slug] += 1
            suffix = f"-{seen[slug]}" if seen[slug] > 1 else ""
            pages.append(Page(f"doc://{path.name}#{slug}{suffix}", title, text))
    return Corpus(pages)


def search_tools(
    corpus: Corpus,
    *,
    search_latency: LatencyModel | None = None,
    fetch_latency: LatencyModel | None = None,
    snippet_chars: int = 160,
) -> list[Tool]:
    """``web_search`` and ``fetch`` over ``corpus`` (read-only; no state of ours)."""

    def web_search(query: str, k: int = 5) -> dict:
        """Searches the corpus; returns the best pages' url, title and a snippet."""
        if not isinstance(query, str) or not query.strip():
            return {"error": "query must be a non-empty string"}
        hits = corpus.search(query, int(k))
        return {
            "results": [
                {"url": p.url, "title": p.title, "snippet": p.text[:snippet_chars]} for p, _ in hits
            ]
        }

    def fetch(url: str) -> dict:
        """The text of the page at ``url``."""
        page = corpus.by_url.get(url)
        if page is None:
            return {"error": f"no page at {url}"}
        return {"url": url, "title": page.title, "content": page.text}

    return [
        Tool(
            "web_search",
            web_search,
            Effect.READ_ONLY,
            description="Search the document collection; returns urls, titles and snippets.",
            parameters={
                "type": "object",
                "properties": {"query": {"type": "string"}, "k": {"type": "integer"}},
                "required": ["query"],
            },
            latency=search_latency or latency_profile("web_search"),
        ),
        Tool(
            "fetch",
            fetch,
            Effect.READ_ONLY,
            description="Fetch the text of a page by its url.",
            parameters={
                "type": "object",
                "properties": {"url": {"type": "string"}},
                "required": ["url"],
            },
            latency=fetch_latency or latency_profile("fetch"),
        ),
    ]
