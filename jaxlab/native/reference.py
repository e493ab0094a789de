"""Plain-jnp formulations of what the native kernels compute: their gradients (the kernels are
forward-only) and the references their tests compare with. No jaxlab imports, so the kernels
never depend on the layers that use them.

Letters: B batch, T new tokens, H query heads, K key/value heads, S cache slots, D head dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["cache_attention", "matmul", "greedy_tokens"]


def cache_attention(q, k, v, mask, scale):
    """Attention of q ``[B, T, H, D]`` over a ``bksd`` cache k, v ``[B, K, S, D]`` with mask
    ``[B, T, S]`` (None: every slot), float32 softmax; a row with no visible slot gives zeros
    (as the kernel does)."""
    b, t, h, d = q.shape
    kv_heads, s = k.shape[1], k.shape[2]
    g = h // kv_heads
    qx = q.reshape(b, t, kv_heads, g, d)
    logits = jnp.einsum("btkgd,bksd->bkgts", qx, k, preferred_element_type=jnp.float32) * scale
    if mask is None:
        mask = jnp.ones((b, t, s), bool)
    m = mask[:, None, None, :, :]
    logits = jnp.where(m, logits, -jnp.inf)
    peak = jnp.max(logits, axis=-1, keepdims=True)
    p = jnp.where(m, jnp.exp(logits - jnp.where(jnp.isfinite(peak), peak, 0.0)), 0.0)
    total = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(total > 0, total, 1.0)
    out = jnp.einsum("bkgts,bksd->btkgd", p.astype(v.dtype), v)
    return out.reshape(b, t, h, d).astype(q.dtype)


def matmul(x, w, transposed: bool):
    """``x @ w`` (``x @ w.T`` with ``transposed``)."""
    return x @ (w.T if transposed else w)


def greedy_tokens(logits):
    """``(argmax, log_softmax[argmax])`` per row of ``logits [B, V]``."""
    tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    lp = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), tokens[:, None], axis=-1)[:, 0]
    return tokens, lp
