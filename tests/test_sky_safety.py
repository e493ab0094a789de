"""The SMI safety net (jaxlab.sky.safety): sky-fibre folds, the blend weight against a float64
brute-force search, and the blend on plates where the learned sky is perfect or plainly wrong."""

from __future__ import annotations

import numpy as np
import pytest

from jaxlab.errors import UserError
from jaxlab.sky import evaluate_sky, simulate_plate, super_sky
from jaxlab.sky.safety import blend_weights, hold_out, safe_sky, sky_fibre_folds


@pytest.fixture(scope="module")
def plate():
    return simulate_plate(11, n_fibers=100, n_sky=22)


def test_folds_are_disjoint_equal_sky_groups(plate):
    folds = sky_fibre_folds(plate, 5, seed=1)
    sky = set(np.nonzero(plate.is_sky)[0])
    assert [len(f) for f in folds] == [4] * 5  # 22 // 5; two sky fibres are never held out
    flat = np.concatenate(folds)
    assert len(set(flat)) == flat.size and set(flat) <= sky
    held = hold_out(plate, folds[0])
    assert held.is_sky.sum() == 18 and not held.is_sky[folds[0]].any()
    assert plate.is_sky.sum() == 22  # the original plate is unchanged
    with pytest.raises(UserError, match="sky fibres"):
        sky_fibre_folds(plate, 30)


def test_blend_weight_matches_brute_force():
    rng = np.random.default_rng(0)
    n, w_pix = 12, 300
    base = rng.uniform(50, 100, (n, w_pix))
    learned = base + rng.normal(0, 5, (n, w_pix))
    truth_w = np.array([0.3, 0.8, 1.7])  # the last band's optimum lies outside [0, 1]
    bands = [np.arange(w_pix) < 100, (np.arange(w_pix) >= 100) & (np.arange(w_pix) < 200)]
    bands.append(np.arange(w_pix) >= 200)
    true = base.copy()
    for m, tw in zip(bands, truth_w):
        true[:, m] += tw * (learned - base)[:, m]
    ivar = 1.0 / true
    flux = true + rng.normal(0, 1, true.shape) * np.sqrt(true)
    got = blend_weights(flux, ivar, learned, base, bands)
    grid = np.linspace(0, 1, 2001)[:, None, None]
    for b, m in enumerate(bands):
        f, iv, lo, hi = flux[:, m], ivar[:, m], base[:, m], learned[:, m]
        cost = np.sum(iv * (f - lo - grid * (hi - lo)) ** 2, axis=(1, 2))
        assert got[b] == pytest.approx(grid[int(np.argmin(cost)), 0, 0], abs=1e-3)
    assert got[2] == 1.0 and abs(got[0] - 0.3) < 0.1 and abs(got[1] - 0.8) < 0.1
    assert blend_weights(flux, ivar, base, base, bands).tolist() == [0.0, 0.0, 0.0]


def test_safe_sky_keeps_a_perfect_sky_and_drops_a_wrong_one(plate):
    ss = super_sky(plate)
    calls = []

    def oracle(p):
        calls.append(int(p.is_sky.sum()))
        return p.true_sky

    sky, rep = safe_sky(plate, oracle, folds=5)
    assert calls == [18] * 5 + [22]  # five folds without their held-out fibres, then the plate
    assert min(rep["weights"]) > 0.8 and rep["fallback_fraction_bands"] == 0.0
    err = evaluate_sky(plate, sky)["sky_error_pct"]["all"]
    assert err < 0.5 * evaluate_sky(plate, ss)["sky_error_pct"]["all"]
    chi = rep["held_out_chi2"]
    assert chi["learned"]["all"] < chi["baseline"]["all"]
    # A learned sky 15 % too bright is rejected in every band: the fitted weights stay small and
    # fall below the floor, and the plate gets Super Sky back exactly.
    sky, rep = safe_sky(plate, lambda p: 1.15 * super_sky(p), folds=5)
    assert max(rep["fitted_weights"]) < 0.1
    assert rep["weights"] == [0.0] * 4 and rep["fallback_fraction_pixels"] == 1.0
    np.testing.assert_array_equal(sky, ss)
