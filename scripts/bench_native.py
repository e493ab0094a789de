"""jaxlab's native CPU kernels vs XLA on SmolLM2-135M's decode shapes, same run.

    python scripts/bench_native.py [--rows 1 8 32] [--prefill-rows 4096] [--repeats 30]

Three pieces of a decode step, each timed as one jitted call, the implementations alternated
and the minimum kept (the machine's bandwidth drifts between runs):
- the projections of 30 layers chained (q, k, v, o, gate, up, down; 427 MB of float32 weights),
  `jaxlab.native.rows_matmul` (the usual layout) and `native.strips_matmul` (weights packed in
  column strips) against `x @ w`;
- the tied LM head `x @ E.T` (113 MB): `rows_matmul(transposed=True)` and strips of `E.T`;
- attention of one new token over a 256-slot KV cache in 30 layers (9 query / 3 kv heads, ~160
  visible slots per row), `native.cache_attention` against the XLA formulation.
Then a prefill's matmuls (`--prefill-rows` rows, gate and down shapes): strips against XLA.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxlab import native
from jaxlab.attention.dense import grouped_attention

E, F, KV, V, LAYERS = 576, 1536, 192, 49152, 30
HEADS, KV_HEADS, HEAD_DIM, SLOTS = 9, 3, 64, 256


def compare(fns, args, repeats):
    """Min seconds of each fn(*args), calls alternated."""
    for f in fns:
        jax.block_until_ready(f(*args))
    times = [[] for _ in fns]
    for r in range(repeats):
        order = range(len(fns)) if r % 2 == 0 else reversed(range(len(fns)))
        for i in order:
            t0 = time.perf_counter()
            jax.block_until_ready(fns[i](*args))
            times[i].append(time.perf_counter() - t0)
    return [min(t) for t in times]


def projections(mm):
    def run(x, layers):
        for q, k, v, o, g, u, d in layers:
            a = mm(x, q) + jnp.sum(mm(x, k)) + jnp.sum(mm(x, v))
            a = mm(a, o)
            x = mm(mm(a, g) * mm(a, u), d) * 1e-3 + x
        return x

    return jax.jit(run)


def attention_layers(use_native):
    def run(q, ks, vs, mask):
        for k, v in zip(ks, vs):
            q = grouped_attention(
                q, k, v, mask, scale=HEAD_DIM**-0.5, kv_layout="bksd", native=use_native
            )
        return q

    return jax.jit(run)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--prefill-rows", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=30)
    args = p.parse_args()
    if not native.available():
        raise SystemExit("the native kernels are not built: python -m jaxlab.native")
    rng = np.random.default_rng(0)

    def normal(*shape):
        return jnp.asarray(rng.normal(size=shape).astype(np.float32))

    shapes = [(E, E), (E, KV), (E, KV), (E, E), (E, F), (E, F), (F, E)]
    layers = [[normal(*s) for s in shapes] for _ in range(LAYERS)]
    table = normal(V, E)
    ks = [normal(32, KV_HEADS, SLOTS, HEAD_DIM) for _ in range(LAYERS)]
    vs = [normal(32, KV_HEADS, SLOTS, HEAD_DIM) for _ in range(LAYERS)]
    print(f"jax {jax.__version__} ({jax.default_backend()}), min of {args.repeats} alternated runs")
    print(
        f"{'piece':<28s} {'rows':>5s} {'XLA ms':>8s} {'native ms':>10s} {'speedup':>8s} "
        f"{'strips ms':>10s} {'speedup':>8s}"
    )
    packed_layers = [[native.pack_strips(w) for w in ws] for ws in layers]
    packed_head = native.pack_strips(table.T)
    head_xla = jax.jit(lambda x, t: x @ t.T)
    head_native = jax.jit(lambda x, t: native.rows_matmul(x, t, transposed=True))
    head_strips = jax.jit(lambda x, t, packed: native.strips_matmul(x, packed))
    strips = projections(native.strips_matmul)
    for m in args.rows:
        x = normal(m, E)
        pieces = [
            (
                "projections, 30 layers",
                (
                    projections(jnp.matmul),
                    projections(native.rows_matmul),
                    lambda x, layers: strips(x, packed_layers),
                ),
                (x, layers),
            ),
            (
                "tied head x @ E.T",
                (head_xla, head_native, lambda x, t: head_strips(x, t, packed_head)),
                (x, table),
            ),
        ]
        q = normal(m, 1, HEADS, HEAD_DIM)
        visible = SLOTS // 2 + rng.integers(0, SLOTS // 4, size=m)
        mask = jnp.asarray(np.arange(SLOTS)[None, None, :] < visible[:, None, None])
        kv = ([k[:m] for k in ks], [v[:m] for v in vs])
        attn = (attention_layers(False), attention_layers(True))
        pieces.append(("cache attention, 30 layers", attn, (q, *kv, mask)))
        for name, fns, fargs in pieces:
            report(name, m, compare(fns, fargs, args.repeats))
    gemm_xla = jax.jit(jnp.matmul)
    gemm_strips = jax.jit(lambda x, w, packed: native.strips_matmul(x, packed))
    for name, w in (
        ("prefill gate [576, 1536]", layers[0][4]),
        ("prefill down [1536, 576]", layers[0][6]),
    ):
        x, packed = normal(args.prefill_rows, w.shape[0]), native.pack_strips(w)
        fns = (gemm_xla, lambda x, w, packed=packed: gemm_strips(x, w, packed))
        t_xla, t_strips = compare(fns, (x, w), max(3, args.repeats // 5))
        report(name, args.prefill_rows, (t_xla, None, t_strips))


def report(name, rows, times):
    """One table row: XLA, then each native variant (None: not run) with its speedup."""
    t_xla, *others = times
    cells = ""
    for t in others:
        cells += f" {'-':>10s} {'-':>8s}" if t is None else f" {t * 1e3:10.2f} {t_xla / t:7.2f}x"
    print(f"{name:<28s} {rows:5d} {t_xla * 1e3:8.2f}{cells}")


if __name__ == "__main__":
    main()
