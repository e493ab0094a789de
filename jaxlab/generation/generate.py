"""Batched generation: prefill of a left-padded batch, then jitted decode chunks over a KV cache.

Decoding runs on the model with one module per layer (``scan_layers=False``): XLA then reads each
layer's weights in place, where a scan over stacked weights copies them every step. The cache is
a tuple of per-layer arrays carried through a ``while_loop`` and updated in place (donated).
Shapes are bucketed (batch, prompt width, new-token budget), so new prompt lengths rarely compile.

Letters: B batch, P prompt length, N new tokens, V vocab.
"""

from __future__ import annotations

import dataclasses
import functools
import weakref
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlab import native
from jaxlab.generation.sampling import sample_tokens
from jaxlab.models.decoder import (
    Decoder,
    packs_weights,
    with_layer_layout,
    with_packed_weights,
)
from jaxlab.tokenization import Tokenizer, bucket_length

__all__ = ["GenerationResult", "generate", "generate_tokens", "decoding_model"]


@dataclasses.dataclass
class GenerationResult:
    """What :func:`generate` returns. Arrays are numpy, padded after each row's end."""

    texts: list[str]
    tokens: np.ndarray  # [B, N] int32, pad id after each row's end
    logprobs: np.ndarray  # [B, N] float32 under the distribution sampled from; 0 after the end
    lengths: np.ndarray  # [B] int32 generated tokens per row (the EOS token counted)
    raw_logprobs: np.ndarray  # [B, N] float32 under the untempered model
    finish_reasons: list[str]  # "eos", "stop" (a stop string) or "length"
    prompt_lengths: np.ndarray  # [B] int32


# -- the model used for decoding ---------------------------------------------------------------------

_DECODING_MODELS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def decoding_model(model: Decoder) -> Decoder:
    """``model`` as generation reads it, built once and reused until its weights change: one
    module per layer and, on CPU for plain Llama layers, also its matrices packed in column strips
    for prefills and many-row decode steps (:func:`jaxlab.models.decoder.with_packed_weights`;
    one more copy of them in memory, ``JAXLAB_STRIPS=0`` turns it off).

    On CPU the weights are also moved to huge pages (:func:`jaxlab.native.advise_huge_pages`):
    every decode step streams them all.
    """
    fingerprint = tuple(id(x) for x in jax.tree.leaves(nnx.state(model)))
    hit = _DECODING_MODELS.get(model)
    if hit is not None and hit[0] == fingerprint:
        return model if hit[1] is None else hit[1]
    derived = with_layer_layout(model, scan_layers=False) if model.config.scan_layers else None
    if packs_weights(derived or model):
        derived = with_packed_weights(derived or model)
    decoding = model if derived is None else derived
    native.advise_huge_pages(jax.tree.leaves(nnx.state(decoding)))
    _DECODING_MODELS[model] = (fingerprint, derived)  # None: the model itself (no self-reference)
    return decoding


# -- jitted pieces -----------------------------------------------------------------------------------

_STATIC = ("graphdef", "top_k", "top_p", "greedy")


@functools.partial(jax.jit, static_argnames=(*_STATIC, "cache_len", "n_bucket", "pad_id"))
def _prefill(
    state,
    ids,
    mask,
    key,
    temperature,
    *,
    graphdef,
    top_k,
    top_p,
    greedy,
    cache_len,
    n_bucket,
    pad_id,
):
    """Runs the prompt, samples the first token, and builds the decode carry."""
    model = nnx.merge(graphdef, state)
    b = ids.shape[0]
    cache = model.init_cache(b, cache_len)
    logits, cache = model(ids, attention_mask=mask, cache=cache, logits_to_keep=1)
    key, sub = jax.random.split(key)
    tok, lp, raw = sample_tokens(
        logits[:, -1], sub, temperature=temperature, top_k=top_k, top_p=top_p, greedy=greedy
    )
    return {
        "step": jnp.int32(1),
        "prev": tok,
        "done": jnp.zeros((b,), bool),
        "lengths": jnp.ones((b,), jnp.int32),
        "tokens": jnp.full((b, n_bucket), pad_id, jnp.int32).at[:, 0].set(tok),
        "logprobs": jnp.zeros((b, n_bucket), jnp.float32).at[:, 0].set(lp),
        "raw_logprobs": jnp.zeros((b, n_bucket), jnp.float32).at[:, 0].set(raw),
        "cache": cache,
        "key": key,
    }


@functools.partial(
    jax.jit, static_argnames=(*_STATIC, "eos_ids", "pad_id"), donate_argnames=("carry",)
)
def _decode(state, carry, temperature, until, *, graphdef, top_k, top_p, greedy, eos_ids, pad_id):
    """Decodes until every row is done or ``step`` reaches ``until`` (a traced bound)."""
    model = nnx.merge(graphdef, state)
    eos = jnp.asarray(eos_ids, jnp.int32)
    carry = dict(carry, done=carry["done"] | jnp.isin(carry["prev"], eos))

    def cond(c):
        return (c["step"] < until) & ~jnp.all(c["done"])

    def body(c):
        logits, cache = model(c["prev"][:, None], cache=c["cache"])
        key, sub = jax.random.split(c["key"])
        tok, lp, raw = sample_tokens(
            logits[:, 0], sub, temperature=temperature, top_k=top_k, top_p=top_p, greedy=greedy
        )
        live = ~c["done"]
        tok = jnp.where(live, tok, pad_id)
        step = c["step"]
        return {
            "step": step + 1,
            "prev": tok,
            "done": c["done"] | jnp.isin(tok, eos),
            "lengths": c["lengths"] + live.astype(jnp.int32),
            "tokens": c["tokens"].at[:, step].set(tok),
            "logprobs": c["logprobs"].at[:, step].set(jnp.where(live, lp, 0.0)),
            "raw_logprobs": c["raw_logprobs"].at[:, step].set(jnp.where(live, raw, 0.0)),
            "cache": cache,
            "key": key,
        }

    return jax.lax.while_loop(cond, body, carry)


def generate_tokens(
    model: Decoder,
    input_ids: np.ndarray,  # [B, P] left-padded
    attention_mask: np.ndarray,  # [B, P]
    *,
    max_new_tokens: int,
    eos_ids: Sequence[int],
    pad_id: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int = 0,
    chunk: int | None = None,
    on_chunk: Callable[[np.ndarray, np.ndarray], np.ndarray | None] | None = None,
):
    """Token-level generation on an already padded batch; see :func:`generate`.

    Args:
      chunk: decode this many steps per device call (default: all at once). Between chunks,
        ``on_chunk(tokens [B, n], lengths [B])`` sees what is generated so far and may return a
        boolean ``[B]`` of rows to stop (stop strings, streaming).

    Returns numpy ``(tokens [B, N], logprobs, raw_logprobs, lengths [B], ended_on_eos [B])``.
    """
    if not isinstance(model, Decoder):
        raise TypeError(f"generation needs a decoder LM, got {type(model).__name__}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must lie in (0, 1], got {top_p}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")
    input_ids, attention_mask = np.asarray(input_ids), np.asarray(attention_mask)
    if input_ids.ndim != 2 or input_ids.shape != attention_mask.shape or input_ids.shape[0] == 0:
        raise ValueError(
            f"input_ids {input_ids.shape} and attention_mask {attention_mask.shape} must be one "
            "non-empty [B, P] shape"
        )
    b, p = input_ids.shape
    limit = model.config.max_position_embeddings
    longest = int(attention_mask.sum(-1).max())  # real tokens, not the padded width
    if longest + max_new_tokens > limit:
        raise ValueError(
            f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
            f"context of {limit} tokens"
        )
    # bucket the batch size and the prompt width (left padding) so that new shapes rarely compile
    b_bucket = bucket_length(b, 2 * b, granularity=64)
    width = bucket_length(p, max(limit - max_new_tokens, p), granularity=64)
    if (b_bucket, width) != (b, p):
        ids = np.full((b_bucket, width), pad_id, np.int32)
        msk = np.zeros((b_bucket, width), np.int32)
        ids[:b, width - p :] = input_ids
        msk[:b, width - p :] = attention_mask
        input_ids, attention_mask = ids, msk
    n_bucket = bucket_length(max_new_tokens, max(max_new_tokens, 1) * 2, granularity=64)
    cache_len = bucket_length(width + n_bucket, width + n_bucket, granularity=64)
    dec = decoding_model(model)
    graphdef, state = nnx.split(dec)
    static = dict(
        graphdef=graphdef,
        top_k=min(int(top_k), model.config.vocab_size),
        top_p=float(top_p),
        greedy=temperature == 0.0,
    )
    temp = jnp.float32(max(temperature, 1e-6))
    carry = _prefill(
        state,
        jnp.asarray(input_ids, jnp.int32),
        jnp.asarray(attention_mask, bool),
        jax.random.key(seed),
        temp,
        cache_len=int(cache_len),
        n_bucket=int(n_bucket),
        pad_id=int(pad_id),
        **static,
    )
    eos = tuple(int(e) for e in eos_ids)
    step = 1
    while True:
        until = max_new_tokens if chunk is None else min(step + chunk, max_new_tokens)
        carry = _decode(
            state, carry, temp, jnp.int32(until), eos_ids=eos, pad_id=int(pad_id), **static
        )
        step = int(carry["step"])
        done = np.asarray(carry["done"])
        if on_chunk is not None:
            stop = on_chunk(
                np.asarray(carry["tokens"])[:b, :step], np.asarray(carry["lengths"])[:b]
            )
            if stop is not None:
                stop = np.pad(np.asarray(stop, bool), (0, len(done) - b))
                if np.any(stop & ~done):
                    carry = dict(carry, done=jnp.asarray(done | stop))
                    done = done | stop
        if step >= max_new_tokens or done.all():
            break
    tokens = np.array(carry["tokens"][:b, :max_new_tokens])
    logprobs = np.array(carry["logprobs"][:b, :max_new_tokens])
    raw = np.array(carry["raw_logprobs"][:b, :max_new_tokens])
    lengths = np.array(carry["lengths"][:b])
    last = tokens[np.arange(b), np.maximum(lengths - 1, 0)]
    ended = np.isin(last, np.asarray(eos, np.int32)) if eos else np.zeros((b,), bool)
    return tokens, logprobs, raw, lengths, ended


# -- text level ---------------------------------------------------------------------------------------


def _cut_at_stop(
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
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int = 0,
    stop: Sequence[str] | None = None,
    chat: bool = False,
    stream: Callable[[str], None] | None = None,
) -> GenerationResult:
    """Generates continuations of ``prompts``; ``temperature=0`` is greedy.

    Prompts are left-padded into one batch whose size and width are bucketed; generation stops per
    row at EOS (or the chat end-of-turn token) and at the first ``stop`` string (checked between
    decode chunks, so a finished row stops costing work). ``chat=True`` renders each prompt with
    the chat template; a prompt may then also be a list of ``{"role", "content"}`` messages.
    ``stream`` receives the first prompt's new text as it is produced.

    ``texts`` end before a stop string; ``tokens`` / ``lengths`` / ``logprobs`` keep what was
    generated up to and including it. ``logprobs`` are under the distribution sampled from
    (temperature, top-k, top-p applied); for greedy decoding, whose distribution is a point mass,
    they are the model's own log-probabilities, as are ``raw_logprobs`` always.
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
    texts_in = [tokenizer.apply_chat_template(p) for p in prompts] if chat else list(prompts)
    rows, _ = tokenizer.encode_truncated(texts_in, None, add_special_tokens=not chat)
    if any(len(r) == 0 for r in rows):
        raise ValueError("an empty prompt has nothing to condition on")
    b = len(rows)
    limit = model.config.max_position_embeddings
    longest = max(len(r) for r in rows)
    if longest + max_new_tokens > limit:
        raise ValueError(
            f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
            f"context of {limit} tokens"
        )
    batch = tokenizer.pad(rows)  # generate_tokens buckets the batch size and the width
    stop = [s for s in (stop or ()) if s]
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
            [any(s in tokenizer.decode(tokens[i, : lengths[i]]) for s in stop) for i in range(b)]
        )

    chunk = 16 if stop else (4 if stream is not None else None)
    tokens, logprobs, raw, lengths, ended = generate_tokens(
        model,
        batch.input_ids,
        batch.attention_mask,
        max_new_tokens=max_new_tokens,
        eos_ids=tokenizer.eos_token_ids,
        pad_id=tokenizer.pad_token_id,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        seed=seed,
        chunk=chunk,
        on_chunk=on_chunk if (stop or stream is not None) else None,
    )
    texts, reasons = [], []
    for i in range(b):
        n = int(lengths[i])
        reason = "eos" if ended[i] else "length"
        text, cut, hit = _cut_at_stop(tokenizer, tokens[i], n, stop)
        if hit:
            reason = "stop"
            tokens[i, cut:] = tokenizer.pad_token_id
            logprobs[i, cut:] = 0.0
            raw[i, cut:] = 0.0
            lengths[i] = cut
        texts.append(text)
        reasons.append(reason)
    if stream is not None:
        stream(texts[0][streamed[0] :] if len(texts[0]) >= streamed[0] else "")
    return GenerationResult(
        texts=texts,
        tokens=tokens,
        logprobs=logprobs,
        lengths=lengths.astype(np.int32),
        raw_logprobs=raw,
        finish_reasons=reasons,
        prompt_lengths=np.asarray([len(r) for r in rows], np.int32),
    )
