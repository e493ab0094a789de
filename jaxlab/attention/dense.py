"""The one attention entry point used by jaxlab's models.

Models call :func:`attention`; the implementation is chosen by name from a small registry, so that
sequence-parallel (ring) and sparse implementations plug in without touching the model code.

Letters: B batch, T query length, S key length, H query heads, K key/value heads, D head dim.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import chex
import jax
import jax.numpy as jnp

from jaxlab.errors import UserError
from jaxlab.registry import Registry

__all__ = [
    "attention",
    "register_attention",
    "attention_implementations",
    "grouped_attention",
    "AttentionImplementation",
    "ATTENTION_IMPLEMENTATIONS",
]

AttentionFn = Callable[..., jax.Array]


@dataclasses.dataclass(frozen=True)
class AttentionImplementation:
    """A registered attention implementation.

    ``fn(q, k, v, mask, *, scale, kv_layout)`` (and ``config=`` when ``config`` is set) returns
    ``[B, T, H, D]``. ``config`` is the frozen options type it takes (None: no options).
    ``sequence_parallel``: it runs over a mesh axis (``jax.set_mesh``) on unpadded causal
    sequences, without a KV cache.
    """

    fn: AttentionFn
    config: type | None = None
    sequence_parallel: bool = False


ATTENTION_IMPLEMENTATIONS: Registry[AttentionImplementation] = Registry("attention implementation")
ATTENTION_IMPLEMENTATIONS.register_lazy("ring", "jaxlab.attention.ring:RING_ATTENTION")


def register_attention(name: str, *, config: type | None = None, sequence_parallel: bool = False):
    """Decorator registering an attention implementation under ``name``.

    An implementation has the signature of :func:`attention` without ``implementation`` (and
    takes ``config=``, an instance of ``config``, when ``config`` is given).
    """

    def wrap(fn):
        ATTENTION_IMPLEMENTATIONS.register(
            name, AttentionImplementation(fn, config, sequence_parallel)
        )
        return fn

    return wrap


def attention_implementations(*, sequence_parallel: bool = False) -> list[str]:
    """Names of the registered implementations that run anywhere (on a KV cache too); with
    ``sequence_parallel`` also those that run over a mesh axis (``"ring"``)."""
    return [
        name
        for name, impl in ATTENTION_IMPLEMENTATIONS.items()
        if sequence_parallel or not impl.sequence_parallel
    ]


_CACHE_BYTES = 4 << 20  # float32 logits above this size are computed one sequence at a time on CPU


@register_attention("xla")
def grouped_attention(q, k, v, mask, *, scale, kv_layout="bskd", per_sequence=None):
    """Grouped-query attention as two einsums with a float32 softmax (the default).

    Query heads are grouped under their key/value head instead of repeating keys and values, and
    keys/values are read in either layout without a transpose: ``bskd`` (tokens before heads) or
    ``bksd`` (heads before slots, the KV-cache layout, where decoding reads each head's slots
    contiguously).

    ``per_sequence`` (``bskd`` only) attends one sequence at a time in a ``lax.map``, so that a
    sequence's ``[H, T, S]`` logits stay in cache between the two matmuls and the softmax (faster
    on CPU than materialising ``[B, H, T, S]`` at once; ``docs/models.md``). By default it is on
    when the backend is CPU and the batch's logits would outgrow the cache (> 4 MiB);
    accelerators keep the whole batch in one pass.

    Decoding on CPU replaces this over the KV cache with a native kernel
    (:func:`jaxlab.native.decoding.prepare_for_decoding`); this function itself is plain XLA.
    """
    b, t, h, d = q.shape
    if kv_layout == "bskd":
        if per_sequence is None:
            logits_bytes = 4 * b * h * t * k.shape[1]
            per_sequence = jax.default_backend() == "cpu" and logits_bytes > _CACHE_BYTES
        one = functools.partial(_attend_sequence, scale=scale)
        if not per_sequence:
            if mask is None:
                return jax.vmap(lambda *a: one(*a, None))(q, k, v)
            return jax.vmap(one)(q, k, v, mask)
        if b == 1:
            return one(q[0], k[0], v[0], None if mask is None else mask[0])[None]
        if mask is None:
            return jax.lax.map(lambda a: one(*a, None), (q, k, v))
        return jax.lax.map(lambda a: one(*a), (q, k, v, mask))
    # bksd: fold (batch, kv head) into one batch axis and (query, group) into the rows, so that
    # XLA runs one batched matmul with few, larger batch entries (much faster on CPU).
    kv_heads, s_len = k.shape[1], k.shape[2]
    g = h // kv_heads
    x = b * kv_heads
    qx = q.reshape(b, t, kv_heads, g, d).transpose(0, 2, 1, 3, 4).reshape(x, t * g, d)
    kx, vx = k.reshape(x, s_len, d), v.reshape(x, s_len, d)
    acc = jnp.promote_types(q.dtype, jnp.float32)  # float32 softmax (float64 for float64 inputs)
    logits = jnp.einsum("xqd,xsd->xqs", qx, kx, preferred_element_type=acc) * scale
    if mask is not None:
        mx = jnp.broadcast_to(mask[:, None, :, None, :], (b, kv_heads, t, g, s_len)).reshape(
            x, t * g, s_len
        )
        logits = jnp.where(mx, logits, jnp.finfo(acc).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("xqs,xsd->xqd", probs, vx).reshape(b, kv_heads, t, g, d)
    return out.transpose(0, 2, 1, 3, 4).reshape(b, t, h, d)


def _attend_sequence(q, k, v, mask, *, scale):
    """Grouped-query attention of one sequence: q ``[T, H, D]``, k/v ``[S, K, D]``, mask ``[T, S]``.

    Heads move to the front so that each matmul is a batch of K dense ``[G·T, D]`` products, and
    the softmax is normalised after the second matmul (on ``[.., D]`` instead of ``[.., S]``).
    """
    t, h, d = q.shape
    s_len, kv_heads, _ = k.shape
    g = h // kv_heads
    qx = (q * jnp.asarray(scale, q.dtype)).reshape(t, kv_heads, g, d).transpose(1, 2, 0, 3)
    qx = qx.reshape(kv_heads, g * t, d)
    kx, vx = k.transpose(1, 0, 2), v.transpose(1, 0, 2)  # [K, S, D]
    acc = jnp.promote_types(q.dtype, jnp.float32)  # float32 (float64 for float64 inputs)
    logits = jnp.einsum("xqd,xsd->xqs", qx, kx, preferred_element_type=acc)
    if mask is not None:
        m = jnp.broadcast_to(mask[None], (g, t, s_len)).reshape(1, g * t, s_len)
        logits = jnp.where(m, logits, jnp.finfo(acc).min)
    p = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))
    out = jnp.einsum("xqs,xsd->xqd", p.astype(v.dtype), vx, preferred_element_type=acc)
    out = out / jnp.sum(p, axis=-1, keepdims=True)
    return out.reshape(kv_heads, g, t, d).transpose(2, 0, 1, 3).reshape(t, h, d).astype(q.dtype)


def _jax_nn(q, k, v, mask, *, scale, kv_layout, implementation):
    if kv_layout == "bksd":
        k, v = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)
    return jax.nn.dot_product_attention(
        q,
        k,
        v,
        mask=None if mask is None else mask[:, None],
        scale=scale,
        implementation=implementation,
    )


register_attention("jax_nn")(functools.partial(_jax_nn, implementation="xla"))
register_attention("cudnn")(functools.partial(_jax_nn, implementation="cudnn"))


def attention(
    q: jax.Array,  # [B, T, H, D]
    k: jax.Array,  # [B, S, K, D], or [B, K, S, D] with kv_layout="bksd"
    v: jax.Array,  # like k
    mask: jax.Array | None = None,  # [B, T, S] bool, True = query may see key
    *,
    scale: float | None = None,
    implementation: str = "xla",
    kv_layout: str = "bskd",
    config=None,
) -> jax.Array:  # [B, T, H, D]
    """Scaled dot-product attention with grouped-query heads and a boolean mask.

    Rows whose mask is all False (left padding) give finite outputs, never NaN. ``config``: the
    options of an implementation registered with an options type (``"ring"``:
    :class:`jaxlab.attention.RingConfig`; None gives its defaults).
    """
    chex.assert_rank([q, k, v], 4)
    chex.assert_equal_shape([k, v])
    if kv_layout not in ("bskd", "bksd"):
        raise ValueError(f"attention: kv_layout must be 'bskd' or 'bksd', got {kv_layout!r}")
    s_len, kv_heads = (k.shape[1], k.shape[2]) if kv_layout == "bskd" else (k.shape[2], k.shape[1])
    if q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1] or q.shape[2] % kv_heads:
        raise ValueError(
            f"attention: q {q.shape} and k {k.shape} ({kv_layout}) need equal batch and head dim, and "
            "query heads a multiple of key/value heads"
        )
    if mask is not None and mask.shape != (q.shape[0], q.shape[1], s_len):
        raise ValueError(
            f"attention: mask {mask.shape} must be [B, T, S] = {(q.shape[0], q.shape[1], s_len)}"
        )
    impl = ATTENTION_IMPLEMENTATIONS.get(implementation)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if impl.config is None:
        if config is not None:
            raise UserError(f"attention implementation {implementation!r} takes no config")
        return impl.fn(q, k, v, mask, scale=scale, kv_layout=kv_layout)
    if config is None:
        config = impl.config()
    if not isinstance(config, impl.config):
        raise UserError(
            f"attention implementation {implementation!r} takes a {impl.config.__name__} config, "
            f"got {type(config).__name__}"
        )
    return impl.fn(q, k, v, mask, scale=scale, kv_layout=kv_layout, config=config)
