"""Policy-gradient losses, KL estimators and entropy, as pure functions over ``[B, T]`` tokens.

Letters: B sequences, T tokens, V vocab.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxlab.registry import Registry
from jaxlab.rl.aggregation import aggregate_loss
from jaxlab.rl.validation import check_floating, check_rank, check_same_shape

__all__ = [
    "KL_ESTIMATORS",
    "POLICY_LOSSES",
    "kl_penalty",
    "entropy_from_logits",
    "token_logprobs",
    "importance_ratio",
    "policy_loss",
    "masked_mean",
]

KL_ESTIMATORS = Registry("KL estimator")
POLICY_LOSSES = Registry("importance-ratio level")


def masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean of ``x`` over ``mask`` (0 when the mask is empty; values at masked-out positions,
    NaN included, are never read)."""
    m = mask.astype(bool)
    n = jnp.sum(m.astype(jnp.float32))
    total = jnp.sum(jnp.where(m, x.astype(jnp.float32), 0.0))
    return jnp.where(n > 0, total / jnp.maximum(n, 1.0), 0.0)


# -- KL estimators of KL(π || π_ref) from samples of π ------------------------------------------------
# With log r = log π_ref(x) - log π(x) for x ~ π (Schulman, "Approximating KL divergence", 2020):


@KL_ESTIMATORS.register("k1")
def _k1(logp, ref_logp):
    """k1 = -log r: unbiased, high variance, can be negative."""
    return logp - ref_logp


@KL_ESTIMATORS.register("k2")
def _k2(logp, ref_logp):
    """k2 = ½ (log r)²: biased, low variance, ≥ 0."""
    return 0.5 * jnp.square(logp - ref_logp)


@KL_ESTIMATORS.register("k3")
def _k3(logp, ref_logp):
    """k3 = r - 1 - log r: unbiased, low variance, ≥ 0 (GRPO's choice)."""
    log_r = ref_logp - logp
    return jnp.expm1(log_r) - log_r


def kl_penalty(logp: jax.Array, ref_logp: jax.Array, kind: str = "k3") -> jax.Array:
    """Per-token KL estimate ``[B, T]`` of the policy against a reference, by estimator name."""
    check_same_shape("kl_penalty", logp=logp, ref_logp=ref_logp)
    check_floating("kl_penalty", logp=logp, ref_logp=ref_logp)
    return KL_ESTIMATORS.get(kind)(logp, ref_logp)


def entropy_from_logits(logits: jax.Array) -> jax.Array:
    """Entropy ``[...]`` of the softmax over the last axis of ``logits [..., V]``, in float32."""
    check_floating("entropy_from_logits", logits=logits)
    x = logits.astype(jnp.float32)
    logp = jax.nn.log_softmax(x, axis=-1)
    return -jnp.sum(jnp.exp(logp) * logp, axis=-1)


def token_logprobs(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """log π(token) ``[B, T]`` from logits ``[B, T, V]`` and token ids ``[B, T]``, in float32."""
    check_rank("token_logprobs", 3, logits=logits)
    if tokens.shape != logits.shape[:-1]:
        raise ValueError(
            f"token_logprobs: tokens {tuple(tokens.shape)} must be logits {tuple(logits.shape)} "
            "without the vocab axis"
        )
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp, tokens[..., None].astype(jnp.int32), axis=-1)[..., 0]


# -- importance ratios -------------------------------------------------------------------------------


@POLICY_LOSSES.register("token")
def _token_ratio(log_ratio, mask):
    """PPO/GRPO: a ratio per token, r_it = π(o_it) / π_old(o_it)."""
    del mask
    return jnp.exp(log_ratio)


@POLICY_LOSSES.register("sequence")
def _sequence_ratio(log_ratio, mask):
    """GSPO-token: every token carries the sequence ratio s_i = exp(mean_t log r_it) as its value,
    with the gradient of its own token: sg(s_i) · π(o_it) / sg(π(o_it)) (Zheng et al., 2025,
    arXiv:2507.18071)."""
    m = mask.astype(bool)
    seq = jnp.sum(jnp.where(m, log_ratio, 0.0), axis=-1, keepdims=True) / jnp.maximum(
        jnp.sum(m.astype(jnp.float32), axis=-1, keepdims=True), 1.0
    )
    return jnp.exp(jax.lax.stop_gradient(seq) + log_ratio - jax.lax.stop_gradient(log_ratio))


def importance_ratio(
    logp: jax.Array, old_logp: jax.Array, mask: jax.Array, level: str = "token"
) -> jax.Array:
    """Importance ratios ``[B, T]`` at ``level`` (``token`` or ``sequence``)."""
    return POLICY_LOSSES.get(level)(logp - old_logp, mask)


def policy_loss(
    logp: jax.Array,  # [B, T] log π_θ of the sampled tokens
    old_logp: jax.Array,  # [B, T] log π_old (the policy the ratio is taken against)
    advantages: jax.Array,  # [B] per sequence, or [B, T] per token
    mask: jax.Array,  # [B, T]
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = None,
    ratio_level: str = "token",
    behaviour_logp: jax.Array
    | None = None,  # [B, T] log-probs of the policy that generated the tokens
    tis_cap: float | None = 2.0,
    agg: str = "token_mean",
    **agg_kw,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """PPO clipped surrogate with asymmetric clipping, optional dual clip, GSPO ratios and
    truncated importance weights; aggregated by ``agg``.

    Per token, with r the ratio and A the advantage:
        ℓ = max(-A·r, -A·clip(r, 1 - clip_low, 1 + clip_high))        (PPO; DAPO's clip-higher)
        ℓ = min(ℓ, -A·dual_clip)  where A < 0                           (dual clip, dual_clip > 1)
        ℓ = w·ℓ, w = min(π_old / π_behaviour, tis_cap), no gradient       (if behaviour_logp given)

    The truncated importance weight corrects for tokens generated by a different policy than
    π_old (an older version, or an inference engine with different numerics).

    Positions where ``mask`` is 0 are replaced by zeros (``jnp.where``) before any arithmetic, so
    a NaN or -inf log-probability or advantage there changes neither the loss, nor its gradient,
    nor the metrics. B = 0 or T = 0 gives a loss of 0, as :func:`aggregate_loss` does.

    Args:
      agg, agg_kw: aggregation mode and its arguments (``max_len``, ``alpha``, ``normalizer``).

    Returns:
      ``(loss, metrics)``; metrics are masked means over this batch: ``clip_frac``,
      ``clip_frac_low``, ``clip_frac_high``, ``dual_clip_frac``, ``approx_kl`` (k3 estimate of KL(π_old ‖ π)),
      ``ratio_mean``, ``ratio_min``, ``ratio_max``, and ``tis_weight_mean`` with behaviour logprobs.
    """
    check_rank(
        "policy_loss", 2, logp=logp, old_logp=old_logp, mask=mask, behaviour_logp=behaviour_logp
    )
    check_same_shape(
        "policy_loss", logp=logp, old_logp=old_logp, mask=mask, behaviour_logp=behaviour_logp
    )
    check_floating(
        "policy_loss",
        logp=logp,
        old_logp=old_logp,
        advantages=advantages,
        behaviour_logp=behaviour_logp,
    )
    if advantages.shape not in (logp.shape[:1], logp.shape):
        raise ValueError(
            f"policy_loss: advantages {tuple(advantages.shape)} must be [B] = {logp.shape[:1]} "
            f"or [B, T] = {tuple(logp.shape)}"
        )
    if clip_low < 0 or clip_high < 0:
        raise ValueError(
            f"policy_loss: clip_low and clip_high must be >= 0, got {clip_low}, {clip_high}"
        )
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"policy_loss: dual_clip must be > 1, got {dual_clip}")
    if tis_cap is not None and tis_cap <= 0:
        raise ValueError(f"policy_loss: tis_cap must be positive, got {tis_cap}")

    # select before any arithmetic: where(mask, x, 0) also keeps NaN out of the backward pass
    m = mask.astype(bool)
    logp = jnp.where(m, logp, 0.0)
    old_logp = jax.lax.stop_gradient(jnp.where(m, old_logp, 0.0))
    if behaviour_logp is not None:
        behaviour_logp = jnp.where(m, behaviour_logp, 0.0)
    adv = advantages if advantages.ndim == 2 else advantages[:, None]
    adv = jax.lax.stop_gradient(jnp.where(m, adv.astype(jnp.float32), 0.0))
    ratio = importance_ratio(logp, old_logp, mask, ratio_level)
    clipped_ratio = jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high)
    unclipped_loss = -adv * ratio
    clipped_loss = -adv * clipped_ratio
    loss_mat = jnp.maximum(unclipped_loss, clipped_loss)
    is_clipped = clipped_loss > unclipped_loss
    dual_clipped = jnp.zeros_like(is_clipped)
    if dual_clip is not None:
        bound = -adv * dual_clip
        dual_clipped = (adv < 0) & (loss_mat > bound)
        loss_mat = jnp.where(adv < 0, jnp.minimum(loss_mat, bound), loss_mat)

    metrics = {}
    if behaviour_logp is not None:
        log_w = jax.lax.stop_gradient(old_logp - behaviour_logp)
        w = jnp.exp(log_w) if tis_cap is None else jnp.minimum(jnp.exp(log_w), tis_cap)
        loss_mat = loss_mat * w
        metrics["tis_weight_mean"] = masked_mean(w, mask)

    loss = aggregate_loss(loss_mat, mask, agg, **agg_kw)

    sg_ratio = jax.lax.stop_gradient(ratio)
    metrics.update(
        clip_frac=masked_mean(is_clipped, mask),
        clip_frac_low=masked_mean(is_clipped & (sg_ratio < 1.0 - clip_low), mask),
        clip_frac_high=masked_mean(is_clipped & (sg_ratio > 1.0 + clip_high), mask),
        dual_clip_frac=masked_mean(dual_clipped, mask),
        approx_kl=masked_mean(jax.lax.stop_gradient(_k3(old_logp, logp)), mask),
        ratio_mean=masked_mean(sg_ratio, mask),
        ratio_min=jnp.where(
            m.any(), jnp.min(jnp.where(m, sg_ratio, jnp.inf), initial=jnp.inf), 1.0
        ),
        ratio_max=jnp.where(
            m.any(), jnp.max(jnp.where(m, sg_ratio, -jnp.inf), initial=-jnp.inf), 1.0
        ),
    )
    return loss, metrics
