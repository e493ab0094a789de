"""Ring attention over ``jax.shard_map``: dense or vertical-slash sparse, four sequence layouts.

Each device keeps its query chunk; key/value chunks travel the ring with ``lax.ppermute`` (the loop is
unrolled in Python so XLA can overlap each transfer with the previous step's compute). Every step adds
the attention against the chunk in hand to a float32 running (out, lse) by log-sum-exp merging. The
backward (``custom_vjp``) runs the ring again: dq accumulates in place while dK/dV accumulators travel
with their chunk and arrive home after the last step.

Layouts (``jaxlab.attention.layouts``): ``contiguous``, ``zigzag``, ``striped`` (block-striped: every
device does about the same work at every step for Toeplitz slash patterns) and ``hierarchical``: two
mesh axes (outer, inner); the outer transfer of a chunk is issued before the inner ring over it runs,
so one slow inter-node transfer hides behind ``inner`` compute steps.

``vertical_mode="gathered"`` (beyond MTraining) gathers the selected vertical columns' K/V once before
the ring and attends to them locally, so no vertical work is left inside the ring.

Letters: B batch, T tokens, H query heads, K key/value heads, D head dim, V vertical capacity.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import chex
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from jaxlab.attention import layouts
from jaxlab.attention.dense import AttentionImplementation
from jaxlab.attention.sparse import (
    ESTIMATION_MODES,
    VerticalSlashPattern,
    active_diagonals,
    vertical_slash_pattern,
)
from jaxlab.config import check, from_dict
from jaxlab.errors import UserError
from jaxlab.mesh import shard_inputs
from jaxlab.registry import Registry
from pallas_kernels.block_sparse_attention import (
    block_sparse_attention_bwd,
    block_sparse_attention_bwd_reference,
    block_sparse_attention_fwd,
    block_sparse_attention_fwd_reference,
    merge_partial,
)

__all__ = [
    "ring_attention",
    "RingConfig",
    "SparseConfig",
    "RingKernel",
    "RING_IMPLEMENTATIONS",
    "VERTICAL_MODES",
    "RING_ATTENTION",
]


@dataclasses.dataclass(frozen=True)
class RingKernel:
    """The work of one ring step. ``fwd(ring, q, k, v, plan, o, lse) -> (o, lse)`` adds the chunk
    in hand to the running float32 (out, lse); ``bwd(ring, q, k, v, lse, do, delta, plan) ->
    (dq, dk, dv)`` is that step's gradient."""

    fwd: Callable
    bwd: Callable


RING_IMPLEMENTATIONS: Registry[RingKernel] = Registry("ring attention implementation")
# How the selected vertical columns are attended: fn(ring, q, k, v, pattern) -> (out, lse)
VERTICAL_MODES: Registry[Callable] = Registry("vertical mode")


@dataclasses.dataclass(frozen=True)
class _Ring:
    """Static description of one ring (hashable: it is a non-differentiable custom_vjp argument)."""

    outer_axis: str | None
    inner_axis: str
    outer: int
    inner: int
    blocks: tuple[tuple[int, ...], ...]  # [W][n] global block ids per device
    num_blocks: int
    block_size: int
    causal: bool
    implementation: str
    interpret: bool | None
    scale: float
    block_k: int | None
    bar_block: int

    @property
    def world(self):
        return self.outer * self.inner

    def rank(self):
        inner = jax.lax.axis_index(self.inner_axis)
        if self.outer_axis is None:
            return inner
        return jax.lax.axis_index(self.outer_axis) * self.inner + inner

    def plan(self, pattern, rank, step, batch_heads):
        table = jnp.asarray(np.asarray(self.blocks, np.int32))
        src = layouts.ring_source(rank, step, self.world, self.inner if self.outer > 1 else None)
        return layouts.step_plan(
            pattern,
            table[rank],
            table[src],
            num_blocks=self.num_blocks,
            block_size=self.block_size,
            batch_heads=batch_heads,
            causal=self.causal,
            bar_block=self.bar_block,
        )

    def shift(self, x, axis, size):
        return jax.lax.ppermute(x, axis, [(i, (i + 1) % size) for i in range(size)])

    def fwd_step(self, q, k, v, plan, o, lse):
        return RING_IMPLEMENTATIONS.get(self.implementation).fwd(self, q, k, v, plan, o, lse)

    def bwd_step(self, q, k, v, lse, do, delta, plan):
        return RING_IMPLEMENTATIONS.get(self.implementation).bwd(
            self, q, k, v, lse, do, delta, plan
        )


def _pallas_fwd(ring: _Ring, q, k, v, plan, o, lse):
    return block_sparse_attention_fwd(
        q,
        k,
        v,
        plan,
        block_size=ring.block_size,
        scale=ring.scale,
        causal=ring.causal,
        o_prev=o,
        lse_prev=lse,
        block_k=ring.block_k,
        interpret=ring.interpret,
    )


def _pallas_bwd(ring: _Ring, q, k, v, lse, do, delta, plan):
    return block_sparse_attention_bwd(
        q,
        k,
        v,
        lse,
        do,
        delta,
        plan,
        block_size=ring.block_size,
        scale=ring.scale,
        causal=ring.causal,
        block_q=ring.block_k,
        block_k=ring.block_k,
        interpret=ring.interpret,
    )


def _xla_fwd(ring: _Ring, q, k, v, plan, o, lse):
    o_s, lse_s = block_sparse_attention_fwd_reference(
        q, k, v, plan, block_size=ring.block_size, scale=ring.scale, causal=ring.causal
    )
    o, lse_t = merge_partial(o, jnp.swapaxes(lse, 1, 2), o_s, jnp.swapaxes(lse_s, 1, 2))
    return o, jnp.swapaxes(lse_t, 1, 2)


def _xla_bwd(ring: _Ring, q, k, v, lse, do, delta, plan):
    kw = dict(block_size=ring.block_size, scale=ring.scale, causal=ring.causal)
    return block_sparse_attention_bwd_reference(q, k, v, lse, do, delta, plan, **kw)


RING_IMPLEMENTATIONS.register("pallas", RingKernel(_pallas_fwd, _pallas_bwd))
RING_IMPLEMENTATIONS.register("xla", RingKernel(_xla_fwd, _xla_bwd))


def _ring_loop(ring: _Ring, kv, body):
    """Run ``body(step, kv)`` over all ring steps; chunks travel inner rings inside outer steps.

    The outer transfer of the chunk held at the start of an outer step is issued first, then the inner
    ring runs over that chunk.
    """
    for so in range(ring.outer):
        nxt_outer = None
        if so < ring.outer - 1:
            nxt_outer = ring.shift(kv, ring.outer_axis, ring.outer)
        kv_in = kv
        for si in range(ring.inner):
            nxt = ring.shift(kv_in, ring.inner_axis, ring.inner) if si < ring.inner - 1 else None
            body(so * ring.inner + si, kv_in)
            kv_in = nxt
        kv = nxt_outer


def _fwd(ring, q, k, v, pattern):
    b, t, h, d = q.shape
    rank = ring.rank()
    state = {"o": jnp.zeros((b, t, h, d), jnp.float32), "lse": jnp.full((b, h, t), -jnp.inf)}

    def body(step, kv):
        plan = ring.plan(pattern, rank, step, (b, h))
        state["o"], state["lse"] = ring.fwd_step(q, *kv, plan, state["o"], state["lse"])

    _ring_loop(ring, (k, v), body)
    return state["o"], state["lse"]


def _bwd(ring, q, k, v, pattern, o, lse, do, dlse):
    b, t, h, d = q.shape
    rank = ring.rank()
    delta = jnp.einsum("bqhd,bqhd->bhq", o, do.astype(jnp.float32)) - dlse
    dq = jnp.zeros(q.shape, jnp.float32)
    zeros = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
    kv, dkv_outer = (k, v), zeros
    for so in range(ring.outer):
        nxt_outer = ring.shift(kv, ring.outer_axis, ring.outer) if so < ring.outer - 1 else None
        kv_in, dkv_in = kv, zeros
        for si in range(ring.inner):
            plan = ring.plan(pattern, rank, so * ring.inner + si, (b, h))
            dq_s, dk_s, dv_s = ring.bwd_step(q, *kv_in, lse, do, delta, plan)
            dq = dq + dq_s
            dkv_in = (dkv_in[0] + dk_s, dkv_in[1] + dv_s)
            if si < ring.inner - 1:
                kv_in = ring.shift(kv_in, ring.inner_axis, ring.inner)
            if ring.inner > 1:  # dK/dV travel with their chunk; the last shift takes them home
                dkv_in = ring.shift(dkv_in, ring.inner_axis, ring.inner)
        dkv_outer = (dkv_outer[0] + dkv_in[0], dkv_outer[1] + dkv_in[1])
        if ring.outer > 1:
            dkv_outer = ring.shift(dkv_outer, ring.outer_axis, ring.outer)
        kv = nxt_outer
    return dq, dkv_outer[0], dkv_outer[1]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ring_attention_local(ring, q, k, v, pattern):
    return _fwd(ring, q, k, v, pattern)


def _ring_attention_local_fwd(ring, q, k, v, pattern):
    o, lse = _fwd(ring, q, k, v, pattern)
    return (o, lse), (q, k, v, pattern, o, lse)


def _ring_attention_local_bwd(ring, res, cts):
    q, k, v, pattern, o, lse = res
    do, dlse = cts
    dq, dk, dv = _bwd(ring, q, k, v, pattern, o, lse, do, dlse)
    zero_pattern = (
        None
        if pattern is None
        else jax.tree.map(lambda x: np.zeros(x.shape, jax.dtypes.float0), pattern)
    )
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), zero_pattern


_ring_attention_local.defvjp(_ring_attention_local_fwd, _ring_attention_local_bwd)


def _gathered_verticals(ring, q, k, v, pattern):
    """Attention to the selected vertical columns outside active blocks, from K/V gathered once.

    Each column's K/V rows come from the one device holding it (a psum of one-hot contributions);
    returns the partial (out [B, T, H, D] f32, lse [B, H, T]) to start the ring from. Differentiable.
    """
    b, t, h, d = q.shape
    g, nb = ring.block_size, ring.num_blocks
    rank = ring.rank()
    table = jnp.asarray(np.asarray(ring.blocks, np.int32))
    owner = (
        jnp.zeros((nb,), jnp.int32)
        .at[table.reshape(-1)]
        .set(jnp.repeat(jnp.arange(ring.world, dtype=jnp.int32), table.shape[1]))
    )
    local_of = (
        jnp.zeros((nb,), jnp.int32)
        .at[table.reshape(-1)]
        .set(jnp.tile(jnp.arange(table.shape[1], dtype=jnp.int32), ring.world))
    )
    vert = pattern.vertical_idx  # [B, H, V]
    valid = vert >= 0
    vb = jnp.where(valid, vert // g, 0)
    mine = valid & (owner[vb] == rank)
    col = local_of[vb] * g + jnp.where(valid, vert % g, 0)
    grp = h // k.shape[2]
    head_kv = jnp.arange(h) // grp
    bi = jnp.arange(b)[:, None, None]
    kbar = jnp.where(mine[..., None], k[bi, col, head_kv[None, :, None]], 0)  # [B, H, V, D]
    vbar = jnp.where(mine[..., None], v[bi, col, head_kv[None, :, None]], 0)
    axes = ring.inner_axis if ring.outer_axis is None else (ring.outer_axis, ring.inner_axis)
    kbar, vbar = jax.lax.psum((kbar, vbar), axes)
    active = active_diagonals(pattern.slash_idx, nb, g)  # [B, H, N]
    q_blk = table[rank]
    q_pos = (q_blk[:, None] * g + jnp.arange(g)).reshape(-1)  # [T]
    delta = q_blk.repeat(g)[None, None, :, None] - vb[:, :, None, :]  # [B, H, T, V]
    covered = jnp.take_along_axis(
        active[:, :, None, :], jnp.clip(delta, 0, nb - 1).reshape(b, h, 1, -1), axis=-1
    ).reshape(delta.shape)
    ok = valid[:, :, None, :] & (q_pos[None, None, :, None] >= vert[:, :, None, :]) & ~covered
    s = jnp.einsum("bqhd,bhvd->bhqv", q, kbar, preferred_element_type=jnp.float32) * ring.scale
    s = jnp.where(ok, s, -jnp.inf)
    lse = jax.nn.logsumexp(s, axis=-1)
    p = jnp.exp(s - jnp.where(jnp.isneginf(lse), 0.0, lse)[..., None])
    out = jnp.einsum("bhqv,bhvd->bqhd", p, vbar.astype(jnp.float32))
    return out, lse


@VERTICAL_MODES.register("ring")
def _verticals_in_ring(ring, q, k, v, pattern):
    """Vertical columns are attended inside each ring step, as bars of the chunk that holds them."""
    o, lse = _ring_attention_local(ring, q, k, v, pattern)
    return o.astype(q.dtype), lse


@VERTICAL_MODES.register("gathered")
def _verticals_gathered(ring, q, k, v, pattern):
    """Vertical columns' K/V are gathered once before the ring; the ring does blocks only."""
    if pattern is None:
        return _verticals_in_ring(ring, q, k, v, None)
    o0, lse0 = _gathered_verticals(ring, q, k, v, pattern)
    blocks_only = VerticalSlashPattern(
        jnp.full_like(pattern.vertical_idx[..., :1], -1), pattern.slash_idx
    )
    o1, lse1 = _ring_attention_local(ring, q, k, v, blocks_only)
    o, lse_t = merge_partial(o0, jnp.swapaxes(lse0, 1, 2), o1, jnp.swapaxes(lse1, 1, 2))
    return o.astype(q.dtype), jnp.swapaxes(lse_t, 1, 2)


def ring_attention(
    q: jax.Array,  # [B, T, H, D], natural token order
    k: jax.Array,  # [B, T, K, D]
    v: jax.Array,  # [B, T, K, D]
    *,
    mesh: jax.sharding.Mesh | None = None,
    axis_name: str | tuple[str, str] = "sp",
    layout: str = "striped",
    pattern: VerticalSlashPattern | None = None,
    causal: bool = True,
    block_size: int = 128,
    implementation: str = "pallas",
    interpret: bool | None = None,
    scale: float | None = None,
    vertical_mode: str = "ring",
    block_k: int | None = None,
    bar_block: int = 64,
    return_lse: bool = False,
):
    """Sequence-parallel attention over the mesh axis ``axis_name`` (``(outer, inner)`` for
    ``layout="hierarchical"``). Inputs and output are in natural token order; the permutation to the
    layout happens here. ``mesh=None`` takes the mesh set with ``jax.set_mesh``. ``pattern=None`` is
    dense. Returns out ``[B, T, H, D]`` (and lse
    ``[B, H, T]`` float32 with ``return_lse``). Differentiable in q, k, v; the pattern is fixed.
    """
    chex.assert_rank([q, k, v], 4)
    chex.assert_equal_shape([k, v])
    b, t, h, d = q.shape
    if k.shape[:2] != (b, t) or k.shape[3] != d or h % k.shape[2]:
        raise ValueError(
            f"ring_attention: q {q.shape} and k/v {k.shape} do not match (GQA needs "
            "query heads a multiple of kv heads)"
        )
    RING_IMPLEMENTATIONS.get(implementation)  # unknown names: an error listing the known ones
    attend = VERTICAL_MODES.get(vertical_mode)
    spec = layouts.LAYOUTS.get(layout)
    if mesh is None:
        mesh = jax.sharding.get_abstract_mesh()
        if mesh.empty:
            raise ValueError("ring_attention: pass mesh= or run under `with jax.set_mesh(mesh):`")
    if pattern is not None and not causal:
        raise ValueError("ring_attention: vertical-slash patterns are causal; pass causal=True")
    if spec.mesh_axes == 2:
        if isinstance(axis_name, str) or len(axis_name) != 2:
            raise ValueError(f"ring_attention: layout={layout!r} needs axis_name=(outer, inner)")
        outer_axis, inner_axis = axis_name
        outer, inner = mesh.shape[outer_axis], mesh.shape[inner_axis]
        spec_axes = (outer_axis, inner_axis)
    else:
        if not isinstance(axis_name, str):
            raise ValueError(f"ring_attention: layout {layout!r} takes one mesh axis name")
        outer_axis, inner_axis, outer, inner = None, axis_name, 1, mesh.shape[axis_name]
        spec_axes = axis_name
    world = outer * inner
    layouts.check_layout(layout, t, world, block_size)
    if pattern is not None:
        chex.assert_shape(pattern.vertical_idx, (b, h, None))
        chex.assert_shape(pattern.slash_idx, (b, h, None))
    nb = t // block_size
    ring = _Ring(
        outer_axis=outer_axis,
        inner_axis=inner_axis,
        outer=outer,
        inner=inner,
        blocks=tuple(map(tuple, layouts.layout_blocks(layout, nb, world).tolist())),
        num_blocks=nb,
        block_size=block_size,
        causal=causal,
        implementation=implementation,
        interpret=interpret,
        scale=d**-0.5 if scale is None else scale,
        block_k=block_k,
        bar_block=bar_block,
    )
    perm = layouts.token_permutation(layout, t, world, block_size)
    identity = bool((perm == np.arange(t)).all())
    if not identity:  # (on an Explicit mesh the permutation is taken of whole arrays)
        q, k, v = shard_inputs(mesh, P(), q, k, v)
        q, k, v = (jnp.take(x, jnp.asarray(perm), axis=1) for x in (q, k, v))

    def local(q, k, v, pattern):
        return attend(ring, q, k, v, pattern)

    seq = P(None, spec_axes)
    # jit: outside a jit, shard_map would run op by op
    fn = jax.jit(
        jax.shard_map(
            local,
            mesh=mesh,
            in_specs=(seq, seq, seq, P()),
            out_specs=(seq, P(None, None, spec_axes)),
            check_vma=False,
        )
    )
    q, k, v, pattern = shard_inputs(mesh, (seq, seq, seq, P()), q, k, v, pattern)
    out, lse = fn(q, k, v, pattern)
    if not identity:
        out, lse = shard_inputs(mesh, P(), out, lse)
        inv = jnp.asarray(np.argsort(perm))
        out, lse = jnp.take(out, inv, axis=1), jnp.take(lse, inv, axis=2)
    return (out, lse) if return_lse else out


# -- ring attention as the registered attention implementation "ring" --------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class SparseConfig:
    """Options of :func:`jaxlab.attention.vertical_slash_pattern` for sparse ring attention: the
    pattern is estimated per head from the last ``last_q`` queries in each forward pass."""

    vertical_size: int
    slash_size: int
    last_q: int = 64
    mode: str = "fixed"
    sink_tokens: int = 30
    window: int = 100
    top_p: float = 0.9

    def __post_init__(self):
        for name in ("vertical_size", "slash_size", "last_q"):
            value = getattr(self, name)
            check(
                isinstance(value, int) and not isinstance(value, bool) and value > 0,
                name,
                f"must be a positive int, got {value!r}",
            )
        for name in ("sink_tokens", "window"):
            value = getattr(self, name)
            check(
                isinstance(value, int) and not isinstance(value, bool) and value >= 0,
                name,
                f"must be an int >= 0, got {value!r}",
            )
        check(
            self.mode in ESTIMATION_MODES,
            "mode",
            f"{self.mode!r} is not one of {list(ESTIMATION_MODES)}",
        )
        check(0.0 < self.top_p <= 1.0, "top_p", f"must lie in (0, 1], got {self.top_p}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RingConfig:
    """Options of ``attention_implementation="ring"``: sequence-parallel attention over the mesh set
    with ``jax.set_mesh``, for training and prefill of unpadded causal sequences.

    axis_name: the mesh axis of the sequence; ``(outer, inner)`` for a two-axis layout
      (``hierarchical``).
    layout, kernel, vertical_mode: names from :data:`jaxlab.attention.LAYOUTS`,
      :data:`RING_IMPLEMENTATIONS` and :data:`VERTICAL_MODES`.
    block_size: tokens per block (G).
    sparse: None for dense attention, else the vertical-slash pattern's options.
    """

    axis_name: str | tuple[str, ...] = "sp"
    layout: str = "striped"
    block_size: int = 128
    kernel: str = "pallas"
    vertical_mode: str = "ring"
    sparse: SparseConfig | None = None

    def __post_init__(self):
        if isinstance(self.axis_name, list):
            object.__setattr__(self, "axis_name", tuple(self.axis_name))
        if isinstance(self.sparse, dict):
            object.__setattr__(
                self, "sparse", from_dict(SparseConfig, self.sparse, prefix="sparse.")
            )
        layouts.LAYOUTS.check(self.layout, "layout")
        RING_IMPLEMENTATIONS.check(self.kernel, "kernel")
        VERTICAL_MODES.check(self.vertical_mode, "vertical_mode")
        check(
            isinstance(self.block_size, int)
            and not isinstance(self.block_size, bool)
            and self.block_size > 0,
            "block_size",
            f"must be a positive int, got {self.block_size!r}",
        )
        axes = layouts.LAYOUTS.get(self.layout).mesh_axes
        if axes == 1:
            check(
                isinstance(self.axis_name, str),
                "axis_name",
                f"layout {self.layout!r} takes one mesh axis name, got {self.axis_name!r}",
            )
        else:
            check(
                isinstance(self.axis_name, tuple)
                and len(self.axis_name) == axes
                and all(isinstance(a, str) for a in self.axis_name),
                "axis_name",
                f"layout {self.layout!r} takes {axes} mesh axis names (outer, inner), "
                f"got {self.axis_name!r}",
            )
        check(
            self.sparse is None or isinstance(self.sparse, SparseConfig),
            "sparse",
            f"must be a SparseConfig, a mapping or None, got {self.sparse!r}",
        )


def _ring(q, k, v, mask, *, scale, kv_layout, config: RingConfig):
    """``attention(..., implementation="ring")``: the keys of every position up to the query's own
    (``mask`` is not read: the sequences are causal and unpadded)."""
    if kv_layout != "bskd":
        raise UserError("ring attention runs without a KV cache (training and prefill)")
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        raise UserError("attention_implementation='ring' needs a mesh: `with jax.set_mesh(mesh):`")
    pattern = None
    if config.sparse is not None:
        options = dataclasses.asdict(config.sparse)
        pattern = vertical_slash_pattern(q, k, mesh=mesh, axis_name=config.axis_name, **options)
    return ring_attention(
        q,
        k,
        v,
        mesh=mesh,
        axis_name=config.axis_name,
        layout=config.layout,
        pattern=pattern,
        block_size=config.block_size,
        implementation=config.kernel,
        vertical_mode=config.vertical_mode,
        scale=scale,
    )


# jaxlab.attention.dense declares it as ATTENTION_IMPLEMENTATIONS["ring"]
RING_ATTENTION = AttentionImplementation(_ring, config=RingConfig, sequence_parallel=True)
