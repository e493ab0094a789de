"""Per-token self-information of reasoning traces, split into epistemic and procedural tokens.

The self-information of token t of a trace o under a model is ``I_t = -log p(o_t | o_<t)`` (nats).
Summed over a segment of the trace it is the information the segment adds; a trace whose
procedural tokens add almost nothing per segment for a while is *stagnant* (degenerate loops,
restatements). Everything the model computes here is one jitted, batched teacher-forced forward
pass; the rest are pure functions on arrays.

Letters: B batch, T tokens, V vocab, S segments, E model width.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlab.analysis.markers import epistemic_token_mask, token_char_offsets
from jaxlab.tokenization import bucket_length

__all__ = [
    "self_information_from_logits",
    "token_logprobs",
    "last_hidden_states",
    "cumulative_information",
    "split_information",
    "segment_information_gain",
    "line_segments",
    "window_segments",
    "stagnation_onset",
    "TraceInformation",
    "trace_information",
    "encode_trace",
]


# -- pure functions ----------------------------------------------------------------------------


def self_information_from_logits(
    logits: jax.Array, tokens: jax.Array, mask: jax.Array
) -> jax.Array:
    """``I [B, T]``: ``-log softmax(logits[:, t-1])[tokens[:, t]]`` where ``mask[:, t]``, else 0;
    position 0 has no context and gets 0.

    Args:
      logits: ``[B, T, V]`` next-token logits at each position.
      tokens: ``[B, T]`` int token ids.
      mask: ``[B, T]`` 1 where the token is scored.
    """
    chex.assert_rank([logits, tokens, mask], [3, 2, 2])
    chex.assert_equal_shape([tokens, mask])
    chex.assert_equal_shape_prefix([logits, tokens], 2)
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(logp, tokens[:, 1:, None].astype(jnp.int32), axis=-1)[..., 0]
    info = -picked * mask[:, 1:].astype(picked.dtype)
    return jnp.pad(info, ((0, 0), (1, 0)))


def cumulative_information(info: jax.Array, mask: jax.Array) -> jax.Array:
    """``[B, T]`` running sum of ``info`` over the masked tokens."""
    chex.assert_rank([info, mask], 2)
    chex.assert_equal_shape([info, mask])
    return jnp.cumsum(info * mask.astype(info.dtype), axis=-1)


def split_information(
    info: jax.Array, epistemic: jax.Array, mask: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """``(epistemic part, procedural part)``, each shaped like ``info`` (``[..., T]``): the
    self-information of the masked tokens that are (are not) epistemic markers, 0 elsewhere."""
    chex.assert_equal_shape([info, epistemic, mask])
    m = mask.astype(bool)
    e = epistemic.astype(bool)
    zero = jnp.zeros_like(info)
    return jnp.where(m & e, info, zero), jnp.where(m & ~e, info, zero)


def segment_information_gain(
    info: jax.Array, segment_ids: jax.Array, num_segments: int
) -> jax.Array:
    """``gain [S]``: the information ``info [T]`` adds in each segment (its sum over the segment's
    tokens). ``segment_ids [T]`` in ``[0, S)``; tokens with id -1 belong to no segment."""
    chex.assert_rank([info, segment_ids], 1)
    chex.assert_equal_shape([info, segment_ids])
    ids = jnp.where(segment_ids < 0, num_segments, segment_ids)
    return jax.ops.segment_sum(info, ids, num_segments=num_segments + 1)[:num_segments]


def window_segments(num_tokens: int, size: int) -> np.ndarray:
    """``[T]`` segment ids of consecutive windows of ``size`` tokens."""
    if size < 1:
        raise ValueError(f"segment size must be >= 1, got {size}")
    return np.arange(num_tokens) // size


def line_segments(offsets: np.ndarray, text: str) -> np.ndarray:
    """``[T]`` segment ids by line: the number of newlines before the token's first character (a
    token of newlines closes the line it starts on)."""
    offsets = np.asarray(offsets)
    before = np.concatenate([[0], np.cumsum([c == "\n" for c in text])]).astype(np.int64)
    starts = np.clip(offsets[:, 0], 0, len(text)) if len(offsets) else np.zeros(0, np.int64)
    return before[starts]


def stagnation_onset(
    gain: np.ndarray, tokens: np.ndarray, *, threshold: float = 0.1, patience: int = 2
) -> int:
    """The first segment from which the information rate (``gain / tokens``, nats per token) stays
    below ``threshold`` for ``patience`` consecutive segments that have tokens, or -1 (never).

    Pass the procedural gain (:func:`split_information` then :func:`segment_information_gain`) to
    detect procedural stagnation: segments whose procedural tokens the model could all predict.
    """
    gain, tokens = np.asarray(gain, np.float64), np.asarray(tokens, np.float64)
    if gain.shape != tokens.shape or gain.ndim != 1:
        raise ValueError(f"gain {gain.shape} and tokens {tokens.shape} must be one [S] shape")
    if patience < 1:
        raise ValueError(f"patience must be >= 1, got {patience}")
    run, start = 0, -1
    for s in range(len(gain)):
        if tokens[s] <= 0:
            continue  # a segment without such tokens neither breaks nor extends a run
        if gain[s] / tokens[s] < threshold:
            if run == 0:
                start = s
            run += 1
            if run >= patience:
                return start
        else:
            run = 0
    return -1


# -- model passes (one jitted batched forward each) --------------------------------------------


@functools.partial(jax.jit, static_argnums=(0,))
def _logprobs_fn(graphdef, state, ids, mask):
    model = nnx.merge(graphdef, state)
    logits = model(ids, attention_mask=mask)
    return -self_information_from_logits(logits, ids, mask)


@functools.partial(jax.jit, static_argnums=(0,))
def _hidden_fn(graphdef, state, ids, mask):
    model = nnx.merge(graphdef, state)
    return model(ids, attention_mask=mask, return_hidden=True)


def _right_padded(rows: Sequence[Sequence[int]], pad_id: int, batch: int, limit: int | None):
    longest = max(len(r) for r in rows)
    width = bucket_length(longest, max(limit or longest, longest), granularity=64)
    b = bucket_length(len(rows), batch, granularity=batch)
    ids = np.full((b, width), pad_id, np.int32)
    mask = np.zeros((b, width), np.int32)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = r
        mask[i, : len(r)] = 1
    return ids, mask


def _batched(model, rows, fn, batch_size, pad_id):
    if not rows or any(len(r) == 0 for r in rows):
        raise ValueError("every row needs at least one token")
    graphdef, state = nnx.split(model)
    limit = model.config.max_position_embeddings
    longest = max(len(r) for r in rows)
    if longest > limit:
        raise ValueError(f"a row of {longest} tokens exceeds the model's context of {limit}")
    out = []
    for i in range(0, len(rows), batch_size):
        chunk = rows[i : i + batch_size]
        ids, mask = _right_padded(chunk, pad_id, batch_size, limit)
        res = np.asarray(fn(graphdef, state, jnp.asarray(ids), jnp.asarray(mask)))
        out.extend(res[j, : len(r)] for j, r in enumerate(chunk))
    return out


def token_logprobs(
    model, rows: Sequence[Sequence[int]], *, batch_size: int = 4, pad_id: int = 0
) -> list[np.ndarray]:
    """Per row, ``[T_i]`` float32 ``log p(x_t | x_<t)`` under ``model`` (0 at t = 0), from one
    jitted forward per ``batch_size`` rows (right-padded; widths bucketed to multiples of 64)."""
    return _batched(model, [list(map(int, r)) for r in rows], _logprobs_fn, batch_size, pad_id)


def last_hidden_states(
    model, rows: Sequence[Sequence[int]], *, batch_size: int = 4, pad_id: int = 0
) -> list[np.ndarray]:
    """Per row, ``[T_i, E]`` last-layer hidden states (after the final norm, as transformers'
    ``hidden_states[-1]``)."""
    return _batched(model, [list(map(int, r)) for r in rows], _hidden_fn, batch_size, pad_id)


# -- traces ------------------------------------------------------------------------------------


def encode_trace(tokenizer, prompt: str, response: str, *, chat: bool = True):
    """``(prompt ids, response ids)``: the prompt rendered with the chat template (``chat``) and the
    response encoded on its own, as a model would generate it after the prompt."""
    if chat:
        p = tokenizer.encode(tokenizer.apply_chat_template(prompt), add_special_tokens=False)
    else:
        p = tokenizer.encode(prompt)
    r = tokenizer.encode(response, add_special_tokens=False)
    return p, r


@dataclasses.dataclass
class TraceInformation:
    """The self-information of one response under a model (``N`` response tokens)."""

    prompt_tokens: int
    tokens: np.ndarray  # [N] response token ids
    offsets: np.ndarray  # [N, 2] character spans in ``text``
    text: str
    info: np.ndarray  # [N] -log p(token | prompt, earlier tokens), nats
    epistemic: np.ndarray  # [N] bool: the token belongs to an epistemic marker
    segments: np.ndarray  # [N] segment id of each token

    @property
    def num_segments(self) -> int:
        return int(self.segments.max()) + 1 if len(self.segments) else 0

    def cumulative(self) -> dict[str, np.ndarray]:
        """``[N]`` running totals (float64, on the host): all tokens, epistemic, procedural."""
        epi = np.where(self.epistemic, self.info, 0.0)
        return {
            "total": np.cumsum(self.info),
            "epistemic": np.cumsum(epi),
            "procedural": np.cumsum(self.info - epi),
        }

    def segment_gain(self) -> dict[str, np.ndarray]:
        """``[S]`` information per segment (total, epistemic, procedural) and token counts."""
        s, seg = self.num_segments, self.segments
        epi = np.where(self.epistemic, self.info, 0.0)
        counts = np.bincount(seg, minlength=s).astype(np.float64)
        epi_counts = np.bincount(seg, weights=self.epistemic.astype(np.float64), minlength=s)
        return {
            "total": np.bincount(seg, weights=self.info, minlength=s),
            "epistemic": np.bincount(seg, weights=epi, minlength=s),
            "procedural": np.bincount(seg, weights=self.info - epi, minlength=s),
            "tokens": counts,
            "procedural_tokens": counts - epi_counts,
        }

    def stagnation(self, *, threshold: float = 0.1, patience: int = 2) -> int:
        """:func:`stagnation_onset` of the procedural information per segment."""
        g = self.segment_gain()
        return stagnation_onset(
            g["procedural"], g["procedural_tokens"], threshold=threshold, patience=patience
        )

    def to_dict(self) -> dict:
        g = self.segment_gain()
        return {
            "text": self.text,
            "prompt_tokens": self.prompt_tokens,
            "tokens": self.tokens.tolist(),
            "info": self.info.tolist(),
            "epistemic": self.epistemic.astype(int).tolist(),
            "segments": self.segments.tolist(),
            "total_information": float(self.info.sum()),
            "epistemic_information": float(self.info[self.epistemic].sum()),
            "procedural_information": float(self.info[~self.epistemic].sum()),
            "segment_gain": {k: v.tolist() for k, v in g.items()},
            "stagnation_onset": self.stagnation(),
        }


def trace_information(
    model,
    tokenizer,
    prompts: Sequence[str],
    responses: Sequence[str],
    *,
    chat: bool = True,
    convention: str = "word_boundary",
    segment: str | int = "line",
    batch_size: int = 4,
) -> list[TraceInformation]:
    """Self-information of each ``responses[i]`` given ``prompts[i]`` under ``model``, with the
    epistemic-marker mask (``convention``) and segments (``"line"`` or a window size in tokens).

    All traces go through :func:`token_logprobs` together (one jitted forward per batch).
    """
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    encoded = [encode_trace(tokenizer, p, r, chat=chat) for p, r in zip(prompts, responses)]
    rows = [p + r for p, r in encoded]
    lps = token_logprobs(model, rows, batch_size=batch_size, pad_id=tokenizer.pad_token_id)
    out = []
    for (p, r), lp in zip(encoded, lps):
        tokens = np.asarray(r, np.int32)
        info = -lp[len(p) :].astype(np.float64)
        offsets = token_char_offsets(tokenizer, tokens)
        text = tokenizer.decode(tokens)
        if segment == "line":
            seg = line_segments(offsets, text)
        elif isinstance(segment, int):
            seg = window_segments(len(tokens), segment)
        else:
            raise ValueError(f"segment must be 'line' or a window size, got {segment!r}")
        out.append(
            TraceInformation(
                prompt_tokens=len(p),
                tokens=tokens,
                offsets=offsets,
                text=text,
                info=info,
                epistemic=epistemic_token_mask(tokenizer, tokens, convention),
                segments=seg,
            )
        )
    return out
