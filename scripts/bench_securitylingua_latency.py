"""SecurityLingua's added latency against the LLM guardrail's, in one run on one machine.

    python scripts/bench_securitylingua_latency.py --compressor runs/slingua [--requests 40]
        [--concurrency 8] [--max-tokens 24] [--out docs/results/securitylingua_latency.json]

Attacks: the held-out harmful pairs of ``DIR/pairs_test.jsonl`` (templates and requests the
compressor never saw) of at most ``--max-prompt-tokens`` SmolLM2 tokens, shuffled by ``--seed``
(the same draw as ``securitylingua_eval.py``), the first ``--requests``. Without a trained
compressor (``--random-head``) the same architecture (all-MiniLM-L6-v2 and a random keep/drop
head) is timed: the time does not depend on the head's weights.

1. Extraction alone, in this process, one request at a time after warm-up: the compressor's
   bucketed shapes (``Compressor.word_probs``) against the power-of-two padding it replaced
   (every chunk at ``[2^k, max_length]``), interleaved request by request; the extracted texts
   must be identical.
2. In the server (SmolLM2-135M-Instruct, ``--slots`` slots, on loopback, driven by ``openai``):
   the time the defense adds before generation (timed around ``Defense.apply``, as in
   ``/metrics``), for the logit-scored guardrail, SecurityLingua and SecurityLingua with the old
   padding. Sequentially (one request at a time, one output token, the defenses interleaved
   request by request so that they see the same load), then ``--concurrency`` requests at a time
   (``--max-tokens`` greedy tokens each, so that the engine decodes beside the extractions;
   one defense after the other, after an untimed concurrent round of ``--warmup`` requests each).
   SecurityLingua's time is split into the extraction (in its worker thread) and the rest
   (waiting for the extraction lock, templating and counting the added tokens).

Prints mean, p50 and p95 per request and the ratio SecurityLingua / guardrail (the issue's goal:
at most 0.1), and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import subprocess
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np


def stats(xs) -> dict:
    xs = np.asarray(xs, np.float64)
    return {
        "n": int(len(xs)),
        "mean_ms": float(1000 * xs.mean()),
        "p50_ms": float(1000 * np.percentile(xs, 50)),
        "p95_ms": float(1000 * np.percentile(xs, 95)),
        "ci95_half_ms": float(1000 * 1.96 * xs.std(ddof=1) / np.sqrt(len(xs))),
    }


def fmt(s: dict) -> str:
    return (
        f"mean {s['mean_ms']:7.1f} ± {s['ci95_half_ms']:5.1f}  p50 {s['p50_ms']:7.1f}  "
        f"p95 {s['p95_ms']:7.1f} ms (n={s['n']})"
    )


def pow2_compressor(comp):
    """A copy of ``comp`` (same weights) that batches as before the shape buckets: all chunks
    at ``[2^k, max_length]``, ``2^k`` the power of two that holds them (at most batch_size)."""
    from jaxlab.security.compressor import Compressor

    class Pow2Compressor(Compressor):
        def _plan(self, counts):
            idx = list(range(len(counts)))
            parts = [idx[s : s + self.batch_size] for s in range(0, len(idx), self.batch_size)]
            rows = [min(self.batch_size, 1 << (len(p) - 1).bit_length()) for p in parts]
            return [(self.max_length, list(zip(rows, parts)))]

    c = Pow2Compressor(
        comp.model, comp.tokenizer, max_length=comp.max_length, batch_size=comp.batch_size
    )
    for k in range(int(np.log2(comp.batch_size)) + 1):  # compile its shapes
        c.extract([" ".join(["word"] * ((comp.max_length - 2) * (1 << k)))])
    return c


def load_compressor(args):
    from jaxlab.security.compressor import Compressor, TokenClassifier

    if not args.random_head:
        return Compressor.load(args.compressor), "trained"
    from flax import nnx

    from jaxlab.models import from_pretrained

    encoder, tok = from_pretrained("all-minilm-l6-v2")
    model = TokenClassifier(encoder, rngs=nnx.Rngs(0))
    return Compressor(model, tok, max_length=128), "random head"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--compressor", required=True, help="DIR of security train (its test pairs)")
    ap.add_argument("--random-head", action="store_true", help="time an untrained head instead")
    ap.add_argument("--requests", type=int, default=40)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--slots", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--max-prompt-tokens", type=int, default=600)
    ap.add_argument("--warmup", type=int, default=8, help="untimed requests per phase")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-server", action="store_true", help="extraction alone only")
    ap.add_argument("--out", default="docs/results/securitylingua_latency.json")
    args = ap.parse_args()

    from jaxlab.security.data import load_pairs
    from jaxlab.security.defense import make_defense
    from jaxlab.serving.server import create_state

    t_start = time.perf_counter()
    comp, head = load_compressor(args)
    print(f"compressor: {head}; warm-up compiles {comp.warmup()} ")
    old = pow2_compressor(comp)
    test = load_pairs(Path(args.compressor) / "pairs_test.jsonl")

    state = create_state("smollm2-135m-instruct", slots=args.slots, max_len=1024 + args.max_tokens)
    tok = state.tokenizer
    fits = lambda t: len(tok.encode(t, add_special_tokens=False)) <= args.max_prompt_tokens  # noqa: E731
    attacks = [lp.pair.extended for lp in test if lp.pair.harmful]
    attacks = [a for a in attacks if fits(a)]
    random.Random(args.seed).shuffle(attacks)
    need = args.requests + args.warmup
    if len(attacks) < need:
        raise SystemExit(f"only {len(attacks)} held-out attacks fit; ask for fewer --requests")
    warm, attacks = attacks[: args.warmup], attacks[args.warmup : need]
    n_tok = [len(tok.encode(a, add_special_tokens=False)) for a in attacks]
    n_chunks = [len(comp.chunks(a)[1]) for a in attacks]
    print(
        f"{len(attacks)} held-out attacks: {np.mean(n_tok):.0f} SmolLM2 tokens on average "
        f"({min(n_tok)}-{max(n_tok)}), MiniLM chunks {dict(sorted(Counter(n_chunks).items()))}"
    )

    # 1. extraction alone
    for a in warm:
        comp.extract([a]), old.extract([a])
    t_new, t_old, same = [], [], 0
    for a in attacks:
        t0 = time.perf_counter()
        x = old.extract([a])
        t1 = time.perf_counter()
        y = comp.extract([a])
        t2 = time.perf_counter()
        t_old.append(t1 - t0)
        t_new.append(t2 - t1)
        same += x == y
    alone = {"bucketed": stats(t_new), "pow2": stats(t_old), "identical_texts": same}
    print("extraction alone, one request at a time:")
    print(f"  bucketed shapes  {fmt(alone['bucketed'])}")
    print(f"  pow2 padding     {fmt(alone['pow2'])}")
    print(f"  identical extracted texts: {same}/{len(attacks)}")
    report = {
        "args": vars(args),
        "compressor_head": head,
        "attacks": {"n": len(attacks), "smollm2_tokens_mean": float(np.mean(n_tok))},
        "chunks": dict(Counter(n_chunks)),
        "extraction_alone": alone,
    }
    if not args.skip_server:
        report["server"] = serve_phase(args, state, comp, old, warm, attacks, make_defense)
    report["seconds"] = time.perf_counter() - t_start
    report["machine"] = {"cpu": platform.processor() or platform.machine(), "load": _load()}
    report["commit"] = _commit()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f"wrote {out} ({report['seconds']:.0f} s)")


def serve_phase(args, state, comp, old, warm, attacks, make_defense) -> dict:
    import openai

    from jaxlab.serving.server import BackgroundServer

    defenses = {
        "guardrail": make_defense("guardrail"),
        "securitylingua": make_defense("securitylingua", compressor=comp),
        "securitylingua_pow2": make_defense("securitylingua", compressor=old),
    }
    times = {k: [] for k in defenses}
    extract_times = {k: [] for k in defenses if k.startswith("securitylingua")}
    for name, d in defenses.items():
        apply = d.apply

        async def timed(st, req, request, apply=apply, name=name):
            t = time.perf_counter()
            out = await apply(st, req, request)
            times[name].append(time.perf_counter() - t)
            return out

        d.apply = timed
        if name in extract_times:
            intention = d.intention

            def timed_intention(text, intention=intention, name=name):
                t = time.perf_counter()
                out = intention(text)
                extract_times[name].append(time.perf_counter() - t)
                return out

            d.intention = timed_intention

    server = BackgroundServer(state)
    client = openai.OpenAI(base_url=server.url, api_key="none", max_retries=0, timeout=600)

    def ask(text, max_tokens):
        r = client.chat.completions.create(
            model="smollm2-135m-instruct",
            messages=[{"role": "user", "content": text}],
            max_tokens=max_tokens,
            temperature=0,
        )
        return r.choices[0].message.content or ""

    def clear():
        for v in (*times.values(), *extract_times.values()):
            v.clear()

    def collect():
        out = {k: stats(v) for k, v in times.items() if v}
        for k, v in extract_times.items():
            if v:
                out[k + "_extraction"] = stats(v)
        g = out["guardrail"]["mean_ms"]
        for k in ("securitylingua", "securitylingua_pow2"):
            if k in out:
                out[k]["ratio_to_guardrail_mean"] = out[k]["mean_ms"] / g
                out[k]["ratio_to_guardrail_p50"] = out[k]["p50_ms"] / out["guardrail"]["p50_ms"]
        return out

    result = {}
    try:
        for a in warm:  # the engine's prompt shapes and the defenses' first calls
            for d in defenses.values():
                state.defense = d
                ask(a, 1)
        clear()
        t0 = time.perf_counter()
        for i, a in enumerate(attacks):  # interleaved: every defense sees the same load
            for d in defenses.values():
                state.defense = d
                ask(a, 1)
            if (i + 1) % 10 == 0:
                print(f"  sequential {i + 1}/{len(attacks)} ({time.perf_counter() - t0:.0f} s)")
        result["sequential"] = collect()
        for d in defenses.values():  # the engine's shapes of concurrent prefills and decodes
            state.defense = d
            with ThreadPoolExecutor(args.concurrency) as pool:
                list(pool.map(lambda t: ask(t, args.max_tokens), warm))
        clear()
        for name, d in defenses.items():
            state.defense = d
            t0 = time.perf_counter()
            with ThreadPoolExecutor(args.concurrency) as pool:
                list(pool.map(lambda t: ask(t, args.max_tokens), attacks))
            print(f"  {args.concurrency} at a time, {name}: {time.perf_counter() - t0:.0f} s")
        result["concurrent"] = collect()
        result["concurrency"] = args.concurrency
    finally:
        server.stop()
    for mode in ("sequential", "concurrent"):
        print(f"in the server, {mode}:")
        for k, s in result[mode].items():
            ratio = s.get("ratio_to_guardrail_mean")
            tail = f"  ratio to guardrail {ratio:.3f}" if ratio is not None else ""
            print(f"  {k:>30}  {fmt(s)}{tail}")
    return result


def _load() -> list[float]:
    import os

    return list(os.getloadavg())


def _commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


if __name__ == "__main__":
    main()
