"""Mutual-information estimators, as pure jax functions, plus small Flax NNX critics.

The SMI sky model maximises MI between representations of different fibres (lower bounds:
InfoNCE, Jensen-Shannon, Donsker-Varadhan, NWJ) and minimises MI between neighbouring fibres'
individual codes (upper bound: CLUB). All estimators return nats; the training loss of a lower
bound is its negative. Inputs are upcast to at least float32 and all reductions are stabilised
(logsumexp, softplus), so float32 and bfloat16 critics are safe.

Letters: N samples (batch), M negative samples, D feature dimension.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

__all__ = [
    "infonce_lower_bound",
    "jsd_lower_bound",
    "dv_lower_bound",
    "nwj_lower_bound",
    "diag_offdiag",
    "gaussian_log_likelihood",
    "club_upper_bound",
    "club_sampled_upper_bound",
    "gaussian_mi",
    "gaussian_mi_multivariate",
    "SeparableCritic",
    "ConcatCritic",
    "GaussianConditional",
]


def _f32(x: jax.Array) -> jax.Array:
    """``x`` as a floating array of at least float32 precision."""
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"expected a floating-point array, got dtype {x.dtype}")
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _check_nonempty(fn: str, **arrays: jax.Array) -> None:
    for k, v in arrays.items():
        if v.ndim == 0 or v.size == 0:
            raise ValueError(f"{fn}: {k} must be a non-empty array, got shape {tuple(v.shape)}")


def _check_samples(fn: str, **arrays: jax.Array) -> None:
    shapes = {k: tuple(v.shape) for k, v in arrays.items()}
    if any(len(s) != 2 for s in shapes.values()) or len(set(shapes.values())) > 1:
        listed = ", ".join(f"{k} {s}" for k, s in shapes.items())
        raise ValueError(f"{fn}: arrays must all be [N, D] with the same shape, got {listed}")


def _log_mean_exp(x: jax.Array) -> jax.Array:
    return jax.nn.logsumexp(x) - math.log(x.size)


# -- lower bounds (maximise) -----------------------------------------------------------------------


def infonce_lower_bound(scores: jax.Array) -> jax.Array:
    """InfoNCE bound ``I_NCE`` (van den Oord et al. 2018; Poole et al. 2019), scalar.

    ``scores [N, N]`` holds critic values ``f(x_i, y_j)`` with the positive pairs on the diagonal.
    Returns ``log N + mean_i (f(x_i, y_i) - logsumexp_j f(x_i, y_j))``. It is ``≤ log N`` for any
    critic, and ``≤ I(X; Y)`` in expectation; the optimal critic is ``log p(y|x)/p(y)`` up to any
    function of ``x`` alone.
    """
    scores = _f32(scores)
    if scores.ndim != 2 or scores.shape[0] != scores.shape[1] or scores.shape[0] == 0:
        raise ValueError(f"infonce_lower_bound: scores must be [N, N], got {tuple(scores.shape)}")
    n = scores.shape[0]
    log_softmax = scores - jax.nn.logsumexp(scores, axis=1, keepdims=True)
    return math.log(n) + jnp.mean(jnp.diagonal(log_softmax))


def jsd_lower_bound(pos_scores: jax.Array, neg_scores: jax.Array) -> jax.Array:
    """Deep-InfoMax Jensen-Shannon estimator ``E_P[-softplus(-T)] - E_Q[softplus(T')]``, scalar.

    ``pos_scores`` (any shape) are critic values on joint samples ``P = p(x, y)``, ``neg_scores``
    (any shape) on product-of-marginals samples ``Q = p(x) p(y)``. Maximised by the log density
    ratio ``T = log p/q``, where it equals ``2 JSD(P || Q) - 2 log 2``; it is not a bound on MI
    but is monotone in it for a fixed family and has low-variance gradients (Hjelm et al. 2019).
    """
    pos, neg = _f32(pos_scores), _f32(neg_scores)
    _check_nonempty("jsd_lower_bound", pos_scores=pos, neg_scores=neg)
    return -jnp.mean(jax.nn.softplus(-pos)) - jnp.mean(jax.nn.softplus(neg))


def dv_lower_bound(pos_scores: jax.Array, neg_scores: jax.Array) -> jax.Array:
    """Donsker-Varadhan / MINE bound ``E_P[T] - log E_Q[exp T']``, scalar (Belghazi et al. 2018).

    ``pos_scores`` (any shape) on joint samples, ``neg_scores`` (any shape, ``M`` values) on
    product-of-marginals samples; the log-mean-exp is ``logsumexp - log M``. Tight (equal to the
    MI) at ``T = log p(x, y)/(p(x) p(y)) + c`` for any constant ``c``; the plug-in estimate is
    biased (the log of a sample mean), upward in expectation at the optimum by ``≈ Var_Q/2M``.
    """
    pos, neg = _f32(pos_scores), _f32(neg_scores)
    _check_nonempty("dv_lower_bound", pos_scores=pos, neg_scores=neg)
    return jnp.mean(pos) - _log_mean_exp(neg)


def nwj_lower_bound(pos_scores: jax.Array, neg_scores: jax.Array) -> jax.Array:
    """NWJ / f-GAN KL bound ``E_P[T] - e^{-1} E_Q[exp T']``, scalar (Nguyen, Wainwright & Jordan).

    Shapes as for `dv_lower_bound`. Unbiased in the samples and ``≤ I(X; Y)`` for every critic;
    tight at ``T = 1 + log p(x, y)/(p(x) p(y))`` (note the ``+1``: at the bare log ratio it gives
    ``I - e^{-1}``).
    """
    pos, neg = _f32(pos_scores), _f32(neg_scores)
    _check_nonempty("nwj_lower_bound", pos_scores=pos, neg_scores=neg)
    return jnp.mean(pos) - jnp.exp(_log_mean_exp(neg) - 1.0)


def diag_offdiag(scores: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Split a critic matrix ``[N, N]`` into positives ``[N]`` and negatives ``[N (N - 1)]``.

    For feeding `jsd_lower_bound`, `dv_lower_bound` or `nwj_lower_bound` from the all-pairs output
    of `SeparableCritic` / `ConcatCritic`.
    """
    scores = jnp.asarray(scores)
    if scores.ndim != 2 or scores.shape[0] != scores.shape[1] or scores.shape[0] < 2:
        raise ValueError(f"diag_offdiag: scores must be [N, N] with N ≥ 2, got {scores.shape}")
    n = scores.shape[0]
    rows, cols = np.nonzero(~np.eye(n, dtype=bool))
    return jnp.diagonal(scores), scores[rows, cols]


# -- CLUB upper bound (minimise) -------------------------------------------------------------------


def gaussian_log_likelihood(y: jax.Array, mu: jax.Array, logvar: jax.Array) -> jax.Array:
    """``log N(y; mu, diag exp(logvar))`` summed over the last axis: ``[..., D] -> [...]``.

    ``y``, ``mu`` and ``logvar`` broadcast against each other.
    """
    y, mu, logvar = _f32(y), _f32(mu), _f32(logvar)
    sq = jnp.square(y - mu) * jnp.exp(-logvar)
    return -0.5 * jnp.sum(math.log(2.0 * math.pi) + logvar + sq, axis=-1)


def club_upper_bound(y: jax.Array, mu: jax.Array, logvar: jax.Array) -> jax.Array:
    """CLUB (Cheng et al. 2020) with a Gaussian ``q(y|x) = N(mu(x), diag exp(logvar(x)))``, scalar.

    ``y``, ``mu = mu(x)``, ``logvar = logvar(x)`` are ``[N, D]`` (row ``i`` from the pair
    ``(x_i, y_i)``). Returns ``mean_i log q(y_i|x_i) - mean_{i,j} log q(y_j|x_i)``, an upper bound
    on ``I(X; Y)`` when ``q`` is close to ``p(y|x)``. The all-pairs mean is taken in O(N D) without
    forming pairs, as ``mean_j (y_j - mu_i)² = S + (ȳ - mu_i)²`` with ``S`` the (biased) sample
    variance of ``y`` per dimension; the ``logvar`` and normalising terms cancel.
    """
    y, mu, logvar = _f32(y), _f32(mu), _f32(logvar)
    _check_samples("club_upper_bound", y=y, mu=mu, logvar=logvar)
    inv_var = jnp.exp(-logvar)
    y_bar = jnp.mean(y, axis=0)
    s = jnp.mean(jnp.square(y - y_bar), axis=0)
    neg = (s + jnp.square(y_bar - mu)) * inv_var  # mean over j of (y_j - mu_i)² / var_i
    pos = jnp.square(y - mu) * inv_var
    return 0.5 * jnp.mean(jnp.sum(neg - pos, axis=-1))


def club_sampled_upper_bound(
    y: jax.Array, mu: jax.Array, logvar: jax.Array, key: jax.Array
) -> jax.Array:
    """CLUB-S: `club_upper_bound` with one negative per row, ``y_{π(i)}`` for a random permutation.

    Shapes as for `club_upper_bound`; ``key`` draws the permutation π. Since ``π(i)`` is uniform
    over all ``N`` rows, its expectation over ``key`` is exactly `club_upper_bound` on the batch.
    """
    y, mu, logvar = _f32(y), _f32(mu), _f32(logvar)
    _check_samples("club_sampled_upper_bound", y=y, mu=mu, logvar=logvar)
    y_neg = y[jax.random.permutation(key, y.shape[0])]
    inv_var = jnp.exp(-logvar)
    diff = jnp.square(y_neg - mu) - jnp.square(y - mu)
    return 0.5 * jnp.mean(jnp.sum(diff * inv_var, axis=-1))


# -- closed-form references ------------------------------------------------------------------------


def gaussian_mi(rho: float | np.ndarray) -> float | np.ndarray:
    """MI (nats) of a bivariate Gaussian with correlation ``rho``: ``-½ log(1 - ρ²)``, float64."""
    rho = np.asarray(rho, dtype=np.float64)
    out = -0.5 * np.log1p(-np.square(rho))
    return float(out) if out.ndim == 0 else out


def gaussian_mi_multivariate(cov: np.ndarray, dx: int) -> float:
    """MI (nats) of jointly Gaussian ``[x; y]`` from its covariance ``[dx + dy, dx + dy]``, float64.

    ``½ (log det Σ_x + log det Σ_y - log det Σ)``, with ``x`` the first ``dx`` coordinates.
    """
    cov = np.asarray(cov, dtype=np.float64)
    if cov.ndim != 2 or cov.shape[0] != cov.shape[1] or not 0 < dx < cov.shape[0]:
        raise ValueError(f"gaussian_mi_multivariate: need a square cov and 0 < dx < {cov.shape}")
    logdets = []
    for block in (cov[:dx, :dx], cov[dx:, dx:], cov):
        sign, logdet = np.linalg.slogdet(block)
        if sign <= 0:
            raise ValueError("gaussian_mi_multivariate: covariance must be positive definite")
        logdets.append(logdet)
    return float(0.5 * (logdets[0] + logdets[1] - logdets[2]))


# -- critics ---------------------------------------------------------------------------------------


class _MLP(nnx.Module):
    """ReLU MLP ``[..., din] -> [..., dout]``, linear output."""

    def __init__(self, din: int, hidden: Sequence[int], dout: int, *, rngs: nnx.Rngs):
        sizes = [din, *hidden, dout]
        self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(sizes[:-1], sizes[1:])])

    def __call__(self, x: jax.Array) -> jax.Array:
        for layer in self.layers[:-1]:
            x = jax.nn.relu(layer(x))
        return self.layers[-1](x)


class SeparableCritic(nnx.Module):
    """``f(x, y) = g(x) · h(y) / temperature`` for all pairs: ``x [N, Dx], y [M, Dy] -> [N, M]``."""

    def __init__(
        self,
        x_dim: int,
        y_dim: int,
        *,
        embed_dim: int = 32,
        hidden: Sequence[int] = (64,),
        temperature: float = 1.0,
        rngs: nnx.Rngs,
    ):
        self.g = _MLP(x_dim, hidden, embed_dim, rngs=rngs)
        self.h = _MLP(y_dim, hidden, embed_dim, rngs=rngs)
        self.temperature = temperature

    def __call__(self, x: jax.Array, y: jax.Array) -> jax.Array:
        return self.g(x) @ self.h(y).T / self.temperature


class ConcatCritic(nnx.Module):
    """``f(x, y) = MLP([x, y])`` for all pairs: ``x [N, Dx], y [M, Dy] -> [N, M]`` (O(N M) MLPs)."""

    def __init__(self, x_dim: int, y_dim: int, *, hidden: Sequence[int] = (64, 64), rngs: nnx.Rngs):
        self.mlp = _MLP(x_dim + y_dim, hidden, 1, rngs=rngs)

    def __call__(self, x: jax.Array, y: jax.Array) -> jax.Array:
        n, m = x.shape[0], y.shape[0]
        xx = jnp.broadcast_to(x[:, None, :], (n, m, x.shape[-1]))
        yy = jnp.broadcast_to(y[None, :, :], (n, m, y.shape[-1]))
        return self.mlp(jnp.concatenate([xx, yy], axis=-1))[..., 0]


class GaussianConditional(nnx.Module):
    """Variational ``q(y|x) = N(mu(x), diag exp(logvar(x)))`` for CLUB: ``x [N, Dx] -> [N, Dy]`` ×2.

    Train it by maximising `log_likelihood` on joint samples (with the encoders' outputs held
    fixed), then use `club` (or `club_upper_bound` on its outputs) as the MI penalty.

    ``var_floor`` (optional) bounds the variance below: ``var = var_floor + exp(raw)``, so
    ``logvar >= log var_floor``; ``mean_bound`` (optional) bounds the mean,
    ``mu = b tanh(raw / b)``. With both, and ``y`` in ``[-b, b]``, every term of the CLUB estimate
    is bounded: ``|CLUB| <= D (2b)² / (2 var_floor)``. Without a floor a collapsing ``q`` can drive
    ``1/var`` and with it the estimate to overflow.
    """

    def __init__(
        self,
        x_dim: int,
        y_dim: int,
        *,
        hidden: Sequence[int] = (64,),
        var_floor: float | None = None,
        mean_bound: float | None = None,
        rngs: nnx.Rngs,
    ):
        for name, v in (("var_floor", var_floor), ("mean_bound", mean_bound)):
            if v is not None and not (math.isfinite(v) and v > 0):
                raise ValueError(f"GaussianConditional: {name} must be > 0 or None, got {v}")
        self.mu = _MLP(x_dim, hidden, y_dim, rngs=rngs)
        self.logvar = _MLP(x_dim, hidden, y_dim, rngs=rngs)
        self.var_floor = var_floor
        self.mean_bound = mean_bound

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        mu, logvar = self.mu(x), self.logvar(x)
        if self.mean_bound is not None:
            mu = self.mean_bound * jnp.tanh(mu / self.mean_bound)
        if self.var_floor is not None:  # log(floor + exp(raw)), smooth and >= log(floor)
            logvar = jnp.logaddexp(logvar, math.log(self.var_floor))
        return mu, logvar

    def log_likelihood(self, x: jax.Array, y: jax.Array) -> jax.Array:
        """Mean over the batch of ``log q(y_i|x_i)``, scalar (the training objective)."""
        mu, logvar = self(x)
        return jnp.mean(gaussian_log_likelihood(y, mu, logvar))

    def club(self, x: jax.Array, y: jax.Array) -> jax.Array:
        """`club_upper_bound` of ``I(X; Y)`` under this ``q``, scalar."""
        mu, logvar = self(x)
        return club_upper_bound(y, mu, logvar)
