"""Tool execution: a shared pool of tool workers, and PASTE's speculative executor on top of it.

:class:`ToolScheduler` runs tool jobs on ``workers`` threads. Authoritative jobs (calls the model
made) go before speculative ones, and when every worker is busy an authoritative job preempts the
least useful running speculative job (its wait ends at once; its result is dropped). A job computes
its result (holding its state's lock), then waits its injected latency by sleeping.

:class:`SpeculativeExecutor` is one task's executor. While the model decodes, :meth:`speculate`
asks the predictor for the next calls and launches those worth it:

- utility ``p * min(E[latency], decode estimate) - cost_weight * E[latency] > 0`` and at most
  ``budget`` speculative jobs of the task running at once;
- a ``read_only`` tool runs on the real state (under its lock); any other tool runs on a deep copy
  of its state (``mutating="sandbox"``), or is not run (``mutating="never"``, and always for a
  tool with no copyable state): counted in ``stats["mutating_blocked"]``.

Results stay apart from the task until :meth:`execute` gets the model's real call. If its
canonical name + arguments equal a speculation's, and the state the speculation read is still at
the version it read (no change since), the result is promoted: returned as is, and for a copy, the
copy replaces the real state (one version step, as the real call would have made). Otherwise the
call runs for real. A change to a state cancels and discards the speculations on it; whatever is
still pending at :meth:`close` is cancelled. Every call's latency is a function of (seed, task,
canonical call, state version), so a promoted result took exactly as long as the real call would.
"""

from __future__ import annotations

import copy
import dataclasses
import heapq
import itertools
import threading
import time
from collections.abc import Callable
from typing import Any

from jaxlab.agents.events import PENDING, Event, EventLog
from jaxlab.agents.miner import Predictor
from jaxlab.agents.tools import (
    Effect,
    Tool,
    ToolCall,
    ToolCallError,
    ToolRegistry,
    ToolState,
    output_status,
)

__all__ = ["Job", "ToolScheduler", "SpeculationConfig", "SpeculativeExecutor", "run_tool"]

_MUTATING_POLICIES = ("sandbox", "never")


def run_tool(tool: Tool, obj: Any, arguments: dict[str, Any]) -> Any:
    """Calls the tool (on ``obj`` when it has state); an exception becomes ``{"error": ...}``.

    The result is a deep copy: a tool may return a reference into its state (BFCL's
    ``get_ticket`` returns the ticket's own dict), and a later call must not change an output
    already given.
    """
    try:
        if tool.state_key is not None:
            value = tool.fn(obj, **copy.deepcopy(arguments))
        else:
            value = tool.fn(**copy.deepcopy(arguments))
    except Exception as e:  # a tool's failure is its output, as a real tool server reports it
        return {"error": f"{type(e).__name__}: {e}"}
    return copy.deepcopy(value)


@dataclasses.dataclass(eq=False)
class Job:
    """One run of a tool on an object (the real state, a copy, or none)."""

    tool: Tool
    call: ToolCall
    obj: Any
    latency: float
    speculative: bool
    utility: float = 0.0
    lock: Any = None  # the real state's lock (runs on the real state only)
    on_compute: Callable[[], None] | None = None  # under the lock, after the call (versioning)
    value: Any = None
    start: float = 0.0
    end: float = 0.0
    computed: bool = False
    done: threading.Event = dataclasses.field(default_factory=threading.Event)
    cancelled: threading.Event = dataclasses.field(default_factory=threading.Event)

    def cancel(self) -> None:
        self.cancelled.set()

    @property
    def busy_seconds(self) -> float:
        """Seconds the job held a worker (so far, if still running)."""
        if not self.start:
            return 0.0
        return (self.end or time.perf_counter()) - self.start


class ToolScheduler:
    """``workers`` threads running jobs, authoritative first; see the module docstring."""

    def __init__(self, workers: int = 8):
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.workers = workers
        self._heap: list[tuple[int, float, int, Job]] = []
        self._seq = itertools.count()
        self._cv = threading.Condition()
        self._running: set[Job] = set()
        self._closed = False
        self.preempted = 0
        self._threads = [
            threading.Thread(target=self._loop, daemon=True, name=f"tool-worker-{i}")
            for i in range(workers)
        ]
        for t in self._threads:
            t.start()

    def submit(self, job: Job) -> Job:
        with self._cv:
            if self._closed:
                raise RuntimeError("the scheduler is closed")
            prio = 1 if job.speculative else 0
            heapq.heappush(self._heap, (prio, -job.utility, next(self._seq), job))
            if not job.speculative and len(self._running) >= self.workers:
                spec = [j for j in self._running if j.speculative and not j.cancelled.is_set()]
                if spec:
                    min(spec, key=lambda j: j.utility).cancel()
                    self.preempted += 1
            self._cv.notify()
        return job

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._heap and not self._closed:
                    self._cv.wait()
                if self._closed and not self._heap:
                    return
                job = heapq.heappop(self._heap)[-1]
                self._running.add(job)
            try:
                self._run(job)
            finally:
                with self._cv:
                    self._running.discard(job)
                job.done.set()

    @staticmethod
    def _run(job: Job) -> None:
        if job.cancelled.is_set():
            return
        job.start = time.perf_counter()
        if job.lock is not None:
            with job.lock:
                job.value = run_tool(job.tool, job.obj, dict(job.call.arguments))
                if job.on_compute is not None:
                    job.on_compute()
        else:
            job.value = run_tool(job.tool, job.obj, dict(job.call.arguments))
        job.computed = True
        job.cancelled.wait(job.latency)
        job.end = time.perf_counter()

    def close(self) -> None:
        with self._cv:
            self._closed = True
            for *_, job in self._heap:
                job.cancel()
            self._cv.notify_all()
        for t in self._threads:
            t.join(timeout=5)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


@dataclasses.dataclass(frozen=True)
class SpeculationConfig:
    """Speculation settings (see the module docstring)."""

    budget: int = 3
    top_k: int = 3
    mutating: str = "sandbox"
    cost_weight: float = 0.02
    lookahead: bool = True
    enabled: bool = True

    def __post_init__(self):
        if self.budget < 0 or self.top_k < 1:
            raise ValueError(f"budget must be >= 0 and top_k >= 1, got {self.budget}, {self.top_k}")
        if self.mutating not in _MUTATING_POLICIES:
            raise ValueError(
                f"mutating must be one of {', '.join(_MUTATING_POLICIES)}, got {self.mutating!r}"
            )
        if self.cost_weight < 0:
            raise ValueError(f"cost_weight must be >= 0, got {self.cost_weight}")


@dataclasses.dataclass(eq=False)
class _Spec:
    job: Job
    state_key: str | None
    version: int | None
    rank: int


_STATS = (
    "calls",
    "predicted_steps",
    "top1_hits",
    "top3_hits",
    "window_hits",
    "launched",
    "sandboxed",
    "mutating_blocked",
    "discarded",
    "promoted",
    "real_runs",
)


class SpeculativeExecutor:
    """One task's tool executor, with speculation when a ``predictor`` is given.

    Args:
      registry, state: the task's tools and their state.
      scheduler: the shared :class:`ToolScheduler`.
      predictor: proposes next calls from the event log (None: the serial loop, no speculation).
      config: :class:`SpeculationConfig`.
      seed, task_id: identify the latency draws (see :class:`~jaxlab.agents.latency.LatencyModel`).
    """

    def __init__(
        self,
        registry: ToolRegistry,
        state: ToolState,
        scheduler: ToolScheduler,
        *,
        predictor: Predictor | None = None,
        config: SpeculationConfig | None = None,
        seed: int = 0,
        task_id: str = "",
    ):
        self.registry, self.state, self.scheduler = registry, state, scheduler
        self.predictor = predictor
        self.config = config or SpeculationConfig()
        self.seed, self.task_id = seed, task_id
        self.log = EventLog(task_id)
        self.pending: dict[str, _Spec] = {}
        self.stats: dict[str, float] = dict.fromkeys(_STATS, 0)
        self.stats.update(wasted_tool_seconds=0.0, saved_tool_seconds=0.0, stall_seconds=0.0)
        self._ranked: list[str] = []
        self._lock = threading.Lock()
        self._allowed = frozenset(registry.names())  # predictions of other tools are passed over

    # -- helpers ---------------------------------------------------------------------------------
    def _version(self, key: str | None) -> int | None:
        return None if key is None else self.state.versions[key]

    def _latency(self, tool: Tool, call: ToolCall, version: int | None) -> float:
        if tool.latency is None:
            return 0.0
        return tool.latency.sample(self.seed, self.task_id, call.key, version)

    def _valid(self, spec: _Spec) -> bool:
        return spec.state_key is None or self.state.versions[spec.state_key] == spec.version

    def _discard(self, key: str) -> None:
        spec = self.pending.pop(key)
        spec.job.cancel()
        self.stats["discarded"] += 1
        self.stats["wasted_tool_seconds"] += spec.job.busy_seconds

    def _drop_stale(self) -> None:
        for key in [k for k, s in self.pending.items() if not self._valid(s)]:
            self._discard(key)

    # -- the loop's side ---------------------------------------------------------------------------
    def user_turn(self, text: str) -> None:
        self.log.user_turn(text, time.perf_counter())

    def speculate(self, decode_estimate: float = float("inf")) -> list[ToolCall]:
        """Launches speculative calls for the coming step (call it as the model starts decoding;
        ``decode_estimate`` is the expected decode time in seconds). Returns what it launched."""
        self._ranked = []
        if self.predictor is None or not self.config.enabled:
            return []
        with self._lock:
            self._drop_stale()
            predictions = self.predictor.predict(self.log, self.config.top_k, self._allowed)
            calls = self._canonical(predictions)
            self._ranked = [c.key for c, _ in calls]
            return self._launch(calls, decode_estimate)

    def _speculate_ahead(self, call: ToolCall, tool: Tool) -> list[ToolCall]:
        """Looks one step further while ``call`` runs: predicts from the log with ``call`` in it
        (status "ok", output still pending, so rules that read its output give nothing) and
        launches what does not touch the state ``call`` changes."""
        if self.predictor is None or not self.config.enabled or not self.config.lookahead:
            return []
        hypothetical = EventLog(
            self.task_id, [*self.log.events, Event(call.name, "ok", call.arguments, PENDING)]
        )
        avoid = tool.state_key if tool.effect is not Effect.READ_ONLY else None
        with self._lock:
            predictions = self.predictor.predict(hypothetical, self.config.top_k, self._allowed)
            calls = [
                (c, p)
                for c, p in self._canonical(predictions)
                if c.key != call.key
                and (avoid is None or self.registry.get(c.name).state_key != avoid)
            ]
            return self._launch(calls, float("inf"))

    def _canonical(self, predictions) -> list[tuple[ToolCall, float]]:
        out = []
        for pred in predictions:
            try:
                out.append(
                    (self.registry.canonical(pred.call.name, pred.call.arguments), pred.probability)
                )
            except ToolCallError:
                continue
        return out

    def _launch(
        self, calls: list[tuple[ToolCall, float]], decode_estimate: float
    ) -> list[ToolCall]:
        launched = []
        for rank, (call, probability) in enumerate(calls):
            if call.key in self.pending:
                continue
            tool = self.registry.get(call.name)
            if tool.effect is not Effect.READ_ONLY and (
                self.config.mutating == "never" or not tool.copyable
            ):
                self.stats["mutating_blocked"] += 1
                continue
            running = sum(1 for s in self.pending.values() if not s.job.done.is_set())
            if running >= self.config.budget:
                continue
            mean = tool.latency.mean if tool.latency is not None else 0.0
            utility = probability * min(mean, decode_estimate) - self.config.cost_weight * mean
            if utility <= 0 and mean > 0:
                continue
            key = tool.state_key
            if tool.effect is Effect.READ_ONLY:
                obj = self.state.objects[key] if key is not None else None
                version = self._version(key)
                lock = self.state.locks[key] if key is not None else None
            else:
                obj, version = self.state.copy_of(key)
                lock = None
                self.stats["sandboxed"] += 1
            job = Job(
                tool,
                call,
                obj,
                self._latency(tool, call, version),
                speculative=True,
                utility=utility,
                lock=lock,
            )
            if lock is not None:
                # the read must see the version it is filed under
                def check(job=job, key=key, version=version):
                    if self.state.versions[key] != version:
                        job.cancel()

                job.on_compute = check
            self.pending[call.key] = _Spec(job, key, version, rank)
            self.scheduler.submit(job)
            self.stats["launched"] += 1
            launched.append(call)
        return launched

    def execute(self, name: str, arguments: dict[str, Any] | None = None) -> Event:
        """Runs the model's call (promoting a matching speculation); returns its event."""
        t0 = time.perf_counter()
        arguments = dict(arguments or {})
        self.stats["calls"] += 1
        try:
            call = self.registry.canonical(name, arguments)
        except ToolCallError as e:
            ev = Event(name, "error", arguments, {"error": str(e)}, t0, t0)
            return self.log.append(ev)
        tool = self.registry.get(call.name)
        if self._ranked:
            self.stats["predicted_steps"] += 1
            self.stats["top1_hits"] += call.key in self._ranked[:1]
            self.stats["top3_hits"] += call.key in self._ranked[:3]
        self._ranked = []
        event = None
        with self._lock:
            spec = self.pending.pop(call.key, None)
        self._speculate_ahead(call, tool)
        if spec is not None:
            spec.job.done.wait()
            job = spec.job
            ok = job.computed and not job.cancelled.is_set() and self._valid(spec)
            if ok and tool.effect is not Effect.READ_ONLY:
                ok = self.state.replace(spec.state_key, job.obj, spec.version)
            if ok:
                self.stats["window_hits"] += 1
                self.stats["promoted"] += 1
                self.stats["saved_tool_seconds"] += max(0.0, min(job.end, t0) - job.start)
                event = Event(
                    call.name,
                    output_status(job.value),
                    dict(call.arguments),
                    job.value,
                    job.start,
                    job.end,
                    "speculative",
                )
            else:
                self.stats["discarded"] += 1
                self.stats["wasted_tool_seconds"] += job.busy_seconds
        if event is None:
            event = self._run_real(tool, call)
        if tool.effect is not Effect.READ_ONLY:
            with self._lock:
                self._drop_stale()
        self.stats["stall_seconds"] += time.perf_counter() - t0
        return self.log.append(event)

    def _run_real(self, tool: Tool, call: ToolCall) -> Event:
        self.stats["real_runs"] += 1
        key = tool.state_key
        obj = self.state.objects[key] if key is not None else None
        lock = self.state.locks[key] if key is not None else None
        version = self._version(key)

        def bump():
            if tool.effect is not Effect.READ_ONLY and key is not None:
                self.state.versions[key] += 1

        job = Job(tool, call, obj, self._latency(tool, call, version), False, lock=lock)
        job.on_compute = bump
        self.scheduler.submit(job)
        job.done.wait()
        return Event(
            call.name, output_status(job.value), dict(call.arguments), job.value, job.start, job.end
        )

    def close(self) -> None:
        """Cancels and discards what is still pending."""
        with self._lock:
            for key in list(self.pending):
                self._discard(key)
