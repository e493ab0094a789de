"""The "Aha" experiment on a CPU: fine-tune SmolLM2-135M-Instruct on arithmetic traces written in
three styles by one solver (procedural / epistemic / synonym, jaxlab.analysis.traces), then ask of
the fine-tuned models what the information-allocation paper asks of reasoning models:

1. Accuracy and epistemic markers of each model on held-out problems (greedy).
2. Information curves of the procedural and the epistemic model on their own held-out traces:
   answer sufficiency H(Y | s_t) and log p(y* | s_t) at checkpoints along the trace, self-information
   split into epistemic and procedural tokens, stagnation onsets; accuracy vs final sufficiency.
3. Test-time controls: suppressing the marker tokens (logit bias -100) on the epistemic model and on
   the synonym model (same function, other words), and "Wait" injection after a wrong answer.

    python scripts/aha_experiment.py --out runs/aha                      # everything
    python scripts/aha_experiment.py --out runs/aha --only-data          # just the SFT data

Fine-tuned models are kept under OUT/<style>/model and reused when present. Numbers go to
OUT/aha.json (and docs/results/aha/ with --docs), plots next to them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

STYLES = ("procedural", "epistemic", "synonym")


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", default="runs/aha")
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--styles", nargs="+", default=list(STYLES), choices=STYLES)
    p.add_argument("--train-problems", type=int, default=400)
    p.add_argument("--digits", type=int, default=2)
    p.add_argument("--terms", type=int, default=3)
    p.add_argument("--ops", default="+")
    p.add_argument(
        "--check", default="columns", choices=("columns", "tens", "carry"),
        help="how the epistemic / synonym traces check a step (jaxlab.analysis.traces.check_of)",
    )  # fmt: skip
    p.add_argument("--steps", type=int, default=30, help="SFT updates per model")
    p.add_argument("--batch-size", type=int, default=4, help="packed rows per update")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument(
        "--mask-slips", action="store_true",
        help="no loss on the planted wrong results (the model reads slips, it is not taught them)",
    )  # fmt: skip
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--sft-seed", type=int, default=0, help="order of the packed SFT rows")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--eval-problems", type=int, default=48)
    p.add_argument("--eval-start", type=int, default=100000, help="first held-out problem index")
    p.add_argument("--max-new-tokens", type=int, default=160)
    p.add_argument("--suff-problems", type=int, default=12, help="traces per model for the curves")
    p.add_argument(
        "--curve-styles", nargs="*", default=list(STYLES), choices=STYLES,
        help="models whose held-out traces get sufficiency / information curves",
    )  # fmt: skip
    p.add_argument("--checkpoints", type=int, default=8)
    p.add_argument("--samples", type=int, default=8, help="answers sampled per checkpoint (K)")
    p.add_argument("--skip-base", action="store_true", help="do not evaluate the untuned model")
    p.add_argument("--only-data", action="store_true")
    p.add_argument(
        "--report-only", action="store_true", help="plots and tables from OUT/aha.json (no runs)"
    )
    p.add_argument("--docs", default=None, help="also copy JSON and plots into this directory")
    return p.parse_args(argv)


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def make_data(args, out: Path) -> dict[str, Path]:
    from jaxlab.analysis import trace_dataset, write_sft_jsonl

    paths = {}
    for style in args.styles:
        data = trace_dataset(
            style, args.train_problems, digits=args.digits, terms=args.terms, ops=args.ops,
            check=args.check, mask_slips=args.mask_slips,
        )  # fmt: skip
        paths[style] = write_sft_jsonl(data, out / "data" / f"{style}.jsonl")
    return paths


def finetune(args, style: str, data: Path, out: Path) -> Path:
    from jaxlab.checkpoint import CheckpointConfig
    from jaxlab.sft import SFTConfig, SFTDataConfig, train_sft
    from jaxlab.train import OptimConfig

    work = out / style
    if (work / "model" / "config.json").is_file():
        log(f"{style}: reusing {work / 'model'}")
        return work / "model"
    cfg = SFTConfig(
        model=args.model,
        data=SFTDataConfig(
            path=str(data), seq_len=args.seq_len, batch_size=args.batch_size, seed=args.sft_seed
        ),
        train=OptimConfig(lr=args.lr, warmup_steps=args.warmup, steps=args.steps, grad_clip=1.0),
        checkpoint=CheckpointConfig(save_every=10**6, keep=1, async_save=False),
        log_every=5,
    )
    t0 = time.perf_counter()
    m = train_sft(cfg, work, progress=False)
    log(
        f"{style}: SFT {args.steps} steps in {time.perf_counter() - t0:.0f} s, last loss {m['loss']:.3f}"
    )
    return work / "model"


def evaluate(model, tok, problems, task, modes, args):
    """``{mode: InterventionResult.to_dict() + correct, accuracy_ci (Wilson 95%), checks}``;
    ``checks`` sums :func:`jaxlab.analysis.traces.check_outcomes` and ``steps``
    :func:`~jaxlab.analysis.traces.step_outcomes` over the responses (before any injected
    "Wait")."""
    from jaxlab.analysis import EPISTEMIC_WORDS, run_intervention, wilson_interval
    from jaxlab.analysis.traces import SYNONYM_WORDS, check_outcomes, step_outcomes

    res = {}
    for mode in modes:
        t0 = time.perf_counter()
        # "suppress_synonym": the synonym model with its own phrases' lead words banned instead
        own = mode == "suppress_synonym"
        r = run_intervention(
            model, tok, task, problems, "suppress" if own else mode,
            max_new_tokens=args.max_new_tokens, wait_when="wrong",
            suppress_words=SYNONYM_WORDS if own else EPISTEMIC_WORDS,
        )  # fmt: skip
        d = r.to_dict()
        k = sum(x == 1.0 for x in r.rewards)
        d["correct"], d["accuracy_ci"] = k, wilson_interval(k, len(r.rewards))
        checks: dict[str, int] = {}
        steps: dict[str, int] = {}
        for text in r.responses:
            first = text.split("\n\nWait ")[0]
            for key, v in check_outcomes(first).items():
                checks[key] = checks.get(key, 0) + v
            for key, v in step_outcomes(first).items():
                steps[key] = steps.get(key, 0) + v
        d["checks"], d["steps"] = checks, steps
        res[mode] = d
        lo, hi = d["accuracy_ci"]
        log(
            f"  {mode:11s} acc {r.accuracy:.3f} ({k}/{len(r.rewards)}, 95% CI {lo:.2f}-{hi:.2f}) "
            f"markers/resp {r.markers_per_response:.2f} tokens/resp {r.tokens_per_response:.0f} "
            f"checks {json.dumps(checks)} steps {json.dumps(steps)} "
            f"({time.perf_counter() - t0:.0f} s)"
        )
    return res


def curves(model, tok, task, problems, responses, args):
    from jaxlab.analysis import answer_sufficiency, trace_information
    from jaxlab.analysis.information import encode_trace

    out = []
    # the trace is what the model wrote before its answer; the answer itself is forced and scored
    traces = [r.split("<answer>")[0].rstrip() for r in responses]
    infos = trace_information(model, tok, [p.prompt for p in problems], traces)
    for p, full, trace, info in zip(problems, responses, traces, infos):
        pi, ri = encode_trace(tok, p.prompt, trace)
        c = answer_sufficiency(
            model, tok, pi, ri, str(p.answer), checkpoints=args.checkpoints,
            answer_prefix="\n<answer>", answer_suffix="</answer>", num_samples=args.samples,
            temperature=1.0, max_answer_tokens=8,
        )  # fmt: skip
        out.append(
            {
                "correct": task.reward(p, full) == 1.0,
                "sufficiency": c.to_dict(),
                "tokens": len(ri),
                "info_total": float(info.info.sum()),
                "info_epistemic": float(info.info[info.epistemic].sum()),
                "info_procedural": float(info.info[~info.epistemic].sum()),
                "epistemic_tokens": int(info.epistemic.sum()),
                "stagnation_onset": info.stagnation(),
                "segments": info.num_segments,
                "procedural_gain_per_segment": info.segment_gain()["procedural"].tolist(),
            }
        )
    return out, infos


def summarize_curves(rows):
    c = max(len(r["sufficiency"]["entropy"]) for r in rows)
    grid = np.full((len(rows), c), np.nan)
    lp = np.full((len(rows), c), np.nan)
    for i, r in enumerate(rows):
        e = r["sufficiency"]["entropy"]
        grid[i, : len(e)] = e
        lp[i, : len(e)] = r["sufficiency"]["logp_answer"]
    final_h = np.array([r["sufficiency"]["entropy"][-1] for r in rows])
    correct = np.array([r["correct"] for r in rows])
    return {
        "mean_entropy_by_checkpoint": np.nanmean(grid, 0).tolist(),
        "mean_logp_by_checkpoint": np.nanmean(lp, 0).tolist(),
        "final_entropy_correct": float(final_h[correct].mean()) if correct.any() else None,
        "final_entropy_wrong": float(final_h[~correct].mean()) if (~correct).any() else None,
        "accuracy": float(correct.mean()),
        "stagnant_traces": int(sum(r["stagnation_onset"] >= 0 for r in rows)),
        "mean_info_epistemic": float(np.mean([r["info_epistemic"] for r in rows])),
        "mean_info_procedural": float(np.mean([r["info_procedural"] for r in rows])),
        "mean_tokens": float(np.mean([r["tokens"] for r in rows])),
    }


def plot_curves(summary: dict, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for name, s in summary.items():
        h = s["mean_entropy_by_checkpoint"]
        x = np.linspace(0, 1, len(h))
        axes[0].plot(x, h, marker="o", ms=3, label=name)
        axes[1].plot(x, -np.asarray(s["mean_logp_by_checkpoint"]), marker="o", ms=3, label=name)
    axes[0].set_ylabel("mean H(Y | s_t) (nats, K samples)")
    axes[1].set_ylabel("mean -log p(y* | s_t) (nats)")
    for ax in axes:
        ax.set_xlabel("fraction of the trace kept")
        ax.legend(fontsize=8)
    fig.suptitle("Answer sufficiency along held-out traces (SmolLM2-135M fine-tuned)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(args, out: Path, results: dict, info_examples: dict | None = None) -> None:
    """Plots, the table and (with --docs) a copy of the numbers and plots."""
    from jaxlab.analysis.plots import plot_information, plot_interventions

    summary = results["summary"]
    info_examples = info_examples or {}
    (out / "aha.json").write_text(json.dumps(results, indent=1))
    plot_curves(summary, out / "aha_sufficiency.png")
    if info_examples:
        plot_information(
            list(info_examples.values()), out / "aha_information.png", labels=list(info_examples)
        )
    bars = {f"{n}:{m}": v for n, r in results["eval"].items() for m, v in r.items()}
    plot_interventions(
        bars, out / "aha_interventions.png", title="Accuracy and markers on held-out problems"
    )
    print("\n| model | control | accuracy (95% Wilson CI) | markers / response | tokens / response "
          "| checks fixed / missed / kept / broken | unchecked wrong |")  # fmt: skip
    print("|---|---|---|---:|---:|---|---:|")
    for n, r in results["eval"].items():
        for m, v in r.items():
            lo, hi = v.get("accuracy_ci", (float("nan"),) * 2)
            c = v.get("checks", {})
            print(
                f"| {n} | {m} | {v['accuracy']:.3f} ({v.get('correct', '?')}/{len(v['rewards'])}, "
                f"{lo:.2f}-{hi:.2f}) | {v['markers_per_response']:.2f} | "
                f"{v['tokens_per_response']:.1f} | {c.get('fixed', 0)} / {c.get('missed', 0)} / "
                f"{c.get('kept', 0)} / {c.get('broken', 0)} | {c.get('unchecked_wrong', 0)} |"
            )
    for n, sm in summary.items():
        h = " / ".join(f"{x:.2f}" for x in sm["mean_entropy_by_checkpoint"])
        lp = " / ".join(f"{-x:.1f}" for x in sm["mean_logp_by_checkpoint"])
        print(f"{n}: mean H(Y|s_t) {h}; mean -log p(y*|s_t) {lp}")
    if args.docs:
        import shutil

        d = Path(args.docs)
        d.mkdir(parents=True, exist_ok=True)
        small = {k: v for k, v in results.items() if k != "curves"}
        small["eval"] = {n: {m: {k: x for k, x in v.items() if k not in ("prompts",)} for m, v in r.items()}
                         for n, r in results["eval"].items()}  # fmt: skip
        (d / "aha.json").write_text(json.dumps({**small, "curves": results["curves"]}, indent=1))
        for f in ("aha_sufficiency.png", "aha_information.png", "aha_interventions.png"):
            if (out / f).exists():
                shutil.copy(out / f, d / f)


def main(argv=None):
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    paths = make_data(args, out)
    log(f"data: {', '.join(f'{s}={p}' for s, p in paths.items())}")
    if args.only_data:
        return 0
    if args.report_only:
        report(args, out, json.loads((out / "aha.json").read_text()))
        return 0
    import jax

    from jaxlab.models import from_pretrained
    from jaxlab.rl.tasks import ArithmeticTask

    task = ArithmeticTask(digits=args.digits, terms=args.terms, ops=args.ops, seed=0)
    problems = [task.problem(args.eval_start + i) for i in range(args.eval_problems)]
    results = {"args": vars(args), "eval": {}, "curves": {}, "summary": {}}
    plan = {"procedural": ["baseline", "insert_wait"],
            "epistemic": ["baseline", "suppress", "insert_wait"],
            "synonym": ["baseline", "suppress", "suppress_synonym"],
            "base": ["baseline", "induce"]}  # fmt: skip
    names = list(args.styles) + ([] if args.skip_base else ["base"])
    summary, info_examples = results["summary"], {}
    for name in names:  # each model is trained, then evaluated; results are saved as they come
        path = args.model if name == "base" else finetune(args, name, paths[name], out)
        log(f"evaluating {name}")
        model, tok = from_pretrained(path)
        res = evaluate(model, tok, problems, task, plan[name], args)
        results["eval"][name] = res
        if name in args.curve_styles and args.suff_problems > 0:
            n = args.suff_problems
            rows, infos = curves(
                model, tok, task, problems[:n], res["baseline"]["responses"][:n], args
            )
            results["curves"][name] = rows
            summary[name] = summarize_curves(rows)
            info_examples[name] = infos[0]
            log(
                f"  curves: {json.dumps({k: v for k, v in summary[name].items() if 'by_checkpoint' not in k})}"
            )
        del model
        jax.clear_caches()
        (out / "aha.json").write_text(json.dumps(results, indent=1))
    report(args, out, results, info_examples)
    return 0


if __name__ == "__main__":
    sys.exit(main())
