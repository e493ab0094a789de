"""Self-distillation losses (SDPO): the student's tokens scored under a teacher that saw more.

One network plays both parts. The *student* is the policy given the task prompt; the *teacher* is
the same network (live, an EMA of it, or its initial weights) given a richer prompt (a successful
rollout of the same group, the solution, or the solution without its reasoning). Both score the
student's sampled completion, position by position, and the student is pulled toward the
teacher's next-token distribution (Hübotter et al., 2026, arXiv:2601.20802; the analysis of
Kim, Luo et al., 2026, arXiv:2603.24472 uses the same code).

Letters: B sequences, T completion positions, V vocab, K top-k entries.

Per-token divergences (the teacher is never differentiated):

| mode | per-token loss ℓ_t |
|---|---|
| ``sampled_token`` | sg(log π_s(y_t) − log π_T(y_t)) · log π_s(y_t): a score-function estimate of the reverse KL(π_s ‖ π_T) from the sampled token y_t |
| ``topk`` | D_α over K+1 buckets: the student's top-K tokens (the same ids for both) plus a tail bucket 1 − Σ_k p_k (or the K renormalised, without the tail) |
| ``full`` | D_α over the whole vocabulary |

D_α is the generalised Jensen–Shannon divergence with α interpolation: α = 0 gives the forward
KL(π_T ‖ π_s), α = 1 the reverse KL(π_s ‖ π_T), and 0 < α < 1

    D_α = α · KL(π_T ‖ M) + (1 − α) · KL(π_s ‖ M),   M = α · π_T + (1 − α) · π_s.

Importance-sampling clipping (``is_clip``): the rollouts come from the behaviour policy, so each
token's loss is weighted by sg(min(π_s(y_t) / π_behaviour(y_t), is_clip)) (the log-ratio clamped to
[−20, 20] first). The per-token losses are aggregated with any mode of :mod:`jaxlab.rl.aggregation`
(and its optimisation-batch normaliser), and mixed with the policy loss by
:func:`mix_losses`: (1 − w) · policy_loss + w · distill_loss.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

from jaxlab.registry import Registry
from jaxlab.rl.aggregation import aggregate_loss
from jaxlab.rl.losses import masked_mean
from jaxlab.rl.validation import check_floating, check_rank, check_same_shape

__all__ = [
    "DISTILL_MODES",
    "generalized_jsd",
    "add_tail_bucket",
    "topk_log_probs",
    "sampled_token_distill",
    "is_clip_weights",
    "distill_token_losses",
    "distillation_loss",
    "mix_losses",
]

DISTILL_MODES = Registry("distillation mode")
for _mode in ("sampled_token", "topk", "full"):
    DISTILL_MODES.register(_mode, _mode)

_LOG_RATIO_CLAMP = 20.0


def _kl_from_logp(p_logp: jax.Array, q_logp: jax.Array) -> jax.Array:
    """KL(p ‖ q) ``[...]`` over the last axis from log-probabilities (0 · log 0 = 0)."""
    p = jnp.exp(p_logp)
    return jnp.sum(jnp.where(p > 0, p * (p_logp - q_logp), 0.0), axis=-1)


def generalized_jsd(
    student_logp: jax.Array,  # [..., V] log π_s
    teacher_logp: jax.Array,  # [..., V] log π_T
    alpha: float = 0.5,
) -> jax.Array:
    """D_α(π_s, π_T) ``[...]`` over the last axis (see the module docstring): α = 0 the forward
    KL(π_T ‖ π_s), α = 1 the reverse KL(π_s ‖ π_T), in between the generalised Jensen–Shannon
    divergence against the mixture M = α π_T + (1 − α) π_s. Both inputs must be normalised
    log-probabilities; gradients flow into both (stop the teacher's yourself)."""
    check_same_shape("generalized_jsd", student_logp=student_logp, teacher_logp=teacher_logp)
    check_floating("generalized_jsd", student_logp=student_logp, teacher_logp=teacher_logp)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"generalized_jsd: alpha must lie in [0, 1], got {alpha}")
    if alpha == 0.0:
        return _kl_from_logp(teacher_logp, student_logp)
    if alpha == 1.0:
        return _kl_from_logp(student_logp, teacher_logp)
    mix = jnp.logaddexp(student_logp + jnp.log1p(-alpha), teacher_logp + jnp.log(alpha))
    return alpha * _kl_from_logp(teacher_logp, mix) + (1.0 - alpha) * _kl_from_logp(
        student_logp, mix
    )


def add_tail_bucket(logp: jax.Array) -> jax.Array:
    """``[..., K]`` log-probabilities of K tokens → ``[..., K + 1]`` with the tail bucket
    log(1 − Σ_k p_k) appended (the sum clamped below 1 so that the log stays finite)."""
    log_s = jnp.minimum(jax.nn.logsumexp(logp, axis=-1, keepdims=True), -1e-7)
    return jnp.concatenate([logp, jnp.log(-jnp.expm1(log_s))], axis=-1)


def topk_log_probs(
    student_logp: jax.Array,  # [B, T, V]
    teacher_logp: jax.Array,  # [B, T, V]
    k: int,
    *,
    add_tail: bool = True,
) -> tuple[jax.Array, jax.Array]:
    """The two distributions over the student's top-``k`` token ids ``[B, T, K(+1)]``: with the
    tail bucket (``add_tail``), or the K entries renormalised. Which ids are kept is not
    differentiated."""
    check_same_shape("topk_log_probs", student_logp=student_logp, teacher_logp=teacher_logp)
    if not 1 <= k <= student_logp.shape[-1]:
        raise ValueError(f"topk_log_probs: k must lie in [1, V={student_logp.shape[-1]}], got {k}")
    _, idx = jax.lax.top_k(jax.lax.stop_gradient(student_logp), k)
    s = jnp.take_along_axis(student_logp, idx, axis=-1)
    t = jnp.take_along_axis(teacher_logp, idx, axis=-1)
    if add_tail:
        return add_tail_bucket(s), add_tail_bucket(t)
    return (
        s - jax.nn.logsumexp(s, axis=-1, keepdims=True),
        t - jax.nn.logsumexp(t, axis=-1, keepdims=True),
    )


def sampled_token_distill(
    student_token_logp: jax.Array, teacher_token_logp: jax.Array
) -> jax.Array:
    """Per-token loss ``[B, T]`` sg(log π_s(y) − log π_T(y)) · log π_s(y): its gradient is the
    score-function estimate of ∇ KL(π_s ‖ π_T) from the sampled token (the reverse KL, α = 1)."""
    check_same_shape(
        "sampled_token_distill",
        student_token_logp=student_token_logp,
        teacher_token_logp=teacher_token_logp,
    )
    log_ratio = jax.lax.stop_gradient(student_token_logp - teacher_token_logp)
    return log_ratio * student_token_logp


def is_clip_weights(
    student_token_logp: jax.Array,  # [B, T]
    behaviour_logp: jax.Array,  # [B, T]
    is_clip: float,
) -> jax.Array:
    """Importance weights ``[B, T]`` sg(min(exp(clamp(log π_s − log π_b, ±20)), is_clip))."""
    check_same_shape(
        "is_clip_weights", student_token_logp=student_token_logp, behaviour_logp=behaviour_logp
    )
    if not is_clip > 0:
        raise ValueError(f"is_clip_weights: is_clip must be positive, got {is_clip}")
    log_r = jax.lax.stop_gradient(student_token_logp - behaviour_logp)
    log_r = jnp.clip(log_r, -_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
    return jnp.minimum(jnp.exp(log_r), is_clip)


def distill_token_losses(
    student_logits: jax.Array,  # [B, T, V] at the completion positions
    teacher_logits: jax.Array,  # [B, T, V] at the same positions, under the teacher's prompt
    tokens: jax.Array,  # [B, T] the sampled completion tokens
    *,
    mode: str = "full",
    alpha: float = 0.5,
    topk: int = 20,
    add_tail: bool = True,
    temperature: float = 1.0,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(ℓ [B, T], log π_s(y) [B, T], d [B, T])``: per-token distillation losses by ``mode`` (see
    the module table), the student's log-probabilities of its tokens, and the per-token divergence
    value (no gradient; for ``sampled_token`` the log-ratio log π_s(y) − log π_T(y)), all under
    ``logits / temperature`` in float32. The teacher's logits are not differentiated."""
    check_rank("distill_token_losses", 3, student_logits=student_logits)
    check_same_shape(
        "distill_token_losses", student_logits=student_logits, teacher_logits=teacher_logits
    )
    check_floating(
        "distill_token_losses", student_logits=student_logits, teacher_logits=teacher_logits
    )
    chex.assert_shape(tokens, student_logits.shape[:2])
    DISTILL_MODES.get(mode)
    if mode == "sampled_token" and alpha != 1.0:
        raise ValueError(
            f"distillation mode 'sampled_token' is the reverse KL only (alpha = 1), got alpha {alpha}"
        )
    s_logp = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
    t_logp = jax.nn.log_softmax(
        jax.lax.stop_gradient(teacher_logits).astype(jnp.float32) / temperature, axis=-1
    )
    idx = tokens[..., None].astype(jnp.int32)
    s_tok = jnp.take_along_axis(s_logp, idx, axis=-1)[..., 0]
    if mode == "sampled_token":
        t_tok = jnp.take_along_axis(t_logp, idx, axis=-1)[..., 0]
        div = jax.lax.stop_gradient(s_tok - t_tok)
        return sampled_token_distill(s_tok, t_tok), s_tok, div
    if mode == "topk":
        s_logp, t_logp = topk_log_probs(s_logp, t_logp, topk, add_tail=add_tail)
    loss_mat = generalized_jsd(s_logp, t_logp, alpha)
    return loss_mat, s_tok, jax.lax.stop_gradient(loss_mat)


def distillation_loss(
    student_logits: jax.Array,  # [B, T, V]
    teacher_logits: jax.Array,  # [B, T, V]
    tokens: jax.Array,  # [B, T]
    mask: jax.Array,  # [B, T] completion tokens that carry a teacher signal
    *,
    mode: str = "full",
    alpha: float = 0.5,
    topk: int = 20,
    add_tail: bool = True,
    temperature: float = 1.0,
    behaviour_logp: jax.Array | None = None,  # [B, T] required with is_clip
    is_clip: float | None = None,
    agg: str = "token_mean",
    agg_alpha: float = 1.0,
    **agg_kw,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The aggregated self-distillation loss and its metrics.

    Positions where ``mask`` is 0 (padding, or rows whose group gave the teacher nothing to see)
    carry no loss. ``agg`` / ``agg_kw`` are those of :func:`jaxlab.rl.aggregate_loss` (pass its
    ``normalizer`` so that micro-batches add up to the full batch); ΔL's exponent is
    ``agg_alpha`` here, ``alpha`` being the divergence's.

    Returns:
      ``(loss, metrics)``: ``distill_div`` (masked mean per-token divergence, for ``sampled_token``
      the log-ratio), ``is_weight_mean`` with ``is_clip``, ``distill_tokens`` (the mask's sum).
    """
    chex.assert_shape(mask, student_logits.shape[:2])
    if is_clip is not None and behaviour_logp is None:
        raise ValueError("distillation_loss: is_clip needs behaviour_logp")
    loss_mat, s_tok, div = distill_token_losses(
        student_logits,
        teacher_logits,
        tokens,
        mode=mode,
        alpha=alpha,
        topk=topk,
        add_tail=add_tail,
        temperature=temperature,
    )
    m = mask.astype(bool)
    metrics = {
        "distill_div": masked_mean(div, mask),
        "distill_tokens": jnp.sum(m.astype(jnp.float32)),
    }
    if is_clip is not None:
        chex.assert_equal_shape([behaviour_logp, s_tok])
        w = is_clip_weights(s_tok, jnp.where(m, behaviour_logp, 0.0), is_clip)
        loss_mat = loss_mat * w
        metrics["is_weight_mean"] = masked_mean(w, mask)
    loss_mat = jnp.where(m, loss_mat, 0.0)
    loss = aggregate_loss(loss_mat, mask.astype(jnp.float32), agg, alpha=agg_alpha, **agg_kw)
    return loss, metrics


def mix_losses(policy: jax.Array, distill: jax.Array, weight: float) -> jax.Array:
    """(1 − w) · policy + w · distill; w = 0 is plain policy optimisation, w = 1 pure distillation."""
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"mix_losses: weight must lie in [0, 1], got {weight}")
    if weight == 0.0:
        return policy
    if weight == 1.0:
        return distill
    return (1.0 - weight) * policy + weight * distill
