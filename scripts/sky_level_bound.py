"""How much of a fibre's blue sky level can the sky fibres tell? A bound, and more sky fibres.

    python scripts/sky_level_bound.py [--family paranal-cloud] [--train 8] [--test 4]
        [--steps 100] [--seed 0] [--n-sky 20 40 80]
    python scripts/sky_level_bound.py --report [--family paranal-cloud]

SMI is trained self-supervised on `--train` plates of the family (250 fibres, 20 sky, as in
`bench_sky.py --families`). Each test plate is made once with the largest `--n-sky` sky fibres
(and as many more fibres), and the variants with fewer sky fibres drop the extra sky fibres, so
every variant has the same objects, the same sky and the same object fibres (the 20-sky variant
is a 250-fibre plate like the training ones). On each variant:

- the baselines (Super Sky, PCA cleaning) and SMI-safe, the safety net with SMI's per-band level
  models (`safe_sky(plate, smi_level_candidates(model))`, no truth read), as `bench_sky.py` runs it;
- the sky-fibre level bound (reads the truth): every fibre's best blue scale factor s_i for SMI's
  sky (least squares against the true sky below 4500 Angstrom) is known exactly, noise-free, at
  the sky fibres only, and interpolated to the object fibres by the best of a family of
  interpolators chosen on the truth (Gaussian-kernel regression, lengths 0.03-1 plate radii and
  shrinkage 0-2; thin-plate and linear RBF interpolation, smoothing 0-0.1; each with SMI's level
  models at throughput power 1, 0.5 and 0). A method that takes a fibre's blue level from the sky
  fibres around it (the neighbour term of the level models, or any smoother field) cannot beat it
  by much: it knows the level at the sky fibres only through their noisy spectra.
- the per-fibre oracle: each object fibre's own s_i (what a per-fibre level from elsewhere, e.g. a
  measured flat of the scattered light, could at best give).

Writes `docs/results/sky/sky_level_bound_<family>.json`; `--report` prints the table (mean over
the test plates) and draws `docs/results/sky/sky_level_bound_<family>.png`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
from scipy.interpolate import RBFInterpolator

from jaxlab.sky import SMIConfig, evaluate_sky, smi_sky, train_smi
from jaxlab.sky.safety import cross_validate, default_baselines, safe_sky
from jaxlab.sky.smi import smi_level_candidates

sys.path.insert(0, str(Path(__file__).parent))
from sky_families import make_plate  # noqa: E402

BLUE = 4500.0
POWERS = (1.0, 0.5, 0.0)
LENGTHS = (0.03, 0.05, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0)
SHRINKS = (0.0, 0.5, 2.0)
RBF = (("thin_plate_spline", 0.0), ("thin_plate_spline", 0.01), ("linear", 0.0), ("linear", 0.1))


def subset(plate, keep: np.ndarray):
    """The plate restricted to the fibre rows `keep` (every per-fibre array and column)."""
    rows = lambda a: None if a is None else a[keep]  # noqa: E731
    return dataclasses.replace(
        plate,
        flux=plate.flux[keep],
        ivar=plate.ivar[keep],
        mask=plate.mask[keep],
        fibers={k: np.asarray(v)[keep] for k, v in plate.fibers.items()},
        true_sky=rows(plate.true_sky),
        true_object=rows(plate.true_object),
    )


def variants(family: str, seed: int, n_skies: list[int]) -> dict[int, object]:
    """n_sky -> plate: one plate with max(n_skies) sky fibres; fewer by dropping sky fibres."""
    top = max(n_skies)
    full = make_plate(family, seed, n_fibers=250 + top - 20, n_sky=top)
    sky_rows = np.nonzero(full.is_sky)[0]
    order = np.random.default_rng([seed, 17]).permutation(sky_rows)
    out = {}
    for n in n_skies:
        keep = np.ones(full.n_fibers, bool)
        keep[order[n:]] = False
        out[n] = subset(full, np.nonzero(keep)[0])
    return out


def blue_error(plate, sky) -> float:
    return float(evaluate_sky(plate, sky)["sky_error_pct"]["blue"])


def level_bound(plate, skies: dict[str, np.ndarray], radius_mm: float) -> dict:
    """Blue sky error (%) with the true per-fibre blue factors: interpolated from the sky fibres
    (best interpolator on the truth) and each fibre's own (see the module docstring)."""
    m = plate.wavelength < BLUE
    true = plate.true_sky.astype(np.float64)[:, m]
    pos = plate.positions / radius_mm
    sky_rows = np.nonzero(plate.is_sky)[0]
    obj = ~plate.is_sky
    best = {"bound": (np.inf, ""), "own": (np.inf, "")}
    for name, sky in skies.items():
        s_b = np.asarray(sky, np.float64)[:, m]
        s = np.sum(true * s_b, 1) / np.sum(s_b * s_b, 1)  # fibre i's best blue factor

        def err(factor, s_b=s_b):
            return float(
                100 * np.abs(factor[obj, None] * s_b[obj] - true[obj]).sum() / true[obj].sum()
            )

        own = err(s)
        if own < best["own"][0]:
            best["own"] = (own, name)
        d2 = np.sum((pos[:, None] - pos[None, sky_rows]) ** 2, -1)
        for length in LENGTHS:
            kern = np.exp(-0.5 * d2 / length**2)
            for shrink in SHRINKS:
                f = 1.0 + kern @ (s[sky_rows] - 1.0) / (kern.sum(1) + shrink)
                e = err(f)
                if e < best["bound"][0]:
                    best["bound"] = (e, f"{name}, kernel {length:g}, shrink {shrink:g}")
        for kernel, smoothing in RBF:
            f = RBFInterpolator(pos[sky_rows], s[sky_rows], kernel=kernel, smoothing=smoothing)(pos)
            e = err(f)
            if e < best["bound"][0]:
                best["bound"] = (e, f"{name}, rbf {kernel}, smoothing {smoothing:g}")
    return {k: {"blue": v[0], "how": v[1]} for k, v in best.items()}


def run(args) -> None:
    t0 = time.perf_counter()
    train = [make_plate(args.family, 1000 + i) for i in range(args.train)]
    model, hist = train_smi(train, SMIConfig(seed=args.seed).with_steps(args.steps), progress=False)
    print(f"{args.family}: SMI trained in {hist['seconds']:.0f} s", flush=True)
    cands = smi_level_candidates(model)
    rows = []
    for seed in range(args.test):
        for n_sky, plate in variants(args.family, seed, args.n_sky).items():
            cv = {n: cross_validate(plate, est) for n, est in default_baselines().items()}
            row = {"plate": seed, "n_sky": n_sky, "n_fibers": plate.n_fibers}
            for n, c in cv.items():
                row[n] = evaluate_sky(plate, c.full)["sky_error_pct"]
            safe, rep = safe_sky(plate, cands, baselines=cv)
            row["smi"] = evaluate_sky(plate, smi_sky(model, plate))["sky_error_pct"]
            row["smi-safe"] = evaluate_sky(plate, safe)["sky_error_pct"]
            row["smi-safe level models"] = rep["learned"]
            powered = {f"smi p={p:g}": smi_sky(model, plate, throughput_power=p) for p in POWERS}
            row.update(level_bound(plate, powered, model.config.focal_radius_mm))
            rows.append(row)
            print(
                f"plate {seed}, {n_sky} sky fibres: blue % Super Sky {row['supersky']['blue']:.2f}"
                f"  SMI-safe {row['smi-safe']['blue']:.2f}  bound {row['bound']['blue']:.2f}"
                f" ({row['bound']['how']})  own {row['own']['blue']:.2f}",
                flush=True,
            )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {
        "command": f"python scripts/sky_level_bound.py --family {args.family} --train {args.train}"
        f" --test {args.test} --steps {args.steps} --seed {args.seed} --n-sky "
        + " ".join(map(str, args.n_sky)),
        "seconds": time.perf_counter() - t0,
        "rows": rows,
    }
    path = out / f"sky_level_bound_{args.family}.json"
    path.write_text(json.dumps(report, indent=1))
    print(f"wrote {path} ({report['seconds']:.0f} s)")
    report_table(out, args.family)


def report_table(out: Path, family: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d = json.loads((out / f"sky_level_bound_{family}.json").read_text())
    rows = d["rows"]
    n_skies = sorted({r["n_sky"] for r in rows})
    cols = [
        ("Super Sky", lambda r: r["supersky"]["blue"]),
        ("PCA", lambda r: r["pca"]["blue"]),
        ("SMI", lambda r: r["smi"]["blue"]),
        ("SMI-safe", lambda r: r["smi-safe"]["blue"]),
        ("sky-fibre level bound", lambda r: r["bound"]["blue"]),
        ("per-fibre oracle", lambda r: r["own"]["blue"]),
    ]
    print(
        "| sky fibres | "
        + " | ".join(c for c, _ in cols)
        + " | SMI-safe / Super Sky | bound / Super Sky |"
    )
    print("|---" * (len(cols) + 3) + "|")
    mean = {}
    for n in n_skies:
        rs = [r for r in rows if r["n_sky"] == n]
        mean[n] = [float(np.mean([f(r) for r in rs])) for _, f in cols]
        print(
            f"| {n} | "
            + " | ".join(f"{v:.2f}" for v in mean[n])
            + f" | {mean[n][3] / mean[n][0]:.2f} | {mean[n][4] / mean[n][0]:.2f} |"
        )
    fig, ax = plt.subplots(figsize=(7, 4.5), constrained_layout=True)
    for j, (name, _) in enumerate(cols):
        ax.plot(n_skies, [mean[n][j] for n in n_skies], "o-", label=name)
    ax.plot(n_skies, [0.5 * mean[n][0] for n in n_skies], "k--", lw=1, label="goal: 0.5x Super Sky")
    ax.set_xticks(n_skies)
    ax.set_xlabel("sky fibres on the plate (same objects, same sky)")
    ax.set_ylabel("sky error below 4500 Å, % (object fibres)")
    ax.set_title(f"{family}: what the sky fibres can tell about the blue level")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    fig.savefig(out / f"sky_level_bound_{family}.png", dpi=110)
    print(f"wrote {out / f'sky_level_bound_{family}.png'}")


def main():
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--family", default="paranal-cloud")
    ap.add_argument("--train", type=int, default=8)
    ap.add_argument("--test", type=int, default=4)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-sky", type=int, nargs="+", default=[20, 40, 80])
    ap.add_argument("--out", default="docs/results/sky")
    ap.add_argument("--report", action="store_true", help="table and PNG from the JSON under --out")
    args = ap.parse_args()
    if min(args.n_sky) < 20:
        ap.error("--n-sky values must be >= 20 (the 20-sky variant is the 250-fibre plate)")
    if args.report:
        return report_table(Path(args.out), args.family)
    run(args)


if __name__ == "__main__":
    main()
