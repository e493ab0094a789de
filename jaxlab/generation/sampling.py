"""Token sampling from logits: greedy, temperature, top-k and top-p, with log-probabilities.

Letters: B batch, V vocab.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["filter_logits", "sample_tokens"]

_NEG_INF = -jnp.inf


def filter_logits(
    logits: jax.Array, *, temperature: float | jax.Array, top_k: int, top_p: float
) -> jax.Array:
    """The logits ``[B, V]`` of the distribution actually sampled from.

    Temperature first, then top-k (keep the k largest), then top-p (keep the smallest set of most
    likely tokens whose probability reaches ``top_p``; the most likely token always stays).
    Removed tokens get ``-inf``.
    """
    x = logits.astype(jnp.float32) / temperature
    if 0 < top_k < x.shape[-1]:
        kth = jax.lax.top_k(x, top_k)[0][:, -1:]
        x = jnp.where(x < kth, _NEG_INF, x)
    if top_p < 1.0:
        sorted_x = jnp.sort(x, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_x, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly above each sorted token
        keep = before < top_p
        threshold = jnp.min(jnp.where(keep, sorted_x, jnp.inf), axis=-1, keepdims=True)
        x = jnp.where(x < threshold, _NEG_INF, x)
    return x


def sample_tokens(
    logits: jax.Array,  # [B, V]
    key: jax.Array,
    *,
    temperature: float | jax.Array,
    top_k: int = 0,
    top_p: float = 1.0,
    greedy: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Samples one token per row.

    Returns:
      ``(tokens [B] int32, logprobs [B], raw_logprobs [B])``: the log-probability of each token
      under the distribution sampled from (after temperature / top-k / top-p), and under the
      untempered, unfiltered model. For greedy decoding both are the model's log-probability.
    """
    raw = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    if greedy:
        tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        lp = jnp.take_along_axis(raw, tokens[:, None], axis=-1)[:, 0]
        return tokens, lp, lp
    filtered = filter_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p)
    tokens = jax.random.categorical(key, filtered, axis=-1).astype(jnp.int32)
    lp = jnp.take_along_axis(jax.nn.log_softmax(filtered, axis=-1), tokens[:, None], axis=-1)[:, 0]
    raw_lp = jnp.take_along_axis(raw, tokens[:, None], axis=-1)[:, 0]
    return tokens, lp, raw_lp
