"""Work balance of sparse ring attention per layout, from the step plans the ring itself uses.

For every (device, ring step) the script builds ``jaxlab.attention.layouts.step_plan`` (the lists the
kernels run over) and counts the work: active blocks × G² + bars × G (multiply-adds per head dim).
Reported per layout and pattern:

* worker imbalance: max over devices of total work / mean;
* ring time / ideal: Σ over steps of the slowest device's work / (total work / devices) — every step
  of the ring waits for its slowest device;
* the same for ``vertical_mode="gathered"`` (bars computed once before the ring, blocks in the ring);
* density: total work / dense causal work (1 − FLOPs saved).

    python scripts/bench_ring_balance.py                     # 512K tokens, 32 devices
    python scripts/bench_ring_balance.py --seq-len 65536 --devices 8
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jaxlab.attention import layouts  # noqa: E402
from jaxlab.attention.sparse import VerticalSlashPattern  # noqa: E402

LAYOUTS = ("contiguous", "zigzag", "striped")


def synthetic_pattern(rng, n, v, s, verticals="front", sinks=30, window=100):
    """MTraining-like: sinks + v verticals (front-heavy or uniform) and a window + log-uniform slashes."""
    if verticals == "front":
        cand = np.unique(np.minimum((rng.exponential(n / 16, 4 * v)).astype(int), n - 1))
    else:
        cand = rng.choice(n, size=min(n, 4 * v), replace=False)
    cand = cand[cand >= sinks]
    vert = np.unique(np.concatenate([np.arange(sinks), rng.permutation(cand)[: max(0, v - sinks)]]))
    logd = rng.uniform(np.log(window), np.log(n), 4 * s)
    dist = np.unique(np.concatenate([np.arange(min(window, s)), np.exp(logd).astype(int)]))[:s]
    return VerticalSlashPattern(
        jnp.asarray(vert[None, None], jnp.int32), jnp.asarray(np.sort(dist)[None, None], jnp.int32)
    )


def work_matrix(pattern, layout, n, w, g):
    """``(blocks [W, S], bars [W, S])`` work from the step plans (units: multiply-adds / D)."""
    nb = n // g
    table = jnp.asarray(layouts.layout_blocks(layout, nb, w))

    @jax.jit
    def per_rank(rank):
        def one(step):
            src = layouts.ring_source(rank, step, w)
            plan = layouts.step_plan(
                pattern,
                table[rank],
                table[src],
                num_blocks=nb,
                block_size=g,
                batch_heads=(1, 1),
                bar_block=64,
            )
            return jnp.sum(plan.block_cnt) * g * g, jnp.sum(plan.bar_cnt) * g

        return jax.lax.map(one, jnp.arange(w))

    blocks, bars = zip(*(per_rank(r) for r in range(w)), strict=True)
    return np.asarray(blocks, np.float64), np.asarray(bars, np.float64)


def metrics(blocks, bars, dense_work):
    w = blocks.shape[0]
    work = blocks + bars
    total = work.sum()
    ideal = total / w
    gathered_time = blocks.max(axis=0).sum() + bars.sum(axis=1).max()
    return {
        "worker_imbalance": float(work.sum(axis=1).max() / (total / w)),
        "ring_over_ideal": float(work.max(axis=0).sum() / ideal),
        "gathered_ring_over_ideal": float(gathered_time / ideal),
        "density": float(total / dense_work),
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seq-len", type=int, default=524288)
    ap.add_argument("--devices", type=int, default=32)
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--plot", type=Path)
    args = ap.parse_args(argv)
    n, w, g = args.seq_len, args.devices, args.block_size
    rng = np.random.default_rng(args.seed)
    dense_work = (n // g) * (n // g + 1) / 2 * g * g
    cases = [("dense causal", None)]
    for v, s, dist in [
        (1000, 6096, "front"),
        (1000, 6096, "uniform"),
        (30, 800, "front"),
        (3500, 100, "front"),
        (3500, 100, "uniform"),
        (100, 700, "uniform"),
    ]:
        cases.append((f"v={v}, s={s} ({dist})", synthetic_pattern(rng, n, v, s, dist)))
    print(
        f"# ring balance: N={n}, W={w}, G={g}; cells: worker imbalance / ring time over ideal "
        "[/ gathered-verticals ring time over ideal]\n"
    )
    print("| pattern | density | " + " | ".join(LAYOUTS) + " |")
    print("|---|---|" + "---|" * len(LAYOUTS))
    rows = []
    t0 = time.perf_counter()
    for name, pat in cases:
        row = {"pattern": name}
        cells = []
        for layout in LAYOUTS:
            blocks, bars = work_matrix(pat, layout, n, w, g)
            m = metrics(blocks, bars, dense_work)
            row[layout] = m
            cell = f"{m['worker_imbalance']:.3f} / **{m['ring_over_ideal']:.3f}**"
            if pat is not None:
                cell += f" / {m['gathered_ring_over_ideal']:.3f}"
            cells.append(cell)
        row["density"] = row["striped"]["density"]
        rows.append(row)
        print(f"| {name} | {row['density']:.4f} | " + " | ".join(cells) + " |", flush=True)
    print(f"\n({time.perf_counter() - t0:.0f} s)")
    if args.json:
        args.json.write_text(
            json.dumps({"seq_len": n, "devices": w, "block_size": g, "rows": rows}, indent=1)
        )
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(9.5, 4))
        x = np.arange(len(rows))
        series = [
            (layout, lambda r, layout=layout: r[layout]["ring_over_ideal"]) for layout in LAYOUTS
        ]
        series.append(
            (
                "striped, gathered verticals",
                lambda r: (
                    r["striped"]["gathered_ring_over_ideal"]
                    if r["pattern"] != "dense causal"
                    else r["striped"]["ring_over_ideal"]
                ),
            )
        )
        width = 0.8 / len(series)
        for i, (label, get) in enumerate(series):
            ax.bar(
                x + (i - (len(series) - 1) / 2) * width, [get(r) for r in rows], width, label=label
            )
        ax.set_yscale("log")
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks(x, [r["pattern"] for r in rows], rotation=20, ha="right", fontsize=8)
        ax.set_ylabel("ring time / ideal")
        ax.set_title(f"Sparse ring balance, {n // 1024}K tokens on {w} devices (G={g})")
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
