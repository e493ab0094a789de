"""FITS I/O of jaxlab.sky: the plate layout (write_plate / read_plate) and LAMOST single-fibre files."""

from __future__ import annotations

import dataclasses
import gzip
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from jaxlab.sky.plate import (
    Plate,
    SkyFormatError,
    plate_from_lamost_spectra,
    read_lamost_spectrum,
    read_plate,
    write_lamost_spectrum,
    write_plate,
)

C0, C1 = 3.5682, 1e-4  # LAMOST-like grid: 3700 Angstrom, 1e-4 dex per pixel


def _grid(c0: float, c1: float, n: int) -> np.ndarray:
    """The expected wavelengths, computed here independently of the library (float64)."""
    return 10.0 ** (c0 + c1 * np.arange(n, dtype=np.float64))


def make_plate(n_fibers: int = 12, n_pix: int = 300, layers: bool = True, seed: int = 0) -> Plate:
    rng = np.random.default_rng(seed)
    shape = (n_fibers, n_pix)
    objtype = np.array(["SKY" if i % 4 == 0 else "STAR" for i in range(n_fibers)])
    fibers = {
        "FIBERID": np.arange(1, n_fibers + 1, dtype=np.int32),
        "OBJTYPE": objtype,
        "X": rng.uniform(-300, 300, n_fibers),
        "Y": rng.uniform(-300, 300, n_fibers),
        "SPID": np.full(n_fibers, 7, np.int16),
        "TRUE_SHIFT": rng.normal(size=n_fibers).astype(np.float32),
        "TRUE_THROUGHPUT": rng.uniform(0.8, 1.2, n_fibers),
        "GOOD": rng.uniform(size=n_fibers) > 0.3,
    }
    opt = (lambda: rng.normal(size=shape).astype(np.float32)) if layers else (lambda: None)
    return Plate(
        flux=rng.normal(size=shape).astype(np.float32),
        ivar=rng.uniform(0, 5, shape).astype(np.float32),
        mask=rng.integers(0, 2**20, shape).astype(np.int32),
        # a COEFF1 whose repr is > 20 characters: astropy would truncate it if written naively
        coeff0=C0 + 1.2345678901234e-9,
        coeff1=0.00010000123456789012,
        fibers=fibers,
        true_sky=opt(),
        true_object=opt(),
        sky=opt(),
        skysub=opt(),
        meta={"SKYMETH": "PCA", "NITER": 3, "SEED": 12345, "RCHI2": 1.0123456789012345e-05,
              "SIM": True, "LMJD": 56789},
    )  # fmt: skip


def assert_plates_equal(a: Plate, b: Plate) -> None:
    for name in ("flux", "ivar", "mask", "true_sky", "true_object", "sky", "skysub"):
        x, y = getattr(a, name), getattr(b, name)
        if x is None:
            assert y is None, name
            continue
        assert y.dtype == x.dtype and y.shape == x.shape, name
        assert x.tobytes() == y.tobytes(), name  # bit-for-bit
    assert (a.coeff0, a.coeff1) == (b.coeff0, b.coeff1)
    assert list(a.fibers) == list(b.fibers)
    for name, x in a.fibers.items():
        y = b.fibers[name]
        np.testing.assert_array_equal(y, x, err_msg=name)
        if x.dtype.kind != "U":
            assert y.dtype == x.dtype, name
        else:
            assert y.dtype.kind == "U", name
    assert a.meta == b.meta
    assert {k: type(v) for k, v in a.meta.items()} == {k: type(v) for k, v in b.meta.items()}


# ------------------------------------------------------------------------------------------------
# plate layout


def test_plate_round_trip_bit_exact(tmp_path: Path) -> None:
    plate = make_plate()
    path = tmp_path / "plate.fits"
    write_plate(plate, path)
    back = read_plate(path)
    assert_plates_equal(plate, back)
    assert back.is_sky.tolist() == plate.is_sky.tolist()
    np.testing.assert_array_equal(back.wavelength, plate.wavelength)
    with fits.open(path) as hdul:
        names = [h.name for h in hdul]
        h0 = hdul[0].header
        assert names == ["PRIMARY", "FLUX", "IVAR", "MASK", "FIBERMAP"] + [
            "TRUE_SKY", "TRUE_OBJECT", "SKY", "SKYSUB"
        ]  # fmt: skip
        assert h0["FORMAT"] == "JAXLAB-PLATE" and h0["FMTVER"] == 1 and h0["TELESCOP"] == "LAMOST"
        assert (h0["NFIBER"], h0["NPIX"], h0["CRPIX1"], h0["DC-FLAG"]) == (12, 300, 1, 1)
        assert h0["VACUUM"] is True
        assert h0["CRVAL1"] == plate.coeff0 and h0["CD1_1"] == plate.coeff1
        assert hdul["FLUX"].data.dtype.kind == "f" and hdul["FLUX"].data.dtype.itemsize == 4
        assert hdul["MASK"].data.dtype.kind == "i" and hdul["MASK"].data.dtype.itemsize == 4
    with pytest.raises(FileExistsError):
        write_plate(plate, path)
    write_plate(dataclasses.replace(plate, meta={}), path, overwrite=True)
    assert read_plate(path).meta == {}
    assert os.listdir(tmp_path) == ["plate.fits"]  # no temporary files left behind


def test_plate_without_optional_layers(tmp_path: Path) -> None:
    plate = make_plate(layers=False)
    write_plate(plate, tmp_path / "p.fits")
    back = read_plate(tmp_path / "p.fits")
    assert back.true_sky is None and back.true_object is None
    assert back.sky is None and back.skysub is None
    assert_plates_equal(plate, back)


def test_plate_fits_gz(tmp_path: Path) -> None:
    plate = make_plate(n_fibers=5, n_pix=50)
    write_plate(plate, tmp_path / "p.fits")
    with open(tmp_path / "p.fits", "rb") as src, gzip.open(tmp_path / "q.fits.gz", "wb") as dst:
        shutil.copyfileobj(src, dst)
    assert_plates_equal(plate, read_plate(tmp_path / "q.fits.gz"))
    write_plate(plate, tmp_path / "w.fits.gz")  # write_plate compresses a .gz path itself
    assert (tmp_path / "w.fits.gz").read_bytes()[:2] == b"\x1f\x8b"
    assert_plates_equal(plate, read_plate(tmp_path / "w.fits.gz"))


def _edit(src: Path, dst: Path, edit) -> Path:
    """Copy the plate file `src` to `dst` after `edit(hdul)` changed it (astropy directly)."""
    with fits.open(src) as hdul:
        hdul = fits.HDUList([h.copy() for h in hdul])
        edit(hdul)
        hdul.writeto(dst)
    return dst


def _set_ivar(hdul: fits.HDUList, ivar: np.ndarray) -> None:
    hdul["IVAR"].data = ivar


def _drop_column(name: str):
    def edit(hdul: fits.HDUList) -> None:
        cols = hdul["FIBERMAP"].columns
        hdul["FIBERMAP"] = fits.BinTableHDU.from_columns(
            [c for c in cols if c.name != name], name="FIBERMAP"
        )

    return edit


def _fibermap_rows(n: int):
    def edit(hdul: fits.HDUList) -> None:
        data = hdul["FIBERMAP"].data[:n]
        hdul["FIBERMAP"] = fits.BinTableHDU(data, name="FIBERMAP")

    return edit


def _negative_ivar(hdul: fits.HDUList) -> None:
    ivar = hdul["IVAR"].data.copy()
    ivar[3, 17] = -1.0
    hdul["IVAR"].data = ivar


BAD_FILES = {
    "no FLUX": (lambda h: h.pop(h.index_of("FLUX")), "FLUX"),
    "no IVAR": (lambda h: h.pop(h.index_of("IVAR")), "IVAR"),
    "no MASK": (lambda h: h.pop(h.index_of("MASK")), "MASK"),
    "no FIBERMAP": (lambda h: h.pop(h.index_of("FIBERMAP")), "FIBERMAP"),
    "no COEFF0": (lambda h: h[0].header.remove("COEFF0"), "COEFF0"),
    "no COEFF1": (lambda h: h[0].header.remove("COEFF1"), "COEFF1"),
    "string COEFF1": (lambda h: h[0].header.set("COEFF1", "1e-4"), "COEFF1"),
    "IVAR shape": (lambda h: _set_ivar(h, np.ones((12, 299), np.float32)), "IVAR"),
    "SKY shape": (lambda h: h["SKY"].__setattr__("data", np.ones((11, 300), "f4")), "SKY"),
    "NPIX": (lambda h: h[0].header.set("NPIX", 301), "NPIX"),
    "NFIBER": (lambda h: h[0].header.set("NFIBER", 13), "NFIBER"),
    "FIBERMAP rows": (_fibermap_rows(11), "FIBERMAP"),
    "no OBJTYPE": (_drop_column("OBJTYPE"), "OBJTYPE"),
    "no SPID": (_drop_column("SPID"), "SPID"),
    "negative IVAR": (_negative_ivar, "IVAR"),
}


@pytest.fixture(scope="module")
def good_plate_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("good") / "good.fits"
    write_plate(make_plate(), path)
    return path


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_read_plate_errors_name_the_problem(case: str, good_plate_file: Path, tmp_path: Path):
    edit, needle = BAD_FILES[case]
    path = _edit(good_plate_file, tmp_path / "bad.fits", edit)
    with pytest.raises(SkyFormatError) as err:
        read_plate(path)
    assert needle in str(err.value) and "bad.fits" in str(err.value)


def test_read_plate_non_finite_coeff(good_plate_file: Path, tmp_path: Path) -> None:
    # FITS headers cannot hold NaN/inf through astropy; patch the card images in the raw bytes.
    raw = good_plate_file.read_bytes()
    for key, text, name in (("COEFF1", "1E999", "inf.fits"), ("COEFF0", "NaN", "nan.fits")):
        start = raw.index(f"{key:<8}= ".encode())
        card = f"{key:<8}= {text:>20}".ljust(80).encode()
        (tmp_path / name).write_bytes(raw[:start] + card + raw[start + 80 :])
        with pytest.raises(SkyFormatError, match=rf"{name}.*{key}"):
            read_plate(tmp_path / name)


def test_read_plate_missing_or_not_fits(tmp_path: Path) -> None:
    with pytest.raises(SkyFormatError, match="nope.fits"):
        read_plate(tmp_path / "nope.fits")
    (tmp_path / "text.fits").write_text("not a FITS file\n" * 20)
    with pytest.raises(SkyFormatError, match="text.fits"):
        read_plate(tmp_path / "text.fits")


@pytest.mark.parametrize(
    "change, needle",
    [
        (dict(ivar=np.ones((12, 299), np.float32)), "IVAR"),
        (dict(sky=np.ones((12, 301), np.float32)), "SKY"),
        (dict(coeff1=float("nan")), "COEFF1"),
        (dict(fibers={"FIBERID": np.arange(12)}), "OBJTYPE"),
        (dict(meta={"lower": 1}), "lower"),
        (dict(meta={"ARRAY": np.arange(3)}), "ARRAY"),
        (dict(meta={"NPIX": 5}), "NPIX"),
    ],
)
def test_write_plate_rejects_invalid_plate_and_writes_nothing(change, needle, tmp_path: Path):
    plate = dataclasses.replace(make_plate(), **change)
    with pytest.raises(ValueError, match=needle):  # SkyFormatError is a ValueError
        write_plate(plate, tmp_path / "p.fits")
    assert os.listdir(tmp_path) == []


def test_write_plate_negative_ivar_is_sky_format_error(tmp_path: Path) -> None:
    plate = make_plate()
    plate.ivar[0, 0] = -2.0
    with pytest.raises(SkyFormatError, match="IVAR"):
        write_plate(plate, tmp_path / "p.fits")
    with pytest.raises(SkyFormatError, match="IVAR"):
        plate.validate()
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------------------------------------
# LAMOST single-fibre files


def _spectrum(n: int = 400, seed: int = 1):
    rng = np.random.default_rng(seed)
    flux = rng.normal(100, 10, n).astype(np.float32)
    ivar = rng.uniform(0, 1, n).astype(np.float32)
    andmask = rng.integers(0, 2**10, n).astype(np.int32)
    ormask = andmask | rng.integers(0, 2**12, n).astype(np.int32)
    return flux, ivar, andmask, ormask


@pytest.mark.parametrize("layout", ["image", "table"])
def test_lamost_round_trip(layout: str, tmp_path: Path) -> None:
    flux, ivar, andmask, ormask = _spectrum()
    header = {"OBSID": 123456, "RA": 10.5, "DEC": -3.25, "FIBERID": 42, "SPID": 7,
              "FIBERTYPE": "Obj", "OBJTYPE": "Star", "CLASS": "STAR", "LMJD": 56789, "X": 1.5}  # fmt: skip
    path = tmp_path / f"spec-{layout}.fits"
    write_lamost_spectrum(path, (C0, C1), flux, ivar, andmask, ormask, header, layout=layout)
    spec = read_lamost_spectrum(path)
    assert spec["layout"] == layout
    assert spec["wavelength"].dtype == np.float64
    np.testing.assert_array_equal(spec["wavelength"], _grid(C0, C1, flux.size))
    for name, want in (("flux", flux), ("ivar", ivar), ("andmask", andmask), ("ormask", ormask)):
        assert spec[name].dtype == want.dtype, name
        np.testing.assert_array_equal(spec[name], want, err_msg=name)
    assert spec["header"] == {k: v for k, v in header.items() if k != "X"}
    assert spec["coeffs"] == (C0, C1)
    with fits.open(path) as hdul:
        assert hdul[0].header["TELESCOP"] == "LAMOST" and hdul[0].header["CD1_1"] == C1
        if layout == "image":
            assert hdul[0].data.shape == (5, flux.size)
        else:
            assert hdul[0].data is None and hdul[1].name == "COADD" and len(hdul[1].data) == 1


def test_lamost_image_without_coeffs_uses_row_2(tmp_path: Path) -> None:
    flux, ivar, andmask, ormask = _spectrum(n=200)
    wave = np.linspace(3700.0, 9000.0, 200)  # any positive increasing grid
    data = np.stack([flux, ivar, wave, andmask, ormask]).astype(np.float32)
    fits.PrimaryHDU(data).writeto(tmp_path / "a.fits")
    spec = read_lamost_spectrum(tmp_path / "a.fits")
    np.testing.assert_array_equal(spec["wavelength"], wave.astype(np.float32))
    np.testing.assert_array_equal(spec["ormask"], ormask)
    assert spec["layout"] == "image" and spec["coeffs"] is None  # linear, not log-linear

    data[2, 50] = data[2, 49]  # no longer strictly increasing
    fits.PrimaryHDU(data).writeto(tmp_path / "b.fits")
    with pytest.raises(SkyFormatError, match=r"b\.fits.*COEFF0.*row 2"):
        read_lamost_spectrum(tmp_path / "b.fits")


def _table_file(path: Path, columns: list[fits.Column]) -> Path:
    hdul = fits.HDUList([fits.PrimaryHDU(), fits.BinTableHDU.from_columns(columns, name="COADD")])
    hdul.writeto(path)
    return path


def test_lamost_layout_errors(tmp_path: Path) -> None:
    fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(np.ones(3))]).writeto(tmp_path / "g.fits")
    with pytest.raises(SkyFormatError, match=r"g\.fits.*neither"):
        read_lamost_spectrum(tmp_path / "g.fits")
    fits.PrimaryHDU(np.ones((3, 10), np.float32)).writeto(tmp_path / "rows.fits")
    with pytest.raises(SkyFormatError, match=r"rows\.fits.*5 rows"):
        read_lamost_spectrum(tmp_path / "rows.fits")

    n = 20
    col = lambda name, n=n, rows=1: fits.Column(name, f"{n}E", array=np.ones((rows, n), "f4"))
    path = _table_file(tmp_path / "two.fits", [col("FLUX", rows=2), col("IVAR", rows=2)])
    with pytest.raises(SkyFormatError, match=r"two\.fits.*COADD.*2 rows"):
        read_lamost_spectrum(path)
    path = _table_file(tmp_path / "zero.fits", [col("FLUX", rows=0), col("IVAR", rows=0)])
    with pytest.raises(SkyFormatError, match=r"zero\.fits.*0 rows"):
        read_lamost_spectrum(path)
    path = _table_file(tmp_path / "len.fits", [col("FLUX"), col("IVAR"), col("WAVELENGTH", 19)])
    with pytest.raises(SkyFormatError, match=r"len\.fits.*WAVELENGTH=19"):
        read_lamost_spectrum(path)
    path = _table_file(tmp_path / "noivar.fits", [col("FLUX"), col("WAVELENGTH")])
    with pytest.raises(SkyFormatError, match=r"noivar\.fits.*IVAR"):
        read_lamost_spectrum(path)
    path = _table_file(tmp_path / "noflux.fits", [col("IVAR"), col("WAVELENGTH")])
    with pytest.raises(SkyFormatError, match=r"noflux\.fits.*FLUX"):
        read_lamost_spectrum(path)
    with pytest.raises(SkyFormatError, match="missing.fits"):
        read_lamost_spectrum(tmp_path / "missing.fits")


def test_lamost_table_wavelength_from_coeffs(tmp_path: Path) -> None:
    n = 30
    hdr = fits.Header({"COEFF0": C0, "COEFF1": C1})
    cols = [fits.Column(c, f"{n}E", array=np.ones((1, n), np.float32)) for c in ("FLUX", "IVAR")]
    cols.append(fits.Column("NORMALIZATION", f"{n}E", array=np.full((1, n), 2.0, np.float32)))
    hdul = fits.HDUList([fits.PrimaryHDU(header=hdr), fits.BinTableHDU.from_columns(cols)])
    hdul.writeto(tmp_path / "t.fits")
    spec = read_lamost_spectrum(tmp_path / "t.fits")
    np.testing.assert_array_equal(spec["wavelength"], _grid(C0, C1, n))
    np.testing.assert_array_equal(spec["ormask"], np.zeros(n, np.int32))
    np.testing.assert_array_equal(spec["normalization"], np.full(n, 2.0, np.float32))


def test_plate_from_lamost_spectra(tmp_path: Path) -> None:
    kinds = [
        {"OBJTYPE": "Sky"},
        {"OBJTYPE": "Star", "FIBERTYPE": "Obj"},
        {"OBJTYPE": "Galaxy", "FIBERTYPE": "Sky"},  # LAMOST FIBERTYPE marks a sky fibre too
        {"OBJTYPE": "SKY", "X": 12.5, "Y": -3.0},
        {"FIBERTYPE": "Obj"},
    ]
    paths = []
    for i, kind in enumerate(kinds):
        flux, ivar, andmask, ormask = _spectrum(n=250, seed=i)
        header = dict(kind, FIBERID=10 + i, SPID=3)
        path = tmp_path / f"spec{i}.fits"
        layout = "image" if i % 2 else "table"
        write_lamost_spectrum(path, (C0, C1), flux, ivar, andmask, ormask, header, layout=layout)
        paths.append(path)
    plate = plate_from_lamost_spectra(paths)
    assert plate.flux.shape == (5, 250) and plate.flux.dtype == np.float32
    assert plate.is_sky.tolist() == [True, False, True, True, False]
    np.testing.assert_array_equal(plate.wavelength, _grid(C0, C1, 250))
    np.testing.assert_array_equal(plate.fibers["FIBERID"], [10, 11, 12, 13, 14])
    np.testing.assert_array_equal(plate.fibers["SPID"], np.full(5, 3))
    assert plate.fibers["OBJTYPE"].tolist() == ["SKY", "STAR", "SKY", "SKY", "UNKNOWN"]
    assert plate.fibers["X"][3] == 12.5 and np.isnan(plate.fibers["X"][0])
    np.testing.assert_array_equal(plate.mask[2], _spectrum(n=250, seed=2)[3])
    plate.validate()
    write_plate(plate, tmp_path / "plate.fits")  # a gathered plate is a valid plate
    assert_plates_equal(plate, read_plate(tmp_path / "plate.fits"))

    flux, ivar, _, _ = _spectrum(n=250)
    odd = tmp_path / "odd.fits"
    write_lamost_spectrum(odd, (C0 + 1e-6, C1), flux, ivar, header={"OBJTYPE": "STAR"})
    with pytest.raises(SkyFormatError, match=r"odd\.fits"):
        plate_from_lamost_spectra([*paths[:3], odd, paths[3]])
    short = tmp_path / "short.fits"
    write_lamost_spectrum(short, (C0, C1), flux[:-1], ivar[:-1])
    with pytest.raises(SkyFormatError, match=r"short\.fits"):
        plate_from_lamost_spectra([paths[0], short])
