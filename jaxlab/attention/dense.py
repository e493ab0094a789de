"""The one attention entry point used by jaxlab's models.

Models call :func:`attention`; the implementation is chosen by name from a small registry, so that
sequence-parallel (ring) and sparse implementations plug in without touching the model code.

Letters: B batch, T query length, S key length, H query heads, K key/value heads, D head dim.
"""

from __future__ import annotations

from collections.abc import Callable

import chex
import jax
import jax.numpy as jnp

__all__ = ["attention", "register_attention", "attention_implementations", "reference_attention"]

AttentionFn = Callable[..., jax.Array]
_IMPLEMENTATIONS: dict[str, AttentionFn] = {}


def register_attention(name: str):
    """Decorator registering an attention implementation under ``name``.

    An implementation has the signature of :func:`attention` without ``implementation``.
    """

    def wrap(fn):
        _IMPLEMENTATIONS[name] = fn
        return fn

    return wrap


def attention_implementations() -> list[str]:
    return sorted(_IMPLEMENTATIONS)


@register_attention("xla")
def _xla_attention(q, k, v, mask, *, scale):
    return jax.nn.dot_product_attention(
        q, k, v, mask=None if mask is None else mask[:, None], scale=scale, implementation="xla"
    )


@register_attention("cudnn")
def _cudnn_attention(q, k, v, mask, *, scale):
    return jax.nn.dot_product_attention(
        q, k, v, mask=None if mask is None else mask[:, None], scale=scale, implementation="cudnn"
    )


@register_attention("reference")
def reference_attention(q, k, v, mask, *, scale):
    """Plain einsum attention with a float32 softmax; a readable reference for the others."""
    b, t, h, d = q.shape
    kv_heads = k.shape[2]
    qg = q.reshape(b, t, kv_heads, h // kv_heads, d)
    logits = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
    if mask is not None:
        logits = jnp.where(mask[:, None, None], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(b, t, h, d)


def attention(
    q: jax.Array,  # [B, T, H, D]
    k: jax.Array,  # [B, S, K, D]
    v: jax.Array,  # [B, S, K, D]
    mask: jax.Array | None = None,  # [B, T, S] bool, True = query may see key
    *,
    scale: float | None = None,
    implementation: str = "xla",
) -> jax.Array:  # [B, T, H, D]
    """Scaled dot-product attention with grouped-query heads and a boolean mask.

    Rows whose mask is all False (left padding) give finite outputs, never NaN.
    """
    chex.assert_rank([q, k, v], 4)
    chex.assert_equal_shape([k, v])
    if q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1] or q.shape[2] % k.shape[2]:
        raise ValueError(
            f"attention: q {q.shape} and k {k.shape} need equal batch and head dim, and "
            "query heads a multiple of key/value heads"
        )
    if mask is not None and mask.shape != (q.shape[0], q.shape[1], k.shape[1]):
        raise ValueError(
            f"attention: mask {mask.shape} must be [B, T, S] = {(q.shape[0], q.shape[1], k.shape[1])}"
        )
    try:
        fn = _IMPLEMENTATIONS[implementation]
    except KeyError:
        raise ValueError(
            f"unknown attention implementation {implementation!r}; known: {attention_implementations()}"
        ) from None
    if scale is None:
        scale = q.shape[-1] ** -0.5
    return fn(q, k, v, mask, scale=scale)
