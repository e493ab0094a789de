"""Block-sparse + vertical-bar attention in Pallas: forward, dq and dk/dv kernels.

One call computes the attention of a local query chunk against one key/value chunk (one ring step), over
the work lists of a step plan (:class:`~pallas_kernels.block_sparse_attention.plan.StepPlan`, or any object
with its fields):

* blocks: per query block of G rows, the active key blocks of G columns (processed in ``block_k`` tiles);
* bars: per query block, gathered key columns (selected verticals outside the active blocks), processed in
  ``bar_block`` tiles with a gather load.

Causality is by global token position (``q_blocks``/``kv_blocks`` give the global block of every local
block), so the same kernel serves every ring layout and step. The forward returns the step's normalized
output and log-sum-exp and can merge them into the running result of earlier ring steps. The backward is
deterministic: dq row-parallel over the block and bar lists; dk/dv column-parallel over the transposed
block lists; the bars' dk/dv from one kernel over the chunk's vertical columns, scatter-added after it.

Written with core Pallas primitives (ref indexing, ``pl.ds``, ``lax.fori_loop``, gathers through integer
index arrays) so that it runs in interpret mode on CPU and lowers through Triton on GPU.
Letters: B batch, T tokens, H query heads, K key/value heads, D head dim, n blocks, V vertical capacity.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

try:  # the Triton backend's compiler parameters (GPU only; absent or deprecated on some versions)
    from jax.experimental.pallas import triton as plgpu
except ImportError:  # pragma: no cover
    plgpu = None

__all__ = ["block_sparse_attention_fwd", "block_sparse_attention_bwd", "merge_partial"]

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
MASK = -0.7 * float(jnp.finfo(jnp.float32).max)


def merge_partial(o0, lse0, o1, lse1):
    """Merge two normalized partial results (o ``[..., T, D]`` f32, lse ``[..., T]``) of disjoint keys.

    Rows where a side saw nothing carry lse = −inf and never produce NaN.
    """
    mx = jnp.maximum(lse0, lse1)
    mx = jnp.where(mx == -jnp.inf, 0.0, mx)
    w0, w1 = jnp.exp(lse0 - mx), jnp.exp(lse1 - mx)
    tot = w0 + w1
    out = (w0[..., None] * o0 + w1[..., None] * o1) / jnp.where(tot == 0, 1.0, tot)[..., None]
    return out, jnp.where(tot == 0, -jnp.inf, mx + jnp.log(tot))


def _default_interpret(interpret):
    return jax.default_backend() == "cpu" if interpret is None else interpret


def _compiler_params(num_warps, num_stages, interpret):
    if interpret or plgpu is None:
        return None
    return plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def _div(x, m):  # non-negative ints: plain truncating division (lowers on Triton as is)
    return lax.div(x, jnp.asarray(m, jnp.int32))


def _rem(x, m):
    return lax.rem(x, jnp.asarray(m, jnp.int32))


def _dot_nt(a, b):  # a [M, D] · b [N, D]ᵀ → [M, N] f32
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _dot_tn(a, b):  # a [M, N]ᵀ · b [M, D] → [N, D] f32
    return lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _dot(a, b):
    return lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _iota(n):
    return lax.broadcasted_iota(jnp.int32, (n,), 0)


def _key_block_tile(idx_ref, kvblk_ref, t, nsub, g, bk):
    """Tile t of a query row's active key blocks (``nsub`` tiles of ``bk`` per block):
    ``(start row in the local keys, global key positions [bk])``."""
    kb = idx_ref[_div(t, nsub)]
    offset = _rem(t, nsub) * bk
    return pl.multiple_of(kb * g + offset, bk), kvblk_ref[kb] * g + offset + _iota(bk)


def _bar_tile(cols_ref, kvblk_ref, t, bv, count, g):
    """Tile t of a gathered-column list: ``(valid [bv], local columns [bv], global positions [bv])``."""
    valid = t * bv + _iota(bv) < count
    cols = jnp.where(valid, cols_ref[pl.ds(t * bv, bv)], 0)
    return valid, cols, kvblk_ref[_div(cols, g)] * g + _rem(cols, g)


def _over_blocks(cnt, nsub, causal, body, carry, *, diagonal_first):
    """Runs ``body(t, carry, masked)`` over ``cnt`` blocks of ``nsub`` tiles. Block lists ascend, so
    under causality only one block can hold the diagonal (the last of a query row's key blocks, the
    first of a key block's query blocks): only its tiles get the token-level mask."""
    if not causal:
        return lax.fori_loop(0, cnt * nsub, functools.partial(body, masked=False), carry)
    split = (jnp.minimum(cnt, 1) if diagonal_first else jnp.maximum(cnt - 1, 0)) * nsub
    first, second = (True, False) if diagonal_first else (False, True)
    carry = lax.fori_loop(0, split, functools.partial(body, masked=first), carry)
    return lax.fori_loop(split, cnt * nsub, functools.partial(body, masked=second), carry)


def _lse2(lse):
    """Natural log-sum-exp → base 2; rows that saw nothing (−inf) → 0 (their scores are −inf)."""
    lse2 = lse * LOG2E
    return jnp.where(lse2 == -jnp.inf, 0.0, lse2)


def _dkdv_update(q, do, lse2, delta, s, k, v, carry):
    """Adds one tile's dK / dV (unscaled dK) for the tile's scores ``s`` (masked entries −inf)."""
    dk, dv = carry
    p = jnp.exp2(s - lse2[:, None])
    dv = dv + _dot_tn(p.astype(do.dtype), do)
    ds = p * (_dot_nt(do, v) - delta[:, None])
    return dk + _dot_tn(ds.astype(q.dtype), q), dv


# ----------------------------------------------------------------------------------- forward


def _fwd_kernel(
    qblk_ref,
    kvblk_ref,
    bidx_ref,
    bcnt_ref,
    baridx_ref,
    barcnt_ref,
    q_ref,
    k_ref,
    v_ref,
    *rest,
    g,
    bk,
    bv,
    causal,
    merge,
    c,
):
    if merge:
        oprev_ref, lprev_ref, o_ref, lse_ref = rest
    else:
        o_ref, lse_ref = rest
    i, b, h = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    q = q_ref[...]
    d = q.shape[-1]
    q_pos = qblk_ref[i] * g + _iota(g)

    def update(s, v, carry):
        acc, m, l_sum = carry
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        corr = jnp.exp2(m - m_new)
        p = jnp.exp2(s - m_new[:, None])
        acc = acc * corr[:, None] + _dot(p.astype(v.dtype), v)
        return acc, m_new, l_sum * corr + jnp.sum(p, axis=1)

    nsub = g // bk

    def block_body(t, carry, masked):
        start, k_pos = _key_block_tile(bidx_ref, kvblk_ref, t, nsub, g, bk)
        s = _dot_nt(q, k_ref[pl.ds(start, bk), :]) * c
        if masked:
            s = jnp.where(q_pos[:, None] >= k_pos[None, :], s, MASK)
        return update(s, v_ref[pl.ds(start, bk), :], carry)

    carry = (
        jnp.zeros((g, d), jnp.float32),
        jnp.full((g,), -jnp.inf, jnp.float32),
        jnp.zeros((g,), jnp.float32),
    )
    carry = _over_blocks(bcnt_ref[b, h, i], nsub, causal, block_body, carry, diagonal_first=False)
    nbar = barcnt_ref[b, h, i]

    def bar_body(t, carry):
        valid, cols, k_pos = _bar_tile(baridx_ref, kvblk_ref, t, bv, nbar, g)
        ok = valid[None, :] & (q_pos[:, None] >= k_pos[None, :])
        s = jnp.where(ok, _dot_nt(q, k_ref[cols, :]) * c, MASK)
        return update(s, v_ref[cols, :], carry)

    acc, m, l_sum = lax.fori_loop(0, _div(nbar + bv - 1, bv), bar_body, carry)
    empty = m < 0.5 * MASK  # nothing visible (also m = −inf: no work at all)
    o = jnp.where(empty[:, None], 0.0, acc / jnp.where(empty, 1.0, l_sum)[:, None])
    lse = jnp.where(empty, -jnp.inf, (m + jnp.log2(jnp.where(empty, 1.0, l_sum))) * LN2)
    if merge:
        o, lse = merge_partial(oprev_ref[...].astype(jnp.float32), lprev_ref[...], o, lse)
    o_ref[...] = o.astype(o_ref.dtype)
    lse_ref[...] = lse


def block_sparse_attention_fwd(
    q: jax.Array,  # [B, Tq, H, D]
    k: jax.Array,  # [B, Tk, K, D]
    v: jax.Array,  # [B, Tk, K, D]
    plan,
    *,
    block_size: int,
    scale: float | None = None,
    causal: bool = True,
    o_prev: jax.Array | None = None,  # [B, Tq, H, D] f32 running output of earlier steps
    lse_prev: jax.Array | None = None,  # [B, H, Tq] f32
    block_k: int | None = None,
    num_warps: int = 4,
    num_stages: int = 3,
    interpret: bool | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Attention of q against one key chunk over the plan's blocks and bars: ``(o f32, lse f32)``.

    With ``o_prev``/``lse_prev`` the result is merged into them (buffers aliased to the outputs).
    """
    b, tq, h, d = q.shape
    tk, kvh = k.shape[1], k.shape[2]
    g = block_size
    bk = min(block_k or g, g)
    grp = h // kvh
    n_q, n_k = tq // g, tk // g
    vcap = plan.bar_idx.shape[-1]
    bv = vcap // plan.vcol_start.shape[-1]  # the plan's bar tile
    if tq % g or tk % g or g % bk or vcap % bv:
        raise ValueError(
            f"block_sparse_attention: T ({tq}, {tk}) must be multiples of block_size {g}, "
            f"block_size of block_k {bk}, bar capacity {vcap} of bar_block {bv}"
        )
    scale = d**-0.5 if scale is None else scale
    interpret = _default_interpret(interpret)
    merge = o_prev is not None
    kernel = functools.partial(
        _fwd_kernel, g=g, bk=bk, bv=bv, causal=causal, merge=merge, c=scale * LOG2E
    )
    whole = lambda x: pl.BlockSpec(x.shape, lambda *_: (0,) * x.ndim)  # noqa: E731
    in_specs = [
        whole(plan.q_blocks),
        whole(plan.kv_blocks),
        pl.BlockSpec((None, None, None, n_k), lambda i, bi, hi: (bi, hi, i, 0)),
        whole(plan.block_cnt),
        pl.BlockSpec((None, None, None, vcap), lambda i, bi, hi: (bi, hi, i, 0)),
        whole(plan.bar_cnt),
        pl.BlockSpec((None, g, None, d), lambda i, bi, hi: (bi, i, hi, 0)),
        pl.BlockSpec((None, tk, None, d), lambda i, bi, hi: (bi, 0, _div(hi, grp), 0)),
        pl.BlockSpec((None, tk, None, d), lambda i, bi, hi: (bi, 0, _div(hi, grp), 0)),
    ]
    args = [
        plan.q_blocks,
        plan.kv_blocks,
        plan.block_idx,
        plan.block_cnt,
        plan.bar_idx,
        plan.bar_cnt,
        q,
        k,
        v,
    ]
    o_spec = pl.BlockSpec((None, g, None, d), lambda i, bi, hi: (bi, i, hi, 0))
    l_spec = pl.BlockSpec((None, None, g), lambda i, bi, hi: (bi, hi, i))
    aliases = {}
    if merge:
        in_specs += [o_spec, l_spec]
        args += [o_prev.astype(jnp.float32), lse_prev.astype(jnp.float32)]
        aliases = {len(args) - 2: 0, len(args) - 1: 1}
    return pl.pallas_call(
        kernel,
        grid=(n_q, b, h),
        in_specs=in_specs,
        out_specs=[o_spec, l_spec],
        out_shape=[
            jax.ShapeDtypeStruct((b, tq, h, d), jnp.float32),
            jax.ShapeDtypeStruct((b, h, tq), jnp.float32),
        ],
        input_output_aliases=aliases,
        compiler_params=_compiler_params(num_warps, num_stages, interpret),
        interpret=interpret,
        name="block_sparse_attention_fwd",
    )(*args)


# ---------------------------------------------------------------------------------- backward


def _dq_kernel(
    qblk_ref,
    kvblk_ref,
    bidx_ref,
    bcnt_ref,
    baridx_ref,
    barcnt_ref,
    q_ref,
    k_ref,
    v_ref,
    do_ref,
    lse_ref,
    delta_ref,
    dq_ref,
    *,
    g,
    bk,
    bv,
    causal,
    c,
):
    i, b, h = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    q, do = q_ref[...], do_ref[...]
    lse2, delta = _lse2(lse_ref[...]), delta_ref[...]
    q_pos = qblk_ref[i] * g + _iota(g)

    def grad(s, k, v, dq):
        p = jnp.exp2(s - lse2[:, None])
        ds = p * (_dot_nt(do, v) - delta[:, None])
        return dq + _dot(ds.astype(k.dtype), k)

    nsub = g // bk

    def block_body(t, dq, masked):
        start, k_pos = _key_block_tile(bidx_ref, kvblk_ref, t, nsub, g, bk)
        k = k_ref[pl.ds(start, bk), :]
        s = _dot_nt(q, k) * c
        if masked:
            s = jnp.where(q_pos[:, None] >= k_pos[None, :], s, -jnp.inf)
        return grad(s, k, v_ref[pl.ds(start, bk), :], dq)

    dq = jnp.zeros(q.shape, jnp.float32)
    dq = _over_blocks(bcnt_ref[b, h, i], nsub, causal, block_body, dq, diagonal_first=False)
    nbar = barcnt_ref[b, h, i]

    def bar_body(t, dq):
        valid, cols, k_pos = _bar_tile(baridx_ref, kvblk_ref, t, bv, nbar, g)
        k = k_ref[cols, :]
        ok = valid[None, :] & (q_pos[:, None] >= k_pos[None, :])
        return grad(jnp.where(ok, _dot_nt(q, k) * c, -jnp.inf), k, v_ref[cols, :], dq)

    dq = lax.fori_loop(0, _div(nbar + bv - 1, bv), bar_body, dq)
    dq_ref[...] = dq * (c * LN2)


def _dkdv_kernel(
    qblk_ref,
    kvblk_ref,
    qidx_ref,
    qcnt_ref,
    q_ref,
    k_ref,
    v_ref,
    do_ref,
    lse_ref,
    delta_ref,
    dk_ref,
    dv_ref,
    *,
    g,
    bq,
    bk,
    causal,
    c,
):
    jt, b, h = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    nsub_k = g // bk
    j = _div(jt, nsub_k)
    k, v = k_ref[...], v_ref[...]
    k_pos = kvblk_ref[j] * g + _rem(jt, nsub_k) * bk + _iota(bk)
    nsub = g // bq

    def body(t, carry, masked):
        start, q_pos = _key_block_tile(qidx_ref, qblk_ref, t, nsub, g, bq)  # query tiles here
        q = q_ref[pl.ds(start, bq), :]
        s = _dot_nt(q, k) * c
        if masked:
            s = jnp.where(q_pos[:, None] >= k_pos[None, :], s, -jnp.inf)
        return _dkdv_update(
            q,
            do_ref[pl.ds(start, bq), :],
            _lse2(lse_ref[pl.ds(start, bq)]),
            delta_ref[pl.ds(start, bq)],
            s,
            k,
            v,
            carry,
        )

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = _over_blocks(
        qcnt_ref[b, h, j], nsub, causal, body, (zeros, zeros), diagonal_first=True
    )
    dk_ref[...] = dk * (c * LN2)
    dv_ref[...] = dv


def _bar_dkdv_kernel(
    qblk_ref,
    kvblk_ref,
    vidx_ref,
    vcnt_ref,
    vstart_ref,
    active_ref,
    q_ref,
    k_ref,
    v_ref,
    do_ref,
    lse_ref,
    delta_ref,
    dk_ref,
    dv_ref,
    *,
    g,
    bq,
    bv,
    n_q,
    c,
):
    t, b, h = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    count = vcnt_ref[b, h]
    valid, cols, k_pos = _bar_tile(vidx_ref, kvblk_ref, t, bv, count, g)
    k, v = k_ref[cols, :], v_ref[cols, :]
    k_blk = _div(k_pos, g)
    nsub = g // bq

    def body(it, carry):
        i = _div(it, nsub)
        start = pl.multiple_of(i * g + _rem(it, nsub) * bq, bq)
        q = q_ref[pl.ds(start, bq), :]
        q_blk = qblk_ref[i]
        q_pos = q_blk * g + _rem(it, nsub) * bq + _iota(bq)
        # a column inside an active block of this query block was done with the blocks
        covered = active_ref[jnp.clip(q_blk - k_blk, 0, active_ref.shape[0] - 1)] != 0
        ok = (valid & ~covered)[None, :] & (q_pos[:, None] >= k_pos[None, :])
        s = jnp.where(ok, _dot_nt(q, k) * c, -jnp.inf)
        return _dkdv_update(
            q,
            do_ref[pl.ds(start, bq), :],
            _lse2(lse_ref[pl.ds(start, bq)]),
            delta_ref[pl.ds(start, bq)],
            s,
            k,
            v,
            carry,
        )

    start = jnp.where(t * bv < count, vstart_ref[t], n_q) * nsub
    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = lax.fori_loop(start, n_q * nsub, body, (zeros, zeros))
    dk_ref[...] = dk * (c * LN2)
    dv_ref[...] = dv


def block_sparse_attention_bwd(
    q: jax.Array,  # [B, Tq, H, D]
    k: jax.Array,  # [B, Tk, K, D]
    v: jax.Array,  # [B, Tk, K, D]
    lse: jax.Array,  # [B, H, Tq] f32: the final log-sum-exp over all keys (all ring steps)
    do: jax.Array,  # [B, Tq, H, D]
    delta: jax.Array,  # [B, H, Tq] f32: rowsum(final out · do)
    plan,
    *,
    block_size: int,
    scale: float | None = None,
    causal: bool = True,
    block_q: int | None = None,
    block_k: int | None = None,
    num_warps: int = 4,
    num_stages: int = 3,
    interpret: bool | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Gradients of one step's share of the attention: ``dq [B, Tq, H, D]``, ``dk, dv [B, Tk, K, D]``
    (float32). Probabilities are recomputed from the final ``lse``, so the shares of the ring steps add
    up to the exact gradient."""
    b, tq, h, d = q.shape
    tk, kvh = k.shape[1], k.shape[2]
    g = block_size
    bk = min(block_k or g, g)
    bq = min(block_q or g, g)
    grp = h // kvh
    n_q, n_k = tq // g, tk // g
    vcap = plan.bar_idx.shape[-1]
    bv = vcap // plan.vcol_start.shape[-1]  # the plan's bar tile
    scale = d**-0.5 if scale is None else scale
    interpret = _default_interpret(interpret)
    params = _compiler_params(num_warps, num_stages, interpret)
    c = scale * LOG2E
    do = do.astype(q.dtype)
    whole = lambda x: pl.BlockSpec(x.shape, lambda *_: (0,) * x.ndim)  # noqa: E731
    row = lambda: pl.BlockSpec((None, g, None, d), lambda i, bi, hi: (bi, i, hi, 0))  # noqa: E731
    kv_whole = pl.BlockSpec((None, tk, None, d), lambda i, bi, hi: (bi, 0, _div(hi, grp), 0))
    vec = pl.BlockSpec((None, None, g), lambda i, bi, hi: (bi, hi, i))

    dq = pl.pallas_call(
        functools.partial(_dq_kernel, g=g, bk=bk, bv=bv, causal=causal, c=c),
        grid=(n_q, b, h),
        in_specs=[
            whole(plan.q_blocks),
            whole(plan.kv_blocks),
            pl.BlockSpec((None, None, None, n_k), lambda i, bi, hi: (bi, hi, i, 0)),
            whole(plan.block_cnt),
            pl.BlockSpec((None, None, None, vcap), lambda i, bi, hi: (bi, hi, i, 0)),
            whole(plan.bar_cnt),
            row(),
            kv_whole,
            kv_whole,
            row(),
            vec,
            vec,
        ],
        out_specs=row(),
        out_shape=jax.ShapeDtypeStruct((b, tq, h, d), jnp.float32),
        compiler_params=params,
        interpret=interpret,
        name="block_sparse_attention_dq",
    )(
        plan.q_blocks,
        plan.kv_blocks,
        plan.block_idx,
        plan.block_cnt,
        plan.bar_idx,
        plan.bar_cnt,
        q,
        k,
        v,
        do,
        lse,
        delta,
    )

    q_whole = pl.BlockSpec((None, tq, None, d), lambda i, bi, hi: (bi, 0, hi, 0))
    vec_whole = pl.BlockSpec((None, None, tq), lambda i, bi, hi: (bi, hi, 0))
    kv_tile = pl.BlockSpec((None, bk, None, d), lambda jt, bi, hi: (bi, jt, _div(hi, grp), 0))
    out_tile = pl.BlockSpec((None, bk, None, d), lambda jt, bi, hi: (bi, jt, hi, 0))
    dk_h, dv_h = pl.pallas_call(
        functools.partial(_dkdv_kernel, g=g, bq=bq, bk=bk, causal=causal, c=c),
        grid=(n_k * (g // bk), b, h),
        in_specs=[
            whole(plan.q_blocks),
            whole(plan.kv_blocks),
            pl.BlockSpec(
                (None, None, None, n_q), lambda jt, bi, hi: (bi, hi, _div(jt, g // bk), 0)
            ),
            whole(plan.qblock_cnt),
            q_whole,
            kv_tile,
            kv_tile,
            q_whole,
            vec_whole,
            vec_whole,
        ],
        out_specs=[out_tile, out_tile],
        out_shape=[jax.ShapeDtypeStruct((b, tk, h, d), jnp.float32)] * 2,
        compiler_params=params,
        interpret=interpret,
        name="block_sparse_attention_dkdv",
    )(plan.q_blocks, plan.kv_blocks, plan.qblock_idx, plan.qblock_cnt, q, k, v, do, lse, delta)

    if plan.vcol_idx.shape[-1]:
        n_tiles = vcap // bv
        tile_out = pl.BlockSpec((None, None, bv, d), lambda t, bi, hi: (bi, hi, t, 0))
        bar_dk, bar_dv = pl.pallas_call(
            functools.partial(_bar_dkdv_kernel, g=g, bq=bq, bv=bv, n_q=n_q, c=c),
            grid=(n_tiles, b, h),
            in_specs=[
                whole(plan.q_blocks),
                whole(plan.kv_blocks),
                pl.BlockSpec((None, None, vcap), lambda t, bi, hi: (bi, hi, 0)),
                whole(plan.vcol_cnt),
                pl.BlockSpec((None, None, n_tiles), lambda t, bi, hi: (bi, hi, 0)),
                pl.BlockSpec((None, None, plan.active.shape[-1]), lambda t, bi, hi: (bi, hi, 0)),
                q_whole,
                kv_whole,
                kv_whole,
                q_whole,
                vec_whole,
                vec_whole,
            ],
            out_specs=[tile_out, tile_out],
            out_shape=[jax.ShapeDtypeStruct((b, h, vcap, d), jnp.float32)] * 2,
            compiler_params=params,
            interpret=interpret,
            name="block_sparse_attention_bar_dkdv",
        )(
            plan.q_blocks,
            plan.kv_blocks,
            plan.vcol_idx,
            plan.vcol_cnt,
            plan.vcol_start,
            plan.active,
            q,
            k,
            v,
            do,
            lse,
            delta,
        )
        valid = jnp.arange(vcap) < plan.vcol_cnt[..., None]  # [B, H, V]
        bi = jnp.arange(b)[:, None, None]
        hi = jnp.arange(h)[None, :, None]
        cols = jnp.where(valid, plan.vcol_idx, 0)
        dk_h = dk_h.at[bi, cols, hi].add(jnp.where(valid[..., None], bar_dk, 0.0))
        dv_h = dv_h.at[bi, cols, hi].add(jnp.where(valid[..., None], bar_dv, 0.0))
    dk = dk_h.reshape(b, tk, kvh, grp, d).sum(axis=3)
    dv = dv_h.reshape(b, tk, kvh, grp, d).sum(axis=3)
    return dq, dk, dv
