"""Injected tool latencies: log-normal distributions given by their median and 95th percentile.

A latency ``L`` with median ``m`` and 95th percentile ``q`` is ``exp(N(mu, sigma^2))`` with
``mu = ln m`` and ``sigma = ln(q / m) / z95`` (``z95 = 1.6449`` the standard normal's 95th
percentile); its mean is ``exp(mu + sigma^2 / 2)``. The draw for a call is a function of a seed
and the call's identity (:meth:`LatencyModel.sample`), so that a call has the same latency whether
it runs early (speculatively) or when the model asks for it, and in every compared run.

The named profiles (:data:`LATENCY_PROFILES`, seconds, before the benchmark's one scale factor):

============  ======  =====  ====================================================================
profile       median  p95    basis
============  ======  =====  ====================================================================
web_search    0.8     2.5    search APIs (Brave 0.25/0.7 s ... SerpAPI 1.2/3.5 s p50/p95)
fetch         1.0     3.0    fetching and reading a web page
file_read     0.02    0.08   local ls / read of a file
file_edit     0.4     1.5    an edit or patch (Codex ``apply_patch`` ~0.7 s end to end)
exec          2.0     10.0   running a command or tests (Codex ``shell_command`` ~3.1 s mean)
api_read      0.4     1.2    a remote service's read call (assumed: between search and file read)
api_write     0.7     2.0    a remote service's write call (assumed: a write costs ~2x a read)
============  ======  =====  ====================================================================

Waiting is done by sleeping (``threading.Event.wait``), never by burning CPU.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math

import numpy as np

from jaxlab.registry import Registry

__all__ = ["LatencyModel", "LATENCY_PROFILES", "Z95", "latency_profile"]

Z95 = 1.6448536269514722  # standard normal 95th percentile


@dataclasses.dataclass(frozen=True)
class LatencyModel:
    """A log-normal latency (seconds) with the given median and 95th percentile, times ``scale``."""

    median: float
    p95: float
    scale: float = 1.0

    def __post_init__(self):
        if not (self.median > 0 and self.p95 >= self.median and self.scale >= 0):
            raise ValueError(
                f"latency needs 0 < median <= p95 and scale >= 0, got median={self.median}, "
                f"p95={self.p95}, scale={self.scale}"
            )

    @property
    def mu(self) -> float:
        return math.log(self.median * self.scale) if self.scale > 0 else -math.inf

    @property
    def sigma(self) -> float:
        return math.log(self.p95 / self.median) / Z95

    @property
    def mean(self) -> float:
        """``E[L] = scale * median * exp(sigma^2 / 2)``."""
        return self.scale * self.median * math.exp(self.sigma**2 / 2)

    def scaled(self, factor: float) -> LatencyModel:
        return dataclasses.replace(self, scale=self.scale * factor)

    def sample(self, seed: int, *key: object) -> float:
        """The latency of the call identified by ``key`` (any printable parts), deterministic in
        ``(seed, key)``."""
        if self.scale == 0:
            return 0.0
        digest = hashlib.blake2b(repr((seed, *key)).encode(), digest_size=8).digest()
        rng = np.random.default_rng(int.from_bytes(digest, "little"))
        return float(np.exp(self.mu + self.sigma * rng.standard_normal()))


LATENCY_PROFILES: Registry[LatencyModel] = Registry("latency profile")
for _name, _m, _q in (
    ("web_search", 0.8, 2.5),
    ("fetch", 1.0, 3.0),
    ("file_read", 0.02, 0.08),
    ("file_edit", 0.4, 1.5),
    ("exec", 2.0, 10.0),
    ("api_read", 0.4, 1.2),
    ("api_write", 0.7, 2.0),
):
    LATENCY_PROFILES.register(_name, LatencyModel(_m, _q))


def latency_profile(name: str, scale: float = 1.0) -> LatencyModel:
    """A named profile (:data:`LATENCY_PROFILES`) times ``scale``."""
    return LATENCY_PROFILES.get(name).scaled(scale)
