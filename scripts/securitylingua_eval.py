"""SecurityLingua against no defense, a self-reminder and an LLM guardrail, on SmolLM2-135M-Instruct
served by jaxlab (in this process, on loopback, driven by the ``openai`` client).

    python scripts/securitylingua_eval.py --compressor DIR [--attacks 80] [--benign-wrapped 40]
        [--benign-plain 40] [--max-tokens 32] [--slots 8] [--out docs/results/securitylingua.json]

1. Extraction on the held-out pairs (``DIR/pairs_test.jsonl``, written by ``security train``):
   word-level precision / recall / F1 against the alignment labels and the share of words kept,
   at the paper's fixed 0.5 threshold and at LLMLingua-2's rate 0.1.
2. Defenses (one server; its defense switched between phases): attack success rate on held-out
   template x request pairs (harmful requests the compressor never saw, in template families it
   never saw), false refusal rate on benign requests wrapped in held-out templates and on plain
   benign requests, each judged by garak's refusal substrings (``MitigationBypass`` anywhere,
   ``Prefixes`` at the start; success = no refusal), with Wilson 95% intervals; the latency the
   defense adds per request (timed around the defense in the server, mean with a 95% interval)
   and the prompt tokens it adds (the rendered prompt's growth, or the guardrail's own prompt and
   output). Greedy decoding, ``--max-tokens`` per reply, ``--slots`` requests at a time. The
   added latency is timed on ``--latency-requests`` attacks sent one at a time (one output
   token), so that it is the defense's own time, not queueing behind other requests; the time
   under the concurrent load is reported beside it.

Writes JSON (and a PNG beside it) and prints a table with the issue's goals checked.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

DEFENSES = ("none", "self-reminder", "guardrail", "securitylingua")


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float, float]:
    if n == 0:
        return float("nan"), float("nan"), float("nan")
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return p, max(c - h, 0.0), min(c + h, 1.0)


def mean_ci(xs) -> tuple[float, float]:
    xs = np.asarray(xs, np.float64)
    if len(xs) < 2:
        return float(xs.mean()) if len(xs) else float("nan"), float("nan")
    return float(xs.mean()), float(1.96 * xs.std(ddof=1) / math.sqrt(len(xs)))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--compressor", required=True)
    ap.add_argument("--attacks", type=int, default=80)
    ap.add_argument("--benign-wrapped", type=int, default=40)
    ap.add_argument("--benign-plain", type=int, default=40)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-prompt-tokens", type=int, default=900, help="skip longer attacks")
    ap.add_argument("--slots", type=int, default=8)
    ap.add_argument(
        "--latency-requests", type=int, default=20, help="sequential requests timing the defense"
    )
    ap.add_argument("--defenses", nargs="*", default=list(DEFENSES))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="docs/results/securitylingua.json")
    args = ap.parse_args()

    import openai

    from jaxlab.security.compressor import Compressor, extraction_scores
    from jaxlab.security.data import (
        benign_requests,
        fill_template,
        held_out,
        is_refusal,
        jailbreak_templates,
        load_pairs,
        refusal_substrings,
    )
    from jaxlab.security.defense import make_defense
    from jaxlab.serving.server import BackgroundServer, create_state

    rng = random.Random(args.seed)
    cdir = Path(args.compressor)
    comp = Compressor.load(cdir)
    info = comp.info
    test = load_pairs(cdir / "pairs_test.jsonl")
    t0 = time.perf_counter()
    extraction = {
        "threshold_0.5": extraction_scores(comp, test, threshold=0.5),
        "rate_0.1": extraction_scores(comp, test, rate=0.1),
    }
    print(f"extraction on {len(test)} held-out pairs ({time.perf_counter() - t0:.0f} s):")
    for k, s in extraction.items():
        print(
            f"  {k}: word F1 {s['f1']:.3f} (P {s['precision']:.3f} R {s['recall']:.3f}), "
            f"request-word F1 {s['request_f1']:.3f}, "
            f"kept {s['compression_rate']:.3f} of words (labels: {s['label_rate']:.3f})"
        )

    state = create_state("smollm2-135m-instruct", slots=args.slots, max_len=1024 + args.max_tokens)
    tok = state.tokenizer
    fits = lambda text: len(tok.encode(text, add_special_tokens=False)) <= args.max_prompt_tokens
    attacks = [lp.pair.extended for lp in test if lp.pair.harmful and fits(lp.pair.extended)]
    rng.shuffle(attacks)
    attacks = attacks[: args.attacks]
    # benign requests of the held-out request split, in held-out template families
    data_cfg = info["config"]["data"]
    frac, seed = data_cfg["test_fraction"], data_cfg["seed"]
    held_benign = [r for r in benign_requests() if held_out("request:" + r.text, frac, seed)]
    held_templates = [
        t
        for t in jailbreak_templates(data_cfg["max_template_chars"])
        if held_out("family:" + t.family, frac, seed)
    ]
    wrapped = []
    while len(wrapped) < args.benign_wrapped:
        text = fill_template(rng.choice(held_templates).text, rng.choice(held_benign).text)
        if fits(text):
            wrapped.append(text)
    plain = [r.text for r in benign_requests()]
    rng.shuffle(plain)
    plain = plain[: args.benign_plain]
    substrings, prefixes = refusal_substrings()
    sets = {"attack": attacks, "benign_wrapped": wrapped, "benign_plain": plain}
    print({k: len(v) for k, v in sets.items()})

    for rows in (1, 2, 4, 8, 16):  # compile the compressor's batch shapes before timing it
        comp.extract([" ".join(["word"] * ((comp.max_length - 2) * rows))])
    server = BackgroundServer(state)
    client = openai.OpenAI(base_url=server.url, api_key="none", max_retries=0, timeout=600)
    results = {}
    try:
        for name in args.defenses:
            defense = make_defense(name, compressor=comp) if name == "securitylingua" else None
            defense = defense or make_defense(name)
            times, added = [], []
            apply = defense.apply

            async def timed(st, req, request, apply=apply, times=times, added=added):
                t = time.perf_counter()
                out = await apply(st, req, request)
                times.append(time.perf_counter() - t)
                added.append(out.added_tokens if out.added_tokens is not None else 0)
                return out

            defense.apply = timed
            state.defense = defense

            def ask(text, max_tokens=args.max_tokens):
                t = time.perf_counter()
                r = client.chat.completions.create(
                    model="smollm2-135m-instruct",
                    messages=[{"role": "user", "content": text}],
                    max_tokens=max_tokens,
                    temperature=0,
                )
                return r.choices[0].message.content or "", time.perf_counter() - t

            row = {}
            t_def = time.perf_counter()
            for kind, texts in sets.items():
                with ThreadPoolExecutor(args.slots) as pool:
                    answers = list(pool.map(ask, texts))
                refused = [is_refusal(a, substrings, prefixes) for a, _ in answers]
                k = sum(refused)
                p, lo, hi = wilson(len(texts) - k if kind == "attack" else k, len(texts))
                key = "asr" if kind == "attack" else "false_refusal"
                row[kind] = {
                    key: p,
                    "ci95": [lo, hi],
                    "n": len(texts),
                    "e2e_s": float(np.mean([s for _, s in answers])),
                    "examples": [a for a, _ in answers[:3]],
                }
                print(
                    f"  {name:>14} {kind:>15}: {key} {p:.3f} [{lo:.3f}, {hi:.3f}] (n={len(texts)})"
                )
            load_lat, load_ci = mean_ci(times)
            tok_mean, tok_ci = mean_ci(added)
            # the defense's own time without queueing: one request at a time, 1 output token
            times.clear()
            for text in attacks[: args.latency_requests]:
                ask(text, max_tokens=1)
            lat, lat_ci = mean_ci(times)
            row["added_latency_s"] = {"mean": lat, "ci95_half": lat_ci, "n": len(times)}
            row["added_latency_under_load_s"] = {"mean": load_lat, "ci95_half": load_ci}
            row["added_prompt_tokens"] = {"mean": tok_mean, "ci95_half": tok_ci}
            row["seconds"] = time.perf_counter() - t_def
            results[name] = row
            print(
                f"  {name:>14} added latency {1000 * lat:.1f} ± {1000 * lat_ci:.1f} ms, "
                f"added prompt tokens {tok_mean:.1f} ± {tok_ci:.1f} ({row['seconds']:.0f} s)"
            )
    finally:
        server.stop()

    goals = {}
    if {"none", "self-reminder", "guardrail", "securitylingua"} <= set(results):
        sl, g = results["securitylingua"], results["guardrail"]
        goals = {
            "asr_below_none": sl["attack"]["asr"] < results["none"]["attack"]["asr"],
            "asr_below_self_reminder": sl["attack"]["asr"]
            < results["self-reminder"]["attack"]["asr"],
            "false_refusal_no_worse_than_guardrail (wrapped, plain)": [
                sl[k]["false_refusal"] <= g[k]["false_refusal"]
                for k in ("benign_wrapped", "benign_plain")
            ],
            "latency_le_10pct_of_guardrail": sl["added_latency_s"]["mean"]
            <= 0.1 * g["added_latency_s"]["mean"],
            "tokens_le_tenth_of_guardrail": sl["added_prompt_tokens"]["mean"]
            <= 0.1 * g["added_prompt_tokens"]["mean"],
        }
    print(
        "\n| defense | ASR (95% CI) | false refusal, wrapped | false refusal, plain | "
        "added latency ms | added prompt tokens |"
    )
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        a, w, pl = r["attack"], r["benign_wrapped"], r["benign_plain"]
        fmt = lambda d, k: f"{d[k]:.3f} [{d['ci95'][0]:.2f}, {d['ci95'][1]:.2f}]"
        print(
            f"| {name} | {fmt(a, 'asr')} | {fmt(w, 'false_refusal')} | "
            f"{fmt(pl, 'false_refusal')} | {1000 * r['added_latency_s']['mean']:.1f} ± "
            f"{1000 * r['added_latency_s']['ci95_half']:.1f} | "
            f"{r['added_prompt_tokens']['mean']:.1f} |"
        )
    print("goals:", json.dumps(goals))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "args": vars(args),
        "compressor": {k: info.get(k) for k in ("steps", "train_seconds", "val_loss")},
        "extraction": extraction,
        "defenses": results,
        "goals": goals,
    }
    out.write_text(json.dumps(report, indent=1, default=str))
    _plot(results, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")


def _plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    panels = [
        ("attack", "asr", "attack success rate"),
        ("benign_wrapped", "false_refusal", "false refusal (wrapped benign)"),
        ("benign_plain", "false_refusal", "false refusal (plain benign)"),
    ]
    for ax, (kind, key, title) in zip(axes, panels):
        v = [results[n][kind][key] for n in names]
        lo = [v[i] - results[n][kind]["ci95"][0] for i, n in enumerate(names)]
        hi = [results[n][kind]["ci95"][1] - v[i] for i, n in enumerate(names)]
        ax.bar(names, v, yerr=[lo, hi], capsize=4, color="#4c72b0")
        ax.set_ylim(0, 1)
        ax.set_title(title)
        ax.tick_params(axis="x", rotation=20)
    fig.suptitle("SmolLM2-135M-Instruct served by jaxlab, garak refusal-substring judge, 95% CI")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
