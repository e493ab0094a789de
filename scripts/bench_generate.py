"""Generation speed: jaxlab vs HF transformers on SmolLM2-135M-Instruct (float32, CPU), same run.

    python scripts/bench_generate.py [--batches 1 8 32] [--prompt 128] [--new 128] [--out runs/bench_generate.json]

Greedy, prompt of `--prompt` random tokens, exactly `--new` new tokens (EOS ignored on both sides),
time from prompt ids to generated ids (prefill included), best of `--repeats` after a warm-up.
`same_tokens_until` is the first step where the two greedy continuations differ in any row. HF
gets exactly `--new` tokens through `min_new_tokens`, which also masks the EOS token; jaxlab
runs with no EOS and may pick it, so a row that reaches EOS differs from there on.
Also prints the memory-bandwidth floor: the time to stream every parameter once per decode step
at the measured copy bandwidth (numpy, one thread), as tokens/s; and the same at the read
bandwidth of an XLA reduction over both cores (what a decode step does: read each weight once). With `--engine`, a second table compares the
continuous-batching Engine with static batching on requests of log-normal lengths.

With `--random-weights` both sides use the same randomly initialised model of SmolLM2-135M's
architecture (an HF checkpoint written to a temporary folder and loaded by jaxlab), for machines
without the weight package, such as a GPU pod. On a GPU, HF runs on `cuda` as well, and the
first-divergence step of the two greedy continuations is printed (JAX's default float32 matmul
precision on GPU is TF32; pass `--precision highest` for float32 dots).
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


# SmolLM2-135M's architecture (the GGUF's metadata, as jaxlab reads it)
SMOLLM2_135M_HF_CONFIG = dict(
    model_type="llama",
    architectures=["LlamaForCausalLM"],
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    max_position_embeddings=8192,
    rms_norm_eps=1e-5,
    rope_theta=100000.0,
    tie_word_embeddings=True,
    hidden_act="silu",
)


def random_smollm2(folder: Path):
    """The HF model (float32, seed 0) and the same weights loaded by jaxlab."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from jaxlab.models import from_pretrained

    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(**SMOLLM2_135M_HF_CONFIG)).float().eval()
    hf.save_pretrained(folder)
    model, _ = from_pretrained(folder)
    return model, hf


def first_divergence(a: np.ndarray, b: np.ndarray) -> int:
    """The first step where two token arrays [B, N] differ in any row (N if never)."""
    differ = np.any(a != b, axis=0)
    return int(np.argmax(differ)) if differ.any() else a.shape[1]


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
    p.add_argument(
        "--random-weights",
        action="store_true",
        help="a random model of SmolLM2-135M's architecture on both sides (no weight package needed)",
    )
    p.add_argument(
        "--precision",
        choices=["default", "high", "highest"],
        default="default",
        help="jax_default_matmul_precision (matters on GPU, where 'default' float32 dots are TF32)",
    )
    args = p.parse_args()
    if args.engine and args.random_weights:
        p.error("--engine needs the real model's tokenizer; drop --random-weights")
    jax.config.update(
        "jax_default_matmul_precision", None if args.precision == "default" else args.precision
    )

    import torch
    from transformers import AutoModelForCausalLM

    from jaxlab.generation import generate_tokens
    from jaxlab.models import from_pretrained
    from jaxlab.models.registry import SMOLLM2_GGUF, package_path

    hf = None
    if args.random_weights:
        import tempfile

        tmp = tempfile.TemporaryDirectory()
        model, hf = random_smollm2(Path(tmp.name))
        pad_id = 0
    else:
        model, tok = from_pretrained(SMOLLM2_GGUF)
        pad_id = tok.pad_token_id
    on_gpu = jax.default_backend() == "gpu" and torch.cuda.is_available()
    torch_device = "cuda" if on_gpu else "cpu"
    param_bytes = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    bw, read_bw = copy_bandwidth_gbs(), read_bandwidth_gbs()
    floor_steps = bw * 1e9 / param_bytes
    read_floor_steps = read_bw * 1e9 / param_bytes
    print(
        f"jax {jax.__version__} ({jax.default_backend()}: {jax.devices()[0].device_kind}), "
        f"torch {torch.__version__} ({torch_device}, {torch.get_num_threads()} threads), "
        f"precision {args.precision}, {'random' if args.random_weights else 'SmolLM2-135M-Instruct'} weights"
    )
    print(
        f"parameters {param_bytes / 1e6:.0f} MB, copy bandwidth {bw:.1f} GB/s -> floor {floor_steps:.1f} decode steps/s; "
        f"read bandwidth {read_bw:.1f} GB/s -> {read_floor_steps:.1f} steps/s"
    )
    if args.skip_hf:
        hf = None
    elif hf is None:
        path = package_path(SMOLLM2_GGUF)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            hf = AutoModelForCausalLM.from_pretrained(
                str(path.parent), gguf_file=path.name, dtype=torch.float32
            ).eval()
    if hf is not None:
        hf = hf.to(torch_device)

    rows = []
    rng = np.random.default_rng(0)
    for b in args.batches:
        ids = rng.integers(100, 40000, size=(b, args.prompt)).astype(np.int32)
        mask = np.ones_like(ids)

        ours_tokens = []

        def ours(ids=ids, mask=mask, b=b, keep=ours_tokens):
            out = generate_tokens(
                model, ids, mask, max_new_tokens=args.new, eos_ids=(), pad_id=pad_id
            )
            assert out[0].shape == (b, args.new)
            keep[:] = [out[0]]

        t_ours = time_call(ours, repeats=args.repeats)
        row = {
            "batch": b,
            "jaxlab_s": t_ours,
            "jaxlab_tok_s": b * args.new / t_ours,
            "floor_tok_s": b * floor_steps,
            "read_floor_tok_s": b * read_floor_steps,
        }
        if hf is not None:
            tids = torch.tensor(ids, dtype=torch.long, device=torch_device)
            hf_tokens = []

            def theirs(tids=tids, b=b, keep=hf_tokens):
                with torch.no_grad():
                    out = hf.generate(
                        tids,
                        attention_mask=torch.ones_like(tids),
                        max_new_tokens=args.new,
                        min_new_tokens=args.new,
                        do_sample=False,
                        pad_token_id=pad_id,
                    )
                if on_gpu:
                    torch.cuda.synchronize()
                assert out.shape == (b, args.prompt + args.new)
                keep[:] = [out[:, args.prompt :].cpu().numpy()]

            t_hf = time_call(theirs, repeats=1)
            row.update(hf_s=t_hf, hf_tok_s=b * args.new / t_hf, speedup=t_hf / t_ours)
            row["same_tokens_until"] = first_divergence(ours_tokens[0], hf_tokens[0])
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
