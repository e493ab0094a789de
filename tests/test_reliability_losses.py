"""Non-finite values at masked positions reach neither the RL losses nor their gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlab import rl

B, T = 4, 7
MODES = sorted(rl.AGGREGATION_MODES.names())


def _batch(seed=0):
    rng = np.random.default_rng(seed)
    mask = (rng.random((B, T)) < 0.6).astype(np.float32)
    mask[2] = 0.0  # an empty row
    logp = -rng.random((B, T)).astype(np.float32) * 2
    old = logp + 0.3 * rng.standard_normal((B, T)).astype(np.float32)
    behaviour = old + 0.1 * rng.standard_normal((B, T)).astype(np.float32)
    adv = rng.standard_normal((B, T)).astype(np.float32)
    return mask, logp, old, behaviour, adv


def _poison(x, mask, values=(np.nan, -np.inf, np.inf)):
    x = x.copy()
    idx = np.argwhere(mask == 0)
    for k, (i, j) in enumerate(idx):
        x[i, j] = values[k % len(values)]
    return x


def _reference_token_mean(logp, old, adv, mask, clip_low, clip_high):
    """PPO clipped surrogate, token_mean, in float64 over the masked-in tokens only."""
    sel = mask.astype(bool)
    ratio = np.exp(logp[sel].astype(np.float64) - old[sel])
    a = adv[sel].astype(np.float64)
    loss = np.maximum(-a * ratio, -a * np.clip(ratio, 1 - clip_low, 1 + clip_high))
    return loss.sum() / sel.sum()


@pytest.mark.parametrize("mode", MODES)
def test_aggregate_loss_ignores_nan_and_inf_at_masked_positions(mode):
    mask, logp, *_ = _batch()
    kw = {"max_len": float(T), "alpha": 0.5}

    def f(x):
        return rl.aggregate_loss(x, jnp.asarray(mask), mode, **kw)

    clean_loss, clean_grad = jax.value_and_grad(f)(jnp.asarray(logp))
    loss, grad = jax.value_and_grad(f)(jnp.asarray(_poison(logp, mask)))
    assert np.isfinite(float(loss)) and np.isfinite(np.asarray(grad)).all()
    assert float(loss) == float(clean_loss)
    np.testing.assert_array_equal(np.asarray(grad), np.asarray(clean_grad))
    np.testing.assert_array_equal(np.asarray(grad)[mask == 0], 0.0)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
def test_policy_loss_ignores_nan_and_inf_at_masked_positions(mode, ratio_level):
    mask, logp, old, behaviour, adv = _batch(1)

    def f(x, old, behaviour, adv):
        return rl.policy_loss(
            x,
            jnp.asarray(old),
            jnp.asarray(adv),
            jnp.asarray(mask),
            clip_low=0.2,
            clip_high=0.28,
            dual_clip=3.0,
            ratio_level=ratio_level,
            behaviour_logp=jnp.asarray(behaviour),
            agg=mode,
            max_len=float(T),
        )

    grad_fn = jax.value_and_grad(f, has_aux=True)
    (clean, clean_m), clean_g = grad_fn(jnp.asarray(logp), old, behaviour, adv)
    poisoned = [_poison(x, mask) for x in (logp, old, behaviour, adv)]
    (loss, metrics), g = grad_fn(jnp.asarray(poisoned[0]), *poisoned[1:])
    assert np.isfinite(np.asarray(g)).all()
    assert float(loss) == float(clean)
    np.testing.assert_array_equal(np.asarray(g), np.asarray(clean_g))
    for key, value in clean_m.items():
        assert float(metrics[key]) == float(value), key


def test_policy_loss_value_against_float64_reference_with_poisoned_padding():
    mask, logp, old, _, adv = _batch(2)
    loss, _ = rl.policy_loss(
        jnp.asarray(_poison(logp, mask)),
        jnp.asarray(_poison(old, mask)),
        jnp.asarray(_poison(adv, mask)),
        jnp.asarray(mask),
        clip_low=0.2,
        clip_high=0.28,
        tis_cap=None,
    )
    want = _reference_token_mean(logp, old, adv, mask, 0.2, 0.28)
    np.testing.assert_allclose(float(loss), want, rtol=1e-6)


@pytest.mark.parametrize("shape", [(0, 5), (3, 0), (0, 0)])
def test_empty_batches_give_zero_in_policy_loss_as_in_aggregate_loss(shape):
    zeros = jnp.zeros(shape, jnp.float32)
    for mode in MODES:
        agg = rl.aggregate_loss(zeros, zeros, mode, max_len=4.0)
        loss, metrics = rl.policy_loss(
            zeros, zeros, jnp.zeros(shape[:1]), zeros, agg=mode, max_len=4.0
        )
        assert float(agg) == 0.0 and float(loss) == 0.0
        assert all(np.isfinite(float(v)) for v in metrics.values())
        assert float(metrics["ratio_min"]) == 1.0 and float(metrics["ratio_max"]) == 1.0
