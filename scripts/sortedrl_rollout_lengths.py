"""Response lengths of real rollouts, for the SortedRL sweep's ``file:`` length distribution.

    python scripts/sortedrl_rollout_lengths.py [--prompts 32] [--samples 4] \
        [--out docs/results/sortedrl/smollm2_knights_knaves_lengths.txt]

SmolLM2-135M-Instruct (the packaged weights) samples ``--samples`` answers to each of
``--prompts`` knights-and-knaves puzzles (3 people; the logic-puzzle task family of the SortedRL
paper) at temperature 0.7, chat template, up to ``--max-new-tokens`` tokens; one generated length
per line (a response cut at the cap counts as the cap). Prints the length distribution.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--batch", type=int, default=8, help="prompts per generate call")
    p.add_argument("--max-new-tokens", type=int, default=384)
    p.add_argument("--out", default="docs/results/sortedrl/smollm2_knights_knaves_lengths.txt")
    args = p.parse_args()

    from jaxlab.generation import generate
    from jaxlab.models import from_pretrained
    from jaxlab.rl.tasks import make_task

    model, tokenizer = from_pretrained("smollm2-135m-instruct")
    task = make_task("knights_knaves", seed=0)
    prompts = [task.problem(i).prompt for i in range(args.prompts)]
    lengths: list[int] = []
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    for start in range(0, len(prompts), args.batch):
        res = generate(
            model,
            tokenizer,
            prompts[start : start + args.batch],
            max_new_tokens=args.max_new_tokens,
            temperature=0.7,
            n=args.samples,
            seed=start,
            chat=True,
        )
        lengths += [int(n) for n in res.lengths]
        out.write_text("".join(f"{n}\n" for n in lengths))  # so far (a stopped run keeps them)
        print(
            f"{len(lengths)}/{len(prompts) * args.samples} responses, "
            f"{time.perf_counter() - t0:.0f} s",
            flush=True,
        )
    a = np.asarray(lengths)
    q = np.percentile(a, [10, 50, 90, 99])
    print(
        f"{a.size} lengths: mean {a.mean():.1f}, p10/p50/p90/p99 {q.round(1).tolist()}, "
        f"max {a.max()}, at the cap {(a >= args.max_new_tokens).mean():.1%}; written to {out}"
    )


if __name__ == "__main__":
    main()
