"""Block-sparse Pallas attention against dense attention on one GPU (forward and forward+backward).

For each sequence length the script builds a vertical-slash pattern at a target sparsity (sinks,
verticals spread over the sequence, slashes near the diagonal as MTraining's patterns are), converts
it into the kernel's block and bar lists (one device, one ring step), and times:

* ``cudnn``: ``jax.nn.dot_product_attention(implementation="cudnn", is_causal=True)`` (dense);
* ``dense-kernel``: our kernel with every causal block active (``pattern=None``);
* ``sparse-kernel``: our kernel on the pattern.

It first checks the kernels against the jnp reference at a small size on the GPU. Prints TFLOP/s
(computed FLOPs: 4·rows·cols·D per head forward, 2.5× that backward; dense causal counts half the
square) and speedups over cuDNN measured in the same run.

    python scripts/bench_sparse_attention.py --lengths 16384 32768 65536 131072 --sparsity 0.9 0.95
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jaxlab.attention import layouts  # noqa: E402
from jaxlab.attention.sparse import VerticalSlashPattern  # noqa: E402
from jaxlab.testing.bench import time_call  # noqa: E402
from pallas_kernels.block_sparse_attention import (  # noqa: E402
    block_sparse_attention_bwd,
    block_sparse_attention_bwd_reference,
    block_sparse_attention_fwd,
    block_sparse_attention_fwd_reference,
)


def bench_pattern(key, n, heads, sparsity, g):
    """Sinks + verticals 0.1·(1−s)·N spread uniformly + slashes covering the nearest block diagonals
    so that the block part keeps about (1 − sparsity) of the causal blocks."""
    nb = n // g
    m = max(1, int(round(nb * (1 - np.sqrt(sparsity)))))  # Σ_{δ<m}(nb−δ) ≈ (1−s)·nb²/2
    v_size = max(64, int(0.1 * (1 - sparsity) * n))
    kv, ks = jax.random.split(key)
    cols = jax.random.uniform(kv, (1, heads, n)).at[..., :30].set(2.0)
    _, vert = jax.lax.top_k(cols, v_size)
    dists = (jnp.arange(m) * g + g // 2)[None, None].repeat(heads, 1)  # one distance per diagonal
    dists = dists.at[..., 0].set(0)
    return VerticalSlashPattern(jnp.sort(vert, -1).astype(jnp.int32), dists.astype(jnp.int32))


def plan_for(pattern, n, g, heads, bar_block=64):
    blocks = jnp.arange(n // g, dtype=jnp.int32)
    return layouts.step_plan(
        pattern,
        blocks,
        blocks,
        num_blocks=n // g,
        block_size=g,
        batch_heads=(1, heads),
        bar_block=bar_block,
    )


def computed_flops(plan, g, d):
    blocks = float(jnp.sum(plan.block_cnt))
    bars = float(jnp.sum(plan.bar_cnt))
    return 4.0 * d * (blocks * g * g + bars * g)


def make_fns(plan, g, kw):
    @jax.custom_vjp
    def attn(q, k, v):
        return block_sparse_attention_fwd(q, k, v, plan, block_size=g, **kw["fwd"])[0]

    def fwd(q, k, v):
        o, lse = block_sparse_attention_fwd(q, k, v, plan, block_size=g, **kw["fwd"])
        return o, (q, k, v, o, lse)

    def bwd(res, do):
        q, k, v, o, lse = res
        delta = jnp.einsum("bqhd,bqhd->bhq", o, do.astype(jnp.float32))
        dq, dk, dv = block_sparse_attention_bwd(
            q, k, v, lse, do, delta, plan, block_size=g, **kw["bwd"]
        )
        return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)

    attn.defvjp(fwd, bwd)
    f = jax.jit(attn)
    fb = jax.jit(
        jax.grad(lambda q, k, v: attn(q, k, v).astype(jnp.float32).sum(), argnums=(0, 1, 2))
    )
    return f, fb


def check_small(g, d, kw):
    n, h, kvh = 16 * g, 4, 1
    ks = jax.random.split(jax.random.key(0), 5)
    q = jax.random.normal(ks[0], (1, n, h, d), jnp.float32)
    k = jax.random.normal(ks[1], (1, n, kvh, d), jnp.float32)
    v = jax.random.normal(ks[2], (1, n, kvh, d), jnp.float32)
    do = jax.random.normal(ks[3], (1, n, h, d), jnp.float32)
    pat = bench_pattern(ks[4], n, h, 0.9, g)
    plan = plan_for(pat, n, g, h)
    errs = {}
    for dtype in (jnp.float32, jnp.bfloat16):
        qq, kk, vv = (x.astype(dtype) for x in (q, k, v))
        o, lse = block_sparse_attention_fwd(qq, kk, vv, plan, block_size=g, **kw["fwd"])
        o_r, lse_r = block_sparse_attention_fwd_reference(q, k, v, plan, block_size=g)
        delta = jnp.einsum("bqhd,bqhd->bhq", o_r, do)
        got = block_sparse_attention_bwd(
            qq, kk, vv, lse_r, do.astype(dtype), delta, plan, block_size=g, **kw["bwd"]
        )
        want = block_sparse_attention_bwd_reference(q, k, v, lse_r, do, delta, plan, block_size=g)
        fin = jnp.isfinite(lse_r)
        e = {
            "o": float(jnp.max(jnp.abs(o - o_r))),
            "lse": float(jnp.max(jnp.where(fin, jnp.abs(lse - lse_r), 0))),
        }
        for name, a, b in zip(("dq", "dk", "dv"), got, want, strict=True):
            e[name] = float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(b)) + 1e-9))
        errs[jnp.dtype(dtype).name] = e
    return errs


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[16384, 32768, 65536, 131072])
    ap.add_argument("--sparsity", type=float, nargs="+", default=[0.9, 0.95])
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--block-k", type=int, default=64)
    ap.add_argument("--bwd-block", type=int, default=64)
    ap.add_argument("--num-warps", type=int, default=4)
    ap.add_argument("--num-stages", type=int, default=3)
    ap.add_argument("--skip-backward", action="store_true")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    g, d, h, kvh = args.block_size, args.head_dim, args.heads, args.kv_heads
    common = dict(num_warps=args.num_warps, num_stages=args.num_stages)
    kw = {
        "fwd": dict(block_k=args.block_k, **common),
        "bwd": dict(block_q=args.bwd_block, block_k=args.bwd_block, **common),
    }
    print(f"device: {jax.devices()[0].device_kind}  jax {jax.__version__}", flush=True)
    errs = check_small(g, d, kw)
    print(f"check vs jnp reference (N={16 * g}, 90%):", json.dumps(errs), flush=True)
    rows = []
    for n in args.lengths:
        ks = jax.random.split(jax.random.key(n), 3)
        q = jax.random.normal(ks[0], (1, n, h, d), jnp.bfloat16)
        k = jax.random.normal(ks[1], (1, n, kvh, d), jnp.bfloat16)
        v = jax.random.normal(ks[2], (1, n, kvh, d), jnp.bfloat16)
        dense_flops = 4.0 * d * h * n * n / 2
        impl = "cudnn" if jax.default_backend() == "gpu" else "xla"  # xla: a CPU smoke run
        cud = jax.jit(
            lambda q, k, v, impl=impl: jax.nn.dot_product_attention(
                q, k, v, is_causal=True, implementation=impl
            )
        )
        cud_b = jax.jit(
            jax.grad(
                lambda q, k, v, cud=cud: cud(q, k, v).astype(jnp.float32).sum(), argnums=(0, 1, 2)
            )
        )
        t_cud = time_call(cud, q, k, v, repeats=5, reduce="median")
        t_cud_b = (
            None if args.skip_backward else time_call(cud_b, q, k, v, repeats=5, reduce="median")
        )
        row = {"n": n, "cudnn_fwd_ms": t_cud * 1e3, "cudnn_fwd_tflops": dense_flops / t_cud / 1e12}
        if t_cud_b:
            row.update(
                cudnn_fwdbwd_ms=t_cud_b * 1e3,
                cudnn_fwdbwd_tflops=3.5 * dense_flops / t_cud_b / 1e12,
            )
        cases = [("dense", None)] + [(f"sparse{s}", s) for s in args.sparsity]
        for name, sp in cases:
            pat = None if sp is None else bench_pattern(ks[2], n, h, sp, g)
            plan_fn = jax.jit(lambda p, n=n: plan_for(p, n, g, h))
            plan = jax.block_until_ready(plan_fn(pat))
            t_plan = time_call(plan_fn, pat, repeats=3, reduce="median")
            flops = computed_flops(plan, g, d)
            f, fb = make_fns(plan, g, kw)
            t_f = time_call(f, q, k, v, repeats=5, reduce="median")
            row[f"{name}_density"] = flops / (4.0 * d * h * n * (n + g) / 2)
            row[f"{name}_plan_ms"] = t_plan * 1e3
            row[f"{name}_fwd_ms"] = t_f * 1e3
            row[f"{name}_fwd_tflops"] = flops / t_f / 1e12
            row[f"{name}_fwd_speedup_vs_cudnn"] = t_cud / t_f
            if not args.skip_backward:
                t_fb = time_call(fb, q, k, v, repeats=5, reduce="median")
                row[f"{name}_fwdbwd_ms"] = t_fb * 1e3
                row[f"{name}_fwdbwd_tflops"] = 3.5 * flops / t_fb / 1e12
                row[f"{name}_fwdbwd_speedup_vs_cudnn"] = t_cud_b / t_fb
            del plan, f, fb
        rows.append(row)
        print(
            json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}),
            flush=True,
        )
    if args.json:
        args.json.write_text(
            json.dumps(
                {"device": jax.devices()[0].device_kind, "errors": errs, "rows": rows}, indent=1
            )
        )


if __name__ == "__main__":
    main()
