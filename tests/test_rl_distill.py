"""Self-distillation losses against float64 numpy references and finite differences; exactness
under micro-batching; IS clipping; mixing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlab import rl
from jaxlab.rl import distill

B, T, V = 3, 5, 7
TEMP = 0.8


def _np_logsoftmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _np_kl(p, q):
    """KL(p ‖ q) over the last axis from probabilities (float64)."""
    return np.sum(np.where(p > 0, p * (np.log(np.where(p > 0, p, 1)) - np.log(q)), 0.0), -1)


def _np_div(ps, pt, alpha):
    """D_α from its definition: α=0 KL(T‖S), α=1 KL(S‖T), else α KL(T‖M) + (1-α) KL(S‖M)."""
    if alpha == 0:
        return _np_kl(pt, ps)
    if alpha == 1:
        return _np_kl(ps, pt)
    m = alpha * pt + (1 - alpha) * ps
    return alpha * _np_kl(pt, m) + (1 - alpha) * _np_kl(ps, m)


def _np_token_losses(s_logits, t_logits, tokens, mode, alpha, k, add_tail, ratio_at=None):
    """Float64 per-token losses [B, T]. ``ratio_at``: student logits at which the sampled-token
    coefficient sg(log π_s − log π_T) is frozen (the stop-gradient, for finite differences)."""
    ps = np.exp(_np_logsoftmax(s_logits / TEMP))
    pt = np.exp(_np_logsoftmax(t_logits / TEMP))
    if mode == "sampled_token":
        ls = np.log(np.take_along_axis(ps, tokens[..., None], -1)[..., 0])
        lt = np.log(np.take_along_axis(pt, tokens[..., None], -1)[..., 0])
        base = (
            ls
            if ratio_at is None
            else np.log(
                np.take_along_axis(np.exp(_np_logsoftmax(ratio_at / TEMP)), tokens[..., None], -1)[
                    ..., 0
                ]
            )
        )
        return (base - lt) * ls
    if mode == "topk":
        ref = ps if ratio_at is None else np.exp(_np_logsoftmax(ratio_at / TEMP))
        idx = np.argsort(-ref, axis=-1, kind="stable")[..., :k]
        s = np.take_along_axis(ps, idx, -1)
        t = np.take_along_axis(pt, idx, -1)
        if add_tail:
            s = np.concatenate([s, 1 - s.sum(-1, keepdims=True)], -1)
            t = np.concatenate([t, 1 - t.sum(-1, keepdims=True)], -1)
        else:
            s, t = s / s.sum(-1, keepdims=True), t / t.sum(-1, keepdims=True)
        return _np_div(s, t, alpha)
    return _np_div(ps, pt, alpha)


def _np_agg(loss, mask, mode, max_len=9.0, alpha=1.0):
    lengths = mask.sum(-1)
    sums = (loss * mask).sum(-1)
    ne = lengths > 0
    if mode == "token_mean":
        return sums.sum() / lengths.sum()
    if mode == "seq_mean_token_mean":
        return (sums[ne] / lengths[ne]).mean()
    if mode == "delta_l":
        w = np.where(ne, np.maximum(lengths, 1) ** -alpha, 0)
        return (w / w.sum() * sums).sum() / max_len
    raise KeyError(mode)


def _data(seed=0):
    rng = np.random.default_rng(seed)
    s = rng.normal(size=(B, T, V)) * 1.5
    t = rng.normal(size=(B, T, V)) * 1.5
    tokens = rng.integers(0, V, size=(B, T))
    mask = (np.arange(T)[None] < np.array([[5], [2], [4]])).astype(np.float64)
    behaviour = np.log(rng.uniform(0.05, 0.9, size=(B, T)))
    return s, t, tokens, mask, behaviour


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.5, 1.0])
def test_generalized_jsd_matches_definition(alpha):
    s, t, *_ = _data(1)
    ls, lt = _np_logsoftmax(s), _np_logsoftmax(t)
    ours = np.asarray(
        distill.generalized_jsd(jnp.asarray(ls, jnp.float32), jnp.asarray(lt, jnp.float32), alpha)
    )
    np.testing.assert_allclose(ours, _np_div(np.exp(ls), np.exp(lt), alpha), rtol=1e-4, atol=1e-6)
    assert (ours >= -1e-6).all()
    same = distill.generalized_jsd(
        jnp.asarray(ls, jnp.float32), jnp.asarray(ls, jnp.float32), alpha
    )
    np.testing.assert_allclose(np.asarray(same), 0.0, atol=1e-6)
    if alpha == 0.5:  # the symmetric Jensen–Shannon divergence, bounded by log 2
        assert (ours <= np.log(2) + 1e-6).all()


def test_tail_bucket_and_full_topk_equal_full():
    s, t, tokens, mask, _ = _data(2)
    lp = _np_logsoftmax(s)[..., :3]
    ours = np.asarray(distill.add_tail_bucket(jnp.asarray(lp, jnp.float32)))
    np.testing.assert_allclose(np.exp(ours).sum(-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(ours[..., :3], lp, rtol=1e-6)
    args = [jnp.asarray(x, jnp.float32) for x in (s, t)] + [jnp.asarray(tokens)]
    full, *_ = distill.distill_token_losses(*args, mode="full", alpha=0.5)
    topv, *_ = distill.distill_token_losses(*args, mode="topk", topk=V, add_tail=False, alpha=0.5)
    np.testing.assert_allclose(np.asarray(topv), np.asarray(full), rtol=1e-5, atol=1e-7)


CASES = [
    dict(mode="full", alpha=0.0, agg="token_mean"),
    dict(mode="full", alpha=0.5, agg="seq_mean_token_mean", is_clip=2.0),
    dict(mode="full", alpha=1.0, agg="delta_l"),
    dict(mode="topk", alpha=0.5, topk=3, add_tail=True, agg="token_mean", is_clip=1.5),
    dict(mode="topk", alpha=0.2, topk=4, add_tail=False, agg="seq_mean_token_mean"),
    dict(mode="sampled_token", alpha=1.0, agg="token_mean", is_clip=2.0),
    dict(mode="sampled_token", alpha=1.0, agg="delta_l"),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_distillation_loss_value_and_gradient(case):
    s, t, tokens, mask, behaviour = _data(3)
    mode, alpha, agg = case["mode"], case["alpha"], case["agg"]
    k, tail, clip = case.get("topk", 20), case.get("add_tail", True), case.get("is_clip")
    kw = dict(max_len=9.0, agg_alpha=0.5) if agg == "delta_l" else {}

    def ours(sl):
        loss, metrics = distill.distillation_loss(
            sl, jnp.asarray(t, jnp.float32), jnp.asarray(tokens), jnp.asarray(mask, jnp.float32),
            mode=mode, alpha=alpha, topk=k, add_tail=tail, temperature=TEMP,
            behaviour_logp=jnp.asarray(behaviour, jnp.float32), is_clip=clip, agg=agg, **kw,
        )  # fmt: skip
        return loss, metrics

    def ref(sl, frozen):
        mat = _np_token_losses(sl, t, tokens, mode, alpha, k, tail, ratio_at=frozen)
        if clip is not None:  # the IS weight carries no gradient: taken at the frozen point
            ls = np.take_along_axis(_np_logsoftmax(frozen / TEMP), tokens[..., None], -1)[..., 0]
            mat = mat * np.minimum(np.exp(np.clip(ls - behaviour, -20, 20)), clip)
        return _np_agg(mat, mask, agg, alpha=0.5)

    fn = jax.jit(jax.value_and_grad(ours, has_aux=True))
    (value, metrics), grad = fn(jnp.asarray(s, jnp.float32))
    np.testing.assert_allclose(float(value), ref(s, s), rtol=1e-5, atol=1e-6)
    h = 1e-6
    fd = np.zeros_like(s)
    for idx in np.ndindex(*s.shape):
        e = np.zeros_like(s)
        e[idx] = h
        fd[idx] = (ref(s + e, s) - ref(s - e, s)) / (2 * h)
    np.testing.assert_allclose(np.asarray(grad), fd, rtol=1e-4, atol=1e-5)
    assert float(metrics["distill_tokens"]) == mask.sum()
    if clip is not None:
        assert 0 < float(metrics["is_weight_mean"]) <= clip


def test_sampled_token_is_the_reverse_kl_gradient_in_expectation():
    """Σ_y π_s(y) ∇ℓ(y) = ∇ KL(π_s ‖ π_T) (enumerating every token of one position)."""
    rng = np.random.default_rng(4)
    s, t = rng.normal(size=(1, 1, V)), rng.normal(size=(1, 1, V))
    tokens = jnp.arange(V, dtype=jnp.int32).reshape(V, 1)

    def per_token(sl):  # every token y as its own row
        rows = jnp.broadcast_to(sl, (V, 1, V))
        mat, *_ = distill.distill_token_losses(
            rows, jnp.broadcast_to(jnp.asarray(t, jnp.float32), (V, 1, V)), tokens,
            mode="sampled_token", alpha=1.0, temperature=1.0,
        )  # fmt: skip
        return mat[:, 0]

    ps = np.exp(_np_logsoftmax(s))[0, 0]
    jac = np.asarray(jax.jacobian(per_token)(jnp.asarray(s, jnp.float32)))[:, 0, 0]  # [V(y), V]
    expected_grad = (ps[:, None] * jac).sum(0)

    def kl(x):
        return _np_kl(np.exp(_np_logsoftmax(x)), np.exp(_np_logsoftmax(t)))[0, 0]

    h = 1e-6
    fd = np.array(
        [(kl(s + h * np.eye(V)[j]) - kl(s - h * np.eye(V)[j])) / (2 * h) for j in range(V)]
    )
    np.testing.assert_allclose(expected_grad, fd, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("agg", ["token_mean", "delta_l"])
def test_micro_batches_add_up_to_the_full_batch(agg):
    """Two micro-batches with the optimisation batch's normaliser: losses and gradients add up to
    the full batch's (ΔL's normaliser spans the batch, so its pieces differ from their own)."""
    s, t, tokens, mask, behaviour = _data(5)
    s, t, tokens, behaviour = (np.concatenate([x, x[:1]]) for x in (s, t, tokens, behaviour))
    mask = np.concatenate([mask, [[1, 1, 1, 0, 0]]])  # 4 rows, of lengths 5, 2, 4, 3
    kw = dict(max_len=9.0) if agg == "delta_l" else {}
    norm = rl.loss_normalizer(jnp.asarray(mask, jnp.float32), agg, alpha=0.5, **kw)

    @jax.jit
    def piece(sl, tl, tok, m, beh):
        return jax.value_and_grad(
            lambda x: distill.distillation_loss(
                x, tl, tok, m, mode="topk", topk=3, alpha=0.5, behaviour_logp=beh, is_clip=2.0,
                agg=agg, normalizer=norm, agg_alpha=0.5, **kw,
            )[0]
        )(sl)  # fmt: skip

    def run(r):
        return piece(*(jnp.asarray(x[r]) for x in (s.astype(np.float32), t.astype(np.float32),
                                                    tokens, mask.astype(np.float32),
                                                    behaviour.astype(np.float32))))  # fmt: skip

    full, g_full = run(slice(0, 4))
    a, g_a = run(slice(0, 2))
    b, g_b = run(slice(2, 4))
    np.testing.assert_allclose(float(a + b), float(full), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(
        np.concatenate([np.asarray(g_a), np.asarray(g_b)]), np.asarray(g_full), rtol=1e-5, atol=1e-8
    )


def test_is_clip_weights_hand_worked():
    s = jnp.log(jnp.asarray([[0.5, 0.2, 0.9, 1e-30]], jnp.float32))
    b = jnp.log(jnp.asarray([[0.25, 0.4, 0.3, 1.0]], jnp.float32))
    # ratios 2, 0.5, 3, 1e-30 (log-ratio clamped at -20: exp(-20))
    w = np.asarray(distill.is_clip_weights(s, b, 2.5))
    np.testing.assert_allclose(w, [[2.0, 0.5, 2.5, np.exp(-20.0)]], rtol=1e-5)
    g = jax.grad(lambda x: jnp.sum(distill.is_clip_weights(x, b, 2.5)))(s)
    assert (np.asarray(g) == 0).all()  # no gradient through the weights
    with pytest.raises(ValueError, match="is_clip"):
        distill.is_clip_weights(s, b, 0.0)


def test_mix_losses_and_argument_checks():
    p, d = jnp.float32(2.0), jnp.float32(6.0)
    assert float(distill.mix_losses(p, d, 0.25)) == pytest.approx(0.75 * 2 + 0.25 * 6)
    assert (
        float(distill.mix_losses(p, d, 0.0)) == 2.0 and float(distill.mix_losses(p, d, 1.0)) == 6.0
    )
    with pytest.raises(ValueError, match="weight"):
        distill.mix_losses(p, d, 1.5)
    s, t, tokens, mask, _ = _data(6)
    args = [jnp.asarray(x, jnp.float32) for x in (s, t)] + [jnp.asarray(tokens)]
    with pytest.raises(ValueError, match="alpha = 1"):
        distill.distill_token_losses(*args, mode="sampled_token", alpha=0.5)
    with pytest.raises(Exception, match="distillation mode"):
        distill.distill_token_losses(*args, mode="nope")
    with pytest.raises(ValueError, match="behaviour_logp"):
        distill.distillation_loss(*args, jnp.asarray(mask), is_clip=2.0)
