"""SMI: resampling against an independent cubic reference, calibration against the simulator's
shifts, sky error against Super Sky on a held-out plate, Orbax round trip, CLI end to end."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest

from jaxlab.cli import main
from jaxlab.sky import (
    SMIConfig,
    evaluate_sky,
    load_smi,
    read_plate,
    save_smi,
    simulate_plate,
    smi_shifts,
    smi_sky,
    super_sky,
    train_smi,
)
from jaxlab.sky.smi import resample

N_FIB, N_SKY = 250, 20


def _keys_reference(x: np.ndarray, pos: float) -> float:
    """Keys (a=-0.5) cubic convolution at fractional position `pos`, float64, clamped edges."""

    def kernel(s):
        s = abs(s)
        if s < 1:
            return 1.5 * s**3 - 2.5 * s**2 + 1
        if s < 2:
            return -0.5 * s**3 + 2.5 * s**2 - 4 * s + 2
        return 0.0

    base = int(np.floor(pos))
    total = 0.0
    for j in range(base - 1, base + 3):
        total += x[min(max(j, 0), len(x) - 1)] * kernel(pos - j)
    return total


def test_resample_matches_float64_keys_cubic():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 40))
    shift = np.array([0.3, -1.7, 0.0])
    got = np.asarray(resample(jnp.asarray(x, jnp.float32), jnp.asarray(shift, jnp.float32)))
    want = np.array([[_keys_reference(x[i], k + shift[i]) for k in range(40)] for i in range(3)])
    np.testing.assert_allclose(got, want, atol=1e-5)  # float32 arithmetic on O(1) values
    # A smooth function is interpolated to third order: a sub-pixel shift of a wide Gaussian.
    t = np.arange(200.0)
    g = np.exp(-0.5 * ((t - 100) / 6) ** 2)
    out = np.asarray(resample(jnp.asarray(g[None], jnp.float32), jnp.asarray([0.4], jnp.float32)))[
        0
    ]
    np.testing.assert_allclose(out, np.exp(-0.5 * ((t + 0.4 - 100) / 6) ** 2), atol=2e-4)


@pytest.fixture(scope="module")
def trained():
    train = [simulate_plate(500 + i, n_fibers=N_FIB, n_sky=N_SKY) for i in range(16)]
    cfg = SMIConfig(steps_shift=100, steps_shared=80, steps_individual=80)
    model, history = train_smi(train, cfg, progress=False)
    return model, history


@pytest.fixture(scope="module")
def held_out():
    return simulate_plate(7, n_fibers=N_FIB, n_sky=N_SKY)


def test_training_history(trained):
    _, history = trained
    cal = history["calibration"]["loss"]
    assert np.mean(cal[-20:]) < np.mean(cal[:20])
    common = history["common"]["reconstruction"]
    assert np.mean(common[-10:]) < 0.5 * np.mean(common[:10])
    assert len(history["individual"]["club"]) == 80
    assert history["seconds"] > 0


def test_calibration_recovers_fibre_shifts(trained, held_out):
    model, _ = trained
    pred = smi_shifts(model, held_out)
    true = held_out.fibers["TRUE_SHIFT"]
    # Shifts are relative to the lines' laboratory positions; a blend of lines in the real sky can
    # move a line's centroid by a fixed amount, so compare after removing the common offset.
    err = (pred - pred.mean()) - (true - true.mean())
    assert np.sqrt(np.mean(err**2)) < 0.4 * true.std()  # true scatter 0.1 A; measured ~0.03 A
    assert np.corrcoef(pred, true)[0, 1] > 0.9


def test_smi_beats_super_sky_on_a_held_out_plate(trained, held_out):
    model, _ = trained
    smi = evaluate_sky(held_out, smi_sky(model, held_out))
    ss = evaluate_sky(held_out, super_sky(held_out))
    for region in ("blue", "all"):
        assert smi["sky_error_pct"][region] < ss["sky_error_pct"][region]
    assert abs(smi["chi2_per_pixel"]["all"] - 1) < 0.1


def test_save_load_gives_the_same_sky(trained, held_out, tmp_path):
    model, history = trained
    save_smi(model, tmp_path / "m", history)
    save_smi(model, tmp_path / "m", history)  # replacing a model directory works
    again = load_smi(tmp_path / "m")
    np.testing.assert_array_equal(smi_sky(again, held_out), smi_sky(model, held_out))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    with pytest.raises(FileExistsError):
        save_smi(model, tmp_path / "other")


def test_bad_plates_are_clear_errors(trained, held_out):
    import dataclasses

    model, _ = trained
    fibers = dict(held_out.fibers, OBJTYPE=np.full(held_out.n_fibers, "STAR"))
    with pytest.raises(ValueError, match="sky fibres"):
        smi_sky(model, dataclasses.replace(held_out, fibers=fibers))
    fibers = dict(held_out.fibers, X=np.full(held_out.n_fibers, np.nan))
    with pytest.raises(ValueError, match="positions"):
        smi_sky(model, dataclasses.replace(held_out, fibers=fibers))
    with pytest.raises(ValueError, match="one wavelength grid"):
        train_smi([held_out, dataclasses.replace(held_out, coeff0=held_out.coeff0 + 1e-3)])


def test_cli_simulate_subtract_evaluate(tmp_path, trained, capsys):
    model, _ = trained
    save_smi(model, tmp_path / "model")
    plate = tmp_path / "p.fits"
    assert (
        main(
            [
                "sky",
                "simulate",
                "--out",
                str(plate),
                "--seed",
                "3",
                "--fibers",
                str(N_FIB),
                "--sky-fibers",
                str(N_SKY),
            ]
        )
        == 0
    )
    for method in ("supersky", "pca", "smi"):
        argv = [
            "sky",
            "subtract",
            str(plate),
            "--method",
            method,
            "--out",
            str(tmp_path / f"{method}.fits"),
        ]
        if method == "smi":
            argv += ["--model", str(tmp_path / "model")]
        assert main(argv) == 0
    out = read_plate(tmp_path / "smi.fits")
    np.testing.assert_allclose(out.skysub, out.flux - out.sky, rtol=0, atol=1e-3)
    assert out.meta["SKYMETH"] == "smi"
    argv = ["sky", "evaluate", str(tmp_path / "supersky.fits"), str(tmp_path / "smi.fits")]
    assert main([*argv, "--json", str(tmp_path / "m.json"), "--plot", str(tmp_path / "p.png")]) == 0
    rep = json.loads((tmp_path / "m.json").read_text())
    assert set(rep) == {str(tmp_path / "supersky.fits"), str(tmp_path / "smi.fits")}
    assert (tmp_path / "p_1.png").stat().st_size > 10_000
    # A file that is not a plate is an error message and exit status 2, not a traceback.
    (tmp_path / "bad.fits").write_text("not fits")
    assert (
        main(["sky", "subtract", str(tmp_path / "bad.fits"), "--out", str(tmp_path / "x.fits")])
        == 2
    )
    assert "bad.fits" in capsys.readouterr().err
