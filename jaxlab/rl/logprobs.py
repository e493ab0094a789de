"""Policy log-probs at the loss positions only, projected a chunk of positions at a time.

An RL update scores the sampled tokens under the current policy: ``log π(y_t | y_<t)`` at the
response positions of each row. Computing the logits at every position of the row gives a
``[B, W, V]`` float32 array (prompt, response and padding), plus its softmax and its gradient:
for 16 rows of 4096 tokens and a 152k vocabulary that is 40 GB, more than the model's activations.

:func:`response_logprobs` runs the decoder to its final hidden states, gathers the ``window``
loss positions of each row (a response has at most ``max_new_tokens`` of them) and projects only
those. With ``chunk > 0`` it projects ``chunk`` positions at a time in a ``lax.map`` whose steps
are rematerialised: the forward pass keeps only the ``[B, R]`` log-probs and the backward pass
recomputes one chunk's logits at a time, so the peak is ``[B, chunk, V]`` whatever the response
length (MaxText's vocabulary tiling and Liger's fused linear cross-entropy do the same for SFT).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlab.generation.core import sampling_logprobs
from jaxlab.models import Decoder

__all__ = ["loss_positions", "projected_logprobs", "response_logprobs"]


def loss_positions(loss_mask: jax.Array, window: int) -> tuple[jax.Array, jax.Array]:
    """``(index, valid)``, each ``[B, R]`` with R = min(window, W): row b's loss positions in
    order (those with ``loss_mask > 0``), then other positions marked ``valid = False``."""
    r = min(window, loss_mask.shape[1])
    on = loss_mask > 0
    # the loss positions first, in order (a stable sort of "not a loss position"), then the rest
    index = jnp.argsort(~on, axis=1, stable=True)[:, :r]
    valid = jnp.arange(r)[None] < jnp.sum(on, axis=1, keepdims=True)
    return index, valid


def _head_filter(model: Decoder):
    """The parameters of the output projection: the tied embedding table or ``lm_head``."""
    return nnx.All(
        nnx.Param,
        nnx.PathContains("embed_tokens" if model.config.tie_word_embeddings else "lm_head"),
    )


def projected_logprobs(
    model: Decoder, hidden, targets, *, temperature: float, top_p: float = 1.0, chunk: int = 0
):
    """Sampling log-probs ``[B, R]`` of ``targets [B, R]`` from final hidden states
    ``[B, R, D]`` (``model(..., return_hidden=True)``), as
    ``sampling_logprobs(model.logits_from_hidden(hidden), targets, ...)``.

    ``chunk > 0`` projects ``chunk`` positions at a time and recomputes each chunk's logits in
    the backward pass: peak logits memory ``[B, chunk, V]`` instead of ``[B, R, V]``."""
    b, r, d = hidden.shape
    kw = dict(temperature=temperature, top_p=top_p)
    if chunk <= 0 or chunk >= r:
        return sampling_logprobs(model.logits_from_hidden(hidden), targets, **kw)
    n = -(-r // chunk)
    pad = n * chunk - r
    h = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0))).reshape(b, n, chunk, d).swapaxes(0, 1)
    y = jnp.pad(targets, ((0, 0), (0, pad))).reshape(b, n, chunk).swapaxes(0, 1)
    # only the head's weights enter the loop as differentiated inputs; the rest of the model is
    # a constant there (the scan's backward pass would otherwise carry a zero gradient for all of it)
    graphdef, head, rest = nnx.split(model, _head_filter(model), ...)
    rest = jax.lax.stop_gradient(rest)

    @jax.checkpoint
    def one(head, hc, yc):
        m = nnx.merge(graphdef, head, rest)
        return sampling_logprobs(m.logits_from_hidden(hc), yc, **kw)

    out = jax.lax.map(lambda xs: one(head, *xs), (h, y))  # [n, B, chunk]
    return out.swapaxes(0, 1).reshape(b, n * chunk)[:, :r]


def response_logprobs(
    model: Decoder,
    tokens,
    mask,
    loss_mask,
    *aligned,
    window: int,
    temperature: float,
    top_p: float = 1.0,
    chunk: int = 0,
):
    """The policy's sampling log-probs at the loss positions of each row only.

    ``tokens``, ``mask`` ``[B, W]``; ``loss_mask`` ``[B, W-1]`` (position t predicts token t+1);
    ``aligned``: more ``[B, W-1]`` arrays in the loss mask's layout (behaviour log-probs, ...).
    Returns ``(logp, loss_mask, *aligned)``, each ``[B, R]`` with R = min(window, W - 1), row b
    holding its loss positions in order and zeros in ``loss_mask`` after them. A row with more
    than ``window`` loss positions loses the later ones: callers check the bound."""
    hidden = model(tokens[:, :-1], attention_mask=mask[:, :-1], return_hidden=True)
    index, valid = loss_positions(loss_mask, window)
    take = lambda x: jnp.take_along_axis(x, index, axis=1)  # noqa: E731
    h = jnp.take_along_axis(hidden, index[..., None], axis=1)
    logp = projected_logprobs(
        model, h, take(tokens[:, 1:]), temperature=temperature, top_p=top_p, chunk=chunk
    )
    return (logp, jnp.where(valid, take(loss_mask), 0), *map(take, aligned))
