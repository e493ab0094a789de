"""Non-finite and empty data: plates with NaN / Inf FLUX or no usable pixel, PosIR with no queries."""

import dataclasses
import json

import numpy as np
import pytest

from jaxlab.cli import main
from jaxlab.retrieval import PosIRData, PosIRError, load_posir, save_posir
from jaxlab.sky import SkyFormatError, evaluate_sky, read_plate, simulate_plate, write_plate
from jaxlab.sky.plate import NONFINITE_MASK_BIT


@pytest.fixture(scope="module")
def plate():
    return simulate_plate(0, n_fibers=12, n_sky=4)


def test_nonfinite_flux_is_masked_at_read_time_with_one_warning(plate, tmp_path, capfd):
    sky = np.flatnonzero(plate.is_sky)
    flux = plate.flux.copy()
    flux[sky[0], 100:110] = np.nan
    flux[sky[1], 7] = np.inf
    flux[0, 3] = -np.inf
    bad = ~np.isfinite(flux)
    write_plate(dataclasses.replace(plate, flux=flux), tmp_path / "p.fits")
    capfd.readouterr()
    got = read_plate(tmp_path / "p.fits")
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: ")
    assert "12 NaN or infinite pixel(s) in 3 fibre(s)" in err[0] and "MASK bit 30" in err[0]
    np.testing.assert_array_equal(
        got.mask, np.where(bad, plate.mask | NONFINITE_MASK_BIT, plate.mask)
    )
    np.testing.assert_array_equal(got.flux, np.where(bad, 0.0, plate.flux))
    np.testing.assert_array_equal(got.ivar, np.where(bad, 0.0, plate.ivar))
    # every method now reads finite numbers; the metrics skip the masked pixels
    from jaxlab.sky import estimate_sky

    sky_est = estimate_sky(got, "supersky")
    assert np.isfinite(sky_est).all()
    report = evaluate_sky(got, sky_est)
    assert np.isfinite(report["chi2_per_pixel"]["all"])


def test_plates_with_nothing_usable_are_errors_naming_the_hdu(plate, tmp_path):
    write_plate(dataclasses.replace(plate, ivar=np.zeros_like(plate.ivar)), tmp_path / "zero.fits")
    with pytest.raises(SkyFormatError, match=r"zero.fits: no usable pixel: HDU 'IVAR' is 0"):
        read_plate(tmp_path / "zero.fits")
    ivar = plate.ivar.copy()
    ivar[plate.is_sky] = 0.0
    write_plate(dataclasses.replace(plate, ivar=ivar), tmp_path / "nosky.fits")
    with pytest.raises(SkyFormatError, match=r"no usable pixel in the 4 sky fibre\(s\)"):
        read_plate(tmp_path / "nosky.fits")


def test_metrics_over_no_valid_pixel_are_an_error_and_json_has_no_nan(plate, tmp_path):
    ivar = plate.ivar.copy()
    ivar[~plate.is_sky] = 0.0  # only the sky fibres can be measured
    masked = dataclasses.replace(plate, ivar=ivar)
    with pytest.raises(ValueError, match="no valid pixel to measure"):
        evaluate_sky(masked, masked.flux * 0.9)  # with truth: measured over the non-sky fibres

    # a plate whose wavelengths hold no red sky line: that region's line residual is null, not NaN
    blue = dataclasses.replace(
        plate,
        **{
            name: getattr(plate, name)[:, :1200]
            for name in ("flux", "ivar", "mask", "true_sky", "true_object")
        },
    )
    write_plate(blue.with_sky(blue.true_sky, "truth"), tmp_path / "blue.fits")
    assert (
        main(["sky", "evaluate", str(tmp_path / "blue.fits"), "--json", str(tmp_path / "m.json")])
        == 0
    )
    text = (tmp_path / "m.json").read_text()
    assert "NaN" not in text
    report = json.loads(text)
    assert report["line_residual_pct"]["red"] is None
    assert isinstance(report["line_residual_pct"]["blue"], float)


def test_posir_without_queries_is_an_error(tmp_path):
    empty = PosIRData(
        query_ids=[],
        query_texts=[],
        spans=np.zeros((0, 2), np.int64),
        doc_char_lengths=np.zeros(0, np.int64),
        doc_token_lengths=np.zeros(0, np.int64),
        corpus_ids=["d0"],
        corpus_texts=["a document"],
        qrels={},
    )
    save_posir(empty, tmp_path / "empty")
    with pytest.raises(PosIRError, match=r"queries.parquet: holds no queries"):
        load_posir(tmp_path / "empty")
    from jaxlab.retrieval import evaluate_posir

    with pytest.raises(PosIRError, match="no queries"):
        evaluate_posir(empty, None, None)


def test_opening_an_smi_model_folder_changes_nothing(tmp_path):
    import jax
    from flax import nnx

    from jaxlab.checkpoint import Checkpointer
    from jaxlab.sky import SMIConfig, load_smi, save_smi
    from jaxlab.sky.smi import SMIModel

    model = SMIModel(SMIConfig(), 64, np.arange(5), np.array([3.0, 9.0]), rngs=nnx.Rngs(1))
    save_smi(model, tmp_path / "m")
    # a save another process has in progress: opening the model must not delete it
    (tmp_path / "m" / "1.orbax-checkpoint-tmp-1234567").mkdir()
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    again = load_smi(tmp_path / "m")
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == before
    for a, b in zip(
        jax.tree.leaves(nnx.state(again)), jax.tree.leaves(nnx.state(model)), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    with pytest.raises(SkyFormatError, match="no such SMI model directory"):
        load_smi(tmp_path / "missing")
    assert not (tmp_path / "missing").exists()
    with Checkpointer(tmp_path / "lm", async_save=False) as ckpt:  # another kind of checkpoint
        ckpt.save(3, model={"w": np.ones(4, np.float32)}, extra={"step": 3})
    with pytest.raises(SkyFormatError, match="lm: not an SMI model"):
        load_smi(tmp_path / "lm")
