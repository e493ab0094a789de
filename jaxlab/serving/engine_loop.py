"""One background thread drives the :class:`~jaxlab.generation.Engine`; asyncio serves HTTP.

:class:`EngineLoop` owns the thread. An endpoint calls :meth:`EngineLoop.add` (from the event
loop) to queue a request and gets a :class:`RequestStream`; the thread steps the engine and hands
each step's deltas of that request to the stream's ``asyncio.Queue`` with
``loop.call_soon_threadsafe``, which the endpoint reads with :meth:`EngineLoop.next` (or
:meth:`EngineLoop.deltas`). An
endpoint whose client went away calls :meth:`EngineLoop.abort`: the engine drops the request
before its next decode step, so the slot is free within one step.

Admission: at most ``num_slots + max_queue`` sequences (a request with ``n`` samples counts
``n``) are admitted at once; one more is refused with :class:`QueueFull` (the server's 429).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from collections.abc import AsyncIterator, Hashable, Sequence

from jaxlab.generation import Delta, Engine, SamplingParams
from jaxlab.serving.metrics import ServerMetrics

__all__ = ["EngineLoop", "RequestStream", "QueueFull", "EngineFailed", "engine_stats"]

log = logging.getLogger("jaxlab.serving")

_STAT_KEYS = ("prefix_cache_queries", "prefix_cache_hits", "prefill_tokens", "cached_tokens")


class QueueFull(Exception):
    """Every slot and queue place is taken."""


class EngineFailed(Exception):
    """An engine step raised; the requests in flight were dropped (the error is in the log)."""


def engine_stats(engine: Engine) -> dict[str, int]:
    """The engine's prefix-cache and prefill counters (zeros where the engine keeps none)."""
    stats = getattr(engine, "stats", None)
    got = stats() if callable(stats) else {}
    return {k: int(got.get(k, 0)) for k in _STAT_KEYS}


@dataclasses.dataclass(eq=False)
class RequestStream:
    """One admitted request: its queue of step deltas (lists of :class:`Delta`) and timings."""

    request_id: Hashable
    n: int
    prompt_tokens: int
    arrival: float
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    last_token: dict[int, float] = dataclasses.field(default_factory=dict)
    finished: int = 0  # samples finished (seen by the engine thread)
    complete: bool = False  # the last deltas were read (by the endpoint)
    closed: bool = False  # finished, aborted or failed: no longer in the engine's hands


class EngineLoop:
    """Drives ``engine`` from one thread; see the module docstring."""

    def __init__(
        self, engine: Engine, metrics: ServerMetrics | None = None, *, max_queue: int = 256
    ):
        if max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {max_queue}")
        self.engine, self.metrics, self.max_queue = engine, metrics, max_queue
        self._streams: dict[Hashable, RequestStream] = {}
        self._lock = threading.Lock()
        self._admitted = 0  # sequences admitted and not closed
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._stats_base = engine_stats(engine)

    @property
    def capacity(self) -> int:
        return self.engine.num_slots + self.max_queue

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        """Starts the thread (counters of the prefix cache are counted from here)."""
        if self._thread is not None:
            return
        self._stats_base = engine_stats(self.engine)
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="jaxlab-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = 30.0) -> None:
        """Stops the thread after its current step; requests still admitted are dropped."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        with self._lock:
            left = list(self._streams.values())
        for stream in left:
            self.abort(stream.request_id)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- requests --------------------------------------------------------------------------------
    def add(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        request_id: Hashable,
        *,
        arrival: float | None = None,
    ) -> RequestStream:
        """Queues a request (call it from the event loop that will read it). Raises
        :class:`QueueFull` when there is no room, and the engine's ``ValueError`` for a request
        it refuses."""
        stream = RequestStream(
            request_id,
            params.n,
            len(prompt_ids),
            time.perf_counter() if arrival is None else arrival,
            asyncio.get_running_loop(),
            asyncio.Queue(),
        )
        with self._lock:
            if self._admitted + params.n > self.capacity:
                raise QueueFull(
                    f"the server is at capacity ({self.engine.num_slots} slots and "
                    f"{self.max_queue} queue places in use); retry shortly"
                )
            if request_id in self._streams:
                raise ValueError(f"request id {request_id!r} is in use")
            self._streams[request_id] = stream
            self._admitted += params.n
        try:
            self.engine.submit(prompt_ids, params, request_id=request_id)
        except Exception:
            self._close(stream)
            raise
        if self.metrics is not None:
            self.metrics.prompt_tokens.inc(len(prompt_ids))
        return stream

    def abort(self, request_id: Hashable) -> bool:
        """Drops a request whose client went away; returns whether it was still in flight."""
        with self._lock:
            stream = self._streams.get(request_id)
        if stream is None:
            return False
        self.engine.cancel(request_id)
        self._close(stream)
        if self.metrics is not None:
            self.metrics.cancelled.inc()
        return True

    async def next(self, stream: RequestStream, timeout: float | None = None) -> list[Delta]:
        """The request's deltas of its next engine step (after the last one, ``stream.complete``
        is true). Raises :class:`EngineFailed` if an engine step failed meanwhile, and
        ``asyncio.TimeoutError`` after ``timeout`` seconds without a step (nothing is lost)."""
        if stream.complete:
            raise RuntimeError("the request has no more deltas")
        item, last = await asyncio.wait_for(stream.queue.get(), timeout)
        if last:
            stream.complete = True
        if isinstance(item, BaseException):
            raise EngineFailed(str(item)) from item
        return item

    async def deltas(self, stream: RequestStream) -> AsyncIterator[list[Delta]]:
        """The request's deltas, one list per engine step, until all its samples finished."""
        while not stream.complete:
            yield await self.next(stream)

    def _close(self, stream: RequestStream) -> None:
        with self._lock:
            if stream.closed:
                return
            stream.closed = True
            self._streams.pop(stream.request_id, None)
            self._admitted -= stream.n

    # -- the engine thread -----------------------------------------------------------------------
    def _run(self) -> None:
        engine = self.engine
        while not self._stop.is_set():
            if not engine.wait_for_work(0.05):
                continue
            try:
                deltas = engine.step_deltas()
            except Exception as e:  # noqa: BLE001 - reported to every request, logged in full
                log.exception("engine step failed; dropping the requests in flight")
                self._fail_all(e)
                continue
            now = time.perf_counter()
            by_request: dict[Hashable, list[Delta]] = {}
            for d in deltas:
                by_request.setdefault(d.request_id, []).append(d)
            for request_id, ds in by_request.items():
                with self._lock:
                    stream = self._streams.get(request_id)
                if stream is None or stream.closed:
                    continue  # aborted meanwhile
                stream.finished += sum(d.finish_reason is not None for d in ds)
                last = stream.finished >= stream.n
                self._observe(stream, ds, now, last)
                if last:
                    self._close(stream)
                self._put(stream, (ds, last))

    def _observe(self, stream: RequestStream, ds: list[Delta], now: float, last: bool) -> None:
        m = self.metrics
        for d in ds:
            if d.tokens:
                prev = stream.last_token.get(d.index)
                if m is not None:
                    if prev is None:
                        m.ttft.observe(now - stream.arrival)
                    else:
                        m.itl.observe((now - prev) / len(d.tokens))
                    m.generation_tokens.inc(len(d.tokens))
                stream.last_token[d.index] = now
        if m is not None and last:
            m.e2e.observe(now - stream.arrival)

    @staticmethod
    def _put(stream: RequestStream, item) -> None:
        try:
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, item)
        except RuntimeError:  # the event loop is closed: nobody is reading
            pass

    def _fail_all(self, error: Exception) -> None:
        with self._lock:
            streams = list(self._streams.values())
        for stream in streams:
            self.engine.cancel(stream.request_id)
            self._close(stream)
            self._put(stream, (EngineFailed(f"{type(error).__name__}: {error}"), True))

    # -- state -----------------------------------------------------------------------------------
    def state(self) -> dict:
        """Queue depth, requests and slots in use, and the prefix-cache counters since start."""
        engine = self.engine
        active = engine.num_active
        stats = engine_stats(engine)
        stats = {k: v - self._stats_base.get(k, 0) for k, v in stats.items()}
        queries = stats["prefix_cache_queries"]
        with self._lock:
            running = len(self._streams)
        return {
            "queue_depth": engine.pending,
            "requests_running": running,
            "slots_active": active,
            "slots": engine.num_slots,
            "slot_occupancy": active / engine.num_slots,
            "prefix_cache_hit_rate": stats["prefix_cache_hits"] / queries if queries else 0.0,
            **stats,
        }
