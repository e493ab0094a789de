"""Figures for a subtracted plate: a fibre's spectrum and sky, residuals, error by wavelength."""

from __future__ import annotations

import numpy as np

from jaxlab.errors import UserError
from jaxlab.sky.lines import BLUE_RED_SPLIT
from jaxlab.sky.plate import Plate

SMOOTH_PIXELS = 15  # running mean of the bottom panel's curve


def fiber_row(plate: Plate, fiber_id: int) -> int:
    """The row of the fibre whose FIBERID is ``fiber_id``; UserError naming the range otherwise."""
    ids = np.asarray(plate.fibers["FIBERID"])
    rows = np.flatnonzero(ids == fiber_id)
    if rows.size == 0:
        raise UserError(
            f"--fiber {fiber_id}: no fibre with that FIBERID (the plate has {ids.size} fibres, "
            f"FIBERID {int(ids.min())}..{int(ids.max())})"
        )
    return int(rows[0])


def _split_label(ax) -> None:
    """The blue / red split as a dotted line with its label at the top of the axes."""
    ax.axvline(BLUE_RED_SPLIT, color="0.5", ls=":", lw=0.8)
    ax.text(
        BLUE_RED_SPLIT,
        1.0,
        f"blue | red  ({BLUE_RED_SPLIT:.0f} Å)",
        transform=ax.get_xaxis_transform(),
        ha="center",
        va="bottom",
        fontsize=7,
        color="0.35",
    )


def sky_figure(plate: Plate, fiber: int | None = None, title: str | None = None):
    """The figure of :func:`plot_sky` (row ``fiber``; default the faintest object fibre)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from scipy import ndimage

    if plate.sky is None:
        raise UserError("the plate has no SKY layer: run `sky subtract` first")
    wave = plate.wavelength
    obj_rows = np.nonzero(~plate.is_sky)[0]
    if fiber is None:
        rows = obj_rows if obj_rows.size else np.arange(plate.n_fibers)
        fiber = int(rows[np.argmin(np.median(plate.flux[rows], 1))])
    truth = plate.true_sky is not None and plate.true_object is not None
    fig, axes = plt.subplots(3, 1, figsize=(11, 10))
    ax = axes[0]
    ax.plot(wave, plate.flux[fiber], lw=0.5, color="0.6", label="flux", zorder=1)
    ax.plot(
        wave,
        plate.sky[fiber],
        lw=1.0,
        color="C3",
        alpha=0.8,
        label=f"sky estimate ({plate.meta.get('SKYMETH', '?')})",
        zorder=2,
    )
    if truth:  # drawn above the estimate: where they differ, the truth stays visible
        ax.plot(wave, plate.true_sky[fiber], lw=0.6, color="k", label="true sky", zorder=3)
    ax.set_yscale("symlog", linthresh=max(float(np.median(plate.sky[fiber])) * 3, 1e-6))
    _split_label(ax)
    ax.set_title(
        title or f"fibre {int(plate.fibers['FIBERID'][fiber])} ({plate.fibers['OBJTYPE'][fiber]})",
        pad=14,
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
    _split_label(ax)
    ax.set_ylim(-8, 8)
    ax.set_xlabel("wavelength (Å)")
    ax.set_ylabel("(flux - sky" + (" - object" if truth else "") + ") / σ")

    ax = axes[2]
    rows = obj_rows if truth else np.nonzero(plate.is_sky)[0]
    if truth:
        err = np.abs(plate.sky[rows] - plate.true_sky[rows]) / np.maximum(
            plate.true_sky[rows], 1e-6
        )
        curve = ndimage.uniform_filter1d(100 * np.median(err, 0), SMOOTH_PIXELS)
        ax.set_ylabel("|sky - true sky| / true sky (%)\nmedian over object fibres")
    else:
        chi2 = (plate.flux[rows] - plate.sky[rows]) ** 2 * plate.ivar[rows]
        curve = ndimage.uniform_filter1d(np.mean(chi2, 0), SMOOTH_PIXELS)
        ax.set_ylabel("χ² per pixel, sky fibres")
    ax.plot(wave, curve, lw=0.8, color="C2", label=f"running mean over {SMOOTH_PIXELS} pixels")
    _split_label(ax)
    ax.legend(loc="upper right", fontsize=8)
    ax.set_xlabel("wavelength (Å)")
    fig.tight_layout()
    return fig


def plot_sky(plate: Plate, path: str, fiber: int | None = None, title: str | None = None) -> str:
    """Three panels: row ``fiber`` (default: the faintest object fibre) with its estimated sky and,
    drawn above it, the true sky; its residual over σ; the sky error against truth (or chi^2 of sky
    fibres without truth) against wavelength, median over fibres, smoothed by a running mean of
    ``SMOOTH_PIXELS``. The blue / red split of the metrics is marked and labelled. Returns `path`."""
    import matplotlib.pyplot as plt

    fig = sky_figure(plate, fiber, title)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
