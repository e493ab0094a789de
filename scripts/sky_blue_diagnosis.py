"""What limits SMI in the blue end on spatially varying skies: oracle decomposition and fixes.

    python scripts/sky_blue_diagnosis.py [--families paranal-cloud keck-twilight] [--train 8]
        [--test 2] [--steps 100] [--seed 0] [--degrees 0 1 2 3] [--bases 12 24]

For each family of `scripts/sky_families.py`, SMI is trained self-supervised on `--train` plates
(as in `bench_sky.py --families`) and, on `--test` held-out plates, its blue-end sky error (< 4500 Å,
object fibres, against truth) is compared with estimates where one part of the pipeline is replaced
by its oracle (truth is read only here, for the diagnosis):

- basis floor: every fibre's true sky, aligned by the model's shifts, projected on the decoder basis
  (the best the basis can do with perfect codes);
- true sky-fibre codes: the focal-plane field is fitted to the basis codes of the sky fibres' true
  skies instead of their noisy spectra (what the photon noise of ~20 sky fibres costs), at spatial
  degree 0-3;
- true features too: the throughputs t_i also come from the true sky lines;
- common residual removed: SMI minus the mean over object fibres of its residual (the part of the
  error shared by all fibres: basis / common code);
- per-fibre blue scale: SMI times the per-fibre factor that best fits the truth in the blue (a grey
  per-fibre error in the blue: chromatic throughput, field amplitude);
- field without throughput: the focal-plane field alone, without the per-fibre sky-line throughput
  t_i (and field times throughput without the individual correction z).

Fixes tried without truth: the field's spatial degree chosen per band by the held-out sky-fibre
cross-validation of `jaxlab.sky.safety` (`smi_sky(..., spatial_degree=d)`), and more decoder
components (`--bases`). Writes `docs/results/sky/sky_blue_diagnosis.json` and prints a table;
`--report` prints the means over plates and draws `docs/results/sky/sky_blue_diagnosis.png`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from jaxlab.sky import SMIConfig, evaluate_sky, pca_clean, smi_sky, super_sky, train_smi
from jaxlab.sky.safety import _band_masks, cross_validate, select_blend
from jaxlab.sky.smi import (
    _aligned_jit,
    _codes,
    _field,
    _highpass,
    _PlateTensors,
    _prepare,
    _sky_codes,
    _spatial_features,
    _throughput,
    resample,
)

sys.path.insert(0, str(Path(__file__).parent))
from sky_families import make_plate  # noqa: E402


def blue(plate, sky) -> float:
    return float(evaluate_sky(plate, sky)["sky_error_pct"]["blue"])


def both(plate, sky) -> dict:
    e = evaluate_sky(plate, sky)["sky_error_pct"]
    return {"blue": float(e["blue"]), "all": float(e["all"])}


def oracles(model, plate, degrees) -> dict:
    """Blue sky error (%) of SMI with parts replaced by their oracle (see the module docstring)."""
    cfg = model.config
    prep = _prepare(plate, cfg)
    shift, a_flux, a_ivar, a_hp = _aligned_jit(
        model, jnp.asarray(prep.highpass), jnp.asarray(prep.flux), jnp.asarray(prep.ivar)
    )
    true_n = plate.true_sky.astype(np.float64) / prep.scale
    a_true = resample(jnp.asarray(true_n, jnp.float32), shift)
    a_true_hp = resample(jnp.asarray(_highpass(true_n, cfg.highpass_sigma), jnp.float32), shift)
    basis = model.basis[...]
    rows = np.nonzero(prep.is_sky)[0]
    lp = model.line_pixels[...]
    codes_true = _sky_codes(basis, a_true, a_ivar)

    def decode(codes):
        return np.asarray(resample(codes @ basis, -shift), np.float64) * prep.scale

    def smi_codes(hp, sky_codes, degree):
        t = _PlateTensors(
            hp[:, lp],
            a_ivar[:, lp],
            jnp.asarray(prep.pos),
            jnp.asarray(prep.neighbour),
            sky_codes,
            jnp.asarray(rows),
        )
        return _codes(model, t, individual=True, degree=degree)[0]

    noisy_sky_codes = _sky_codes(basis, a_flux[rows], a_ivar[rows])
    smi = decode(smi_codes(a_hp, noisy_sky_codes, None))
    out = {"smi (recomputed)": blue(plate, smi), "basis floor": blue(plate, decode(codes_true))}
    for d in degrees:
        out[f"smi, degree {d}"] = blue(plate, decode(smi_codes(a_hp, noisy_sky_codes, d)))
        out[f"true sky-fibre codes, degree {d}"] = blue(
            plate, decode(smi_codes(a_hp, codes_true[rows], d))
        )
        out[f"true codes and features, degree {d}"] = blue(
            plate, decode(smi_codes(a_true_hp, codes_true[rows], d))
        )
    # The field alone, without the per-fibre sky-line throughput t_i (z = 0): is the throughput
    # measured on the sky lines the right scale for the blue continuum?
    t = _PlateTensors(
        a_hp[:, lp],
        a_ivar[:, lp],
        jnp.asarray(prep.pos),
        jnp.asarray(prep.neighbour),
        noisy_sky_codes,
        jnp.asarray(rows),
    )
    hpb = model.hp_basis[...]
    common = jnp.mean(model.shared(t.features), 0)
    phi = _spatial_features(t.pos, cfg.spatial_degree)
    field = _field(common, noisy_sky_codes, phi, t.sky_rows, cfg.ridge)
    thr = _throughput(field @ hpb, t.features, t.ivar_lines)
    field = _field(common, noisy_sky_codes / thr[rows, None], phi, t.sky_rows, cfg.ridge)
    thr = _throughput(field @ hpb, t.features, t.ivar_lines)
    out["field without throughput"] = blue(plate, decode(field))
    out["field times throughput (z = 0)"] = blue(plate, decode(thr[:, None] * field))
    obj = ~plate.is_sky
    resid = smi - plate.true_sky
    out["common residual removed"] = blue(plate, smi - resid[obj].mean(0)[None])
    m = plate.wavelength < 4500.0
    t = plate.true_sky.astype(np.float64)
    s = np.sum((t * smi)[:, m], 1) / np.sum((smi * smi)[:, m], 1)
    out["per-fibre blue scale"] = blue(plate, smi * s[:, None])
    out["per-fibre blue scale: spread of the factor (%)"] = float(100 * np.std(s[obj]))
    return out


def cv_degree(model, plate, degrees, bands) -> tuple[np.ndarray, list[int]]:
    """SMI whose field degree is chosen per band by held-out sky-fibre chi^2 (no truth read)."""
    cvs = {
        d: cross_validate(plate, lambda p, d=d: smi_sky(model, p, spatial_degree=d))
        for d in degrees
    }
    flux = np.where(plate.ivar > 0, plate.flux, 0.0).astype(np.float64)
    ivar = np.where(plate.mask == 0, plate.ivar, 0.0).astype(np.float64)
    rows = cvs[degrees[0]].rows
    # select_blend with a learned sky equal to each candidate: weight 0, so it picks by chi^2 alone.
    cand = {str(d): cvs[d].held for d in degrees}
    sel = select_blend(flux[rows], ivar[rows], cvs[degrees[0]].held, cand, bands, min_weight=2.0)
    sky = np.zeros(plate.flux.shape)
    for m, d in zip(bands, sel["baseline"]):
        sky[:, m] = cvs[int(d)].full[:, m]
    return sky, [int(d) for d in sel["baseline"]]


def summary_report(out: Path):
    """Table (stdout, mean over the test plates) and docs/results/sky/sky_blue_diagnosis.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d = json.loads((out / "sky_blue_diagnosis.json").read_text())
    keys = [
        ("Super Sky", lambda r: r["supersky"]["blue"]),
        ("SMI (degree 2, 12 components)", lambda r: r["smi, n_basis 12"]["blue"]),
        ("SMI, 24 components", lambda r: r["smi, n_basis 24"]["blue"]),
        ("SMI, degree 1", lambda r: r["oracles (blue %)"]["smi, degree 1"]),
        ("SMI, degree 3", lambda r: r["oracles (blue %)"]["smi, degree 3"]),
        ("SMI, degree by CV per band", lambda r: r["smi, degree by CV per band"]["blue"]),
        ("field without throughput", lambda r: r["oracles (blue %)"]["field without throughput"]),
        (
            "oracle: true sky-fibre codes",
            lambda r: r["oracles (blue %)"]["true sky-fibre codes, degree 2"],
        ),
        (
            "oracle: + true line features",
            lambda r: r["oracles (blue %)"]["true codes and features, degree 2"],
        ),
        (
            "oracle: common residual removed",
            lambda r: r["oracles (blue %)"]["common residual removed"],
        ),
        ("oracle: per-fibre blue scale", lambda r: r["oracles (blue %)"]["per-fibre blue scale"]),
        ("oracle: basis floor (12)", lambda r: r["oracles (blue %)"]["basis floor"]),
        ("oracle: basis floor (24)", lambda r: r["basis floor, n_basis 24 (blue %)"]),
    ]
    fams = list(d["families"])
    tab = {f: [np.mean([k(r) for r in d["families"][f]]) for _, k in keys] for f in fams}
    for (name, _), i in zip(keys, range(len(keys))):
        print(f"| {name} | " + " | ".join(f"{tab[f][i]:.2f}" for f in fams) + " |")
    for f in fams:
        print(
            f,
            "spread",
            [
                round(r["oracles (blue %)"]["per-fibre blue scale: spread of the factor (%)"], 1)
                for r in d["families"][f]
            ],
            "picked",
            [r["degree picked per band"] for r in d["families"][f]],
        )
    fig, ax = plt.subplots(figsize=(9, 5.5), constrained_layout=True)
    y = np.arange(len(keys))
    h = 0.38
    for j, f in enumerate(fams):
        ax.barh(y + (j - 0.5) * h, tab[f], h, label=f)
    ax.set_yticks(y, [k for k, _ in keys])
    ax.invert_yaxis()
    ax.axvline(0, color="k", lw=0.5)
    ax.set_xlabel("sky error in the blue (< 4500 Å), %, mean of 2 held-out plates")
    ax.set_title("What limits SMI in the blue: fixes (no truth) and oracles (truth)")
    ax.legend()
    fig.savefig(out / "sky_blue_diagnosis.png", dpi=110)
    print(f"wrote {out / 'sky_blue_diagnosis.png'}")


def main():
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--families", nargs="+", default=["paranal-cloud", "keck-twilight"])
    ap.add_argument("--train", type=int, default=8)
    ap.add_argument("--test", type=int, default=2)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--degrees", type=int, nargs="+", default=[0, 1, 2, 3])
    ap.add_argument("--bases", type=int, nargs="+", default=[12, 24])
    ap.add_argument("--out", default="docs/results/sky")
    ap.add_argument("--report", action="store_true", help="table and PNG from the JSON under --out")
    args = ap.parse_args()
    if args.report:
        return summary_report(Path(args.out))
    t0 = time.perf_counter()
    report = {
        "command": "python scripts/sky_blue_diagnosis.py --families "
        + " ".join(args.families)
        + f" --train {args.train} --test {args.test} --steps {args.steps} --seed {args.seed}"
        + " --degrees "
        + " ".join(map(str, args.degrees))
        + " --bases "
        + " ".join(map(str, args.bases)),
        "families": {},
    }
    for fam in args.families:
        train = [make_plate(fam, 1000 + i) for i in range(args.train)]
        tests = [make_plate(fam, s) for s in range(args.test)]
        bands = _band_masks(tests[0].wavelength, (4500.0, 5700.0, 7000.0))
        rows = [{"supersky": both(p, super_sky(p)), "pca": both(p, pca_clean(p))} for p in tests]
        for k in args.bases:
            cfg = SMIConfig(n_basis=k, seed=args.seed).with_steps(args.steps)
            model, hist = train_smi(train, cfg, progress=False)
            print(f"{fam}: trained n_basis {k} in {hist['seconds']:.0f} s", flush=True)
            for p, row in zip(tests, rows):
                row[f"smi, n_basis {k}"] = both(p, smi_sky(model, p))
                if k == args.bases[0]:
                    row["oracles (blue %)"] = oracles(model, p, args.degrees)
                    sky, picked = cv_degree(model, p, args.degrees, bands)
                    row["smi, degree by CV per band"] = both(p, sky)
                    row["degree picked per band"] = picked
                else:
                    row[f"basis floor, n_basis {k} (blue %)"] = oracles(model, p, [])["basis floor"]
        report["families"][fam] = rows
        for j, row in enumerate(rows):
            print(f"\n{fam} plate {j}:")
            for name, v in row.items():
                if isinstance(v, dict) and "blue" in v:
                    print(f"  {name:40s} blue {v['blue']:.2f}  all {v['all']:.2f}")
                elif isinstance(v, dict):
                    for n2, v2 in v.items():
                        print(f"  {'  ' + n2:40s} {v2:.2f}")
                else:
                    print(f"  {name:40s} {v}")
        print(f"({time.perf_counter() - t0:.0f} s)", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report["seconds"] = time.perf_counter() - t0
    (out / "sky_blue_diagnosis.json").write_text(json.dumps(report, indent=1))
    print(f"wrote {out / 'sky_blue_diagnosis.json'}")


if __name__ == "__main__":
    main()
