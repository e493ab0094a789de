"""EMPO² vs GRPO with SmolLM2-135M-Instruct at CPU scale, on TextWorld coin-collector games or
on the ScienceWorld lifespan tasks (``--env``).

One run per invocation (each run is its own process, one at a time on a shared machine):

    python scripts/empo2_experiment.py run --algo grpo --seed 0
    python scripts/empo2_experiment.py run --algo empo2 --seed 0
    ...
    python scripts/empo2_experiment.py report          # table, learning curves, OOD plot

A run trains with ``configs/rl/<algo>_<env>.yaml`` (the two configs of an env differ only in
``algo``: equal episodes, turns and environment steps per update), then evaluates the final policy
on the held-out test games (unseen seeds or variations): for ``--trials`` trials each with memory
on and no weight updates (trial t sees the tips written after trials < t), and for one trial with
memory off. ``--variant NAME`` labels a run with config overrides (e.g. ``--variant no-novelty
empo2.intrinsic_coef=0``). Results go to ``docs/results/empo2/[<env>/]<algo>[-<variant>]_s<seed>.json``.
``report`` prints the table and draws ``learning_curves.png``: training success (a moving mean
over ``--window`` updates, mean and range over seeds) against environment steps, and held-out
success after k trials. ``transfer`` evaluates a finished run on the test games of other tasks.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np

RESULTS = Path("docs/results/empo2")
# per env: the unseen tasks and turns of `transfer`, the plots' title
ENVS = {
    "textworld": (["coin-3"], 5, "TextWorld coin-collector 1-2"),
    "scienceworld": (
        ["lifespan-longest-lived-then-shortest-lived"],
        4,
        "ScienceWorld lifespan (longest, shortest)",
    ),
}


def _out(env: str) -> Path:
    return RESULTS if env == "textworld" else RESULTS / env


def _name(args) -> str:
    """The run's name: algo, variant, seed."""
    return f"{args.algo}{'-' + args.variant if args.variant else ''}_s{args.seed}"


def _run_dir(args) -> Path:
    base = Path(args.workdir)
    return (base if args.env == "textworld" else base / args.env) / _name(args)


def _config(args):
    """The run's config: the algo's config for the env, the overrides, the seed, ``--updates``."""
    from jaxlab.config import load_config
    from jaxlab.rl.multiturn import MultiTurnConfig

    cfg = load_config(f"rl/{args.algo}_{args.env}", args.overrides, cls=MultiTurnConfig)
    optim = dataclasses.replace(cfg.optim, seed=args.seed)
    cfg = dataclasses.replace(cfg, seed=args.seed, optim=optim)
    if args.updates:
        cfg = dataclasses.replace(cfg, updates=args.updates)
    return cfg


def run(args) -> None:
    from jaxlab.compilation_cache import enable_compilation_cache
    from jaxlab.rl.multiturn import MultiTurnTrainer

    enable_compilation_cache()  # the runs share their programs: only the first one compiles

    cfg = _config(args)
    workdir = _run_dir(args)
    t0 = time.perf_counter()
    trainer = MultiTurnTrainer(cfg, workdir)
    trainer.run()
    train_s = time.perf_counter() - t0
    metrics = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    pairs = _eval_pairs(trainer, args.eval_games)
    print(f"evaluating on held-out games: {args.trials} trials, memory on", flush=True)
    t1 = time.perf_counter()
    ood = trainer.evaluate("test", trials=args.trials, memory=True, pairs=pairs)
    eval_s = time.perf_counter() - t1
    print("evaluating on held-out games: 1 trial, memory off", flush=True)
    ood_no_memory = trainer.evaluate("test", trials=1, memory=False, pairs=pairs)
    trainer.close()
    result = {
        "algo": args.algo,
        "variant": args.variant,
        "overrides": args.overrides,
        "seed": args.seed,
        "config": dataclasses.asdict(cfg),
        "curve": [
            {
                k: m.get(k)
                for k in (
                    "update",
                    "mode",
                    "games",
                    "success",
                    "score",
                    "env_steps",
                    "sampled_tokens",
                    "memory_size",
                    "masked_responses",
                    "turns",
                    "loss",
                    "grad_norm",
                    "trained_micro_batches",
                    "intrinsic_mean",
                    "intrinsic_group_std",
                    "rollout_s",
                    "update_s",
                )
            }
            for m in metrics
        ],  # fmt: skip
        "ood": ood,
        "ood_no_memory": ood_no_memory,
        "train_s": train_s,
        "eval_s": eval_s,
    }
    out = _out(args.env)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{_name(args)}.json"
    path.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: result[k] for k in ("algo", "seed", "ood", "train_s", "eval_s")}))
    print(f"wrote {path}")


def _eval_pairs(trainer, games: int):
    """The held-out games: the first ``games`` test variations of each eval task (0: all)."""
    env = trainer.envs[0]
    return [(t, v) for t in trainer.eval_tasks for v in env.variations(t, "test")[: games or None]]


def transfer(args) -> None:
    """Held-out games of other tasks (a harder level) for a finished run: its final checkpoint,
    no weight updates, ``--trials`` trials with memory on and as many with memory off (k
    independent tries: what memory adds is the difference)."""
    from jaxlab.rl.multiturn import MultiTurnTrainer

    cfg = _config(args)
    tasks, max_turns, _ = ENVS[args.env]
    args.tasks, args.max_turns = args.tasks or tasks, args.max_turns or max_turns
    run_dir = _run_dir(args)
    if not (run_dir / "checkpoints").is_dir():
        raise SystemExit(
            f"no checkpoints in {run_dir}: run `run --env {args.env} --algo {args.algo} "
            f"--seed {args.seed}` first"
        )
    kwargs = dict(cfg.env.kwargs)
    if "tasks" in kwargs:  # TextWorld generates the games of the tasks it is given
        kwargs["tasks"] = list(dict.fromkeys([*kwargs["tasks"], *args.tasks]))
    kwargs["step_limit"] = args.max_turns
    env = dataclasses.replace(cfg.env, kwargs=kwargs, eval_tasks=tuple(args.tasks))
    cfg = dataclasses.replace(cfg, env=env, max_turns=args.max_turns)
    tag = "_".join(args.tasks) + f"_t{args.max_turns}"
    work = run_dir / f"transfer_{tag}"  # a config of its own, the run's checkpoints
    work.mkdir(parents=True, exist_ok=True)
    if not (work / "checkpoints").exists():
        (work / "checkpoints").symlink_to((run_dir / "checkpoints").resolve())
    trainer = MultiTurnTrainer(cfg, work)
    if trainer.resumed_from != cfg.updates:
        raise SystemExit(
            f"{run_dir} holds update {trainer.resumed_from}, not the final {cfg.updates}"
        )
    t0 = time.perf_counter()
    result = {
        "algo": args.algo,
        "variant": args.variant,
        "seed": args.seed,
        "tasks": args.tasks,
        "max_turns": args.max_turns,
    }
    pairs = _eval_pairs(trainer, args.eval_games)
    for memory in (True, False):
        print(f"{tag}: {args.trials} trials, memory {'on' if memory else 'off'}", flush=True)
        result["memory" if memory else "no_memory"] = trainer.evaluate(
            "test", trials=args.trials, memory=memory, pairs=pairs
        )
    result["eval_s"] = time.perf_counter() - t0
    trainer.close()
    out = _out(args.env) / "transfer"
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{tag}_{_name(args).rsplit('_s', 1)[0]}_s{args.seed}.json"
    path.write_text(json.dumps(result, indent=2))
    print(
        f"{args.algo} seed {args.seed}: success after k trials, memory on "
        f"{result['memory']['success_at']}, off {result['no_memory']['success_at']}"
    )
    print(f"wrote {path}")


def _smooth(x: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average along the last axis (the first points average what there is)."""
    c = np.cumsum(np.pad(x, [(0, 0)] * (x.ndim - 1) + [(1, 0)]), axis=-1)
    n = np.arange(1, x.shape[-1] + 1)
    lo = np.maximum(n - window, 0)
    return (c[..., n] - c[..., lo]) / (n - lo)


def report(args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    OUT = _out(args.env)
    runs = [json.loads(p.read_text()) for p in sorted(OUT.glob("*_s*.json"))]
    if not runs:
        raise SystemExit(f"no runs in {OUT}")
    by_algo: dict[str, list] = {}  # algo or algo-variant
    for r in runs:
        label = r["algo"] + (f"-{r['variant']}" if r.get("variant") else "")
        by_algo.setdefault(label, []).append(r)
    window = args.window
    print(
        f"{'algo':6s} {'seeds':>5s} {'updates':>7s} {'success first / last':>21s} "
        f"{'env steps':>9s} {'tokens':>7s} {'held-out success@k, memory':>27s} {'no memory':>9s}"
    )
    transfers: dict[tuple[str, str], list] = {}
    for p in sorted((OUT / "transfer").glob("*.json")):
        t = json.loads(p.read_text())
        label = t["algo"] + (f"-{t['variant']}" if t.get("variant") else "")
        transfers.setdefault((p.stem.rsplit("_", 2)[0], label), []).append(t)
    fig, ax = plt.subplots(1, 2 + bool(transfers), figsize=(16 if transfers else 11, 4))
    summary = {}
    labels = sorted({*by_algo, *(algo for _, algo in transfers)})
    color = {label: f"C{i}" for i, label in enumerate(labels)}  # one colour per run kind
    for algo, rs in sorted(by_algo.items()):
        n = min(len(r["curve"]) for r in rs)
        succ = np.array([[c["success"] for c in r["curve"][:n]] for r in rs])
        score = np.array([[c["score"] for c in r["curve"][:n]] for r in rs])
        curve_of = succ if args.metric == "success" else score
        steps = np.mean([[c["env_steps"] for c in r["curve"][:n]] for r in rs], axis=0)
        tokens = np.mean([r["curve"][n - 1]["sampled_tokens"] for r in rs])
        ood = np.array([r["ood"]["success_at"] for r in rs])
        plain = [r["ood_no_memory"]["success_at"][0] for r in rs if "ood_no_memory" in r]
        w = min(window, n)
        summary[algo] = {
            "seeds": [r["seed"] for r in rs],
            "updates": n,
            "episodes_per_update": rs[0]["config"]["episodes"] * rs[0]["config"]["groups"],
            f"success_first_{w}": float(succ[:, :w].mean()),
            f"success_last_{w}": float(succ[:, -w:].mean()),
            f"success_last_{w}_per_seed": succ[:, -w:].mean(axis=1).tolist(),
            f"score_first_{w}": float(score[:, :w].mean()),
            f"score_last_{w}": float(score[:, -w:].mean()),
            f"score_last_{w}_per_seed": score[:, -w:].mean(axis=1).tolist(),
            "env_steps": float(steps[-1]),
            "sampled_tokens": float(tokens),
            "ood_success_at": ood.mean(axis=0).tolist(),
            "ood_success_at_per_seed": ood.tolist(),
            "ood_no_memory": float(np.mean(plain)) if plain else None,
            "ood_no_memory_per_seed": plain,
            "ood_games": rs[0]["ood"]["games"],
        }
        s = summary[algo]
        first, last = s[f"success_first_{w}"], s[f"success_last_{w}"]
        print(
            f"{algo:6s} {len(rs):5d} {n:7d} {first:10.3f} / {last:.3f} {s['env_steps']:9.0f} "
            f"{s['sampled_tokens']:7.0f} "
            f"{' '.join(f'{x:.2f}' for x in s['ood_success_at']):>27s} "
            f"{s['ood_no_memory'] if plain else float('nan'):9.2f}"
        )
        curve = _smooth(curve_of, window)
        c = color[algo]
        ax[0].plot(steps, curve.mean(axis=0), color=c, label=f"{algo} (mean of {len(rs)} seeds)")
        ax[0].fill_between(steps, curve.min(axis=0), curve.max(axis=0), color=c, alpha=0.2)
        k = np.arange(1, ood.shape[1] + 1)
        ax[1].set_xticks(k)
        ax[1].errorbar(
            k, ood.mean(axis=0), yerr=[ood.mean(0) - ood.min(0), ood.max(0) - ood.mean(0)],
            marker="o", capsize=3, color=c, label=f"{algo}, memory on",
        )  # fmt: skip
        if plain:
            ax[1].scatter(
                [1], [np.mean(plain)], marker="x", s=60, color=c, label=f"{algo}, memory off"
            )
    ax[0].set(
        xlabel="environment steps",
        ylabel=f"training {args.metric} (moving mean of {window} updates)",
        title=f"{ENVS[args.env][2]}, SmolLM2-135M",
    )
    ax[1].set(xlabel="trials (no weight updates)", ylabel="success after k trials",
              title="held-out games")  # fmt: skip
    for (tag, algo), ts in sorted(transfers.items()):
        on = np.array([t["memory"]["success_at"] for t in ts])
        off = np.array([t["no_memory"]["success_at"] for t in ts])
        summary.setdefault("transfer", {}).setdefault(tag, {})[algo] = {
            "seeds": [t["seed"] for t in ts],
            "games": ts[0]["memory"]["games"],
            "memory_success_at": on.mean(axis=0).tolist(),
            "no_memory_success_at": off.mean(axis=0).tolist(),
            "memory_per_seed": on.tolist(),
            "no_memory_per_seed": off.tolist(),
        }
        print(
            f"{tag} {algo:6s} seeds {len(ts)}: success after k trials, memory on "
            f"{' '.join(f'{x:.2f}' for x in on.mean(0))}, off {' '.join(f'{x:.2f}' for x in off.mean(0))}"
        )
        k = np.arange(1, on.shape[1] + 1)
        ax[2].set_xticks(k)
        c = color[algo]
        ax[2].plot(k, on.mean(0), marker="o", color=c, label=f"{algo}, memory on")
        ax[2].fill_between(k, on.min(0), on.max(0), alpha=0.15, color=c)
        ax[2].plot(k, off.mean(0), marker="x", ls="--", color=c,
                   label=f"{algo}, memory off")  # fmt: skip
        ax[2].set(xlabel="trials (no weight updates)", ylabel="success after k trials",
                  title=f"unseen harder games ({tag})")  # fmt: skip
    for a in ax:
        a.legend()
        a.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(OUT / "learning_curves.png", dpi=120)
    (OUT / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"wrote {OUT / 'learning_curves.png'} and {OUT / 'summary.json'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p):
        p.add_argument("--env", choices=sorted(ENVS), default="textworld")
        p.add_argument("--algo", choices=["grpo", "empo2"], required=True)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--variant", default="", help="a label for runs with config overrides")
        p.add_argument("--updates", type=int, default=0, help="override the config's updates")
        p.add_argument("--eval-games", type=int, default=0,
                       help="held-out games per eval task: the first N test variations (0: all)")  # fmt: skip
        p.add_argument("--workdir", default="runs/empo2_experiment")
        p.add_argument("overrides", nargs="*", help="config overrides key=value")

    r = sub.add_parser("run", help="train one (algo, seed) and evaluate it on held-out games")
    common(r)
    r.add_argument("--trials", type=int, default=3)
    t = sub.add_parser("transfer", help="a finished run on held-out games of other tasks")
    common(t)
    t.add_argument("--tasks", nargs="+", help="default: coin-3 / the two-animal lifespan task")
    t.add_argument("--max-turns", type=int, default=0, help="default: 5 / 4")
    t.add_argument("--trials", type=int, default=4)
    rep = sub.add_parser("report", help="table and plots of the finished runs")
    rep.add_argument("--env", choices=sorted(ENVS), default="textworld")
    rep.add_argument("--window", type=int, default=10, help="updates per moving mean")
    rep.add_argument("--metric", choices=["success", "score"], default="success",
                     help="the learning curves' measure: won episodes, or the final score")  # fmt: skip
    args = parser.parse_args()
    {"run": run, "transfer": transfer, "report": report}[args.command](args)


if __name__ == "__main__":  # environment workers are spawned processes: they import this file
    main()
