"""The pattern miner on hand-made logs whose patterns and argument sources are known, control-flow
probabilities against brute-force counts, backoff, thresholds, and the baselines."""

from __future__ import annotations

import collections

import pytest

from jaxlab.agents.events import PENDING, Event, EventLog
from jaxlab.agents.miner import (
    BigramPredictor,
    MinerConfig,
    OraclePredictor,
    Source,
    extract_spans,
    mine_patterns,
)
from jaxlab.agents.tools import ToolCall

TOPICS = ["ring", "sky", "tool", "bias", "loss", "cache"]


def _log(i: int, topic: str, *, save: bool, tag: bool = False) -> EventLog:
    """turn -> search(query = the prompt's quoted topic) -> fetch(url = first result's url) ->
    [save(name = "notes.txt", text = the fetched content)] [tag(label = something unrelated)]."""
    log = EventLog(f"t{i}")
    log.user_turn(f"Find the paper about '{topic}' and read it, number {i + 10}.")
    urls = [f"https://x/{topic}/{j}" for j in range(3)]
    log.append(
        Event("search", "ok", {"query": topic}, {"results": [{"url": u, "rank": 1} for u in urls]})
    )
    log.append(Event("fetch", "ok", {"url": urls[0]}, {"content": f"all about {topic} {i}"}))
    if save:
        log.append(
            Event("save", "ok", {"name": "notes.txt", "text": f"all about {topic} {i}"}, "saved")
        )
    if tag:
        log.append(Event("tag", "ok", {"label": f"label-{i * 7}"}, "tagged"))
    return log


@pytest.fixture
def logs():
    out = [_log(i, t, save=i < 4, tag=i == 5) for i, t in enumerate(TOPICS)]
    return out


def test_extract_spans():
    text = "I'd like 'a.txt' and \"b c\", it's 20 or 3.5 ('x')"
    assert extract_spans(text, "quoted") == ["a.txt", "b c", "x"]
    assert extract_spans(text, "number") == [20, 3.5]
    assert isinstance(extract_spans("7 lines", "number")[0], int)
    text = "Drive from San Francisco to Rivermist. Then call Catherine Smith. Done"
    assert extract_spans(text, "name") == ["San Francisco", "Rivermist", "Catherine Smith"]


def test_mined_rules_are_the_known_sources(logs):
    table = mine_patterns(logs, MinerConfig(min_support=2, min_accuracy=0.5))
    rule = table.rules[("search",)]["query"][0]
    assert rule.source == Source("prompt", extract=("quoted", 0))
    assert (rule.support, rule.accuracy) == (6, 1.0)
    rule = table.rules[("fetch",)]["url"][0]
    assert rule.source == Source("out", 1, ("results", 0, "url"))
    assert rule.accuracy == 1.0
    save = {a: rules[0] for a, rules in table.rules[("fetch", "save")].items()}
    assert save["name"].source.kind == "const" and save["name"].source.value == '"notes.txt"'
    assert save["text"].source == Source("out", 1, ("content",))
    # the tag label has no source above the thresholds: tag is never predicted
    assert "label" not in table.rules[("tag",)]


def test_control_flow_probabilities_match_brute_force(logs):
    cfg = MinerConfig(max_context=3, min_support=1, min_probability=0.0, min_accuracy=0.5)
    table = mine_patterns(logs, cfg)
    # brute force: every (view, last k signatures) -> next tool, counted by enumeration
    counts = collections.defaultdict(collections.Counter)
    for log in logs:
        evs = list(log)
        for i, ev in enumerate(evs):
            if ev.is_turn:
                continue
            full = [e.signature for e in evs[:i]]
            tools = [e.signature for e in evs[:i] if not e.is_turn]
            for view, seq in (("f", full), ("t", tools)):
                for k in range(1, 4):
                    if len(seq) >= k:
                        counts[(view, tuple(seq[-k:]))][ev.tool] += 1
    assert set(table.flow) == set(counts)
    for key, c in counts.items():
        total = sum(c.values())
        got = dict(table.flow[key])
        assert got == pytest.approx({t: n / total for t, n in c.items()}, abs=1e-15)
    after_fetch = dict(table.flow[("t", (("fetch", "ok"),))])
    assert after_fetch == pytest.approx({"save": 4 / 5, "tag": 1 / 5})


def test_prediction_applies_patterns_to_a_new_task(logs):
    table = mine_patterns(logs, MinerConfig(min_support=2, min_accuracy=0.5))
    log = EventLog("new")
    log.user_turn("Now find the paper about 'zebra', please.")
    (top, *_) = table.predict(log, 3)
    assert top.call == ToolCall("search", {"query": "zebra"})
    assert top.probability == pytest.approx(1.0)
    assert top.pattern.context == (("<user>", "turn"),)
    log.append(
        Event("search", "ok", {"query": "zebra"}, {"results": [{"url": "z0"}, {"url": "z1"}]})
    )
    top = table.predict(log, 3)[0]
    assert top.call == ToolCall("fetch", {"url": "z0"})
    # the longest context (turn, search, ...) was seen: probability 1 from it
    assert len(top.pattern.context) == 2
    log.append(Event("fetch", "ok", {"url": "z0"}, {"content": "zebras"}))
    preds = table.predict(log, 3)
    assert preds[0].call == ToolCall("save", {"name": "notes.txt", "text": "zebras"})
    assert preds[0].probability == pytest.approx(4 / 5)  # save followed fetch in 4 of 5 logs
    assert all(p.call.name != "tag" for p in preds)  # no rule for its label
    # looking ahead: the fetch is still running, so rules that read its output give nothing
    ahead = EventLog("new", [*log.events[:-1], Event("fetch", "ok", {"url": "z0"}, PENDING)])
    assert table.predict(ahead, 3) == []


def test_backoff_and_support_threshold(logs):
    table = mine_patterns(logs, MinerConfig(max_context=3, min_support=2, min_accuracy=0.5))
    # a context never seen at any length in the full view: search after an error
    log = EventLog("odd")
    log.user_turn("Find the paper about 'owl'.")
    log.append(Event("search", "error", {"query": "owl"}, {"error": "down"}))
    log.append(Event("search", "ok", {"query": "owl"}, {"results": [{"url": "o0"}]}))
    (top, *_) = table.predict(log, 3)
    assert top.call == ToolCall("fetch", {"url": "o0"})
    assert top.pattern.context == (("search", "ok"),)  # backed off to k = 1
    # tag followed fetch once: below min_support 2, so no pattern for it at all
    assert all(t != "tag" for tools in table.flow.values() for t, _ in tools)
    assert any(
        t == "tag"
        for tools in mine_patterns(logs, MinerConfig(min_support=1)).flow.values()
        for t, _ in tools
    )


def test_lookup_is_constant_time(logs):
    """A prediction reads at most 2 K context keys of the flow table, however large it is."""
    big = logs + [_log(100 + i, f"x{i}", save=bool(i % 2)) for i in range(200)]
    table = mine_patterns(big, MinerConfig(max_context=3))

    class Counting(dict):
        gets = 0

        def get(self, *a):
            Counting.gets += 1
            return super().get(*a)

    table.flow = Counting(table.flow)
    log = _log(999, "new", save=True)
    for n in range(1, len(log) + 1):
        Counting.gets = 0
        table.predict(EventLog("q", log.events[:n]), 3)
        assert Counting.gets <= 2 * 3


def test_config_validation():
    with pytest.raises(ValueError, match="min_accuracy"):
        MinerConfig(min_accuracy=1.5)
    with pytest.raises(ValueError, match="max_context"):
        MinerConfig(max_context=0)


def test_bigram_and_oracle(logs):
    bigram = BigramPredictor(logs)
    log = _log(50, "new", save=False)
    preds = bigram.predict(EventLog("q", log.events[:2]), 3)  # after search
    assert preds[0].call.name == "fetch" and preds[0].probability == 1.0
    # nothing named "url" in the last call or output: the most common training value
    # (each seen once: the first one)
    assert preds[0].call.arguments == {"url": "https://x/ring/0"}
    preds = bigram.predict(EventLog("q", log.events[:3]), 3)  # after fetch
    assert [p.call.name for p in preds] == ["save", "tag"]
    assert preds[0].probability == pytest.approx(4 / 5)
    calls = [ToolCall("a", {}), ToolCall("b", {"x": 1}), ToolCall("c", {})]
    oracle = OraclePredictor([calls[:2], calls[2:]])
    in_turn = OraclePredictor([calls[:2], calls[2:]], within_turn=True)
    log = EventLog("o")
    log.user_turn("go")
    assert oracle.predict(log)[0].call == calls[0] == in_turn.predict(log)[0].call
    log.append(Event("a", "ok", {}, None))
    assert oracle.predict(log)[0].call == calls[1] == in_turn.predict(log)[0].call
    log.append(Event("b", "ok", {"x": 1}, None))
    # end of turn 0: the plain oracle already knows turn 1's first call, the turn oracle not yet
    assert oracle.predict(log)[0].call == calls[2] and in_turn.predict(log) == []
    log.user_turn("more")
    assert in_turn.predict(log)[0].call == calls[2]
    log.append(Event("c", "ok", {}, None))
    assert oracle.predict(log) == [] and in_turn.predict(log) == []


def test_sources_apply():
    evs = [
        Event("a", "ok", {"p": "x", "q": [1, 2]}, {"out": [{"v": "hello 'w' 42"}]}),
        Event("b", "ok", {}, "text with 'quoted' 7"),
    ]
    prompt = "use 'alpha' then 3"
    cases = {
        Source("arg", 2, ("p",)): "x",
        Source("arg", 2, ("q", 1)): 2,
        Source("out", 2, ("out", 0, "v"), ("quoted", 0)): "w",
        Source("out", 2, ("out", 0, "v"), ("number", 0)): 42,
        Source("out", 1, (), ("quoted", 0)): "quoted",
        Source("prompt", extract=("quoted", 0)): "alpha",
        Source("prompt", extract=("number", 0)): 3,
        Source("const", value='[1, "a"]'): [1, "a"],
    }
    for src, want in cases.items():
        assert src.apply(evs, prompt) == want, src
    from jaxlab.agents.miner import _MISSING

    for src in (Source("arg", 3, ("p",)), Source("out", 2, ("out", 5)), Source("arg", 1, ("z",))):
        assert src.apply(evs, prompt) is _MISSING


def _turn_log(i: int, prompt: str, call: ToolCall) -> EventLog:
    log = EventLog(f"w{i}")
    log.user_turn(prompt)
    log.append(Event(call.name, "ok", dict(call.arguments), {"ok": True}))
    return log


def test_argument_alternatives_are_ranked_by_accuracy():
    logs = [_turn_log(i, "open my folder", ToolCall("cd", {"folder": "docs"})) for i in range(3)]
    logs += [
        _turn_log(3 + i, f"open the '{f}' folder", ToolCall("cd", {"folder": f}))
        for i, f in enumerate(["src", "tmp"])
    ]
    log = EventLog("q")
    log.user_turn("open the 'bin' folder")
    preds = mine_patterns(logs, MinerConfig(alternatives=2)).predict(log, 3)
    assert [p.call.arguments["folder"] for p in preds] == ["docs", "bin"]
    assert [p.probability for p in preds] == pytest.approx([3 / 5, 2 / 5])
    preds = mine_patterns(logs, MinerConfig(alternatives=1)).predict(log, 3)
    assert [p.call.arguments["folder"] for p in preds] == ["docs"]


def test_prompt_words_predict_a_turns_first_call():
    logs = [
        _turn_log(i, f"What is the weather in '{c}'?", ToolCall("weather", {"city": c}))
        for i, c in enumerate(["Oslo", "Rome", "Lima"])
    ]
    logs += [
        _turn_log(3 + i, f"What is the stock price of '{s}'?", ToolCall("stock", {"symbol": s}))
        for i, s in enumerate(["AAA", "BBB", "CCC"])
    ]
    table = mine_patterns(logs, MinerConfig())
    log = EventLog("q")
    log.user_turn("And the stock price of 'ZZZ'?")
    plain = table.predict(log, 1)[0]  # the turn alone: weather and stock are equally likely
    assert plain.probability == pytest.approx(0.5)
    (top,) = table.with_prompt_words(True).predict(log, 1)
    # "stock", "price", "of" were seen only before stock (p = 1 each); "and" and "zzz" never;
    # "the" before every first call (idf 0): p(stock) = 1 exactly
    assert top.call == ToolCall("stock", {"symbol": "ZZZ"}) and top.probability == pytest.approx(
        1.0
    )
    assert not table.prompt_words and table.with_prompt_words(True).prompt_words


def test_predictions_keep_to_the_tasks_tools(logs):
    table = mine_patterns(logs, MinerConfig(min_support=1, min_accuracy=0.1, alternatives=1))
    log = _log(77, "owl", save=False)
    assert [p.call.name for p in table.predict(log, 3)] == ["save", "tag"]
    assert [p.call.name for p in table.predict(log, 3, allowed={"tag", "fetch"})] == ["tag"]
    assert table.predict(log, 3, allowed={"search"}) == []
    bigram = BigramPredictor(logs)
    assert [p.call.name for p in bigram.predict(log, 3, allowed={"tag"})] == ["tag"]
