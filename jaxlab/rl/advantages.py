"""Advantage estimators for outcome rewards: GRPO group normalisation, Dr. GRPO, RLOO, batch baseline.

Letters: P prompts, G samples per prompt, N samples.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxlab.registry import Registry
from jaxlab.rl.validation import check_floating, check_rank

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "grpo_advantages",
    "rloo_advantages",
    "batch_advantages",
    "compute_advantages",
]

ADVANTAGE_ESTIMATORS = Registry("advantage estimator")


@ADVANTAGE_ESTIMATORS.register("grpo")
def grpo_advantages(
    rewards: jax.Array, *, scale_by_std: bool = True, eps: float = 1e-6
) -> jax.Array:
    """GRPO group-normalised advantages ``[P, G]``: (r - mean_g r) / (std_g r + eps).

    ``std`` is the unbiased (G - 1) sample standard deviation, as in verl and TRL; a group whose
    rewards are all equal gets zero advantages. ``scale_by_std=False`` is Dr. GRPO's
    mean-centring only (Liu et al., 2025, arXiv:2503.20783).
    """
    check_rank("grpo_advantages", 2, rewards=rewards)
    check_floating("grpo_advantages", rewards=rewards)
    r = rewards.astype(jnp.float32)
    centred = r - jnp.mean(r, axis=-1, keepdims=True)
    if not scale_by_std:
        return centred
    g = r.shape[-1]
    std = jnp.sqrt(jnp.sum(jnp.square(centred), axis=-1, keepdims=True) / max(g - 1, 1))
    return centred / (std + eps)


ADVANTAGE_ESTIMATORS.register("dr_grpo", functools.partial(grpo_advantages, scale_by_std=False))


@ADVANTAGE_ESTIMATORS.register("rloo")
def rloo_advantages(rewards: jax.Array) -> jax.Array:
    """RLOO advantages ``[P, G]``: r_i - mean_{j≠i} r_j (Ahmadian et al., 2024, arXiv:2402.14740).

    Groups of one sample get 0 (there is no leave-one-out baseline).
    """
    check_rank("rloo_advantages", 2, rewards=rewards)
    check_floating("rloo_advantages", rewards=rewards)
    r = rewards.astype(jnp.float32)
    g = r.shape[-1]
    if g < 2:
        return jnp.zeros_like(r)
    others = (jnp.sum(r, axis=-1, keepdims=True) - r) / (g - 1)
    return r - others


@ADVANTAGE_ESTIMATORS.register("batch")
def batch_advantages(
    rewards: jax.Array, *, scale_by_std: bool = False, eps: float = 1e-6
) -> jax.Array:
    """Batch-level baseline: r - mean over *all* samples (REINFORCE++-baseline style), optionally
    divided by the batch's standard deviation. Works on any shape."""
    check_floating("batch_advantages", rewards=rewards)
    r = rewards.astype(jnp.float32)
    centred = r - jnp.mean(r)
    if not scale_by_std:
        return centred
    n = r.size
    std = jnp.sqrt(jnp.sum(jnp.square(centred)) / max(n - 1, 1))
    return centred / (std + eps)


def compute_advantages(rewards: jax.Array, estimator: str = "grpo", **kw) -> jax.Array:
    """Advantages ``[P, G]`` by estimator name (``grpo``, ``dr_grpo``, ``rloo``, ``batch``)."""
    return ADVANTAGE_ESTIMATORS.get(estimator)(rewards, **kw)
