"""Plate files in the field's formats: a spectral WCS astropy reads (WAVE-LOG), X / Y in mm,
`to_specutils`, and `sky evaluate --plot --fiber`."""

import math

import astropy.units as u
import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS

from jaxlab.errors import UserError
from jaxlab.sky import read_plate, simulate_plate, to_specutils, write_plate
from jaxlab.sky.plots import sky_figure


@pytest.fixture(scope="module")
def plate():
    p = simulate_plate(4, n_fibers=12, n_sky=4)
    p.mask[3, 100:110] = 4  # a few bad pixels in one fibre
    sky = p.true_sky * np.float32(1.02)
    return p.with_sky(sky, "scaled-truth")


def test_every_image_hdu_has_a_wcs_astropy_reads(plate, tmp_path):
    path = tmp_path / "p.fits"
    write_plate(plate, path)
    # wavelengths by hand, in float64 from the LAMOST coefficients
    want = [10.0 ** (plate.coeff0 + plate.coeff1 * k) for k in range(plate.n_pix)]
    with fits.open(path) as hdul:
        images = [h for h in hdul[1:] if h.is_image]
        assert {h.name for h in images} == {
            "FLUX",
            "IVAR",
            "MASK",
            "TRUE_SKY",
            "TRUE_OBJECT",
            "SKY",
            "SKYSUB",
        }
        for hdu in images:
            h = hdu.header
            assert h["CTYPE1"] == "WAVE-LOG" and h["CUNIT1"] == "Angstrom"
            assert (h["COEFF0"], h["COEFF1"]) == (plate.coeff0, plate.coeff1)
            wcs = WCS(h)
            assert wcs.wcs.spec == 0 and wcs.pixel_shape == (plate.n_pix, plate.n_fibers)
            lam = wcs.spectral.pixel_to_world(np.arange(plate.n_pix)).to_value(u.AA)
            np.testing.assert_allclose(lam, want, rtol=1e-12, atol=0)
            # the 2-D WCS: (pixel k, fibre row r) -> (wavelength of k, r)
            coords = wcs.pixel_to_world_values([0, plate.n_pix - 1], [5, 5])
            np.testing.assert_allclose(coords[0] * 1e10, [want[0], want[-1]], rtol=1e-12)
            np.testing.assert_allclose(coords[1], [5, 5])
        fibermap = Table.read(hdul["FIBERMAP"])
        assert fibermap["X"].unit == u.mm and fibermap["Y"].unit == u.mm
        cols = hdul["FIBERMAP"].columns
        assert cols["X"].unit == cols["Y"].unit == "mm"
    back = read_plate(path)  # the layout reader still reads it, unchanged
    assert (back.coeff0, back.coeff1) == (plate.coeff0, plate.coeff1)
    np.testing.assert_array_equal(back.flux, plate.flux)
    assert "CTYPE1" not in back.meta and "CDELT1" not in back.meta


def test_to_specutils_equals_the_plate(plate, tmp_path):
    write_plate(plate, tmp_path / "p.fits")
    p = read_plate(tmp_path / "p.fits")
    spec = to_specutils(p, 3)
    wave = [10.0 ** (p.coeff0 + p.coeff1 * k) for k in range(p.n_pix)]
    np.testing.assert_allclose(spec.spectral_axis.to_value(u.AA), wave, rtol=1e-15)
    np.testing.assert_array_equal(spec.flux.value, p.flux[3])
    assert spec.flux.unit == u.dimensionless_unscaled
    np.testing.assert_array_equal(spec.uncertainty.array, p.ivar[3])
    assert type(spec.uncertainty).__name__ == "InverseVariance"
    np.testing.assert_array_equal(spec.mask, p.mask[3] != 0)
    assert spec.mask.sum() == 10
    assert spec.meta["fiber"]["FIBERID"] == int(p.fibers["FIBERID"][3])
    sub = to_specutils(p, 3, layer="skysub")
    np.testing.assert_array_equal(sub.flux.value, p.flux[3] - p.sky[3])
    # a flux unit in BUNIT becomes the spectrum's, IVAR's its inverse square
    p.meta["BUNIT"] = "erg / (s cm2 Angstrom)"
    spec = to_specutils(p, 0)
    assert spec.flux.unit == u.erg / u.s / u.cm**2 / u.AA
    assert spec.uncertainty.unit == spec.flux.unit**-2
    for bad in (12, -1, 1.5):
        with pytest.raises(UserError, match="fiber"):
            to_specutils(p, bad)


def test_sky_evaluate_plot_with_fiber(plate, tmp_path):
    from jaxlab.cli import main

    write_plate(plate, tmp_path / "p.fits")
    fid = int(plate.fibers["FIBERID"][7])
    png = tmp_path / "p.png"
    assert (
        main(["sky", "evaluate", str(tmp_path / "p.fits"), "--plot", str(png), "--fiber", str(fid)])
        == 0
    )
    assert png.stat().st_size > 10_000
    assert (
        main(
            [
                "sky",
                "evaluate",
                str(tmp_path / "p.fits"),
                "--plot",
                str(tmp_path / "q.png"),
                "--fiber",
                "99999",
            ]
        )
        == 2
    )
    assert not (tmp_path / "q.png").exists()

    fig = sky_figure(plate, 7)
    top = fig.axes[0]
    assert top.get_title() == f"fibre {fid} ({plate.fibers['OBJTYPE'][7]})"
    lines = {ln.get_label(): ln for ln in top.get_lines()}
    truth, estimate = lines["true sky"], lines["sky estimate (scaled-truth)"]
    assert truth.get_zorder() > estimate.get_zorder()
    np.testing.assert_array_equal(truth.get_ydata(), plate.true_sky[7])
    for ax in fig.axes:
        assert any(t.get_text().startswith("blue | red") for t in ax.texts)
    bottom = fig.axes[2].get_lines()[0]
    assert bottom.get_label() == "running mean over 15 pixels"
    # the curve is the 15-pixel running mean of the median relative error (by hand, away from edges)
    obj = ~plate.is_sky
    err = 100 * np.median(
        np.abs(plate.sky[obj] - plate.true_sky[obj]) / np.maximum(plate.true_sky[obj], 1e-6), 0
    )
    k = 500
    assert math.isclose(bottom.get_ydata()[k], float(np.mean(err[k - 7 : k + 8])), rel_tol=1e-4)
