"""Reward and bubble ratio of RL runs side by side, from their metrics.jsonl.

python scripts/plot_rl_runs.py runs/rl_smollm2_sync runs/rl_smollm2_sorted --out rl_runs.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+")
    p.add_argument("--out", default="rl_runs.png")
    args = p.parse_args()
    fig, (ax_r, ax_b) = plt.subplots(1, 2, figsize=(11, 3.5))
    for run in args.runs:
        lines = [json.loads(x) for x in (Path(run) / "metrics.jsonl").read_text().splitlines()]
        label = json.loads((Path(run) / "config.json").read_text())["scheduler"]["scheduler"]
        samples = [x["trained_samples"] for x in lines]
        ax_r.plot(samples, [x["reward_mean"] for x in lines], marker="o", ms=3, label=label)
        ax_b.plot(
            [x["time"] for x in lines],
            [x["bubble_ratio"] for x in lines],
            marker="o",
            ms=3,
            label=label,
        )
    ax_r.set_xlabel("trained samples")
    ax_r.set_ylabel("mean reward of the update batch")
    ax_b.set_xlabel("seconds")
    ax_b.set_ylabel("bubble ratio so far")
    for ax in (ax_r, ax_b):
        ax.legend()
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)


if __name__ == "__main__":
    main()
