"""Batched generation: prefill of a left-padded batch, then jitted decode chunks over a KV cache.

Decoding runs on the model with one module per layer (``scan_layers=False``): XLA then reads each
layer's weights in place, where a scan over stacked weights copies them every step. The cache is
a tuple of per-layer arrays carried through a ``while_loop`` and updated in place (donated).
Shapes are bucketed (batch, prompt width, new-token budget), so new prompt lengths rarely compile.

Letters: B batch, P prompt length, N new tokens, V vocab.
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlab.generation.core import (
    Statics,
    decode_steps,
    init_state,
    prefill_rows,
    row_params,
)
from jaxlab.generation.params import SamplingParams
from jaxlab.models.decoder import Decoder, with_layer_layout
from jaxlab.models.lora import merge_lora
from jaxlab.native.decoding import prepare_for_decoding
from jaxlab.tokenization import Tokenizer, bucket_length

__all__ = [
    "GenerationResult",
    "TokenResult",
    "generate",
    "generate_rows",
    "generate_tokens",
    "decoding_model",
    "resolve_params",
    "cut_at_stop",
]


@dataclasses.dataclass
class GenerationResult:
    """What :func:`generate` returns. Arrays are numpy, padded after each row's end."""

    texts: list[str]
    tokens: np.ndarray  # [B, N] int32, pad id after each row's end
    logprobs: np.ndarray  # [B, N] float32 under the distribution sampled from; 0 after the end
    lengths: np.ndarray  # [B] int32 generated tokens per row (the EOS token counted)
    raw_logprobs: np.ndarray  # [B, N] float32 under the untempered model
    finish_reasons: list[str]  # "eos", "stop" (a stop string or stop token id) or "length"
    prompt_lengths: np.ndarray  # [B] int32
    prompt_index: np.ndarray | None = None  # [B] int32: the prompt of each row (n per prompt)
    # per row, per generated token: the most likely (token id, log-prob) pairs (params.logprobs)
    top_logprobs: list[list[list[tuple[int, float]]]] | None = None


# -- the model used for decoding ---------------------------------------------------------------------

_DECODING_MODELS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def decoding_model(model: Decoder) -> Decoder:
    """``model`` as generation reads it, built once and reused until its weights change: one
    module per layer (:func:`~jaxlab.models.decoder.with_layer_layout`), prepared for decoding
    by :func:`jaxlab.native.decoding.prepare_for_decoding` (on CPU: the native kernels, packed weights
    and huge pages; elsewhere the model as it is); LoRA adapters merged into the kernels.
    """
    fingerprint = tuple(id(x) for x in jax.tree.leaves(nnx.state(model)))
    hit = _DECODING_MODELS.get(model)
    if hit is not None and hit[0] == fingerprint:
        return model if hit[1] is None else hit[1]
    unrolled = with_layer_layout(merge_lora(model), scan_layers=False)  # adapters merged
    decoding = prepare_for_decoding(unrolled)
    derived = None if decoding is model else decoding
    _DECODING_MODELS[model] = (fingerprint, derived)  # None: the model itself (no self-reference)
    return decoding


# -- token level -------------------------------------------------------------------------------------


def resolve_params(
    params: SamplingParams | None,
    *,
    max_new_tokens: int | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    seed: int | None = None,
    stop: Sequence[str] | None = None,
    n: int | None = None,
) -> SamplingParams:
    """``params`` with the keyword shorthands that were given applied (validated once)."""
    changes = {
        k: v
        for k, v in dict(
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            seed=seed,
            n=n,
        ).items()
        if v is not None
    }
    if stop is not None:
        changes["stop"] = tuple(s for s in ([stop] if isinstance(stop, str) else stop) if s)
    if params is None:
        if "max_new_tokens" not in changes:
            raise TypeError("generation needs max_new_tokens (or a SamplingParams)")
        return SamplingParams(**changes)
    if not isinstance(params, SamplingParams):
        raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}")
    return dataclasses.replace(params, **changes) if changes else params


@dataclasses.dataclass
class TokenResult:
    """Token-level output of :func:`generate_rows`; rows are prompt-major (``n`` per prompt)."""

    tokens: np.ndarray  # [B·n, N] int32, pad id after each row's end
    logprobs: np.ndarray  # [B·n, N] float32
    raw_logprobs: np.ndarray  # [B·n, N] float32
    lengths: np.ndarray  # [B·n] int32
    stop_token: np.ndarray  # [B·n] bool: the row ended on a stop token (EOS or stop_token_ids)
    ended_on_eos: np.ndarray  # [B·n] bool: ... on one of the model's end tokens
    top_ids: np.ndarray | None  # [B·n, N, logprobs] int32 when params.logprobs > 0
    top_logprobs: np.ndarray | None  # [B·n, N, logprobs] float32


def generate_rows(
    model: Decoder,
    input_ids: np.ndarray,  # [B, P] left-padded
    attention_mask: np.ndarray,  # [B, P]
    params: SamplingParams,
    *,
    eos_ids: Sequence[int],
    pad_id: int,
    chunk: int | None = None,
    on_chunk: Callable[[np.ndarray, np.ndarray], np.ndarray | None] | None = None,
) -> TokenResult:
    """Generation on an already padded batch with the shared core (:mod:`jaxlab.generation.core`).

    Row ``r`` of the result is sample ``r % n`` of prompt ``r // n``; it samples with the key of
    sample index ``r`` of ``params.seed`` (None: 0), as :class:`Engine` request sample ``r`` does.

    Args:
      chunk: decode this many steps per device call (default: all at once). Between chunks,
        ``on_chunk(tokens [B·n, k], lengths [B·n])`` sees what is generated so far and may return
        a boolean ``[B·n]`` of rows to stop (stop strings, streaming).
    """
    if not isinstance(model, Decoder):
        raise TypeError(f"generation needs a decoder LM, got {type(model).__name__}")
    input_ids, attention_mask = np.asarray(input_ids), np.asarray(attention_mask)
    if input_ids.ndim != 2 or input_ids.shape != attention_mask.shape or input_ids.shape[0] == 0:
        raise ValueError(
            f"input_ids {input_ids.shape} and attention_mask {attention_mask.shape} must be one "
            "non-empty [B, P] shape"
        )
    cfg = model.config
    params.check_vocab(cfg.vocab_size)
    max_new = params.max_new_tokens
    b, p = input_ids.shape
    limit = cfg.max_position_embeddings
    longest = int(attention_mask.sum(-1).max())  # real tokens, not the padded width
    if longest + max_new > limit:
        raise ValueError(
            f"prompt ({longest} tokens) + max_new_tokens ({max_new}) exceeds the model's "
            f"context of {limit} tokens"
        )
    n = params.n
    rows = b * n
    # bucket the batch, the prompt width (left padding) and the budget: new shapes rarely compile
    r_bucket = bucket_length(b, 2 * b, granularity=64)
    b_bucket = bucket_length(rows, 2 * rows, granularity=64)
    width = bucket_length(p, max(limit - max_new, p), granularity=64)
    ids = np.full((r_bucket, width), pad_id, np.int32)
    msk = np.zeros((r_bucket, width), bool)
    ids[:b, width - p :] = input_ids
    msk[:b, width - p :] = attention_mask
    n_bucket = bucket_length(max_new, max(max_new, 1) * 2, granularity=64)
    cache_len = bucket_length(width + n_bucket, width + n_bucket, granularity=64)

    eos = tuple(int(e) for e in eos_ids)
    stop_ids = tuple(dict.fromkeys((() if params.ignore_eos else eos) + params.stop_token_ids))
    seed = 0 if params.seed is None else params.seed
    idle = SamplingParams(max_new_tokens=1)
    rp = row_params(
        [(params, seed, r, stop_ids) for r in range(rows)] + [(idle, 0, 0, ())] * (b_bucket - rows)
    )
    src = np.minimum(np.arange(b_bucket) // n, r_bucket - 1).astype(np.int32)

    graphdef, state = nnx.split(decoding_model(model))
    static = Statics.of(graphdef)
    ds, out = init_state(state, static=static, rows=b_bucket, cache_len=cache_len, columns=n_bucket)
    rp_dev = jax.tree.map(jnp.asarray, rp)
    ds, tok0, lp0, raw0, top_ids0, top_lps0 = prefill_rows(
        state,
        ds,
        rp_dev,
        jnp.asarray(ids),
        jnp.asarray(msk),
        jnp.asarray(src),
        jnp.arange(b_bucket, dtype=jnp.int32),
        jnp.ones((b_bucket,), bool),
        static=static,
    )
    first = [np.asarray(x)[:rows] for x in (tok0, lp0, raw0, top_ids0, top_lps0)]

    def host_tokens(k):  # tokens [rows, k] made so far (column 0 from the prefill)
        t = np.array(out.tokens[:rows, :k])
        t[:, 0] = first[0]
        return t

    stop = np.zeros((b_bucket,), bool)
    step = 1
    pad = jnp.int32(pad_id)
    while True:
        done = np.asarray(ds.done) | stop
        if step >= max_new or done.all():
            break
        until = max_new - step if chunk is None else min(chunk, max_new - step)
        ds, out, steps = decode_steps(
            state, ds, out, rp_dev, jnp.asarray(stop), jnp.int32(step), jnp.int32(until), pad,
            static=static,
        )  # fmt: skip
        step += int(steps)
        if on_chunk is not None:
            more = on_chunk(host_tokens(step), np.asarray(ds.length)[:rows])
            if more is not None:
                stop[:rows] |= np.asarray(more, bool)

    tokens = host_tokens(max_new)
    logprobs = np.array(out.logprobs[:rows, :max_new])
    raw = np.array(out.raw_logprobs[:rows, :max_new])
    logprobs[:, 0], raw[:, 0] = first[1], first[2]
    lengths = np.array(ds.length[:rows])
    for r in range(rows):  # rows the host stopped (stop strings): nothing after their length
        tokens[r, lengths[r] :] = pad_id
        logprobs[r, lengths[r] :] = 0.0
        raw[r, lengths[r] :] = 0.0
    last = tokens[np.arange(rows), np.maximum(lengths - 1, 0)]
    top_ids = top_lps = None
    if params.logprobs:
        k = params.logprobs
        top_ids = np.array(out.top_ids[:rows, :max_new, :k])
        top_lps = np.array(out.top_logprobs[:rows, :max_new, :k])
        top_ids[:, 0], top_lps[:, 0] = first[3][:, :k], first[4][:, :k]
        for r in range(rows):
            top_ids[r, lengths[r] :], top_lps[r, lengths[r] :] = 0, 0.0
    return TokenResult(
        tokens=tokens,
        logprobs=logprobs,
        raw_logprobs=raw,
        lengths=lengths.astype(np.int32),
        stop_token=np.isin(last, np.asarray(stop_ids, np.int32))
        if stop_ids
        else np.zeros(rows, bool),
        ended_on_eos=np.isin(last, np.asarray(eos, np.int32)) if eos else np.zeros(rows, bool),
        top_ids=top_ids,
        top_logprobs=top_lps,
    )


def generate_tokens(
    model: Decoder,
    input_ids: np.ndarray,  # [B, P] left-padded
    attention_mask: np.ndarray,  # [B, P]
    params: SamplingParams | None = None,
    *,
    max_new_tokens: int | None = None,
    eos_ids: Sequence[int],
    pad_id: int,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    seed: int | None = None,
    chunk: int | None = None,
    on_chunk: Callable[[np.ndarray, np.ndarray], np.ndarray | None] | None = None,
):
    """Token-level generation on an already padded batch; see :func:`generate` and
    :func:`generate_rows` (which also returns top-n logprobs and takes ``n``).

    Returns numpy ``(tokens [B, N], logprobs, raw_logprobs, lengths [B], ended_on_eos [B])``.
    """
    params = resolve_params(
        params, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
        seed=seed,
    )  # fmt: skip
    out = generate_rows(
        model, input_ids, attention_mask, params, eos_ids=eos_ids, pad_id=pad_id, chunk=chunk,
        on_chunk=on_chunk,
    )  # fmt: skip
    return out.tokens, out.logprobs, out.raw_logprobs, out.lengths, out.ended_on_eos


# -- text level ---------------------------------------------------------------------------------------


def cut_at_stop(
    tokenizer: Tokenizer, row: np.ndarray, n: int, stop: Sequence[str]
) -> tuple[str, int, bool]:
    """``(text before the first stop string, tokens kept, hit?)``.

    The tokens kept are the shortest prefix whose text contains that whole stop string (what was
    generated, stop string included); the returned text ends before it.
    """
    text = tokenizer.decode(row[:n])
    hits = [(text.find(s), s) for s in stop if s and s in text]
    if not hits:
        return text, n, False
    cut, first = min(hits)
    for k in range(1, n + 1):
        if first in tokenizer.decode(row[:k]):
            return text[:cut], k, True
    return text[:cut], n, True


def generate(
    model: Decoder,
    tokenizer: Tokenizer,
    prompts: Sequence[str],
    params: SamplingParams | None = None,
    *,
    max_new_tokens: int | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    seed: int | None = None,
    stop: Sequence[str] | None = None,
    n: int | None = None,
    chat: bool = False,
    stream: Callable[[str], None] | None = None,
) -> GenerationResult:
    """Generates continuations of ``prompts``; ``temperature=0`` is greedy.

    Sampling follows ``params`` (:class:`SamplingParams`); the keyword shorthands
    (``max_new_tokens``, ``temperature``, ``top_p``, ``top_k``, ``seed``, ``stop``, ``n``) build
    or override it. Prompts are left-padded into one batch whose size and width are bucketed;
    generation stops per row at EOS (or the chat end-of-turn token), at ``stop_token_ids`` and at
    the first ``stop`` string (checked between decode chunks, so a finished row stops costing
    work). ``chat=True`` renders each prompt with the chat template; a prompt may then also be a
    list of ``{"role", "content"}`` messages. ``stream`` receives the first prompt's new text as
    it is produced. With ``n > 1`` the result has ``n`` rows per prompt (prompt-major;
    ``prompt_index`` says whose), which share the prompt's prefill.

    ``texts`` end before a stop string; ``tokens`` / ``lengths`` / ``logprobs`` keep what was
    generated up to and including it. ``logprobs`` are under the distribution sampled from
    (penalties, temperature, top-k, top-p, min-p applied); for greedy decoding, whose
    distribution is a point mass, they are the model's own log-probabilities, as are
    ``raw_logprobs`` always. ``top_logprobs`` (with ``params.logprobs > 0``) lists per row and
    token the most likely ``(token id, log-prob)`` pairs under the model's own distribution.
    """
    if isinstance(prompts, str):
        raise TypeError("generate expects a list of prompts; wrap a single prompt in a list")
    if not isinstance(model, Decoder):
        raise TypeError(f"generate needs a decoder LM, got {type(model).__name__}")
    if tokenizer is None:
        raise ValueError(
            "generate needs a tokenizer; this checkpoint has none (use generate_tokens on ids)"
        )
    if not prompts:
        raise ValueError("generate needs at least one prompt")
    params = resolve_params(
        params, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
        seed=seed, stop=stop, n=n,
    )  # fmt: skip
    max_new_tokens = params.max_new_tokens
    texts_in = [tokenizer.apply_chat_template(p) for p in prompts] if chat else list(prompts)
    rows, _ = tokenizer.encode_truncated(texts_in, None, add_special_tokens=not chat)
    if any(len(r) == 0 for r in rows):
        raise ValueError("an empty prompt has nothing to condition on")
    limit = model.config.max_position_embeddings
    longest = max(len(r) for r in rows)
    if longest + max_new_tokens > limit:
        raise ValueError(
            f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
            f"context of {limit} tokens"
        )
    batch = tokenizer.pad(rows)  # generate_rows buckets the batch size and the width
    stop = list(params.stop)
    total = len(rows) * params.n
    streamed = [0]

    def on_chunk(tokens, lengths):
        if stream is not None:
            text = tokenizer.decode(tokens[0, : lengths[0]])
            if not text.endswith("\ufffd"):  # wait for a complete UTF-8 character
                stream(text[streamed[0] :])
                streamed[0] = len(text)
        if not stop:
            return None
        return np.array(
            [
                any(s in tokenizer.decode(tokens[i, : lengths[i]]) for s in stop)
                for i in range(total)
            ]
        )

    chunk = 16 if stop else (4 if stream is not None else None)
    out = generate_rows(
        model,
        batch.input_ids,
        batch.attention_mask,
        params,
        eos_ids=tokenizer.eos_token_ids,
        pad_id=tokenizer.pad_token_id,
        chunk=chunk,
        on_chunk=on_chunk if (stop or stream is not None) else None,
    )
    tokens, logprobs, raw, lengths = out.tokens, out.logprobs, out.raw_logprobs, out.lengths
    texts, reasons = [], []
    for i in range(total):
        k = int(lengths[i])
        reason = "eos" if out.ended_on_eos[i] else ("stop" if out.stop_token[i] else "length")
        text, cut, hit = cut_at_stop(tokenizer, tokens[i], k, stop)
        if hit:
            reason = "stop"
            tokens[i, cut:] = tokenizer.pad_token_id
            logprobs[i, cut:] = 0.0
            raw[i, cut:] = 0.0
            lengths[i] = cut
            if out.top_ids is not None:
                out.top_ids[i, cut:], out.top_logprobs[i, cut:] = 0, 0.0
        texts.append(text)
        reasons.append(reason)
    if stream is not None:
        stream(texts[0][streamed[0] :] if len(texts[0]) >= streamed[0] else "")
    top = None
    if out.top_ids is not None:
        top = [
            [
                list(zip(out.top_ids[i, t].tolist(), out.top_logprobs[i, t].tolist()))
                for t in range(int(lengths[i]))
            ]
            for i in range(total)
        ]
    return GenerationResult(
        texts=texts,
        tokens=tokens,
        logprobs=logprobs,
        lengths=lengths.astype(np.int32),
        raw_logprobs=raw,
        finish_reasons=reasons,
        prompt_lengths=np.repeat(np.asarray([len(r) for r in rows], np.int32), params.n),
        prompt_index=np.repeat(np.arange(len(rows), dtype=np.int32), params.n),
        top_logprobs=top,
    )


_cut_at_stop = cut_at_stop  # the name it had before it was shared with the Engine
