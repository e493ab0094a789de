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
still pending at :meth:`close` is cancelled.

The speculation window (``window``): when a speculative result arrives, the predictor is asked
again, from the log extended with the unconfirmed speculations up to it (their outputs feed the
data-flow rules), and its calls are launched as that speculation's children, up to ``window``
calls ahead of the last confirmed one, within the same budget and utility rule. A child on a state
that an unconfirmed call before it changed starts from a copy of that call's result state (a
frozen snapshot, taken when its result arrived), so a chain of mutating calls never touches the
real state; it is valid once that call is promoted and nothing else changed the state since, at
the version the real call will see. Promotion goes in order: only a speculation whose parent is
confirmed (or that has none) can serve the model's call, and when the model makes another call
where a chain expected one, that chain is discarded with everything predicted after it. The first
call of a user turn is speculated when the message arrives, as the model starts its first decode.
When the budget is full, a candidate for the model's next call displaces the least useful running
speculation further ahead (joint scheduling).

Every call's latency is a function of (seed, task, canonical call, state version), so a promoted
result took exactly as long as the real call would.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import heapq
import itertools
import logging
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
_LOG = logging.getLogger(__name__)


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
    on_done: Callable[[], None] | None = None  # after the latency wait, before ``done`` is set
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
        if job.on_done is not None and not job.cancelled.is_set():
            try:
                job.on_done()
            except Exception:  # a worker must outlive a failing hook
                _LOG.exception("on_done hook of %s failed", job.call.name)

    @property
    def closed(self) -> bool:
        return self._closed

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
    """Speculation settings (see the module docstring). ``window``: how many calls ahead of the
    model's last confirmed call a chain of speculations may run (1: only the next call)."""

    budget: int = 3
    top_k: int = 3
    mutating: str = "sandbox"
    cost_weight: float = 0.02
    lookahead: bool = True
    window: int = 4
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
        if self.window < 1:
            raise ValueError(f"window must be >= 1, got {self.window}")


@dataclasses.dataclass(eq=False)
class _Spec:
    """One speculation. ``parent``: the speculation it was predicted after (None: predicted
    from the real log); ``source``: the speculation whose post-call copy of this call's state it
    starts from (None: the real state); ``version``: the state's version the real call will see
    (the one the result is valid at)."""

    job: Job
    state_key: str | None
    version: int | None
    rank: int
    probability: float = 1.0
    parent: _Spec | None = None
    source: _Spec | None = None
    snapshot: Any = None  # a frozen copy of the state after this (non-read-only) call
    arrived: bool = False  # its result is in (its latency has passed)
    promoted: bool = False
    dead: bool = False
    extended: bool = False
    children: list[_Spec] = dataclasses.field(default_factory=list)

    @property
    def on_frontier(self) -> bool:
        """Every call before it is confirmed: it is a candidate for the model's next call."""
        return self.parent is None or self.parent.promoted

    @property
    def ahead(self) -> int:
        """Calls from the last confirmed one to this one (1: the next call)."""
        n, s = 1, self.parent
        while s is not None and not s.promoted:
            n, s = n + 1, s.parent
        return n

    def event(self) -> Event:
        """The event this call will be if the model makes it."""
        v = self.job.value
        return Event(self.job.call.name, output_status(v), dict(self.job.call.arguments), v)


_STATS = (
    "calls",
    "predicted_steps",
    "top1_hits",
    "top3_hits",
    "window_hits",
    "launched",
    "chained",
    "chain_promoted",
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
        self.pending: list[_Spec] = []
        self.stats: dict[str, float] = dict.fromkeys(_STATS, 0)
        self.stats.update(wasted_tool_seconds=0.0, saved_tool_seconds=0.0, stall_seconds=0.0)
        self._ranked: list[str] = []
        self._lock = threading.RLock()
        self._closed = False
        self._decode_estimate = float("inf")
        self._allowed = frozenset(registry.names())  # predictions of other tools are passed over

    @property
    def _on(self) -> bool:
        return self.predictor is not None and self.config.enabled and not self._closed

    # -- helpers ---------------------------------------------------------------------------------
    def _version(self, key: str | None) -> int | None:
        return None if key is None else self.state.versions[key]

    def _latency(self, tool: Tool, call: ToolCall, version: int | None) -> float:
        if tool.latency is None:
            return 0.0
        return tool.latency.sample(self.seed, self.task_id, call.key, version)

    def _valid(self, spec: _Spec) -> bool:
        """Whether the state the speculation started from is the real state now."""
        if spec.dead:
            return False
        if spec.source is not None and not spec.source.promoted:
            return False
        return spec.state_key is None or self.state.versions[spec.state_key] == spec.version

    def _running(self) -> int:
        return sum(1 for s in self.pending if not (s.arrived or s.job.done.is_set()))

    def _discard(self, spec: _Spec) -> None:
        """Cancels and discards a speculation and every speculation predicted after it."""
        if spec.dead:
            return
        spec.dead = True
        if spec in self.pending:
            self.pending.remove(spec)
        spec.job.cancel()
        self.stats["discarded"] += 1
        self.stats["wasted_tool_seconds"] += spec.job.busy_seconds
        for child in spec.children:
            self._discard(child)

    def _stale(self, spec: _Spec) -> bool:
        """Whether the speculation can no longer be valid (one waiting on its source's
        confirmation can)."""
        if spec.dead or (spec.source is not None and spec.source.dead):
            return True
        if spec.source is not None and not spec.source.promoted:
            return False
        return spec.state_key is not None and self.state.versions[spec.state_key] != spec.version

    def _drop_stale(self) -> None:
        for spec in [s for s in self.pending if self._stale(s)]:
            self._discard(spec)

    # -- the loop's side ---------------------------------------------------------------------------
    def user_turn(self, text: str) -> None:
        self.log.user_turn(text, time.perf_counter())

    def speculate(self, decode_estimate: float = float("inf")) -> list[ToolCall]:
        """Launches speculative calls for the coming step (call it as the model starts decoding,
        also the first decode of a user turn, the moment the message arrives;
        ``decode_estimate`` is the expected decode time in seconds). Returns what it launched
        from the log; chains grow from finished speculations as well (:meth:`_extend`)."""
        self._ranked = []
        self._decode_estimate = decode_estimate
        if not self._on:
            return []
        with self._lock:
            self._drop_stale()
            predictions = self.predictor.predict(self.log, self.config.top_k, self._allowed)
            calls = self._canonical(predictions)
            self._ranked = [c.key for c, _ in calls]
            launched = self._launch(calls, decode_estimate, parent=None)
            self._extend_leaves()
            return launched

    def _speculate_ahead(
        self, call: ToolCall, tool: Tool, spec: _Spec | None = None
    ) -> list[ToolCall]:
        """Looks one step further while ``call`` runs: predicts from the log with ``call`` in it
        (status "ok", output still pending, so rules that read its output give nothing) and
        launches what does not touch the state ``call`` changes. When ``call`` is served by the
        speculation ``spec``, what it launches joins ``spec``'s chain (as its children)."""
        if not self._on or not self.config.lookahead:
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
            if spec is not None and spec.dead:
                return []
            return self._launch(calls, float("inf"), parent=spec)

    # -- the speculation window ------------------------------------------------------------------
    def _chain(self, spec: _Spec) -> list[_Spec]:
        """The unconfirmed speculations from the last confirmed call to ``spec``, in order."""
        out, s = [], spec
        while s is not None and not s.promoted:
            out.append(s)
            s = s.parent
        return out[::-1]

    def _extend(self, spec: _Spec) -> list[ToolCall]:
        """Predicts the calls after a finished speculation, from the log extended with the
        unconfirmed chain up to it (its outputs feed the data-flow rules), and launches them as
        its children. Call with the lock held."""
        if (
            spec.extended
            or spec.dead
            or spec.promoted
            or not spec.arrived
            or spec.job.cancelled.is_set()
            or spec.ahead >= self.config.window
            or self._running() >= self.config.budget
        ):
            return []
        spec.extended = True
        chain = self._chain(spec)
        hypothetical = EventLog(self.task_id, [*self.log.events, *(s.event() for s in chain)])
        predictions = self.predictor.predict(hypothetical, self.config.top_k, self._allowed)
        calls = [(c, p * spec.probability) for c, p in self._canonical(predictions)]
        return self._launch(calls, self._decode_estimate * (spec.ahead + 1), parent=spec)

    def _extend_leaves(self) -> None:
        for spec in list(self.pending):
            self._extend(spec)

    def _finished(self, spec: _Spec) -> None:
        """A speculation's result arrived (a worker thread, before its job is marked done)."""
        with self._lock:
            if spec.dead or self._closed:
                return
            spec.arrived = True
            if self.scheduler.closed:
                return
            if (
                spec.state_key is not None
                and self.registry.get(spec.job.call.name).effect is not Effect.READ_ONLY
            ):
                spec.snapshot = copy.deepcopy(spec.job.obj)
            self._extend_leaves()

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

    def _make_room(self, utility: float) -> bool:
        """Frees a place in the budget for a candidate for the model's next call: discards the
        least useful running speculation further ahead (and what follows it), if one is less
        useful than ``utility``."""
        further = [
            s for s in self.pending if not (s.arrived or s.job.done.is_set()) and not s.on_frontier
        ]
        if not further:
            return False
        worst = min(further, key=lambda s: s.job.utility)
        if worst.job.utility >= utility:
            return False
        self._discard(worst)
        return True

    def _state_source(self, parent: _Spec | None, key: str) -> _Spec | None:
        """The latest unconfirmed speculation up the chain that changed state ``key`` on a copy
        (None: the real state is the chain's starting point for ``key``)."""
        if parent is None:
            return None
        for s in reversed(self._chain(parent)):
            if s.state_key == key and s.snapshot is not None:
                return s
        return None

    def _launch(
        self, calls: list[tuple[ToolCall, float]], decode_estimate: float, parent: _Spec | None
    ) -> list[ToolCall]:
        launched = []
        frontier = parent is None or parent.promoted
        ancestors = self._chain(parent) if parent is not None else []
        for rank, (call, probability) in enumerate(calls):
            # one speculation per call and place in the chain
            if any(
                s.job.call.key == call.key and (s.parent is parent or (frontier and s.on_frontier))
                for s in self.pending
            ):
                continue
            tool = self.registry.get(call.name)
            if tool.effect is not Effect.READ_ONLY and (
                self.config.mutating == "never" or not tool.copyable
            ):
                self.stats["mutating_blocked"] += 1
                continue
            mean = tool.latency.mean if tool.latency is not None else 0.0
            utility = probability * min(mean, decode_estimate) - self.config.cost_weight * mean
            if utility <= 0 and mean > 0:
                continue
            if self._running() >= self.config.budget and not (
                frontier and self._make_room(utility)
            ):
                continue
            key = tool.state_key
            source = self._state_source(parent, key) if key is not None else None
            if tool.effect is Effect.READ_ONLY and any(
                a.job.call.key == call.key
                and a.source is source
                and (source is not None or a.version == self._version(key))
                for a in ancestors
            ):
                continue  # the same read of the same state, already made up the chain
            lock = None
            if source is not None:
                # chained on the copy a speculation before it left: valid once that one is
                # promoted and nothing else changed the state since
                version = source.version + 1
                obj = source.snapshot
                if tool.effect is not Effect.READ_ONLY:
                    obj = copy.deepcopy(obj)
                    self.stats["sandboxed"] += 1
            elif tool.effect is Effect.READ_ONLY:
                obj = self.state.objects[key] if key is not None else None
                version = self._version(key)
                lock = self.state.locks[key] if key is not None else None
            else:
                obj, version = self.state.copy_of(key)
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
            spec = _Spec(job, key, version, rank, probability, parent, source)
            job.on_done = functools.partial(self._finished, spec)
            if parent is not None:
                parent.children.append(spec)
                self.stats["chained"] += 1
            self.pending.append(spec)
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
            # the candidates: speculations of this call with every call before them confirmed;
            # a chain that expected another call here is discarded with what follows it
            spec = None
            for s in [s for s in self.pending if s.on_frontier]:
                if s.dead:
                    continue
                if s.job.call.key == call.key and spec is None and self._valid(s):
                    spec = s
                elif s.parent is not None or s.job.call.key == call.key:
                    self._discard(s)
            if spec is not None:
                self.pending.remove(spec)
        self._speculate_ahead(call, tool, spec)
        if spec is not None:
            spec.job.done.wait()
            job = spec.job
            with self._lock:
                ok = job.computed and not job.cancelled.is_set() and self._valid(spec)
                if ok and tool.effect is not Effect.READ_ONLY:
                    ok = self.state.replace(spec.state_key, job.obj, spec.version)
                if ok:
                    spec.promoted = True
                    self.stats["chain_promoted"] += spec.parent is not None
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
                    spec.dead = True
                    self.stats["discarded"] += 1
                    self.stats["wasted_tool_seconds"] += job.busy_seconds
                    for child in spec.children:
                        self._discard(child)
        if event is None:
            event = self._run_real(tool, call)
        with self._lock:
            if tool.effect is not Effect.READ_ONLY:
                self._drop_stale()
            self.log.append(event)
            if self._on:
                self._extend_leaves()
        self.stats["stall_seconds"] += time.perf_counter() - t0
        return event

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
            self._closed = True
            for spec in list(self.pending):
                self._discard(spec)
