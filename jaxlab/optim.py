"""The one optimizer factory of the trainers: AdamW with global-norm clipping and a warmup schedule.

``jaxlab.train`` (next-token LM training) and ``jaxlab.rl.trainer`` (policy updates) both build
their optimizer here, from their own config dataclasses::

    tx = make_optimizer(lr=3e-3, warmup_steps=10, decay_steps=200, b2=0.95, grad_clip=1.0)
    lr_at = learning_rate_schedule(lr=3e-3, warmup_steps=10, decay_steps=200)
    lr_at(0), lr_at(10)  # the learning rate the first and the eleventh update use

Schedules (``step`` counts updates from 0, as optax does):

* no warmup, no decay: the constant ``lr`` (passed to optax as a number, so the optimizer state
  holds no schedule counter);
* ``warmup_steps`` only: linear from 0 to ``lr`` over ``warmup_steps`` updates, then constant;
* ``decay_steps`` given: linear warmup (at least one step) then cosine decay to 0 at ``decay_steps``
  (optax's ``warmup_cosine_decay_schedule``).
"""

from __future__ import annotations

from collections.abc import Callable

import optax

from jaxlab.config import check

__all__ = ["make_optimizer", "learning_rate_schedule", "check_optimizer_settings"]


def check_optimizer_settings(
    *,
    lr: float,
    warmup_steps: int = 0,
    decay_steps: int | None = None,
    weight_decay: float = 0.0,
    b1: float = 0.9,
    b2: float = 0.999,
    grad_clip: float | None = None,
) -> None:
    """Raises ``jaxlab.config.ConfigError`` naming the first bad setting (for ``__post_init__``)."""
    check(lr > 0, "lr", f"must be positive, got {lr}")
    check(0 <= warmup_steps, "warmup_steps", f"must be >= 0, got {warmup_steps}")
    check(
        decay_steps is None or decay_steps >= 1,
        "decay_steps",
        f"must be >= 1 or null, got {decay_steps}",
    )
    check(weight_decay >= 0, "weight_decay", f"must be >= 0, got {weight_decay}")
    check(0 <= b1 < 1 and 0 <= b2 < 1, "b1/b2", f"must lie in [0, 1), got {b1}, {b2}")
    check(
        grad_clip is None or grad_clip > 0,
        "grad_clip",
        f"must be positive, got {grad_clip}",
    )


def _schedule(lr: float, warmup_steps: int, decay_steps: int | None) -> float | optax.Schedule:
    if decay_steps is not None:
        warmup = max(warmup_steps, 1)
        return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(decay_steps, warmup + 1))
    if warmup_steps > 0:
        return optax.join_schedules(
            [optax.linear_schedule(0.0, lr, warmup_steps), optax.constant_schedule(lr)],
            [warmup_steps],
        )
    return lr


def learning_rate_schedule(
    *, lr: float, warmup_steps: int = 0, decay_steps: int | None = None
) -> Callable[[int], float]:
    """``step -> learning rate`` of the update with that index (0-based), as a Python float: the
    same schedule :func:`make_optimizer` applies, for logging."""
    schedule = _schedule(lr, warmup_steps, decay_steps)
    if callable(schedule):
        return lambda step: float(schedule(step))
    return lambda step: float(schedule)


def make_optimizer(
    *,
    lr: float,
    warmup_steps: int = 0,
    decay_steps: int | None = None,
    weight_decay: float = 0.0,
    b1: float = 0.9,
    b2: float = 0.999,
    grad_clip: float | None = None,
) -> optax.GradientTransformation:
    """AdamW (eps 1e-8) on the learning-rate schedule above, after clipping the gradient to a global
    norm of ``grad_clip`` (no clipping when None)."""
    check_optimizer_settings(
        lr=lr,
        warmup_steps=warmup_steps,
        decay_steps=decay_steps,
        weight_decay=weight_decay,
        b1=b1,
        b2=b2,
        grad_clip=grad_clip,
    )
    adamw = optax.adamw(
        _schedule(lr, warmup_steps, decay_steps), b1=b1, b2=b2, weight_decay=weight_decay
    )
    if grad_clip is None:
        return adamw
    return optax.chain(optax.clip_by_global_norm(grad_clip), adamw)
