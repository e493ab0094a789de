"""Pallas block-sparse + bar kernels (interpret mode on CPU) against their jnp twins."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlab.attention import layouts
from jaxlab.attention.sparse import VerticalSlashPattern, pattern_from_budgets
from pallas_kernels.block_sparse_attention import (
    block_sparse_attention_bwd,
    block_sparse_attention_bwd_reference,
    block_sparse_attention_fwd,
    block_sparse_attention_fwd_reference,
    merge_partial,
)

G = 16

# Jitted once per module: on CPU every call is dominated by compiling the interpret-mode kernels
# (running them takes milliseconds), and an eager call re-traces and recompiles each time. Cases
# with equal shapes (diag_step and off_step differ only in the plan's values) share one compile.
_fwd = jax.jit(block_sparse_attention_fwd, static_argnames=("block_size", "block_k"))
_bwd = jax.jit(block_sparse_attention_bwd, static_argnames=("block_size", "block_q", "block_k"))
_fwd_ref = jax.jit(block_sparse_attention_fwd_reference, static_argnames=("block_size",))
_bwd_ref = jax.jit(block_sparse_attention_bwd_reference, static_argnames=("block_size",))


def _setup(key, *, rank=1, src=0, **static):
    """Inputs and the step plan of (rank, src), built in one compiled function (eagerly, each of its
    many small ops compiles on its own); rank and src are traced, so equal shapes share a compile."""
    return _setup_jit(key, jnp.int32(rank), jnp.int32(src), **static)


@functools.partial(jax.jit, static_argnames=("t", "w", "h", "kvh", "d", "layout", "dense", "dtype"))
def _setup_jit(
    key,
    rank,
    src,
    *,
    t=128,
    w=2,
    h=4,
    kvh=1,
    d=16,
    layout="striped",
    dense=False,
    dtype=jnp.float32,
):
    ks = jax.random.split(key, 5)
    b = 1
    tl = t // w
    q = jax.random.normal(ks[0], (b, tl, h, d), dtype)
    k = jax.random.normal(ks[1], (b, tl, kvh, d), dtype)
    v = jax.random.normal(ks[2], (b, tl, kvh, d), dtype)
    do = jax.random.normal(ks[3], (b, tl, h, d), dtype)
    pat = None
    if not dense:
        pat = pattern_from_budgets(
            ks[4], b, h, t, vertical_size=12, slash_size=3, sink_tokens=2, window=2, fill=0.0
        )
        # one head with an empty pattern, one with only the main diagonal
        pat = VerticalSlashPattern(
            pat.vertical_idx.at[0, 0].set(-1).at[0, 1].set(-1),
            pat.slash_idx.at[0, 0].set(-1).at[0, 1].set(jnp.where(jnp.arange(3) == 0, 0, -1)),
        )
    blocks = jnp.asarray(layouts.layout_blocks(layout, t // G, w))
    plan = layouts.step_plan(
        pat,
        blocks[rank],
        blocks[src],
        num_blocks=t // G,
        block_size=G,
        batch_heads=(b, h),
        bar_block=8,
    )
    return q, k, v, do, plan


@pytest.mark.parametrize("heads", [(4, 1), (2, 2)])
@pytest.mark.parametrize("case", ["diag_step", "off_step", "dense"])
def test_kernel_forward_and_backward_match_reference(heads, case):
    h, kvh = heads
    rank, src = (1, 1) if case != "off_step" else (1, 0)
    q, k, v, do, plan = _setup(
        jax.random.key(0), h=h, kvh=kvh, rank=rank, src=src, dense=case == "dense"
    )
    o, lse = _fwd(q, k, v, plan, block_size=G, block_k=8)
    o_ref, lse_ref = _fwd_ref(q, k, v, plan, block_size=G)
    np.testing.assert_allclose(np.asarray(o), np.asarray(o_ref), atol=2e-5)
    np.testing.assert_allclose(np.asarray(lse), np.asarray(lse_ref), atol=2e-5)
    if case != "dense":
        assert np.isneginf(np.asarray(lse)[0, 0]).any()  # empty rows exist and give -inf, no NaN
    assert np.isfinite(np.asarray(o)).all()
    # a merged second call equals merging in jnp
    o2, lse2 = _fwd(q, k, v, plan, block_size=G, o_prev=o_ref * 0.5, lse_prev=lse_ref - 1.0)
    tr = lambda x: jnp.swapaxes(x, 1, 2)  # noqa: E731  [B, H, T] <-> [B, T, H]
    m_o, m_lse = merge_partial(o_ref * 0.5, tr(lse_ref - 1.0), o_ref, tr(lse_ref))
    m_lse = tr(m_lse)
    np.testing.assert_allclose(np.asarray(o2), np.asarray(m_o), atol=2e-5)
    np.testing.assert_allclose(np.asarray(lse2), np.asarray(m_lse), atol=2e-5)
    # backward share with the step's own lse as the final one
    delta = jnp.einsum("bqhd,bqhd->bhq", o_ref, do)
    got = _bwd(q, k, v, lse_ref, do, delta, plan, block_size=G, block_q=8, block_k=8)
    want = _bwd_ref(q, k, v, lse_ref, do, delta, plan, block_size=G)
    for name, a, b in zip(("dq", "dk", "dv"), got, want, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=5e-5, err_msg=name)


def test_bfloat16_kernel_close_to_float32_reference():
    q, k, v, do, plan = _setup(jax.random.key(1), dtype=jnp.bfloat16, rank=1, src=1)
    o, lse = _fwd(q, k, v, plan, block_size=G)
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    o_ref, lse_ref = _fwd_ref(*f32, plan, block_size=G)
    np.testing.assert_allclose(np.asarray(o), np.asarray(o_ref), atol=3e-2)
    fin = np.isfinite(np.asarray(lse_ref))
    np.testing.assert_allclose(np.asarray(lse)[fin], np.asarray(lse_ref)[fin], atol=3e-2)


def test_check_grads_through_a_kernel_vjp():
    """check_grads on a custom_vjp made of the two kernels (indices fixed, float32, tiny)."""
    q, k, v, _, plan = _setup(jax.random.key(2), t=64, h=2, kvh=1, d=8, rank=1, src=1)

    @jax.custom_vjp
    def attn(q, k, v):
        return _fwd(q, k, v, plan, block_size=G)[0]

    def fwd(q, k, v):
        o, lse = _fwd(q, k, v, plan, block_size=G)
        return o, (q, k, v, o, lse)

    def bwd(res, do):
        q, k, v, o, lse = res
        delta = jnp.einsum("bqhd,bqhd->bhq", o, do)
        return _bwd(q, k, v, lse, do, delta, plan, block_size=G)

    attn.defvjp(fwd, bwd)
    jax.test_util.check_grads(attn, (q, k, v), order=1, modes=["rev"], atol=1e-2, rtol=1e-2)


def test_kernels_lower_for_gpu_through_triton():
    """Cross-lowering for CUDA runs the Pallas → Triton lowering on this CPU machine."""
    g, d, n, h = 128, 128, 1024, 4
    pat = pattern_from_budgets(
        jax.random.key(3), 1, h, n, vertical_size=64, slash_size=8, sink_tokens=4, window=4
    )
    blocks = jnp.arange(n // g, dtype=jnp.int32)
    plan = layouts.step_plan(
        pat, blocks, blocks, num_blocks=n // g, block_size=g, batch_heads=(1, h)
    )

    def fwd_bwd(q, k, v):
        o, lse = block_sparse_attention_fwd(
            q, k, v, plan, block_size=g, block_k=64, interpret=False
        )
        delta = jnp.einsum("bqhd,bqhd->bhq", o, q.astype(jnp.float32))
        return o, block_sparse_attention_bwd(
            q, k, v, lse, q, delta, plan, block_size=g, block_q=64, block_k=64, interpret=False
        )

    q = jax.ShapeDtypeStruct((1, n, h, d), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((1, n, 1, d), jnp.bfloat16)
    text = jax.jit(fwd_bwd).trace(q, kv, kv).lower(lowering_platforms=("cuda",)).as_text()
    for name in ("fwd", "dq", "dkdv", "bar_dkdv"):
        assert f"block_sparse_attention_{name}" in text
