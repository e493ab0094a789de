"""Replay benchmark of PASTE on BFCL multi-turn tasks (``python -m jaxlab agents bench``), or on
scripted deep-research tasks (``--workload research``, :mod:`jaxlab.agents.workloads`: search and
fetch chains with the ``web_search`` / ``fetch`` latency profiles in place of BFCL's).

Each task's tool calls come from its gold trace, one call per model step; each step's thinking is a
real decode (:class:`DecodeThinker`: greedy, end tokens ignored, on the in-process Engine) of a
number of tokens drawn from a log-normal distribution (median ``tokens_median``, 95th percentile
``tokens_p95``, clipped to ``[tokens_min, tokens_max]``; a function of seed, task and step, so
every compared run decodes the same lengths). Each user turn ends with one more step, the answer,
that calls nothing. Tool latencies are the ``api_read`` / ``api_write`` profiles
(:mod:`jaxlab.agents.latency`) times one factor chosen so that tools take ``tool_share`` of the
serial loop's time on the training split.

Tasks are split into train / test by task (seeded); ``test_tasks`` of the test split's tasks
are run, evenly spaced over it (BFCL's ids are grouped by domain). The miner learns from the training tasks' event
logs (their gold calls run once, without latency). Every test task then runs under each mode, the
modes one after the other per task:

- ``serial``: no speculation (the plain LLM -> tool -> LLM loop);
- ``paste``: the mined pattern table (contexts of event metadata, as PASTE);
- ``paste_words``: the same, a turn's first call also predicted from the user's words (an
  extension: :class:`~jaxlab.agents.miner.MinerConfig` ``prompt_words``);
- ``bigram``: next tool from the last tool, arguments copied from the last call / output;
- ``oracle``: told the next gold call (upper bound), also the next turn's first call before its
  message arrives;
- ``oracle_turn``: told the current turn's gold calls, from the moment its message arrives (the
  upper bound for any predictor that waits for the user's message).

A run is lossless when every tool output and every final state (:meth:`ToolState.fingerprint`,
and each state's version count) equal the serial run's.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from jaxlab.agents.bfcl import BFCLTask
from jaxlab.agents.events import Event, EventLog
from jaxlab.agents.executor import SpeculationConfig, SpeculativeExecutor, ToolScheduler, run_tool
from jaxlab.agents.latency import Z95, LatencyModel, latency_profile
from jaxlab.agents.miner import (
    BigramPredictor,
    MinerConfig,
    OraclePredictor,
    PatternTable,
    mine_patterns,
)
from jaxlab.agents.runtime import ReplayLLM, run_agent
from jaxlab.agents.tools import Effect, output_status
from jaxlab.agents.workloads import WORKLOADS, Workload
from jaxlab.registry import Registry

__all__ = [
    "BenchConfig",
    "DecodeThinker",
    "SleepThinker",
    "MODES",
    "split_tasks",
    "training_logs",
    "replay_task",
    "TaskRun",
    "chain_bound",
    "task_timeline",
    "speculation_bounds",
    "run_bench",
    "summarize",
    "plot_runs",
]

MODES: Registry[str] = Registry("speculation mode")
for _m, _d in (
    ("serial", "no speculation"),
    ("paste", "mined patterns"),
    ("paste_words", "mined patterns, a turn's first call also from the user's words"),
    ("bigram", "next-tool bigram, arguments copied from the last output"),
    ("oracle", "the true next call (upper bound)"),
    ("oracle_turn", "the true calls of the current user turn, from its message on"),
):
    MODES.register(_m, _d)


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """The benchmark's settings (see the module docstring)."""

    model: str = "smollm2-135m-instruct"
    test_tasks: int | None = 12
    train_fraction: float = 0.7
    modes: tuple[str, ...] = ("serial", "paste", "paste_words", "bigram", "oracle", "oracle_turn")
    tokens_median: float = 8.0
    tokens_p95: float = 24.0
    tokens_min: int = 4
    tokens_max: int = 48
    tool_share: float = 0.5
    budget: int = 3
    top_k: int = 3
    mutating: str = "sandbox"
    cost_weight: float = 0.02
    lookahead: bool = True
    window: int = 4
    seed: int = 0
    max_context: int = 3
    min_support: int = 2
    min_accuracy: float = 0.2
    workload: str = "bfcl"

    def __post_init__(self):
        WORKLOADS.check(self.workload, "workload")
        for m in self.modes:
            MODES.check(m, "modes")
        if "serial" not in self.modes:
            raise ValueError("modes must include 'serial' (the baseline and the lossless check)")
        if not 0 < self.train_fraction < 1:
            raise ValueError(f"train_fraction must be in (0, 1), got {self.train_fraction}")
        if not 0 < self.tool_share < 1:
            raise ValueError(f"tool_share must be in (0, 1), got {self.tool_share}")
        if not 1 <= self.tokens_min <= self.tokens_median <= self.tokens_p95:
            raise ValueError("need 1 <= tokens_min <= tokens_median <= tokens_p95")
        if self.tokens_max < self.tokens_min:
            raise ValueError("tokens_max must be >= tokens_min")
        if self.test_tasks is not None and self.test_tasks < 1:
            raise ValueError(f"test_tasks must be >= 1, got {self.test_tasks}")

    def tokens(self, task_id: str, step: int) -> int:
        """Tokens decoded at ``step`` of a task."""
        lat = LatencyModel(self.tokens_median, self.tokens_p95)
        n = round(lat.sample(self.seed, "tokens", task_id, step))
        return int(min(max(n, self.tokens_min), self.tokens_max))

    @functools.cached_property
    def mean_tokens(self) -> float:
        """The clipped distribution's mean (by quadrature on a fine grid of quantiles)."""
        from scipy.stats import norm

        q = norm.ppf((np.arange(20000) + 0.5) / 20000)
        sigma = np.log(self.tokens_p95 / self.tokens_median) / Z95
        x = np.clip(
            np.round(self.tokens_median * np.exp(sigma * q)), self.tokens_min, self.tokens_max
        )
        return float(x.mean())


class DecodeThinker:
    """The model's thinking: greedy decoding of exactly ``n`` tokens on an Engine (end tokens
    ignored), one request at a time; one compile of the decode step for every ``n``."""

    def __init__(self, model, tokenizer, *, max_tokens: int, prompt: str | None = None):
        from jaxlab.generation import Engine, SamplingParams

        prompt = prompt or "Plan the next tool call for the user's request, step by step."
        self.ids = tokenizer.encode(tokenizer.apply_chat_template(prompt), add_special_tokens=False)
        self.engine = Engine(
            model, num_slots=1, max_len=len(self.ids) + max_tokens + 8, eos_ids=(), tokenizer=None
        )
        self.params = SamplingParams(max_new_tokens=max_tokens, temperature=0.0)
        self.max_tokens = max_tokens

    def __call__(self, n: int) -> int:
        rid = self.engine.submit(self.ids, self.params.replace(max_new_tokens=int(n)))
        (c,) = [c for c in self.engine.run() if c.request_id == rid]
        return len(c.tokens)

    def seconds_per_token(self, n: int | None = None, repeats: int = 3) -> tuple[float, float]:
        """``(fixed, per_token)`` seconds of a decode, fitted on ``n`` and ``4 n`` tokens (default
        ``n``: a quarter of ``max_tokens``)."""
        n = n or max(1, self.max_tokens // 4)
        self(n)  # compiles
        self(4 * n)
        t = {}
        for k in (n, 4 * n):
            best = float("inf")
            for _ in range(repeats):
                t0 = time.perf_counter()
                self(k)
                best = min(best, time.perf_counter() - t0)
            t[k] = best
        per = (t[4 * n] - t[n]) / (3 * n)
        return max(t[n] - per * n, 0.0), per


class SleepThinker:
    """Thinking as a sleep of ``fixed + per_token * n`` seconds (tests, and runs without a
    model)."""

    def __init__(self, per_token: float, fixed: float = 0.0):
        self.per_token, self.fixed = per_token, fixed

    def __call__(self, n: int) -> int:
        time.sleep(self.fixed + self.per_token * n)
        return n

    def seconds_per_token(self, n: int | None = None, repeats: int = 3) -> tuple[float, float]:
        return self.fixed, self.per_token


def split_tasks(tasks: Sequence[BFCLTask], train_fraction: float, seed: int):
    """A seeded split by task: ``(train, test)``."""
    order = np.random.default_rng(seed).permutation(len(tasks))
    n_train = int(round(train_fraction * len(tasks)))
    train = [tasks[i] for i in sorted(order[:n_train])]
    test = [tasks[i] for i in sorted(order[n_train:])]
    return train, test


def training_logs(tasks: Sequence[BFCLTask], workload: Workload | None = None) -> list[EventLog]:
    """Event logs of the tasks' gold calls, run once in order without latency (``workload``:
    the tasks' tools and state, default BFCL's)."""
    workload = workload or WORKLOADS.get("bfcl")()
    logs = []
    for task in tasks:
        registry, state = workload.registry(task, 1.0), workload.state(task)
        log = EventLog(task.id)
        for text, calls in zip(task.turns, task.gold_calls(registry)):
            log.user_turn(text)
            for call in calls:
                tool = registry.get(call.name)
                obj = state.objects[tool.state_key] if tool.state_key else None
                t0 = time.perf_counter()
                value = run_tool(tool, obj, dict(call.arguments))
                t1 = time.perf_counter()
                log.append(
                    Event(call.name, output_status(value), dict(call.arguments), value, t0, t1)
                )
        logs.append(log)
    return logs


@dataclasses.dataclass
class TaskRun:
    task_id: str
    mode: str
    seconds: float
    llm_seconds: float
    stall_seconds: float
    steps: int
    calls: int
    stats: dict[str, float]
    outputs: list[str]
    fingerprint: str
    versions: dict[str, int]

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("outputs")
        d.pop("fingerprint")
        return d


def replay_task(
    task: BFCLTask,
    mode: str,
    *,
    think: Callable[[int], int],
    config: BenchConfig,
    scale: float,
    scheduler: ToolScheduler,
    table: PatternTable | None = None,
    bigram: BigramPredictor | None = None,
    seconds_per_token: tuple[float, float] = (0.0, 0.0),
) -> TaskRun:
    """One task under one mode; returns its :class:`TaskRun`."""
    MODES.check(mode, "mode")
    workload = WORKLOADS.get(config.workload)()
    registry, state = workload.registry(task, scale), workload.state(task)
    gold = task.gold_calls(registry)
    oracle = OraclePredictor(gold, within_turn=mode == "oracle_turn")
    predictor = {
        "serial": None,
        "paste": table.with_prompt_words(False) if table is not None else None,
        "paste_words": table.with_prompt_words(True) if table is not None else None,
        "bigram": bigram,
        "oracle": oracle,
        "oracle_turn": oracle,
    }[mode]
    if mode in ("paste", "paste_words", "bigram") and predictor is None:
        raise ValueError(f"mode {mode!r} needs its predictor")
    spec = SpeculationConfig(
        budget=config.budget,
        top_k=config.top_k,
        mutating=config.mutating,
        cost_weight=config.cost_weight,
        lookahead=config.lookahead,
        window=config.window,
    )
    executor = SpeculativeExecutor(
        registry,
        state,
        scheduler,
        predictor=predictor,
        config=spec,
        seed=config.seed,
        task_id=task.id,
    )
    fixed, per = seconds_per_token
    mean_tokens = config.mean_tokens

    def think_step(step: int) -> int:
        return think(config.tokens(task.id, step))

    def estimate(step: int) -> float:
        # what a server knows before the reply: the decode rate and the usual length, not this
        # step's length
        return fixed + per * mean_tokens

    llm = ReplayLLM(gold, think_step, estimate)
    result = run_agent(llm, executor, task.turns)
    outputs = [
        json.dumps(e.output, sort_keys=True, default=str) for e in executor.log.tool_events()
    ]
    return TaskRun(
        task.id,
        mode,
        result.seconds,
        result.llm_seconds,
        result.tool_seconds,
        result.steps,
        len(outputs),
        dict(executor.stats),
        outputs,
        state.fingerprint(),
        dict(state.versions),
    )


def chain_bound(
    tools: Sequence[Sequence[float]],
    decodes: Sequence[Sequence[float]],
    across_turns: bool,
    chained: bool = True,
) -> float:
    """Completion time of a task when every call is speculated perfectly and as early as
    allowed, from the start of the task (``across_turns``) or from the arrival of each turn's
    message, while the model decodes its steps; the model waits for a call's result after the
    step that makes it. ``chained``: the calls run one after the other (each starts when the one
    before it has returned, as a chain predicted from outputs does); otherwise all at once (no
    data dependence: a bound for any speculation).

    Args:
      tools: per user turn, the latencies of its calls (``k_t`` each).
      decodes: per user turn, the decode times of its steps (``k_t + 1``: a step per call, then
        the answer).
    Returns: seconds.
    """
    model = chain = start = 0.0
    for t, d in zip(tools, decodes, strict=True):
        if len(d) != len(t) + 1:
            raise ValueError("each turn needs one decode per call plus the answer")
        if not across_turns:
            # the turn's calls are known from its message on
            chain, start = max(chain, model), model
        for latency, decode in zip(t, d):
            chain += latency
            model = max(model + decode, chain if chained else start + latency)
        model += d[-1]
    return model


def task_timeline(
    task: BFCLTask, config: BenchConfig, scale: float, seconds_per_token: tuple[float, float]
) -> tuple[list[list[float]], list[list[float]]]:
    """``(tools, decodes)`` of a task as the serial loop meets them (see :func:`chain_bound`):
    each gold call's latency at the state version it runs at, each step's decode time."""
    workload = WORKLOADS.get(config.workload)()
    registry, state = workload.registry(task, scale), workload.state(task)
    fixed, per = seconds_per_token
    tools, decodes, step = [], [], 0
    for calls in task.gold_calls(registry):
        t, d = [], []
        for call in calls:
            tool = registry.get(call.name)
            key = tool.state_key
            version = state.versions[key] if key is not None else None
            t.append(tool.latency.sample(config.seed, task.id, call.key, version))
            run_tool(tool, state.objects[key] if key is not None else None, dict(call.arguments))
            if tool.effect is not Effect.READ_ONLY and key is not None:
                state.versions[key] += 1
            d.append(fixed + per * config.tokens(task.id, step))
            step += 1
        d.append(fixed + per * config.tokens(task.id, step))
        step += 1
        tools.append(t)
        decodes.append(d)
    return tools, decodes


def speculation_bounds(
    tasks: Sequence[BFCLTask],
    config: BenchConfig,
    scale: float,
    seconds_per_token: tuple[float, float],
) -> dict[str, float]:
    """Mean task time of the serial loop and of perfect speculation (:func:`chain_bound`:
    chained or all at once, within each turn or across turns), and the split of the serial time
    they follow from."""
    serial, turn, task_wide, par_turn, par_task = [], [], [], [], []
    parts = dict.fromkeys(("tool_s", "call_decode_s", "answer_decode_s"), 0.0)
    for task in tasks:
        tools, decodes = task_timeline(task, config, scale, seconds_per_token)
        parts["tool_s"] += sum(map(sum, tools))
        parts["call_decode_s"] += sum(sum(d[:-1]) for d in decodes)
        parts["answer_decode_s"] += sum(d[-1] for d in decodes)
        serial.append(sum(map(sum, tools)) + sum(map(sum, decodes)))
        turn.append(chain_bound(tools, decodes, across_turns=False))
        task_wide.append(chain_bound(tools, decodes, across_turns=True))
        par_turn.append(chain_bound(tools, decodes, across_turns=False, chained=False))
        par_task.append(chain_bound(tools, decodes, across_turns=True, chained=False))
    total = sum(serial)
    out = {"serial_mean_s": float(np.mean(serial))}
    for name, times in (
        ("chain_turn", turn),
        ("chain_task", task_wide),
        ("parallel_turn", par_turn),
        ("parallel_task", par_task),
    ):
        out[f"{name}_mean_s"] = float(np.mean(times))
        out[f"{name}_reduction"] = 1 - sum(times) / total
    out.update({k.replace("_s", "_share"): v / total for k, v in parts.items()})
    return out


def _pct(x: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(x, np.float64), q)) if len(x) else float("nan")


def summarize(runs: Sequence[TaskRun]) -> dict[str, Any]:
    """Per-mode metrics, ratios against serial, and the lossless check."""
    by_mode: dict[str, dict[str, TaskRun]] = {}
    for r in runs:
        by_mode.setdefault(r.mode, {})[r.task_id] = r
    serial = by_mode.get("serial", {})
    out: dict[str, Any] = {}
    for mode, rs in by_mode.items():
        times = [r.seconds for r in rs.values()]
        calls = sum(r.calls for r in rs.values())
        stall = sum(r.stall_seconds for r in rs.values())
        s = {k: sum(r.stats.get(k, 0) for r in rs.values()) for k in next(iter(rs.values())).stats}
        m: dict[str, Any] = {
            "tasks": len(rs),
            "calls": calls,
            "mean_s": float(np.mean(times)),
            "p95_s": _pct(times, 95),
            "p99_s": _pct(times, 99),
            "llm_s": sum(r.llm_seconds for r in rs.values()),
            "stall_s": stall,
            "tool_latency_per_call_s": stall / max(calls, 1),
            "top1_hit_rate": s["top1_hits"] / max(calls, 1),
            "top3_hit_rate": s["top3_hits"] / max(calls, 1),
            "window_hit_rate": s["window_hits"] / max(calls, 1),
            "launched": s["launched"],
            "chained": s.get("chained", 0),
            "chain_promoted": s.get("chain_promoted", 0),
            "wasted_tool_s": s["wasted_tool_seconds"],
            "mutating_blocked": s["mutating_blocked"],
            "mutating_sandboxed": s["sandboxed"],
        }
        if serial:
            diverged = [
                t
                for t, r in rs.items()
                if t in serial
                and (
                    r.outputs != serial[t].outputs
                    or r.fingerprint != serial[t].fingerprint
                    or r.versions != serial[t].versions
                )
            ]
            base = [serial[t].seconds for t in rs if t in serial]
            m["diverged_tasks"] = diverged
            m["lossless"] = not diverged
            m["mean_reduction"] = 1 - m["mean_s"] / float(np.mean(base))
            m["p95_reduction"] = 1 - m["p95_s"] / _pct(base, 95)
            m["p99_reduction"] = 1 - m["p99_s"] / _pct(base, 99)
            sb = sum(serial[t].stall_seconds for t in rs if t in serial)
            m["stall_reduction"] = 1 - stall / sb if sb else float("nan")
            m["tool_latency_speedup"] = sb / stall if stall else float("inf")
        out[mode] = m
    return out


def run_bench(
    config: BenchConfig,
    *,
    think=None,
    tasks: Sequence[BFCLTask] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """The whole benchmark; returns ``{"config", "calibration", "summary", "runs"}``."""
    from jaxlab.progress import progress as bar

    workload = WORKLOADS.get(config.workload)()
    tasks = list(tasks) if tasks is not None else workload.load()
    train, test = split_tasks(tasks, config.train_fraction, config.seed)
    if config.test_tasks is not None and config.test_tasks < len(test):
        # evenly spaced over the test split: task ids are grouped by domain (file system, vehicle,
        # trading, travel, ...), so a prefix would cover one or two domains only
        idx = np.unique(np.linspace(0, len(test) - 1, config.test_tasks).round().astype(int))
        test = [test[i] for i in idx]
    logs = training_logs(train, workload)
    t0 = time.perf_counter()
    table = mine_patterns(
        logs,
        MinerConfig(
            max_context=config.max_context,
            min_support=config.min_support,
            min_accuracy=config.min_accuracy,
            top_k=config.top_k,
        ),
    )
    mine_s = time.perf_counter() - t0
    bigram = BigramPredictor(logs)
    if think is None:
        from jaxlab.models import from_pretrained

        model, tokenizer = from_pretrained(config.model)
        think = DecodeThinker(model, tokenizer, max_tokens=config.tokens_max)
    fixed, per = think.seconds_per_token()
    # calibrate: tools take tool_share of the serial time on the training split
    steps = sum(t.num_calls + len(t.turns) for t in train)
    decode_s = sum(
        fixed + per * config.tokens(t.id, i)
        for t in train
        for i in range(t.num_calls + len(t.turns))
    )
    unit = 0.0
    for t, log in zip(train, logs):
        registry = workload.registry(t, 1.0)
        for e in log.tool_events():
            unit += registry.get(e.tool).latency.mean
    scale = decode_s / unit * config.tool_share / (1 - config.tool_share)
    runs: list[TaskRun] = []
    with ToolScheduler(workers=max(8, 2 * config.budget + 2)) as scheduler:
        for task in bar(test, desc="paste bench", total=len(test), enabled=progress):
            for mode in config.modes:
                runs.append(
                    replay_task(
                        task,
                        mode,
                        think=think,
                        config=config,
                        scale=scale,
                        scheduler=scheduler,
                        table=table,
                        bigram=bigram,
                        seconds_per_token=(fixed, per),
                    )
                )
    bounds = speculation_bounds(test, config, scale, (fixed, per))
    return {
        "config": dataclasses.asdict(config),
        "bounds": bounds,
        "calibration": {
            "train_tasks": len(train),
            "test_tasks": len(test),
            "train_calls": sum(t.num_calls for t in train),
            "decode_fixed_s": fixed,
            "decode_per_token_s": per,
            "mean_tokens_per_step": config.mean_tokens,
            "train_steps": steps,
            "latency_scale": scale,
            **{f"{p}_median_s": latency_profile(p).median * scale for p in workload.profiles},
            "patterns": len(table.patterns()),
            "mine_seconds": mine_s,
        },
        "summary": summarize(runs),
        "runs": [r.to_json() for r in runs],
    }


def plot_runs(
    result: dict[str, Any],
    path: str,
    modes: Sequence[str] = ("paste", "paste_words", "oracle_turn", "oracle"),
) -> None:
    """Per-task completion time, serial vs each of ``modes`` (those in the result), tasks sorted
    by their serial time; the title gives the mean reductions."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = result["runs"]
    s = result["summary"]
    title = WORKLOADS.get(result["config"].get("workload", "bfcl"))().title
    modes = [m for m in modes if m in s and m != "serial"]
    times = {
        m: {r["task_id"]: r["seconds"] for r in runs if r["mode"] == m} for m in ["serial", *modes]
    }
    ids = sorted(times["serial"], key=times["serial"].get)
    x = np.arange(len(ids))
    width = 0.8 / (len(modes) + 1)
    fig, ax = plt.subplots(figsize=(12, 4.5))
    for i, m in enumerate(["serial", *modes]):
        label = m if m == "serial" else f"{m} ({-100 * s[m].get('mean_reduction', 0):+.1f}% mean)"
        ax.bar(
            x + (i - len(modes) / 2) * width,
            [times[m].get(t, np.nan) for t in ids],
            width,
            label=label,
        )
    ax.set_title(
        f"{title} ({len(ids)}): completion time per task, serial mean {s['serial']['mean_s']:.2f} s"
    )
    ax.set_xlabel("task (sorted by serial completion time)")
    ax.set_ylabel("completion time (s)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
