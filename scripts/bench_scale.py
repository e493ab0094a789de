"""Scale benchmark for one GPU (or a pod): a ~1.5B-parameter decoder with random weights.

    python scripts/bench_scale.py [--preset smollm2-1.7b|qwen2.5-1.5b|tiny] [--batch 8]
        [--seq 2048] [--steps 10] [--decode-tokens 128] [--slots 64] [--out runs/bench_scale.json]

Measures, with the model sharded over every visible device (``fsdp=-1``), bfloat16 compute and
float32 master weights (the mixed-precision default on GPUs):

- training: tokens/s of ``jaxlab.train.train_step_with_metrics`` (AdamW) and the model FLOPs
  utilisation, MFU = 6·N·tokens/s + attention FLOPs, over the devices' peak bfloat16 FLOP/s;
- decoding (``generate_tokens``, greedy, bfloat16 weights): tokens/s at batch 1 and 64 against
  the HBM-bandwidth floor, the time to read the weights once per step (``bandwidth / bytes``);
- the Engine at ``--slots`` slots: output tokens/s over 2 x slots requests of ``--decode-tokens``
  (tensor-parallel over every device, ``Engine(mesh=)``, when there are several);
- with ``--lora R``: the training step again with rank-R LoRA adapters on every projection
  (only the adapters trained; tokens/s beside the full step's).

The goals the numbers are read against (issue "Scale to GPU pods"): MFU >= 40 % (maxtext's range
for dense models of this size on H100), batch-1 decoding >= 60 % of the bandwidth floor.
``--preset tiny`` runs the same code at toy size on a CPU (a smoke test; its ratios mean nothing).
Prints a table and writes JSON with the device kind, the command and the date.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxlab.generation import Engine, SamplingParams, generate_tokens
from jaxlab.mesh import MeshConfig, make_mesh
from jaxlab.models import Decoder, DecoderConfig, LoRAConfig
from jaxlab.sharding import create_sharded, logical_spec, shard_model
from jaxlab.train import train_step_with_metrics

PRESETS = {
    # SmolLM2-1.7B's shape (config.json of HuggingFaceTB/SmolLM2-1.7B)
    "smollm2-1.7b": DecoderConfig(
        vocab_size=49152,
        hidden_size=2048,
        intermediate_size=8192,
        num_layers=24,
        num_heads=32,
        num_kv_heads=32,
        rope_theta=130000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        max_position_embeddings=8192,
    ),
    # Qwen2.5-1.5B's shape
    "qwen2.5-1.5b": DecoderConfig(
        arch="qwen2",
        vocab_size=151936,
        hidden_size=1536,
        intermediate_size=8960,
        num_layers=28,
        num_heads=12,
        num_kv_heads=2,
        rope_theta=1e6,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        attention_bias=True,
        max_position_embeddings=32768,
    ),
    "tiny": DecoderConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        max_position_embeddings=512,
    ),  # fmt: skip
}

# Dense bfloat16 peak FLOP/s and HBM bandwidth (bytes/s) per device, from the vendors' sheets.
DEVICES = {
    "H200": (989e12, 4.8e12),
    "H100": (989e12, 3.35e12),  # SXM
    "A100": (312e12, 2.0e12),
    "L40S": (362e12, 0.864e12),
}


def device_peak(kind: str) -> tuple[float | None, float | None]:
    for name, peak in DEVICES.items():
        if name.lower() in kind.lower():
            return peak
    return None, None


def count_params(cfg: DecoderConfig) -> tuple[int, int]:
    """(all parameters, those excluding the input embedding table)."""
    model = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0)))
    total = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model)))
    embed = cfg.vocab_size * cfg.hidden_size
    # tied embeddings still cost the output projection's matmul: count them as compute
    return total, total - (0 if cfg.tie_word_embeddings else embed)


def train_flops_per_token(cfg: DecoderConfig, seq: int) -> float:
    _, n = count_params(cfg)
    attention = 6 * cfg.num_layers * seq * cfg.num_heads * cfg.dim_per_head  # causal: half of 12
    return 6 * n + attention


def bench_train(cfg, mesh, batch, seq, steps, lora_rank=0):
    lora = LoRAConfig(rank=lora_rank, alpha=2.0 * lora_rank) if lora_rank else None
    model = create_sharded(
        lambda: Decoder(
            cfg, dtype=jnp.bfloat16, param_dtype=jnp.float32, lora=lora, rngs=nnx.Rngs(0)
        ),
        mesh,
    )
    wrt = nnx.LoRAParam if lora else nnx.Param
    optimizer = shard_model(nnx.Optimizer(model, optax.adamw(1e-4), wrt=wrt), mesh)
    spec = logical_spec(("batch", None), (batch, seq + 1), mesh)
    tokens = jax.device_put(
        np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, seq + 1), dtype=np.int32),
        jax.sharding.NamedSharding(mesh, spec),
    )
    with jax.set_mesh(mesh):
        out = train_step_with_metrics(model, optimizer, tokens)  # compile
        float(out["loss"])
        t0 = time.perf_counter()
        for _ in range(steps):
            out = train_step_with_metrics(model, optimizer, tokens)
        loss = float(out["loss"])  # waits for the last step
        dt = (time.perf_counter() - t0) / steps
    return {"step_s": dt, "tokens_per_s": batch * seq / dt, "loss": loss}


def bench_decode(cfg, batch, new_tokens, prompt_len=32):
    model = Decoder(cfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    ids = np.random.default_rng(1).integers(0, cfg.vocab_size, (batch, prompt_len), dtype=np.int32)
    mask = np.ones_like(ids)
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)

    def run(n):
        return generate_tokens(
            model, ids, mask, params.replace(max_new_tokens=n), eos_ids=(), pad_id=0
        )

    short = max(new_tokens // 4, 1)

    def timed(n):  # median of 3 runs, after a compiling one
        run(n)
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            run(n)
            times.append(time.perf_counter() - t0)
        return float(np.median(times))

    # the difference of two lengths: a decode step's time, without prefill and host overheads
    per_step = max(timed(new_tokens) - timed(short), 1e-9) / max(new_tokens - short, 1)
    weights = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(nnx.state(model)))
    return {
        "batch": batch,
        "step_s": per_step,
        "tokens_per_s": batch / per_step,
        "weight_bytes": weights,
    }


def bench_engine(cfg, slots, new_tokens, prompt_len=64):
    model = Decoder(cfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    mesh = make_mesh(MeshConfig(tensor=-1)) if jax.device_count() > 1 else None
    max_len = prompt_len + new_tokens + 8
    eng = Engine(model, num_slots=slots, max_len=max_len, eos_ids=(), pad_id=0, mesh=mesh)
    eng.warmup(prompt_len)
    rng = np.random.default_rng(2)
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    for _ in range(2 * slots):
        eng.submit(rng.integers(0, cfg.vocab_size, prompt_len).tolist(), params)
    t0 = time.perf_counter()
    done = eng.run()
    dt = time.perf_counter() - t0
    tokens = sum(len(c.tokens) for c in done)
    return {"slots": slots, "requests": len(done), "tokens_per_s": tokens / dt, "wall_s": dt}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="smollm2-1.7b")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--decode-tokens", type=int, default=128)
    p.add_argument("--decode-batches", type=int, nargs="+", default=[1, 64])
    p.add_argument("--slots", type=int, default=64)
    p.add_argument("--lora", type=int, default=0, help="also time a LoRA step of this rank")
    p.add_argument("--out", default="runs/bench_scale.json")
    args = p.parse_args()

    cfg = PRESETS[args.preset]
    if args.preset == "tiny":
        cfg = dataclasses.replace(cfg, max_position_embeddings=max(512, args.seq + 256))
    devices = jax.devices()
    kind = devices[0].device_kind
    peak_flops, bandwidth = device_peak(kind)
    mesh = make_mesh(MeshConfig(fsdp=-1))
    total, _ = count_params(cfg)
    print(f"{args.preset}: {total / 1e9:.2f} B parameters on {len(devices)} x {kind}")

    train = bench_train(cfg, mesh, args.batch, args.seq, args.steps)
    flops = train_flops_per_token(cfg, args.seq) * train["tokens_per_s"]
    train["model_flops_per_s"] = flops
    train["mfu"] = flops / (peak_flops * len(devices)) if peak_flops else None
    print(f"train: {train['tokens_per_s']:.0f} tokens/s, {flops / 1e12:.1f} TFLOP/s", end="")
    print(f", MFU {train['mfu']:.1%} (goal >= 40%)" if train["mfu"] is not None else "")

    lora = None
    if args.lora:
        lora = bench_train(cfg, mesh, args.batch, args.seq, args.steps, lora_rank=args.lora)
        lora["vs_full"] = lora["tokens_per_s"] / train["tokens_per_s"]
        print(f"train, LoRA rank {args.lora}: {lora['tokens_per_s']:.0f} tokens/s", end="")
        print(f" ({lora['vs_full']:.2f}x the full step)")

    decode = []
    for b in args.decode_batches:
        r = bench_decode(cfg, b, args.decode_tokens)
        r["floor_step_s"] = r["weight_bytes"] / bandwidth if bandwidth else None
        r["of_floor"] = r["floor_step_s"] / r["step_s"] if bandwidth else None
        decode.append(r)
        line = (
            f"decode batch {b}: {r['tokens_per_s']:.0f} tokens/s, {r['step_s'] * 1e3:.2f} ms/step"
        )
        if r["of_floor"] is not None:
            line += f", {r['of_floor']:.0%} of the HBM floor ({r['floor_step_s'] * 1e3:.2f} ms)"
        print(line + (" (goal >= 60%)" if b == 1 and bandwidth else ""))

    engine = bench_engine(cfg, args.slots, args.decode_tokens)
    print(f"engine, {args.slots} slots: {engine['tokens_per_s']:.0f} output tokens/s")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "command": " ".join(["python", *sys.argv]),
        "date": time.strftime("%Y-%m-%d"),
        "device": kind,
        "devices": len(devices),
        "preset": args.preset,
        "parameters": total,
        "train": train,
        "train_lora": lora,
        "decode": decode,
        "engine": engine,
    }
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
