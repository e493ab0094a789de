"""The speculative executor: promote / discard / cancel, stale reads, the side-effect guard, the
scheduler's priorities, and the lossless property on BFCL tasks (small latencies)."""

from __future__ import annotations

import time

import pytest

from jaxlab.agents.events import EventLog
from jaxlab.agents.executor import Job, SpeculationConfig, SpeculativeExecutor, ToolScheduler
from jaxlab.agents.latency import LatencyModel
from jaxlab.agents.miner import Prediction
from jaxlab.agents.tools import Effect, Tool, ToolCall, ToolRegistry, ToolState


class Counter:
    """A state that records every call that reached it."""

    def __init__(self):
        self.value = 0
        self.calls: list[tuple] = []

    def get(self) -> dict:
        return {"value": self.value}

    def incr(self, by: int = 1) -> dict:
        self.value += by
        self.calls.append(("incr", by))
        return {"value": self.value}

    def set_to(self, value: int) -> dict:
        self.value = value
        self.calls.append(("set_to", value))
        return {"value": self.value}


NOTIFIED: list[str] = []


def notify(message: str) -> str:
    """A side effect outside any state of ours (mutating, nothing to copy)."""
    NOTIFIED.append(message)
    return "sent"


def _lat(s):
    return LatencyModel(s, s)  # exactly s seconds


def _registry(latency=0.05, get_latency=None):
    return ToolRegistry(
        [
            Tool("get", Counter.get, Effect.READ_ONLY, "c", latency=_lat(get_latency or latency)),
            Tool("incr", Counter.incr, Effect.MUTATING, "c", latency=_lat(latency)),
            Tool("set_to", Counter.set_to, Effect.IDEMPOTENT, "c", latency=_lat(latency)),
            Tool("notify", notify, Effect.MUTATING, latency=_lat(latency)),
        ]
    )


class Scripted:
    """Predicts whatever ``calls`` holds now."""

    def __init__(self, *calls: ToolCall):
        self.calls = list(calls)

    def predict(self, log: EventLog, top_k: int, allowed=None):
        return [Prediction(c, 0.9) for c in self.calls[:top_k]]


@pytest.fixture
def scheduler():
    with ToolScheduler(workers=4) as s:
        yield s


def _executor(scheduler, predictor, **kw):
    reg = _registry(**{k: kw.pop(k) for k in ("latency", "get_latency") if k in kw})
    kw.setdefault("window", 1)  # the next call only, unless a test asks for a window
    state = ToolState({"c": Counter()})
    ex = SpeculativeExecutor(
        reg, state, scheduler, predictor=predictor, config=SpeculationConfig(**kw), task_id="t"
    )
    ex.user_turn("go")
    return ex, state


def test_read_only_speculation_is_promoted(scheduler):
    ex, state = _executor(scheduler, Scripted(ToolCall("get", {})), latency=0.2)
    assert ex.speculate(decode_estimate=1.0) == [ToolCall("get", {})]
    time.sleep(0.3)  # the model "decodes" longer than the tool takes
    t0 = time.perf_counter()
    ev = ex.execute("get", {})
    assert time.perf_counter() - t0 < 0.1  # no stall: the result was ready
    assert ev.served == "speculative" and ev.output == {"value": 0}
    assert (ex.stats["promoted"], ex.stats["top1_hits"], ex.stats["window_hits"]) == (1, 1, 1)
    assert ev.end - ev.start == pytest.approx(0.2, abs=0.05)
    ex.close()


def test_mutating_speculation_runs_on_a_copy_and_is_promoted_on_a_match(scheduler):
    ex, state = _executor(scheduler, Scripted(ToolCall("incr", {"by": 2})))
    real = state.objects["c"]
    ex.speculate(decode_estimate=1.0)
    time.sleep(0.1)
    assert real.value == 0 and real.calls == []  # the copy ran, not the real state
    ev = ex.execute("incr", {"by": 2})
    assert ev.served == "speculative" and ev.output == {"value": 2}
    now = state.objects["c"]
    assert now is not real  # the copy replaced it
    assert now.value == 2 and now.calls == [("incr", 2)] and state.versions["c"] == 1
    assert ex.stats["sandboxed"] == 1 and ex.stats["promoted"] == 1


def test_mismatch_is_discarded_and_the_real_call_runs(scheduler):
    ex, state = _executor(scheduler, Scripted(ToolCall("incr", {"by": 2})))
    ex.speculate(decode_estimate=1.0)
    ev = ex.execute("incr", {"by": 3})
    assert ev.served == "real" and ev.output == {"value": 3}
    assert state.objects["c"].calls == [("incr", 3)]
    assert ex.stats["discarded"] >= 1 and ex.stats["promoted"] == 0
    assert ex.stats["top1_hits"] == 0 and not ex.pending
    ex.close()


def test_a_change_cancels_pending_reads_and_no_stale_result_is_served(scheduler):
    ex, state = _executor(scheduler, Scripted(ToolCall("get", {})), latency=0.02, get_latency=2.0)
    ex.speculate(decode_estimate=10.0)
    (spec,) = ex.pending
    time.sleep(0.05)  # the read ran (value 0); its latency wait has begun
    ex.predictor.calls = []
    ev = ex.execute("incr", {"by": 1})  # changes the state the read saw
    assert ev.output == {"value": 1}
    assert spec.job.done.wait(0.5)  # cancelled: it did not wait out its 2 s
    assert spec.job.busy_seconds < 0.5 and ex.stats["discarded"] == 1
    assert 0 < ex.stats["wasted_tool_seconds"] < 0.5
    t0 = time.perf_counter()
    ev = ex.execute("get", {})
    assert ev.served == "real" and ev.output == {"value": 1}  # not the stale 0
    assert time.perf_counter() - t0 == pytest.approx(2.0, abs=0.3)


@pytest.mark.parametrize("policy,window", [("sandbox", 1), ("never", 1), ("sandbox", 4)])
def test_side_effect_guard(scheduler, policy, window):
    """Speculation never makes a real call of a mutating tool: the state's record and the
    external log hold exactly the model's calls, in order."""
    NOTIFIED.clear()
    predictor = Scripted(
        ToolCall("incr", {"by": 1}), ToolCall("notify", {"message": "x"}), ToolCall("get", {})
    )
    ex, state = _executor(scheduler, predictor, mutating=policy, latency=0.01, window=window)
    real_calls = [
        ("incr", {"by": 5}),
        ("get", {}),
        ("incr", {"by": 1}),
        ("set_to", {"value": 9}),
        ("notify", {"message": "hi"}),
        ("incr", {"by": 1}),
    ]
    for name, args in real_calls:
        ex.speculate(decode_estimate=1.0)
        time.sleep(0.03)
        ex.execute(name, args)
    ex.close()
    time.sleep(0.05)  # anything still running ends
    assert state.objects["c"].calls == [("incr", 5), ("incr", 1), ("set_to", 9), ("incr", 1)]
    assert state.objects["c"].value == 10
    assert NOTIFIED == ["hi"]
    assert ex.stats["mutating_blocked"] >= len(real_calls)  # notify, every step
    if policy == "never":
        assert ex.stats["sandboxed"] == 0
    else:
        assert ex.stats["sandboxed"] >= 2 and ex.stats["promoted"] >= 3  # incr(1) twice, get


def test_scheduler_runs_authoritative_first_and_preempts():
    with ToolScheduler(workers=1) as sched:
        reg = _registry()
        tool = reg.get("get")
        c = Counter()
        long_spec = Job(tool, ToolCall("get", {}), c, 5.0, speculative=True, utility=0.1)
        queued = Job(tool, ToolCall("get", {}), c, 0.0, speculative=True, utility=0.5)
        sched.submit(long_spec)
        time.sleep(0.05)
        sched.submit(queued)
        t0 = time.perf_counter()
        real = sched.submit(Job(tool, ToolCall("get", {}), c, 0.01, speculative=False))
        assert real.done.wait(2.0) and time.perf_counter() - t0 < 1.0
        assert sched.preempted == 1 and long_spec.cancelled.is_set()
        assert queued.done.wait(2.0)
        assert real.start < queued.start  # authoritative before the queued speculative job


def test_speculation_config_validation():
    with pytest.raises(ValueError, match="mutating"):
        SpeculationConfig(mutating="yes")
    with pytest.raises(ValueError, match="budget"):
        SpeculationConfig(budget=-1)


# -- lossless on BFCL --------------------------------------------------------------------------------
LOSSLESS_TASKS = ("multi_turn_base_3", "multi_turn_base_24", "multi_turn_base_112")


def test_lossless_on_bfcl_tasks():
    """Serial, PASTE (mined on the other tasks) and oracle runs give the same outputs, final states
    and state versions; the serial outputs are those of running the gold calls directly."""
    from jaxlab.agents.bench import BenchConfig, training_logs
    from jaxlab.agents.bfcl import load_bfcl_tasks
    from jaxlab.agents.miner import MinerConfig, mine_patterns
    from jaxlab.testing import replay_modes

    tasks = load_bfcl_tasks()
    chosen = [t for t in tasks if t.id in LOSSLESS_TASKS]
    table = mine_patterns(
        training_logs([t for t in tasks if t.id not in LOSSLESS_TASKS]), MinerConfig()
    )
    config = BenchConfig(seed=0)
    totals = {"paste": 0, "oracle": 0}
    sandboxed = 0
    for task, runs, want in replay_modes(chosen, table, config, scale=0.02):
        assert runs["serial"].outputs == want
        for mode in ("paste", "oracle"):
            r = runs[mode]
            assert r.outputs == runs["serial"].outputs, (task.id, mode)
            assert r.fingerprint == runs["serial"].fingerprint, (task.id, mode)
            assert r.versions == runs["serial"].versions, (task.id, mode)
            totals[mode] += r.stats["promoted"]
            sandboxed += r.stats["sandboxed"]
        assert runs["oracle"].stats["promoted"] == runs["oracle"].calls
    assert totals["paste"] >= 3 and sandboxed > 0  # speculation really happened


def test_summary_against_hand_computation():
    from jaxlab.agents.bench import TaskRun, summarize

    def run(task, mode, seconds, stall, outputs=("a",), promoted=0):
        stats = dict.fromkeys(
            ("top1_hits", "top3_hits", "window_hits", "launched", "mutating_blocked"), 0
        )
        stats.update(wasted_tool_seconds=0.5, sandboxed=1, top1_hits=promoted, window_hits=promoted)
        return TaskRun(task, mode, seconds, 0.0, stall, 3, 2, stats, list(outputs), "fp", {})

    runs = [run(f"t{i}", "serial", s, 0.5 * s) for i, s in enumerate([1.0, 2.0, 3.0, 4.0])]
    runs += [
        run("t0", "paste", 0.5, 0.1, promoted=2),
        run("t1", "paste", 1.0, 0.2, promoted=1),
        run("t2", "paste", 3.0, 1.5, outputs=("b",)),
        run("t3", "paste", 2.0, 0.2, promoted=1),
    ]
    s = summarize(runs)
    p = s["paste"]
    assert p["mean_s"] == pytest.approx(1.625)
    assert p["mean_reduction"] == pytest.approx(1 - 1.625 / 2.5)
    # p95 by linear interpolation: sorted [0.5, 1, 2, 3] at 0.95 * 3 = 2.85 -> 2.85;
    # serial [1, 2, 3, 4] -> 3.85
    assert p["p95_s"] == pytest.approx(2.85) and s["serial"]["p95_s"] == pytest.approx(3.85)
    assert p["p95_reduction"] == pytest.approx(1 - 2.85 / 3.85)
    assert p["stall_s"] == pytest.approx(2.0) and s["serial"]["stall_s"] == pytest.approx(5.0)
    assert p["tool_latency_speedup"] == pytest.approx(2.5)
    assert p["top1_hit_rate"] == pytest.approx(4 / 8) and p["calls"] == 8
    assert p["wasted_tool_s"] == pytest.approx(2.0)
    assert p["diverged_tasks"] == ["t2"] and not p["lossless"]
    assert s["serial"]["lossless"]


# -- the speculation window: chains of speculations ---------------------------------------------------
class Sequence_:
    """Predicts ``calls[n]`` after ``n`` tool events (real or speculative); ``derive`` computes a
    call from the last event instead, to check that a chain sees its speculative outputs."""

    def __init__(self, *calls: ToolCall, derive=None):
        self.calls, self.derive = list(calls), derive

    def predict(self, log: EventLog, top_k: int, allowed=None):
        events = log.tool_events()
        if self.derive is not None and events:
            call = self.derive(events[-1])
            return [Prediction(call, 0.9)] if call is not None else []
        n = len(events)
        return [Prediction(self.calls[n], 0.9)] if n < len(self.calls) else []


def _serial_outputs(calls):
    with ToolScheduler(workers=2) as sched:
        ex = SpeculativeExecutor(_registry(latency=0.001), ToolState({"c": Counter()}), sched)
        ex.user_turn("go")
        return [ex.execute(name, args).output for name, args in calls]


CHAIN = [("incr", {"by": 1}), ("incr", {"by": 2}), ("get", {})]


def _wait_chain(ex, n, timeout=3.0):
    """Waits until ``n`` speculations are pending and every result has arrived."""
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        if len(ex.pending) == n and all(s.arrived for s in ex.pending):
            return
        time.sleep(0.01)
    raise AssertionError(f"the chain did not reach {n} speculations: {ex.pending}")


def test_window_chain_runs_ahead_on_copies_and_is_promoted_in_order(scheduler):
    ex, state = _executor(
        scheduler, Sequence_(*(ToolCall(n, a) for n, a in CHAIN)), window=3, latency=0.05
    )
    real = state.objects["c"]
    ex.speculate(decode_estimate=1.0)  # the user's message arrived: the chain starts
    _wait_chain(ex, 3)  # three calls of 0.05 s, one after the other
    assert [s.job.call.name for s in ex.pending] == ["incr", "incr", "get"]
    a, b, c = ex.pending
    assert (a.parent, b.parent, c.parent) == (None, a, b) and (b.source, c.source) == (a, b)
    assert real.calls == [] and real.value == 0 and state.versions["c"] == 0  # copies only
    t0 = time.perf_counter()
    events = [ex.execute(n, args) for n, args in CHAIN]
    assert time.perf_counter() - t0 < 0.1  # every result was there
    assert [e.served for e in events] == ["speculative"] * 3
    assert [e.output for e in events] == _serial_outputs(CHAIN)  # 1, 3, 3
    now = state.objects["c"]
    assert now.calls == [("incr", 1), ("incr", 2)] and now.value == 3
    assert state.versions["c"] == 2  # one step per confirmed change, as the serial run
    assert ex.stats["chained"] == 2 and ex.stats["promoted"] == 3 and ex.stats["discarded"] == 0
    ex.close()


def test_window_miss_discards_the_dependent_chain(scheduler):
    ex, state = _executor(
        scheduler, Sequence_(*(ToolCall(n, a) for n, a in CHAIN)), window=3, latency=0.05
    )
    ex.speculate(decode_estimate=1.0)
    _wait_chain(ex, 3)
    first, second, third = ex.pending
    real_calls = [("incr", {"by": 1}), ("incr", {"by": 5}), ("get", {})]
    events = [ex.execute(n, args) for n, args in real_calls]
    # the first is confirmed; incr(2) was expected next, so it and the read after it are gone
    assert [e.served for e in events] == ["speculative", "real", "real"]
    assert second.dead and third.dead and first.promoted
    assert [e.output for e in events] == _serial_outputs(real_calls)  # 1, 6, 6: not the copy's 3
    assert state.objects["c"].calls == [("incr", 1), ("incr", 5)]
    assert ex.stats["discarded"] >= 2 and ex.stats["promoted"] == 1
    ex.close()


def _plus_ten(ev):
    if not isinstance(ev.output, dict):  # a running call's output is not known yet
        return None
    return ToolCall("set_to", {"value": ev.output["value"] + 10})


def test_window_arguments_come_from_speculative_outputs(scheduler):
    """The chain predicts from the log extended with its speculative events: set_to's argument is
    the speculative incr's output plus 10."""
    ex, state = _executor(
        scheduler,
        Sequence_(derive=_plus_ten),
        window=2,
        latency=0.05,
    )
    ex.execute("incr", {"by": 2})  # real: value 2
    ex.speculate(decode_estimate=1.0)  # predicts set_to(12) from the real output
    _wait_chain(ex, 2)  # set_to(12) ran on a copy; its child set_to(22) from that copy's output
    assert [s.job.call.arguments["value"] for s in ex.pending] == [12, 22]
    assert state.objects["c"].calls == [("incr", 2)]
    assert ex.execute("set_to", {"value": 12}).served == "speculative"
    ev = ex.execute("set_to", {"value": 22})
    assert ev.served == "speculative" and ev.output == {"value": 22}
    assert state.objects["c"].calls == [("incr", 2), ("set_to", 12), ("set_to", 22)]
    ex.close()


def test_chain_bound_hand_worked():
    from jaxlab.agents.bench import chain_bound

    # one turn, two calls of 1 s, steps of 0.5 s: the model waits for each call; then answers
    assert chain_bound([[1.0, 1.0]], [[0.5, 0.5, 0.5]], across_turns=False) == pytest.approx(2.5)
    # two turns of one 2 s call, 1 s steps: within turns the second call waits for its message
    # (at 3 s: 3 + 2 + 1 = 6); across turns it starts when the first returns (2 + 2 = 4, +1 = 5)
    tools, dec = [[2.0], [2.0]], [[1.0, 1.0], [1.0, 1.0]]
    assert chain_bound(tools, dec, across_turns=False) == pytest.approx(6.0)
    assert chain_bound(tools, dec, across_turns=True) == pytest.approx(5.0)
    # all at once (no chain): the second call ran alongside the first, 1 + 0.5 + 0.5
    assert chain_bound(
        [[1.0, 1.0]], [[0.5, 0.5, 0.5]], across_turns=False, chained=False
    ) == pytest.approx(2.0)
    # across turns, both 2 s calls start at 0: the model waits to 2, answers (3), decodes (4:
    # the second result has been there since 2), answers: 5
    assert chain_bound(tools, dec, across_turns=True, chained=False) == pytest.approx(5.0)
    # two calls in one turn, across turns and all at once: 0.5 -> wait to 3 -> 3.5 (ready at
    # 1) -> 4; chained, the second waits for the first: ready at 4, then 4.5
    tools2, dec2 = [[3.0, 1.0]], [[0.5, 0.5, 0.5]]
    assert chain_bound(tools2, dec2, across_turns=True, chained=False) == pytest.approx(4.0)
    assert chain_bound(tools2, dec2, across_turns=True) == pytest.approx(4.5)
    # fast tools hide behind the decodes: the decodes alone
    assert chain_bound([[0.1, 0.1]], [[1.0, 1.0, 1.0]], across_turns=True) == pytest.approx(3.0)
