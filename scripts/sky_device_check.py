"""SMI training with 1 and with 8 visible (virtual CPU) devices gives the same sky error.

    python scripts/sky_device_check.py [--train 16] [--steps 300] [--seeds 0 1 2 3 4] [--test 3]
        [--lr 2e-3] [--json docs/results/sky/sky_device_check.json]

Each run is a fresh process with XLA_FLAGS=--xla_force_host_platform_device_count=N (which changes
how XLA partitions work on the CPU, so float rounding differs); it trains SMI on `--train`
simulated plates (seeds 1000+) with each model seed in `--seeds` and measures the sky error on
`--test` held-out plates (seeds 0..). Prints the CLUB range of the individual stage, each seed's
relative difference between the device counts, and the relative difference of the mean over seeds
with the seeds' spread; exits 1 if the latter is above 5 %. A change of rounding moves one seed's
result about as much as a change of seed does, so the criterion is on the mean over seeds.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np


def worker(args) -> dict:
    import jax
    import numpy as np

    from jaxlab.sky import SMIConfig, evaluate_sky, simulate_plate, smi_sky, train_smi

    train = [simulate_plate(1000 + i) for i in range(args.train)]
    tests = [simulate_plate(i) for i in range(args.test)]
    out = {"devices": jax.device_count(), "runs": []}
    for seed in args.seeds:
        cfg = SMIConfig(seed=seed, learning_rate=args.lr).with_steps(args.steps)
        model, hist = train_smi(train, cfg, progress=False)
        errs = [evaluate_sky(p, smi_sky(model, p))["sky_error_pct"] for p in tests]
        club = hist["individual"]["club"]
        out["runs"].append(
            {
                "seed": seed,
                "sky_error_all": float(np.mean([e["all"] for e in errs])),
                "sky_error_blue": float(np.mean([e["blue"] for e in errs])),
                "club_min": float(np.min(club)),
                "club_max": float(np.max(club)),
                "seconds": hist["seconds"],
            }
        )
        print(json.dumps(out["runs"][-1]), file=sys.stderr, flush=True)
    return out


def SMIConfig_lr() -> float:
    from jaxlab.sky import SMIConfig

    return SMIConfig().learning_rate


def main():
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--train", type=int, default=16)
    ap.add_argument("--test", type=int, default=3)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--lr", type=float, default=SMIConfig_lr(), help="SMIConfig.learning_rate")
    ap.add_argument("--json", help="write the runs and the summary to this JSON file")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    results = {}
    for n in (1, 8):
        env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={n}")
        cmd = [
            sys.executable,
            __file__,
            "--worker",
            "--train",
            str(args.train),
            "--test",
            str(args.test),
            "--steps",
            str(args.steps),
            "--seeds",
            *map(str, args.seeds),
            "--lr",
            str(args.lr),
        ]
        print(f"{n} device(s): {' '.join(cmd[1:])}", flush=True)
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        sys.stderr.write(proc.stderr[-4000:])
        if proc.returncode:
            sys.exit(f"worker with {n} device(s) failed ({proc.returncode})")
        results[n] = json.loads(proc.stdout.strip().splitlines()[-1])
    one, eight = results[1]["runs"], results[8]["runs"]
    worst = 0.0
    for a, b in zip(one, eight):
        for key in ("sky_error_all", "sky_error_blue"):
            rel = abs(a[key] - b[key]) / a[key]
            worst = max(worst, rel)
            print(
                f"seed {a['seed']} {key}: 1 device {a[key]:.3f} %, 8 devices {b[key]:.3f} % "
                f"(relative difference {100 * rel:.2f} %)"
            )
        print(
            f"  CLUB range: 1 device [{a['club_min']:.3f}, {a['club_max']:.3f}], "
            f"8 devices [{b['club_min']:.3f}, {b['club_max']:.3f}]"
        )
    # The criterion: the mean over model seeds. A change of float rounding (the device count) is a
    # perturbation like a change of seed; one seed's difference is compared with the seeds' spread.
    summary = {"per_seed_worst_relative": worst, "mean_over_seeds": {}}
    mean_worst = 0.0
    for key in ("sky_error_all", "sky_error_blue"):
        m1, m8 = (float(np.mean([r[key] for r in runs])) for runs in (one, eight))
        s1, s8 = (
            float(np.std([r[key] for r in runs], ddof=1)) if len(runs) > 1 else 0.0
            for runs in (one, eight)
        )
        diffs = [b[key] - a[key] for a, b in zip(one, eight)]
        rel = abs(m8 - m1) / m1
        mean_worst = max(mean_worst, rel)
        summary["mean_over_seeds"][key] = {
            "1 device": m1,
            "8 devices": m8,
            "relative difference": rel,
            "seed std, 1 device": s1,
            "seed std, 8 devices": s8,
            "std of the per-seed differences": float(np.std(diffs, ddof=1))
            if len(diffs) > 1
            else 0.0,
        }
        print(
            f"mean over {len(one)} seeds {key}: 1 device {m1:.3f} % (seed std {s1:.3f}), "
            f"8 devices {m8:.3f} % (seed std {s8:.3f}), relative difference {100 * rel:.2f} %"
        )
    summary["mean_worst_relative"] = mean_worst
    print(
        f"largest relative difference: per seed {100 * worst:.2f} %, of the mean over seeds "
        f"{100 * mean_worst:.2f} % (limit 5 %, on the mean)"
    )
    if args.json:
        cmd = "python scripts/sky_device_check.py " + " ".join(sys.argv[1:])
        report = {"command": cmd, "results": results, "summary": summary}
        Path(args.json).write_text(json.dumps(report, indent=1))
        print(f"wrote {args.json}")
    sys.exit(0 if mean_worst <= 0.05 else 1)


if __name__ == "__main__":
    main()
