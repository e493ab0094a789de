"""The kernels' input type: the sparse work lists of one (device, ring step), and their dense mask.

A :class:`StepPlan` lists, for each local query block of G tokens, the active local key blocks
(block-level, causal by global block index) and the "bars": selected vertical key columns of the
chunk that are causally visible and not already inside an active block. The Pallas kernels and the
plain-jnp references in this folder consume exactly these lists; whoever schedules the work (a ring
attention's step planner, say) builds them.

Letters: B batch, H query heads, N blocks (global), n blocks per device, V vertical capacity.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

__all__ = ["StepPlan", "step_mask"]


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=[
        "q_blocks",
        "kv_blocks",
        "block_idx",
        "block_cnt",
        "bar_idx",
        "bar_cnt",
        "qblock_idx",
        "qblock_cnt",
        "vcol_idx",
        "vcol_cnt",
        "vcol_start",
        "active",
    ],
    meta_fields=[],
)
@dataclasses.dataclass(frozen=True)
class StepPlan:
    """The sparse work of one (device, ring step); index lists hold valid entries first.

    q_blocks ``[n]`` / kv_blocks ``[n]``: global block ids of the local query / key blocks.
    block_idx ``[B, H, n, n]``, block_cnt ``[B, H, n]``: active local key blocks per query block.
    bar_idx ``[B, H, n, V]``, bar_cnt ``[B, H, n]``: local key columns (bars) per query block.
    qblock_idx ``[B, H, n, n]``, qblock_cnt ``[B, H, n]``: the transpose of the block lists (backward).
    vcol_idx ``[B, H, V]``, vcol_cnt ``[B, H]``: local columns of the chunk's verticals (backward);
    vcol_start ``[B, H, V // bar_block]``: first query block that can see each tile of them.
    active ``[B, H, N]`` int32: active block diagonals (to tell bars from block-covered columns).
    """

    q_blocks: jax.Array
    kv_blocks: jax.Array
    block_idx: jax.Array
    block_cnt: jax.Array
    bar_idx: jax.Array
    bar_cnt: jax.Array
    qblock_idx: jax.Array
    qblock_cnt: jax.Array
    vcol_idx: jax.Array
    vcol_cnt: jax.Array
    vcol_start: jax.Array
    active: jax.Array


def step_mask(plan: StepPlan, block_size: int, causal: bool = True) -> jax.Array:
    """The dense boolean mask ``[B, H, Tq, Tk]`` that a plan describes (token-level causal applied)."""
    g = block_size
    b, h, n, _ = plan.block_idx.shape
    j = jnp.arange(n)
    blk = jnp.zeros((b, h, n, n + 1), bool)
    bi = jnp.arange(b)[:, None, None, None]
    hi = jnp.arange(h)[None, :, None, None]
    ii = jnp.arange(n)[None, None, :, None]
    idx = jnp.where(j < plan.block_cnt[..., None], plan.block_idx, n)
    blk = blk.at[bi, hi, ii, idx].set(True)[..., :n]
    mask = jnp.repeat(jnp.repeat(blk, g, axis=2), g, axis=3)
    bars = jnp.zeros((b, h, n, n * g + 1), bool)
    v = jnp.arange(plan.bar_idx.shape[-1])
    cols = jnp.where(v < plan.bar_cnt[..., None], plan.bar_idx, n * g)
    bars = bars.at[bi, hi, ii, cols].set(True)[..., : n * g]
    mask = mask | jnp.repeat(bars, g, axis=2)
    if causal:
        q_pos = (plan.q_blocks[:, None] * g + jnp.arange(g)).reshape(-1)
        k_pos = (plan.kv_blocks[:, None] * g + jnp.arange(g)).reshape(-1)
        mask = mask & (q_pos[:, None] >= k_pos[None, :])
    return mask
