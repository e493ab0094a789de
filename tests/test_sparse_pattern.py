"""Vertical-slash patterns, their mask, the per-(device, step) plans and the jnp reference."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from jaxlab.attention import layouts
from jaxlab.attention.sparse import (
    VerticalSlashPattern,
    pattern_from_budgets,
    sparse_attention_reference,
    sparse_mask,
    vertical_slash_pattern,
)


def _qkv(key, b, t, h, kvh, d, dtype=jnp.float32):
    kq, kk, kv = jax.random.split(key, 3)
    return (
        jax.random.normal(kq, (b, t, h, d), dtype),
        jax.random.normal(kk, (b, t, kvh, d), dtype),
        jax.random.normal(kv, (b, t, kvh, d), dtype),
    )


def _np_mask(pattern, t, g):
    """Brute force from the written definition, one (q, k) pair at a time."""
    v = np.asarray(pattern.vertical_idx)
    s = np.asarray(pattern.slash_idx)
    b, h = v.shape[:2]
    out = np.zeros((b, h, t, t), bool)
    for bi, hi in itertools.product(range(b), range(h)):
        verts = set(v[bi, hi][v[bi, hi] >= 0].tolist())
        dists = s[bi, hi][s[bi, hi] >= 0]
        for q in range(t):
            for k in range(q + 1):
                delta = q // g - k // g
                act = np.any(((delta - 1) * g < dists) & (dists < (delta + 1) * g))
                out[bi, hi, q, k] = (k in verts) or act
    return out


def test_mask_matches_definition():
    t, g = 48, 8
    pat = pattern_from_budgets(jax.random.key(0), 2, 2, t, vertical_size=5, slash_size=4, fill=0.3)
    np.testing.assert_array_equal(np.asarray(sparse_mask(pat, t, g)), _np_mask(pat, t, g))


def _np_estimate(q, k, *, v_size, s_size, last_q, mode, sinks, window, top_p):
    """float64 numpy estimator, written from the description (one head at a time)."""
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    b, t, h, d = q.shape
    grp = h // k.shape[2]
    vert = np.full((b, h, min(v_size, t)), -1)
    slash = np.full((b, h, min(s_size, t)), -1)
    for bi, hi in itertools.product(range(b), range(h)):
        x = q[bi, t - last_q :, hi] @ k[bi, :, hi // grp].T / np.sqrt(d)  # [L, T]
        qpos = t - last_q + np.arange(last_q)
        vis = qpos[:, None] >= np.arange(t)[None]
        if mode == "flex":
            e = np.where(vis, np.exp(x - np.where(vis, x, -np.inf).max(1, keepdims=True)), 0)
            x = e / e.sum(1, keepdims=True) / last_q
        else:
            x = np.where(vis, x, 0.0)
        cols = x.sum(0)
        diag = np.zeros(t)
        for a in range(last_q):
            for j in range(qpos[a] + 1):
                diag[qpos[a] - j] += x[a, j]
        if mode == "fixed":
            cols[:sinks] = np.inf
            diag[:window] = np.inf
        for arr, out in ((cols, vert), (diag, slash)):
            order = np.argsort(-arr, kind="stable")[: out.shape[-1]]
            if mode == "flex":
                mass = arr[order]
                order = order[(np.cumsum(mass) - mass) < top_p]
            out[bi, hi, : len(order)] = np.sort(order)
    return vert, slash


@pytest.mark.parametrize("mode", ["fixed", "flex"])
@pytest.mark.parametrize("heads", [(4, 1), (2, 2)])
def test_estimation_matches_float64_numpy(mode, heads):
    h, kvh = heads
    q, k, _ = _qkv(jax.random.key(1), 2, 256, h, kvh, 16)
    top_p = 0.04 if mode == "flex" else 0.5
    kw = dict(last_q=16, mode=mode, top_p=top_p)
    pat = vertical_slash_pattern(
        q, k, vertical_size=12, slash_size=10, sink_tokens=3, window=4, **kw
    )
    v, s = _np_estimate(
        q, k, v_size=12, s_size=10, last_q=16, mode=mode, sinks=3, window=4, top_p=top_p
    )
    np.testing.assert_array_equal(np.asarray(pat.vertical_idx), v)
    np.testing.assert_array_equal(np.asarray(pat.slash_idx), s)
    if mode == "flex":  # budgets differ per head and stay under the cap
        assert (np.asarray(pat.vertical_idx) == -1).any()


@pytest.mark.parametrize("mode", ["fixed", "flex"])
def test_sharded_estimation_equals_local(mode):
    mesh = Mesh(np.array(jax.devices()[:8]), ("sp",))
    q, k, _ = _qkv(jax.random.key(2), 1, 512, 4, 2, 16)
    kw = dict(vertical_size=40, slash_size=30, last_q=32, mode=mode, sink_tokens=5, window=8)
    local = vertical_slash_pattern(q, k, **kw)
    sharded = jax.jit(lambda q, k: vertical_slash_pattern(q, k, mesh=mesh, axis_name="sp", **kw))(
        q, k
    )
    np.testing.assert_array_equal(np.asarray(sharded.vertical_idx), np.asarray(local.vertical_idx))
    np.testing.assert_array_equal(np.asarray(sharded.slash_idx), np.asarray(local.slash_idx))


def test_estimation_has_no_gradient_and_bad_input_errors():
    q, k, _ = _qkv(jax.random.key(3), 1, 128, 2, 2, 8)
    g = jax.grad(
        lambda q: (
            vertical_slash_pattern(q, k, vertical_size=8, slash_size=8, last_q=16)
            .vertical_idx.sum()
            .astype(float)
        )
    )(q)
    assert not np.asarray(g).any()
    with pytest.raises(ValueError, match="mode"):
        vertical_slash_pattern(q, k, vertical_size=8, slash_size=8, mode="nope")
    with pytest.raises(ValueError, match="vertical_size"):
        vertical_slash_pattern(q, k, vertical_size=0, slash_size=8)
    with pytest.raises(ValueError, match="last_q"):
        vertical_slash_pattern(q, k, vertical_size=8, slash_size=8, last_q=256)


def test_reference_equals_float64_masked_softmax():
    t, g = 64, 8
    q, k, v = _qkv(jax.random.key(4), 2, t, 4, 2, 8)
    pat = pattern_from_budgets(jax.random.key(5), 2, 4, t, vertical_size=6, slash_size=3, fill=0.0)
    # one head with nothing at all: only its empty rows (none: the diagonal of block 0 isn't forced)
    pat = VerticalSlashPattern(pat.vertical_idx.at[0, 0].set(-1), pat.slash_idx.at[0, 0].set(-1))
    out, lse = sparse_attention_reference(q, k, v, pat, block_size=g)
    mask = _np_mask(pat, t, g)
    q64, k64, v64 = (np.asarray(a, np.float64) for a in (q, k, v))
    k64, v64 = np.repeat(k64, 2, axis=2), np.repeat(v64, 2, axis=2)
    s = np.einsum("bqhd,bkhd->bhqk", q64, k64) / np.sqrt(8)
    s = np.where(mask, s, -np.inf)
    with np.errstate(invalid="ignore", divide="ignore"):
        m = s.max(-1, keepdims=True)
        e = np.where(mask, np.exp(s - np.where(np.isfinite(m), m, 0)), 0)
        ref_lse = np.log(e.sum(-1)) + np.where(np.isfinite(m[..., 0]), m[..., 0], 0)
        p = np.nan_to_num(e / e.sum(-1, keepdims=True))
    ref = np.einsum("bhqk,bkhd->bqhd", p, v64)
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5)
    np.testing.assert_allclose(np.asarray(lse), ref_lse, atol=1e-5)
    assert np.isneginf(np.asarray(lse)[0, 0]).all() and not np.asarray(out)[0, :, 0].any()


def _np_plan(pattern, layout, t, w, g):
    """Brute-force block lists and bars per (device, step)."""
    blocks = layouts.layout_blocks(layout, t // g, w)
    v = np.asarray(pattern.vertical_idx)
    s = np.asarray(pattern.slash_idx)
    out = {}
    for r, step in itertools.product(range(w), range(w)):
        src = layouts.ring_source(r, step, w, 2 if layout == "hierarchical" else None)
        for bi, hi in itertools.product(range(v.shape[0]), range(v.shape[1])):
            dists = s[bi, hi][s[bi, hi] >= 0]
            verts = sorted(v[bi, hi][v[bi, hi] >= 0].tolist())
            for i, qb in enumerate(blocks[r]):

                def act(kb, qb=qb, dists=dists):
                    delta = qb - kb
                    return kb <= qb and np.any(
                        ((delta - 1) * g < dists) & (dists < (delta + 1) * g)
                    )

                blk = [j for j, kb in enumerate(blocks[src]) if act(kb)]
                bars = [
                    list(blocks[src]).index(c // g) * g + c % g
                    for c in verts
                    if c // g in blocks[src] and c // g <= qb and not act(c // g)
                ]
                out[r, step, bi, hi, i] = (src, blk, bars)
    return out


def _plan(pat, blocks, rank, src, t, g):
    """The step plan of device ``rank`` holding device ``src``'s keys (2 heads, bar tiles of 4)."""
    return layouts.step_plan(
        pat,
        jnp.asarray(blocks[rank]),
        jnp.asarray(blocks[src]),
        num_blocks=t // g,
        block_size=g,
        batch_heads=(1, 2),
        bar_block=4,
    )


@pytest.mark.parametrize("layout", layouts.LAYOUTS)
def test_step_plans_match_brute_force(layout):
    t, g, w = 128, 8, 4
    pat = pattern_from_budgets(
        jax.random.key(6),
        1,
        2,
        t,
        vertical_size=10,
        slash_size=5,
        sink_tokens=2,
        window=3,
        fill=0.5,
    )
    blocks = layouts.layout_blocks(layout, t // g, w)
    assert sorted(blocks.reshape(-1).tolist()) == list(range(t // g))
    expected = _np_plan(pat, layout, t, w, g)
    inner = 2 if layout == "hierarchical" else None
    for r, step in itertools.product(range(w), range(w)):
        src = int(layouts.ring_source(r, step, w, inner))
        plan = _plan(pat, blocks, r, src, t, g)
        for hi, i in itertools.product(range(2), range(blocks.shape[1])):
            e_src, e_blk, e_bars = expected[r, step, 0, hi, i]
            assert e_src == src
            cnt = int(plan.block_cnt[0, hi, i])
            assert np.asarray(plan.block_idx[0, hi, i, :cnt]).tolist() == e_blk
            bcnt = int(plan.bar_cnt[0, hi, i])
            assert np.asarray(plan.bar_idx[0, hi, i, :bcnt]).tolist() == e_bars


def test_every_step_of_a_ring_covers_the_mask_once():
    """Union over ring steps of the step masks, mapped back to global order, is the global mask."""
    t, g, w = 128, 8, 4
    pat = pattern_from_budgets(jax.random.key(7), 1, 2, t, vertical_size=9, slash_size=4, fill=0.0)
    full = np.asarray(sparse_mask(pat, t, g))
    for layout in layouts.LAYOUTS:
        blocks = layouts.layout_blocks(layout, t // g, w)
        got = np.zeros_like(full, dtype=int)
        for r, src in itertools.product(range(w), range(w)):
            plan = _plan(pat, blocks, r, src, t, g)
            m = np.asarray(layouts.step_mask(plan, g))
            qpos = (blocks[r][:, None] * g + np.arange(g)).reshape(-1)
            kpos = (blocks[src][:, None] * g + np.arange(g)).reshape(-1)
            got[:, :, qpos[:, None], kpos[None, :]] += m
        np.testing.assert_array_equal(got, full.astype(int), err_msg=layout)


def test_layout_errors_and_permutation_round_trip():
    with pytest.raises(ValueError, match="multiple of"):
        layouts.token_permutation("zigzag", 96, 4, 8)
    with pytest.raises(ValueError, match="unknown ring layout"):
        layouts.token_permutation("spiral", 128, 4, 8)
    for layout in layouts.LAYOUTS:
        perm = layouts.token_permutation(layout, 128, 4, 8)
        assert sorted(perm.tolist()) == list(range(128))
