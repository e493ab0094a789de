"""The epistemic-suppression experiment of "Why self-distillation (sometimes) degrades reasoning"
at CPU scale: start from SmolLM2-135M fine-tuned on epistemic arithmetic traces, train with
self-distillation under teacher contexts of growing richness and two task coverages, and watch
in-domain accuracy, OOD accuracy, response length and epistemic markers.

Grid: context {none (GRPO), rollout, solution_no_reasoning, solution} x coverage {one family,
several families} x seeds, every cell trained on the same number of samples (updates x groups x
group size). The teacher is the frozen initial model (the paper's main setting, teacher update
rate 0; ``--teacher ema --ema-rate 0.05`` is its ablation, ``--teacher live`` the policy itself)
given the re-prompt; the loss is pure distillation (w = 1), full-logit generalised JSD
(alpha 0.5) with IS clipping at 2, token-mean.

    python scripts/self_distillation_experiment.py --init runs/aha/epistemic/model --out runs/sdpo_exp
    python scripts/self_distillation_experiment.py --out runs/sdpo_exp --report-only --docs docs/results/sdpo

Without --init the epistemic SFT model is made first under OUT/sft (make_sft_model: with
``--family-set carry`` on carry-doubting traces of all five addition families, e.g.
``--sft-steps 120``, about 17 minutes on a 2-core CPU). Results go to
OUT/sdpo.json (and DOCS with --docs), plots next to them; finished cells are reused.
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

CONTEXTS = ("none", "rollout", "solution_no_reasoning", "solution")


def _fam(label, digits, terms, ops):
    return {
        "name": "arithmetic",
        "kwargs": {"digits": digits, "terms": terms, "ops": ops},
        "label": label,
    }


# Family sets: ``arith`` (the mixed-operation set) and ``carry`` (additions only, for a model
# fine-tuned on 2-digit 3-term sums, e.g. the "aha" experiment's ``--check carry`` model: in-domain
# its own family and other sizes, OOD longer sums and wider operands).
FAMILY_SETS = {
    "arith": (
        {
            "add1": _fam("add1", 1, 2, "+"),
            "addsub2": _fam("addsub2", 2, 2, "+-"),
            "mix3": _fam("mix3", 1, 3, "+-*"),
            "sub1": _fam("sub1", 1, 2, "-"),
            "mul1": _fam("mul1", 1, 2, "*"),
        },
        {"one": ["add1"], "several": ["add1", "addsub2", "mix3"]},
        ["sub1", "mul1"],
    ),
    "carry": (
        {
            "add2x3": _fam("add2x3", 2, 3, "+"),
            "add2x2": _fam("add2x2", 2, 2, "+"),
            "add3x2": _fam("add3x2", 3, 2, "+"),
            "add2x5": _fam("add2x5", 2, 5, "+"),
            "add3x3": _fam("add3x3", 3, 3, "+"),
        },
        {"one": ["add2x3"], "several": ["add2x3", "add2x2", "add3x2"]},
        ["add2x5", "add3x3"],
    ),
}
FAMILIES, COVERAGES, OOD = FAMILY_SETS["arith"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", default="runs/sdpo_exp")
    p.add_argument("--init", default=None, help="HF directory of the epistemic SFT model")
    p.add_argument("--contexts", nargs="+", default=list(CONTEXTS), choices=CONTEXTS)
    p.add_argument("--coverages", nargs="+", default=list(COVERAGES), choices=list(COVERAGES))
    p.add_argument(
        "--family-set", default="arith", choices=list(FAMILY_SETS),
        help="task families: in-domain coverages and OOD (FAMILY_SETS)",
    )  # fmt: skip
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--updates", type=int, default=3, help="policy updates per cell")
    p.add_argument("--groups", type=int, default=2, help="prompts (groups) per update")
    p.add_argument("--group-size", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-5)
    p.add_argument(
        "--advantage",
        default="grpo",
        choices=("grpo", "dr_grpo", "rloo"),
        help="GRPO cells' advantage (dr_grpo: no division by the group's std, the paper's setting)",
    )
    p.add_argument(
        "--kl-coef", type=float, default=0.0, help="GRPO cells' KL penalty to the initial model"
    )
    p.add_argument(
        "--teacher",
        default="base",
        choices=("base", "ema", "live"),
        help="distillation cells' teacher weights: the frozen initial model (the paper's main "
        "setting), an EMA of the policy (--ema-rate, the paper's ablation: 0.05), or the policy",
    )
    p.add_argument(
        "--ema-rate", type=float, default=0.05, help="teacher update rate (--teacher ema)"
    )
    p.add_argument("--mode", default="full", help="distillation mode (full / topk / sampled_token)")
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--eval-problems", type=int, default=8, help="held-out problems per family")
    p.add_argument("--sft-steps", type=int, default=15)
    p.add_argument("--sft-problems", type=int, default=400, help="per family (--family-set carry)")
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--docs", default=None, help="also copy JSON and plots into this directory")
    return p.parse_args(argv)


def _rss_gb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 2**20
    return float("nan")


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def make_sft_model(args, out: Path) -> Path:
    """The epistemic SFT model, made under OUT/sft unless it exists. ``arith``: the settings of
    the first "aha" run (300 problems of 2-digit 3-term ``+-``, column checks, 15 updates of 4 x
    384 tokens at lr 1e-4). ``carry``: ``--check carry`` traces of every family of the set
    (``--sft-problems`` each, interleaved), ``--sft-steps`` updates of 2 x 256 tokens at lr 2e-4,
    so the starting model can do the OOD families too and only the RL coverage differs."""
    from jaxlab.analysis import trace_dataset, write_sft_jsonl
    from jaxlab.checkpoint import CheckpointConfig
    from jaxlab.sft import SFTConfig, SFTDataConfig, train_sft
    from jaxlab.train import OptimConfig

    work = out / "sft"
    if (work / "model" / "config.json").is_file():
        return work / "model"
    if args.family_set == "carry":
        parts = [  # other problem indices per family (the same index draws the same numbers)
            trace_dataset(
                "epistemic", args.sft_problems, start=k * 10_000, check="carry", **f["kwargs"]
            )
            for k, f in enumerate(FAMILIES.values())
        ]
        mixed = [ex for group in zip(*parts) for ex in group]
        data = write_sft_jsonl(mixed, work / "epistemic.jsonl")
        rows, lr = SFTDataConfig(path=str(data), seq_len=256, batch_size=2), 2e-4
    else:
        data = write_sft_jsonl(
            trace_dataset("epistemic", 300, digits=2, terms=3, ops="+-"), work / "epistemic.jsonl"
        )
        rows, lr = SFTDataConfig(path=str(data), seq_len=384, batch_size=4), 1e-4
    cfg = SFTConfig(
        model="smollm2-135m-instruct",
        data=rows,
        train=OptimConfig(lr=lr, warmup_steps=3, steps=args.sft_steps, grad_clip=1.0),
        checkpoint=CheckpointConfig(save_every=10**6, keep=1, async_save=False),
        log_every=5,
    )
    log(f"SFT of the epistemic model ({args.sft_steps} updates) ...")
    t0 = time.perf_counter()
    m = train_sft(cfg, work, progress=False)
    log(f"SFT done in {time.perf_counter() - t0:.0f} s, last loss {m['loss']:.3f}")
    return work / "model"


def cell_config(args, init: str, context: str, coverage: str, seed: int):
    from jaxlab.checkpoint import CheckpointConfig
    from jaxlab.rl.scheduling import SchedulerConfig
    from jaxlab.rl.self_distill import DistillConfig, SDPOEvalConfig, SDPOTrainConfig
    from jaxlab.rl.trainer import (
        RLGenerationConfig,
        RLLossConfig,
        RLOptimConfig,
        RLTaskConfig,
    )

    fams = [FAMILIES[f] for f in COVERAGES[coverage]]
    return SDPOTrainConfig(
        model=init,
        task=RLTaskConfig(name="mixture", kwargs={"families": fams}, seed=0, shuffle_seed=seed),
        scheduler=SchedulerConfig(
            scheduler="sync",
            group_size=args.group_size,
            update_groups=args.groups,
            rollout_groups=args.groups,
            max_staleness=0,
            num_prompts=args.updates * args.groups,
        ),
        loss=RLLossConfig(
            agg="token_mean",
            advantage=args.advantage,
            kl_coef=args.kl_coef if context == "none" else 0.0,
        ),
        generation=RLGenerationConfig(
            slots=args.groups * args.group_size,
            max_new_tokens=args.max_new_tokens,
            temperature=1.0,
            chat=True,
        ),
        optim=RLOptimConfig(lr=args.lr, seed=seed),
        checkpoint=CheckpointConfig(save_every=10**6, keep=1, async_save=False),
        distill=DistillConfig(
            context=context,
            teacher=args.teacher,
            ema_rate=args.ema_rate,
            weight=1.0,
            mode=args.mode,
            alpha=1.0 if args.mode == "sampled_token" else args.alpha,
            is_clip=2.0,
        ),
        evaluation=SDPOEvalConfig(
            at_start=False,
            problems=args.eval_problems,
            in_domain=fams,
            ood=[FAMILIES[f] for f in OOD],
            max_new_tokens=args.max_new_tokens,
            batch_size=40,
        ),
        tensorboard=False,
    )


def cell_label(args, context: str) -> str:
    """The context's name in the results: GRPO cells with a non-default advantage or a KL penalty
    are told apart ("none[dr_grpo kl0.04]"), distillation cells (w = 1, which use neither) with a
    teacher other than the frozen initial model too ("solution[ema0.05]", "solution[live]")."""
    if context != "none":
        if args.teacher == "base":
            return context
        return f"{context}[{args.teacher}{f'{args.ema_rate:g}' if args.teacher == 'ema' else ''}]"
    if args.advantage == "grpo" and args.kl_coef == 0:
        return context
    extra = [args.advantage] if args.advantage != "grpo" else []
    extra += [f"kl{args.kl_coef:g}"] if args.kl_coef else []
    return f"none[{' '.join(extra)}]"


def contexts_in(table: dict) -> list[str]:
    """The paper's contexts in order, then GRPO variants as they appear."""
    seen = [k.split("/", 1)[1] for k in table]
    return [c for c in CONTEXTS if c in seen] + [
        c for c in dict.fromkeys(seen) if c not in CONTEXTS
    ]


LABELS = {"none": "GRPO", "rollout": "rollout", "solution_no_reasoning": "sol. w/o\nreasoning"}


def run_grid(args, out: Path) -> dict:
    from flax import nnx

    import jaxlab.rl.trainer as trainer_mod
    from jaxlab.rl.self_distill import SDPOTrainer, evaluate_families

    init = args.init or str(make_sft_model(args, out))
    results_path = out / "sdpo.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    results.setdefault("cells", {})
    if results.get("settings", {}).get("init", init) != init:
        raise SystemExit(
            f"{results_path} holds results of {results['settings']['init']}, not {init}"
        )
    results["settings"] = {k: v for k, v in vars(args).items() if k not in ("report_only",)}
    results["settings"]["init"] = init

    # one load of the initial weights for every cell (each cell trains its own copy)
    t0 = time.perf_counter()
    base_model, tokenizer = trainer_mod.load_policy(cell_config(args, init, "none", "one", 0))
    log(f"loaded {init} in {time.perf_counter() - t0:.0f} s")
    trainer_mod.load_policy = lambda cfg: (nnx.clone(base_model), tokenizer)

    class Trainer(SDPOTrainer):  # the grid keeps no checkpoints
        def _save(self, force: bool = False) -> None:
            pass

    if "initial" not in results:
        t0 = time.perf_counter()
        results["initial"] = evaluate_families(
            base_model,
            tokenizer,
            list(FAMILIES.values()),
            problems=args.eval_problems,
            start=100_000,
            max_new_tokens=args.max_new_tokens,
            batch_size=40,
        )
        log(f"initial model: {results['initial']} ({time.perf_counter() - t0:.0f} s)")
        results_path.write_text(json.dumps(results, indent=2))

    for coverage in args.coverages:
        for seed in args.seeds:
            for context in args.contexts:
                name = f"{cell_label(args, context)}/{coverage}/seed{seed}"
                if name in results["cells"]:
                    continue
                t0 = time.perf_counter()
                label = (
                    cell_label(args, context).replace("[", "_").replace("]", "").replace(" ", "_")
                )
                work = out / "cells" / label / coverage / f"seed{seed}"
                shutil.rmtree(work, ignore_errors=True)
                trainer = Trainer(cell_config(args, init, context, coverage, seed), work)
                summary = trainer.run(progress=False)
                lines = [json.loads(x) for x in (work / "metrics.jsonl").read_text().splitlines()]
                cell = {
                    "final": trainer.last_eval,
                    "wall_s": time.perf_counter() - t0,
                    "updates": [
                        {
                            k: x.get(k)
                            for k in (
                                "version",
                                "reward_mean",
                                "mean_length",
                                "rollout_epistemic",
                                "teacher_rows",
                                "distill_loss",
                                "distill_div",
                                "policy_loss",
                                "loss",
                            )
                        }
                        for x in lines
                    ],
                    "reward_last_quarter": summary["reward_last_quarter"],
                }
                results["cells"][name] = cell
                results_path.write_text(json.dumps(results, indent=2))
                f = cell["final"]
                log(
                    f"{name}: ID acc {f['eval_id_accuracy']:.3f} OOD acc "
                    f"{f['eval_ood_accuracy']:.3f} tokens {f['eval_id_tokens']:.1f}/"
                    f"{f['eval_ood_tokens']:.1f} epistemic {f['eval_id_epistemic']:.2f}/"
                    f"{f['eval_ood_epistemic']:.2f} rollout epistemic "
                    f"{[round(u['rollout_epistemic'], 2) for u in cell['updates']]} "
                    f"({cell['wall_s']:.0f} s)"
                )
                del trainer
                gc.collect()  # each cell's weights, optimizer state and teacher go before the next
                log(f"resident memory {_rss_gb():.1f} GB")
    return results


def summarize(results: dict) -> dict:
    """Means (and per-seed values) of the final metrics by (coverage, context)."""
    table = {}
    for name, cell in results["cells"].items():
        context, coverage, _ = name.split("/")
        row = table.setdefault(f"{coverage}/{context}", {"seeds": 0})
        row["seeds"] += 1
        for k in (
            "eval_id_accuracy",
            "eval_ood_accuracy",
            "eval_id_tokens",
            "eval_ood_tokens",
            "eval_id_epistemic",
            "eval_ood_epistemic",
        ):
            row.setdefault(k, []).append(cell["final"][k])
        row.setdefault("rollout_epistemic", []).append(
            [u["rollout_epistemic"] for u in cell["updates"]]
        )
        row.setdefault("rollout_length", []).append([u["mean_length"] for u in cell["updates"]])
    for row in table.values():
        for k, v in list(row.items()):
            if isinstance(v, list) and v and not isinstance(v[0], list):
                row[k + "_mean"] = float(np.mean(v))
    return table


def initial_means(results: dict, coverage: str) -> dict:
    init = results["initial"]
    ind = [init[f] for f in COVERAGES[coverage]]
    ood = [init[f] for f in OOD]
    return {
        "eval_id_accuracy": float(np.mean([r["accuracy"] for r in ind])),
        "eval_ood_accuracy": float(np.mean([r["accuracy"] for r in ood])),
        "eval_id_tokens": float(np.mean([r["mean_tokens"] for r in ind])),
        "eval_ood_tokens": float(np.mean([r["mean_tokens"] for r in ood])),
        "eval_id_epistemic": float(np.mean([r["epistemic_per_response"] for r in ind])),
        "eval_ood_epistemic": float(np.mean([r["epistemic_per_response"] for r in ood])),
    }


def report(results: dict, out: Path, docs: Path | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = summarize(results)
    results["summary"] = table
    (out / "sdpo.json").write_text(json.dumps(results, indent=2))
    keys = [
        ("eval_id_accuracy", "in-domain accuracy"),
        ("eval_ood_accuracy", "OOD accuracy"),
        ("eval_id_tokens", "tokens / response (ID)"),
        ("eval_id_epistemic", "epistemic markers / response (ID)"),
    ]
    print("| coverage | context | seeds | ID acc | OOD acc | tokens ID / OOD | markers ID / OOD |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for coverage in COVERAGES:
        init = initial_means(results, coverage)
        print(
            f"| {coverage} | initial model | - | {init['eval_id_accuracy']:.3f} | "
            f"{init['eval_ood_accuracy']:.3f} | {init['eval_id_tokens']:.1f} / "
            f"{init['eval_ood_tokens']:.1f} | {init['eval_id_epistemic']:.2f} / "
            f"{init['eval_ood_epistemic']:.2f} |"
        )
        for context in contexts_in(table):
            row = table.get(f"{coverage}/{context}")
            if row is None:
                continue
            print(
                f"| {coverage} | {context} | {row['seeds']} | {row['eval_id_accuracy_mean']:.3f} | "
                f"{row['eval_ood_accuracy_mean']:.3f} | {row['eval_id_tokens_mean']:.1f} / "
                f"{row['eval_ood_tokens_mean']:.1f} | {row['eval_id_epistemic_mean']:.2f} / "
                f"{row['eval_ood_epistemic_mean']:.2f} |"
            )

    shown = contexts_in(table)
    run = [cv for cv in COVERAGES if any(k.startswith(f"{cv}/") for k in table)]
    fig, axes = plt.subplots(
        len(run), len(keys), figsize=(4.2 * len(keys), 3.5 * len(run)), squeeze=False
    )
    for r, coverage in enumerate(run):
        init = initial_means(results, coverage)
        for c, (key, title) in enumerate(keys):
            ax = axes[r][c]
            for x, context in enumerate(shown):
                row = table.get(f"{coverage}/{context}")
                if row is None:
                    continue
                vals = row[key]
                ax.bar(x, np.mean(vals), color=f"C{x}", alpha=0.6)
                ax.scatter([x] * len(vals), vals, color="k", s=12, zorder=3)
            ax.axhline(init[key], color="gray", ls="--", lw=1, label="initial model")
            ax.set_xticks(range(len(shown)))
            ax.set_xticklabels(
                [LABELS.get(c, c).replace("none[", "GRPO\n[") for c in shown], fontsize=8
            )
            ax.set_title(f"{title}\ncoverage: {coverage}", fontsize=9)
            if r == 0 and c == 0:
                ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "sdpo_final.png", dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(len(run), 2, figsize=(9, 3.5 * len(run)), squeeze=False)
    for r, coverage in enumerate(run):
        for c, (key, title) in enumerate(
            (("rollout_epistemic", "markers / rollout"), ("rollout_length", "tokens / rollout"))
        ):
            ax = axes[r][c]
            for x, context in enumerate(shown):
                row = table.get(f"{coverage}/{context}")
                if row is None:
                    continue
                curves = np.asarray(row[key], float)
                ax.plot(
                    range(1, curves.shape[1] + 1),
                    curves.mean(0),
                    "o-",
                    color=f"C{x}",
                    label=context,
                )
            ax.set_xlabel("update")
            ax.set_title(f"{title} during training, coverage: {coverage}", fontsize=9)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "sdpo_training.png", dpi=110)
    plt.close(fig)
    if docs is not None:
        docs.mkdir(parents=True, exist_ok=True)
        for name in ("sdpo.json", "sdpo_final.png", "sdpo_training.png"):
            shutil.copy(out / name, docs / name)
    log(f"wrote {out / 'sdpo_final.png'} and {out / 'sdpo_training.png'}")


def use_family_set(name: str) -> None:
    global FAMILIES, COVERAGES, OOD
    FAMILIES, COVERAGES, OOD = FAMILY_SETS[name]


def main(argv=None):
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not args.report_only:
        use_family_set(args.family_set)
        t0 = time.perf_counter()
        results = run_grid(args, out)
        log(f"grid done in {time.perf_counter() - t0:.0f} s")
    else:
        results = json.loads((out / "sdpo.json").read_text())
        use_family_set(results["settings"].get("family_set", "arith"))
    report(results, out, Path(args.docs) if args.docs else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
