"""The research-agent workload: the docstring corpus, the scripted policy's traces (deterministic,
valid against the tools, following the documented rules, checked by an independent walk of the
rules), and lossless replay of a few research tasks (small latencies)."""

from __future__ import annotations

import inspect
import json

import pytest

from jaxlab.agents.search import tokenize
from jaxlab.agents.workloads import (
    STOP_WORDS,
    WORKLOADS,
    ResearchConfig,
    docstring_corpus,
    research_registry,
    research_tasks,
)

CONFIG = ResearchConfig(tasks=40)


@pytest.fixture(scope="module")
def tasks():
    return research_tasks(CONFIG)


def test_corpus_pages_are_the_docstrings():
    import textwrap

    corpus = docstring_corpus()
    assert len(corpus.pages) > 300
    page = corpus.by_url["py://textwrap.dedent"]
    assert page.title == "textwrap.dedent" and page.text == inspect.getdoc(textwrap.dedent)
    assert all(len(p.text) >= 40 for p in corpus.pages)


def test_tasks_are_deterministic_and_depend_on_the_seed(tasks):
    again = research_tasks(CONFIG)
    assert [(t.id, t.turns, t.targets, t.gold, t.found) for t in tasks] == [
        (t.id, t.turns, t.targets, t.gold, t.found) for t in again
    ]
    other = research_tasks(ResearchConfig(tasks=40, seed=1))
    assert [t.turns for t in other] != [t.turns for t in tasks]
    with pytest.raises(ValueError):
        ResearchConfig(keep=0.0)


@pytest.mark.parametrize("order", ["rank", "snippet"])
def test_traces_are_valid_and_follow_the_policy(order):
    """Re-walk each gold turn with the tools: the query is the question's words less stop words;
    every fetch is the first unread result of the latest search in reading order (rank, or most
    question words in title + snippet); a turn stops exactly when the rules say (target read and
    min_reads pages, or the fetch limits reached)."""
    c = ResearchConfig(tasks=40, order=order)
    tasks = research_tasks(c)
    registry = research_registry(0.0)
    search, fetch = registry.get("web_search").fn, registry.get("fetch").fn
    n_reordered = 0
    n_calls = n_refined = 0
    for task in tasks:
        assert len(task.turns) == len(task.gold) == len(task.targets) <= c.max_turns
        for question, target, calls, found in zip(task.turns, task.targets, task.gold, task.found):
            for name, args, kwargs in calls:
                registry.canonical(name, args, kwargs)  # valid against the tools' signatures
            words = [
                w
                for w in tokenize(question)
                if w not in STOP_WORDS and len(w) > 1 and not w.isdigit()
            ]
            words = list(dict.fromkeys(words))
            assert calls[0] == ("web_search", (), {"query": " ".join(words), "k": c.k})
            read: list[str] = []
            results: list[str] = []
            per_search = 0
            searches = 0
            for i, (name, _, kw) in enumerate(calls):
                if name == "web_search":
                    searches += 1
                    if searches == 2:
                        n_refined += 1
                        assert kw["query"].startswith(" ".join(words) + " ")
                        assert len(kw["query"].split()) == len(words) + 2
                    hits = search(**kw)["results"]
                    results = [r["url"] for r in hits]
                    if order == "snippet":
                        score = {
                            r["url"]: len(
                                set(words) & set(tokenize(r["title"] + " " + r["snippet"]))
                            )
                            for r in hits
                        }
                        # a stable sort by score, written out: highest first, then by rank
                        results = [
                            u
                            for _, _, u in sorted((-score[u], i, u) for i, u in enumerate(results))
                        ]
                        n_reordered += results != [r["url"] for r in hits]
                    per_search = 0
                    continue
                unread = [u for u in results if u not in read]
                assert kw == {"url": unread[0]}  # best-ranked unread result
                assert "content" in fetch(**kw)
                read.append(kw["url"])
                per_search += 1
                done = target in read and len(read) >= c.min_reads
                last = i == len(calls) - 1
                limit = c.max_fetch if searches == 1 else c.max_refetch
                if done:
                    assert last  # stops as soon as the rule is met
                elif last:
                    assert searches == 2  # not found after the first search: it refined
                else:
                    nxt = calls[i + 1][0]
                    # another fetch while under the limit and results remain, else a refinement
                    if per_search < limit and len(unread) > 1:
                        assert nxt == "fetch"
                    else:
                        assert nxt == "web_search" and searches == 1
            assert searches <= 2
            assert found == (target in read)
            n_calls += len(calls)
    assert n_calls > 4 * sum(len(t.turns) for t in tasks)  # long chains: search + >= 3 fetches
    assert n_refined >= 1  # the refinement path is exercised
    assert (n_reordered > 0) == (order == "snippet")


def test_research_replay_is_lossless_and_speculation_pays():
    from jaxlab.agents.bench import BenchConfig, training_logs
    from jaxlab.agents.miner import MinerConfig, mine_patterns
    from jaxlab.testing import replay_modes

    workload = WORKLOADS.get("research")()
    all_tasks = research_tasks(ResearchConfig(tasks=40))
    train, chosen = all_tasks[:37], all_tasks[37:]
    table = mine_patterns(training_logs(train, workload), MinerConfig())
    config = BenchConfig(seed=0, workload="research")
    promoted = 0
    for task, runs, want in replay_modes(chosen, table, config, scale=0.01, workload=workload):
        assert runs["serial"].outputs == want
        assert runs["serial"].calls == task.num_calls
        for mode in ("paste", "oracle"):
            assert runs[mode].outputs == want, (task.id, mode)
        promoted += runs["paste"].stats["promoted"]
        assert runs["oracle"].stats["promoted"] == runs["oracle"].calls
    # the fetches after a search are predicted from its output (results[i].url)
    assert promoted >= sum(t.num_calls - len(t.turns) for t in chosen) // 2


def test_agents_bench_command_on_research_tasks(tmp_path):
    from jaxlab.agents.bench import BenchConfig
    from jaxlab.cli import main

    out = tmp_path / "r.json"
    argv = ["agents", "bench", "--workload", "research", "--sleep-per-token", "0.2"]
    argv += ["--test-tasks", "2", "--quiet", "--modes", "serial,paste", "--json", str(out)]
    assert main(argv) == 0
    result = json.loads(out.read_text())
    assert result["config"]["workload"] == "research"
    cal = result["calibration"]
    assert cal["test_tasks"] == 2 and cal["train_tasks"] == 140
    assert cal["fetch_median_s"] == pytest.approx(1.0 * cal["latency_scale"])
    assert result["summary"]["paste"]["lossless"]
    with pytest.raises(SystemExit):  # argparse rejects an unknown workload
        main(["agents", "bench", "--workload", "nope", "--quiet"])
    with pytest.raises(ValueError, match="workload"):
        BenchConfig(workload="nope")
