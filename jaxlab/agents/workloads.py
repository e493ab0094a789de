"""Workloads of the replay benchmark: BFCL multi-turn tasks, and scripted deep-research tasks.

A workload (:data:`WORKLOADS`) gives the benchmark its tasks (each with ``id``, ``turns``,
``num_calls`` and ``gold_calls(registry)``), a task's tool registry with latencies scaled by one
factor, and a task's fresh state.

``bfcl``
    BFCL's ``multi_turn_base`` (:mod:`jaxlab.agents.bfcl`); read-only calls take the ``api_read``
    latency profile, the rest ``api_write``.

``research``
    Deep-research tasks over a local document collection, searched with BM25 (``web_search``) and
    read page by page (``fetch``), tools of :mod:`jaxlab.agents.search` with the ``web_search`` /
    ``fetch`` latency profiles. The collection (:func:`docstring_corpus`) is the documentation of
    the Python standard library that ships with the interpreter: one page per public function or
    class of the modules in :data:`CORPUS_MODULES`, ``py://<module>.<name>``, its text the
    docstring (so it depends on the Python version; the bench records it).

    A task (:func:`research_tasks`) asks one to three questions about one module, one per user
    turn. A question describes a target page in the words of its docstring's first sentence: its
    content words (stop words and the target's own name dropped), each kept with probability
    ``keep`` (at least three kept), e.g. "Which library call would I use to: remove common
    leading whitespace every line text?". The gold trace of a turn is what
    :func:`research_policy` does with the real tools' outputs:

    1. ``web_search(query=<the question's content words>, k=5)``;
    2. ``fetch`` the results in rank order (workload ``research_snippet``: in the order of how
       many of the question's words their title and snippet hold, ties by rank), at most
       ``max_fetch``, stopping once the target has
       been read (the reader recognises the answer when it reads it) and at least ``min_reads``
       pages have (other sources);
    3. if not found: one refined ``web_search`` whose query is the question's words plus the two
       most frequent content words of the first page fetched that are not in the question, then
       ``fetch`` its results not read yet, in rank order, at most ``max_refetch``, with the same
       stopping rule;
    4. answer (the turn's last step, no call).

    The policy is deterministic (the task's random words come from a generator seeded with the
    task set's seed and the task's index). It is a script, not a model: its regularities (always
    a search first, results fetched in rank order) are what a mined predictor learns; a real
    agent's choices are less regular, so its hit rates would be lower.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import importlib
import inspect
import sys
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from jaxlab.agents.latency import latency_profile
from jaxlab.agents.search import Corpus, Page, search_tools, tokenize
from jaxlab.agents.tools import ToolCall, ToolRegistry, ToolState
from jaxlab.registry import Registry

__all__ = [
    "Workload",
    "WORKLOADS",
    "CORPUS_MODULES",
    "STOP_WORDS",
    "docstring_corpus",
    "ResearchTask",
    "ResearchConfig",
    "research_policy",
    "research_tasks",
    "research_registry",
]

CORPUS_MODULES: tuple[str, ...] = (
    "abc argparse array ast base64 bisect calendar codecs collections contextlib copy csv "
    "dataclasses datetime difflib enum fnmatch fractions functools glob gzip hashlib heapq hmac "
    "html inspect io itertools json logging math operator os.path pathlib pprint queue random re "
    "secrets shlex shutil statistics string struct subprocess tarfile tempfile textwrap threading "
    "time tokenize typing unicodedata urllib.parse uuid weakref zipfile"
).split()

STOP_WORDS = frozenset(
    "a an and any are as at be been but by can do does for from has have if in into is it its "
    "may more most no not of on one or other return returns same should so such than that the "
    "their them then there these this those to under use used using was were what when where "
    "which while will with would you your self none true false given object new python library "
    "call".split()
)


@functools.cache
def docstring_corpus(modules: tuple[str, ...] = CORPUS_MODULES) -> Corpus:
    """One page per public function or class (with a docstring of 40 characters or more) of each
    module: url ``py://<module>.<name>``, title ``<module>.<name>``, text the docstring."""
    pages: list[Page] = []
    seen: set[str] = set()
    for name in modules:
        module = importlib.import_module(name)
        names = getattr(module, "__all__", None) or [n for n in dir(module) if n[0] != "_"]
        for attr in sorted(set(names)):
            obj = getattr(module, attr, None)
            if obj is None or attr.startswith("_"):
                continue
            if not (inspect.isfunction(obj) or inspect.isbuiltin(obj) or inspect.isclass(obj)):
                continue
            doc = inspect.getdoc(obj) or ""
            url = f"py://{name}.{attr}"
            if len(doc) < 40 or url in seen:
                continue
            seen.add(url)
            pages.append(Page(url, f"{name}.{attr}", doc))
    return Corpus(pages)


def content_words(text: str, exclude: Sequence[str] = ()) -> list[str]:
    """``text``'s tokens less stop words, one-letter tokens, numbers and ``exclude``, first
    occurrences in order."""
    drop = STOP_WORDS | set(exclude)
    out: list[str] = []
    for w in tokenize(text):
        if len(w) > 1 and not w.isdigit() and w not in drop and w not in out:
            out.append(w)
    return out


def _first_sentence(doc: str) -> str:
    para = doc.strip().split("\n\n")[0].replace("\n", " ")
    return para.split(". ")[0]


def _description(page: Page) -> list[str]:
    """The content words of a page's first sentence, less the words of its own name."""
    name = page.title.rsplit(".", 1)[1].lower()
    return content_words(_first_sentence(page.text), [name, *tokenize(name)])


@dataclasses.dataclass(frozen=True)
class ResearchConfig:
    """The task set: ``tasks`` tasks of one to ``max_turns`` questions, ``keep`` the chance a
    description word stays in a question, ``max_fetch`` / ``max_refetch`` pages read after the
    first / refined search, ``min_reads`` the fewest pages read before answering (a researcher
    checks other sources), ``k`` results per search, ``order`` the reading order of a search's
    results (``"rank"``; ``"snippet"``: most question words in title and snippet first), ``seed``
    the words' generator."""

    tasks: int = 200
    max_turns: int = 3
    keep: float = 0.6
    max_fetch: int = 4
    max_refetch: int = 2
    min_reads: int = 3
    k: int = 5
    order: str = "rank"
    seed: int = 0

    def __post_init__(self):
        if self.tasks < 1 or self.max_turns < 1:
            raise ValueError("tasks and max_turns must be >= 1")
        if self.order not in ("rank", "snippet"):
            raise ValueError(f"order must be 'rank' or 'snippet', got {self.order!r}")
        if not 0 < self.keep <= 1:
            raise ValueError(f"keep must be in (0, 1], got {self.keep}")
        if self.max_fetch < 1 or self.max_refetch < 0 or self.k < 1 or self.min_reads < 1:
            raise ValueError("need max_fetch >= 1, max_refetch >= 0, k >= 1, min_reads >= 1")


@dataclasses.dataclass
class ResearchTask:
    """One research task: questions (user turns), their target pages, gold calls per turn
    (``(name, (), arguments)``, as :class:`~jaxlab.agents.bfcl.BFCLTask`), and whether each turn
    found its target."""

    id: str
    turns: list[str]
    targets: list[str]
    gold: list[list[tuple[str, tuple[Any, ...], dict[str, Any]]]]
    found: list[bool]

    @property
    def num_calls(self) -> int:
        return sum(len(t) for t in self.gold)

    def gold_calls(self, registry: ToolRegistry) -> list[list[ToolCall]]:
        """The gold calls per turn, in canonical form."""
        return [[registry.canonical(n, a, k) for n, a, k in turn] for turn in self.gold]


def research_policy(
    question: str,
    target: str,
    call: Callable[[str, dict[str, Any]], Any],
    config: ResearchConfig,
) -> tuple[list[tuple[str, dict[str, Any]]], bool]:
    """The scripted researcher on one question (see the module docstring): calls ``call(name,
    arguments)`` for each step and returns ``(calls, found)``."""
    calls: list[tuple[str, dict[str, Any]]] = []

    def do(name: str, arguments: dict[str, Any]) -> Any:
        calls.append((name, arguments))
        return call(name, arguments)

    words = content_words(question)
    query = " ".join(words)
    fetched: list[str] = []
    first_page = None

    found = False

    def read(results: list[dict], limit: int) -> bool:
        # reads until the target has been read and at least min_reads pages in all
        nonlocal first_page, found
        n = 0
        if config.order == "snippet":
            # most question words in title and snippet first (ties: rank), as a reader who
            # judges the results by their snippets
            def overlap(r: dict) -> int:
                return len(set(words) & set(tokenize(r["title"] + " " + r["snippet"])))

            results = sorted(results, key=lambda r: -overlap(r))  # stable: ties keep rank
        for r in results:
            if n >= limit or (found and len(fetched) >= config.min_reads):
                break
            if r["url"] in fetched:
                continue
            page = do("fetch", {"url": r["url"]})
            fetched.append(r["url"])
            n += 1
            if first_page is None and "content" in page:
                first_page = page["content"]
            found = found or r["url"] == target
        return found

    out = do("web_search", {"query": query, "k": config.k})
    if read(out.get("results", []), config.max_fetch):
        return calls, True
    if config.max_refetch and first_page is not None:
        cand = set(content_words(first_page, words))
        freq = collections.Counter(w for w in tokenize(first_page) if w in cand and len(w) > 2)
        extra = [w for w, _ in sorted(freq.items(), key=lambda wc: (-wc[1], wc[0]))[:2]]
        out = do("web_search", {"query": " ".join([*words, *extra]), "k": config.k})
        if read(out.get("results", []), config.max_refetch):
            return calls, True
    return calls, False


def research_registry(scale: float = 1.0, corpus: Corpus | None = None) -> ToolRegistry:
    """``web_search`` and ``fetch`` over the docstring corpus, latencies scaled by ``scale``."""
    return ToolRegistry(
        search_tools(
            corpus or docstring_corpus(),
            search_latency=latency_profile("web_search", scale),
            fetch_latency=latency_profile("fetch", scale),
        )
    )


def research_tasks(config: ResearchConfig | None = None) -> list[ResearchTask]:
    """The task set (deterministic in ``config``; see the module docstring)."""
    config = config or ResearchConfig()
    corpus = docstring_corpus()
    registry = research_registry(0.0, corpus)
    by_module: dict[str, list[Page]] = collections.defaultdict(list)
    for p in corpus.pages:
        module = p.title.rsplit(".", 1)[0]
        # a target needs a description of at least three words besides its own name
        if len(_description(p)) >= 3:
            by_module[module].append(p)
    modules = sorted(m for m, ps in by_module.items() if len(ps) >= config.max_turns)

    def call(name: str, arguments: dict[str, Any]) -> Any:
        return registry.get(name).fn(**arguments)

    tasks = []
    for i in range(config.tasks):
        rng = np.random.default_rng([config.seed, i])
        module = modules[int(rng.integers(len(modules)))]
        n_turns = int(rng.integers(1, config.max_turns + 1))
        picks = rng.choice(len(by_module[module]), size=n_turns, replace=False)
        turns, targets, gold, found = [], [], [], []
        for j in picks:
            page = by_module[module][int(j)]
            words = _description(page)
            keep = rng.random(len(words)) < config.keep
            if keep.sum() < 3:
                keep[np.argsort(rng.random(len(words)))[:3]] = True
            kept = [w for w, k in zip(words, keep) if k]
            question = f"In Python's {module}, which library call would I use to: {' '.join(kept)}?"
            calls, ok = research_policy(question, page.url, call, config)
            turns.append(question)
            targets.append(page.url)
            gold.append([(n, (), dict(a)) for n, a in calls])
            found.append(ok)
        tasks.append(ResearchTask(f"research_{i}", turns, targets, gold, found))
    return tasks


@dataclasses.dataclass(frozen=True)
class Workload:
    """A benchmark workload: ``load()`` its tasks, ``registry(task, scale)`` a task's tools with
    latencies times ``scale``, ``state(task)`` a task's fresh state; ``profiles`` the latency
    profiles its tools use (for the calibration report); ``title`` for plots."""

    load: Callable[[], list]
    registry: Callable[[Any, float], ToolRegistry]
    state: Callable[[Any], ToolState]
    profiles: tuple[str, ...]
    title: str


def _bfcl() -> Workload:
    from jaxlab.agents.bfcl import bfcl_registry, bfcl_state, load_bfcl_tasks

    def registry(task, scale: float) -> ToolRegistry:
        return bfcl_registry(
            task, {k: latency_profile(k, scale) for k in ("api_read", "api_write")}
        )

    return Workload(
        load_bfcl_tasks,
        registry,
        bfcl_state,
        ("api_read", "api_write"),
        "BFCL multi-turn test tasks",
    )


def _research(config: ResearchConfig | None = None, note: str = "") -> Workload:
    return Workload(
        functools.partial(research_tasks, config),
        lambda task, scale: research_registry(scale),
        lambda task: ToolState({}),
        ("web_search", "fetch"),
        f"research tasks (Python {sys.version_info.major}.{sys.version_info.minor} docs"
        + (f"; {note})" if note else ")"),
    )


WORKLOADS: Registry[Callable[[], Workload]] = Registry("workload")
WORKLOADS.register("bfcl", _bfcl)
WORKLOADS.register("research", _research)
WORKLOADS.register(
    "research_snippet",
    lambda: _research(ResearchConfig(order="snippet"), "results read by snippet"),
)
