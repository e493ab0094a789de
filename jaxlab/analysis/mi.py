"""MI curves: the HSIC-based normalized-CCA estimator between each trace token's hidden state and
the ground truth's representation, as in the reference code of the information-allocation paper
(``mi_peak/mi_estimators.py``, adapted there from MI-Peaks).

For two vectors x, y of length m (a hidden state of width E is treated as m = E one-dimensional
samples, as the reference's ``x.reshape(-1, 1)`` does):

    D_ij  = (x_i - x_j)²                       (the reference's |r_i - 2 x_i x_j + r_j|)
    K_x   = exp(-D / (2 σ²))                   (Gaussian kernel, σ = 50; the sample dimension is 1)
    K̃_x   = K_x H,  H = I - 11ᵀ/m              (centred on the right only, as the reference)
    R_x   = K̃_x (K̃_x + ε m I)⁻¹               (ε = 1e-5)
    Pxy   = Σ_ij (R_x)_ij (R_y)_ji = tr(R_x R_y)

``R_x`` is computed as ``(K̃_x + ε m I)⁻¹ K̃_x`` by a linear solve (the two commute).

The ground truth's representation is the last-layer hidden state of the last token of the
ground-truth text (answer only by default), and each trace token's is its own last-layer hidden
state, both from the same model.

Letters: T trace tokens, E model width (m = E).
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np

from jaxlab.analysis.information import last_hidden_states

__all__ = [
    "SIGMA",
    "EPSILON",
    "centered_gaussian_kernel",
    "hsic_normalized_cca",
    "mi_curve",
    "trace_mi",
]

SIGMA = 50.0  # the reference's kernel width
EPSILON = 1e-5  # the reference's regulariser (times m)


def centered_gaussian_kernel(x: jax.Array, sigma: float = SIGMA) -> jax.Array:
    """``K_x H`` ``[m, m]`` for ``x [m]`` (one-dimensional samples)."""
    chex.assert_rank(x, 1)
    d = jnp.square(x[:, None] - x[None, :])
    k = jnp.exp(-d / (2.0 * sigma * sigma))
    return k - jnp.mean(k, axis=1, keepdims=True)


def _ratio(kc: jax.Array, epsilon: float) -> jax.Array:
    m = kc.shape[0]
    a = kc + epsilon * m * jnp.eye(m, dtype=kc.dtype)
    return jnp.linalg.solve(a, kc)


@functools.partial(jax.jit, static_argnames=("sigma", "epsilon"))
def hsic_normalized_cca(
    x: jax.Array, y: jax.Array, *, sigma: float = SIGMA, epsilon: float = EPSILON
) -> jax.Array:
    """The reference's normalized-CCA HSIC estimate between ``x [m]`` and ``y [m]`` (a scalar)."""
    chex.assert_rank([x, y], 1)
    chex.assert_equal_shape([x, y])
    rx = _ratio(centered_gaussian_kernel(x, sigma), epsilon)
    ry = _ratio(centered_gaussian_kernel(y, sigma), epsilon)
    return jnp.sum(rx * ry.T)


@functools.partial(jax.jit, static_argnames=("sigma", "epsilon", "batch_size"))
def mi_curve(
    hidden: jax.Array,
    target: jax.Array,
    *,
    sigma: float = SIGMA,
    epsilon: float = EPSILON,
    batch_size: int = 16,
) -> jax.Array:
    """``[T]`` estimates between each ``hidden[t] [E]`` and ``target [E]``; the target's side is
    computed once, the tokens ``batch_size`` at a time (memory ~ batch_size · E² floats)."""
    chex.assert_rank([hidden, target], [2, 1])
    chex.assert_equal_shape_suffix([hidden, target], 1)
    ry_t = _ratio(centered_gaussian_kernel(target, sigma), epsilon).T

    def one(h):
        return jnp.sum(_ratio(centered_gaussian_kernel(h, sigma), epsilon) * ry_t)

    return jax.lax.map(one, hidden, batch_size=batch_size)


def trace_mi(
    model,
    tokenizer,
    trace_text: str,
    gt_text: str,
    *,
    max_tokens: int = 2500,
    gt_max_tokens: int = 100,
    sigma: float = SIGMA,
    epsilon: float = EPSILON,
) -> tuple[np.ndarray, np.ndarray]:
    """``(token ids [T], MI [T])`` for one trace, as the reference computes it: the trace text and
    the ground-truth text tokenized on their own (truncated to ``max_tokens`` / ``gt_max_tokens``),
    the ground truth represented by its last token's last-layer hidden state."""
    trace = tokenizer.encode(trace_text)[:max_tokens]
    gt = tokenizer.encode(gt_text)[:gt_max_tokens]
    h_trace, h_gt = last_hidden_states(
        model, [trace, gt], batch_size=2, pad_id=tokenizer.pad_token_id
    )
    mi = mi_curve(
        jnp.asarray(h_trace, jnp.float32),
        jnp.asarray(h_gt[-1], jnp.float32),
        sigma=sigma,
        epsilon=epsilon,
    )
    return np.asarray(trace, np.int32), np.asarray(mi)
