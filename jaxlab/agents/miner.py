"""PASTE's pattern miner and predictors: what the next tool call will be, before the model says it.

Control flow
    The context of a step is the ``(tool, status)`` of the last ``k`` events (user turns count, as
    ``("<user>", "turn")``), and, as a second view, of the last ``k`` tool calls (turns skipped).
    For every ``k = 1..K`` and view the miner counts ``n(C -> T)``, how often tool ``T`` followed
    context ``C``; a pattern is kept when ``n(C -> T) >= min_support`` and
    ``p(T | C) = n(C -> T) / n(C) >= min_probability``. Prediction backs off: the longest context
    of the first view with patterns gives candidates first, shorter ones and then the second
    view fill up to ``top_k``.

Data flow
    For each argument of each call the miner lists every :class:`Source` that would have produced
    its value: a constant; an argument of the ``j``-th previous call (``j <= max_back``); a leaf of
    the ``j``-th previous output (a JSON path of keys and list indexes); the ``i``-th quoted string,
    number or name (capitalised words not starting a sentence) in such a leaf's text or in the
    user's latest message. A rule ``T.a <- source`` has
    support (how often the source gave the value) and accuracy (support / occurrences of ``T.a``);
    rules below ``min_support`` / ``min_accuracy`` are dropped and the best ``alternatives`` are
    kept, for ``(previous tool, T, a)`` and, as a fallback, for ``(T, a)``. A tool's candidate calls
    combine its arguments' rules (the ``alternatives`` likeliest combinations); a tool with an
    argument that has no rule is not predicted.

Option ``prompt_words`` (not in PASTE, whose contexts are event metadata only): a turn's first
call is also predicted from the words of the user's message, ``p(T) = sum_w idf(w) p(T | w) /
sum_w idf(w)`` over words seen before a turn's first call in training; these candidates go first.

A pattern is the tuple ``(C, T, f, p)``: context, tool, argument function (one source per
argument) and priority (``p(T | C)`` times the accuracies of its rules, the likelihood that the
whole call is right). Lookups are dictionary hits on at most ``2 K`` context keys, so prediction
takes constant time in the size of the mined table.

Baselines: :class:`BigramPredictor` (the next tool from the last one alone; arguments copied from
the last call's or last output's same-named field, else the most common value) and
:class:`OraclePredictor` (told the true next call: the upper bound).
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import itertools
import json
import math
import re
from collections.abc import Collection, Iterator, Mapping, Sequence
from typing import Any, Protocol

from jaxlab.agents.events import PENDING, USER_TURN, Event, EventLog
from jaxlab.agents.tools import ToolCall

__all__ = [
    "Source",
    "Pattern",
    "Prediction",
    "MinerConfig",
    "PatternTable",
    "mine_patterns",
    "Predictor",
    "BigramPredictor",
    "OraclePredictor",
    "extract_spans",
    "tokenize_words",
]

# a quote mark that is not an apostrophe: no letter or digit on its outer side
_QUOTED = re.compile(r"(?<![A-Za-z0-9])'([^'\n]+?)'(?![A-Za-z0-9])|\"([^\"\n]+)\"")
_NAME = re.compile(r"(?<![.!?]\s)(?<!^)(?<=\s)([A-Z][\w-]*(?:\s[A-Z][\w-]*)*)")
_NUMBER = re.compile(r"(?<![\w.])-?\d+(?:\.\d+)?(?![\w.])")


def _vkey(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


_WORD = re.compile(r"[a-z]+")


def tokenize_words(text: str) -> list[str]:
    """Lower-cased letter runs of a message."""
    return _WORD.findall(text.lower())


def extract_spans(text: str, kind: str) -> list[Any]:
    """The quoted strings (``kind="quoted"``), numbers (``"number"``: int, or float with a
    point) or names (``"name"``: runs of capitalised words that do not start a sentence) in
    ``text``, in order."""
    if kind == "quoted":
        return [a or b for a, b in _QUOTED.findall(text)]
    if kind == "number":
        return [float(m) if "." in m else int(m) for m in _NUMBER.findall(text)]
    if kind == "name":
        # runs of capitalised words that do not start a sentence ("San Francisco", "Rivermist")
        return [m.group(1) for m in _NAME.finditer(text)]
    raise ValueError(f"unknown span kind {kind!r}")


_MISSING = object()
SPAN_KINDS = ("quoted", "number", "name")


@dataclasses.dataclass(frozen=True)
class Source:
    """Where an argument's value comes from.

    kind: ``"const"`` (``value`` as JSON), ``"arg"`` (the previous call ``back`` steps ago, its
    argument at ``path[0]`` then inner path), ``"out"`` (that call's output at ``path``),
    ``"prompt"`` (the user's latest message). ``extract``: ``()`` the value itself, or
    ``("quoted", i)`` / ``("number", i)`` / ``("name", i)`` a span of the text there.
    """

    kind: str
    back: int = 0
    path: tuple = ()
    extract: tuple = ()
    value: str = ""

    def apply(self, tool_events: Sequence[Event], prompt: str) -> Any:
        """The value this source gives now (``_MISSING`` when it gives none)."""
        if self.kind == "const":
            return json.loads(self.value)
        if self.kind == "prompt":
            x: Any = prompt
        else:
            if self.back > len(tool_events):
                return _MISSING
            ev = tool_events[-self.back]
            x = ev.arguments if self.kind == "arg" else ev.output
            if x is PENDING:
                return _MISSING
            for p in self.path:
                if isinstance(x, Mapping) and not isinstance(p, int) and p in x:
                    x = x[p]
                elif isinstance(x, list) and isinstance(p, int) and 0 <= p < len(x):
                    x = x[p]
                else:
                    return _MISSING
        if self.extract:
            if not isinstance(x, str):
                return _MISSING
            spans = extract_spans(x, self.extract[0])
            i = self.extract[1]
            return spans[i] if i < len(spans) else _MISSING
        return x

    @property
    def complexity(self) -> tuple:
        order = {"const": 0, "arg": 1, "out": 2, "prompt": 3}[self.kind]
        return (order, self.back, len(self.path), len(self.extract))


def _leaves(x: Any, path: tuple = (), depth: int = 0, limit: list | None = None) -> Iterator:
    """``(path, value)`` for ``x`` and everything inside it (bounded in depth and count)."""
    limit = [400] if limit is None else limit
    if limit[0] <= 0:
        return
    limit[0] -= 1
    yield path, x
    if depth >= 4:
        return
    if isinstance(x, Mapping):
        for k, v in x.items():
            if isinstance(k, str):
                yield from _leaves(v, (*path, k), depth + 1, limit)
    elif isinstance(x, list):
        for i, v in enumerate(x[:50]):
            yield from _leaves(v, (*path, i), depth + 1, limit)


def _with_spans(base: Source, value: Any) -> Iterator[tuple[Source, Any]]:
    yield base, value
    if isinstance(value, str):
        for kind in SPAN_KINDS:
            for i, v in enumerate(extract_spans(value, kind)[:20]):
                yield dataclasses.replace(base, extract=(kind, i)), v


def candidate_sources(
    tool_events: Sequence[Event], prompt: str, max_back: int
) -> dict[str, list[Source]]:
    """Every non-constant source available now, by the JSON of the value it gives."""
    index: dict[str, list[Source]] = collections.defaultdict(list)
    for j in range(1, min(max_back, len(tool_events)) + 1):
        ev = tool_events[-j]
        for kind, root in (("arg", ev.arguments), ("out", ev.output)):
            for path, value in _leaves(root):
                if kind == "arg" and not path:
                    continue
                for src, v in _with_spans(Source(kind, j, path), value):
                    index[_vkey(v)].append(src)
    for kind in SPAN_KINDS:
        for i, v in enumerate(extract_spans(prompt, kind)[:20]):
            index[_vkey(v)].append(Source("prompt", extract=(kind, i)))
    return index


@dataclasses.dataclass(frozen=True)
class Pattern:
    """``(C, T, f, p)``: context, tool, argument function (a source per argument), priority."""

    context: tuple[tuple[str, str], ...]
    tool: str
    args: Mapping[str, Source]
    priority: float


@dataclasses.dataclass(frozen=True)
class Prediction:
    call: ToolCall
    probability: float
    pattern: Pattern | None = None


@dataclasses.dataclass(frozen=True)
class MinerConfig:
    """Mining settings (see the module docstring)."""

    max_context: int = 3
    min_support: int = 2
    min_probability: float = 0.05
    min_accuracy: float = 0.2
    max_back: int = 3
    top_k: int = 3
    prompt_words: bool = False
    alternatives: int = 2

    def __post_init__(self):
        if self.max_context < 1:
            raise ValueError(f"max_context must be >= 1, got {self.max_context}")
        if self.min_support < 1:
            raise ValueError(f"min_support must be >= 1, got {self.min_support}")
        for name in ("min_probability", "min_accuracy"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {v}")
        if self.alternatives < 1:
            raise ValueError(f"alternatives must be >= 1, got {self.alternatives}")
        if self.max_back < 1 or self.top_k < 1:
            raise ValueError(f"max_back and top_k must be >= 1, got {self.max_back}, {self.top_k}")


class Predictor(Protocol):
    def predict(
        self, log: EventLog, top_k: int, allowed: Collection[str] | None = None
    ) -> list[Prediction]:
        """The likeliest next calls, best first; only tools in ``allowed`` (the task's tools)
        when it is given."""
        ...


def _context(events: Sequence[Event], k: int) -> tuple[tuple[str, str], ...] | None:
    if len(events) < k:
        return None
    return tuple(e.signature for e in events[len(events) - k :])


def _context_keys(events: Sequence[Event], tool_events: Sequence[Event], max_k: int) -> list:
    """The lookup keys of a step, most specific first: the last ``k = K..1`` events (user turns
    included), then the last ``k`` tool calls (turns skipped)."""
    keys = []
    for view, evs in (("f", events), ("t", tool_events)):
        for k in range(min(max_k, len(evs)), 0, -1):
            keys.append((view, _context(evs, k)))
    return keys


@dataclasses.dataclass
class _Rule:
    source: Source
    support: int
    accuracy: float


class PatternTable:
    """The mined patterns: ``flow[(view, C)]`` -> ``[(T, p), ...]`` best first, argument rules by
    ``(previous tool, T)`` and ``T``, and the usual argument names of each tool."""

    def __init__(self, config: MinerConfig):
        self.config = config
        # (view, context) -> [(tool, p), ...] best first; view "f": all events, "t": tool calls
        # only (the last calls, across turn boundaries)
        self.flow: dict[tuple, list[tuple[str, float]]] = {}
        self.rules: dict[tuple, dict[str, list[_Rule]]] = {}  # best first
        self.arg_names: dict[tuple, tuple[str, ...]] = {}
        # word of a user message -> Counter of the turn's first tool (the prompt_words option)
        self.words: dict[str, collections.Counter] = {}
        self.turns = 0
        self.prompt_words = config.prompt_words

    def with_prompt_words(self, on: bool = True) -> PatternTable:
        """The same table, predicting a turn's first call from the user's words too (or not)."""
        other = copy.copy(self)
        other.prompt_words = on
        return other

    def _word_candidates(self, prompt: str) -> list[tuple[str, float]]:
        """``p(T) = sum_w idf(w) p(T | w) / sum_w idf(w)`` over the message's words seen at
        least ``min_support`` times before a turn's first call; best first."""
        scores: collections.Counter = collections.Counter()
        total = 0.0
        for w in set(tokenize_words(prompt)):
            counter = self.words.get(w)
            if counter is None:
                continue
            n = sum(counter.values())
            idf = math.log(self.turns / n)
            if idf <= 0:
                continue
            total += idf
            for t, c in counter.items():
                scores[t] += idf * c / n
        if total == 0:
            return []
        return [
            (t, v / total)
            for t, v in scores.most_common()
            if v / total >= self.config.min_probability
        ]

    def _rules_for(self, prev: str, tool: str) -> dict[str, list[_Rule]] | None:
        """Each argument's rules, best first (those for ``(prev, tool)``, then ``tool``'s); None
        when an argument has none."""
        names = self.arg_names.get((prev, tool), self.arg_names.get((tool,)))
        if names is None:
            return None
        specific, general = self.rules.get((prev, tool), {}), self.rules.get((tool,), {})
        out = {}
        for a in names:
            rules = list(specific.get(a, ()))
            rules += [r for r in general.get(a, ()) if r.source not in {x.source for x in rules}]
            if not rules:
                return None
            out[a] = rules[: self.config.alternatives]
        return out

    def _calls(self, tool, rules, p, tool_events, prompt) -> list[tuple[ToolCall, float, dict]]:
        """The tool's candidate calls from its rules' alternatives, most likely first."""
        values = []
        for a, alts in rules.items():
            opts = []
            for r in alts:
                v = r.source.apply(tool_events, prompt)
                if v is not _MISSING and all(_vkey(v) != _vkey(o[0]) for o in opts):
                    opts.append((v, r))
            if not opts:
                return []
            values.append((a, opts))
        out = []
        for combo in itertools.product(*(opts for _, opts in values)):
            prob = p
            for _, r in combo:
                prob *= r.accuracy
            args = {a: v for (a, _), (v, _) in zip(values, combo)}
            sources = {a: r.source for (a, _), (_, r) in zip(values, combo)}
            out.append((ToolCall(tool, dict(sorted(args.items()))), prob, sources))
        out.sort(key=lambda x: -x[1])
        return out[: self.config.alternatives]

    def predict(
        self, log: EventLog, top_k: int | None = None, allowed: Collection[str] | None = None
    ) -> list[Prediction]:
        """The best ``top_k`` calls for the step after ``log`` (constant time), of tools in
        ``allowed`` when given (the task's tools: patterns of other tools are passed over)."""
        top_k = top_k or self.config.top_k
        events = log.events
        tool_events = [e for e in events if not e.is_turn]
        prompt = log.last_prompt()
        prev = tool_events[-1].tool if tool_events else USER_TURN
        out: list[Prediction] = []
        seen: set[str] = set()
        lookups = [
            (ctx, self.flow.get((view, ctx), ()))
            for view, ctx in _context_keys(events, tool_events, self.config.max_context)
        ]
        if self.prompt_words and events and events[-1].is_turn:
            lookups.insert(0, ((("<words>", "turn"),), self._word_candidates(prompt)))
        for ctx, candidates in lookups:
            for tool, p in candidates:
                if len(out) >= top_k:
                    return out
                if allowed is not None and tool not in allowed:
                    continue
                rules = self._rules_for(prev, tool)
                if rules is None:
                    continue
                for call, prob, sources in self._calls(tool, rules, p, tool_events, prompt):
                    if call.key in seen or len(out) >= top_k:
                        continue
                    seen.add(call.key)
                    out.append(Prediction(call, prob, Pattern(ctx, tool, sources, prob)))
        return out[:top_k]

    def patterns(self) -> list[Pattern]:
        """Every control-flow pattern with its argument function (those with rules)."""
        out = []
        for (_, ctx), tools in self.flow.items():
            prev = ctx[-1][0]
            for tool, p in tools:
                rules = self._rules_for(prev, tool)
                if rules is not None:
                    sources = {a: r[0].source for a, r in rules.items()}
                    out.append(Pattern(ctx, tool, sources, p))
        return out


def mine_patterns(logs: Sequence[EventLog], config: MinerConfig | None = None) -> PatternTable:
    """Mines control-flow patterns and data-flow rules from training event logs."""
    config = config or MinerConfig()
    table = PatternTable(config)
    flow: dict[tuple, collections.Counter] = collections.defaultdict(collections.Counter)
    support: dict[tuple, dict[str, collections.Counter]] = collections.defaultdict(
        lambda: collections.defaultdict(collections.Counter)
    )
    occurrences: dict[tuple, collections.Counter] = collections.defaultdict(collections.Counter)
    names: dict[tuple, collections.Counter] = collections.defaultdict(collections.Counter)
    words: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for log in logs:
        events = log.events
        for i, ev in enumerate(events):
            if ev.is_turn:
                continue
            before = events[:i]
            tool_before = [e for e in before if not e.is_turn]
            for key in _context_keys(before, tool_before, config.max_context):
                flow[key][ev.tool] += 1
            if before and before[-1].is_turn:
                table.turns += 1
                for w in set(tokenize_words(str(before[-1].output))):
                    words[w][ev.tool] += 1
            prompt = next((str(e.output) for e in reversed(before) if e.is_turn), "")
            prev = tool_before[-1].tool if tool_before else USER_TURN
            keys = [(prev, ev.tool), (ev.tool,)]
            index = candidate_sources(tool_before, prompt, config.max_back)
            argnames = tuple(sorted(ev.arguments))
            for key in keys:
                names[key][argnames] += 1
            for a, value in ev.arguments.items():
                vk = _vkey(value)
                sources = {*index.get(vk, ()), Source("const", value=vk)}
                for key in keys:
                    occurrences[key][a] += 1
                    for s in sources:
                        support[key][a][s] += 1
    cfg = config
    for key, counter in flow.items():
        total = sum(counter.values())
        kept = [
            (t, n / total)
            for t, n in counter.most_common()
            if n >= cfg.min_support and n / total >= cfg.min_probability
        ]
        if kept:
            table.flow[key] = kept
    for key, per_arg in support.items():
        rules = {}
        for a, counter in per_arg.items():
            total = occurrences[key][a]
            kept = []
            for s, n in counter.items():
                acc = n / total
                if n < cfg.min_support or acc < cfg.min_accuracy:
                    continue
                kept.append(((acc, n, tuple(-x for x in s.complexity)), _Rule(s, n, acc)))
            if kept:
                kept.sort(key=lambda x: x[0], reverse=True)
                rules[a] = [r for _, r in kept[: cfg.alternatives]]
        table.rules[key] = rules
    for key, counter in names.items():
        table.arg_names[key] = counter.most_common(1)[0][0]
    table.words = {w: c for w, c in words.items() if sum(c.values()) >= cfg.min_support}
    return table


class BigramPredictor:
    """The next tool from the last tool alone; each argument copied from the last call's argument
    or the last output's field of the same name, else its most common training value."""

    def __init__(self, logs: Sequence[EventLog]):
        self.next: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        self.arg_names: dict[str, collections.Counter] = collections.defaultdict(
            collections.Counter
        )
        self.values: dict[tuple[str, str], collections.Counter] = collections.defaultdict(
            collections.Counter
        )
        for log in logs:
            prev = USER_TURN
            for ev in log.events:
                if ev.is_turn:
                    continue
                self.next[prev][ev.tool] += 1
                self.arg_names[ev.tool][tuple(sorted(ev.arguments))] += 1
                for a, v in ev.arguments.items():
                    self.values[(ev.tool, a)][_vkey(v)] += 1
                prev = ev.tool

    def predict(
        self, log: EventLog, top_k: int = 3, allowed: Collection[str] | None = None
    ) -> list[Prediction]:
        tool_events = log.tool_events()
        last = tool_events[-1] if tool_events else None
        counter = self.next.get(last.tool if last else USER_TURN)
        if not counter:
            return []
        total = sum(counter.values())
        out = []
        ranked = [(t, n) for t, n in counter.most_common() if allowed is None or t in allowed]
        for tool, n in ranked[:top_k]:
            args = {}
            for a in self.arg_names[tool].most_common(1)[0][0]:
                if last is not None and a in last.arguments:
                    args[a] = last.arguments[a]
                elif last is not None and isinstance(last.output, Mapping) and a in last.output:
                    args[a] = last.output[a]
                else:
                    args[a] = json.loads(self.values[(tool, a)].most_common(1)[0][0])
            out.append(Prediction(ToolCall(tool, dict(sorted(args.items()))), n / total))
        return out


class OraclePredictor:
    """Knows the task's calls, ``calls[t]`` the calls of user turn ``t``: after ``n`` tool events
    it predicts the ``n``-th call. At the end of a turn, when the model answers instead, that is
    the next turn's first call; with ``within_turn`` it predicts nothing there (the next turn's
    calls are known from its message on)."""

    def __init__(self, calls: Sequence[Sequence[ToolCall]], within_turn: bool = False):
        self.turns = [list(t) for t in calls]
        self.calls = [c for t in self.turns for c in t]
        self.within_turn = within_turn

    def predict(
        self, log: EventLog, top_k: int = 1, allowed: Collection[str] | None = None
    ) -> list[Prediction]:
        if self.within_turn:
            turn = sum(1 for e in log.events if e.is_turn) - 1
            n = 0
            for e in reversed(log.events):
                if e.is_turn:
                    break
                n += 1
            calls = self.turns[turn] if 0 <= turn < len(self.turns) else []
        else:
            calls, n = self.calls, len(log.tool_events())
        return [Prediction(calls[n], 1.0)] if n < len(calls) else []
