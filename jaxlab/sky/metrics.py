"""Sky-subtraction metrics, each for the blue end (< 4500 A), the red end (>= 4500 A) and overall.

- `sky_error`: with truth, sum |sky_hat - sky| / sum sky over object fibres (%), and the RMS version.
- `chi2`: mean of (flux - sky_hat - object)^2 * ivar per pixel (1 at the Poisson limit). With truth
  the true object is removed and object fibres are used; without truth, sky fibres are used.
- `line_residual`: per fibre and anchor sky line, |sum over +-6 A of the continuum-subtracted
  residual| / the line's flux, median over fibres (Bai et al. 2017's 3 % / 1.5 % figure).
- `continuum_residual`: |sum of residual| / sum sky over 100 A windows free of strong sky lines,
  median over fibres and windows.
With truth the residual of these two is true sky - sky estimate on object fibres (the systematic
error, free of photon noise); without truth it is flux - sky on the sky fibres.
"""

from __future__ import annotations

import numpy as np

from jaxlab.errors import UserError
from jaxlab.sky.baselines import _line_windows, line_fluxes
from jaxlab.sky.lines import BLUE_RED_SPLIT, CONTINUUM_WINDOWS
from jaxlab.sky.plate import Plate

REGIONS = ("blue", "red", "all")


def _region_masks(wave: np.ndarray) -> dict[str, np.ndarray]:
    return {
        "blue": wave < BLUE_RED_SPLIT,
        "red": wave >= BLUE_RED_SPLIT,
        "all": np.ones_like(wave, bool),
    }


def evaluate_sky(plate: Plate, sky: np.ndarray | None = None) -> dict:
    """All metrics for a sky estimate `sky` [F, W] (default: the plate's SKY layer)."""
    sky = plate.sky if sky is None else sky
    if sky is None:
        raise UserError("no sky estimate: pass `sky` or a plate written by `sky subtract`")
    sky = np.asarray(sky, np.float64)
    wave = plate.wavelength
    regions = _region_masks(wave)
    good = (plate.mask == 0) & (plate.ivar > 0)
    ivar = np.where(good, plate.ivar, 0.0).astype(np.float64)
    flux = plate.flux.astype(np.float64)
    has_truth = plate.true_sky is not None and plate.true_object is not None
    out: dict = {"n_fibers": int(plate.n_fibers), "n_sky_fibers": int(plate.is_sky.sum())}
    out["has_truth"] = bool(has_truth)
    if has_truth:
        rows = ~plate.is_sky
        true_sky = plate.true_sky.astype(np.float64)
        resid = flux - sky - plate.true_object.astype(np.float64)
        err = (sky - true_sky)[rows]
        out["sky_error_pct"] = {
            r: float(100 * np.abs(err[:, m]).sum() / true_sky[rows][:, m].sum())
            for r, m in regions.items()
        }
        out["sky_rms_error_pct"] = {
            r: float(100 * np.sqrt(np.mean(err[:, m] ** 2)) / true_sky[rows][:, m].mean())
            for r, m in regions.items()
        }
        reference = true_sky
        # Line and continuum residuals against truth measure the sky error itself, not the noise.
        systematic = (true_sky - sky)[rows]
    else:
        rows = plate.is_sky
        resid = flux - sky
        reference = sky
        systematic = resid[rows]
    chi = resid[rows] ** 2 * ivar[rows]
    n = good[rows]
    if not n.any():
        kind = "non-sky" if has_truth else "sky"
        raise UserError(
            f"no valid pixel to measure: every pixel of the {int(rows.sum())} {kind} fibre(s) is "
            "masked or has IVAR 0"
        )
    out["chi2_per_pixel"] = {
        r: float(chi[:, m].sum() / max(n[:, m].sum(), 1)) for r, m in regions.items()
    }
    out["line_residual_pct"] = _line_residual(systematic, reference[rows], wave)
    out["continuum_residual_pct"] = _continuum_residual(systematic, reference[rows], wave)
    return out


def _line_residual(resid: np.ndarray, reference: np.ndarray, wave: np.ndarray) -> dict:
    lines = np.array([w for w, *_ in _line_windows(wave)])
    num = np.abs(line_fluxes(resid, wave))  # [F, L]
    den = line_fluxes(reference, wave)
    ok = den > 0.005 * np.max(den, axis=1, keepdims=True)
    rel = np.where(ok, num / np.where(ok, den, 1.0), np.nan)
    out = {}
    for region, sel in (("blue", lines < BLUE_RED_SPLIT), ("red", lines >= BLUE_RED_SPLIT)):
        vals = rel[:, sel]
        out[region] = float(100 * np.nanmedian(vals)) if np.isfinite(vals).any() else float("nan")
    out["all"] = float(100 * np.nanmedian(rel))
    return out


def _continuum_residual(resid: np.ndarray, reference: np.ndarray, wave: np.ndarray) -> dict:
    vals = {"blue": [], "red": []}
    for lo, hi in CONTINUUM_WINDOWS:
        m = (wave >= lo) & (wave < hi)
        if not m.any():
            continue
        rel = np.abs(resid[:, m].sum(1)) / np.maximum(reference[:, m].sum(1), 1e-9)
        vals["blue" if hi <= BLUE_RED_SPLIT else "red"].append(rel)
    out = {
        r: float(100 * np.median(np.concatenate(v))) if v else float("nan") for r, v in vals.items()
    }
    both = [x for v in vals.values() for x in v]
    out["all"] = float(100 * np.median(np.concatenate(both))) if both else float("nan")
    return out
