"""Timing for the benchmark scripts: warm up (compile) once, then time repeats to completion."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import jax

__all__ = ["time_call"]


def time_call(fn: Callable, *args, repeats: int = 3, reduce: str = "min") -> float:
    """Seconds per call of ``fn(*args)`` (``min`` or ``median`` over ``repeats``), each call waited
    for with ``jax.block_until_ready`` after one untimed warm-up call."""
    if reduce not in ("min", "median"):
        raise ValueError(f"reduce must be 'min' or 'median', got {reduce!r}")
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return min(times) if reduce == "min" else statistics.median(times)
