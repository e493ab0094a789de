"""Sequence layouts for ring attention and the per-(device, ring step) sparse work lists.

A layout assigns the T/G blocks of G tokens to W devices; every device holds NB/W blocks in ascending
global order:

* ``contiguous``: device r holds blocks r·n .. r·n + n − 1 (n = NB/W);
* ``zigzag``: the sequence is cut into 2W chunks and device r holds chunks r and 2W − 1 − r;
* ``striped``: device r holds blocks r, r + W, r + 2W, ... (balanced for Toeplitz slash patterns);
* ``hierarchical``: striped over W = outer × inner devices, rank = outer index · inner + inner index.

At ring step s device r computes its queries against the keys of device ``ring_source(...)``. The work
of one step is a :class:`StepPlan`: for each local query block the active local key blocks (block-level,
causal by global block index) and the "bars" — selected vertical columns of that key chunk that are
causally visible and not already inside an active block. The kernels and the jnp step reference
consume exactly these lists; the type and its dense mask (:func:`step_mask`) belong to the kernel
package (``pallas_kernels.block_sparse_attention.plan``) and are re-exported here.

Letters: B batch, H query heads, N blocks (global), n blocks per device, V vertical capacity.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxlab.attention.sparse import VerticalSlashPattern, active_diagonals
from jaxlab.registry import Registry
from pallas_kernels.block_sparse_attention.plan import StepPlan, step_mask

__all__ = [
    "LAYOUTS",
    "Layout",
    "StepPlan",
    "layout_blocks",
    "token_permutation",
    "ring_source",
    "step_plan",
    "step_mask",
    "check_layout",
]


@dataclasses.dataclass(frozen=True)
class Layout:
    """A sequence layout: ``blocks(num_blocks, world)`` gives the global block ids of each device
    (``[W, N/W]``, ascending in each row); every device holds a multiple of ``granularity`` blocks;
    ``mesh_axes`` is 2 for a ring over (outer, inner) mesh axes, else 1."""

    blocks: Callable[[int, int], np.ndarray]
    granularity: int = 1
    mesh_axes: int = 1


LAYOUTS: Registry[Layout] = Registry("ring layout")


def _contiguous(num_blocks: int, world: int) -> np.ndarray:
    n = num_blocks // world
    return np.arange(world)[:, None] * n + np.arange(n)[None]


def _zigzag(num_blocks: int, world: int) -> np.ndarray:
    half = num_blocks // world // 2
    r, c = np.arange(world)[:, None], np.arange(half)[None]
    return np.concatenate([r * half + c, (2 * world - 1 - r) * half + c], axis=1)


def _striped(num_blocks: int, world: int) -> np.ndarray:
    return np.arange(num_blocks // world)[None] * world + np.arange(world)[:, None]


LAYOUTS.register("contiguous", Layout(_contiguous))
LAYOUTS.register("zigzag", Layout(_zigzag, granularity=2))
LAYOUTS.register("striped", Layout(_striped))
LAYOUTS.register("hierarchical", Layout(_striped, mesh_axes=2))


def check_layout(layout: str, seq_len: int, world: int, block_size: int) -> None:
    """Raise a clear ValueError when ``seq_len`` does not split for this layout."""
    g = LAYOUTS.get(layout).granularity
    unit = block_size * world * g
    if seq_len % unit:
        raise ValueError(
            f"ring attention ({layout}): sequence length {seq_len} must be a multiple of "
            f"{f'{g} × ' if g > 1 else ''}devices ({world}) × block_size ({block_size}) = {unit}"
        )


def layout_blocks(layout: str, num_blocks: int, world: int) -> np.ndarray:
    """Global block ids held by each device, ``[W, N/W]`` int32, ascending in each row."""
    return LAYOUTS.get(layout).blocks(num_blocks, world).astype(np.int32)


def token_permutation(layout: str, seq_len: int, world: int, block_size: int) -> np.ndarray:
    """``perm [T]``: ``x[:, perm]`` is the layout order, device r holding the r-th contiguous slice."""
    check_layout(layout, seq_len, world, block_size)
    blocks = layout_blocks(layout, seq_len // block_size, world).reshape(-1)
    return (blocks[:, None] * block_size + np.arange(block_size)[None]).reshape(-1).astype(np.int32)


def ring_source(rank, step: int, world: int, inner: int | None = None):
    """The device whose key/value chunk ``rank`` holds at ring ``step``.

    Flat ring: (rank − step) mod W. Hierarchical (``inner`` devices per node, step = outer·inner + s_in):
    the outer ring moves chunks between nodes, the inner ring within a node.
    """
    if inner is None:
        return (rank - step) % world
    outer = world // inner
    node, local = rank // inner, rank % inner
    so, si = step // inner, step % inner
    return ((node - so) % outer) * inner + (local - si) % inner


def _compact(mask, values):
    """Move the entries of ``values`` where ``mask`` holds to the front (stable); 0 elsewhere."""
    order = jnp.argsort(~mask, axis=-1, stable=True)
    vals = jnp.take_along_axis(jnp.broadcast_to(values, mask.shape), order, axis=-1)
    cnt = mask.sum(axis=-1).astype(jnp.int32)
    keep = jnp.arange(mask.shape[-1]) < cnt[..., None]
    return jnp.where(keep, vals, 0).astype(jnp.int32), cnt


def _round_up(x, m):
    return -(-x // m) * m


def step_plan(
    pattern: VerticalSlashPattern | None,
    q_blocks: jax.Array,  # [n] global ids of the local query blocks
    kv_blocks: jax.Array,  # [n] global ids of the held key blocks
    *,
    num_blocks: int,
    block_size: int,
    batch_heads: tuple[int, int],
    causal: bool = True,
    bar_block: int = 64,
) -> StepPlan:
    """The block and bar lists of one ring step (traceable; the ids may depend on the device)."""
    g = block_size
    b, h = batch_heads
    qg, kg = q_blocks[:, None], kv_blocks[None, :]
    delta = qg - kg  # [n, n]
    if pattern is None:
        active = jnp.ones((b, h, num_blocks), bool)
        vert = jnp.full((b, h, bar_block), -1, jnp.int32)
    else:
        active = active_diagonals(pattern.slash_idx, num_blocks, g)
        vert = pattern.vertical_idx
        pad = _round_up(max(vert.shape[-1], 1), bar_block) - vert.shape[-1]
        vert = jnp.pad(vert, ((0, 0), (0, 0), (0, pad)), constant_values=-1)
    if causal:
        blk = (delta >= 0) & jnp.take_along_axis(
            active[:, :, None, :], jnp.clip(delta, 0, num_blocks - 1)[None, None], axis=-1
        )
    else:
        blk = jnp.ones((b, h, *delta.shape), bool)
    n = q_blocks.shape[0]
    block_idx, block_cnt = _compact(blk, jnp.arange(n))
    qblock_idx, qblock_cnt = _compact(jnp.swapaxes(blk, -1, -2), jnp.arange(n))

    # verticals of the held chunk, as local columns
    vb = jnp.where(vert >= 0, vert // g, 0)
    loc = jnp.clip(jnp.searchsorted(kv_blocks, vb), 0, n - 1)
    in_chunk = (vert >= 0) & (kv_blocks[loc] == vb)
    col = loc * g + jnp.where(vert >= 0, vert % g, 0)
    vcol_idx, vcol_cnt = _compact(in_chunk, col)
    # bars: in the chunk, causally visible at block level, not inside an active block
    d_bar = q_blocks[None, None, :, None] - vb[:, :, None, :]  # [B, H, n, V]
    covered = jnp.take_along_axis(
        active[:, :, None, :],
        jnp.clip(d_bar, 0, num_blocks - 1).reshape(b, h, -1)[:, :, None, :],
        axis=-1,
    ).reshape(d_bar.shape)
    bars = in_chunk[:, :, None, :] & (d_bar >= 0) & ~covered
    bar_idx, bar_cnt = _compact(bars, col[:, :, None, :])
    # the first query block that can see each tile of verticals (query blocks ascend)
    tiles = vcol_idx.reshape(b, h, -1, bar_block)[..., 0]
    vcol_start = jnp.searchsorted(q_blocks, kv_blocks[tiles // g]).astype(jnp.int32)
    return StepPlan(
        q_blocks=q_blocks.astype(jnp.int32),
        kv_blocks=kv_blocks.astype(jnp.int32),
        block_idx=block_idx,
        block_cnt=block_cnt,
        bar_idx=bar_idx,
        bar_cnt=bar_cnt,
        qblock_idx=qblock_idx,
        qblock_cnt=qblock_cnt,
        vcol_idx=vcol_idx,
        vcol_cnt=vcol_cnt,
        vcol_start=vcol_start,
        active=active.astype(jnp.int32),
    )
