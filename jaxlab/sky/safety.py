"""A safety net for a learned sky: cross-validation over sky fibres, blending towards the best baseline.

No truth is needed. The plate's sky fibres are split into `folds` groups; for each group, every sky
estimate (the learned one and each baseline: Super Sky, PCA cleaning) is recomputed with that
group's fibres treated as objects (so they are not used to build the sky), and their flux is
compared with every estimate: a held-out sky fibre holds sky and noise only, so its residual
measures each method's error on a fibre it has not seen. In each wavelength band b and for each
baseline n the blend

    sky = baseline_n + w_{n,b} (learned - baseline_n),     w_{n,b} in [0, 1]

takes the weight that minimises the held-out fibres' inverse-variance weighted squared residual
(a one-parameter least squares, clipped to [0, 1]); a weight below `min_weight` (0.25) is set to 0.
The band then keeps the baseline, with its weight, whose blend has the smallest held-out chi^2: a
band where the learned sky does not help falls back to whichever baseline predicts the held-out
fibres best (Super Sky on a uniform sky, PCA cleaning where the sky lines vary from fibre to
fibre). (The floor: held-out sky fibres are not object fibres, and when the learned sky is far off,
a small positive weight fitted on them still added a visible error on the objects, e.g. 6.7 % ->
7.2 % in the blue of a Keck plate with w ~ 0.04.) The report gives each band's baseline and weight,
the held-out chi^2 of every method and of the blend, and the fallback fraction (the share of bands
and of pixels where the weight is 0).

The learned sky may also be several candidates (name -> estimator, e.g. SMI's per-fibre level
models `jaxlab.sky.smi.smi_level_candidates`: the sky-line throughput to the power 1, 0.5 or 0);
each is cross-validated on the same folds and every band keeps the candidate whose best blend has
the smallest held-out chi^2 (ties: the first candidate, so a candidate that does not help leaves
the first one's result unchanged).

Each learned candidate also enters clipped (`clip_levels`, on by default): in each band, every
object fibre's level relative to Super Sky (the sum of the learned sky over the band divided by
Super Sky's) is clipped to the range of that ratio over its five nearest sky fibres, and the
held-out fibres choose, band by band, between the candidate as it is and clipped. A fitted
focal-plane field can run away where no sky fibre pins it down (a plate edge without sky fibres:
+35-42 % on a paranal-cloud plate, 1.30x Super Sky's blue error). The held-out fibres see part of
it: a fibre at the edge of the sky fibres' spread is outside the rest when its fold is held out.
Clipping always would cost a sky whose field is right beyond the sky fibres (jaxlab's simulator:
1.93 -> 2.23 % overall); letting the held-out fibres choose keeps it there and brings that
paranal-cloud plate to 0.98x.

Letters: F fibres, N held-out fibres (all folds), W wavelength pixels, B bands, M baselines.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from jaxlab.errors import UserError
from jaxlab.sky.baselines import pca_clean, super_sky
from jaxlab.sky.plate import Plate

__all__ = [
    "DEFAULT_BANDS",
    "CrossValidated",
    "hold_out",
    "sky_fibre_folds",
    "cross_validate",
    "default_baselines",
    "blend_weights",
    "select_blend",
    "clip_levels",
    "PerPlate",
    "safe_sky",
]

# Band edges in Angstrom: the blue end, the blue-green, the red with [O I] / Na D, the OH forest.
DEFAULT_BANDS: tuple[float, ...] = (4500.0, 5700.0, 7000.0)

SkyEstimator = Callable[[Plate], np.ndarray]


def default_baselines() -> dict[str, SkyEstimator]:
    """The baselines a user could pick instead of a learned sky: Super Sky and PCA cleaning."""
    return {"supersky": super_sky, "pca": pca_clean}


def sky_fibre_folds(plate: Plate, folds: int, seed: int = 0) -> list[np.ndarray]:
    """`folds` disjoint groups of sky-fibre rows of equal size (the remainder is never held out,
    so every fold leaves the same number of sky fibres and a jitted estimator compiles once)."""
    rows = np.nonzero(plate.is_sky)[0]
    size = rows.size // folds
    if folds < 2 or size < 1 or rows.size - size < 3:
        raise UserError(
            f"sky-fibre cross-validation with {folds} folds needs >= {max(folds, 2)} sky fibres and "
            f">= 3 left in each fold; the plate has {rows.size}"
        )
    perm = np.random.default_rng(seed).permutation(rows)
    return [np.sort(perm[k * size : (k + 1) * size]) for k in range(folds)]


def hold_out(plate: Plate, rows: np.ndarray) -> Plate:
    """The plate with the sky fibres `rows` relabelled as objects (OBJTYPE "HELDOUT")."""
    objtype = np.asarray(plate.fibers["OBJTYPE"]).astype("<U16").copy()
    objtype[rows] = "HELDOUT"
    return dataclasses.replace(plate, fibers=dict(plate.fibers, OBJTYPE=objtype))


@dataclasses.dataclass(frozen=True)
class CrossValidated:
    """One estimator's sky on the held-out fibres of every fold and on the whole plate.

    held [N, W]: fold k's rows estimated with fold k held out, folds concatenated in order;
    rows [N]: those rows; full [F, W]: the estimate from all sky fibres.
    """

    held: np.ndarray
    rows: np.ndarray
    full: np.ndarray


def cross_validate(
    plate: Plate, estimator: SkyEstimator, folds: int = 5, seed: int = 0, *, full: bool = True
) -> CrossValidated:
    """`estimator` run once per fold with that fold's sky fibres held out (and once on the plate
    if `full`); a baseline's result can be computed once per plate and reused for many models."""
    held, rows = [], []
    for r in sky_fibre_folds(plate, folds, seed):
        held.append(np.asarray(estimator(hold_out(plate, r)), np.float64)[r])
        rows.append(r)
    whole = np.asarray(estimator(plate), np.float64) if full else np.zeros((0,))
    return CrossValidated(np.concatenate(held), np.concatenate(rows), whole)


def _band_masks(wave: np.ndarray, edges: Sequence[float]) -> list[np.ndarray]:
    bounds = [-np.inf, *edges, np.inf]
    return [(wave >= lo) & (wave < hi) for lo, hi in zip(bounds[:-1], bounds[1:])]


def blend_weights(
    flux: np.ndarray,
    ivar: np.ndarray,
    learned: np.ndarray,
    baseline: np.ndarray,
    bands: Sequence[np.ndarray],
) -> np.ndarray:
    """Per-band weights [B] of `learned` against `baseline` that best predict `flux` [N, W].

    Minimises sum ivar (flux - baseline - w (learned - baseline))^2 over each band's pixels:
    w_b = sum ivar r d / sum ivar d^2 with r = flux - baseline, d = learned - baseline, clipped to
    [0, 1] (0 where the two estimates agree exactly).
    """
    r = flux - baseline
    d = learned - baseline
    out = []
    for m in bands:
        num = np.sum((ivar * r * d)[:, m])
        den = np.sum((ivar * d * d)[:, m])
        out.append(float(np.clip(num / den, 0.0, 1.0)) if den > 0 else 0.0)
    return np.asarray(out)


def _chi2(flux, ivar, est, m) -> float:
    """Held-out chi^2 per pixel of `est` [N, W] on the band mask m [W]."""
    return float(np.sum(((flux - est) ** 2 * ivar)[:, m]) / max(np.sum((ivar > 0)[:, m]), 1))


def select_blend(
    flux: np.ndarray,
    ivar: np.ndarray,
    learned: np.ndarray,
    baselines: Mapping[str, np.ndarray],
    bands: Sequence[np.ndarray],
    min_weight: float = 0.25,
) -> dict:
    """Per band, the baseline and weight whose blend best predicts the held-out fibres.

    Args:
      flux, ivar: held-out sky fibres [N, W].
      learned: the learned sky on them [N, W].
      baselines: name -> baseline sky on them [N, W] (M baselines; ties go to the first).
      bands: B boolean masks [W].
      min_weight: fitted weights below it become 0 (pure baseline).

    Returns {"baseline": [B] names, "weight": [B], "fitted": [B] unfloored weights of the chosen
    baseline, "chi2": {name: [B] held-out chi^2 per pixel of that baseline's floored blend}}.
    """
    names = list(baselines)
    if not names:
        raise UserError("the safety net needs at least one baseline")
    fitted = {n: blend_weights(flux, ivar, learned, b, bands) for n, b in baselines.items()}
    floored = {n: np.where(w < min_weight, 0.0, w) for n, w in fitted.items()}
    chi2 = {
        n: [_chi2(flux, ivar, b + floored[n][k] * (learned - b), m) for k, m in enumerate(bands)]
        for n, b in baselines.items()
    }
    pick = [names[int(np.argmin([chi2[n][k] for n in names]))] for k in range(len(bands))]
    return {
        "baseline": pick,
        "weight": np.asarray([floored[n][k] for k, n in enumerate(pick)]),
        "fitted": np.asarray([fitted[n][k] for k, n in enumerate(pick)]),
        "chi2": chi2,
    }


def clip_levels(
    plate: Plate,
    sky: np.ndarray,
    reference: np.ndarray,
    band_edges: Sequence[float] = DEFAULT_BANDS,
    nearest: int | None = 5,
) -> tuple[np.ndarray, np.ndarray]:
    """`sky` [F, W] with each object fibre's per-band level ratio to `reference` clipped to the
    range of its `nearest` sky fibres (all sky fibres if None), and the clipped mask [F, B].

    In band b the ratio is rho_ib = sum_b sky_i / sum_b reference_i; an object fibre's band is
    scaled by clip(rho_ib, min_j rho_jb, max_j rho_jb) / rho_ib over the sky fibres j nearest to
    it on the focal plane (sky fibres are left as they are). Fibres with a non-positive sum in a
    band are left unchanged there.
    """
    sky = np.asarray(sky, np.float64)
    ref = np.asarray(reference, np.float64)
    rows = plate.is_sky
    out = sky.copy()
    bands = _band_masks(plate.wavelength, band_edges)
    clipped = np.zeros((plate.n_fibers, len(bands)), bool)
    for k, m in enumerate(bands):
        num, den = sky[:, m].sum(1), ref[:, m].sum(1)
        ok = (den > 0) & (num > 0)
        if not ok[rows].any():
            continue
        rho = np.where(ok, num / np.where(ok, den, 1.0), 1.0)
        sr = np.nonzero(rows & ok)[0]
        if nearest is None:
            lo, hi = rho[sr].min(), rho[sr].max()
        else:
            d2 = np.sum((plate.positions[:, None] - plate.positions[None, sr]) ** 2, -1)
            near = sr[np.argsort(d2, 1, kind="stable")[:, :nearest]]  # [F, k]
            lo, hi = rho[near].min(1), rho[near].max(1)
        new = np.clip(rho, lo, hi)
        hit = ok & ~rows & (new != rho)
        out[np.ix_(hit, m)] *= (new[hit] / rho[hit])[:, None]
        clipped[:, k] = hit
    return out, clipped


class PerPlate:
    """`estimator` with its result kept per plate (flux array and sky fibres): the folds of one
    plate share its flux, so a raw candidate and its clipped copy, or several `safe_sky` calls on
    one plate, run each fold once. Keep one per plate: the cache holds every result."""

    def __init__(self, estimator: SkyEstimator):
        self.estimator, self.cache = estimator, {}

    def __call__(self, plate: Plate) -> np.ndarray:
        key = (id(plate.flux), plate.is_sky.tobytes())
        if key not in self.cache:
            self.cache[key] = (plate.flux, np.asarray(self.estimator(plate), np.float64))
        return self.cache[key][1]


class _LevelClipped:
    """`estimator` followed by `clip_levels` against `reference`, and the clipped share of the
    object fibres' bands on the last plate with all `n_sky` sky fibres."""

    def __init__(self, estimator, reference, band_edges, nearest, n_sky: int):
        self.estimator, self.reference, self.band_edges = estimator, reference, band_edges
        self.nearest, self.n_sky, self.fraction = nearest, n_sky, 0.0

    def __call__(self, plate: Plate) -> np.ndarray:
        sky, clipped = clip_levels(
            plate, self.estimator(plate), self.reference(plate), self.band_edges, self.nearest
        )
        if plate.is_sky.sum() == self.n_sky:
            self.fraction = float(clipped[~plate.is_sky].mean())
        return sky


def safe_sky(
    plate: Plate,
    learned: SkyEstimator | Mapping[str, SkyEstimator],
    *,
    baselines: Mapping[str, SkyEstimator | CrossValidated] | None = None,
    folds: int = 5,
    band_edges: Sequence[float] = DEFAULT_BANDS,
    min_weight: float = 0.25,
    seed: int = 0,
    level_reference: SkyEstimator | None = super_sky,
    level_nearest: int | None = 5,
) -> tuple[np.ndarray, dict]:
    """The blended sky [F, W] and a report (baselines, weights, held-out chi^2, fallback fraction).

    Args:
      plate: the plate (sky fibres flagged; no truth is read).
      learned: plate -> sky [F, W], e.g. ``lambda p: smi_sky(model, p)``; or name -> such
        estimator (L candidates, e.g. `jaxlab.sky.smi.smi_level_candidates(model)`): per band the
        candidate and baseline whose floored blend has the smallest held-out chi^2 are kept (ties
        go to the first candidate, then the first baseline); the report adds "learned" [B], each
        band's candidate.
      baselines: name -> plate -> sky [F, W] to fall back to, or its `cross_validate` result on
        this plate with the same `folds` and `seed` (default: `default_baselines()`, Super Sky and
        PCA cleaning).
      folds: number of sky-fibre folds.
      band_edges: wavelength band edges (Angstrom) for the per-band choice and weights.
      min_weight: weights below it become 0 (full fallback to the band's baseline).
      level_reference: with it (default Super Sky), every learned candidate also enters with
        its per-band fibre levels clipped against this sky (`clip_levels`, named "NAME,
        clipped"), and the held-out fibres choose; None: no clipped candidates.
      level_nearest: each object fibre's level is clipped to the range of this many nearest sky
        fibres (None: all of them).
    """
    wave = plate.wavelength
    bands = _band_masks(wave, band_edges)
    good = (plate.mask == 0) & (plate.ivar > 0) & np.isfinite(plate.flux)
    flux = np.where(good, plate.flux, 0.0).astype(np.float64)
    ivar = np.where(good, plate.ivar, 0.0).astype(np.float64)
    candidates = dict(learned) if isinstance(learned, Mapping) else {"learned": learned}
    if not candidates:
        raise UserError("the safety net needs at least one learned sky")
    if level_reference is not None:
        n_sky = int(plate.is_sky.sum())
        raw = {n: e if isinstance(e, PerPlate) else PerPlate(e) for n, e in candidates.items()}
        ref = PerPlate(level_reference)
        candidates = {
            **raw,
            **{
                f"{n}, clipped": _LevelClipped(est, ref, band_edges, level_nearest, n_sky)
                for n, est in raw.items()
            },
        }
    cv_ls = {
        n: cross_validate(plate, est, folds, seed, full=False) for n, est in candidates.items()
    }
    cv_l = next(iter(cv_ls.values()))
    cv_b = {}
    for name, est in (baselines if baselines is not None else default_baselines()).items():
        cv = est if isinstance(est, CrossValidated) else cross_validate(plate, est, folds, seed)
        if not np.array_equal(cv.rows, cv_l.rows) or cv.full.shape != plate.flux.shape:
            raise UserError(
                f"baseline {name!r} was cross-validated on other folds or another plate"
            )
        cv_b[name] = cv
    rows = cv_l.rows
    hf, hi = flux[rows], ivar[rows]
    held_b = {n: cv.held for n, cv in cv_b.items()}
    sels = {n: select_blend(hf, hi, cv.held, held_b, bands, min_weight) for n, cv in cv_ls.items()}

    def band_chi2(sel, k):
        return sel["chi2"][sel["baseline"][k]][k]

    names = list(cv_ls)
    pick_l = [
        names[int(np.argmin([band_chi2(sels[n], k) for n in names]))] for k in range(len(bands))
    ]
    sel = {
        "baseline": [sels[n]["baseline"][k] for k, n in enumerate(pick_l)],
        "weight": np.asarray([sels[n]["weight"][k] for k, n in enumerate(pick_l)]),
        "fitted": np.asarray([sels[n]["fitted"][k] for k, n in enumerate(pick_l)]),
        "chi2": {b: [sels[n]["chi2"][b][k] for k, n in enumerate(pick_l)] for b in held_b},
    }
    hl = np.zeros_like(cv_l.held)
    for m, n in zip(bands, pick_l):
        hl[:, m] = cv_ls[n].held[:, m]
    w_pix = np.zeros(wave.size)
    base_held = np.zeros_like(hl)
    sky_b = np.zeros(plate.flux.shape)
    for m, wb, name in zip(bands, sel["weight"], sel["baseline"]):
        w_pix[m] = wb
        base_held[:, m] = cv_b[name].held[:, m]
        sky_b[:, m] = cv_b[name].full[:, m]
    held_blend = base_held + w_pix * (hl - base_held)

    def chi2(est):
        return {
            name: _chi2(hf, hi, est, m)
            for name, m in (("blue", wave < 4500.0), ("all", np.ones(wave.size, bool)))
        }

    sky_l = np.zeros(plate.flux.shape)
    for n in dict.fromkeys(pick_l):
        full_n = np.asarray(candidates[n](plate), np.float64)
        for m, nb in zip(bands, pick_l):
            if nb == n:
                sky_l[:, m] = full_n[:, m]
    sky = sky_b + w_pix[None, :] * (sky_l - sky_b)
    bounds = [float(wave[0]), *map(float, band_edges), float(wave[-1])]
    w = sel["weight"]
    report = {
        "bands_angstrom": [[lo, hi] for lo, hi in zip(bounds[:-1], bounds[1:])],
        "baselines": list(sel["baseline"]),
        "learned": list(pick_l),
        "weights": [float(x) for x in w],
        "fitted_weights": [float(x) for x in sel["fitted"]],
        "fallback_fraction_bands": float(np.mean(w == 0)),
        "fallback_fraction_pixels": float(np.mean(w_pix == 0)),
        "held_out_fibres": int(hf.shape[0]),
        "held_out_chi2": {
            "learned": chi2(hl),
            **{n: chi2(cv.held) for n, cv in cv_b.items()},
            "blend": chi2(held_blend),
        },
        "held_out_chi2_bands": {n: [float(x) for x in c] for n, c in sel["chi2"].items()},
        # Share of the object fibres' bands whose level each kept candidate had clipped.
        "level_clipped_fraction": {
            n: getattr(candidates[n], "fraction", 0.0) for n in dict.fromkeys(pick_l)
        },
    }
    return sky, report
