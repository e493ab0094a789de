"""Loss aggregation over tokens and sequences: GRPO, DAPO, Dr. GRPO and ΔL Normalization.

Every mode is a ratio Σ_i c_i(ℓ_i) / N where N spans the whole *optimisation batch* (all
micro-batches and devices). Splitting a batch therefore never changes the gradient, provided N is
computed once over the full batch (:func:`loss_normalizer`, with ``axis_name`` to ``psum`` over
devices) and passed to :func:`aggregate_loss` for each piece; the per-piece losses then add up to
the full-batch loss exactly, and so do their gradients.

Letters: B sequences, T tokens; ``L_i = Σ_t mask_it`` is the length of sequence i.

| mode | loss | numerator term c_i | normaliser N |
|---|---|---|---|
| ``token_mean`` (DAPO) | Σ_it ℓ / Σ_i L_i | Σ_t ℓ_it | Σ_i L_i |
| ``seq_mean_token_mean`` (GRPO) | (1/B') Σ_i (1/L_i) Σ_t ℓ_it | Σ_t ℓ_it / L_i | B' |
| ``seq_mean_token_sum`` | (1/B') Σ_i Σ_t ℓ_it | Σ_t ℓ_it | B' |
| ``seq_mean_token_sum_norm`` (Dr. GRPO) | Σ_it ℓ / (B' · M) | Σ_t ℓ_it / M | B' |
| ``delta_l`` (ΔL Norm) | (1/M) Σ_i x_i Σ_t ℓ_it, x_i = L_i^-α / Σ_j L_j^-α | L_i^-α Σ_t ℓ_it / M | Σ_j L_j^-α |

B' counts non-empty sequences (L_i > 0): rows of padding do not dilute the loss. ``M`` is a fixed
``max_len`` (the configured maximum response length), not the padded width of a batch.
Empty rows contribute nothing; a batch with no tokens gives a loss of 0, never NaN. Masked
positions are selected away (``jnp.where``), not multiplied by 0: a NaN or infinity there reaches
neither the loss nor its gradient.

References: GRPO (Shao et al., 2024, arXiv:2402.03300); DAPO (Yu et al., 2025, arXiv:2503.14476);
Dr. GRPO (Liu et al., 2025, arXiv:2503.20783); ΔL Normalization (He et al., 2025, arXiv:2509.07558).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from jaxlab.registry import Registry
from jaxlab.rl.validation import check_floating, check_same_shape

__all__ = [
    "AGGREGATION_MODES",
    "aggregate_loss",
    "aggregate_terms",
    "loss_normalizer",
    "delta_l_weights",
]

AGGREGATION_MODES = Registry("aggregation mode")

# Each mode: (numerator term per sequence [B], local normaliser scalar), from (row sums, lengths).
_TermFn = Callable[..., tuple[jax.Array, jax.Array]]


def _require_max_len(mode: str, max_len: float | None) -> float:
    if max_len is None:
        raise ValueError(
            f"aggregation mode {mode!r} needs max_len (the fixed maximum response length)"
        )
    if max_len <= 0:
        raise ValueError(f"max_len must be positive, got {max_len}")
    return float(max_len)


def _length_power(lengths: jax.Array, alpha: float) -> jax.Array:
    """L^-α for non-empty rows, 0 for empty ones (float32)."""
    safe = jnp.maximum(lengths, 1.0)
    return jnp.where(lengths > 0, safe ** (-alpha), 0.0)


@AGGREGATION_MODES.register("token_mean")
def _token_mean(row_sums, lengths, **_):
    return row_sums, jnp.sum(lengths)


@AGGREGATION_MODES.register("seq_mean_token_mean")
def _seq_mean_token_mean(row_sums, lengths, **_):
    return row_sums / jnp.maximum(lengths, 1.0), jnp.sum(lengths > 0).astype(jnp.float32)


@AGGREGATION_MODES.register("seq_mean_token_sum")
def _seq_mean_token_sum(row_sums, lengths, **_):
    return row_sums, jnp.sum(lengths > 0).astype(jnp.float32)


@AGGREGATION_MODES.register("seq_mean_token_sum_norm")
def _seq_mean_token_sum_norm(row_sums, lengths, *, max_len=None, **_):
    m = _require_max_len("seq_mean_token_sum_norm", max_len)
    return row_sums / m, jnp.sum(lengths > 0).astype(jnp.float32)


@AGGREGATION_MODES.register("delta_l")
def _delta_l(row_sums, lengths, *, max_len=None, alpha=1.0, **_):
    m = _require_max_len("delta_l", max_len)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"delta_l alpha must lie in [0, 1], got {alpha}")
    w = _length_power(lengths, alpha)
    return w * row_sums / m, jnp.sum(w)


def _lengths(mask: jax.Array) -> jax.Array:
    return jnp.sum(mask.astype(jnp.float32), axis=-1)


def aggregate_terms(
    loss_mat: jax.Array,  # [B, T]
    mask: jax.Array,  # [B, T]
    mode: str = "token_mean",
    *,
    max_len: float | None = None,
    alpha: float = 1.0,
) -> tuple[jax.Array, jax.Array]:
    """``(numerator, local normaliser)`` of a batch piece; see the module table.

    Summing both over micro-batches (or ``psum`` over devices) and dividing gives the full-batch
    loss.
    """
    check_same_shape("aggregate_loss", loss_mat=loss_mat, mask=mask)
    check_floating("aggregate_loss", loss_mat=loss_mat)
    if loss_mat.ndim != 2:
        raise ValueError(f"aggregate_loss: loss_mat must be [B, T], got shape {loss_mat.shape}")
    fn = AGGREGATION_MODES.get(mode)
    row_sums = jnp.sum(jnp.where(mask.astype(bool), loss_mat, 0), axis=-1)
    terms, norm = fn(row_sums, _lengths(mask), max_len=max_len, alpha=alpha)
    return jnp.sum(terms), norm


def loss_normalizer(
    mask: jax.Array,  # [B, T] the whole optimisation batch (or this device's share)
    mode: str = "token_mean",
    *,
    alpha: float = 1.0,
    max_len: float | None = None,
    axis_name: str | tuple[str, ...] | None = None,
) -> jax.Array:
    """The batch-spanning normaliser N of ``mode`` (Σ L, B' or Σ L^-α).

    Compute it once over the optimisation batch and pass it to every micro-batch's
    :func:`aggregate_loss`. Inside ``shard_map``, ``axis_name`` sums the devices' shares.
    """
    fn = AGGREGATION_MODES.get(mode)
    lengths = _lengths(mask)
    _, norm = fn(
        jnp.zeros_like(lengths),
        lengths,
        max_len=max_len if max_len is not None else 1.0,
        alpha=alpha,
    )
    if axis_name is not None:
        norm = jax.lax.psum(norm, axis_name)
    return norm


def aggregate_loss(
    loss_mat: jax.Array,  # [B, T]
    mask: jax.Array,  # [B, T]
    mode: str = "token_mean",
    *,
    max_len: float | None = None,
    alpha: float = 1.0,
    normalizer: jax.Array | float | None = None,
) -> jax.Array:
    """Aggregates per-token losses into a scalar by ``mode`` (see the module table).

    Args:
      loss_mat: per-token losses ℓ_it.
      mask: 1 for response tokens, 0 for prompt/padding.
      mode: a name in ``AGGREGATION_MODES``.
      max_len: the fixed M of ``seq_mean_token_sum_norm`` and ``delta_l``.
      alpha: ΔL's exponent α in [0, 1]; α = 1 is the minimum-variance unbiased choice.
      normalizer: N over the whole optimisation batch (:func:`loss_normalizer`); by default this
        batch's own, which is right only when this batch *is* the optimisation batch.
    """
    num, local = aggregate_terms(loss_mat, mask, mode, max_len=max_len, alpha=alpha)
    norm = local if normalizer is None else jnp.asarray(normalizer, jnp.float32)
    return jnp.where(norm > 0, num / jnp.where(norm > 0, norm, 1.0), 0.0).astype(loss_mat.dtype)


def delta_l_weights(lengths: jax.Array, alpha: float = 1.0) -> jax.Array:
    """ΔL's per-sequence weights x_i = L_i^-α / Σ_j L_j^-α ``[B]`` (0 for empty sequences)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"delta_l alpha must lie in [0, 1], got {alpha}")
    w = _length_power(jnp.asarray(lengths, jnp.float32), alpha)
    total = jnp.sum(w)
    return jnp.where(total > 0, w / jnp.where(total > 0, total, 1.0), 0.0)
