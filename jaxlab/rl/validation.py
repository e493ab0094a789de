"""Trace-time input checks with messages that name the arguments and their shapes."""

from __future__ import annotations

import jax.numpy as jnp

__all__ = ["check_same_shape", "check_floating", "check_rank"]


def check_same_shape(fn: str, **arrays) -> None:
    shapes = {k: tuple(v.shape) for k, v in arrays.items() if v is not None}
    if len(set(shapes.values())) > 1:
        listed = ", ".join(f"{k} {s}" for k, s in shapes.items())
        raise ValueError(f"{fn}: shapes must match, got {listed}")


def check_floating(fn: str, **arrays) -> None:
    for k, v in arrays.items():
        if v is not None and not jnp.issubdtype(v.dtype, jnp.floating):
            raise TypeError(f"{fn}: {k} must be a floating-point array, got dtype {v.dtype}")


def check_rank(fn: str, rank: int | tuple[int, ...], **arrays) -> None:
    ranks = (rank,) if isinstance(rank, int) else rank
    for k, v in arrays.items():
        if v is not None and v.ndim not in ranks:
            want = " or ".join(str(r) for r in ranks)
            raise ValueError(f"{fn}: {k} must have rank {want}, got shape {tuple(v.shape)}")
