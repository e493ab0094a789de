"""Generation speed: jaxlab vs HF transformers on SmolLM2-135M-Instruct (float32, CPU), same run.

    python scripts/bench_generate.py [--batches 1 8 32] [--prompt 128] [--new 128] [--out runs/bench_generate.json]

Greedy, prompt of `--prompt` random tokens, exactly `--new` new tokens (EOS ignored on both sides),
time from prompt ids to generated ids (prefill included), best of `--repeats` after a warm-up.
Also prints the memory-bandwidth floor: the time to stream every parameter once per decode step
at the measured copy bandwidth (numpy, one thread), as tokens/s; and the same at the read
bandwidth of an XLA reduction over both cores (what a decode step does: read each weight once). With `--engine`, a second table compares the
continuous-batching Engine with static batching on requests of log-normal lengths.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from jaxlab.testing.bench import time_call


def copy_bandwidth_gbs(nbytes: int = 512 * 2**20) -> float:
    src = np.ones(nbytes // 4, np.float32)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t0)
    return 2 * nbytes / best / 1e9  # read + write


def read_bandwidth_gbs(nbytes: int = 512 * 2**20) -> float:
    """Read-only bandwidth of a jitted sum (XLA's threads), best of 5."""
    x = jax.numpy.ones(nbytes // 4, np.float32)
    total = jax.jit(lambda x: x.sum())
    total(x).block_until_ready()
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        total(x).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return nbytes / best / 1e9


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--skip-hf", action="store_true")
    p.add_argument(
        "--engine", action="store_true", help="also run the Engine vs static batching table"
    )
    p.add_argument("--out", default="runs/bench_generate.json")
    args = p.parse_args()

    import torch
    from transformers import AutoModelForCausalLM

    from jaxlab.generation import generate_tokens
    from jaxlab.models import from_pretrained
    from jaxlab.models.registry import SMOLLM2_GGUF, package_path

    model, tok = from_pretrained(SMOLLM2_GGUF)
    param_bytes = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    bw, read_bw = copy_bandwidth_gbs(), read_bandwidth_gbs()
    floor_steps = bw * 1e9 / param_bytes
    read_floor_steps = read_bw * 1e9 / param_bytes
    print(
        f"jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__} ({torch.get_num_threads()} threads)"
    )
    print(
        f"parameters {param_bytes / 1e6:.0f} MB, copy bandwidth {bw:.1f} GB/s -> floor {floor_steps:.1f} decode steps/s; "
        f"read bandwidth {read_bw:.1f} GB/s -> {read_floor_steps:.1f} steps/s"
    )
    hf = None
    if not args.skip_hf:
        path = package_path(SMOLLM2_GGUF)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            hf = AutoModelForCausalLM.from_pretrained(
                str(path.parent), gguf_file=path.name, dtype=torch.float32
            ).eval()

    rows = []
    rng = np.random.default_rng(0)
    for b in args.batches:
        ids = rng.integers(100, 40000, size=(b, args.prompt)).astype(np.int32)
        mask = np.ones_like(ids)

        def ours(ids=ids, mask=mask, b=b):
            out = generate_tokens(
                model, ids, mask, max_new_tokens=args.new, eos_ids=(), pad_id=tok.pad_token_id
            )
            assert out[0].shape == (b, args.new)

        t_ours = time_call(ours, repeats=args.repeats)
        row = {
            "batch": b,
            "jaxlab_s": t_ours,
            "jaxlab_tok_s": b * args.new / t_ours,
            "floor_tok_s": b * floor_steps,
            "read_floor_tok_s": b * read_floor_steps,
        }
        if hf is not None:
            tids = torch.tensor(ids, dtype=torch.long)

            def theirs(tids=tids, b=b):
                with torch.no_grad():
                    out = hf.generate(
                        tids,
                        attention_mask=torch.ones_like(tids),
                        max_new_tokens=args.new,
                        min_new_tokens=args.new,
                        do_sample=False,
                        pad_token_id=tok.pad_token_id,
                    )
                assert out.shape == (b, args.prompt + args.new)

            t_hf = time_call(theirs, repeats=1)
            row.update(hf_s=t_hf, hf_tok_s=b * args.new / t_hf, speedup=t_hf / t_ours)
        rows.append(row)
        print(json.dumps(row))

    print(f"\nprompt {args.prompt}, {args.new} new tokens, greedy, float32")
    print(
        f"{'batch':>5s} {'jaxlab tok/s':>13s} {'HF tok/s':>9s} {'ratio':>6s} {'floor tok/s':>12s} {'read floor':>11s}"
    )
    for r in rows:
        hf_s = (
            f"{r['hf_tok_s']:9.1f} {r['speedup']:6.2f}"
            if "hf_tok_s" in r
            else f"{'-':>9s} {'-':>6s}"
        )
        print(
            f"{r['batch']:5d} {r['jaxlab_tok_s']:13.1f} {hf_s} {r['floor_tok_s']:12.1f} {r['read_floor_tok_s']:11.1f}"
        )
    result = {
        "generate": rows,
        "copy_bandwidth_gbs": bw,
        "read_bandwidth_gbs": read_bw,
        "param_bytes": param_bytes,
    }

    if args.engine:
        from jaxlab.generation.engine import benchmark_engine_vs_static

        result["engine"] = benchmark_engine_vs_static(model, tok)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
