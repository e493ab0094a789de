"""The plate simulator, the pipeline baselines and the metrics of jaxlab.sky.

Every expectation comes from an independent reference: float64 numpy brute force written out here,
or a physics identity of the documented forward model (flux = Poisson(t E [sky + obj]) + N(0, RN^2),
shifts in Angstrom, LSF FWHM = lambda / R). No number below was copied from the library's output;
each tolerance is derived in the comment next to it.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from scipy import ndimage

from jaxlab.sky import baselines, metrics, simulate
from jaxlab.sky.plate import Plate

N_FIBERS, N_SKY = 40, 8
RESOLUTION = 1800.0
READ_NOISE = 3.5
PLATE_RADIUS_MM = 875.0
SPLIT = 4500.0  # Angstrom: blue < SPLIT <= red (docs of jaxlab.sky.metrics)
# The anchor lines of baselines.line_fluxes (vacuum Angstrom), restated for the brute force.
ANCHORS = (4047.7, 4359.6, 5462.3, 5578.9, 5891.6, 6302.0, 6365.5, 7915.9, 8346.9, 8401.5)
ANCHORS += (8829.5, 8888.2)
HAS_PARANAL = simulate.paranal_sky_path() is not None


def lamost_grid() -> np.ndarray:
    """LAMOST's grid, computed here: 10**(log10(3690) + 1e-4 k), k < 3909 (float64)."""
    return 10.0 ** (np.log10(3690.0) + 1e-4 * np.arange(3909, dtype=np.float64))


def air_to_vacuum(lam_air: float) -> float:
    """Vacuum wavelength (Angstrom) of an air wavelength: IAU standard (Morton 2000), iterated."""
    vac = lam_air
    for _ in range(6):
        s2 = (1e4 / vac) ** 2
        vac = lam_air * (1 + 8.34254e-5 + 2.406147e-2 / (130 - s2) + 1.5998e-4 / (38.9 - s2))
    return vac


def line_profile(wave: np.ndarray, y: np.ndarray, line: float, half: float, side: float):
    """(core wavelengths [C], continuum-subtracted core [..., C]) of one emission line, float64.

    The continuum is the straight line through the sideband means (half < |dlam| <= half + side):
    exact for the simulator's continua, which are smooth on 10 A scales.
    """
    y = np.asarray(y, np.float64)
    core = np.abs(wave - line) <= half
    left = (wave < line - half) & (wave >= line - half - side)
    right = (wave > line + half) & (wave <= line + half + side)
    xl, xr = wave[left].mean(), wave[right].mean()
    yl, yr = y[..., left].mean(-1), y[..., right].mean(-1)
    cont = yl[..., None] + (yr - yl)[..., None] * (wave[core] - xl) / (xr - xl)
    return wave[core], y[..., core] - cont


def centroid(wave: np.ndarray, y: np.ndarray, line: float, half: float = 6.0, side: float = 8.0):
    """Flux-weighted centroid [...] of the continuum-subtracted line (Angstrom)."""
    lam, prof = line_profile(wave, y, line, half, side)
    return (prof * lam).sum(-1) / prof.sum(-1)


def sim(seed: int, **overrides) -> Plate:
    kw = {"n_fibers": N_FIBERS, "n_sky": N_SKY, **overrides}
    return simulate.simulate_plate(seed, **kw)


@pytest.fixture(scope="module")
def plate() -> Plate:
    return sim(1)


@pytest.fixture(scope="module")
def faint_plate() -> Plate:
    """Objects much fainter than the sky (r = 20-21 vs sky ~18.7 mag): the sky sets the noise."""
    return sim(7, n_sky=10, magnitudes=(20.0, 21.0))


def replace(plate: Plate, **changes) -> Plate:
    return dataclasses.replace(plate, **changes)


# --------------------------------------------------------------------------------------------
# Simulator
# --------------------------------------------------------------------------------------------


def test_grid_is_lamost(plate: Plate) -> None:
    want = lamost_grid()
    assert plate.n_pix == 3909 and plate.flux.shape == (N_FIBERS, 3909)
    # Same float64 formula on the same coefficients: equal up to the last bit (a few ulp allowed).
    np.testing.assert_allclose(plate.wavelength, want, rtol=4e-16, atol=0)
    assert abs(plate.wavelength[0] - 3690.0) < 1e-9
    assert 9074.0 < plate.wavelength[-1] < 9075.0
    for name in ("flux", "ivar", "true_sky", "true_object"):
        assert getattr(plate, name).dtype == np.float32
    assert plate.mask.dtype == np.int32 and not plate.mask.any()


def test_same_seed_same_plate_other_seed_differs() -> None:
    a, b, c = sim(5), sim(5), sim(6)
    for name in ("flux", "ivar", "true_sky", "true_object"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
        assert not np.array_equal(getattr(a, name), getattr(c, name))
    for col, values in a.fibers.items():
        np.testing.assert_array_equal(values, b.fibers[col])
    assert a.meta == b.meta
    assert not np.array_equal(a.fibers["TRUE_SHIFT"], c.fibers["TRUE_SHIFT"])


def test_noise_model_poisson_plus_read_noise(plate: Plate) -> None:
    model = plate.true_sky.astype(np.float64) + plate.true_object.astype(np.float64)
    assert model.min() > 0
    # IVAR is the exact inverse of the Poisson + read-noise variance (float64, rounded to float32).
    want = (1.0 / (model + READ_NOISE**2)).astype(np.float32)
    np.testing.assert_array_equal(plate.ivar, want)
    # E[(flux - model)^2] = model + RN^2 for Poisson(model) + N(0, RN^2): the mean chi^2 over all
    # F x W pixels is 1 up to sampling noise; 5 standard errors of the mean (std of the chi^2
    # values / sqrt(N), N = 156k: ~0.004) is a < 1e-6 false-alarm bound.
    chi2 = (plate.flux.astype(np.float64) - model) ** 2 * plate.ivar.astype(np.float64)
    tol = 5 * chi2.std() / np.sqrt(chi2.size)
    assert abs(chi2.mean() - 1.0) < tol, (chi2.mean(), tol)
    # Same in the blue (low counts, where read noise matters) and the red half.
    blue = plate.wavelength < SPLIT
    for sel in (blue, ~blue):
        c = chi2[:, sel]
        assert abs(c.mean() - 1.0) < 5 * c.std() / np.sqrt(c.size)
    # Residuals are symmetric: the mean pull is 0 within 5 standard errors (1 / sqrt(N)).
    pull = (plate.flux - model) * np.sqrt(plate.ivar.astype(np.float64))
    assert abs(pull.mean()) < 5 / np.sqrt(pull.size)


def test_fibre_table_and_truth_layers(plate: Plate) -> None:
    fib = plate.fibers
    objtype = np.asarray(fib["OBJTYPE"]).astype(str)
    sky = objtype == "SKY"
    assert sky.sum() == N_SKY
    np.testing.assert_array_equal(plate.is_sky, sky)
    assert set(objtype[~sky]) <= {"STAR", "GALAXY"}
    np.testing.assert_array_equal(fib["FIBERID"], np.arange(1, N_FIBERS + 1))
    assert np.all(np.hypot(fib["X"], fib["Y"]) <= PLATE_RADIUS_MM)
    np.testing.assert_array_equal(fib["SPID"], 1)  # fewer than 250 fibres: one spectrograph
    assert np.all(plate.true_object[sky] == 0)
    assert np.all(plate.true_object[~sky] > 0)
    assert np.all(plate.true_sky > 0)
    assert np.all(np.isnan(fib["MAG"][sky])) and np.all(np.isfinite(fib["MAG"][~sky]))
    t = fib["TRUE_THROUGHPUT"]
    assert np.all((t >= 0.5) & (t <= 1.5))
    plate.validate()
    # A bigger plate: a second spectrograph starts at fibre 251.
    big = simulate.simulate_plate(0, n_fibers=260, n_sky=20, sky_source="parametric")
    np.testing.assert_array_equal(big.fibers["SPID"], np.repeat([1, 2], [250, 10]))
    assert np.asarray(big.fibers["OBJTYPE"] == "SKY").sum() == 20


def test_shifts_move_sky_lines_in_angstrom(plate: Plate) -> None:
    """[O I] 5578.9 in TRUE_SKY moves with TRUE_SHIFT, one Angstrom per Angstrom."""
    cen = centroid(plate.wavelength, plate.true_sky, 5578.9)
    shift = plate.fibers["TRUE_SHIFT"]
    dc, ds = cen - cen.mean(), shift - shift.mean()
    # Noiseless truth: a pure shift moves the centroid of a line isolated in a +-6 A window
    # (+-4.4 sigma) one-to-one; pixel sampling of the R = 1800 profile (sigma ~ 1 px) biases a
    # centroid by << 1 % of a sub-pixel shift, so 3 % on the slope and 0.95 on the correlation
    # still catch shifts in pixels (x 1.28) or in log units.
    assert np.corrcoef(dc, ds)[0, 1] > 0.95
    slope = (dc * ds).sum() / (ds * ds).sum()
    assert abs(slope - 1.0) < 0.03, slope
    assert np.std(ds) > 0.05  # the test has something to measure (~0.1 A per fibre)


def sky_sources(with_pypeit: str) -> list:
    """The parametric sky, and `with_pypeit` where the pypeit Paranal spectrum is installed."""
    skip = pytest.mark.skipif(not HAS_PARANAL, reason="no pypeit")
    return ["parametric", pytest.param(with_pypeit, marks=skip)]


@pytest.mark.parametrize("source", sky_sources("paranal"))
def test_sky_lines_at_vacuum_wavelengths(source: str) -> None:
    """Isolated lines sit at their laboratory vacuum wavelengths (converted from air here)."""
    p = sim(2, sky_source=source)
    assert p.meta["SKYSRC"] == source
    shift = p.fibers["TRUE_SHIFT"]
    # [O I] 5577, 6300, 6364 (airglow) and Hg I 4358, 5461 (light pollution); Hg I 4047 only on
    # the parametric sky (the Paranal spectrum has features of its own next to it).
    lines = (5577.339, 6300.304, 6363.776, 4358.34, 5460.74)
    for lam_air in lines + ((4046.56,) if source == "parametric" else ()):
        vac = air_to_vacuum(lam_air)
        cen = centroid(p.wavelength, p.true_sky, vac, half=3.5, side=5.0)
        # Air and vacuum differ by 1.1-1.8 A here; 0.15 A covers the centroid bias of the
        # +-3.5 A window (blends, continuum) while telling vacuum from air by > 7 x.
        err = cen - shift - vac
        assert np.all(np.abs(err) < 0.15), (lam_air, err)
    # The strongest line above the continuum between 5000 and 6000 A is [O I] 5577.
    wave = p.wavelength
    band = (wave > 5000) & (wave < 6000)
    row = p.true_sky[np.nonzero(p.is_sky)[0][0]].astype(np.float64)
    excess = row - ndimage.median_filter(row, 61)
    peak = wave[band][np.argmax(excess[band])]
    assert abs(peak - air_to_vacuum(5577.339)) < 1.5  # within about one pixel


def test_throughput_scales_the_sky() -> None:
    # Line flux of fibre i = t_i * g(x_i) * const, with g a smooth field of peak-to-peak ~8 %
    # (sd ~2 %) and t_i ~ N(1, 0.04): corr(line flux, t) ~ 0.04 / hypot(0.04, 0.02) ~ 0.9. With
    # 100 fibres the sampling sd of the correlation is ~0.02-0.05 (Fisher z), so 0.75 is > 3 sd.
    p = sim(3, n_fibers=100, n_sky=10)
    _, prof = line_profile(p.wavelength, p.true_sky, 5578.9, 6.0, 8.0)
    ratio = prof.sum(-1) / np.median(prof.sum(-1))
    t = p.fibers["TRUE_THROUGHPUT"]
    assert np.corrcoef(ratio, t)[0, 1] > 0.75
    # Stronger, with the parametric sky (the 5577 group holds one Gaussian line): the ratio is
    # exactly t_i times the quadratic field 1 + a x + b y + c r^2, so a least-squares fit on
    # t * [1, x, y, r^2] leaves only float32 rounding and the efficiency slope across the
    # per-fibre shifts (2.8e-4 / A x ~0.3 A): 5e-4 absolute.
    p = sim(3, n_fibers=100, n_sky=10, sky_source="parametric")
    _, prof = line_profile(p.wavelength, p.true_sky, 5578.9, 6.0, 8.0)
    ratio = prof.sum(-1) / np.median(prof.sum(-1))
    t = p.fibers["TRUE_THROUGHPUT"]
    xy = p.positions / PLATE_RADIUS_MM
    design = t[:, None] * np.column_stack([np.ones(len(t)), xy, (xy**2).sum(-1)])
    coef, *_ = np.linalg.lstsq(design, ratio, rcond=None)
    assert np.max(np.abs(design @ coef - ratio)) < 5e-4
    # ...while leaving the throughput out of the model does not fit (the test has teeth).
    coef, *_ = np.linalg.lstsq(design / t[:, None], ratio, rcond=None)
    assert np.max(np.abs(design / t[:, None] @ coef - ratio)) > 0.03


@pytest.mark.parametrize("source", sky_sources("auto"))
def test_line_width_is_the_resolution(source: str) -> None:
    p = sim(4, sky_source=source)
    lam0 = 5578.9
    lam, prof = line_profile(p.wavelength, p.true_sky, lam0, 6.0, 8.0)
    mean = (prof * lam).sum(-1, keepdims=True) / prof.sum(-1, keepdims=True)
    var = (prof * (lam - mean) ** 2).sum(-1) / prof.sum(-1)
    # Gaussian LSF of FWHM lam / R integrated over pixels of width lam ln(10) 1e-4: second moment
    # sigma_lsf^2 + dpix^2 / 12 (the box's variance). FWHM = 2 sqrt(2 ln 2) sigma ~ 3.22 A.
    k = 2.0 * np.sqrt(2.0 * np.log(2.0))
    sigma_lsf = lam0 / RESOLUTION / k
    dpix = lam0 * np.log(10.0) * 1e-4
    want = k * np.sqrt(sigma_lsf**2 + dpix**2 / 12)
    assert 3.1 < want < 3.3
    # 3 %: the +-6 A window cuts the wings at 4.4 sigma (-0.1 % of the variance), and the Paranal
    # spectrum's own width (R ~ 10^4) adds ~0.1 %; a FWHM/sigma mix-up would be off by 2.35 x and
    # no pixel-binning term by 4 %.
    np.testing.assert_allclose(k * np.sqrt(var), want, rtol=0.03)


def test_sky_sources() -> None:
    param = sim(0, sky_source="parametric")
    assert param.meta["SKYSRC"] == "parametric"
    auto = sim(0)
    assert auto.meta["SKYSRC"] == ("paranal" if HAS_PARANAL else "parametric")
    if HAS_PARANAL:
        assert sim(0, sky_source="paranal").meta["SKYSRC"] == "paranal"
        # Different base skies, same random draws for everything else.
        assert not np.allclose(param.true_sky, auto.true_sky)
        np.testing.assert_array_equal(param.fibers["TRUE_SHIFT"], auto.fibers["TRUE_SHIFT"])
    else:
        with pytest.raises(FileNotFoundError):
            sim(0, sky_source="paranal")
    # Parametric continuum at 5500 A: sky_level (60 e-) x efficiency (0.12 + 0.88 exp(-0.5 (1000 /
    # 1700)^2) = 0.86) x (1 + moon), moon in [0.3, 2] -> [67, 155] e-, times throughput and fields
    # within ~10 % of 1 (median over fibres): inside [50, 180].
    wave = param.wavelength
    j = np.argmin(np.abs(wave - 5500.0))
    assert 50.0 < np.median(param.true_sky[:, j]) < 180.0


@pytest.mark.parametrize("n_sky", [0, -1, N_FIBERS, N_FIBERS + 5])
def test_invalid_n_sky(n_sky: int) -> None:
    with pytest.raises(ValueError, match="n_sky"):
        sim(0, n_sky=n_sky)


# --------------------------------------------------------------------------------------------
# Baselines
# --------------------------------------------------------------------------------------------


def constant_sky_plate(plate: Plate, spectra: np.ndarray) -> Plate:
    """`plate` with noiseless `spectra` [F, W] as flux, no mask, no truth, and equal weights.

    ivar = 1e-6 (sigma = 1000 e-): differences of a few per cent between fibres (tens of e-) stay
    far inside the master sky's 5-sigma clipping, so every fibre keeps every pixel.
    """
    flux = np.asarray(spectra, np.float32)
    return replace(
        plate,
        flux=flux,
        ivar=np.full_like(flux, 1e-6),
        mask=np.zeros(flux.shape, np.int32),
        true_sky=None,
        true_object=None,
    )


def test_master_sky_reproduces_a_common_noiseless_spectrum(plate: Plate) -> None:
    spec = plate.true_sky[np.nonzero(plate.is_sky)[0][0]].astype(np.float64)
    q = constant_sky_plate(plate, np.tile(spec, (plate.n_fibers, 1)))
    master = baselines.bspline_master_sky(q)
    # Knots every 0.8 px give more spline coefficients than pixels: the least-squares optimum
    # interpolates every pixel, so the only error is the solver's (float64) -- 1e-6 relative is
    # far below any noise and would catch a fit that smooths the R = 1800 lines (~1e-2 at peaks).
    rel = np.abs(master - spec) / spec
    excess = spec - ndimage.median_filter(spec, 51)
    peaks = excess > 0.5 * spec  # line pixels: sky lines at least doubling the continuum
    assert peaks.sum() > 20 and (~peaks).sum() > 3000
    assert rel[~peaks].max() < 1e-6
    assert rel[peaks].max() < 1e-6


def test_master_sky_is_the_weighted_mean_and_bridges_gaps(plate: Plate) -> None:
    rows = np.nonzero(plate.is_sky)[0]
    flux = plate.flux[rows].astype(np.float64)
    ivar = plate.ivar[rows].astype(np.float64)
    # Pooled least squares over fibres sharing one grid = fit to the per-pixel inverse-variance
    # weighted mean; with more coefficients than pixels the fit *is* that mean (no clipping here).
    want = (flux * ivar).sum(0) / ivar.sum(0)
    master = baselines.bspline_master_sky(plate, iterations=0)
    np.testing.assert_allclose(master, want, rtol=1e-6)
    # Pixels masked in every sky fibre carry no data: the spline bridges them smoothly. On the
    # parametric sky's smooth continuum (no line within 5200-5300 A; curvature ~1e-4 per pixel)
    # a 3-pixel bridge is within 0.5 %. (Paranal's continuum has pixel-scale structure.)
    smooth = sim(1, sky_source="parametric")
    spec = smooth.true_sky[np.nonzero(smooth.is_sky)[0][0]].astype(np.float64)
    q = constant_sky_plate(smooth, np.tile(spec, (plate.n_fibers, 1)))
    gap = np.nonzero((q.wavelength > 5240.0) & (q.wavelength < 5244.0))[0]
    assert gap.size >= 2
    mask = np.zeros_like(q.mask)
    mask[:, gap] = 1
    bridged = baselines.bspline_master_sky(replace(q, mask=mask))
    assert np.all(np.isfinite(bridged))
    np.testing.assert_allclose(bridged[gap], spec[gap], rtol=5e-3)
    outside = np.ones(q.n_pix, bool)
    outside[gap[0] - 3 : gap[-1] + 4] = False
    np.testing.assert_allclose(bridged[outside], spec[outside], rtol=1e-6)


def test_master_sky_clips_a_cosmic_ray(plate: Plate) -> None:
    rows = np.nonzero(plate.is_sky)[0]
    wave = plate.wavelength
    j = int(np.argmin(np.abs(wave - 6050.0)))  # continuum pixel
    clean = baselines.bspline_master_sky(plate)
    flux = plate.flux.copy()
    flux[rows[3], j] += 5000.0
    hit = replace(plate, flux=flux)
    sigma = 1.0 / np.sqrt(plate.ivar[rows, j].astype(np.float64))  # per-fibre noise, ~12 e-
    # Unclipped, the spike moves the weighted mean by ~5000 / N_SKY = 625 e-.
    assert baselines.bspline_master_sky(hit, iterations=0)[j] - clean[j] > 300.0
    # Clipped, the pixel is the mean of the other 7 fibres: it moves by at most ~1 sigma of one
    # fibre (dropping one of 8 samples); 3 sigma is generous.
    clipped = baselines.bspline_master_sky(hit)
    assert abs(clipped[j] - clean[j]) < 3 * sigma.mean()
    np.testing.assert_allclose(np.delete(clipped, j), np.delete(clean, j), rtol=1e-5, atol=1e-3)


def brute_line_fluxes(flux: np.ndarray, wave: np.ndarray, half: float = 6.0) -> np.ndarray:
    """baselines.line_fluxes by the definition, one fibre and one line at a time (float64)."""
    side = 8.0
    out = []
    for row in np.asarray(flux, np.float64):
        vals = []
        for line in ANCHORS:
            if line - half - side < wave[0] or line + half + side > wave[-1]:
                continue
            lw, lf, rw, rf, core = [], [], [], [], []
            for w, f in zip(wave, row):
                if line - half - side <= w < line - half:
                    lw.append(w)
                    lf.append(f)
                elif line + half < w <= line + half + side:
                    rw.append(w)
                    rf.append(f)
                elif abs(w - line) <= half:
                    core.append((w, f))
            xl, xr = sum(lw) / len(lw), sum(rw) / len(rw)
            yl, yr = float(np.median(lf)), float(np.median(rf))
            total = 0.0
            for w, f in core:
                total += f - (yl + (yr - yl) / (xr - xl) * (w - xl))
            vals.append(total)
        out.append(vals)
    return np.array(out)


def test_line_fluxes_brute_force(plate: Plate) -> None:
    wave = plate.wavelength
    flux = plate.flux[:3].astype(np.float64)
    got = baselines.line_fluxes(flux, wave)
    want = brute_line_fluxes(flux, wave)
    assert got.shape == (3, len(ANCHORS))  # all 12 anchors lie inside 3690-9075 A
    # Same float64 arithmetic in a different order: agreement to ~1e-12 of the summed flux.
    scale = np.abs(flux).sum(-1, keepdims=True)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-11 * scale.max())
    # A narrower core leaves fewer pixels: still equal to the brute force.
    np.testing.assert_allclose(
        baselines.line_fluxes(flux, wave, half_width=3.0),
        brute_line_fluxes(flux, wave, half=3.0),
        rtol=0,
        atol=1e-11 * scale.max(),
    )


def test_line_scales_recovers_scales(plate: Plate) -> None:
    master = plate.true_sky[np.nonzero(plate.is_sky)[0][0]].astype(np.float64)
    scales = np.random.default_rng(0).uniform(0.8, 1.2, plate.n_fibers)
    q = constant_sky_plate(plate, scales[:, None] * master[None])
    got = baselines.line_scales(q, master)
    # Line fluxes are linear in the spectrum: exact up to float32 storage of the flux (6e-8
    # relative per pixel, amplified < 10 x by the continuum subtraction of the usable lines).
    np.testing.assert_allclose(got, scales, rtol=1e-6)


def test_super_sky_noiseless_scaled_spectra(plate: Plate) -> None:
    spec = plate.true_sky[np.nonzero(plate.is_sky)[0][0]].astype(np.float64)
    t = np.random.default_rng(1).normal(1.0, 0.04, plate.n_fibers)
    truth = t[:, None] * spec[None]
    q = constant_sky_plate(plate, truth)
    # Master = mean of the sky fibres (ivar = 1) = mean(t_sky) S; line scales = t_i / mean(t_sky):
    # the product is t_i S up to float32 storage and solver error (1e-6).
    np.testing.assert_allclose(baselines.super_sky(q), truth, rtol=1e-6)


def oh_band_variation(plate: Plate, amplitude: float, seed: int):
    """[F, W] extra sky: each fibre's OH lines in 6800-7700 A scaled by its own N(0, amplitude).

    No anchor line lies in 6800-7700 A, so Super Sky's per-fibre line scale cannot absorb it.
    """
    wave = plate.wavelength
    mean_sky = plate.true_sky[plate.is_sky].astype(np.float64).mean(0)
    lines = np.clip(mean_sky - ndimage.median_filter(mean_sky, 51), 0, None)
    shape = np.where((wave > 6800) & (wave < 7700), lines, 0.0)
    a = np.random.default_rng(seed).normal(0.0, amplitude, plate.n_fibers)
    return a[:, None] * shape[None], shape


def test_pca_clean_removes_a_rank_one_residual() -> None:
    """Noiseless: the only residual of the first estimate is a_i e(lam) on sky-line pixels."""
    p = sim(3, n_fibers=60, n_sky=20, magnitudes=(19.0, 20.0))
    extra, shape = oh_band_variation(p, 0.3, seed=0)
    truth = p.true_sky.astype(np.float64) + extra
    flux = truth + p.true_object
    q = replace(p, flux=flux.astype(np.float32), true_sky=truth.astype(np.float32))
    obj = ~p.is_sky
    band = shape > 0
    before = np.abs(extra[obj][:, band]).sum()
    # The method works on high-passed residuals (minus a 51-px running median), so the running
    # median of e itself cannot come back; object features on line pixels (objects 0.2-0.5x the
    # sky) leak into the fit at the per-cent level.
    lost = np.abs(ndimage.median_filter(shape, 51, mode="nearest")[band]).sum() / shape.sum()
    assert lost < 0.05
    for k in (1, 6):
        out = baselines.pca_clean(q, sky=p.true_sky.astype(np.float64), n_components=k)
        after = np.abs(out - truth)[obj][:, band].sum()
        # Fitting the whitened eigen-spectra to flux-unit residuals left ~19 % here.
        assert after < (lost + 0.03) * before, (k, after / before, lost)


def test_pca_clean_beats_super_sky_on_varying_oh_band() -> None:
    p = sim(3, n_fibers=60, n_sky=20, magnitudes=(19.0, 20.0))
    extra, shape = oh_band_variation(p, 0.5, seed=1)
    truth = p.true_sky.astype(np.float64) + extra
    q = replace(p, flux=(p.flux + extra).astype(np.float32), true_sky=truth.astype(np.float32))
    sky0 = baselines.super_sky(q)
    sky1 = baselines.pca_clean(q)
    obj = ~p.is_sky
    band = shape > 0
    err0 = np.abs(sky0 - truth)[obj][:, band].sum()
    err1 = np.abs(sky1 - truth)[obj][:, band].sum()
    # Super Sky leaves the +-50 % OH-band variation in place. PCA (20 sky fibres) removes most of
    # it, down towards the floor set by the master sky's own noise (~25 % of err0 here, from 20
    # noisy sky fibres): require at least a halving on the band's pixels...
    assert err1 < 0.5 * err0, (err1, err0)
    # ...and a better overall sky error (metrics.evaluate_sky, object fibres).
    e0 = metrics.evaluate_sky(q, sky0)["sky_error_pct"]["all"]
    e1 = metrics.evaluate_sky(q, sky1)["sky_error_pct"]["all"]
    assert e1 < e0, (e1, e0)


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------


def test_metrics_with_the_true_sky(plate: Plate) -> None:
    out = metrics.evaluate_sky(plate, plate.true_sky)
    assert out["has_truth"] and out["n_fibers"] == N_FIBERS and out["n_sky_fibers"] == N_SKY
    for region in ("blue", "red", "all"):
        assert out["sky_error_pct"][region] == 0.0
        assert out["sky_rms_error_pct"][region] == 0.0
    # chi^2 of pure noise over the 32 x 3909 object-fibre pixels: 1 within 5 standard errors
    # (sqrt(2 / N) ~ 0.004 for the whole plate, ~0.009 for the blue end).
    wave = plate.wavelength
    for region, n_pix in (
        ("blue", (wave < SPLIT).sum()),
        ("red", (wave >= SPLIT).sum()),
        ("all", wave.size),
    ):
        n = (N_FIBERS - N_SKY) * n_pix
        assert abs(out["chi2_per_pixel"][region] - 1.0) < 5 * np.sqrt(2.1 / n), region


def perturbed_sky(plate: Plate) -> np.ndarray:
    rng = np.random.default_rng(11)
    return plate.true_sky.astype(np.float64) * 1.03 + rng.normal(0.0, 2.0, plate.flux.shape)


def test_sky_error_brute_force(plate: Plate) -> None:
    sky = perturbed_sky(plate)
    out = metrics.evaluate_sky(plate, sky)
    wave = plate.wavelength
    num = {"blue": 0.0, "red": 0.0, "all": 0.0}
    den = dict.fromkeys(num, 0.0)
    sq = dict.fromkeys(num, 0.0)
    cnt = dict.fromkeys(num, 0)
    true_sky = plate.true_sky.astype(np.float64)
    for i in range(plate.n_fibers):
        if plate.fibers["OBJTYPE"][i] == "SKY":
            continue
        for j in range(plate.n_pix):
            region = "blue" if wave[j] < SPLIT else "red"
            d = sky[i, j] - true_sky[i, j]
            for r in (region, "all"):
                num[r] += abs(d)
                den[r] += true_sky[i, j]
                sq[r] += d * d
                cnt[r] += 1
    for r in num:
        # float64 sums in another order over ~1e5 terms: 1e-10 relative.
        np.testing.assert_allclose(out["sky_error_pct"][r], 100 * num[r] / den[r], rtol=1e-10)
        rms = 100 * np.sqrt(sq[r] / cnt[r]) / (den[r] / cnt[r])
        np.testing.assert_allclose(out["sky_rms_error_pct"][r], rms, rtol=1e-10)
    # The 3 % scale dominates: the error is about 3 % (+ |N(0, 2)| / sky ~ 1.6 / 100 e-).
    assert 2.5 < out["sky_error_pct"]["all"] < 5.5


def brute_chi2(plate: Plate, sky: np.ndarray, with_truth: bool) -> dict:
    wave = plate.wavelength
    num = {"blue": 0.0, "red": 0.0, "all": 0.0}
    cnt = dict.fromkeys(num, 0)
    for i in range(plate.n_fibers):
        is_sky = plate.fibers["OBJTYPE"][i] == "SKY"
        if is_sky == with_truth:  # truth: object fibres; no truth: sky fibres
            continue
        for j in range(plate.n_pix):
            if plate.mask[i, j] != 0 or plate.ivar[i, j] <= 0:
                continue
            r = float(plate.flux[i, j]) - sky[i, j]
            if with_truth:
                r -= float(plate.true_object[i, j])
            chi2 = r * r * float(plate.ivar[i, j])
            for region in ("blue" if wave[j] < SPLIT else "red", "all"):
                num[region] += chi2
                cnt[region] += 1
    return {r: num[r] / cnt[r] for r in num}


def test_chi2_brute_force(plate: Plate) -> None:
    sky = perturbed_sky(plate)
    # Mask a few pixels: they leave both the sum and the pixel count.
    mask = np.zeros_like(plate.mask)
    mask[:, 1000:1010] = 1
    mask[np.nonzero(plate.is_sky)[0][:2], 3000:3100] = 4
    p = replace(plate, mask=mask)
    got = metrics.evaluate_sky(p, sky)["chi2_per_pixel"]
    want = brute_chi2(p, sky, with_truth=True)
    for r in want:
        np.testing.assert_allclose(got[r], want[r], rtol=1e-10)
    # Without truth layers: sky fibres, flux - sky.
    bare = replace(p, true_sky=None, true_object=None)
    out = metrics.evaluate_sky(bare, sky)
    assert not out["has_truth"] and "sky_error_pct" not in out
    want = brute_chi2(bare, sky, with_truth=False)
    for r in want:
        np.testing.assert_allclose(out["chi2_per_pixel"][r], want[r], rtol=1e-10)
    # A 3 % sky error adds (0.03 S)^2 / (S + RN^2) ~ 0.1 per pixel on S ~ 100 e- skies.
    assert out["chi2_per_pixel"]["all"] > 1.05


def test_three_percent_scaled_sky(faint_plate: Plate) -> None:
    p = faint_plate
    sky = 1.03 * p.true_sky.astype(np.float64)
    # Noiseless flux: the residual is exactly -0.03 true_sky, so both relative residuals are 3 %
    # (line fluxes are linear) up to float32 storage of the flux (1e-6 relative, x ~10 from the
    # continuum subtraction).
    exact = replace(p, flux=(p.true_sky.astype(np.float64) + p.true_object).astype(np.float32))
    out = metrics.evaluate_sky(exact, sky)
    for r in ("blue", "red", "all"):
        np.testing.assert_allclose(out["continuum_residual_pct"][r], 3.0, rtol=1e-3)
        np.testing.assert_allclose(out["line_residual_pct"][r], 3.0, rtol=1e-3)
        np.testing.assert_allclose(out["sky_error_pct"][r], 3.0, rtol=1e-6)
    # With noise and truth layers the line / continuum residuals compare the estimate with the
    # true sky (true_sky - sky: the systematic error, free of photon noise): 3 % exactly.
    out = metrics.evaluate_sky(p, sky)
    for r in ("blue", "red", "all"):
        np.testing.assert_allclose(out["continuum_residual_pct"][r], 3.0, rtol=1e-6)
        np.testing.assert_allclose(out["line_residual_pct"][r], 3.0, rtol=1e-6)
    # Without truth: sky fibres, flux - sky against sky = 1.03 S, i.e. 3 / 1.03 = 2.91 % plus noise.
    # A 100 A window sums ~100 pixels of ~100-200 e-, so its noise is ~1 % of the window's sky; the
    # median over 10 fibres x 6 windows of |2.91 % + noise| is within ~0.2 % (standard error of the
    # median plus the small |.| bias): 0.5 allowed. Red lines (strong OH / [O I]) have flux noise
    # << 3 %; the weak blue ones are noise-dominated, so only "red" is checked (0.6 allowed).
    out = metrics.evaluate_sky(replace(p, true_sky=None, true_object=None), sky)
    want = 100 * 0.03 / 1.03
    assert abs(out["continuum_residual_pct"]["all"] - want) < 0.5, out["continuum_residual_pct"]
    assert abs(out["line_residual_pct"]["red"] - want) < 0.6, out["line_residual_pct"]


def test_no_sky_estimate_raises(plate: Plate) -> None:
    assert plate.sky is None
    with pytest.raises(ValueError, match="no sky estimate"):
        metrics.evaluate_sky(plate)
    # The plate's SKY layer is used when no estimate is passed.
    with_sky = plate.with_sky(plate.true_sky, "truth")
    assert metrics.evaluate_sky(with_sky)["sky_error_pct"]["all"] == 0.0


def test_sky_lines_live_in_one_module() -> None:
    """The simulator, baselines and metrics read one line list (jaxlab.sky.lines)."""
    from jaxlab.sky import lines, smi

    assert lines.ANCHOR_LINES == ANCHORS and lines.BLUE_RED_SPLIT == SPLIT
    assert simulate.ANCHOR_LINES is lines.ANCHOR_LINES
    assert baselines.ANCHOR_LINES is lines.ANCHOR_LINES and smi.ANCHOR_LINES is lines.ANCHOR_LINES
    assert metrics.CONTINUUM_WINDOWS is lines.CONTINUUM_WINDOWS
    grid = lamost_grid()
    assert list(lines.ANCHOR_LINES) == sorted(lines.ANCHOR_LINES)
    assert grid[0] < min(lines.ANCHOR_LINES) and max(lines.ANCHOR_LINES) < grid[-1]
    # every anchor is a line the parametric simulator emits (night sky or light pollution)
    emitted = set(lines.PARAMETRIC_SKY_LINES) | set(lines.POLLUTION_LINES)
    assert set(lines.ANCHOR_LINES) <= emitted
    for lo, hi in [r for ranges in lines.LINE_GROUPS.values() for r in ranges]:
        assert lo < hi
    assert all(lo < hi and hi - lo == 100.0 for lo, hi in lines.CONTINUUM_WINDOWS)
