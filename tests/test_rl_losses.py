"""RL losses against float64 numpy references; exactness under micro-batching and sharding."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxlab import rl

MODES = rl.AGGREGATION_MODES.names()
M = 12.0  # the fixed max_len of Dr. GRPO and ΔL


def _batch(seed=0, b=8, t=10, empty_rows=(2, 5)):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, t + 1, size=b)
    for i in empty_rows:
        lengths[i] = 0
    mask = (np.arange(t)[None] < lengths[:, None]).astype(np.float64)
    # ragged and not only right-aligned: shift some rows
    mask[1] = np.roll(mask[1], 3)
    loss = rng.normal(size=(b, t))
    return loss, mask


def _ref_aggregate(loss, mask, mode, alpha=1.0, max_len=M):
    """Float64 numpy, written from the formulas of the papers."""
    lengths = mask.sum(-1)
    sums = (loss * mask).sum(-1)
    nonempty = lengths > 0
    b = nonempty.sum()
    if mode == "token_mean":
        return sums.sum() / lengths.sum() if lengths.sum() else 0.0
    if mode == "seq_mean_token_mean":
        return (sums[nonempty] / lengths[nonempty]).sum() / b if b else 0.0
    if mode == "seq_mean_token_sum":
        return sums[nonempty].sum() / b if b else 0.0
    if mode == "seq_mean_token_sum_norm":
        return sums.sum() / (b * max_len) if b else 0.0
    if mode == "delta_l":
        w = np.zeros_like(lengths)
        w[nonempty] = lengths[nonempty] ** -alpha
        x = w / w.sum() if w.sum() else w
        return (x * sums).sum() / max_len
    raise KeyError(mode)


@pytest.mark.parametrize("mode", MODES)
def test_aggregate_matches_numpy(mode):
    for seed in range(3):
        loss, mask = _batch(seed)
        for alpha in (0.0, 0.5, 0.75, 1.0) if mode == "delta_l" else (1.0,):
            fn = jax.jit(functools.partial(rl.aggregate_loss, mode=mode, max_len=M, alpha=alpha))
            ours = float(fn(jnp.asarray(loss, jnp.float32), jnp.asarray(mask, jnp.float32)))
            np.testing.assert_allclose(
                ours, _ref_aggregate(loss, mask, mode, alpha), rtol=1e-5, atol=1e-6
            )


@pytest.mark.parametrize("mode", MODES)
def test_empty_batch_gives_zero_not_nan(mode):
    loss = jnp.ones((3, 4))
    mask = jnp.zeros((3, 4))
    value, grad = jax.value_and_grad(lambda x: rl.aggregate_loss(x, mask, mode, max_len=M))(loss)
    assert float(value) == 0.0 and np.isfinite(np.asarray(grad)).all()


def _policy_logp(theta, feats):
    """A toy policy: per-token log-probs linear in parameters theta [F], feats [B, T, F]."""
    return jnp.einsum("btf,f->bt", feats, theta) - 1.0


def _grad_setup(seed=0, b=8, t=10, f=5):
    rng = np.random.default_rng(seed)
    loss, mask = _batch(seed, b, t)
    feats = jnp.asarray(rng.normal(size=(b, t, f)) * 0.1, jnp.float32)
    theta = jnp.asarray(rng.normal(size=(f,)), jnp.float32)
    old = _policy_logp(theta + 0.05, feats)
    adv = jnp.asarray(rng.normal(size=(b,)), jnp.float32)
    return theta, feats, old, adv, jnp.asarray(mask, jnp.float32)


def _loss(theta, feats, old, adv, mask, mode, normalizer=None):
    loss, _ = rl.policy_loss(
        _policy_logp(theta, feats),
        old,
        adv,
        mask,
        clip_low=0.2,
        clip_high=0.28,
        agg=mode,
        max_len=M,
        alpha=0.75,
        normalizer=normalizer,
    )
    return loss


@pytest.mark.parametrize("mode", MODES)
def test_micro_batches_give_the_full_batch_gradient(mode):
    theta, feats, old, adv, mask = _grad_setup()
    full = jax.grad(_loss)(theta, feats, old, adv, mask, mode)
    norm = rl.loss_normalizer(
        mask, mode, alpha=0.75, max_len=M
    )  # once, over the optimisation batch
    acc = jnp.zeros_like(theta)
    naive = jnp.zeros_like(theta)
    for k in range(4):  # 4 micro-batches of 2 sequences
        sl = slice(2 * k, 2 * k + 2)
        args = (feats[sl], old[sl], adv[sl], mask[sl], mode)
        acc = acc + jax.grad(_loss)(theta, *args, normalizer=norm)
        naive = naive + jax.grad(_loss)(theta, *args) / 4  # per-micro-batch normalisers, averaged
    np.testing.assert_allclose(np.asarray(acc), np.asarray(full), rtol=1e-5, atol=1e-7)
    # the test has teeth: local normalisers (the classic accumulation bug) give a different gradient
    assert np.abs(np.asarray(naive) - np.asarray(full)).max() > 1e-4


@pytest.mark.parametrize("mode", MODES)
def test_sharded_over_8_devices_with_psum_gives_the_full_batch_gradient(mode):
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices")
    theta, feats, old, adv, mask = _grad_setup(seed=1, b=16)
    full = jax.grad(_loss)(theta, feats, old, adv, mask, mode)
    mesh = jax.make_mesh((8,), ("data",))

    @functools.partial(
        jax.shard_map,
        mesh=mesh,
        in_specs=(P(), P("data"), P("data"), P("data"), P("data")),
        out_specs=P(),
    )
    def sharded_loss(theta, feats, old, adv, mask):
        norm = rl.loss_normalizer(mask, mode, alpha=0.75, max_len=M, axis_name="data")
        return jax.lax.psum(_loss(theta, feats, old, adv, mask, mode, normalizer=norm), "data")

    shard = jax.sharding.NamedSharding(mesh, P("data"))
    feats, old, adv, mask = (jax.device_put(x, shard) for x in (feats, old, adv, mask))
    theta = jax.device_put(theta, jax.sharding.NamedSharding(mesh, P()))
    value = jax.jit(sharded_loss)(theta, feats, old, adv, mask)
    grad = jax.jit(jax.grad(sharded_loss))(theta, feats, old, adv, mask)
    np.testing.assert_allclose(
        float(value), float(_loss(theta, feats, old, adv, mask, mode)), rtol=1e-5
    )
    np.testing.assert_allclose(np.asarray(grad), np.asarray(full), rtol=1e-5, atol=1e-7)


# -- ΔL properties -------------------------------------------------------------------------------------


def test_delta_l_weights():
    lengths = jnp.asarray([4.0, 10.0, 0.0, 25.0, 1.0])
    for alpha in (0.0, 0.3, 0.75, 1.0):
        w = np.asarray(rl.delta_l_weights(lengths, alpha))
        assert abs(w.sum() - 1.0) < 1e-6 and w[2] == 0.0
    w1 = np.asarray(rl.delta_l_weights(lengths, 1.0))
    nz = np.asarray(lengths) > 0
    np.testing.assert_allclose(
        w1[nz] * np.asarray(lengths)[nz], (w1[nz] * np.asarray(lengths)[nz])[0], rtol=1e-6
    )
    np.testing.assert_allclose(np.asarray(rl.delta_l_weights(lengths, 0.0))[nz], 0.25, rtol=1e-6)
    with pytest.raises(ValueError, match=r"alpha must lie in \[0, 1\], got 1.5"):
        rl.delta_l_weights(lengths, 1.5)


def test_delta_l_alpha0_is_dr_grpo():
    loss, mask = _batch(3)
    a = rl.aggregate_loss(
        jnp.asarray(loss, jnp.float32), jnp.asarray(mask), "delta_l", alpha=0.0, max_len=M
    )
    b = rl.aggregate_loss(
        jnp.asarray(loss, jnp.float32), jnp.asarray(mask), "seq_mean_token_sum_norm", max_len=M
    )
    np.testing.assert_allclose(float(a), float(b), rtol=1e-6)


def test_delta_l_is_unbiased_and_lowest_variance_at_alpha_1():
    """Per-sequence gradients g_i ~ N(g, V·L_i): Σ x_i g_i is unbiased for every α; α = 1 has the
    smallest variance (the minimum-variance unbiased estimator)."""
    rng = np.random.default_rng(0)
    g, v, b, trials = 1.5, 1.0, 16, 4000
    lengths = rng.integers(5, 400, size=(trials, b)).astype(np.float64)
    noise = rng.normal(size=(trials, b)) * np.sqrt(v * lengths)
    results = {}
    for alpha in (0.0, 0.5, 0.75, 1.0):
        x = np.asarray(
            jax.vmap(lambda L, a=alpha: rl.delta_l_weights(L, a))(
                jnp.asarray(lengths, jnp.float32)
            ),
            np.float64,
        )
        est = (x * (g + noise)).sum(-1)
        se = est.std() / np.sqrt(trials)
        assert abs(est.mean() - g) < 4 * se, (alpha, est.mean(), se)
        results[alpha] = est.var()
    assert results[1.0] == min(results.values())
    assert results[1.0] < 0.8 * results[0.0]


# -- policy loss against numpy -------------------------------------------------------------------------


def _ref_policy_loss(
    logp,
    old,
    adv,
    mask,
    clip_low,
    clip_high,
    dual_clip=None,
    level="token",
    behaviour=None,
    tis_cap=None,
):
    """Per-token loss matrix in float64 numpy."""
    adv = adv[:, None] if adv.ndim == 1 else adv
    if level == "token":
        ratio = np.exp(logp - old)
    else:
        lengths = np.maximum(mask.sum(-1, keepdims=True), 1)
        ratio = np.broadcast_to(
            np.exp(((logp - old) * mask).sum(-1, keepdims=True) / lengths), logp.shape
        )
    loss = np.maximum(-adv * ratio, -adv * np.clip(ratio, 1 - clip_low, 1 + clip_high))
    if dual_clip is not None:
        loss = np.where(adv < 0, np.minimum(loss, -adv * dual_clip), loss)
    if behaviour is not None:
        w = np.exp(old - behaviour)
        loss = loss * (np.minimum(w, tis_cap) if tis_cap is not None else w)
    return loss


CASES = {
    "ppo": dict(),
    "clip_higher": dict(clip_low=0.2, clip_high=0.28),
    "dual_clip": dict(dual_clip=3.0),
    "per_token_adv": dict(per_token=True),
    "tis": dict(behaviour=True, tis_cap=2.0),
    "gspo": dict(level="sequence", clip_low=3e-2, clip_high=4e-2),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("mode", ["token_mean", "seq_mean_token_mean", "delta_l"])
def test_policy_loss_matches_numpy(case, mode):
    spec = dict(CASES[case])
    rng = np.random.default_rng(list(CASES).index(case))  # fixed per case (str hashes are salted)
    b, t = 6, 9
    _, mask = _batch(4, b, t, empty_rows=(3,))
    logp = rng.normal(size=(b, t)) * 0.5 - 2.0
    old = logp + rng.normal(size=(b, t)) * 0.4  # ratios well outside the clip range too
    adv = rng.normal(size=(b, t) if spec.pop("per_token", False) else (b,))
    behaviour = old + rng.normal(size=(b, t)) * 0.8 if spec.pop("behaviour", False) else None
    clip_low, clip_high = spec.pop("clip_low", 0.2), spec.pop("clip_high", 0.2)
    level = spec.pop("level", "token")

    def ours(lp):
        return rl.policy_loss(
            lp,
            jnp.asarray(old, jnp.float32),
            jnp.asarray(adv, jnp.float32),
            jnp.asarray(mask, jnp.float32),
            clip_low=clip_low,
            clip_high=clip_high,
            ratio_level=level,
            agg=mode,
            max_len=M,
            alpha=0.75,
            behaviour_logp=None if behaviour is None else jnp.asarray(behaviour, jnp.float32),
            **spec,
        )

    def ref(lp):
        mat = _ref_policy_loss(
            lp,
            old,
            adv,
            mask,
            clip_low,
            clip_high,
            spec.get("dual_clip"),
            level,
            behaviour,
            spec.get("tis_cap"),
        )
        return _ref_aggregate(mat, mask, mode, alpha=0.75)

    value, metrics = jax.jit(ours)(jnp.asarray(logp, jnp.float32))
    np.testing.assert_allclose(float(value), ref(logp), rtol=1e-5, atol=1e-6)
    # gradient against central finite differences of the float64 reference
    grad = np.asarray(jax.grad(lambda lp: ours(lp)[0])(jnp.asarray(logp, jnp.float32)))
    h = 1e-6
    fd = np.zeros_like(logp)
    for idx in np.ndindex(*logp.shape):
        e = np.zeros_like(logp)
        e[idx] = h
        fd[idx] = (ref(logp + e) - ref(logp - e)) / (2 * h)
    np.testing.assert_allclose(grad, fd, rtol=1e-4, atol=1e-5)
    # metrics
    ratio = np.exp(logp - old)
    m = mask.astype(bool)
    if level == "token":
        np.testing.assert_allclose(float(metrics["ratio_mean"]), ratio[m].mean(), rtol=1e-5)
        np.testing.assert_allclose(float(metrics["ratio_max"]), ratio[m].max(), rtol=1e-5)
    k3 = ratio - 1 - np.log(ratio)
    np.testing.assert_allclose(float(metrics["approx_kl"]), k3[m].mean(), rtol=1e-4)
    assert 0.0 <= float(metrics["clip_frac"]) <= 1.0
    assert float(metrics["clip_frac_low"]) + float(metrics["clip_frac_high"]) == pytest.approx(
        float(metrics["clip_frac"]), abs=1e-6
    )


def test_gspo_equals_the_sequence_level_objective():
    """GSPO-token with sequence-mean aggregation has the value and gradient of GSPO's sequence loss
    (1/B) Σ_i max(-A_i s_i, -A_i clip(s_i)) with s_i = exp(mean_t log r_it)."""
    rng = np.random.default_rng(0)
    b, t = 4, 7
    mask = (np.arange(t)[None] < np.array([[7], [3], [5], [1]])).astype(np.float64)
    logp = rng.normal(size=(b, t)) * 0.3 - 1.0
    old = logp + rng.normal(size=(b, t)) * 0.05
    adv = rng.normal(size=(b,))

    def seq_loss(lp):
        s = np.exp(((lp - old) * mask).sum(-1) / mask.sum(-1))
        return np.mean(np.maximum(-adv * s, -adv * np.clip(s, 1 - 0.03, 1 + 0.04)))

    def ours(lp):
        return rl.policy_loss(
            lp,
            jnp.asarray(old, jnp.float32),
            jnp.asarray(adv, jnp.float32),
            jnp.asarray(mask, jnp.float32),
            clip_low=0.03,
            clip_high=0.04,
            ratio_level="sequence",
            agg="seq_mean_token_mean",
        )[0]

    np.testing.assert_allclose(
        float(ours(jnp.asarray(logp, jnp.float32))), seq_loss(logp), rtol=1e-5
    )
    grad = np.asarray(jax.grad(ours)(jnp.asarray(logp, jnp.float32))) * mask
    h = 1e-6
    fd = np.zeros_like(logp)
    for idx in zip(*np.nonzero(mask)):
        e = np.zeros_like(logp)
        e[idx] = h
        fd[idx] = (seq_loss(logp + e) - seq_loss(logp - e)) / (2 * h)
    np.testing.assert_allclose(grad, fd, rtol=1e-4, atol=1e-6)


# -- KL, entropy, logprobs -----------------------------------------------------------------------------


def test_kl_estimators_match_numpy_and_k3_is_unbiased():
    rng = np.random.default_rng(0)
    logp = rng.normal(size=(4, 6)) - 2
    ref = logp + rng.normal(size=(4, 6)) * 0.3
    log_r = ref - logp
    expected = {"k1": -log_r, "k2": 0.5 * log_r**2, "k3": np.exp(log_r) - 1 - log_r}
    for name, want in expected.items():
        got = np.asarray(
            rl.kl_penalty(jnp.asarray(logp, jnp.float32), jnp.asarray(ref, jnp.float32), name)
        )
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert (np.asarray(rl.kl_penalty(jnp.asarray(logp), jnp.asarray(ref), "k3")) >= 0).all()
    # Monte Carlo: E_p[k1] = E_p[k3] = KL(p || q) for categorical p, q
    p = np.array([0.5, 0.3, 0.2])
    q = np.array([0.2, 0.5, 0.3])
    kl = (p * np.log(p / q)).sum()
    x = rng.choice(3, size=200_000, p=p)
    for name in ("k1", "k3"):
        est = np.asarray(
            rl.kl_penalty(jnp.log(jnp.asarray(p[x])), jnp.log(jnp.asarray(q[x])), name)
        )
        assert abs(est.mean() - kl) < 4 * est.std() / np.sqrt(len(x))


def test_entropy_and_token_logprobs_match_numpy():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(2, 3, 11)) * 3
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    np.testing.assert_allclose(
        np.asarray(rl.entropy_from_logits(jnp.asarray(logits, jnp.float32))),
        -(p * np.log(p)).sum(-1),
        rtol=1e-5,
    )
    tokens = rng.integers(0, 11, size=(2, 3))
    got = np.asarray(rl.token_logprobs(jnp.asarray(logits, jnp.float32), jnp.asarray(tokens)))
    np.testing.assert_allclose(
        got, np.log(np.take_along_axis(p, tokens[..., None], -1)[..., 0]), rtol=1e-5
    )


# -- advantages ----------------------------------------------------------------------------------------


def test_advantages_match_numpy():
    rng = np.random.default_rng(2)
    r = rng.normal(size=(5, 6))
    r[3] = 1.0  # a group with equal rewards
    got = np.asarray(rl.grpo_advantages(jnp.asarray(r, jnp.float32)))
    want = (r - r.mean(-1, keepdims=True)) / (r.std(-1, ddof=1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    assert (got[3] == 0).all()
    np.testing.assert_allclose(
        np.asarray(rl.compute_advantages(jnp.asarray(r, jnp.float32), "dr_grpo")),
        r - r.mean(-1, keepdims=True),
        rtol=1e-5,
        atol=1e-6,
    )
    loo = np.stack([[r[p, i] - np.delete(r[p], i).mean() for i in range(6)] for p in range(5)])
    np.testing.assert_allclose(
        np.asarray(rl.compute_advantages(jnp.asarray(r, jnp.float32), "rloo")),
        loo,
        rtol=1e-5,
        atol=1e-6,
    )
    np.testing.assert_allclose(
        np.asarray(rl.batch_advantages(jnp.asarray(r, jnp.float32), scale_by_std=True)),
        (r - r.mean()) / (r.std(ddof=1) + 1e-6),
        rtol=1e-4,
        atol=1e-5,
    )
    single = rl.grpo_advantages(jnp.ones((3, 1)))
    assert np.isfinite(np.asarray(single)).all() and (np.asarray(single) == 0).all()
    assert (np.asarray(rl.rloo_advantages(jnp.ones((3, 1)))) == 0).all()


# -- registries and input errors -----------------------------------------------------------------------


def test_unknown_names_list_the_known_ones():
    x = jnp.ones((2, 3))
    with pytest.raises(
        ValueError, match="unknown aggregation mode 'mean'; known: delta_l, seq_mean_token_mean"
    ):
        rl.aggregate_loss(x, x, "mean")
    with pytest.raises(ValueError, match="unknown KL estimator 'k4'; known: k1, k2, k3"):
        rl.kl_penalty(x, x, "k4")
    with pytest.raises(
        ValueError, match="unknown advantage estimator 'gae'; known: batch, dr_grpo, grpo, rloo"
    ):
        rl.compute_advantages(x, "gae")
    with pytest.raises(
        ValueError, match="unknown importance-ratio level 'word'; known: sequence, token"
    ):
        rl.policy_loss(x, x, jnp.ones(2), x, ratio_level="word")
    with pytest.raises(ValueError, match="needs max_len"):
        rl.aggregate_loss(x, x, "delta_l")


def test_shape_and_dtype_errors_fail_at_trace_time():
    x = jnp.ones((2, 3))
    with pytest.raises(
        ValueError, match=r"shapes must match, got loss_mat \(2, 3\), mask \(2, 4\)"
    ):
        jax.jit(rl.aggregate_loss)(x, jnp.ones((2, 4)))
    with pytest.raises(ValueError, match=r"advantages \(3,\) must be \[B\] = \(2,\)"):
        rl.policy_loss(x, x, jnp.ones(3), x)
    with pytest.raises(TypeError, match="logp must be a floating-point array, got dtype int32"):
        rl.policy_loss(jnp.ones((2, 3), jnp.int32), x, jnp.ones(2), x)
    with pytest.raises(ValueError, match="dual_clip must be > 1"):
        rl.policy_loss(x, x, jnp.ones(2), x, dual_clip=0.5)
    with pytest.raises(ValueError, match=r"rewards must have rank 2, got shape \(4,\)"):
        rl.grpo_advantages(jnp.ones(4))


def test_losses_compose_with_vmap():
    loss, mask = _batch(5)
    stacked = jnp.stack([jnp.asarray(loss, jnp.float32)] * 3)
    masks = jnp.stack([jnp.asarray(mask, jnp.float32)] * 3)
    out = jax.vmap(lambda lm, m: rl.aggregate_loss(lm, m, "delta_l", max_len=M))(stacked, masks)
    np.testing.assert_allclose(np.asarray(out), _ref_aggregate(loss, mask, "delta_l"), rtol=1e-5)
