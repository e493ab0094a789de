"""The plate: every fibre of one LAMOST spectrograph (or plate) on one log-linear wavelength grid.

`Plate` is the in-memory object every part of `jaxlab.sky` passes around; `read_plate` / `write_plate`
map it to the documented FITS layout (docs/sky.md), and `read_lamost_spectrum` reads LAMOST's
single-fibre files (DR1-7 image layout and DR8+ table layout).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import sys
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from astropy.io import fits
from astropy.io.fits.verify import VerifyError
from astropy.table import Table

from jaxlab.errors import OutputExistsError, UserError

SKY_OBJTYPE = "SKY"


class SkyFormatError(UserError):
    """A plate or spectrum file that does not follow the documented layout."""


def log_wavelength(coeff0: float, coeff1: float, n_pix: int) -> np.ndarray:
    """Vacuum wavelengths (Angstrom) of a log-linear grid: 10**(COEFF0 + COEFF1 * k), float64."""
    return 10.0 ** (coeff0 + coeff1 * np.arange(n_pix, dtype=np.float64))


@dataclasses.dataclass
class Plate:
    """Spectra of all fibres of one exposure on a shared log-linear grid.

    flux, ivar: float32 [F, W]; mask: int32 [F, W] (0 = good). `fibers` is the fibre table: columns
    FIBERID (int), OBJTYPE (str, "SKY" for sky fibres), X, Y (focal-plane mm, float), SPID (int); any
    further columns (e.g. the simulator's TRUE_SHIFT, TRUE_THROUGHPUT) travel with it. Truth layers
    (`true_sky`, `true_object`) exist for simulated plates; `sky` / `skysub` are written by a
    subtraction method (named in `meta["SKYMETH"]`).
    """

    flux: np.ndarray
    ivar: np.ndarray
    mask: np.ndarray
    coeff0: float
    coeff1: float
    fibers: dict[str, np.ndarray]
    true_sky: np.ndarray | None = None
    true_object: np.ndarray | None = None
    sky: np.ndarray | None = None
    skysub: np.ndarray | None = None
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def n_fibers(self) -> int:
        return self.flux.shape[0]

    @property
    def n_pix(self) -> int:
        return self.flux.shape[1]

    @property
    def wavelength(self) -> np.ndarray:
        return log_wavelength(self.coeff0, self.coeff1, self.n_pix)

    @property
    def is_sky(self) -> np.ndarray:
        """Boolean [F]: OBJTYPE == "SKY"."""
        return np.char.strip(np.asarray(self.fibers["OBJTYPE"]).astype(str)) == SKY_OBJTYPE

    @property
    def positions(self) -> np.ndarray:
        """Focal-plane positions [F, 2] (X, Y) in mm."""
        return np.stack([np.asarray(self.fibers["X"]), np.asarray(self.fibers["Y"])], -1).astype(
            np.float64
        )

    def with_sky(self, sky: np.ndarray, method: str) -> Plate:
        """A copy carrying the sky estimate `sky` [F, W] and SKYSUB = FLUX - SKY."""
        sky = np.asarray(sky, np.float32)
        if sky.shape != self.flux.shape:
            raise ValueError(f"sky has shape {sky.shape}, the plate's flux {self.flux.shape}")
        meta = dict(self.meta, SKYMETH=method)
        return dataclasses.replace(self, sky=sky, skysub=self.flux - sky, meta=meta)

    def validate(self) -> None:
        """Raise SkyFormatError unless the plate can be written in the documented layout.

        Checks: FLUX non-empty [F, W]; IVAR, MASK and every optional layer [F, W]; COEFF0/COEFF1
        finite, COEFF1 > 0; IVAR finite and >= 0; MASK integral (fits int32); the fibre table has
        FIBERID, OBJTYPE, X, Y, SPID and every column has F rows of a storable dtype.
        """
        _check_plate(self, "plate")


# --------------------------------------------------------------------------------------------
# FITS I/O (layout documented in docs/sky_format.md)
# --------------------------------------------------------------------------------------------

PLATE_FORMAT = "JAXLAB-PLATE"
# MASK bit set by read_plate on FLUX pixels that are NaN or infinite (their FLUX and IVAR become 0)
NONFINITE_MASK_BIT = 1 << 30
PLATE_FMTVER = 1

_REQUIRED_COLUMNS = ("FIBERID", "OBJTYPE", "X", "Y", "SPID")
_REQUIRED_HDUS = ("FLUX", "IVAR", "MASK", "FIBERMAP")
_LAYERS = ("true_sky", "true_object", "sky", "skysub")  # optional [F, W] layers; HDU = name.upper()
# PRIMARY keys owned by the layout (never part of `meta`).
_LAYOUT_KEYS = frozenset(
    "FORMAT FMTVER TELESCOP COEFF0 COEFF1 CRVAL1 CD1_1 CRPIX1 DC-FLAG VACUUM NFIBER NPIX".split()
)
# FITS structural / bookkeeping keys (never part of `meta` either).
_STRUCTURAL_KEYS = frozenset(
    "SIMPLE BITPIX NAXIS EXTEND XTENSION PCOUNT GCOUNT EXTNAME EXTVER EXTLEVEL BSCALE BZERO BLANK "
    "CHECKSUM DATASUM END COMMENT HISTORY".split()
)
_RESERVED_KEY_RE = re.compile(r"^(NAXIS\d+|COEFF\d+)$")
_KEY_RE = re.compile(r"^[A-Z0-9_-]{1,8}$")
# LAMOST single-fibre files: layout keys written by write_lamost_spectrum and the HDU0 keys that
# read_lamost_spectrum reports in its "header" entry.
_LAMOST_LAYOUT_KEYS = frozenset("TELESCOP COEFF0 COEFF1 CRVAL1 CD1_1 CRPIX1 DC-FLAG VACUUM".split())
LAMOST_HEADER_KEYS = (
    "OBSID DESIG RA DEC FIBERID SPID FIBERTYPE OBJTYPE CLASS PLANID LMJD MJD EXPTIME Z".split()
)
# FITS keywords have <= 8 characters: LAMOST files carry FIBERTYPE as FIBERTYP (a HIERARCH
# FIBERTYPE card is accepted as well).
_LAMOST_ALIASES = {"FIBERTYPE": ("FIBERTYP", "FIBERTYPE")}


def _lamost_value(header: fits.Header, key: str) -> Any:
    """header[key] (via _LAMOST_ALIASES), strings stripped; None if absent."""
    for name in _LAMOST_ALIASES.get(key, (key,)):
        if name in header:
            value = header[name]
            return value.strip() if isinstance(value, str) else value
    return None


_LAMOST_COLUMNS = ("FLUX", "IVAR", "WAVELENGTH", "ANDMASK", "ORMASK", "NORMALIZATION")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
        value, (bool, np.bool_)
    )


def _set_card(header: fits.Header, key: str, value: Any, comment: str = "") -> None:
    """header[key] = (value, comment), keeping every float bit-exact.

    astropy truncates a float's text to 20 characters (e.g. 0.00010000123456789012); such values
    are written as a free-format card with the shortest round-tripping scientific text instead.
    """
    if isinstance(value, (float, np.floating)):
        value = float(value)
        if len(repr(value)) > 20:
            text = np.format_float_scientific(value, unique=True, exp_digits=2).upper()
            image = f"{key:<8}= {text:>20}" + (f" / {comment}" if comment else "")
            if key in header:
                del header[key]
            header.append(fits.Card.fromstring(image[:80]), end=True)
            return
    elif isinstance(value, np.bool_):
        value = bool(value)
    elif isinstance(value, np.integer):
        value = int(value)
    elif isinstance(value, np.str_):
        value = str(value)
    header[key] = (value, comment)


def _check_header_entries(entries: dict[str, Any], reserved: frozenset[str], what: str) -> None:
    """ValueError unless every key is an uppercase FITS keyword (<= 8 chars, not reserved) and
    every value a str (printable ASCII) / int / finite float / bool scalar."""
    for key, value in entries.items():
        if not isinstance(key, str) or not _KEY_RE.match(key):
            raise ValueError(
                f"{what} key {key!r}: must be an uppercase FITS keyword of 1-8 characters "
                "(A-Z, 0-9, '_', '-')"
            )
        if key in reserved or key in _STRUCTURAL_KEYS or _RESERVED_KEY_RE.match(key):
            raise ValueError(f"{what} key {key!r} is reserved by the file layout")
        if isinstance(value, (bool, np.bool_)):
            continue
        if isinstance(value, (str, np.str_)):
            if not all(32 <= ord(c) < 127 for c in value):
                raise ValueError(f"{what}[{key!r}]: strings must be printable ASCII")
            continue
        if _is_number(value):
            if not np.isfinite(value):
                raise ValueError(f"{what}[{key!r}] = {value!r}: FITS headers cannot hold NaN/inf")
            if isinstance(value, (int, np.integer)) and not -(2**63) <= int(value) < 2**63:
                raise ValueError(f"{what}[{key!r}] = {value!r} does not fit a 64-bit integer")
            continue
        raise ValueError(
            f"{what}[{key!r}] has type {type(value).__name__}; only str, int, float and bool "
            "scalars can be stored in a FITS header"
        )


def _as_int(arr: Any, dtype: type, what: str) -> np.ndarray:
    """`arr` as integer `dtype`; SkyFormatError if its values are not integers that fit."""
    a = np.asarray(arr)
    if a.dtype.kind == "b":
        return a.astype(dtype)
    if a.dtype.kind not in "iuf":
        raise SkyFormatError(f"{what}: expected integers, got dtype {a.dtype}")
    if a.dtype.kind == "f" and not (np.all(np.isfinite(a)) and np.all(a == np.round(a))):
        raise SkyFormatError(f"{what}: expected integer values, found non-integral or NaN entries")
    info = np.iinfo(dtype)
    if a.size and (a.min() < info.min or a.max() > info.max):
        raise SkyFormatError(f"{what}: values outside the {np.dtype(dtype).name} range")
    return a.astype(dtype)


def _fiber_column(name: str, values: Any, n_fibers: int, where: str) -> np.ndarray:
    """One fibre-table column in its on-disk / in-memory dtype (see docs/sky_format.md)."""
    a = np.asarray(values)
    what = f"{where}: FIBERMAP column {name!r}"
    if a.ndim == 0 or a.shape[0] != n_fibers:
        raise SkyFormatError(
            f"{what} has {0 if a.ndim == 0 else a.shape[0]} rows; FLUX has {n_fibers} fibres"
        )
    if a.dtype.kind == "O":
        a = np.asarray(a.tolist())
        if a.dtype.kind == "O":
            raise SkyFormatError(f"{what}: object column that is neither numeric nor string")
    if a.dtype.kind == "S":
        a = np.char.decode(a, "ascii", errors="replace")
    if name == "FIBERID":
        return _as_int(a, np.int32, what)
    if name == "SPID":
        narrow = a.dtype.kind in "iu" and a.dtype.itemsize <= 2
        return _as_int(a, np.int16 if narrow else np.int32, what)
    if name in ("X", "Y"):
        if a.dtype.kind not in "iuf":
            raise SkyFormatError(f"{what}: expected numbers (mm), got dtype {a.dtype}")
        return a.astype(np.float64)
    if name == "OBJTYPE" and a.dtype.kind != "U":
        raise SkyFormatError(f"{what}: expected strings, got dtype {a.dtype}")
    if a.dtype.kind == "U":
        if not all(s.isascii() for s in a.ravel().tolist()):
            raise SkyFormatError(f"{what}: strings must be ASCII")
        return np.char.strip(a) if name == "OBJTYPE" else np.char.rstrip(a)
    if a.dtype.kind not in "biufc":
        raise SkyFormatError(f"{what}: unsupported dtype {a.dtype}")
    if a.dtype == np.int8:  # astropy would store int8 as a logical column
        return a.astype(np.int16)
    return a.astype(a.dtype.newbyteorder("="))


def _check_plate(plate: Plate, where: str) -> None:
    """SkyFormatError unless `plate` satisfies the documented invariants (see Plate.validate)."""
    flux = np.asarray(plate.flux)
    if flux.ndim != 2 or 0 in flux.shape:
        raise SkyFormatError(f"{where}: FLUX must be a non-empty [F, W] array, got {flux.shape}")
    for name in ("ivar", "mask", *_LAYERS):
        arr = getattr(plate, name)
        if arr is None:
            if name in ("ivar", "mask"):
                raise SkyFormatError(f"{where}: {name.upper()} is missing")
            continue
        if np.shape(arr) != flux.shape:
            raise SkyFormatError(
                f"{where}: {name.upper()} has shape {np.shape(arr)}, FLUX {flux.shape}; "
                "all layers must be [F, W]"
            )
    for key, value in (("COEFF0", plate.coeff0), ("COEFF1", plate.coeff1)):
        if not _is_number(value) or not np.isfinite(value):
            raise SkyFormatError(f"{where}: {key} = {value!r} is not a finite number")
    if plate.coeff1 <= 0:
        raise SkyFormatError(f"{where}: COEFF1 = {plate.coeff1!r} must be > 0 (log10 step)")
    ivar = np.asarray(plate.ivar)
    bad = ~(np.isfinite(ivar) & (ivar >= 0))
    if bad.any():
        f, w = np.argwhere(bad)[0]
        raise SkyFormatError(
            f"{where}: IVAR has {int(bad.sum())} negative or non-finite entries "
            f"(first at fibre {f}, pixel {w}: {ivar[f, w]!r})"
        )
    _as_int(plate.mask, np.int32, f"{where}: MASK")
    fibers = plate.fibers
    missing = [c for c in _REQUIRED_COLUMNS if c not in fibers]
    if missing:
        raise SkyFormatError(f"{where}: FIBERMAP lacks column(s) {', '.join(missing)}")
    for name, values in fibers.items():
        _fiber_column(name, values, flux.shape[0], where)


_COLUMN_UNITS = {"X": "mm", "Y": "mm"}  # focal-plane positions (TUNITn)


def _fibermap_hdu(fibers: dict[str, np.ndarray], n_fibers: int) -> fits.BinTableHDU:
    cols = {}
    for name, values in fibers.items():
        a = _fiber_column(name, values, n_fibers, "plate")
        cols[name] = np.char.encode(a, "ascii") if a.dtype.kind == "U" else a
    table = Table(cols)
    for name, unit in _COLUMN_UNITS.items():
        table[name].unit = unit
    hdu = fits.table_to_hdu(table)
    hdu.name = "FIBERMAP"
    return hdu


def spectral_wcs_cards(coeff0: float, coeff1: float) -> list[tuple[str, Any, str]]:
    """FITS WCS keywords of axis 1 (wavelength) of an ``[F, W]`` image on the log-linear grid
    10**(COEFF0 + COEFF1 * k), k = 0..W-1 (vacuum Angstrom).

    FITS spectral WCS (Greisen et al. 2006) 'WAVE-LOG': lambda = CRVAL1 * exp(CDELT1 * (p - CRPIX1)
    / CRVAL1) at 1-based pixel p, so CRVAL1 = 10**COEFF0 and CDELT1 = CRVAL1 * ln(10) * COEFF1.
    COEFF0 / COEFF1 are kept beside them for LAMOST tools. Axis 2 is the fibre (row) index.
    """
    crval = 10.0 ** float(coeff0)
    return [
        ("WCSAXES", 2, "two WCS axes: wavelength, fibre"),
        ("CTYPE1", "WAVE-LOG", "vacuum wavelength, log-linear grid"),
        ("CUNIT1", "Angstrom", ""),
        ("CRPIX1", 1.0, "reference pixel (1-based)"),
        ("CRVAL1", crval, "wavelength of pixel 1 = 10**COEFF0"),
        ("CDELT1", crval * np.log(10.0) * float(coeff1), "= CRVAL1 * ln(10) * COEFF1"),
        ("CTYPE2", "FIBER", "fibre row (0-based index = pixel - 1)"),
        ("CRPIX2", 1.0, ""),
        ("CRVAL2", 0.0, ""),
        ("CDELT2", 1.0, ""),
        ("SPECSYS", "TOPOCENT", "wavelengths as observed"),
        ("COEFF0", float(coeff0), "log10(lambda/Angstrom) of pixel 1 (LAMOST)"),
        ("COEFF1", float(coeff1), "log10(lambda) step per pixel (LAMOST)"),
    ]


def _image_hdu(
    name: str, data: np.ndarray, dtype: type, unit: str | None, wcs: list | None = None
) -> fits.ImageHDU:
    hdu = fits.ImageHDU(np.ascontiguousarray(data, dtype=dtype), name=name)
    if unit:
        hdu.header["BUNIT"] = unit
    for key, value, comment in wcs or ():
        _set_card(hdu.header, key, value, comment)
    return hdu


def _atomic_write(hdul: fits.HDUList, path: str | os.PathLike, overwrite: bool) -> None:
    """Write `hdul` to a temporary file next to `path`, then os.replace it into place.

    A path ending in ".gz" is written gzip-compressed. OutputExistsError (a FileExistsError) if
    `path` exists and not `overwrite`.
    """
    path = os.fspath(path)
    if os.path.exists(path) and not overwrite:
        raise OutputExistsError(f"{path} exists (pass overwrite=True to replace it)")
    directory, name = os.path.split(os.path.abspath(path))
    gz = ".gz" if name.lower().endswith(".gz") else ""
    tmp = os.path.join(directory, f".{name}.{uuid.uuid4().hex[:12]}.tmp{gz}")
    try:
        hdul.writeto(tmp, output_verify="exception")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_plate(plate: Plate, path: str | os.PathLike, overwrite: bool = False) -> None:
    """Write `plate` to `path` in the JAXLAB-PLATE FITS layout (docs/sky_format.md).

    The plate is validated first (SkyFormatError; ValueError for unstorable `meta`) and the file is
    written to a temporary name then renamed, so a failure never leaves a partial file. A path
    ending in ".gz" is gzip-compressed. FileExistsError if `path` exists and not `overwrite`.
    """
    _check_plate(plate, f"plate not written to {os.fspath(path)}")
    _check_header_entries(plate.meta, _LAYOUT_KEYS, "plate.meta")
    n_fibers, n_pix = np.shape(plate.flux)

    primary = fits.PrimaryHDU()
    h = primary.header
    _set_card(h, "FORMAT", PLATE_FORMAT, "jaxlab.sky plate file")
    _set_card(h, "FMTVER", PLATE_FMTVER, "plate format version")
    _set_card(h, "TELESCOP", "LAMOST")
    _set_card(h, "NFIBER", int(n_fibers), "number of fibres (rows)")
    _set_card(h, "NPIX", int(n_pix), "number of wavelength pixels")
    _set_card(h, "COEFF0", float(plate.coeff0), "log10(lambda/Angstrom) of pixel 0")
    _set_card(h, "COEFF1", float(plate.coeff1), "log10(lambda) step per pixel")
    _set_card(h, "CRVAL1", float(plate.coeff0), "= COEFF0")
    _set_card(h, "CD1_1", float(plate.coeff1), "= COEFF1")
    _set_card(h, "CRPIX1", 1, "reference pixel (1-based)")
    _set_card(h, "DC-FLAG", 1, "log-linear wavelength grid")
    _set_card(h, "VACUUM", True, "vacuum wavelengths")
    for key, value in plate.meta.items():
        _set_card(h, key, value)

    unit = plate.meta.get("BUNIT")
    unit = str(unit) if unit else None
    wcs = spectral_wcs_cards(plate.coeff0, plate.coeff1)
    hdus: list[fits.hdu.base.ExtensionHDU] = [
        _image_hdu("FLUX", plate.flux, np.float32, unit, wcs),
        _image_hdu("IVAR", plate.ivar, np.float32, f"({unit})**-2" if unit else None, wcs),
        _image_hdu("MASK", _as_int(plate.mask, np.int32, "MASK"), np.int32, None, wcs),
        _fibermap_hdu(plate.fibers, n_fibers),
    ]
    for name in _LAYERS:
        layer = getattr(plate, name)
        if layer is not None:
            hdus.append(_image_hdu(name.upper(), layer, np.float32, unit, wcs))
    _atomic_write(fits.HDUList([primary, *hdus]), path, overwrite)


@contextlib.contextmanager
def _open_fits(path: str | os.PathLike) -> Iterator[tuple[str, fits.HDUList]]:
    """(name, HDUList) for a FITS file (optionally .gz), fully loaded into memory.

    Missing files, non-FITS files and astropy read/verify failures inside the `with` block become
    SkyFormatError naming the file.
    """
    name = os.fspath(path)
    if not os.path.isfile(name):
        raise SkyFormatError(f"{name}: no such file (or not a regular file)")
    try:
        hdul = fits.open(name, memmap=False, lazy_load_hdus=False)
    except (OSError, ValueError, EOFError) as e:
        raise SkyFormatError(f"{name}: not a readable FITS file ({e})") from e
    try:
        yield name, hdul
    except SkyFormatError:
        raise
    except (OSError, ValueError, EOFError, VerifyError) as e:
        raise SkyFormatError(f"{name}: malformed FITS content ({type(e).__name__}: {e})") from e
    finally:
        hdul.close()


def _header_number(header: fits.Header, key: str, where: str) -> float:
    """header[key] as a finite float; SkyFormatError naming `key` if absent or not one."""
    if key not in header:
        raise SkyFormatError(f"{where}: header keyword {key} is missing")
    try:
        value = header[key]
    except VerifyError as e:
        raise SkyFormatError(f"{where}: header keyword {key} is not a finite number ({e})") from e
    if not _is_number(value) or not np.isfinite(value):
        raise SkyFormatError(f"{where}: header keyword {key} = {value!r} is not a finite number")
    return float(value)


def _image(hdus: dict[str, Any], name: str, where: str) -> np.ndarray:
    hdu = hdus[name]
    if not getattr(hdu, "is_image", False) or hdu.data is None:
        raise SkyFormatError(f"{where}: HDU {name!r} is not an image HDU with data")
    return np.asarray(hdu.data)


def _read_fibermap(hdu: Any, n_fibers: int, where: str) -> dict[str, np.ndarray]:
    if not isinstance(hdu, (fits.BinTableHDU, fits.TableHDU)) or hdu.data is None:
        raise SkyFormatError(f"{where}: HDU 'FIBERMAP' is not a table")
    names = list(hdu.columns.names)
    upper = {n.upper(): n for n in names}
    missing = [c for c in _REQUIRED_COLUMNS if c not in upper]
    if missing:
        raise SkyFormatError(f"{where}: HDU 'FIBERMAP' lacks column(s) {', '.join(missing)}")
    if len(hdu.data) != n_fibers:
        raise SkyFormatError(
            f"{where}: HDU 'FIBERMAP' has {len(hdu.data)} rows, FLUX has {n_fibers} fibres"
        )
    fibers = {}
    for name in names:
        key = name.upper() if name.upper() in _REQUIRED_COLUMNS else name
        fibers[key] = _fiber_column(key, np.asarray(hdu.data[name]), n_fibers, where)
    return fibers


def read_plate(path: str | os.PathLike) -> Plate:
    """Read a JAXLAB-PLATE FITS file (optionally .fits.gz) written by `write_plate`.

    Returns flux/ivar and optional layers as float32 [F, W], mask int32 [F, W], fibres as a dict of
    numpy arrays (OBJTYPE a stripped str array), meta = the non-layout PRIMARY keys. Every problem
    is a SkyFormatError naming the file and the HDU / keyword / column.
    """
    with _open_fits(path) as (where, hdul):
        header = hdul[0].header
        fmt = header.get("FORMAT", PLATE_FORMAT)
        if fmt != PLATE_FORMAT:
            raise SkyFormatError(f"{where}: FORMAT = {fmt!r}, expected {PLATE_FORMAT!r}")
        version = header.get("FMTVER", PLATE_FMTVER)
        if not isinstance(version, int) or isinstance(version, bool) or version > PLATE_FMTVER:
            raise SkyFormatError(f"{where}: FMTVER = {version!r} is not supported (<= 1)")
        hdus: dict[str, Any] = {}
        for hdu in hdul[1:]:
            hdus.setdefault(hdu.name.upper(), hdu)
        missing = [n for n in _REQUIRED_HDUS if n not in hdus]
        if missing:
            raise SkyFormatError(f"{where}: missing HDU(s) {', '.join(missing)}")
        coeff0 = _header_number(header, "COEFF0", where)
        coeff1 = _header_number(header, "COEFF1", where)

        flux = _image(hdus, "FLUX", where)
        if flux.ndim != 2:
            raise SkyFormatError(f"{where}: HDU 'FLUX' has shape {flux.shape}, expected [F, W]")
        layers = {}
        for name in ("IVAR", "MASK", *(n.upper() for n in _LAYERS)):
            if name not in hdus:
                continue
            layers[name] = _image(hdus, name, where)
            if layers[name].shape != flux.shape:
                raise SkyFormatError(
                    f"{where}: HDU {name!r} has shape {layers[name].shape}, HDU 'FLUX' "
                    f"{flux.shape}; all layers must be [F, W]"
                )
        n_fibers, n_pix = flux.shape
        for key, n in (("NFIBER", n_fibers), ("NPIX", n_pix)):
            if key in header and header[key] != n:
                raise SkyFormatError(
                    f"{where}: header keyword {key} = {header[key]!r} but HDU 'FLUX' has "
                    f"shape {flux.shape}"
                )
        fibers = _read_fibermap(hdus["FIBERMAP"], n_fibers, where)
        meta = {
            key: header[key]
            for key in header
            if key
            and key not in _LAYOUT_KEYS
            and key not in _STRUCTURAL_KEYS
            and not _RESERVED_KEY_RE.match(key)
        }
        flux, ivar, mask = _mask_nonfinite_flux(
            flux.astype(np.float32),
            layers["IVAR"].astype(np.float32),
            _as_int(layers["MASK"], np.int32, f"{where}: HDU 'MASK'"),
            where,
        )
        plate = Plate(
            flux=flux,
            ivar=ivar,
            mask=mask,
            coeff0=coeff0,
            coeff1=coeff1,
            fibers=fibers,
            meta=meta,
            **{n: layers[n.upper()].astype(np.float32) for n in _LAYERS if n.upper() in layers},
        )
        _check_plate(plate, where)
        _check_usable(plate, where)
        return plate


def _mask_nonfinite_flux(flux, ivar, mask, where: str):
    """NaN / infinite FLUX pixels get MASK bit NONFINITE_MASK_BIT, FLUX 0 and IVAR 0 (one warning
    line with the count), so that no method reads them."""
    bad = ~np.isfinite(flux)
    if not bad.any():
        return flux, ivar, mask
    f, w = (int(x) for x in np.argwhere(bad)[0])
    n_fibres = int(bad.any(axis=1).sum())
    print(
        f"warning: {where}: HDU 'FLUX' has {int(bad.sum())} NaN or infinite pixel(s) in "
        f"{n_fibres} fibre(s) (first: fibre {f}, pixel {w}); masked with MASK bit "
        f"{NONFINITE_MASK_BIT.bit_length() - 1}",
        file=sys.stderr,
        flush=True,
    )
    mask = np.where(bad, mask | NONFINITE_MASK_BIT, mask).astype(np.int32)
    return np.where(bad, 0.0, flux).astype(np.float32), np.where(bad, 0.0, ivar), mask


def _check_usable(plate: Plate, where: str) -> None:
    """SkyFormatError when no pixel, or no sky-fibre pixel, carries data: IVAR 0 everywhere (after
    NaN / infinite FLUX pixels were given IVAR 0)."""
    usable = plate.ivar > 0
    if not usable.any():
        raise SkyFormatError(
            f"{where}: no usable pixel: HDU 'IVAR' is 0 (or HDU 'FLUX' not finite) at every "
            f"fibre and pixel (fibre 0, pixel 0: IVAR {float(plate.ivar[0, 0])})"
        )
    sky = plate.is_sky
    if sky.any() and not usable[sky].any():
        f = int(np.flatnonzero(sky)[0])
        raise SkyFormatError(
            f"{where}: no usable pixel in the {int(sky.sum())} sky fibre(s): HDU 'IVAR' is 0 (or "
            f"HDU 'FLUX' not finite) at each of their pixels (first sky fibre {f}, pixel 0)"
        )


# --------------------------------------------------------------------------------------------
# LAMOST single-fibre low-resolution spectra
# --------------------------------------------------------------------------------------------


def _log_linear_coeffs(wavelength: np.ndarray) -> tuple[float, float] | None:
    """(COEFF0, COEFF1) if `wavelength` is log-linear to 1e-6 dex (float32 rounding), else None."""
    if wavelength.size < 2 or not np.all(wavelength > 0):
        return None
    lw = np.log10(wavelength.astype(np.float64))
    c0, c1 = lw[0], (lw[-1] - lw[0]) / (lw.size - 1)
    if c1 <= 0 or np.max(np.abs(lw - (c0 + c1 * np.arange(lw.size)))) > 1e-6:
        return None
    return float(c0), float(c1)


def _float_mask(row: np.ndarray, what: str) -> np.ndarray:
    if not np.all(np.isfinite(row)):
        raise SkyFormatError(f"{what} has non-finite entries")
    return _as_int(np.rint(row), np.int32, what)


def _read_lamost(path: str | os.PathLike) -> tuple[dict[str, Any], fits.Header]:
    """read_lamost_spectrum's dict plus the full HDU0 header."""
    with _open_fits(path) as (where, hdul):
        header = hdul[0].header.copy()
        data0 = hdul[0].data
        table = None
        if data0 is None:
            by_name = {h.name.upper(): h for h in hdul[1:]}
            table = by_name.get("COADD", hdul[1] if len(hdul) > 1 else None)
            if not isinstance(table, fits.BinTableHDU):
                table = None
        coeffs = None
        if "COEFF0" in header or "COEFF1" in header:
            coeffs = (
                _header_number(header, "COEFF0", where),
                _header_number(header, "COEFF1", where),
            )
        normalization = None

        if data0 is not None and np.ndim(data0) == 2:
            layout = "image"
            img = np.asarray(data0, dtype=np.float64)
            if img.shape[0] != 5:
                raise SkyFormatError(
                    f"{where}: HDU 0 image has shape {img.shape}; the image layout has 5 rows "
                    "(flux, ivar, wavelength, andmask, ormask)"
                )
            flux, ivar = img[0], img[1]
            andmask = _float_mask(img[3], f"{where}: HDU 0 row 3 (andmask)")
            ormask = _float_mask(img[4], f"{where}: HDU 0 row 4 (ormask)")
            n_pix = img.shape[1]
            if coeffs is not None:
                wavelength = log_wavelength(*coeffs, n_pix)
            else:
                wavelength = img[2]
                if not (np.all(wavelength > 0) and np.all(np.diff(wavelength) > 0)):
                    raise SkyFormatError(
                        f"{where}: header keywords COEFF0/COEFF1 are missing and HDU 0 row 2 "
                        "(wavelength) is not positive and strictly increasing"
                    )
                coeffs = _log_linear_coeffs(wavelength)
        elif table is not None:
            layout = "table"
            hname = f"HDU {hdul.index(table)} {table.name!r}"
            if len(table.data) != 1:
                raise SkyFormatError(
                    f"{where}: {hname} has {len(table.data)} rows; the table layout has one row "
                    "of array columns"
                )
            cols = {n.upper(): n for n in table.columns.names}
            for required in ("FLUX", "IVAR"):
                if required not in cols:
                    raise SkyFormatError(f"{where}: {hname} lacks column {required}")
            row = table.data[0]
            arrays = {
                c: np.ravel(np.asarray(row[cols[c]], dtype=np.float64))
                for c in _LAMOST_COLUMNS
                if c in cols
            }
            lengths = {c: a.size for c, a in arrays.items()}
            if len(set(lengths.values())) != 1:
                raise SkyFormatError(
                    f"{where}: {hname} array columns differ in length: "
                    + ", ".join(f"{c}={n}" for c, n in lengths.items())
                )
            flux, ivar = arrays["FLUX"], arrays["IVAR"]
            n_pix = flux.size
            zeros = np.zeros(n_pix, np.int32)
            andmask = (
                _float_mask(arrays["ANDMASK"], f"{where}: {hname} column ANDMASK")
                if "ANDMASK" in arrays
                else zeros
            )
            ormask = (
                _float_mask(arrays["ORMASK"], f"{where}: {hname} column ORMASK")
                if "ORMASK" in arrays
                else zeros.copy()
            )
            if "NORMALIZATION" in arrays:
                normalization = arrays["NORMALIZATION"].astype(np.float32)
            if "WAVELENGTH" in arrays:
                wavelength = arrays["WAVELENGTH"]
                if coeffs is None:
                    coeffs = _log_linear_coeffs(wavelength)
            elif coeffs is not None:
                wavelength = log_wavelength(*coeffs, n_pix)
            else:
                raise SkyFormatError(
                    f"{where}: {hname} has no WAVELENGTH column and HDU 0 has no COEFF0/COEFF1"
                )
        else:
            raise SkyFormatError(
                f"{where}: neither LAMOST layout recognised: HDU 0 has no 2-D image "
                "(DR1-7) and there is no binary-table HDU 1 / 'COADD' (DR8+)"
            )

        selected = {}
        for key in LAMOST_HEADER_KEYS:
            value = _lamost_value(header, key)
            if value is not None:
                selected[key] = value
        out = {
            "wavelength": np.asarray(wavelength, np.float64),
            "flux": np.asarray(flux, np.float32),
            "ivar": np.asarray(ivar, np.float32),
            "andmask": andmask,
            "ormask": ormask,
            "header": selected,
            "layout": layout,
            "coeffs": coeffs,
            "normalization": normalization,
        }
        return out, header


def read_lamost_spectrum(path: str | os.PathLike) -> dict[str, Any]:
    """Read a LAMOST single-fibre low-resolution spectrum (DR1-7 image or DR8+ table layout).

    Returns a dict: wavelength float64 [W] (vacuum Angstrom), flux, ivar float32 [W], andmask,
    ormask int32 [W], header (the LAMOST_HEADER_KEYS present in HDU 0), layout ("image" or
    "table"), coeffs ((COEFF0, COEFF1) from HDU 0, else inferred from a log-linear wavelength
    array, else None) and normalization (float32 [W] from the table layout's NORMALIZATION column,
    else None). Problems raise SkyFormatError naming the file and the HDU / keyword / column.
    """
    return _read_lamost(path)[0]


def write_lamost_spectrum(
    path: str | os.PathLike,
    wavelength_coeffs: tuple[float, float],
    flux: np.ndarray,
    ivar: np.ndarray,
    andmask: np.ndarray | None = None,
    ormask: np.ndarray | None = None,
    header: dict[str, Any] | None = None,
    layout: str = "image",
    overwrite: bool = False,
) -> None:
    """Write one fibre as a LAMOST low-resolution spectrum file.

    wavelength_coeffs = (COEFF0, COEFF1): log10 of pixel 0's vacuum wavelength (Angstrom) and the
    log10 step. flux, ivar: [W]; andmask, ormask: integer [W] (zeros if None). layout "image"
    (DR1-7: HDU 0 float32 [5, W] = flux, ivar, wavelength, andmask, ormask) or "table" (DR8+:
    header-only HDU 0 + one-row BINTABLE 'COADD' with FLUX, IVAR (float32), WAVELENGTH (float64),
    ANDMASK, ORMASK (int32)). `header` entries go into HDU 0 (same rules as Plate.meta; a
    FIBERTYPE entry is written as LAMOST's 8-character keyword FIBERTYP).
    """
    if layout not in ("image", "table"):
        raise ValueError(f"layout must be 'image' or 'table', got {layout!r}")
    coeff0, coeff1 = (float(c) for c in wavelength_coeffs)
    if not (np.isfinite(coeff0) and np.isfinite(coeff1) and coeff1 > 0):
        raise ValueError(f"wavelength_coeffs {wavelength_coeffs!r}: need finite values, COEFF1 > 0")
    flux = np.asarray(flux, np.float32)
    if flux.ndim != 1 or flux.size == 0:
        raise ValueError(f"flux must be a non-empty 1-D array, got shape {flux.shape}")
    n_pix = flux.size
    arrays = {"ivar": np.asarray(ivar, np.float32)}
    for name, mask in (("andmask", andmask), ("ormask", ormask)):
        mask = np.zeros(n_pix, np.int32) if mask is None else _as_int(mask, np.int32, name)
        arrays[name] = mask
    for name, a in arrays.items():
        if a.shape != flux.shape:
            raise ValueError(f"{name} has shape {a.shape}, flux {flux.shape}")
    header = dict(header or {})
    if "FIBERTYPE" in header:  # LAMOST's 8-character keyword
        header["FIBERTYP"] = header.pop("FIBERTYPE")
    _check_header_entries(header, _LAMOST_LAYOUT_KEYS, "header")

    primary = fits.PrimaryHDU()
    h = primary.header
    _set_card(h, "TELESCOP", "LAMOST")
    _set_card(h, "COEFF0", coeff0, "log10(lambda/Angstrom) of pixel 0")
    _set_card(h, "COEFF1", coeff1, "log10(lambda) step per pixel")
    _set_card(h, "CRVAL1", coeff0, "= COEFF0")
    _set_card(h, "CD1_1", coeff1, "= COEFF1")
    _set_card(h, "CRPIX1", 1, "reference pixel (1-based)")
    _set_card(h, "DC-FLAG", 1, "log-linear wavelength grid")
    _set_card(h, "VACUUM", True, "vacuum wavelengths")
    for key, value in header.items():
        _set_card(h, key, value)
    wavelength = log_wavelength(coeff0, coeff1, n_pix)
    if layout == "image":
        for name in ("andmask", "ormask"):
            if np.any(np.abs(arrays[name]) >= 2**24):
                raise ValueError(f"{name}: values >= 2**24 are not exact in the float32 image")
        primary.data = np.stack(
            [flux, arrays["ivar"], wavelength, arrays["andmask"], arrays["ormask"]]
        ).astype(np.float32)
        hdul = fits.HDUList([primary])
    else:
        cols = [
            fits.Column("FLUX", f"{n_pix}E", array=flux[None]),
            fits.Column("IVAR", f"{n_pix}E", array=arrays["ivar"][None]),
            fits.Column("WAVELENGTH", f"{n_pix}D", array=wavelength[None]),
            fits.Column("ANDMASK", f"{n_pix}J", array=arrays["andmask"][None]),
            fits.Column("ORMASK", f"{n_pix}J", array=arrays["ormask"][None]),
        ]
        hdul = fits.HDUList([primary, fits.BinTableHDU.from_columns(cols, name="COADD")])
    _atomic_write(hdul, path, overwrite)


def plate_from_lamost_spectra(
    paths: Sequence[str | os.PathLike], objtype_key: str = "OBJTYPE"
) -> Plate:
    """Gather LAMOST single-fibre files of one spectrograph into a Plate (one row per file).

    All files must share one log-linear grid: COEFF0 and COEFF1 equal within 1e-9 and the same
    NPIX (SkyFormatError naming the first file that differs). Fibre table: FIBERID (header, else
    the 1-based position in `paths`), SPID (header, else -1), OBJTYPE (header `objtype_key`,
    uppercased; FIBERTYPE (keyword FIBERTYP) = 'Sky' also gives "SKY"; "UNKNOWN" if neither), X, Y (header keys X, Y
    in mm, else NaN -- the SMI method needs real positions). mask = ormask.
    """
    paths = list(paths)
    if not paths:
        raise ValueError("plate_from_lamost_spectra needs at least one file")
    spectra, headers, grid = [], [], None
    for path in paths:
        spec, header = _read_lamost(path)
        name = os.fspath(path)
        if spec["coeffs"] is None:
            raise SkyFormatError(f"{name}: wavelength grid is not log-linear (no COEFF0/COEFF1)")
        this = (*spec["coeffs"], spec["flux"].size)
        if grid is None:
            grid = this
        elif this[2] != grid[2] or any(abs(a - b) > 1e-9 for a, b in zip(this[:2], grid[:2])):
            raise SkyFormatError(
                f"{name}: wavelength grid (COEFF0, COEFF1, NPIX) = {this} differs from "
                f"{os.fspath(paths[0])}'s {grid}"
            )
        bad = ~(np.isfinite(spec["ivar"]) & (spec["ivar"] >= 0))
        if bad.any():
            raise SkyFormatError(f"{name}: IVAR has {int(bad.sum())} negative/non-finite entries")
        spectra.append(spec)
        headers.append(header)

    def number(header: fits.Header, key: str, default: float) -> float:
        value = header.get(key)
        return float(value) if _is_number(value) else default

    objtype = []
    for header in headers:
        value = str(header.get(objtype_key, "")).strip().upper()
        if str(_lamost_value(header, "FIBERTYPE")).upper() == SKY_OBJTYPE:
            value = SKY_OBJTYPE
        objtype.append(value or "UNKNOWN")
    fibers = {
        "FIBERID": np.array(
            [int(number(h, "FIBERID", i + 1)) for i, h in enumerate(headers)], np.int32
        ),
        "OBJTYPE": np.array(objtype, dtype=str),
        "X": np.array([number(h, "X", np.nan) for h in headers], np.float64),
        "Y": np.array([number(h, "Y", np.nan) for h in headers], np.float64),
        "SPID": np.array([int(number(h, "SPID", -1)) for h in headers], np.int32),
    }
    assert grid is not None
    return Plate(
        flux=np.stack([s["flux"] for s in spectra]),
        ivar=np.stack([s["ivar"] for s in spectra]),
        mask=np.stack([s["ormask"] for s in spectra]),
        coeff0=grid[0],
        coeff1=grid[1],
        fibers=fibers,
    )


# --------------------------------------------------------------------------------------------
# specutils
# --------------------------------------------------------------------------------------------

_SPECTRUM_LAYERS = ("flux", "skysub", "sky", "true_sky", "true_object")


def to_specutils(plate: Plate, fiber: int, *, layer: str = "flux"):
    """Row ``fiber`` (0-based) of a plate layer as a ``specutils.Spectrum``.

    The spectral axis is the plate's vacuum wavelength grid in Angstrom [W]; flux is ``layer``'s
    row [W] in ``meta["BUNIT"]`` (dimensionless when the plate has none: LAMOST flux is relative),
    uncertainty the row's IVAR as ``InverseVariance`` and mask ``MASK != 0`` (True = bad, as
    specutils has it). ``meta`` holds the fibre's table row and the plate's header entries.
    """
    import astropy.units as u
    from astropy.nddata import InverseVariance
    from specutils import Spectrum

    if layer not in _SPECTRUM_LAYERS:
        raise UserError(f"layer {layer!r}: expected one of {', '.join(_SPECTRUM_LAYERS)}")
    values = getattr(plate, layer)
    if values is None:
        raise UserError(f"the plate has no {layer.upper()} layer")
    if isinstance(fiber, (bool, np.bool_)) or not isinstance(fiber, (int, np.integer)):
        raise UserError(f"fiber must be a row index (int), got {fiber!r}")
    if not 0 <= int(fiber) < plate.n_fibers:
        raise UserError(f"fiber {fiber}: the plate has rows 0..{plate.n_fibers - 1}")
    fiber = int(fiber)
    bunit = plate.meta.get("BUNIT")
    unit = u.Unit(str(bunit), parse_strict="raise") if bunit else u.dimensionless_unscaled
    ivar_unit = unit**-2
    return Spectrum(
        flux=np.asarray(values[fiber], np.float32) * unit,
        spectral_axis=plate.wavelength * u.AA,
        uncertainty=InverseVariance(np.asarray(plate.ivar[fiber], np.float32), unit=ivar_unit),
        mask=np.asarray(plate.mask[fiber]) != 0,
        meta={
            "fiber": {k: np.asarray(v)[fiber].tolist() for k, v in plate.fibers.items()},
            "header": dict(plate.meta),
            "layer": layer,
        },
    )
