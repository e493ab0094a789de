"""Vertical-slash sparse attention (MTraining / MInference): pattern estimation and the jnp reference.

A :class:`VerticalSlashPattern` holds, per batch row and query head, a set of key columns that every
later query sees ("verticals") and a set of query-key distances ("slashes"). At block size G the mask
is (DESIGN.md §3): key k is visible to query q iff k <= q and either k is a selected vertical, or the
block diagonal δ = q//G − k//G is active, where δ is active iff some selected distance d satisfies
(δ−1)·G < d < (δ+1)·G. So the whole slash part is one boolean vector ``active[δ]`` per head.

Letters: B batch, T tokens, H query heads, K key/value heads, D head dim, L last queries, N blocks.
"""

from __future__ import annotations

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from jaxlab.mesh import shard_inputs

__all__ = [
    "VerticalSlashPattern",
    "vertical_slash_pattern",
    "active_diagonals",
    "sparse_mask",
    "sparse_attention_reference",
    "pattern_from_budgets",
    "ESTIMATION_MODES",
]

ESTIMATION_MODES = ("fixed", "flex")


@functools.partial(
    jax.tree_util.register_dataclass, data_fields=["vertical_idx", "slash_idx"], meta_fields=[]
)
@dataclasses.dataclass(frozen=True)
class VerticalSlashPattern:
    """Selected verticals and slashes, per batch row and query head; entries past a head's budget are -1.

    vertical_idx: ``[B, H, v]`` int32 key positions (natural token order), ascending, -1 padded.
    slash_idx: ``[B, H, s]`` int32 distances q_pos − k_pos >= 0, ascending, -1 padded.
    """

    vertical_idx: jax.Array
    slash_idx: jax.Array


def _check_qk(q, k, name):
    chex.assert_rank([q, k], 4)
    if q.shape[0] != k.shape[0] or q.shape[1] != k.shape[1] or q.shape[3] != k.shape[3]:
        raise ValueError(f"{name}: q {q.shape} and k {k.shape} need equal B, T and D")
    if q.shape[2] % k.shape[2]:
        raise ValueError(
            f"{name}: query heads {q.shape[2]} not a multiple of kv heads {k.shape[2]}"
        )


def active_diagonals(slash_idx: jax.Array, num_blocks: int, block_size: int) -> jax.Array:
    """``[..., s]`` distances → ``[..., N]`` bool: block diagonal δ is active iff some d is in
    ((δ−1)G, (δ+1)G), i.e. δ = d//G, and also d//G + 1 when d is not a multiple of G."""
    g = block_size
    valid = slash_idx >= 0
    d = jnp.where(valid, slash_idx, 0)
    lead = slash_idx.shape[:-1]
    first = jnp.where(valid, d // g, num_blocks)  # out of range → dropped
    second = jnp.where(valid & (d % g != 0), d // g + 1, num_blocks)
    flat_first = first.reshape(-1, first.shape[-1])
    flat_second = second.reshape(-1, second.shape[-1])
    rows = jnp.arange(flat_first.shape[0])[:, None]
    out = jnp.zeros((flat_first.shape[0], num_blocks + 1), bool)
    out = out.at[rows, flat_first].set(True).at[rows, flat_second].set(True)
    return out[:, :num_blocks].reshape(*lead, num_blocks)


def sparse_mask(
    pattern: VerticalSlashPattern | None,
    seq_len: int,
    block_size: int = 128,
    batch_heads: tuple[int, int] | None = None,
) -> jax.Array:
    """The boolean ``[B, H, T, T]`` mask of a pattern (``None``: dense causal, shape [1, 1, T, T])."""
    t = seq_len
    pos = jnp.arange(t)
    causal = pos[:, None] >= pos[None, :]
    if pattern is None:
        shape = (1, 1) if batch_heads is None else batch_heads
        return jnp.broadcast_to(causal, (*shape, t, t))
    nb = -(-t // block_size)
    active = active_diagonals(pattern.slash_idx, nb, block_size)  # [B, H, N]
    blk = pos // block_size
    delta = blk[:, None] - blk[None, :]
    slash = jnp.take_along_axis(
        active[:, :, None, :], jnp.clip(delta, 0, nb - 1)[None, None], axis=-1
    ) & (delta >= 0)
    v = pattern.vertical_idx
    vert_cols = jnp.zeros((*v.shape[:2], t + 1), bool)
    b_i = jnp.arange(v.shape[0])[:, None, None]
    h_i = jnp.arange(v.shape[1])[None, :, None]
    vert_cols = vert_cols.at[b_i, h_i, jnp.where(v >= 0, v, t)].set(True)[..., :t]
    return causal & (slash | vert_cols[:, :, None, :])


def sparse_attention_reference(
    q: jax.Array,  # [B, T, H, D]
    k: jax.Array,  # [B, T, K, D]
    v: jax.Array,  # [B, T, K, D]
    pattern: VerticalSlashPattern | None,
    *,
    block_size: int = 128,
    causal: bool = True,
    scale: float | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Masked attention in plain jnp (float32 softmax): ``(out [B, T, H, D], lse [B, H, T])``.

    ``pattern=None`` is dense (causal or not). Rows that see nothing give out 0 and lse −inf.
    """
    _check_qk(q, k, "sparse_attention_reference")
    b, t, h, d = q.shape
    kv_heads = k.shape[2]
    scale = d**-0.5 if scale is None else scale
    if pattern is None:
        mask = sparse_mask(None, t, block_size) if causal else jnp.ones((1, 1, t, t), bool)
    else:
        if not causal:
            raise ValueError("sparse_attention_reference: vertical-slash patterns are causal")
        mask = sparse_mask(pattern, t, block_size)
    kr = jnp.repeat(k, h // kv_heads, axis=2)
    vr = jnp.repeat(v, h // kv_heads, axis=2)
    s = jnp.einsum("bqhd,bkhd->bhqk", q, kr, preferred_element_type=jnp.float32) * scale
    s = jnp.where(mask, s, -jnp.inf)
    lse = jax.nn.logsumexp(s, axis=-1)
    p = jnp.exp(s - jnp.where(jnp.isfinite(lse), lse, 0.0)[..., None])
    out = jnp.einsum("bhqk,bkhd->bqhd", p, vr.astype(jnp.float32))
    return out.astype(q.dtype), lse


# ----------------------------------------------------------------------------- estimation


def _logits(last_q, k_local, key_offset, seq_len, scale):
    """Scaled logits of the last L queries against a key chunk: ``x [B, H, L, Tl]``, ``visible [L, Tl]``."""
    b, lq, h, d = last_q.shape
    tl, kv_heads = k_local.shape[1], k_local.shape[2]
    qg = last_q.reshape(b, lq, kv_heads, h // kv_heads, d)
    x = jnp.einsum("blkgd,btkd->bkglt", qg, k_local, preferred_element_type=jnp.float32)
    q_pos = seq_len - lq + jnp.arange(lq)
    k_pos = key_offset + jnp.arange(tl)
    return x.reshape(b, h, lq, tl) * scale, q_pos[:, None] >= k_pos[None, :]


def _column_and_diagonal_sums(x):
    """``x [B, H, L, Tl]`` → column sums ``[B, H, Tl]`` and diagonal sums ``[B, H, Tl + L − 1]``.

    Diagonal entry e holds Σ_a x[a, Tl − 1 − (e − a)]: keys reversed, row a shifted right by a (pad,
    flatten, re-stride), so e runs over increasing distance q_pos − k_pos.
    """
    b, h, lq, tl = x.shape
    y = jnp.pad(x[..., ::-1], ((0, 0), (0, 0), (0, 0), (0, lq)))
    flat = y.reshape(b, h, lq * (tl + lq))[..., : lq * (tl + lq - 1)]
    return x.sum(axis=2), flat.reshape(b, h, lq, tl + lq - 1).sum(axis=2)


def _select(scores, cap, mode, top_p, candidates_idx=None):
    """Top-``cap`` indices by score; in flex mode only the smallest prefix whose mass reaches p."""
    vals, pos = jax.lax.top_k(scores, cap)
    idx = pos if candidates_idx is None else jnp.take_along_axis(candidates_idx, pos, axis=-1)
    if mode == "flex":
        idx = jnp.where(jnp.cumsum(vals, axis=-1) - vals < top_p, idx, -1)
    return idx.astype(jnp.int32)


def _sort_pad(idx):
    """Ascending with -1 entries moved to the end."""
    big = jnp.iinfo(jnp.int32).max
    s = jnp.sort(jnp.where(idx >= 0, idx, big), axis=-1)
    return jnp.where(s == big, -1, s).astype(jnp.int32)


def _estimate(
    q,
    k,
    *,
    vertical_size,
    slash_size,
    last_q,
    mode,
    sink_tokens,
    window,
    top_p,
    scale,
    axis_name=None,
):
    """Pattern from the last ``last_q`` queries; with ``axis_name`` q/k are contiguous sequence shards."""
    b, t_local, h, _ = q.shape
    if axis_name is None:
        rank, world = 0, 1
        last = q[:, t_local - last_q :]
    else:
        rank, world = jax.lax.axis_index(axis_name), jax.lax.axis_size(axis_name)
        last = jax.lax.all_gather(q[:, t_local - last_q :], axis_name)[-1]  # the last shard's rows
    t = t_local * world
    offset = rank * t_local
    x, visible = _logits(last, k, offset, t, scale)
    if mode == "flex":  # global softmax per row, then / L: the total mass of a head is 1
        row_max = jnp.max(jnp.where(visible, x, -jnp.inf), axis=-1)
        if axis_name is not None:
            row_max = jax.lax.pmax(row_max, axis_name)
        x = jnp.where(visible, jnp.exp(x - row_max[..., None]), 0.0)
        row_sum = x.sum(axis=-1)
        if axis_name is not None:
            row_sum = jax.lax.psum(row_sum, axis_name)
        x = x / (row_sum[..., None] * last_q)
    else:  # raw scaled logits; hidden pairs contribute nothing
        x = jnp.where(visible, x, 0.0)
    cols, diag = _column_and_diagonal_sums(x)
    # the chunk's diagonals cover distances start .. start + Tl + L − 2; place them on the global
    # axis of distances −(L − 1) .. T − 1 and sum over shards
    start = t - last_q - offset - t_local + 1
    slash = jnp.zeros((b, h, t + last_q - 1), jnp.float32)
    slash = jax.lax.dynamic_update_slice_in_dim(slash, diag, start + last_q - 1, axis=2)
    if axis_name is not None:
        slash = jax.lax.psum(slash, axis_name)
    slash = slash[..., last_q - 1 :]
    if mode == "fixed":  # forced attention sinks and local window
        k_pos = offset + jnp.arange(t_local)
        cols = jnp.where((k_pos < sink_tokens)[None, None], jnp.inf, cols)
        slash = jnp.where((jnp.arange(t) < window)[None, None], jnp.inf, slash)
    v_cap, s_cap = min(t, vertical_size), min(t, slash_size)
    # verticals: the top-k of the union of each shard's top-k is the global top-k
    c_vals, c_pos = jax.lax.top_k(cols, min(v_cap, t_local))
    c_idx = (c_pos + offset).astype(jnp.int32)
    if axis_name is not None:
        c_vals = jnp.moveaxis(jax.lax.all_gather(c_vals, axis_name), 0, 2).reshape(b, h, -1)
        c_idx = jnp.moveaxis(jax.lax.all_gather(c_idx, axis_name), 0, 2).reshape(b, h, -1)
    vertical = _select(c_vals, v_cap, mode, top_p, c_idx)
    return VerticalSlashPattern(_sort_pad(vertical), _sort_pad(_select(slash, s_cap, mode, top_p)))


def vertical_slash_pattern(
    q: jax.Array,  # [B, T, H, D]
    k: jax.Array,  # [B, T, K, D]
    *,
    vertical_size: int,
    slash_size: int,
    last_q: int = 64,
    mode: str = "fixed",
    sink_tokens: int = 30,
    window: int = 100,
    top_p: float = 0.9,
    scale: float | None = None,
    mesh: jax.sharding.Mesh | None = None,
    axis_name: str | tuple[str, ...] | None = None,
) -> VerticalSlashPattern:
    """Estimate a per-head vertical-slash pattern from the last ``last_q`` queries (no gradient).

    Modes (MTraining's two configurations):
      * ``"fixed"``: raw scaled logits of the last queries are summed per key column (verticals) and per
        diagonal (slashes); the first ``sink_tokens`` columns and the ``window`` nearest diagonals are
        forced in; budgets are ``vertical_size`` / ``slash_size`` (capped at T).
      * ``"flex"``: a softmax over all keys per row, normalized so each head's mass is 1; each head
        keeps the fewest top columns (diagonals) whose mass reaches ``top_p``, at most
        ``vertical_size`` (``slash_size``); nothing is forced.

    With ``mesh`` and ``axis_name`` the estimate runs under ``jax.shard_map`` with the sequence split
    contiguously over that axis (psum of diagonal partials, exact top-k of local top-k candidates) and
    equals the single-device result.
    """
    _check_qk(q, k, "vertical_slash_pattern")
    if mode not in ESTIMATION_MODES:
        raise ValueError(
            f"vertical_slash_pattern: mode must be one of {ESTIMATION_MODES}, got {mode!r}"
        )
    for name, val in (
        ("vertical_size", vertical_size),
        ("slash_size", slash_size),
        ("last_q", last_q),
    ):
        if not isinstance(val, int | np.integer) or val < 1:
            raise ValueError(f"vertical_slash_pattern: {name} must be a positive int, got {val!r}")
    if mode == "flex" and not 0.0 < top_p <= 1.0:
        raise ValueError(f"vertical_slash_pattern: top_p must be in (0, 1], got {top_p}")
    q, k = jax.lax.stop_gradient(q), jax.lax.stop_gradient(k)
    kw = dict(
        vertical_size=vertical_size,
        slash_size=slash_size,
        last_q=last_q,
        mode=mode,
        sink_tokens=sink_tokens,
        window=window,
        top_p=top_p,
        scale=q.shape[-1] ** -0.5 if scale is None else scale,
    )
    if mesh is None:
        if last_q > q.shape[1]:
            raise ValueError(f"vertical_slash_pattern: last_q={last_q} exceeds T={q.shape[1]}")
        return _estimate(q, k, **kw)
    if axis_name is None:
        raise ValueError("vertical_slash_pattern: a mesh needs axis_name (the sequence axis)")
    world = int(np.prod([mesh.shape[a] for a in np.atleast_1d(axis_name)]))
    if q.shape[1] % world or q.shape[1] // world < last_q:
        raise ValueError(
            f"vertical_slash_pattern: T={q.shape[1]} must split into {world} shards of at least "
            f"last_q={last_q} tokens"
        )
    fn = jax.jit(
        jax.shard_map(
            functools.partial(_estimate, axis_name=axis_name, **kw),
            mesh=mesh,
            in_specs=(P(None, axis_name), P(None, axis_name)),
            out_specs=P(),
            check_vma=False,
        )
    )
    return fn(*shard_inputs(mesh, P(None, axis_name), q, k))


def pattern_from_budgets(
    key: jax.Array,
    batch: int,
    heads: int,
    seq_len: int,
    *,
    vertical_size: int,
    slash_size: int,
    sink_tokens: int = 0,
    window: int = 0,
    fill: float = 1.0,
) -> VerticalSlashPattern:
    """A random pattern (tests and benchmarks): distinct verticals and distances drawn uniformly,
    the first ``sink_tokens`` columns and ``window`` distances always in; each head keeps a random
    share in [fill, 1] of its budget (the rest is -1)."""
    kv, ks, kf1, kf2 = jax.random.split(key, 4)

    def draw(key, n, size, forced, fkey):
        scores = jax.random.uniform(key, (batch, heads, n))
        scores = jnp.where(jnp.arange(n) < forced, 2.0, scores)
        _, idx = jax.lax.top_k(scores, size)
        keep = jnp.arange(size) < jnp.ceil(
            size * jax.random.uniform(fkey, (batch, heads, 1), minval=fill, maxval=1.0)
        )
        keep = keep | (jnp.arange(size) < forced)
        return _sort_pad(jnp.where(keep, idx, -1))

    return VerticalSlashPattern(
        draw(kv, seq_len, min(vertical_size, seq_len), sink_tokens, kf1),
        draw(ks, seq_len, min(slash_size, seq_len), window, kf2),
    )
