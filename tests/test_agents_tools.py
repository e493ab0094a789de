"""Agent tools: latency distributions, canonical calls, state fingerprints, the BFCL tools and their
declared effects, BM25 search against a brute-force scorer, subprocess tools."""

from __future__ import annotations

import copy
import datetime
import math
import random
import time

import numpy as np
import pytest

from jaxlab.agents.bfcl import (
    EFFECTS,
    bfcl_registry,
    bfcl_state,
    load_bfcl_tasks,
    parse_gold_call,
)
from jaxlab.agents.executor import run_tool
from jaxlab.agents.latency import LatencyModel, latency_profile
from jaxlab.agents.sandbox import exec_tools
from jaxlab.agents.search import Corpus, Page, markdown_corpus, search_tools, tokenize
from jaxlab.agents.tools import Effect, Tool, ToolCallError, ToolRegistry, fingerprint


# -- latency ---------------------------------------------------------------------------------------
def test_lognormal_latency_matches_its_median_p95_and_mean():
    from scipy.stats import lognorm

    lat = LatencyModel(0.4, 1.2, scale=2.0)
    ref = lognorm(s=lat.sigma, scale=0.8)  # scipy's parametrisation: scale = exp(mu)
    assert ref.median() == pytest.approx(0.8, rel=1e-12)
    assert ref.ppf(0.95) == pytest.approx(2.4, rel=1e-12)
    assert lat.mean == pytest.approx(ref.mean(), rel=1e-12)
    draws = np.array([lat.sample(7, "call", i) for i in range(20000)])
    # sampling error of the median / p95 / mean here is < 1% (one standard error ~0.6%)
    assert np.median(draws) == pytest.approx(0.8, rel=0.03)
    assert np.percentile(draws, 95) == pytest.approx(2.4, rel=0.05)
    assert draws.mean() == pytest.approx(ref.mean(), rel=0.03)
    assert lat.sample(7, "call", 3) == lat.sample(7, "call", 3)
    assert lat.sample(7, "call", 3) != lat.sample(8, "call", 3)
    assert LatencyModel(0.4, 1.2, scale=0.0).sample(0, "x") == 0.0
    assert latency_profile("web_search", 0.5).median * 0.5 == pytest.approx(0.4)
    with pytest.raises(ValueError, match="median"):
        LatencyModel(1.0, 0.5)


# -- canonical calls and fingerprints ------------------------------------------------------------
class _Box:
    def __init__(self):
        self.items = []

    def put(self, item: str, times: int = 1) -> dict:
        self.items.extend([item] * times)
        return {"n": len(self.items)}


def test_canonical_calls_bind_positionals_and_fill_defaults():
    reg = ToolRegistry([Tool("put", _Box.put, Effect.MUTATING, state_key="box")])
    a = reg.canonical("put", ["x"])
    b = reg.canonical("put", {"item": "x", "times": 1})
    c = reg.canonical("put", {"times": 1}, {"item": "x"})
    assert a == b == c and a.arguments == {"item": "x", "times": 1}
    assert a.key == 'put{"item": "x", "times": 1}'
    assert reg.canonical("put", {"item": "x", "times": 2}).key != a.key
    with pytest.raises(ToolCallError, match="no tool named 'get'"):
        reg.canonical("get", {})
    with pytest.raises(ToolCallError, match="bad arguments for put"):
        reg.canonical("put", {"thing": 1})


class _Node:
    def __init__(self, name, parent=None):
        self.name, self.parent, self.children = name, parent, {}
        self._stamp = datetime.datetime.now()


def test_fingerprint_handles_cycles_and_ignores_timestamps():
    def tree():
        root = _Node("/")
        root.children["a"] = _Node("a", root)
        return root

    r1, r2 = tree(), tree()
    time.sleep(0.001)
    r2.children["a"]._stamp = datetime.datetime.now()
    assert fingerprint(r1) == fingerprint(r2)
    r2.children["a"].name = "b"
    assert fingerprint(r1) != fingerprint(r2)
    g1, g2 = random.Random(1), random.Random(1)
    assert fingerprint({"g": g1}) == fingerprint({"g": g2})
    g2.random()
    assert fingerprint({"g": g1}) != fingerprint({"g": g2})


# -- BFCL ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tasks():
    return load_bfcl_tasks()


def test_bfcl_tasks_and_gold_calls(tasks):
    assert len(tasks) == 200
    assert sum(t.num_calls for t in tasks) == 1142
    assert parse_gold_call("sort('final_report.pdf')") == ("sort", ("final_report.pdf",), {})
    assert parse_gold_call("ls(a=True)") == ("ls", (), {"a": True})
    t0 = tasks[0]
    assert t0.id == "multi_turn_base_0" and len(t0.turns) == 4
    reg = bfcl_registry(t0)
    gold = t0.gold_calls(reg)
    assert [c.name for c in gold[0]] == ["cd", "mkdir", "mv"]
    assert gold[2][0].arguments == {"file_name": "final_report.pdf"}
    assert "cp" not in reg  # the task's excluded function
    # the tool schemas are valid for the server's tool-call format
    from jaxlab.serving.tools import resolve_tool_choice

    choice = resolve_tool_choice(reg.schemas(), "auto")
    assert set(choice.names) == set(reg.names())


def test_bfcl_read_only_tools_never_change_state(tasks):
    """Every gold call of every task: a read-only tool leaves its state's fingerprint as it was;
    the run is deterministic (two fresh runs end in the same state)."""
    checked = 0
    for task in tasks:
        reg = bfcl_registry(task)
        st, st2 = bfcl_state(task), bfcl_state(task)
        for turn in task.gold_calls(reg):
            for call in turn:
                tool = reg.get(call.name)
                obj = st.objects[tool.state_key]
                before = fingerprint(obj)
                out = run_tool(tool, obj, dict(call.arguments))
                out2 = run_tool(tool, st2.objects[tool.state_key], dict(call.arguments))
                assert out == out2
                if tool.effect is Effect.READ_ONLY:
                    assert fingerprint(obj) == before, f"{task.id}: {call} changed its state"
                    checked += 1
        assert st.fingerprint() == st2.fingerprint()
    assert checked > 300
    assert EFFECTS[("GorillaFileSystem", "ls")] is Effect.READ_ONLY
    assert ("GorillaFileSystem", "mv") not in EFFECTS  # mutating: the default


def test_bfcl_state_copy_is_isolated(tasks):
    task = tasks[0]
    reg, st = bfcl_registry(task), bfcl_state(task)
    copy_, version = st.copy_of("GorillaFileSystem")
    assert version == 0 and fingerprint(copy_) == fingerprint(st.objects["GorillaFileSystem"])
    before = st.fingerprint()
    run_tool(reg.get("cd"), copy_, {"folder": "document"})
    run_tool(reg.get("mkdir"), copy_, {"dir_name": "temp"})
    assert st.fingerprint() == before
    assert st.replace("GorillaFileSystem", copy_, 0) and st.versions["GorillaFileSystem"] == 1
    assert st.fingerprint() != before
    assert not st.replace("GorillaFileSystem", copy.deepcopy(copy_), 0)  # stale version


def test_tool_outputs_are_snapshots():
    """A tool returning a reference into its state (BFCL's get_ticket does) must not see a later
    change in an output it already gave."""

    class Store:
        def __init__(self):
            self.row = {"status": "open"}

        def get(self):
            return self.row

        def close(self):
            self.row["status"] = "closed"

    s = Store()
    get = Tool("get", Store.get, Effect.READ_ONLY, state_key="s")
    out = run_tool(get, s, {})
    Store.close(s)
    assert out == {"status": "open"}


# -- BM25 ------------------------------------------------------------------------------------------
def _bm25_brute(query, texts, k1=1.5, b=0.75):
    """Okapi BM25 written out term by term in plain floats (the reference)."""
    docs = [tokenize(t) for t in texts]
    n = len(docs)
    avgdl = sum(len(d) for d in docs) / n
    scores = []
    for d in docs:
        s = 0.0
        for term in tokenize(query):
            nt = sum(1 for x in docs if term in x)
            if nt == 0:
                continue
            idf = math.log(1 + (n - nt + 0.5) / (nt + 0.5))
            f = d.count(term)
            s += idf * f * (k1 + 1) / (f + k1 * (1 - b + b * len(d) / avgdl))
        scores.append(s)
    return scores


def test_bm25_matches_brute_force_and_ranks():
    pages = [
        Page("u1", "ring attention", "ring attention shards the sequence over devices devices"),
        Page("u2", "speculative tools", "speculative tool execution hides tool latency"),
        Page("u3", "sky", "sky subtraction with mutual information"),
        Page("u4", "tools again", "a tool a tool a tool"),
    ]
    corpus = Corpus(pages, k1=1.2, b=0.6)
    for q in ("tool latency", "devices attention", "sky sky mutual", "nothing here"):
        ref = _bm25_brute(q, [p.title + " " + p.text for p in pages], k1=1.2, b=0.6)
        np.testing.assert_allclose(corpus.scores(q), ref, rtol=1e-12, atol=0)
    hits = corpus.search("tool latency", k=2)
    assert [p.url for p, _ in hits] == ["u2", "u4"]
    assert corpus.search("nothing here") == []
    search, fetch = search_tools(corpus)
    assert search.effect is Effect.READ_ONLY and fetch.effect is Effect.READ_ONLY
    res = search.fn(query="sky")
    assert res["results"][0]["url"] == "u3"
    assert fetch.fn(url="u3")["content"] == pages[2].text
    assert "error" in fetch.fn(url="u9")


def test_markdown_corpus_splits_sections(tmp_path):
    p = tmp_path / "guide.md"
    p.write_text("# Guide\nintro text\n## Install\npip install x\n## Install\nagain\n")
    corpus = markdown_corpus([p])
    assert [pg.url for pg in corpus.pages] == [
        "doc://guide.md#guide",
        "doc://guide.md#install",
        "doc://guide.md#install-2",
    ]
    assert corpus.by_url["doc://guide.md#install"].text == "pip install x"


# -- subprocess tools --------------------------------------------------------------------------------
def test_exec_tools_run_and_time_out(tmp_path):
    python, shell = exec_tools(tmp_path, timeout=1.0)
    assert python.effect is Effect.MUTATING and not python.copyable
    out = python.fn(code="print(6 * 7)")
    assert out["returncode"] == 0 and out["stdout"].strip() == "42"
    out = shell.fn(command="echo hi > f.txt && cat f.txt")
    assert out["stdout"].strip() == "hi" and (tmp_path / "f.txt").exists()
    t0 = time.perf_counter()
    out = python.fn(code="import time; time.sleep(30)")
    assert "timed out" in out["error"] and time.perf_counter() - t0 < 10
