"""A second plate generator, independent of `jaxlab.sky.simulate`: plate families on real skies.

    from sky_families import FAMILIES, make_plate     # scripts/ on sys.path
    plate = make_plate("lick-moon", seed=3)           # a jaxlab.sky.Plate with truth layers

Written for evaluation: it shares no code, line list or field model with jaxlab's simulator (it
imports only the `Plate` container and the LAMOST wavelength grid constants). Every family takes its
night-sky emission from real spectra in the PyPI `pypeit` wheel (`pypeit/data/sky_spec`, located
with find_spec, never imported) and differs from jaxlab's simulator in each part of the model:

- sky: the line-to-continuum ratio r(λ) = (S - C_S)/C_S of the real spectra (per instrument
  piece, joined with a smooth cross-fade), times the family's own continuum shape; lines split into
  [O I], Na D, OH (> 6800 Å) and "other" groups by this module's own wavelength ranges;
- spatial fields: not polynomials: a moon/twilight term falling exponentially with the distance
  along a direction, Gaussian cloud patches that dim all sky components and brighten the scattered
  light, and sinusoidal line-strength ripples; "flat" families have weak fields;
- moonlight: Rayleigh (λ^-4) + aerosol (λ^-1.3) scattered sunlight (5778 K), not a reddened
  blackbody;
- throughput: chromatic per fibre, t_i (1 + s_i (λ - 6000 Å)/3000 Å), with a family efficiency
  curve; objects (not the sky) are dimmed by the real site extinction curve of the pypeit wheel
  (`data/extinction/*.dat`, which also carries the telluric O2/H2O bands) at airmass 1.0-1.6;
- wavelength shifts: a smooth function of the slit position (fibre number) plus a per-fibre
  linear stretch in λ, not independent Gaussian offsets;
- objects: stars with TiO bands and damped Balmer lines, QSOs (power law + broad lines at
  z 0.3-2.2), galaxies with a 4000 Å break; a few sky fibres carry a faint (20-21 mag) object,
  as real sky fibres do (Ding et al. 2024).

No real standard-star spectra ship in the wheel (`data/standards` holds only catalogue info files
there, the spectra are downloaded on demand by PypeIt), so the stars are analytic.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os

import numpy as np
from scipy import ndimage

from jaxlab.sky.plate import SKY_OBJTYPE, Plate

COEFF0, COEFF1, NPIX = float(np.log10(3690.0)), 1e-4, 3909
C_KMS = 2.99792458e5


def pypeit_data(*parts: str) -> str:
    spec = importlib.util.find_spec("pypeit")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the plate families need the pypeit wheel: pip install --no-deps pypeit"
        )
    path = os.path.join(spec.submodule_search_locations[0], "data", *parts)
    if not os.path.exists(path):
        raise FileNotFoundError(path)
    return path


@dataclasses.dataclass(frozen=True)
class Family:
    """One kind of plate: which real sky, and how strong / what shape its variations are."""

    pieces: tuple[tuple[str, float, float], ...]  # (sky_spec file, lo, hi) in Å, in order
    extinction: str  # data/extinction file
    moon: tuple[float, float]  # scattered light / dark continuum at 5500 Å
    moon_scale: float  # e-folding length of the moon gradient (plate radii; 3: ~70 % p-t-p)
    clouds: int  # number of cloud patches
    line_ripple: float  # amplitude of the sinusoidal line-strength pattern
    continuum_slope: float  # dark continuum ∝ λ^slope
    sky_level: float  # dark continuum electrons / pixel at 5500 Å
    spatial: bool  # whether the sky varies substantially over the plate


FAMILIES: dict[str, Family] = {
    # Paranal (UVES sky atlas via SDSS code) with clouds and a moon gradient.
    "paranal-cloud": Family(
        (("paranal_sky.fits", 3000.0, 10000.0),),
        "paranalextinct.dat",
        (0.5, 1.5),
        6.0,
        3,
        0.04,
        -0.6,
        80.0,
        True,
    ),
    # Keck LRIS blue 400 + red 600 (Maunakea), dark: near-uniform sky.
    "keck-dark": Family(
        (
            ("sky_LRISb_400.fits", 3000.0, 5560.0),
            ("sky_LRISr_600_7500_5460_7950.fits", 5560.0, 7930.0),
            ("paranal_sky.fits", 7930.0, 10000.0),
        ),
        "mkoextinct.dat",
        (0.0, 0.05),
        10.0,
        0,
        0.01,
        0.3,
        50.0,
        False,
    ),
    # Lick Kast blue + Keck LRIS red, bright moon with a steep gradient: the blue-end case.
    "lick-moon": Family(
        (
            ("sky_kastb_600.fits", 3000.0, 5520.0),
            ("sky_LRISr_600_7500_5460_7950.fits", 5520.0, 7930.0),
            ("paranal_sky.fits", 7930.0, 10000.0),
        ),
        "kpnoextinct.dat",
        (1.5, 4.0),
        3.0,
        1,
        0.03,
        -0.2,
        70.0,
        True,
    ),
    # Keck LRIS blue 600 + red, twilight-like gradient in the continuum, no clouds.
    "keck-twilight": Family(
        (
            ("sky_LRISb_600.fits", 3000.0, 5530.0),
            ("sky_LRISr_600_7500_5460_7950.fits", 5530.0, 7930.0),
            ("paranal_sky.fits", 7930.0, 10000.0),
        ),
        "lapalmaextinct.dat",
        (0.6, 1.2),
        4.0,
        0,
        0.05,
        0.0,
        60.0,
        True,
    ),
}


def grid() -> np.ndarray:
    return 10 ** (COEFF0 + COEFF1 * np.arange(NPIX))


def _lower_envelope(flux: np.ndarray, size: int) -> np.ndarray:
    base = ndimage.percentile_filter(flux, 20, size=size, mode="nearest")
    return ndimage.uniform_filter1d(base, size, mode="nearest")


@functools.lru_cache(maxsize=16)
def line_ratio(name: str, resolution: float = 1800.0, oversample: int = 4) -> tuple:
    """(λ fine [N], r(λ) [N]): the family's sky-line-to-continuum ratio at LAMOST resolution."""
    fam = FAMILIES[name]
    lam = 10 ** (COEFF0 - 40 * COEFF1 + COEFF1 / oversample * np.arange((NPIX + 80) * oversample))
    r = np.zeros_like(lam)
    weight = np.zeros_like(lam)
    from astropy.io import fits

    for fname, lo, hi in fam.pieces:
        with fits.open(pypeit_data("sky_spec", fname)) as hdul:
            flux = np.asarray(hdul[0].data, np.float64)
            wave = np.asarray(hdul[1].data, np.float64)
        step = np.median(np.diff(wave))
        fwhm_a = 5500.0 / resolution  # constant-Å LSF (LAMOST is constant in log λ: a difference)
        sig = fwhm_a / 2.3548 / step
        native_fwhm = 2.0 * step
        if fwhm_a > native_fwhm:
            flux = ndimage.gaussian_filter1d(flux, np.sqrt(max(sig**2 - 1.0, 0.0)), mode="nearest")
        cont = _lower_envelope(flux, max(int(80.0 / step), 5))
        ratio = np.clip((flux - cont) / np.maximum(cont, 1e-12), 0.0, None)
        ratio[~np.isfinite(ratio)] = 0.0
        inside = (lam > max(lo - 15, wave[0] + 20)) & (lam < min(hi + 15, wave[-1] - 20))
        # Cross-fade of 30 Å at the joins.
        w = np.clip(np.minimum(lam - (lo - 15), (hi + 15) - lam) / 30.0, 0.0, 1.0) * inside
        r += w * np.interp(lam, wave, ratio)
        weight += w
    return lam, r / np.maximum(weight, 1e-9)


def _groups(lam: np.ndarray) -> dict[str, np.ndarray]:
    """Boolean masks of this module's line groups."""
    oi = (
        ((lam > 5565) & (lam < 5592))
        | ((lam > 6290) & (lam < 6310))
        | ((lam > 6355) & (lam < 6375))
    )
    nad = (lam > 5880) & (lam < 5905)
    oh = (lam > 6800) & ~oi
    return {"oi": oi, "nad": nad, "oh": oh, "other": ~(oi | nad | oh)}


def _solar_scatter(lam: np.ndarray) -> np.ndarray:
    x = 1.4387769e8 / (lam * 5778.0)  # hc/(λ k T) with λ in Å
    sun = lam**-5 / np.expm1(x)
    s = sun * (0.7 * (lam / 5500.0) ** -4 + 0.3 * (lam / 5500.0) ** -1.3)
    return s / np.interp(5500.0, lam, s)


def _extinction(name: str, lam: np.ndarray) -> np.ndarray:
    path = pypeit_data("extinction", FAMILIES[name].extinction)
    tab = np.loadtxt(path, comments="#")
    return np.interp(lam, tab[:, 0], tab[:, 1])


def _star(rng, lam):
    teff = rng.uniform(3800.0, 12000.0)
    x = 1.4387769e8 / (lam * teff)
    f = lam**-5 / np.expm1(x)
    v = rng.normal(0.0, 60.0)
    hot = np.clip((teff - 4500.0) / 6000.0, 0, 1)
    for w0, depth, gamma in (
        (6564.6, 0.5, 6.0),
        (4862.7, 0.55, 8.0),
        (4341.7, 0.55, 8.0),
        (4102.9, 0.5, 8.0),
        (3971.2, 0.45, 7.0),
    ):
        d = depth * (0.2 + 0.8 * hot)
        g = gamma * (0.3 + hot)
        f *= 1 - d / (1 + ((lam - w0 * (1 + v / C_KMS)) / g) ** 2)  # damped (Lorentzian) wings
    for w0, depth in ((3934.8, 0.6), (5175.0, 0.25), (5891.6, 0.3), (5897.6, 0.25), (8544.4, 0.3)):
        f *= 1 - depth * (1 - hot) * np.exp(-0.5 * ((lam - w0 * (1 + v / C_KMS)) / 2.5) ** 2)
    if teff < 4200:  # TiO band heads: sharp drops recovering to the red
        for head in (6159.0, 7054.0, 7589.0, 8432.0):
            f *= 1 - 0.35 * (lam > head) * np.exp(-(lam - head) / 150.0)
    return f


def _qso(rng, lam):
    z = rng.uniform(0.3, 2.2)
    f = (lam / 5500.0) ** -1.5
    for rest, ew, fwhm_kms in (
        (1549.1, 40, 5000),
        (1908.7, 20, 5000),
        (2799.1, 35, 4500),
        (4862.7, 60, 4000),
        (5008.2, 15, 600),
        (6564.6, 250, 3500),
    ):
        w0 = rest * (1 + z)
        sig = w0 * fwhm_kms / C_KMS / 2.3548
        cont = (w0 / 5500.0) ** -1.5
        f += (
            cont
            * ew
            * (1 + z)
            / (np.sqrt(2 * np.pi) * sig)
            * np.exp(-0.5 * ((lam - w0) / sig) ** 2)
        )
    return f


def _galaxy(rng, lam):
    z = rng.uniform(0.02, 0.3)
    rest = lam / (1 + z)
    f = (rest / 5500.0) ** 0.8 * np.where(rest < 4000.0, 0.55, 1.0)
    f = ndimage.gaussian_filter1d(f, 4.0, mode="nearest")
    for w0, ew in ((3727.4, 20), (4862.7, 8), (5008.2, 12), (6564.6, 30), (6585.3, 10)):
        sig = 2.5 * (1 + z)
        f += (
            rng.uniform(0, 1)
            * ew
            * np.interp(w0 * (1 + z), lam, f)
            * np.exp(-0.5 * ((lam - w0 * (1 + z)) / sig) ** 2)
            / (np.sqrt(2 * np.pi) * sig)
        )
    return f


def make_plate(family: str, seed: int, n_fibers: int = 250, n_sky: int = 20) -> Plate:
    """One plate of `family` (a name in FAMILIES) with truth layers TRUE_SKY / TRUE_OBJECT."""
    fam = FAMILIES[family]
    rng = np.random.default_rng([seed, list(FAMILIES).index(family), 7919])
    lam = grid()
    lam_f, ratio = line_ratio(family)
    groups = _groups(lam_f)

    # Focal plane: fibres in a slightly squashed disk; sky fibres in a few clusters plus spread.
    r = np.sqrt(rng.uniform(0, 1, n_fibers)) * 0.98
    phi = rng.uniform(0, 2 * np.pi, n_fibers)
    xy = np.stack([r * np.cos(phi), 0.95 * r * np.sin(phi)], -1)
    is_sky = np.zeros(n_fibers, bool)
    is_sky[rng.choice(n_fibers, n_sky, replace=False)] = True

    # Spatial fields (not polynomials).
    u = rng.normal(size=2)
    u /= np.linalg.norm(u)
    along = xy @ u
    moon = rng.uniform(*fam.moon) * np.exp(-along / fam.moon_scale)  # level at the plate centre
    clouds = np.zeros(n_fibers)
    for _ in range(fam.clouds):
        c = rng.uniform(-0.7, 0.7, 2)
        clouds += rng.uniform(0.05, 0.15) * np.exp(
            -0.5 * np.sum((xy - c) ** 2, -1) / rng.uniform(0.1, 0.3) ** 2
        )
    k = rng.normal(size=2) * 2.5
    ripple = {
        g: 1 + fam.line_ripple * np.sin(xy @ k + rng.uniform(0, 2 * np.pi)) * rng.uniform(0.5, 1)
        for g in groups
    }
    dark = (1 - clouds) * (1 + 0.02 * rng.normal() * along)

    cont_f = (lam_f / 5500.0) ** fam.continuum_slope * (
        1 + 0.15 * np.exp(-0.5 * ((lam_f - 4200) / 500) ** 2)
    )
    comps = np.stack(
        [cont_f] + [cont_f * ratio * m for m in groups.values()] + [_solar_scatter(lam_f)]
    )
    level = np.stack(
        [dark]
        + [dark * ripple[g] * rng.uniform(0.7, 1.4) for g in groups]
        + [moon * (1 + 2.0 * clouds)],
        1,
    )  # [F, C]

    # Wavelength shifts: smooth in the slit position + per-fibre stretch (Å).
    slit = np.arange(n_fibers) / n_fibers
    a = rng.normal(0, 0.15, 3)
    shift0 = rng.uniform(-0.4, 0.4) + a[0] * np.sin(2 * np.pi * slit) + a[1] * slit + a[2] * slit**2
    shift0 = shift0 + rng.normal(0, 0.05, n_fibers)
    stretch = rng.normal(0, 0.08, n_fibers)  # Å of extra shift per 1000 Å from 6000 Å
    sky = np.empty((n_fibers, NPIX))
    combined = level @ comps
    for i in range(n_fibers):
        d = shift0[i] + stretch[i] * (lam - 6000.0) / 1000.0
        sky[i] = np.interp(lam - d, lam_f, combined[i])

    # Throughput and efficiency.
    eff = 0.08 + 0.9 * np.exp(-0.5 * ((lam - 6200) / 1500) ** 2) * (
        1 - 0.2 * np.exp(-0.5 * ((lam - 5700) / 80) ** 2)
    )
    t = rng.normal(1.0, 0.035, n_fibers) * (1 + 0.03 * rng.normal() * along)
    slope = rng.normal(0, 0.02, n_fibers)
    thr = t[:, None] * (1 + slope[:, None] * (lam - 6000.0) / 3000.0)

    # Objects.
    airmass = rng.uniform(1.0, 1.6)
    ext = 10 ** (-0.4 * _extinction(family, lam) * airmass)
    obj = np.zeros((n_fibers, NPIX))
    kinds = np.full(n_fibers, "STAR", dtype="<U8")
    sky_cont_6200 = np.interp(6200.0, lam_f, cont_f)
    for i in range(n_fibers):
        if is_sky[i]:
            if rng.uniform() < 0.15:  # a faint contaminant in the sky fibre
                mag = rng.uniform(20.0, 21.0)
                shape = _star(rng, lam)
            else:
                continue
        else:
            roll = rng.uniform()
            kinds[i] = "STAR" if roll < 0.7 else ("QSO" if roll < 0.8 else "GALAXY")
            shape = {"STAR": _star, "QSO": _qso, "GALAXY": _galaxy}[kinds[i]](rng, lam)
            mag = rng.uniform(14.5, 18.5)
        d = shift0[i] + stretch[i] * (lam - 6000.0) / 1000.0
        shape = np.interp(lam - d, lam, shape) * ext
        obj[i] = sky_cont_6200 * 10 ** (-0.4 * (mag - 18.5)) * shape / np.interp(6200.0, lam, shape)
    kinds[is_sky] = SKY_OBJTYPE

    scale = fam.sky_level * eff[None, :] * thr
    true_sky = sky * scale
    true_obj = obj * scale
    read_noise = 4.0
    model = true_sky + true_obj
    counts = rng.poisson(np.clip(model, 0, None)) + rng.normal(0, read_noise, model.shape)
    ivar = 1.0 / (np.clip(model, 0, None) + read_noise**2)
    fibers = {
        "FIBERID": np.arange(1, n_fibers + 1, dtype=np.int32),
        "OBJTYPE": kinds,
        "X": xy[:, 0] * 875.0,
        "Y": xy[:, 1] * 875.0,
        "SPID": np.ones(n_fibers, np.int32),
    }
    return Plate(
        flux=counts.astype(np.float32),
        ivar=ivar.astype(np.float32),
        mask=np.zeros((n_fibers, NPIX), np.int32),
        coeff0=COEFF0,
        coeff1=COEFF1,
        fibers=fibers,
        true_sky=true_sky.astype(np.float32),
        true_object=true_obj.astype(np.float32),
        meta={"PLANID": f"{family}-{seed}", "FAMILY": family},
    )
