"""Sentence embeddings from an encoder: batched, length-sorted, bucketed, jitted."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlab.models.bert import BertEncoder
from jaxlab.progress import progress as progress_bar
from jaxlab.tokenization import Tokenizer, bucket_length

__all__ = ["encode", "encode_ids", "encode_limit", "resolve_prompt"]


# Texts per step of the loop inside the jitted batch on CPU: a micro-batch's activations (~1K
# tokens) stay in cache through each layer, faster than one [B, T] pass (docs/benchmarks.md,
# MiniLM encoding). Accelerators run
# the whole batch at once.
MICRO_BATCH = 4


@functools.lru_cache(maxsize=8)
def _embed_fn(graphdef):
    @jax.jit
    def run(state, ids, mask, skip):
        """``skip`` [B]: leading tokens of each row left out of pooling (a prompt not pooled)."""
        model = nnx.merge(graphdef, state)
        b, t = ids.shape
        pool_mask = mask & (jnp.arange(t)[None] >= skip[:, None])
        m = MICRO_BATCH if b % MICRO_BATCH == 0 else 1
        if m == b or jax.default_backend() != "cpu":
            return model.embed(ids, attention_mask=mask, pool_mask=pool_mask)
        step = lambda xs: model.embed(xs[0], attention_mask=xs[1], pool_mask=xs[2])
        split = lambda x: x.reshape(b // m, m, t)
        out = jax.lax.map(step, (split(ids), split(mask), split(pool_mask)))
        return out.reshape(b, -1)

    return run


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def encode_limit(model: BertEncoder, tokenizer: Tokenizer, max_length: int | None = None) -> int:
    """Tokens per text: ``max_length``, else the tokenizer's limit, else the position table, capped
    at the position table."""
    pos = model.config.max_position_embeddings
    return min(max_length or tokenizer.model_max_length or pos, pos)


def encode(
    model: BertEncoder,
    tokenizer: Tokenizer,
    texts: Sequence[str],
    *,
    batch_size: int = 32,
    max_length: int | None = None,
    progress: bool = False,
    prompt_name: str | None = None,
    prompt: str | None = None,
) -> np.ndarray:
    """Embeds ``texts`` into ``[N, E]`` float32, pooled and normalised as the model is configured.

    Texts are sorted by length and batched so that padding is small; texts longer than the
    model's limit (``max_length``, else the tokenizer's, else the position table) are truncated
    with a warning.

    As in sentence-transformers, ``prompt`` (a string) or ``prompt_name`` (one of the model's
    ``prompts``, e.g. "query" / "document"; default: the model's ``default_prompt_name``) is put
    before every text; a model whose pooling excludes the prompt (``include_prompt: false``) pools
    the text's tokens only.
    """
    if isinstance(texts, str):
        raise TypeError("encode expects a list of texts; wrap a single text in a list")
    if not isinstance(model, BertEncoder):
        raise TypeError(f"encode needs an encoder model, got {type(model).__name__}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = len(texts)
    dim = model.config.hidden_size
    if n == 0:
        return np.zeros((0, dim), np.float32)
    prefix = resolve_prompt(model, prompt_name, prompt)
    limit = encode_limit(model, tokenizer, max_length)
    skip = 0
    if prefix:
        texts = [prefix + t for t in texts]
        if not model.config.pool_prompt:  # [CLS] and the prompt's tokens (sentence-transformers)
            skip = len(tokenizer.encode(prefix, add_special_tokens=True)) - 1
    rows, cut = tokenizer.encode_truncated(texts, limit)
    if cut:
        warnings.warn(
            f"encode: {cut} of {n} texts were longer than {limit} tokens and were truncated",
            stacklevel=2,
        )
    return encode_ids(
        model, tokenizer, rows, batch_size=batch_size, limit=limit, progress=progress, skip=skip
    )


def resolve_prompt(model: BertEncoder, prompt_name: str | None, prompt: str | None) -> str:
    """The prefix put before each text: ``prompt``, else the model's prompt ``prompt_name``, else
    its default prompt, else none."""
    if prompt is not None and prompt_name is not None:
        raise ValueError("give prompt or prompt_name, not both")
    if prompt is not None:
        return prompt
    prompts = dict(model.config.prompts)
    name = prompt_name if prompt_name is not None else model.config.default_prompt_name
    if name is None:
        return ""
    if name not in prompts:
        from jaxlab.errors import UserError

        raise UserError(
            f"prompt name {name!r}: the model has "
            + (f"prompts {sorted(prompts)}" if prompts else "no prompts")
        )
    return prompts[name]


def encode_ids(
    model: BertEncoder,
    tokenizer: Tokenizer,
    rows: Sequence[Sequence[int]],
    *,
    batch_size: int = 32,
    limit: int | None = None,
    progress: bool = False,
    skip: int = 0,
) -> np.ndarray:
    """Embeds already tokenized rows (special tokens included, each at most ``limit`` long);
    the first ``skip`` tokens of each row are not pooled."""
    n = len(rows)
    dim = model.config.hidden_size
    limit = limit or model.config.max_position_embeddings
    if n == 0:
        return np.zeros((0, dim), np.float32)
    if max(len(r) for r in rows) > limit:
        raise ValueError(f"encode_ids: a row is longer than {limit} tokens")
    order = np.argsort([-len(r) for r in rows], kind="stable")
    graphdef, state = nnx.split(model)
    run = _embed_fn(graphdef)
    out = np.zeros((n, dim), np.float32)
    # rows per call: the batch size, or fewer for a short list (powers of two: few compiles)
    padded = _round_up(min(batch_size, 1 << (n - 1).bit_length()), MICRO_BATCH)
    starts = range(0, n, batch_size)
    for start in progress_bar(starts, desc="encode", enabled=progress, total=len(starts)):
        idx = order[start : start + batch_size]
        chunk = [rows[i] for i in idx]
        width = bucket_length(max(len(r) for r in chunk), limit)
        chunk += [[]] * (padded - len(chunk))  # a fixed batch shape: one compile per bucket
        batch = tokenizer.pad(chunk, pad_to=width, side="right")
        skips = jnp.full((padded,), skip, jnp.int32)
        mask = jnp.asarray(batch.attention_mask).astype(bool)
        emb = run(state, jnp.asarray(batch.input_ids), mask, skips)
        out[idx] = np.asarray(emb)[: len(idx)]
    return out
