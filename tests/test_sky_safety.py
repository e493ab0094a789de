"""The SMI safety net (jaxlab.sky.safety): sky-fibre folds, the blend weight and the per-band choice
of baseline against float64 brute-force searches, and the net on plates where the learned sky is
perfect or plainly wrong, with Super Sky or PCA cleaning the better baseline."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from scipy import ndimage

from jaxlab.errors import UserError
from jaxlab.sky import evaluate_sky, pca_clean, simulate_plate, super_sky
from jaxlab.sky.safety import (
    _band_masks,
    blend_weights,
    clip_levels,
    cross_validate,
    hold_out,
    safe_sky,
    select_blend,
    sky_fibre_folds,
)


@pytest.fixture(scope="module")
def plate():
    return simulate_plate(11, n_fibers=100, n_sky=22)


@pytest.fixture(scope="module")
def oh_plate():
    """A plate whose OH lines in 6800-7700 A vary by +-50 % from fibre to fibre, off the anchor
    lines Super Sky scales by: PCA cleaning beats Super Sky there (tests/test_sky_sim.py)."""
    p = simulate_plate(3, n_fibers=60, n_sky=20, magnitudes=(19.0, 20.0))
    wave = p.wavelength
    mean_sky = p.true_sky[p.is_sky].astype(np.float64).mean(0)
    lines = np.clip(mean_sky - ndimage.median_filter(mean_sky, 51), 0, None)
    shape = np.where((wave > 6800) & (wave < 7700), lines, 0.0)
    extra = np.random.default_rng(1).normal(0.0, 0.5, p.n_fibers)[:, None] * shape[None]
    truth = (p.true_sky + extra).astype(np.float32)
    q = dataclasses.replace(p, flux=(p.flux + extra).astype(np.float32), true_sky=truth)
    return q, shape > 0


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


def test_select_blend_matches_brute_force():
    """Two baselines and a learned sky; in each band the truth is a different mixture. The choice
    must be the (baseline, weight) pair of least held-out chi^2 over a float64 grid search of both
    baselines and all weights {0} u [0.25, 1]."""
    rng = np.random.default_rng(3)
    n, w_pix = 15, 400
    sky = rng.uniform(50, 150, (n, w_pix))
    a = sky + rng.normal(0, 6, (n, w_pix))  # baseline "a"
    b = sky + rng.normal(0, 6, (n, w_pix))  # baseline "b"
    learned = sky + rng.normal(0, 6, (n, w_pix))
    idx = np.arange(w_pix)
    bands = [(idx >= lo) & (idx < lo + 100) for lo in (0, 100, 200, 300)]
    true = sky.copy()
    # band 0: b exactly; band 1: a + 0.6 (learned - a); band 2: learned; band 3: a + 0.1 (learned - a)
    for m, t in zip(bands, (b, a + 0.6 * (learned - a), learned, a + 0.1 * (learned - a))):
        true[:, m] = t[:, m]
    ivar = 1.0 / true
    flux = true + rng.normal(0, 1, true.shape) * np.sqrt(true)
    sel = select_blend(flux, ivar, learned, {"a": a, "b": b}, bands, min_weight=0.25)
    grid = np.concatenate([[0.0], np.linspace(0.25, 1.0, 3001)])[:, None, None]
    for k, m in enumerate(bands):
        best = None
        for name, base in (("a", a), ("b", b)):
            f, iv, lo, hi = flux[:, m], ivar[:, m], base[:, m], learned[:, m]
            cost = np.sum(iv * (f - lo - grid * (hi - lo)) ** 2, axis=(1, 2)) / iv.size
            j = int(np.argmin(cost))
            if best is None or cost[j] < best[0]:
                best = (cost[j], name, grid[j, 0, 0])
        assert sel["baseline"][k] == best[1], k
        assert sel["weight"][k] == pytest.approx(best[2], abs=1e-3), k
        assert sel["chi2"][best[1]][k] == pytest.approx(best[0], rel=1e-6), k
    assert [sel["baseline"][k] for k in (0, 1, 3)] == ["b", "a", "a"]  # band 2: w = 1, either
    assert sel["weight"][0] == 0.0 and sel["weight"][3] == 0.0  # 0.1 < min_weight: floored
    assert abs(sel["weight"][1] - 0.6) < 0.1 and sel["weight"][2] > 0.9
    # One baseline only: the choice is the plain floored blend weight.
    one = select_blend(flux, ivar, learned, {"a": a}, bands, min_weight=0.25)
    fitted = blend_weights(flux, ivar, learned, a, bands)
    np.testing.assert_array_equal(one["weight"], np.where(fitted < 0.25, 0.0, fitted))


def test_safe_sky_keeps_a_perfect_sky_and_drops_a_wrong_one(plate):
    ss = super_sky(plate)
    calls = []

    def oracle(p):
        calls.append(int(p.is_sky.sum()))
        return p.true_sky

    sky, rep = safe_sky(plate, oracle, folds=5, baselines={"supersky": super_sky})
    assert calls == [18] * 5 + [22]  # five folds without their held-out fibres, then the plate
    assert min(rep["weights"]) > 0.8 and rep["fallback_fraction_bands"] == 0.0
    err = evaluate_sky(plate, sky)["sky_error_pct"]["all"]
    assert err < 0.5 * evaluate_sky(plate, ss)["sky_error_pct"]["all"]
    chi = rep["held_out_chi2"]
    assert chi["learned"]["all"] < chi["supersky"]["all"]
    # A learned sky 15 % too bright is rejected in every band: the fitted weights stay small and
    # fall below the floor, and the plate gets Super Sky back exactly.
    sky, rep = safe_sky(plate, lambda p: 1.15 * super_sky(p), baselines={"supersky": super_sky})
    assert max(rep["fitted_weights"]) < 0.1
    assert rep["weights"] == [0.0] * 4 and rep["fallback_fraction_pixels"] == 1.0
    np.testing.assert_array_equal(sky, ss)


def test_safe_sky_falls_back_to_pca_where_it_beats_super_sky(oh_plate):
    p, lines = oh_plate
    ss, pca = super_sky(p), pca_clean(p)
    wave = p.wavelength
    red = (wave > 7000) & (wave < 7700)

    def err(sky, m):
        obj = ~p.is_sky
        return float(np.abs(sky - p.true_sky)[obj][:, m].sum() / p.true_sky[obj][:, m].sum())

    # The plate is one where PCA is the better baseline (on the varying lines).
    assert err(pca, red & lines) < 0.7 * err(ss, red & lines)
    # A wrong learned sky: every band falls back, the red ones to PCA (the truth says it is better).
    cv = {name: cross_validate(p, f) for name, f in (("supersky", super_sky), ("pca", pca_clean))}
    np.testing.assert_array_equal(cv["pca"].full, pca)
    sky, rep = safe_sky(p, lambda q: 1.15 * super_sky(q), baselines=cv)
    assert rep["weights"] == [0.0] * 4
    assert rep["baselines"][3] == "pca" and rep["baselines"][2] == "pca"
    np.testing.assert_array_equal(sky[:, wave > 5700], pca[:, wave > 5700])
    for k, m in enumerate(_band_masks(wave, (4500.0, 5700.0, 7000.0))):
        chosen = {"supersky": ss, "pca": pca}[rep["baselines"][k]]
        np.testing.assert_array_equal(sky[:, m], chosen[:, m])
    best = min(evaluate_sky(p, s)["sky_error_pct"]["all"] for s in (ss, pca))
    assert evaluate_sky(p, sky)["sky_error_pct"]["all"] <= 1.01 * best
    held = rep["held_out_chi2_bands"]
    assert held["pca"][3] < held["supersky"][3]
    # A learned sky that is right (the truth) wins over both baselines in every band.
    sky, rep = safe_sky(p, lambda q: q.true_sky, baselines=cv)
    assert min(rep["weights"]) > 0.8 and rep["fallback_fraction_bands"] == 0.0
    assert evaluate_sky(p, sky)["sky_error_pct"]["all"] < 0.5 * best


def test_cross_validated_baselines_are_reused_and_checked(plate):
    cv = {"supersky": cross_validate(plate, super_sky, 5, 0)}
    np.testing.assert_array_equal(cv["supersky"].full, super_sky(plate))
    a = safe_sky(plate, lambda p: 1.02 * super_sky(p), baselines=cv)
    b = safe_sky(plate, lambda p: 1.02 * super_sky(p), baselines={"supersky": super_sky})
    np.testing.assert_array_equal(a[0], b[0])
    assert a[1] == b[1]
    with pytest.raises(UserError, match="other folds"):
        safe_sky(plate, lambda p: p.true_sky, baselines=cv, seed=1)


def test_safe_sky_picks_a_level_model_per_band(plate):
    """Several learned skies (e.g. SMI's level models, `smi_level_candidates`): each band keeps the
    candidate whose blend predicts the held-out sky fibres best. Where the first candidate is right
    the result is exactly the single-candidate path; a second candidate right only in the blue
    (the first has a wrong per-fibre blue level there) is taken in the blue band alone."""
    cv = {"supersky": cross_validate(plate, super_sky, 5, 0)}
    wave = plate.wavelength
    blue = wave < 4500.0
    gain = 1.0 + np.random.default_rng(3).normal(0.0, 0.15, plate.n_fibers)

    def truth(p):
        return p.true_sky.astype(np.float64)

    def wrong_blue(p):
        return np.where(blue[None], gain[:, None], 1.0) * truth(p)

    one, rep1 = safe_sky(plate, truth, baselines=cv)
    both, rep = safe_sky(plate, {"as trained": truth, "other": wrong_blue}, baselines=cv)
    assert rep["learned"] == ["as trained"] * 4
    np.testing.assert_array_equal(both, one)
    assert rep["weights"] == rep1["weights"]

    sky, rep = safe_sky(plate, {"as trained": wrong_blue, "level": truth}, baselines=cv)
    assert rep["learned"] == ["level", "as trained", "as trained", "as trained"]
    np.testing.assert_array_equal(sky[:, ~blue], one[:, ~blue])
    worse, _ = safe_sky(plate, wrong_blue, baselines=cv)
    e = [evaluate_sky(plate, s)["sky_error_pct"]["blue"] for s in (sky, worse)]
    assert e[0] < 0.7 * e[1], e


def _clip_levels_loops(plate, sky, ref, edges, nearest):
    """clip_levels by explicit loops over bands and fibres (float64)."""
    out = np.array(sky, np.float64)
    bounds = [-np.inf, *edges, np.inf]
    for lo_w, hi_w in zip(bounds[:-1], bounds[1:]):
        cols = [j for j, w in enumerate(plate.wavelength) if lo_w <= w < hi_w]
        ratio = {
            i: sum(sky[i, j] for j in cols) / sum(ref[i, j] for j in cols) for i in range(len(sky))
        }
        sky_rows = [j for j in range(len(sky)) if plate.is_sky[j]]
        for i in range(len(sky)):
            if not plate.is_sky[i]:
                dist = [
                    float(np.hypot(*(plate.positions[i] - plate.positions[j]))) for j in sky_rows
                ]
                near = [
                    sky_rows[k] for k in np.argsort(dist, kind="stable")[: nearest or len(dist)]
                ]
                sky_ratios = [ratio[j] for j in near]
                new = min(max(ratio[i], min(sky_ratios)), max(sky_ratios))
                for j in cols:
                    out[i, j] = sky[i, j] * new / ratio[i]
    return out


def test_a_runaway_field_at_an_uncovered_edge_is_clipped_to_the_sky_fibres_range():
    """A plate whose sky fibres leave one edge (x < -0.4 plate radii) uncovered, and a learned sky
    that is exact up to the leftmost sky fibre but whose level runs away beyond it, as a field
    fitted to the sky fibres can. Held out, the leftmost sky fibres are beyond the rest and show
    the runaway, so the net takes the candidate whose levels are clipped to the nearest sky
    fibres' range. Without the clipped candidate the safe sky is worse than Super Sky; with it,
    better."""
    p = simulate_plate(5, n_fibers=120, n_sky=30)
    x = p.positions[:, 0] / np.abs(p.positions).max()
    uncovered = x < -0.4
    objtype = np.asarray(p.fibers["OBJTYPE"]).astype("<U16").copy()
    objtype[p.is_sky & uncovered] = "STAR"  # these fibres now hold sky and noise as "objects"
    q = dataclasses.replace(p, fibers=dict(p.fibers, OBJTYPE=objtype))
    assert q.is_sky.sum() >= 15 and (uncovered & ~q.is_sky).sum() >= 15

    def runaway(r):
        field = 1.0 + 0.8 * np.clip(x[r.is_sky].min() - x, 0.0, None)  # up to +48 %
        return r.true_sky.astype(np.float64) * field[:, None]

    ss = super_sky(q)
    rng = np.random.default_rng(0)
    noisy = runaway(q) * rng.uniform(0.9, 1.1, (q.n_fibers, 1))
    edges = (4500.0, 5700.0, 7000.0)
    for nearest in (None, 5):
        clipped, hit = clip_levels(q, noisy, ss, edges, nearest)
        loops = _clip_levels_loops(q, noisy, ss, edges, nearest)
        np.testing.assert_allclose(clipped, loops, rtol=1e-12)
        assert not hit[q.is_sky].any() and hit[uncovered & ~q.is_sky].mean() > 0.5

    def err(sky, m):
        return float(np.abs(sky - q.true_sky)[m].sum() / q.true_sky[m].sum())

    base = {"supersky": super_sky}
    raw, rep_raw = safe_sky(q, runaway, baselines=base, level_reference=None)
    safe, rep = safe_sky(q, runaway, baselines=base)
    # Without the clipped candidate the held-out fibres only lower the weight (~0.75).
    assert rep_raw["learned"] == ["learned"] * 4 and min(rep_raw["weights"]) > 0.5
    assert rep["learned"] == ["learned, clipped"] * 4 and min(rep["weights"]) > 0.9
    edge, obj = uncovered & ~q.is_sky, ~q.is_sky
    assert err(raw, edge) > 2.0 * err(ss, edge)  # the failure: the runaway reaches the objects
    assert err(safe, edge) < err(ss, edge)
    assert err(raw, obj) > err(ss, obj) > 2.0 * err(safe, obj)
    assert rep_raw["level_clipped_fraction"] == {"learned": 0.0}
    assert 0.2 < rep["level_clipped_fraction"]["learned, clipped"] < 0.8
