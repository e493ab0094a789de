"""Mutual-information estimators (jaxlab.sky.mi) against closed forms for correlated Gaussians.

Data: ``d`` independent pairs of standard normals with correlation ``ρ``, so that
``I = -d/2 log(1 - ρ²)`` and the density ratio ``log p(x, y)/(p(x) p(y))`` is known in closed form.
References are float64 numpy; tolerances are a stated multiple of the estimator's standard error
(computed analytically or from float64 samples), with fixed seeds.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxlab.sky import mi

RHOS = (0.5, 0.8, 0.9)


def sample_pairs(rng: np.random.Generator, rho: float, d: int, n: int) -> tuple[np.ndarray, ...]:
    """``x, y [n, d]`` float64; each coordinate pair is standard bivariate normal, correlation ρ."""
    x = rng.standard_normal((n, d))
    y = rho * x + math.sqrt(1.0 - rho**2) * rng.standard_normal((n, d))
    return x, y


def log_ratio(x: np.ndarray, y: np.ndarray, rho: float) -> np.ndarray:
    """Optimal critic ``T*(x, y) = log p(x, y)/(p(x) p(y))`` summed over the last axis, float64."""
    s = 1.0 - rho**2
    per_dim = -0.5 * math.log(s) - (x**2 - 2 * rho * x * y + y**2) / (2 * s) + (x**2 + y**2) / 2
    return np.sum(per_dim, axis=-1)


def f32(a: np.ndarray) -> jax.Array:
    return jnp.asarray(a, dtype=jnp.float32)


# -- closed-form references ------------------------------------------------------------------------


def test_gaussian_mi_references():
    assert mi.gaussian_mi(0.0) == 0.0
    np.testing.assert_allclose(mi.gaussian_mi(0.8), -0.5 * np.log(0.36), rtol=1e-14)
    # d independent correlated pairs: the joint MI is d times the bivariate one.
    d, rho = 3, 0.7
    cov = np.block([[np.eye(d), rho * np.eye(d)], [rho * np.eye(d), np.eye(d)]])
    np.testing.assert_allclose(
        mi.gaussian_mi_multivariate(cov, d), d * mi.gaussian_mi(rho), rtol=1e-12
    )
    # A random joint covariance: MI = -½ Σ log(1 - c_k²) over the canonical correlations c_k.
    rng = np.random.default_rng(0)
    a = rng.standard_normal((5, 5))
    cov = a @ a.T + 0.5 * np.eye(5)
    dx = 2
    sx, sy, sxy = cov[:dx, :dx], cov[dx:, dx:], cov[:dx, dx:]
    wx = np.linalg.inv(np.linalg.cholesky(sx))
    wy = np.linalg.inv(np.linalg.cholesky(sy))
    c = np.linalg.svd(wx @ sxy @ wy.T, compute_uv=False)
    np.testing.assert_allclose(
        mi.gaussian_mi_multivariate(cov, dx), -0.5 * np.sum(np.log1p(-(c**2))), rtol=1e-10
    )
    with pytest.raises(ValueError):
        mi.gaussian_mi_multivariate(cov, 0)


# -- float32 implementations against float64 formulas ---------------------------------------------


def _np_logmeanexp(a: np.ndarray) -> float:
    return float(np.log(np.mean(np.exp(a))))  # naive is fine in float64 for |a| ≤ 110


@pytest.mark.parametrize("offset", [0.0, 100.0])
def test_estimators_match_float64_formulas(offset):
    # offset=100 overflows a naive float32 exp (max ≈ e^88.7), so this checks the stabilisation.
    rng = np.random.default_rng(1)
    s = 3.0 * rng.standard_normal((33, 33)) + offset
    pos, neg = s[np.arange(33), np.arange(33)], s[~np.eye(33, dtype=bool)]
    lse = np.log(np.sum(np.exp(s), axis=1))
    ref = {
        "infonce": np.log(33) + np.mean(np.diag(s) - lse),
        "dv": np.mean(pos) - _np_logmeanexp(neg),
        "jsd": -np.mean(np.logaddexp(0, -pos)) - np.mean(np.logaddexp(0, neg)),
    }
    got = {
        "infonce": mi.infonce_lower_bound(f32(s)),
        "dv": mi.dv_lower_bound(*map(f32, (pos, neg))),
        "jsd": mi.jsd_lower_bound(*map(f32, (pos, neg))),
    }
    if offset == 0.0:  # NWJ is genuinely ~ -e^{99} at offset 100
        ref["nwj"] = np.mean(pos) - np.exp(_np_logmeanexp(neg) - 1)
        got["nwj"] = mi.nwj_lower_bound(*map(f32, (pos, neg)))
    for k, v in got.items():
        assert v.dtype == jnp.float32 and v.shape == ()
        # float32 rounding of inputs of magnitude ≤ offset + 10: a few ulps (eps ≈ 1.2e-7) of that,
        # absolute on log-scale terms and relative on NWJ's exp term (about -44 here).
        tol = 8 * np.finfo(np.float32).eps * (offset + 10)
        np.testing.assert_allclose(float(v), ref[k], rtol=tol, atol=tol, err_msg=k)


# -- lower bounds with the analytically optimal critic ---------------------------------------------


@pytest.mark.parametrize("rho", RHOS)
def test_dv_and_nwj_with_optimal_critic_recover_mi(rho):
    d, n = 2, 100_000
    rng = np.random.default_rng(int(rho * 100))
    x, y = sample_pairs(rng, rho, d, n)
    t_pos = log_ratio(x, y, rho)
    t_neg = log_ratio(x, y[rng.permutation(n)], rho)  # shuffled pairs ~ p(x) p(y)
    true_mi = d * mi.gaussian_mi(rho)
    # Standard error of E_P[T] - E_Q[e^T] (DV to first order, NWJ exactly): the two means are
    # dependent (shared x, y), so bound SD(A - B) ≤ SD(A) + SD(B). SD_Q(e^{T*}) is analytic:
    # E_Q[r²] = E_P[r] = (1 - ρ²)^{-d}. (Its 4th moment is infinite for ρ ≥ 0.5, so the sample SD
    # would be unreliable; T* under P is quadratic in Gaussians, so its sample SD is fine.)
    sd_q = math.sqrt((1 - rho**2) ** -d - 1)
    se = (np.std(t_pos) + sd_q) / math.sqrt(n)
    tol = 4 * se
    dv = float(mi.dv_lower_bound(f32(t_pos), f32(t_neg)))
    assert abs(dv - true_mi) < tol, (dv, true_mi, tol)
    # DV is invariant to a constant shift of the critic.
    dv_shift = float(mi.dv_lower_bound(f32(t_pos + 3.0), f32(t_neg + 3.0)))
    assert abs(dv_shift - dv) < 1e-5
    # NWJ is tight at T* + 1; at the bare log ratio it is I - 1/e.
    nwj = float(mi.nwj_lower_bound(f32(t_pos + 1.0), f32(t_neg + 1.0)))
    assert abs(nwj - true_mi) < tol, (nwj, true_mi, tol)
    nwj_bare = float(mi.nwj_lower_bound(f32(t_pos), f32(t_neg)))
    assert abs(nwj_bare - (true_mi - math.exp(-1))) < tol


def _optimal_scores(rng: np.random.Generator, rho: float, d: int, n: int) -> np.ndarray:
    x, y = sample_pairs(rng, rho, d, n)
    return log_ratio(x[:, None, :], y[None, :, :], rho)  # [n, n], positives on the diagonal


def test_infonce_optimal_critic_small_mi_is_close_to_mi():
    # MI = 0.144 nats << log N = 6.93. E[I_NCE] = I - E log(mean_j r_ij) with bias ≈ (E_P[r] - 1)/N
    # = 0.33/1024 = 3e-4, negligible; batches are independent so their spread gives the SE.
    rho, d, n, k = 0.5, 1, 1024, 16
    rng = np.random.default_rng(2)
    est = np.array(
        [float(mi.infonce_lower_bound(f32(_optimal_scores(rng, rho, d, n)))) for _ in range(k)]
    )
    true_mi = d * mi.gaussian_mi(rho)
    se = est.std(ddof=1) / math.sqrt(k)
    assert np.all(est <= math.log(n) + 1e-6)
    assert abs(est.mean() - true_mi) < 4 * se, (est.mean(), true_mi, se)
    assert est.mean() <= true_mi + 4 * se  # a lower bound in expectation


def test_infonce_optimal_critic_saturates_at_log_n():
    # MI = 15.7 nats >> log N = 4.16: I_NCE ≤ log N always. Its expected gap log N - I_NCE is
    # E log(1 + Σ_{j≠i} r_ij / r_ii) ≤ E_P softplus(log(N - 1) - T*) (Jensen given (x_i, y_i),
    # using E[r_ij | x_i] = 1), about 1e-3 here; we allow 10x that bound.
    rho, d, n = 0.99, 8, 64
    rng = np.random.default_rng(3)
    bound = np.mean(
        np.logaddexp(0.0, math.log(n - 1) - log_ratio(*sample_pairs(rng, rho, d, 10**5), rho))
    )
    assert bound < 5e-3
    est = np.array(
        [float(mi.infonce_lower_bound(f32(_optimal_scores(rng, rho, d, n)))) for _ in range(8)]
    )
    # 1e-6: float32 rounding of log N (the float32 nearest log 64 lies above it).
    assert np.all(est <= math.log(n) + 1e-6)
    assert math.log(n) - est.mean() < 10 * bound
    assert d * mi.gaussian_mi(rho) - est.mean() > 10.0  # far below the true MI: saturated


def _jsd_terms(t_pos: np.ndarray, t_neg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return -np.logaddexp(0.0, -t_pos), -np.logaddexp(0.0, t_neg)  # log σ(T), log(1 - σ(T'))


def test_jsd_optimal_critic_matches_float64_monte_carlo_and_is_monotone():
    # At T* the JSD estimator equals 2 JSD(P || Q) - 2 log 2 = E_P log σ(T*) + E_Q log(1 - σ(T*)).
    # Reference: that expectation by float64 Monte Carlo on independent samples (Q drawn as
    # independent x, y). Both sides are sample means of bounded-variance terms: tolerance 4 SE.
    d, n, n_ref = 2, 50_000, 400_000
    rng = np.random.default_rng(4)
    values = []
    for rho in RHOS:
        x, y = sample_pairs(rng, rho, d, n)
        t_pos, t_neg = log_ratio(x, y, rho), log_ratio(x, y[rng.permutation(n)], rho)
        est = float(mi.jsd_lower_bound(f32(t_pos), f32(t_neg)))
        xr, yr = sample_pairs(rng, rho, d, n_ref)
        xq, yq = rng.standard_normal((n_ref, d)), rng.standard_normal((n_ref, d))
        a, b = _jsd_terms(log_ratio(xr, yr, rho), log_ratio(xq, yq, rho))
        a_est, b_est = _jsd_terms(t_pos, t_neg)
        se = (a_est.std() + b_est.std()) / math.sqrt(n) + (a.std() + b.std()) / math.sqrt(n_ref)
        assert abs(est - (a.mean() + b.mean())) < 4 * se, (rho, est, a.mean() + b.mean(), se)
        assert -2 * math.log(2) < est < 0.0
        values.append(est)
    assert values[0] < values[1] < values[2]


def test_jsd_log_ratio_critic_beats_perturbed_critics():
    # T* = log p/q maximises the JSD objective pointwise. On common samples, the drop from T* to a
    # perturbed critic must exceed 4 standard errors of the paired difference.
    rho, d, n = 0.8, 2, 100_000
    rng = np.random.default_rng(5)
    x, y = sample_pairs(rng, rho, d, n)
    xq, yq = x, y[rng.permutation(n)]
    t_pos, t_neg = log_ratio(x, y, rho), log_ratio(xq, yq, rho)
    base = float(mi.jsd_lower_bound(f32(t_pos), f32(t_neg)))
    a0, b0 = _jsd_terms(t_pos, t_neg)
    perturbations = {
        "+0.5": lambda t, x, y: t + 0.5,
        "-0.5": lambda t, x, y: t - 0.5,
        "x1.2": lambda t, x, y: 1.2 * t,
        "x0.8": lambda t, x, y: 0.8 * t,
        "+0.3xy": lambda t, x, y: t + 0.3 * np.sum(x * y, axis=-1),
    }
    for name, perturb in perturbations.items():
        p_pos, p_neg = perturb(t_pos, x, y), perturb(t_neg, xq, yq)
        drop = base - float(mi.jsd_lower_bound(f32(p_pos), f32(p_neg)))
        a1, b1 = _jsd_terms(p_pos, p_neg)
        se = (np.std(a0 - a1) + np.std(b0 - b1)) / math.sqrt(n)
        assert drop > 4 * se, (name, drop, se)


# -- CLUB ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rho", RHOS)
def test_club_with_true_conditional_matches_closed_form(rho):
    # With q = p(y|x) = N(ρx, 1 - ρ²): E_P log q - E_x E_y log q = (1 + ρ²)/(2(1 - ρ²)) - ½
    # = ρ²/(1 - ρ²) per dimension, which is ≥ -½ log(1 - ρ²) = I.
    d, n = 2, 50_000
    rng = np.random.default_rng(6 + int(rho * 10))
    x, y = sample_pairs(rng, rho, d, n)
    mu, logvar = rho * x, np.full_like(x, math.log(1 - rho**2))
    club = float(mi.club_upper_bound(f32(y), f32(mu), f32(logvar)))
    closed = d * rho**2 / (1 - rho**2)
    # SE from the float64 per-row terms ½ Σ_d [(mean_j (y_j - mu_i)² - (y_i - mu_i)²)/var].
    v = 1 - rho**2
    rows = 0.5 * np.sum((y.var(0) + (y.mean(0) - mu) ** 2 - (y - mu) ** 2) / v, axis=-1)
    se = rows.std() / math.sqrt(n)
    assert abs(club - closed) < 4 * se, (club, closed, se)
    assert club >= d * mi.gaussian_mi(rho) - 4 * se


def test_club_matches_double_loop():
    rng = np.random.default_rng(7)
    n, d = 12, 3
    y, mu = rng.standard_normal((n, d)), rng.standard_normal((n, d))
    logvar = 0.5 * rng.standard_normal((n, d))

    def log_q(yj, i):  # float64 log N(y_j; mu_i, diag exp(logvar_i))
        var = np.exp(logvar[i])
        return float(np.sum(-0.5 * np.log(2 * np.pi * var) - (yj - mu[i]) ** 2 / (2 * var)))

    pos = np.mean([log_q(y[i], i) for i in range(n)])
    neg = np.mean([log_q(y[j], i) for i in range(n) for j in range(n)])
    got = float(mi.club_upper_bound(f32(y), f32(mu), f32(logvar)))
    np.testing.assert_allclose(got, pos - neg, rtol=1e-5, atol=1e-5)
    ll = mi.gaussian_log_likelihood(f32(y), f32(mu), f32(logvar))
    assert ll.shape == (n,)
    np.testing.assert_allclose(ll, [log_q(y[i], i) for i in range(n)], rtol=1e-5, atol=1e-5)


def test_club_sampled_is_unbiased_for_club():
    # E_π[CLUB-S] = CLUB exactly (π(i) is uniform over all rows); keys are independent, so the
    # spread over keys gives the SE of their mean.
    rng = np.random.default_rng(8)
    rho, d, n, k = 0.8, 2, 256, 4000
    x, y = sample_pairs(rng, rho, d, n)
    y, mu, logvar = f32(y), f32(rho * x), f32(np.full_like(x, math.log(1 - rho**2)))
    club = float(mi.club_upper_bound(y, mu, logvar))
    keys = jax.random.split(jax.random.key(0), k)
    samples = np.asarray(
        jax.jit(jax.vmap(lambda kk: mi.club_sampled_upper_bound(y, mu, logvar, kk)))(keys)
    )
    se = samples.std(ddof=1) / math.sqrt(k)
    assert abs(samples.mean() - club) < 4 * se, (samples.mean(), club, se)


# -- training the NNX critics ----------------------------------------------------------------------

TRAIN_RHO, TRAIN_D, TRAIN_N = 0.8, 2, 128


def _jax_pairs(key: jax.Array, n: int) -> tuple[jax.Array, jax.Array]:
    kx, ke = jax.random.split(key)
    x = jax.random.normal(kx, (n, TRAIN_D))
    e = jax.random.normal(ke, (n, TRAIN_D))
    return x, TRAIN_RHO * x + math.sqrt(1 - TRAIN_RHO**2) * e


def _held_out(seed: int, batches: int) -> tuple[jax.Array, jax.Array]:
    rng = np.random.default_rng(seed)
    xs, ys = sample_pairs(rng, TRAIN_RHO, TRAIN_D, batches * TRAIN_N)
    shape = (batches, TRAIN_N, TRAIN_D)
    return f32(xs.reshape(shape)), f32(ys.reshape(shape))


def _train(model: nnx.Module, objective, steps: int, lr: float, seed: int) -> None:
    opt = nnx.Optimizer(model, optax.adam(lr), wrt=nnx.Param)

    @nnx.jit
    def step(model, opt, key):
        x, y = _jax_pairs(key, TRAIN_N)
        grads = nnx.grad(lambda m: -objective(m, x, y))(model)
        opt.update(model, grads)

    for key in jax.random.split(jax.random.key(seed), steps):
        step(model, opt, key)


def test_separable_critic_trained_on_infonce_recovers_mi():
    # MI = 1.02 nats < log 128 = 4.85. Held-out estimate over 64 batches of 128 (SE ≈ 0.01); the
    # optimal critic itself gives ≈ 0.98 at this N, so 15% leaves ~10% for the learned critic.
    critic = mi.SeparableCritic(TRAIN_D, TRAIN_D, embed_dim=16, hidden=(64,), rngs=nnx.Rngs(0))
    _train(critic, lambda c, x, y: mi.infonce_lower_bound(c(x, y)), steps=500, lr=3e-3, seed=1)
    xs, ys = _held_out(10, 64)
    est = float(jnp.mean(jax.vmap(lambda x, y: mi.infonce_lower_bound(critic(x, y)))(xs, ys)))
    true_mi = TRAIN_D * mi.gaussian_mi(TRAIN_RHO)
    assert abs(est - true_mi) < 0.15 * true_mi, (est, true_mi)


def test_gaussian_conditional_trained_by_likelihood_gives_club():
    # CLUB at the true conditional is d ρ²/(1 - ρ²) = 3.56 ≥ I = 1.02; the held-out estimate over
    # 8192 pairs has SE ≈ 0.03, so the 30% band is about the learned q, not sampling noise.
    q = mi.GaussianConditional(TRAIN_D, TRAIN_D, hidden=(64,), rngs=nnx.Rngs(1))
    _train(q, lambda m, x, y: m.log_likelihood(x, y), steps=500, lr=3e-3, seed=2)
    xs, ys = _held_out(11, 64)
    x, y = xs.reshape(-1, TRAIN_D), ys.reshape(-1, TRAIN_D)
    club = float(q.club(x, y))
    closed = TRAIN_D * TRAIN_RHO**2 / (1 - TRAIN_RHO**2)
    assert club >= TRAIN_D * mi.gaussian_mi(TRAIN_RHO) - 0.1
    assert abs(club - closed) < 0.3 * closed, (club, closed)
    mu, logvar = q(x)
    assert mu.shape == logvar.shape == (x.shape[0], TRAIN_D)


# -- jit, grad, shapes, errors ---------------------------------------------------------------------


def test_jit_grad_and_shapes():
    rng = np.random.default_rng(9)
    s = f32(rng.standard_normal((6, 6)))
    n = 6
    val = jax.jit(mi.infonce_lower_bound)(s)
    np.testing.assert_allclose(val, mi.infonce_lower_bound(s), rtol=1e-6)
    g = jax.grad(mi.infonce_lower_bound)(s)
    assert g.shape == (n, n) and bool(jnp.all(jnp.isfinite(g)))
    # d I_NCE / d s_ij = (δ_ij - softmax_j(s_i·)_j) / N
    expected = (np.eye(n) - np.asarray(jax.nn.softmax(s, axis=1))) / n
    np.testing.assert_allclose(g, expected, atol=1e-6)
    pos, neg = mi.diag_offdiag(s)
    assert pos.shape == (n,) and neg.shape == (n * (n - 1),)
    np.testing.assert_array_equal(neg, np.asarray(s)[~np.eye(n, dtype=bool)])
    for fn in (mi.jsd_lower_bound, mi.dv_lower_bound, mi.nwj_lower_bound):
        v, (gp, gn) = jax.jit(jax.value_and_grad(fn, argnums=(0, 1)))(pos, neg)
        assert v.shape == () and gp.shape == pos.shape and gn.shape == neg.shape
        assert bool(jnp.all(jnp.isfinite(gp))) and bool(jnp.all(jnp.isfinite(gn)))
    y, mu, lv = (f32(rng.standard_normal((5, 3))) for _ in range(3))
    g = jax.jit(jax.grad(mi.club_upper_bound, argnums=(0, 1, 2)))(y, mu, lv)
    assert all(a.shape == (5, 3) and bool(jnp.all(jnp.isfinite(a))) for a in g)
    v = jax.jit(mi.club_sampled_upper_bound)(y, mu, lv, jax.random.key(0))
    assert v.shape == () and v.dtype == jnp.float32
    # bfloat16 scores are computed in float32.
    assert mi.infonce_lower_bound(s.astype(jnp.bfloat16)).dtype == jnp.float32


def test_critics_shapes_and_all_pairs():
    rngs = nnx.Rngs(0)
    x, y = jnp.ones((5, 3)) * jnp.arange(5)[:, None], jnp.ones((7, 2)) * jnp.arange(7)[:, None]
    sep = mi.SeparableCritic(3, 2, embed_dim=4, hidden=(8,), temperature=0.5, rngs=rngs)
    cat = mi.ConcatCritic(3, 2, hidden=(8,), rngs=rngs)
    assert sep(x, y).shape == (5, 7) and cat(x, y).shape == (5, 7)
    np.testing.assert_allclose(sep(x, y), sep.g(x) @ sep.h(y).T * 2.0, rtol=1e-6)
    xn, yn = np.asarray(x), np.asarray(y)
    pairs = np.stack([np.concatenate([xn[i], yn[j]]) for i in range(5) for j in range(7)])
    np.testing.assert_allclose(cat(x, y), cat.mlp(pairs)[:, 0].reshape(5, 7), rtol=1e-5, atol=1e-6)
    mi.infonce_lower_bound(cat(x[:5], y[:5]))  # plugs straight into the bounds


def test_bad_inputs_raise():
    with pytest.raises(ValueError):
        mi.infonce_lower_bound(jnp.zeros((3, 4)))
    with pytest.raises(ValueError):
        jax.jit(mi.infonce_lower_bound)(jnp.zeros((3, 4)))
    with pytest.raises(ValueError):
        mi.infonce_lower_bound(jnp.zeros((3,)))
    with pytest.raises(ValueError):
        mi.diag_offdiag(jnp.zeros((2, 3)))
    with pytest.raises(ValueError):
        mi.dv_lower_bound(jnp.zeros((0,)), jnp.zeros((3,)))
    with pytest.raises(ValueError):
        mi.club_upper_bound(jnp.zeros((4, 2)), jnp.zeros((4, 3)), jnp.zeros((4, 2)))
    with pytest.raises(ValueError):
        mi.club_sampled_upper_bound(
            jnp.zeros((4,)), jnp.zeros((4,)), jnp.zeros((4,)), jax.random.key(0)
        )
    with pytest.raises(TypeError):
        mi.jsd_lower_bound(jnp.zeros((3,), jnp.int32), jnp.zeros((3,)))


def test_gaussian_conditional_floor_and_bound_keep_club_finite():
    """A q whose raw log-variance collapses (-200) and whose mean runs off (1e6): without the floor
    and bound CLUB overflows; with them logvar >= log floor, |mu| <= b, and CLUB stays within the
    bound D (2b)^2 / (2 floor), checked against a float64 evaluation of the same q."""
    rng = np.random.default_rng(3)
    d, floor, bound = 4, 0.05, 1.0
    q = mi.GaussianConditional(
        d, d, hidden=(8,), var_floor=floor, mean_bound=bound, rngs=nnx.Rngs(0)
    )
    free = mi.GaussianConditional(d, d, hidden=(8,), rngs=nnx.Rngs(0))
    for m in (q, free):
        for head, value in ((m.logvar, -200.0), (m.mu, 1e6)):
            last = head.layers[-1]
            last.kernel[...] = jnp.zeros_like(last.kernel[...])
            last.bias[...] = jnp.full_like(last.bias[...], value)
    x = f32(rng.uniform(-1, 1, (64, d)))
    y = f32(np.tanh(rng.normal(size=(64, d))))  # in [-1, 1], as SMI's tanh(z)
    run = nnx.jit(lambda m, x, y: (*m(x), m.club(x, y)))  # one compile instead of eager ops
    mu, logvar, club = run(q, x, y)
    assert float(jnp.min(logvar)) >= math.log(floor) - 1e-6
    assert float(jnp.max(jnp.abs(mu))) <= bound
    club = float(club)
    # float64: var = floor + exp(-200) ~ floor, mu = b tanh(1e6 / b) = b.
    yy = np.asarray(y, np.float64)
    var = floor + math.exp(-200.0)
    neg = np.mean((yy[None, :, :] - bound) ** 2, axis=1)  # mean_j (y_j - mu)^2 per row (same mu)
    pos = (yy - bound) ** 2
    want = 0.5 * np.mean(np.sum(neg - pos, -1)) / var
    assert club == pytest.approx(want, rel=1e-4, abs=1e-4)
    assert abs(club) <= d * (2 * bound) ** 2 / (2 * floor)
    free_club = float(run(free, x, y)[2])
    assert not np.isfinite(free_club) or abs(free_club) > 1e10
    with pytest.raises(ValueError, match="var_floor"):
        mi.GaussianConditional(d, d, var_floor=0.0, rngs=nnx.Rngs(0))
