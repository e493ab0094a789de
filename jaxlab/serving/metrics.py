"""The server's Prometheus metrics (``GET /metrics``, text exposition format).

Counters and histograms are updated as requests come and tokens are produced; the gauges of the
engine's state (queue depth, slots in use, prefix-cache hit rate) are read when ``/metrics`` is
scraped. Each server has its own registry, so several servers can live in one process.

=====================================================  ==========================================
``jaxlab_requests_total{endpoint,status}``             HTTP requests answered, by status
``jaxlab_requests_cancelled_total``                    requests dropped because the client left
``jaxlab_prompt_tokens_total``                         prompt tokens of requests admitted
``jaxlab_generation_tokens_total``                     tokens generated
``jaxlab_time_to_first_token_seconds``                 request arrival -> first token (histogram)
``jaxlab_inter_token_latency_seconds``                 gap between a sequence's tokens (histogram)
``jaxlab_request_latency_seconds``                     arrival -> last token (histogram)
``jaxlab_queue_depth``                                 requests waiting for a slot
``jaxlab_requests_running``                            requests admitted and not yet finished
``jaxlab_slots_active`` / ``jaxlab_slots``             decode slots in use / in all
``jaxlab_slot_occupancy``                              ``slots_active / slots``
``jaxlab_prefix_cache_{queries,hits}_total``           prefix-cache look-ups and hits (Engine)
``jaxlab_prefix_cache_hit_rate``                       ``hits / queries`` (0 before any query)
``jaxlab_prefill_tokens_total``                        prompt tokens prefilled (Engine)
``jaxlab_cached_tokens_total``                         prompt tokens served from the prefix cache
=====================================================  ==========================================
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

__all__ = ["ServerMetrics", "CONTENT_TYPE"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0)


class _StateCollector:
    """Gauges read from ``state()`` at scrape time."""

    def __init__(self, state: Callable[[], dict]):
        self.state = state

    def collect(self):
        s = self.state()
        gauges = {
            "jaxlab_queue_depth": ("requests waiting for a decode slot", s["queue_depth"]),
            "jaxlab_requests_running": (
                "requests admitted and not yet finished",
                s["requests_running"],
            ),
            "jaxlab_slots_active": ("decode slots in use", s["slots_active"]),
            "jaxlab_slots": ("decode slots in all", s["slots"]),
            "jaxlab_slot_occupancy": ("fraction of decode slots in use", s["slot_occupancy"]),
            "jaxlab_prefix_cache_hit_rate": (
                "prefix-cache hits per query (0 before any query)",
                s["prefix_cache_hit_rate"],
            ),
        }
        for name, (doc, value) in gauges.items():
            yield GaugeMetricFamily(name, doc, value=float(value))
        counters = {
            "jaxlab_prefix_cache_queries": "prefix-cache look-ups",
            "jaxlab_prefix_cache_hits": "prefix-cache look-ups that found a prefix",
            "jaxlab_prefill_tokens": "prompt tokens prefilled",
            "jaxlab_cached_tokens": "prompt tokens served from the prefix cache",
        }
        for name, doc in counters.items():
            key = name.removeprefix("jaxlab_")
            yield CounterMetricFamily(name, doc, value=float(s.get(key, 0)))


class ServerMetrics:
    """The metrics of one server. ``state`` returns the engine gauges (see the module table)."""

    def __init__(self, state: Callable[[], dict]):
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "jaxlab_requests", "HTTP requests answered", ["endpoint", "status"], registry=r
        )
        self.cancelled = Counter(
            "jaxlab_requests_cancelled", "requests dropped because the client left", registry=r
        )
        self.prompt_tokens = Counter(
            "jaxlab_prompt_tokens", "prompt tokens of requests admitted", registry=r
        )
        self.generation_tokens = Counter("jaxlab_generation_tokens", "tokens generated", registry=r)
        self.ttft = Histogram(
            "jaxlab_time_to_first_token_seconds",
            "request arrival to its first token",
            buckets=_TTFT_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "jaxlab_inter_token_latency_seconds",
            "time between consecutive tokens of a sequence",
            buckets=_ITL_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "jaxlab_request_latency_seconds",
            "request arrival to its last token",
            buckets=_E2E_BUCKETS,
            registry=r,
        )
        r.register(_StateCollector(state))

    def render(self) -> bytes:
        return generate_latest(self.registry)
