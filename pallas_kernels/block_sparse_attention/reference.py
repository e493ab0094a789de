"""Plain-jnp twins of the block-sparse kernels: the same step, from the dense mask of its plan."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.block_sparse_attention.plan import step_mask


def _mask(plan, block_size, causal):
    return step_mask(plan, block_size, causal)  # the plan's dense mask (one definition)


def _scores(q, k, scale):
    h, kvh = q.shape[2], k.shape[2]
    kr = jnp.repeat(k, h // kvh, axis=2)
    return jnp.einsum("bqhd,bkhd->bhqk", q, kr, preferred_element_type=jnp.float32) * scale, kr


def block_sparse_attention_fwd_reference(q, k, v, plan, *, block_size, scale=None, causal=True):
    """``(o [B, Tq, H, D] f32, lse [B, H, Tq] f32)`` of one step; empty rows give 0 and −inf."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s, _ = _scores(q, k, scale)
    s = jnp.where(_mask(plan, block_size, causal), s, -jnp.inf)
    lse = jax.nn.logsumexp(s, axis=-1)
    p = jnp.exp(s - jnp.where(jnp.isneginf(lse), 0.0, lse)[..., None])
    vr = jnp.repeat(v, q.shape[2] // v.shape[2], axis=2).astype(jnp.float32)
    return jnp.einsum("bhqk,bkhd->bqhd", p, vr), lse


def block_sparse_attention_bwd_reference(
    q, k, v, lse, do, delta, plan, *, block_size, scale=None, causal=True
):
    """``(dq, dk, dv)`` f32 of one step's share, with probabilities from the final ``lse``."""
    b, tq, h, d = q.shape
    tk, kvh = k.shape[1], k.shape[2]
    scale = d**-0.5 if scale is None else scale
    s, kr = _scores(q, k, scale)
    s = jnp.where(_mask(plan, block_size, causal), s, -jnp.inf)
    p = jnp.exp(s - jnp.where(jnp.isneginf(lse), 0.0, lse)[..., None])
    vr = jnp.repeat(v, h // kvh, axis=2).astype(jnp.float32)
    do = do.astype(jnp.float32)
    dp = jnp.einsum("bqhd,bkhd->bhqk", do, vr)
    ds = p * (dp - delta[..., None])
    dq = jnp.einsum("bhqk,bkhd->bqhd", ds, kr.astype(jnp.float32)) * scale
    dk_h = jnp.einsum("bhqk,bqhd->bkhd", ds, q.astype(jnp.float32)) * scale
    dv_h = jnp.einsum("bhqk,bqhd->bkhd", p, do)
    dk = dk_h.reshape(b, tk, kvh, h // kvh, d).sum(axis=3)
    dv = dv_h.reshape(b, tk, kvh, h // kvh, d).sum(axis=3)
    return dq, dk, dv
