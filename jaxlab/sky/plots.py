"""Figures for a subtracted plate: a fibre's spectrum and sky, residuals, error by wavelength."""

from __future__ import annotations

import numpy as np

from jaxlab.errors import UserError
from jaxlab.sky.lines import BLUE_RED_SPLIT
from jaxlab.sky.plate import Plate


def plot_sky(plate: Plate, path: str, fiber: int | None = None, title: str | None = None) -> str:
    """Three panels: fibre `fiber` (default: the faintest object fibre) with its estimated (and true)
    sky; its residual in the blue end and around [O I] 5577 / OH; the sky error against truth (or
    chi^2 of sky fibres without truth) against wavelength, median over fibres. Returns `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from scipy import ndimage

    if plate.sky is None:
        raise UserError("the plate has no SKY layer: run `sky subtract` first")
    wave = plate.wavelength
    obj_rows = np.nonzero(~plate.is_sky)[0]
    if fiber is None:
        fiber = int(obj_rows[np.argmin(np.median(plate.flux[obj_rows], 1))])
    truth = plate.true_sky is not None and plate.true_object is not None
    fig, axes = plt.subplots(3, 1, figsize=(11, 10))
    ax = axes[0]
    ax.plot(wave, plate.flux[fiber], lw=0.5, color="0.6", label="flux")
    if truth:
        ax.plot(wave, plate.true_sky[fiber], lw=0.8, color="k", label="true sky")
    ax.plot(
        wave,
        plate.sky[fiber],
        lw=0.8,
        color="C3",
        alpha=0.8,
        label=f"sky ({plate.meta.get('SKYMETH', '?')})",
    )
    ax.set_yscale("symlog", linthresh=float(np.median(plate.sky[fiber])) * 3)
    ax.set_title(
        title or f"fibre {int(plate.fibers['FIBERID'][fiber])} ({plate.fibers['OBJTYPE'][fiber]})"
    )
    ax.set_xlabel("wavelength (Å)")
    ax.set_ylabel("counts")
    ax.legend(loc="upper left", fontsize=8)

    ax = axes[1]
    resid = plate.flux[fiber] - plate.sky[fiber]
    if truth:
        resid = resid - plate.true_object[fiber]
    sigma = 1 / np.sqrt(np.maximum(plate.ivar[fiber], 1e-12))
    ax.plot(wave, resid / sigma, lw=0.5, color="C0")
    ax.axhline(0, color="k", lw=0.5)
    ax.axvline(BLUE_RED_SPLIT, color="0.5", ls=":", lw=0.8)
    ax.set_ylim(-8, 8)
    ax.set_xlabel("wavelength (Å)")
    ax.set_ylabel("(flux - sky" + (" - object" if truth else "") + ") / σ")

    ax = axes[2]
    rows = obj_rows if truth else np.nonzero(plate.is_sky)[0]
    if truth:
        err = np.abs(plate.sky[rows] - plate.true_sky[rows]) / np.maximum(
            plate.true_sky[rows], 1e-6
        )
        curve = ndimage.uniform_filter1d(100 * np.median(err, 0), 15)
        ax.set_ylabel("|sky - true sky| / true sky (%)\nmedian over object fibres")
    else:
        chi2 = (plate.flux[rows] - plate.sky[rows]) ** 2 * plate.ivar[rows]
        curve = ndimage.uniform_filter1d(np.mean(chi2, 0), 15)
        ax.set_ylabel("χ² per pixel, sky fibres")
    ax.plot(wave, curve, lw=0.8, color="C2")
    ax.axvline(BLUE_RED_SPLIT, color="0.5", ls=":", lw=0.8)
    ax.set_xlabel("wavelength (Å)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
