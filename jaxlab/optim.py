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

Non-finite losses and gradients (``on_nonfinite`` in the trainers' configs): ``"stop"`` (default)
ends the run with :class:`NonFiniteError` before the next save, so a diverged state never replaces
a good checkpoint; ``"skip"`` builds the optimizer with ``skip_nonfinite=True`` (optax's
``apply_if_finite``: an update whose gradient holds a NaN or an infinity leaves parameters and
moments unchanged, and :func:`skipped_updates` counts it).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxlab.config import check
from jaxlab.errors import UserError

__all__ = [
    "make_optimizer",
    "learning_rate_schedule",
    "check_optimizer_settings",
    "NONFINITE_POLICIES",
    "NonFiniteError",
    "check_finite_step",
    "poison_if_nonfinite",
    "skipped_updates",
]

NONFINITE_POLICIES = ("stop", "skip")


class NonFiniteError(UserError, FloatingPointError):
    """A loss or gradient norm became NaN or infinite; the run stopped before saving it."""


def check_finite_step(step: int, loss: float, grad_norm: float, *, key: str) -> None:
    """Raises :class:`NonFiniteError` when ``loss`` or ``grad_norm`` is not finite.

    ``key`` is the config key that chooses the policy (named in the message)."""
    if math.isfinite(loss) and math.isfinite(grad_norm):
        return
    raise NonFiniteError(
        f"step {step}: loss {loss}, gradient norm {grad_norm}: not finite; stopped before saving "
        f"(the checkpoints on disk are from before it). Lower the learning rate, or set "
        f"{key}=skip to skip such updates"
    )


def poison_if_nonfinite(loss: jax.Array, grads: Any) -> Any:
    """``grads`` unchanged when ``loss`` is finite, else all NaN (so that ``skip_nonfinite`` skips
    an update whose loss alone is not finite). Traceable."""
    ok = jnp.isfinite(loss)
    return jax.tree.map(lambda g: jnp.where(ok, g, jnp.nan).astype(g.dtype), grads)


def skipped_updates(opt_state: Any) -> int:
    """Updates skipped for a non-finite gradient so far (0 without ``skip_nonfinite``)."""
    leaves = jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, optax.ApplyIfFiniteState))
    total = 0
    for leaf in leaves:
        if isinstance(leaf, optax.ApplyIfFiniteState):
            value = leaf.total_notfinite
            total += int(getattr(value, "value", value))
    return total


def check_optimizer_settings(
    *,
    lr: float,
    warmup_steps: int = 0,
    decay_steps: int | None = None,
    weight_decay: float = 0.0,
    b1: float = 0.9,
    b2: float = 0.999,
    grad_clip: float | None = None,
    skip_nonfinite: bool = False,
) -> None:
    """Raises ``jaxlab.config.ConfigError`` naming the first bad setting (for ``__post_init__``)."""
    check(math.isfinite(lr), "lr", f"must be a finite number, got {lr}")
    check(lr > 0, "lr", f"must be positive, got {lr}")
    check(0 <= warmup_steps, "warmup_steps", f"must be >= 0, got {warmup_steps}")
    check(
        decay_steps is None or decay_steps >= 1,
        "decay_steps",
        f"must be >= 1 or null, got {decay_steps}",
    )
    check(
        math.isfinite(weight_decay) and weight_decay >= 0,
        "weight_decay",
        f"must be a finite number >= 0, got {weight_decay}",
    )
    check(0 <= b1 < 1, "b1", f"must lie in [0, 1), got {b1}")
    check(0 <= b2 < 1, "b2", f"must lie in [0, 1), got {b2}")
    check(
        grad_clip is None or math.isfinite(grad_clip),
        "grad_clip",
        f"must be a finite number or null, got {grad_clip}",
    )
    check(grad_clip is None or grad_clip > 0, "grad_clip", f"must be positive, got {grad_clip}")


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
    skip_nonfinite: bool = False,
) -> optax.GradientTransformation:
    """AdamW (eps 1e-8) on the learning-rate schedule above, after clipping the gradient to a global
    norm of ``grad_clip`` (no clipping when None). ``skip_nonfinite`` wraps it in optax's
    ``apply_if_finite``: updates with a non-finite gradient are skipped (never applied)."""
    check_optimizer_settings(
        lr=lr,
        warmup_steps=warmup_steps,
        decay_steps=decay_steps,
        weight_decay=weight_decay,
        b1=b1,
        b2=b2,
        grad_clip=grad_clip,
    )
    tx = optax.adamw(
        _schedule(lr, warmup_steps, decay_steps), b1=b1, b2=b2, weight_decay=weight_decay
    )
    if grad_clip is not None:
        tx = optax.chain(optax.clip_by_global_norm(grad_clip), tx)
    if skip_nonfinite:
        # never fall back to applying a non-finite update, however many come in a row
        tx = optax.apply_if_finite(tx, max_consecutive_errors=2**30)
    return tx
