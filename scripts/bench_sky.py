"""SMI vs Super Sky vs PCA on simulated LAMOST plates (truth known): sky error, chi^2, timings.

    python scripts/bench_sky.py [--train 24] [--test 10] [--steps 300] [--out docs/results/sky]
    python scripts/bench_sky.py --families [--train 8] [--test 2] [--seeds 0 1 2] [--steps 100]

Default: trains SMI on `--train` simulated plates (seeds 1000+), evaluates all methods on `--test`
held-out plates (seeds 0..), prints per-plate and mean metrics and the ratios SMI / Super Sky,
writes JSON.

`--families`: the cross-family table. Plate families are jaxlab's simulator ("jaxlab-sim") and the
four of the independent generator `scripts/sky_families.py` (other real skies, other object, moon,
throughput, shift and field models). For each training family and model seed SMI is trained
self-supervised on `--train` plates of that family (seeds 1000+, no truth read) and every method is
evaluated on `--test` held-out plates (seeds 0..) of every family: Super Sky, PCA, SMI, and SMI with
the sky-fibre cross-validation safety net (`smi-safe`: per band, SMI blended towards the better of
Super Sky and PCA on held-out sky fibres, and per band the SMI level model of
`jaxlab.sky.smi.smi_level_candidates`, with the level clip of `jaxlab.sky.safety.clip_levels`;
`smi-safe-noclip` is the same net without the clip, `smi-safe-p1` the net with SMI's own level
only). Means
over seeds and plates, with the spread (standard deviation over seeds), go to stdout and
`bench_sky_families[_TRAIN+...].json`. `--same-family` tests each model on its own family only
(`bench_sky_level_seeds*.json`); `--report-level` tabulates those runs, before and after the level
models.
"""

from __future__ import annotations

import argparse
import functools
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
    ap.add_argument("--families", action="store_true", help="the cross-family table")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="SMI model seeds")
    ap.add_argument("--only-train", nargs="*", help="training families (default: all)")
    ap.add_argument(
        "--same-family",
        action="store_true",
        help="test each model on its training family only (writes bench_sky_level_seeds*.json)",
    )
    ap.add_argument(
        "--report-level",
        action="store_true",
        help="merge the bench_sky_level_seeds*.json under --out: SMI-safe before (one level model)"
        " and after (level model per band) on each family",
    )
    ap.add_argument(
        "--report",
        action="store_true",
        help="merge the bench_sky_families*.json under --out into a markdown table and a PNG",
    )
    ap.add_argument(
        "--incremental",
        metavar="FAMILY",
        help="incremental training: a model trained on jaxlab-sim continued on FAMILY's plates",
    )
    args = ap.parse_args()
    if args.incremental:
        return incremental(args)
    if args.report:
        return family_report(Path(args.out))
    if args.report_level:
        return level_report(Path(args.out))
    if args.families:
        return cross_family(args)
    t0 = time.perf_counter()
    train = [simulate_plate(1000 + i) for i in range(args.train)]
    print(f"simulated {args.train} training plates in {time.perf_counter() - t0:.1f} s")
    cfg = SMIConfig().with_steps(args.steps)
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


def cross_family(args):
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from sky_families import FAMILIES, make_plate

    from jaxlab.sky.safety import PerPlate, cross_validate, default_baselines, safe_sky
    from jaxlab.sky.smi import smi_level_candidates

    names = ["jaxlab-sim", *FAMILIES]

    def plate(fam, seed):
        return simulate_plate(seed) if fam == "jaxlab-sim" else make_plate(fam, seed)

    t0 = time.perf_counter()
    tests = {f: [plate(f, s) for s in range(args.test)] for f in names}
    baseline, cv_base = {}, {}
    for f, ps in tests.items():
        rows, cvs = [], []
        for p in ps:
            # The baselines' sky-fibre cross-validation does not depend on the model: once a plate.
            cv = {n: cross_validate(p, est) for n, est in default_baselines().items()}
            cvs.append(cv)
            rows.append({n: evaluate_sky(p, c.full)["sky_error_pct"] for n, c in cv.items()})
        baseline[f], cv_base[f] = rows, cvs
    print(f"{args.test} test plates per family, baselines: {time.perf_counter() - t0:.0f} s")
    results = []  # one entry per (train family, seed, test family, plate)
    for train_fam in args.only_train or names:
        train = [plate(train_fam, 1000 + i) for i in range(args.train)]
        for seed in args.seeds:
            cfg = SMIConfig(seed=seed).with_steps(args.steps)
            model, hist = train_smi(train, cfg, progress=False)
            line = [f"train {train_fam} seed {seed} ({hist['seconds']:.0f} s):"]
            for test_fam, ps in tests.items():
                if args.same_family and test_fam != train_fam:
                    continue
                for k, p in enumerate(ps):
                    smi = smi_sky(model, p)
                    # Each level model runs once per fold; the nets below reuse its output.
                    cands = {n: PerPlate(e) for n, e in smi_level_candidates(model).items()}
                    cv = cv_base[test_fam][k]
                    # One level model (SMI as trained, throughput power 1).
                    safe_p1, _ = safe_sky(p, {"smi p=1": cands["smi p=1"]}, baselines=cv)
                    # Per band, the level model (throughput power 1, 0.5, 0; each with and
                    # without the neighbouring sky fibres' level) and baseline blend that best
                    # predict the held-out sky fibres; without and with the level clip.
                    noclip, _ = safe_sky(p, cands, baselines=cv, level_reference=None)
                    safe, rep = safe_sky(p, cands, baselines=cv)
                    res = dict(baseline[test_fam][k])
                    res["smi"] = evaluate_sky(p, smi)["sky_error_pct"]
                    res["smi-safe-p1"] = evaluate_sky(p, safe_p1)["sky_error_pct"]
                    res["smi-safe-noclip"] = evaluate_sky(p, noclip)["sky_error_pct"]
                    res["smi-safe"] = evaluate_sky(p, safe)["sky_error_pct"]
                    res["fallback_fraction_bands"] = rep["fallback_fraction_bands"]
                    res["weights"] = rep["weights"]
                    res["baselines"] = rep["baselines"]
                    res["level"] = rep["learned"]
                    res["level_clipped_fraction"] = rep["level_clipped_fraction"]
                    results.append(
                        {"train": train_fam, "seed": seed, "test": test_fam, "plate": k, **res}
                    )
                mine = [r for r in results if r["train"] == train_fam and r["seed"] == seed]
                mine = [r for r in mine if r["test"] == test_fam]
                line.append(
                    f"{test_fam} "
                    + "/".join(
                        f"{np.mean([r[m]['all'] for r in mine]):.2f}"
                        for m in ("supersky", "smi", "smi-safe")
                    )
                )
            print(" ".join(line), flush=True)
    table = summarise(results, names, args.only_train or names, args.seeds)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cmd = (
        f"python scripts/bench_sky.py --families --train {args.train} --test {args.test} "
        f"--steps {args.steps} --seeds {' '.join(map(str, args.seeds))}"
    )
    if args.only_train:
        cmd += " --only-train " + " ".join(args.only_train)
    if args.same_family:
        cmd += " --same-family"
    report = {"command": cmd, "seconds": time.perf_counter() - t0, "table": table}
    report["per_plate"] = results
    name = "bench_sky_families" + ("_" + "+".join(args.only_train) if args.only_train else "")
    if args.same_family:
        name = "bench_sky_level_seeds" + "-".join(map(str, args.seeds))
    (out / f"{name}.json").write_text(json.dumps(report, indent=1))
    print(f"wrote {out / name}.json ({time.perf_counter() - t0:.0f} s)")


def summarise(results, names, train_names, seeds):
    """Mean sky error (%) per (train family, test family, method, region): mean over plates per
    seed, then the mean and standard deviation over seeds; the fallback fraction of smi-safe."""
    table = []
    print("\nsky error % (blue / all), mean over seeds ± std over seeds; SS = Super Sky")
    for tr in train_names:
        for te in names:
            rows = [r for r in results if r["train"] == tr and r["test"] == te]
            if not rows:
                continue
            entry = {"train": tr, "test": te}
            for m in ("supersky", "pca", "smi", "smi-safe-p1", "smi-safe-noclip", "smi-safe"):
                if m not in rows[0]:
                    continue
                for region in ("blue", "all"):
                    per_seed = [
                        np.mean([r[m][region] for r in rows if r["seed"] == s]) for s in seeds
                    ]
                    entry[f"{m}_{region}"] = float(np.mean(per_seed))
                    entry[f"{m}_{region}_std"] = float(np.std(per_seed))
            entry["fallback_fraction_bands"] = float(
                np.mean([r["fallback_fraction_bands"] for r in rows])
            )
            # The better of the two baselines a user could pick for this family (per region).
            for region in ("blue", "all"):
                entry[f"best_baseline_{region}"] = min(
                    entry[f"supersky_{region}"], entry[f"pca_{region}"]
                )
            clip = [
                np.mean(list(r["level_clipped_fraction"].values()))
                for r in rows
                if r.get("level_clipped_fraction")
            ]
            entry["level_clipped_fraction"] = float(np.mean(clip)) if clip else 0.0
            fell = [b for r in rows for b, w in zip(r.get("baselines", []), r["weights"]) if w == 0]
            entry["fallback_to_pca"] = float(np.mean([b == "pca" for b in fell])) if fell else 0.0
            table.append(entry)
            print(
                f"  {tr:>13s} -> {te:<13s} "
                + "  ".join(
                    f"{m} {entry[f'{m}_blue']:.2f}/{entry[f'{m}_all']:.2f}"
                    + (f"±{entry[f'{m}_all_std']:.2f}" if m.startswith("smi") else "")
                    for m in ("supersky", "pca", "smi", "smi-safe-noclip", "smi-safe")
                    if f"{m}_blue" in entry
                )
                + f"  fallback {entry['fallback_fraction_bands']:.2f}"
            )
    return table


def incremental(args):
    """A model trained on `--train` jaxlab-sim plates, continued (`init=`) on `--train` plates of the
    family for `--steps` and `--steps // 4` steps a stage, against one trained on the family's plates
    from scratch; sky error on `--test` held-out plates of the family (seed 0)."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from sky_families import make_plate

    from jaxlab.sky.safety import safe_sky

    fam = args.incremental
    t0 = time.perf_counter()
    tests = [make_plate(fam, s) for s in range(args.test)]
    night = [make_plate(fam, 1000 + i) for i in range(args.train)]

    def cfg(steps):
        return SMIConfig().with_steps(steps)

    base, _ = train_smi(
        [simulate_plate(1000 + i) for i in range(args.train)], cfg(args.steps), progress=False
    )
    runs = {"jaxlab-sim model": (base, 0.0)}
    for name, init, steps in (
        ("from scratch on the family", None, args.steps),
        ("incremental, same steps", base, args.steps),
        ("incremental, 1/4 steps", base, max(args.steps // 4, 1)),
    ):
        model, hist = train_smi(night, cfg(steps), progress=False, init=init)
        runs[name] = (model, hist["seconds"])
    ss = [evaluate_sky(p, super_sky(p))["sky_error_pct"] for p in tests]
    rows = {"supersky": {r: float(np.mean([e[r] for e in ss])) for r in ("blue", "all")}}
    for name, (model, seconds) in runs.items():
        smi = [evaluate_sky(p, smi_sky(model, p))["sky_error_pct"] for p in tests]
        safe = [
            evaluate_sky(p, safe_sky(p, functools.partial(smi_sky, model))[0])["sky_error_pct"]
            for p in tests
        ]
        rows[name] = {
            "train_seconds": seconds,
            **{f"smi_{r}": float(np.mean([e[r] for e in smi])) for r in ("blue", "all")},
            **{f"smi-safe_{r}": float(np.mean([e[r] for e in safe])) for r in ("blue", "all")},
        }
        print(f"{name:28s} " + "  ".join(f"{k} {v:.2f}" for k, v in rows[name].items()), flush=True)
    print(f"Super Sky: blue {rows['supersky']['blue']:.2f}, all {rows['supersky']['all']:.2f}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cmd = (
        f"python scripts/bench_sky.py --incremental {fam} --train {args.train} "
        f"--test {args.test} --steps {args.steps}"
    )
    report = {"command": cmd, "seconds": time.perf_counter() - t0, "results": rows}
    (out / f"bench_sky_incremental_{fam}.json").write_text(json.dumps(report, indent=1))
    print(f"wrote {out / f'bench_sky_incremental_{fam}.json'}")


LEVELS = (
    "smi p=1",
    "smi p=0.5",
    "smi p=0",
    "smi p=1 + neighbours",
    "smi p=0.5 + neighbours",
    "smi p=0 + neighbours",
)


def level_report(out: Path):
    """Markdown table (stdout) of the same-family runs: per family the mean over seeds and plates
    (± std over seeds) of Super Sky, PCA, SMI, SMI-safe with one level model (before) and with a
    level model per band (after), and the ratios of the latter two to Super Sky and to the better
    baseline; plus how often each level model was chosen per band."""
    rows = []
    for f in sorted(out.glob("bench_sky_level_seeds*.json")):
        rows += json.loads(f.read_text())["per_plate"]
    fams = list(dict.fromkeys(r["test"] for r in rows))
    methods = ("supersky", "pca", "smi", "smi-safe-p1", "smi-safe")
    print(
        "| family | seeds | Super Sky blue / all | PCA blue / all | SMI blue / all | "
        "SMI-safe before blue / all | SMI-safe after blue / all | before / Super Sky blue, all | "
        "after / Super Sky blue, all | after / best baseline blue, all |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    picks = {}
    for fam in fams:
        mine = [r for r in rows if r["test"] == fam and r["train"] == fam]
        seeds = sorted({r["seed"] for r in mine})
        mean, std = {}, {}
        for m in methods:
            for reg in ("blue", "all"):
                per = [np.mean([r[m][reg] for r in mine if r["seed"] == s]) for s in seeds]
                mean[m, reg], std[m, reg] = float(np.mean(per)), float(np.std(per))

        def pm(m, mean=mean, std=std):
            return " / ".join(
                f"{mean[m, r]:.2f}" + (f" ± {std[m, r]:.2f}" if m.startswith("smi") else "")
                for r in ("blue", "all")
            )

        def ratio(m, ref, mean=mean):
            return ", ".join(f"{mean[m, r] / ref(r):.2f}" for r in ("blue", "all"))

        def ss(r, mean=mean):
            return mean["supersky", r]

        def best(r, mean=mean):
            return min(mean["supersky", r], mean["pca", r])

        print(
            f"| {fam} | {len(seeds)} | {pm('supersky')} | {pm('pca')} | {pm('smi')} | "
            f"{pm('smi-safe-p1')} | {pm('smi-safe')} | {ratio('smi-safe-p1', ss)} | "
            f"{ratio('smi-safe', ss)} | {ratio('smi-safe', best)} |"
        )
        for r in mine:
            for k, lvl in enumerate(r.get("level", [])):
                picks.setdefault(fam, np.zeros((4, 6)))
                picks[fam][k, LEVELS.index(lvl)] += 1
    print(f"\nlevel model chosen per band (share of plates x seeds; {' / '.join(LEVELS)}):")
    for fam, c in picks.items():
        c = c / c.sum(1, keepdims=True)
        print(f"  {fam}: " + "; ".join("/".join(f"{x:.2f}" for x in row) for row in c))


def family_report(out: Path):
    """Markdown table (stdout) and PNG heat maps of SMI / Super Sky and SMI-safe / Super Sky."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = []
    for f in sorted(out.glob("bench_sky_families*.json")):
        table += json.loads(f.read_text())["table"]
    trains = list(dict.fromkeys(e["train"] for e in table))
    tests = list(dict.fromkeys(e["test"] for e in table))
    print(
        "| trained on | tested on | Super Sky blue / all | PCA blue / all | SMI blue / all | "
        "SMI-safe without the level clip blue / all | SMI-safe blue / all | "
        "SMI-safe / best baseline blue, all | fallback (of which PCA) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for e in table:

        def pm(m, r, e=e):
            return f"{e[f'{m}_{r}']:.2f} ± {e[f'{m}_{r}_std']:.2f}"

        print(
            f"| {e['train']} | {e['test']} | {e['supersky_blue']:.2f} / {e['supersky_all']:.2f} | "
            f"{e['pca_blue']:.2f} / {e['pca_all']:.2f} | {pm('smi', 'blue')} / {pm('smi', 'all')} | "
            + (
                f"{pm('smi-safe-noclip', 'blue')} / {pm('smi-safe-noclip', 'all')} | "
                if "smi-safe-noclip_blue" in e
                else "- | "
            )
            + f"{pm('smi-safe', 'blue')} / {pm('smi-safe', 'all')} | "
            f"{e['smi-safe_blue'] / e['best_baseline_blue']:.2f}, "
            f"{e['smi-safe_all'] / e['best_baseline_all']:.2f} | "
            f"{e['fallback_fraction_bands']:.2f} ({e['fallback_to_pca']:.2f}) |"
        )
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), constrained_layout=True)
    for ax, m in zip(axes, ("smi", "smi-safe")):
        grid = np.full((len(trains), len(tests)), np.nan)
        for e in table:
            grid[trains.index(e["train"]), tests.index(e["test"])] = (
                e[f"{m}_all"] / e["best_baseline_all"]
            )
        im = ax.imshow(np.log2(grid), cmap="RdBu_r", vmin=-2, vmax=2)
        for i in range(len(trains)):
            for j in range(len(tests)):
                if np.isfinite(grid[i, j]):
                    dark = abs(np.log2(grid[i, j])) > 1.2
                    ax.text(
                        j,
                        i,
                        f"{grid[i, j]:.2f}",
                        ha="center",
                        va="center",
                        fontsize=9,
                        color="white" if dark else "black",
                    )
        ax.set_xticks(range(len(tests)), tests, rotation=30, ha="right")
        ax.set_yticks(range(len(trains)), trains)
        ax.set_xlabel("tested on")
        ax.set_ylabel("trained on (self-supervised)")
        ax.set_title(f"{m} / best of Super Sky, PCA (sky error, all)")
    fig.colorbar(im, ax=axes, label="log2 ratio (blue: better)")
    fig.savefig(out / "bench_sky_families.png", dpi=110)
    print(f"wrote {out / 'bench_sky_families.png'}")


if __name__ == "__main__":
    main()
