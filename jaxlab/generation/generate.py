"""Batched generation: prefill of a left-padded batch, then one jitted decode loop over a KV cache.

Letters: B batch, P prompt length, N new tokens, V vocab.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlab.generation.sampling import sample_tokens
from jaxlab.models.decoder import Decoder
from jaxlab.tokenization import Tokenizer, bucket_length

__all__ = ["GenerationResult", "generate", "generate_tokens"]


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


@functools.partial(
    jax.jit,
    static_argnames=(
        "graphdef",
        "max_new_tokens",
        "cache_len",
        "top_k",
        "top_p",
        "greedy",
        "eos_ids",
        "pad_id",
    ),
)
def _generate_core(
    state,
    ids,
    mask,
    key,
    temperature,
    *,
    graphdef,
    max_new_tokens,
    cache_len,
    top_k,
    top_p,
    greedy,
    eos_ids,
    pad_id,
):
    model = nnx.merge(graphdef, state)
    b = ids.shape[0]
    n = max_new_tokens
    eos = jnp.asarray(eos_ids, jnp.int32)
    sample = functools.partial(
        sample_tokens, temperature=temperature, top_k=top_k, top_p=top_p, greedy=greedy
    )

    cache = model.init_cache(b, cache_len)
    logits, cache = model(ids, attention_mask=mask, cache=cache)
    key, sub = jax.random.split(key)
    tok, lp, raw = sample(logits[:, -1], sub)
    tokens = jnp.full((b, n), pad_id, jnp.int32).at[:, 0].set(tok)
    logprobs = jnp.zeros((b, n), jnp.float32).at[:, 0].set(lp)
    raw_logprobs = jnp.zeros((b, n), jnp.float32).at[:, 0].set(raw)
    done = jnp.isin(tok, eos)
    lengths = jnp.ones((b,), jnp.int32)

    def cond(carry):
        step, done = carry[0], carry[2]
        return (step < n) & ~jnp.all(done)

    def body(carry):
        step, prev, done, lengths, tokens, logprobs, raw_logprobs, cache, key = carry
        logits, cache = model(prev[:, None], cache=cache)
        key, sub = jax.random.split(key)
        tok, lp, raw = sample(logits[:, 0], sub)
        live = ~done
        tok = jnp.where(live, tok, pad_id)
        tokens = tokens.at[:, step].set(tok)
        logprobs = logprobs.at[:, step].set(jnp.where(live, lp, 0.0))
        raw_logprobs = raw_logprobs.at[:, step].set(jnp.where(live, raw, 0.0))
        lengths = lengths + live.astype(jnp.int32)
        done = done | jnp.isin(tok, eos)
        return step + 1, tok, done, lengths, tokens, logprobs, raw_logprobs, cache, key

    carry = (jnp.int32(1), tok, done, lengths, tokens, logprobs, raw_logprobs, cache, key)
    _, _, done, lengths, tokens, logprobs, raw_logprobs, _, _ = jax.lax.while_loop(
        cond, body, carry
    )
    return tokens, logprobs, raw_logprobs, lengths, done


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
):
    """Token-level generation on an already padded batch; see :func:`generate`.

    Returns numpy ``(tokens [B, N], logprobs, raw_logprobs, lengths [B], ended_on_eos [B])``.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must lie in (0, 1], got {top_p}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")
    if not isinstance(model, Decoder):
        raise TypeError(f"generation needs a decoder LM, got {type(model).__name__}")
    b, p = input_ids.shape
    limit = model.config.max_position_embeddings
    longest = int(
        np.asarray(attention_mask).sum(-1).max(initial=0)
    )  # real tokens, not padded width
    if longest + max_new_tokens > limit:
        raise ValueError(
            f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
            f"context of {limit} tokens"
        )
    cache_len = bucket_length(p + max_new_tokens, max(limit, p + max_new_tokens), granularity=64)
    graphdef, state = nnx.split(model)
    out = _generate_core(
        state,
        jnp.asarray(input_ids, jnp.int32),
        jnp.asarray(attention_mask, bool),
        jax.random.key(seed),
        jnp.float32(max(temperature, 1e-6)),
        graphdef=graphdef,
        max_new_tokens=int(max_new_tokens),
        cache_len=int(cache_len),
        top_k=min(int(top_k), model.config.vocab_size),
        top_p=float(top_p),
        greedy=temperature == 0.0,
        eos_ids=tuple(int(e) for e in eos_ids),
        pad_id=int(pad_id),
    )
    return tuple(np.array(x) for x in out)  # writable copies


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
) -> GenerationResult:
    """Generates continuations of ``prompts``; ``temperature=0`` is greedy.

    Prompts are left-padded into one batch whose length and size are bucketed (so a new prompt
    length rarely recompiles); generation stops per row at EOS (or the chat end-of-turn token) and
    is cut at the first ``stop`` string. ``chat=True`` renders each prompt with the chat template.

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
    batch_bucket = bucket_length(b, max(b, 1) * 2, granularity=64)
    longest = max(len(r) for r in rows)
    room = max(
        model.config.max_position_embeddings - max_new_tokens, longest
    )  # bucket within the context
    batch = tokenizer.pad(
        rows + [[tokenizer.pad_token_id]] * (batch_bucket - b),
        pad_to=bucket_length(longest, room, granularity=64),
    )
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
    )
    tokens, logprobs, raw, lengths, ended = (x[:b] for x in (tokens, logprobs, raw, lengths, ended))
    texts, reasons = [], []
    for i in range(b):
        n = int(lengths[i])
        reason = "eos" if ended[i] else "length"
        text, cut, hit = _cut_at_stop(tokenizer, tokens[i], n, stop or ())
        if hit:
            reason = "stop"
            tokens[i, cut:] = tokenizer.pad_token_id
            logprobs[i, cut:] = 0.0
            raw[i, cut:] = 0.0
            lengths[i] = cut
        texts.append(text)
        reasons.append(reason)
    return GenerationResult(
        texts=texts,
        tokens=tokens,
        logprobs=logprobs,
        lengths=lengths.astype(np.int32),
        raw_logprobs=raw,
        finish_reasons=reasons,
        prompt_lengths=np.asarray([len(r) for r in rows], np.int32),
    )
