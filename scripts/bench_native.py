"""jaxlab's native CPU kernels vs XLA on SmolLM2-135M's decode shapes, same run.

    python scripts/bench_native.py [--rows 1 8 32] [--repeats 30]

Three pieces of a decode step, each timed as one jitted call, the two implementations alternated
and the minimum kept (the machine's bandwidth drifts between runs):
- the projections of 30 layers chained (q, k, v, o, gate, up, down; 427 MB of float32 weights),
  `jaxlab.native.rows_matmul` against `x @ w`;
- the tied LM head `x @ E.T` (113 MB);
- attention of one new token over a 256-slot KV cache in 30 layers (9 query / 3 kv heads, ~160
  visible slots per row), `native.cache_attention` against the XLA formulation.
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
    print(f"{'piece':<28s} {'rows':>4s} {'XLA ms':>8s} {'native ms':>10s} {'speedup':>8s}")
    head_xla = jax.jit(lambda x, t: x @ t.T)
    head_native = jax.jit(lambda x, t: native.rows_matmul(x, t, transposed=True))
    for m in args.rows:
        x = normal(m, E)
        pieces = [
            (
                "projections, 30 layers",
                (projections(jnp.matmul), projections(native.rows_matmul)),
                (x, layers),
            ),
            ("tied head x @ E.T", (head_xla, head_native), (x, table)),
        ]
        q = normal(m, 1, HEADS, HEAD_DIM)
        visible = SLOTS // 2 + rng.integers(0, SLOTS // 4, size=m)
        mask = jnp.asarray(np.arange(SLOTS)[None, None, :] < visible[:, None, None])
        kv = ([k[:m] for k in ks], [v[:m] for v in vs])
        attn = (attention_layers(False), attention_layers(True))
        pieces.append(("cache attention, 30 layers", attn, (q, *kv, mask)))
        for name, fns, fargs in pieces:
            t_xla, t_native = compare(fns, fargs, args.repeats)
            print(
                f"{name:<28s} {m:4d} {t_xla * 1e3:8.2f} {t_native * 1e3:10.2f} {t_xla / t_native:7.2f}x"
            )


if __name__ == "__main__":
    main()
