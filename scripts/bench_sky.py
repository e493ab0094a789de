"""SMI vs Super Sky vs PCA on simulated LAMOST plates (truth known): sky error, chi^2, timings.

    python scripts/bench_sky.py [--train 24] [--test 10] [--steps 300] [--out docs/results/sky]

Trains SMI on `--train` simulated plates (seeds 1000+), evaluates all methods on `--test` held-out
plates (seeds 0..), prints per-plate and mean metrics and the ratios SMI / Super Sky, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from jaxlab.sky import (
    SMIConfig,
    evaluate_sky,
    pca_clean,
    simulate_plate,
    smi_sky,
    super_sky,
    train_smi,
)


def main():
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--train", type=int, default=24)
    ap.add_argument("--test", type=int, default=10)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--out", default="docs/results/sky")
    args = ap.parse_args()
    t0 = time.perf_counter()
    train = [simulate_plate(1000 + i) for i in range(args.train)]
    print(f"simulated {args.train} training plates in {time.perf_counter() - t0:.1f} s")
    cfg = SMIConfig(steps_shift=args.steps, steps_shared=args.steps, steps_individual=args.steps)
    model, history = train_smi(train, cfg, progress=False, log=print)
    print(f"SMI training: {history['seconds']:.1f} s")
    rows, times = [], {"supersky": [], "pca": [], "smi": []}
    for seed in range(args.test):
        plate = simulate_plate(seed)
        res = {}
        for name in ("supersky", "pca", "smi"):
            t = time.perf_counter()
            if name == "supersky":
                sky = ss = super_sky(plate)
            elif name == "pca":
                sky = pca_clean(plate, ss)
            else:
                sky = smi_sky(model, plate)
            times[name].append(time.perf_counter() - t)
            res[name] = evaluate_sky(plate, sky)
        rows.append(res)
        print(
            f"plate {seed}: sky error % (blue / all)  "
            + "  ".join(
                f"{n} {res[n]['sky_error_pct']['blue']:.2f} / {res[n]['sky_error_pct']['all']:.2f}"
                for n in res
            )
        )
    keys = (
        "sky_error_pct",
        "sky_rms_error_pct",
        "chi2_per_pixel",
        "line_residual_pct",
        "continuum_residual_pct",
    )
    summary = {
        n: {
            k: {
                r: float(np.nanmean([row[n][k][r] for row in rows])) for r in ("blue", "red", "all")
            }
            for k in keys
        }
        for n in ("supersky", "pca", "smi")
    }
    for n in summary:
        summary[n]["seconds_per_plate"] = float(
            np.mean(times[n][1:] if len(times[n]) > 1 else times[n])
        )
    ratio = {
        r: summary["smi"]["sky_error_pct"][r] / summary["supersky"]["sky_error_pct"][r]
        for r in ("blue", "red", "all")
    }
    print("\nmean over test plates:")
    for n, s in summary.items():
        print(
            f"  {n:9s} "
            + "  ".join(
                f"{k} " + "/".join(f"{s[k][r]:.3f}" for r in ("blue", "red", "all")) for k in keys
            )
        )
        print(f"            {s['seconds_per_plate']:.2f} s per plate")
    print(
        f"SMI / Super Sky sky error: blue {ratio['blue']:.2f}, red {ratio['red']:.2f}, all {ratio['all']:.2f}"
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {
        "command": "python scripts/bench_sky.py "
        + f"--train {args.train} --test {args.test} --steps {args.steps}",
        "train_seconds": history["seconds"],
        "summary": summary,
        "smi_over_supersky": ratio,
        "per_plate": rows,
    }
    (out / "bench_sky.json").write_text(json.dumps(report, indent=1))
    print(f"wrote {out / 'bench_sky.json'}")


if __name__ == "__main__":
    main()
