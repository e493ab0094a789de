"""The generation core: one set of jitted steps shared by :func:`generate` and the :class:`Engine`.

- :func:`prefill_rows` runs the prompts of ``R`` rows (one call for all newcomers), writes their
  keys and values into cache rows (``M >= R`` targets: ``n > 1`` samples of a prompt share one
  prefill) and samples each target's first token.
- :func:`decode_steps` decodes up to ``until`` tokens for every live row in a ``while_loop``
  (the Engine asks for one token per call, ``generate`` for a chunk).

Sampling settings enter as per-row arrays (:class:`RowParams`), so one batch mixes requests with
different temperatures, top-k / top-p / min-p, penalties, logit biases and stop tokens without
recompiling. Each row's random key is derived from its request's seed, its sample index and its
token index only, so a seeded request samples the same tokens whatever shares its batch.

Letters: B rows (cache slots), R prompts in a prefill, M prefill targets, P prompt width,
S cache length, C output columns, V vocab, L top-n logprobs (``MAX_LOGPROBS``).
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlab.generation.params import MAX_LOGPROBS, SamplingParams
from jaxlab.models.decoder import KVCache

__all__ = [
    "RowParams",
    "DecodeState",
    "Outputs",
    "Statics",
    "row_params",
    "sample_rows",
    "sampling_logprobs",
    "init_state",
    "PrefixStore",
    "empty_store",
    "store_row",
    "prefill_rows",
    "decode_steps",
]

_NEG_INF = -jnp.inf


class RowParams(NamedTuple):
    """Sampling settings per row, ``[B]`` unless noted (numpy on the host, arrays in the steps)."""

    temperature: np.ndarray  # float32, 0 = greedy
    top_k: np.ndarray  # int32, 0 = off
    top_p: np.ndarray  # float32, 1 = off
    min_p: np.ndarray  # float32, 0 = off
    presence: np.ndarray  # float32
    frequency: np.ndarray  # float32
    repetition: np.ndarray  # float32, 1 = off
    seed: np.ndarray  # [B, 2] uint32: the request's seed, low and high words
    sample: np.ndarray  # int32: the sample's index among the request's n
    max_new: np.ndarray  # int32: the row ends after this many tokens
    stop_ids: np.ndarray  # [B, NS] int32: tokens that end the row (kept); -1 pads
    bias_ids: np.ndarray  # [B, NB] int32: token ids with a logit bias; -1 pads
    bias: np.ndarray  # [B, NB] float32
    logprobs: np.ndarray  # int32: top-n alternatives asked for


def _capacity(n: int, floor: int) -> int:
    """Bucketed width of a padded per-row list: few shapes, so few compilations."""
    c = floor
    while c < n:
        c *= 2
    return c


def row_params(
    rows: Sequence[tuple[SamplingParams, int, int, Sequence[int]]],
    *,
    stop_capacity: int = 8,
    bias_capacity: int = 4,
) -> RowParams:
    """Host arrays for ``rows`` of ``(params, seed, sample index, stop token ids)``.

    The stop token ids are the model's end tokens (unless ``ignore_eos``) and ``stop_token_ids``.
    The padded widths grow past the given capacities only for requests that need more.
    """
    b = len(rows)
    ns = _capacity(max((len(s) for *_, s in rows), default=0), stop_capacity)
    nb = _capacity(max((len(p.logit_bias) for p, *_ in rows), default=0), bias_capacity)
    out = RowParams(
        temperature=np.zeros(b, np.float32),
        top_k=np.zeros(b, np.int32),
        top_p=np.ones(b, np.float32),
        min_p=np.zeros(b, np.float32),
        presence=np.zeros(b, np.float32),
        frequency=np.zeros(b, np.float32),
        repetition=np.ones(b, np.float32),
        seed=np.zeros((b, 2), np.uint32),
        sample=np.zeros(b, np.int32),
        max_new=np.ones(b, np.int32),
        stop_ids=np.full((b, ns), -1, np.int32),
        bias_ids=np.full((b, nb), -1, np.int32),
        bias=np.zeros((b, nb), np.float32),
        logprobs=np.zeros(b, np.int32),
    )
    for i, (p, seed, sample, stop) in enumerate(rows):
        set_row(out, i, p, seed, sample, stop)
    return out


def set_row(
    rp: RowParams, i: int, p: SamplingParams, seed: int, sample: int, stop: Sequence[int]
) -> None:
    """Writes one row of host :class:`RowParams` in place (its padded widths must suffice)."""
    rp.temperature[i] = p.temperature
    rp.top_k[i] = p.top_k
    rp.top_p[i] = p.top_p
    rp.min_p[i] = p.min_p
    rp.presence[i] = p.presence_penalty
    rp.frequency[i] = p.frequency_penalty
    rp.repetition[i] = p.repetition_penalty
    rp.seed[i] = (seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF)
    rp.sample[i] = sample
    rp.max_new[i] = p.max_new_tokens
    rp.stop_ids[i] = -1
    rp.stop_ids[i, : len(stop)] = list(stop)
    rp.bias_ids[i] = -1
    rp.bias[i] = 0.0
    for j, (tok, b) in enumerate(p.logit_bias):
        rp.bias_ids[i, j], rp.bias[i, j] = tok, b
    rp.logprobs[i] = p.logprobs


def clear_row(rp: RowParams, i: int) -> None:
    """Resets row ``i`` to inert settings (a free slot: greedy, no penalties, no biases)."""
    rp.temperature[i] = 0.0
    rp.top_k[i] = 0
    rp.top_p[i] = 1.0
    rp.min_p[i] = 0.0
    rp.presence[i] = 0.0
    rp.frequency[i] = 0.0
    rp.repetition[i] = 1.0
    rp.bias_ids[i] = -1
    rp.bias[i] = 0.0
    rp.logprobs[i] = 0


# -- sampling ------------------------------------------------------------------------------------


def row_keys(seed, sample, index):
    """One key per row from its seed words ``[B, 2]``, sample index ``[B]`` and token index ``[B]``."""

    def one(s, j, t):
        key = jax.random.fold_in(jax.random.key(s[0]), s[1])
        return jax.random.fold_in(jax.random.fold_in(key, j), t)

    return jax.vmap(one)(seed, sample, index)


def _filter_rows(y, top_k, top_p, min_p):
    """Per-row top-k, then top-p, then min-p over tempered logits ``y [B, V]`` (-inf removed)."""
    v = y.shape[-1]
    s = -jnp.sort(-y, axis=-1)  # descending
    ranks = jnp.arange(v)[None, :]
    k = jnp.where(top_k > 0, jnp.minimum(top_k, v), v)[:, None]
    s = jnp.where(ranks < k, s, _NEG_INF)
    probs = jax.nn.softmax(s, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly above each sorted token
    keep = (ranks < k) & ((before < top_p[:, None]) | (top_p[:, None] >= 1.0))
    keep = keep & (s >= s[:, :1] + jnp.log(min_p)[:, None])  # min_p 0: log 0 = -inf keeps all
    keep = keep.at[:, 0].set(True)  # the most likely token always stays
    threshold = jnp.min(jnp.where(keep, s, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(y < threshold, _NEG_INF, y)


def sampling_logprobs(logits, tokens, *, temperature, top_k=0, top_p=1.0, min_p=0.0):
    """log-probabilities ``[...]`` of ``tokens`` under the distribution generation samples from
    with these settings (temperature, then the top-k / top-p / min-p filters), from ``logits
    [..., V]``: the behaviour distribution that a trainer must score its rollouts with. Which
    tokens the filters keep is held fixed under differentiation."""
    v = logits.shape[-1]
    flat = logits.reshape(-1, v).astype(jnp.float32) / temperature
    n = flat.shape[0]
    if top_k or top_p < 1.0 or min_p > 0.0:
        kept = _filter_rows(
            jax.lax.stop_gradient(flat),
            jnp.full((n,), top_k, jnp.int32),
            jnp.full((n,), top_p, jnp.float32),
            jnp.full((n,), min_p, jnp.float32),
        )
        flat = jnp.where(jnp.isfinite(kept), flat, _NEG_INF)
    lp = jax.nn.log_softmax(flat, axis=-1)
    picked = jnp.take_along_axis(lp, tokens.reshape(-1, 1).astype(jnp.int32), axis=-1)
    return picked.reshape(tokens.shape)


def _penalized(logits, rp: RowParams, counts, seen):
    """Repetition, frequency and presence penalties, then logit biases (see SamplingParams)."""
    b, v = logits.shape
    out_seen = counts > 0
    rep = rp.repetition[:, None]
    x = jnp.where(seen | out_seen, jnp.where(logits > 0, logits / rep, logits * rep), logits)
    x = x - rp.frequency[:, None] * counts - rp.presence[:, None] * out_seen
    ids = jnp.where(rp.bias_ids >= 0, rp.bias_ids, v)  # padding: out of range, dropped
    return x.at[jnp.arange(b)[:, None], ids].add(rp.bias, mode="drop")


def _xla_greedy(logits):
    tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    lp = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), tokens[:, None], axis=-1)[:, 0]
    return tokens, lp


def sample_rows(logits, rp: RowParams, counts, seen, index, *, greedy_tokens=None):
    """Samples one token per row of ``logits [B, V]`` with each row's own settings.

    Args:
      counts: ``[B, V]`` int32, how often each token was generated so far (penalties).
      seen: ``[B, V]`` bool, the prompt's tokens (repetition penalty).
      index: ``[B]`` int32, the token's index in its sequence (its key).
      greedy_tokens: a fused ``logits -> (argmax, log-prob)`` (the decoding model's, on CPU).

    Returns ``(tokens [B], logprobs [B], raw_logprobs [B], top_ids [B, L], top_logprobs [B, L])``:
    the log-probability of each token under the distribution sampled from (penalties, biases,
    temperature and filters applied; for greedy rows the model's own), under the model's own
    distribution, and the L most likely tokens of the model's own distribution (zeros unless a
    row asks for them).
    """
    logits = logits.astype(jnp.float32)
    b, v = logits.shape
    top_shape = ((b, MAX_LOGPROBS), jnp.int32), ((b, MAX_LOGPROBS), jnp.float32)
    plain = (
        jnp.all(rp.temperature == 0)
        & jnp.all(rp.presence == 0)
        & jnp.all(rp.frequency == 0)
        & jnp.all(rp.repetition == 1)
        & jnp.all(rp.bias_ids < 0)
        & jnp.all(rp.logprobs == 0)
    )

    def fast(_):  # every row greedy with nothing else asked: one fused pass where there is one
        tok, lp = (greedy_tokens or _xla_greedy)(logits)
        return tok, lp, lp, *(jnp.zeros(s, d) for s, d in top_shape)

    def general(_):
        raw = jax.nn.log_softmax(logits, axis=-1)
        x = _penalized(logits, rp, counts, seen)
        greedy = rp.temperature == 0
        best = jnp.argmax(x, axis=-1).astype(jnp.int32)
        filtering = jnp.any(
            ~greedy & ((rp.top_k > 0) & (rp.top_k < v) | (rp.top_p < 1) | (rp.min_p > 0))
        )

        def draw(x):  # some row samples: one uniform per row against its distribution's CDF
            y = x / jnp.where(greedy, 1.0, rp.temperature)[:, None]
            y = jax.lax.cond(
                filtering, lambda y: _filter_rows(y, rp.top_k, rp.top_p, rp.min_p), lambda y: y, y
            )
            lse = jax.nn.logsumexp(y, axis=-1, keepdims=True)
            cdf = jnp.cumsum(jnp.exp(y - lse), axis=-1)
            keys = row_keys(rp.seed, rp.sample, index)
            u = 1.0 - jax.vmap(jax.random.uniform)(keys)  # (0, 1]: a token of mass 0 is never hit
            sampled = jnp.minimum(jnp.sum(cdf < u[:, None] * cdf[:, -1:], axis=-1), v - 1)
            tok = jnp.where(greedy, best, sampled.astype(jnp.int32))
            picked = jnp.take_along_axis(y, tok[:, None], -1)[:, 0]
            # a rounding step of the scan could land on a removed token: take the top one then
            tok = jnp.where(jnp.isfinite(picked), tok, jnp.argmax(y, axis=-1).astype(jnp.int32))
            picked = jnp.take_along_axis(y, tok[:, None], -1)[:, 0]
            return tok, picked - lse[:, 0]

        tok, lp_y = jax.lax.cond(
            jnp.any(~greedy), draw, lambda x: (best, jnp.zeros((b,), jnp.float32)), x
        )
        raw_lp = jnp.take_along_axis(raw, tok[:, None], axis=-1)[:, 0]

        def top(raw):
            vals, ids = jax.lax.top_k(raw, min(MAX_LOGPROBS, v))
            pad = MAX_LOGPROBS - vals.shape[-1]
            return jnp.pad(ids, ((0, 0), (0, pad))), jnp.pad(vals, ((0, 0), (0, pad)))

        top_ids, top_lps = jax.lax.cond(
            jnp.any(rp.logprobs > 0),
            top,
            lambda raw: tuple(jnp.zeros(s, d) for s, d in top_shape),
            raw,
        )
        return tok, jnp.where(greedy, raw_lp, lp_y), raw_lp, top_ids, top_lps

    return jax.lax.cond(plain, fast, general, None)


# -- decode state and the jitted steps -------------------------------------------------------------


class DecodeState(NamedTuple):
    """What the steps carry between calls (donated): the cache and per-row progress."""

    cache: KVCache
    prev: jax.Array  # [B] int32: the last token, fed to the next step
    done: jax.Array  # [B] bool: finished or idle rows (they neither write the cache nor advance)
    length: jax.Array  # [B] int32: tokens generated so far
    counts: jax.Array  # [B, V] int32: how often each token was generated (penalties)
    seen: jax.Array  # [B, V] bool: the prompt's tokens (repetition penalty)


class Outputs(NamedTuple):
    """Per-row output columns written by :func:`decode_steps` (and read by the host)."""

    tokens: jax.Array  # [B, C] int32
    logprobs: jax.Array  # [B, C] float32
    raw_logprobs: jax.Array  # [B, C] float32
    top_ids: jax.Array  # [B, C, L] int32
    top_logprobs: jax.Array  # [B, C, L] float32


class Statics:
    """The jitted steps' static argument (the model's graphdef), hashed once and interned.

    jit hashes its static arguments at every call and compares them with its cached key; a
    graphdef's hash and equality walk every node of the model (~1,300 for SmolLM2). One instance
    per distinct graphdef (:meth:`of`) makes the comparison an identity check, also across
    engines and ``generate`` calls.
    """

    __slots__ = ("graphdef", "_hash", "__weakref__")
    _interned: weakref.WeakValueDictionary = weakref.WeakValueDictionary()

    def __init__(self, graphdef):
        self.graphdef = graphdef
        self._hash = hash(graphdef)

    @classmethod
    def of(cls, graphdef) -> Statics:
        """The one instance for graphdefs equal to ``graphdef``."""
        made = cls(graphdef)  # hashes it once
        hit = cls._interned.get(made._hash)
        if hit is not None and hit.graphdef == graphdef:
            return hit
        cls._interned[made._hash] = made
        return made

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other) -> bool:
        return self is other or (
            isinstance(other, Statics)
            and self._hash == other._hash
            and self.graphdef == other.graphdef
        )


def _greedy_of(model):
    return getattr(model, "greedy_tokens", None)  # a decoding model's fused CPU argmax, if any


def empty_outputs(b: int, c: int) -> Outputs:
    return Outputs(
        tokens=jnp.zeros((b, c), jnp.int32),
        logprobs=jnp.zeros((b, c), jnp.float32),
        raw_logprobs=jnp.zeros((b, c), jnp.float32),
        top_ids=jnp.zeros((b, c, MAX_LOGPROBS), jnp.int32),
        top_logprobs=jnp.zeros((b, c, MAX_LOGPROBS), jnp.float32),
    )


def _init_state(model, rows: int, cache_len: int) -> DecodeState:
    v = model.config.vocab_size
    return DecodeState(
        cache=model.init_cache(rows, cache_len),
        prev=jnp.zeros((rows,), jnp.int32),
        done=jnp.ones((rows,), bool),
        length=jnp.zeros((rows,), jnp.int32),
        counts=jnp.zeros((rows, v), jnp.int32),
        seen=jnp.zeros((rows, v), bool),
    )


@functools.partial(jax.jit, static_argnames=("static", "rows", "cache_len", "columns"))
def init_state(state, *, static: Statics, rows: int, cache_len: int, columns: int):
    """``(DecodeState, Outputs)``: ``rows`` idle rows over a cache of ``cache_len`` slots, and
    ``columns`` empty output columns."""
    model = nnx.merge(static.graphdef, state)
    return _init_state(model, rows, cache_len), empty_outputs(rows, columns)


class PrefixStore(NamedTuple):
    """Cached keys and values of finished sequences (the Engine's prefix cache), ``C`` entries
    of ``S`` slots laid out as the cache rows they were copied from."""

    k: tuple[jax.Array, ...]  # L arrays [C, K, S, D]
    v: tuple[jax.Array, ...]
    valid: jax.Array  # [C, S] bool
    tokens: jax.Array  # [C, S] int32: the token in each valid slot (-1 elsewhere)


def empty_store(cache: KVCache, entries: int) -> PrefixStore:
    """A store of ``entries`` rows shaped like ``cache``'s rows."""
    s = cache.valid.shape[1]
    return PrefixStore(
        k=tuple(jnp.zeros((entries, *x.shape[1:]), x.dtype) for x in cache.k),
        v=tuple(jnp.zeros((entries, *x.shape[1:]), x.dtype) for x in cache.v),
        valid=jnp.zeros((entries, s), bool),
        tokens=jnp.full((entries, s), -1, jnp.int32),
    )


@functools.partial(jax.jit, donate_argnames=("store",))
def store_row(store: PrefixStore, cache: KVCache, row, entry, tokens, keep) -> PrefixStore:
    """Copies cache row ``row`` into store entry ``entry``: its first ``keep`` slots (the rest
    invalid), with ``tokens [S]`` the token of each slot."""
    s = cache.valid.shape[1]
    upto = jnp.arange(s) < keep

    def put(big, rows):
        return big.at[entry].set(rows[row])

    return PrefixStore(
        k=jax.tree.map(put, store.k, cache.k),
        v=jax.tree.map(put, store.v, cache.v),
        valid=store.valid.at[entry].set(cache.valid[row] & upto),
        tokens=store.tokens.at[entry].set(jnp.where(upto, tokens, -1)),
    )


@functools.partial(jax.jit, static_argnames=("static", "row_len"), donate_argnames=("ds",))
def _prefill_rows(
    state,
    ds: DecodeState,
    rp: RowParams,
    ids,
    mask,
    src,
    dest,
    fresh,
    start=None,
    entry=None,
    gather=None,
    store: PrefixStore | None = None,
    *,
    static,
    row_len: int | None = None,
):
    """Prefills ``R`` prompts and writes them into cache rows; samples each target's first token.

    Args:
      ds: the decode state (donated).
      rp: the targets' settings, ``[M]`` rows.
      ids, mask: ``[R, P]`` left-padded prompts, or the part of them after a cached prefix
        (all-padding rows are allowed).
      src: ``[M]`` int32, the prompt each target copies; dest: ``[M]`` int32, its cache row
        (``B`` or more: dropped, for padding).
      fresh: ``[M]`` bool. False: only rebuild the row's cache (a sequence in flight after a
        weight swap, whose ids are its prompt and tokens but the last); its token, length and
        counts stay, and nothing it samples here is used.
      start, entry, gather, store: a prompt's cached prefix of ``start[r]`` tokens (0: none):
        slots ``gather[r, :start[r]]`` of store entry ``entry[r]`` are copied to the row's first
        slots, and ``ids`` continue after them.
      row_len: static; the rows' width (at least ``max(start) + P``) when a store is given.

    Returns ``(ds, tokens [M], logprobs [M], raw_logprobs [M], top_ids [M, L], top_lps [M, L])``.
    Each row's cache then holds its prompt's slots (padding invalid) and writes from slot
    ``start + P``.
    """
    model = nnx.merge(static.graphdef, state)
    r, p = ids.shape
    b, v = ds.counts.shape
    m = src.shape[0]
    width = p if store is None else row_len
    row = model.init_cache(r, width)
    prompt_ids = jnp.where(mask, ids, v)  # padding: out of range, dropped
    seen = jnp.zeros((r, v), bool).at[jnp.arange(r)[:, None], prompt_ids].set(True, mode="drop")
    if store is None:
        begin = jnp.zeros((r,), jnp.int32)
    else:  # the cached prefix first: its keys, values and tokens (for the repetition penalty)
        begin = start
        cached = jnp.arange(width)[None, :] < start[:, None]  # [R, width]

        def take(pool):  # the prefix's slots gathered to the front: padding never accumulates
            got = jnp.take_along_axis(pool[entry], gather[:, None, :, None], axis=2)
            return jnp.where(cached[:, None, :, None], got, 0).astype(got.dtype)

        row = KVCache(
            k=jax.tree.map(take, store.k),
            v=jax.tree.map(take, store.v),
            index=start,
            valid=cached,
        )
        old = jnp.where(cached, jnp.take_along_axis(store.tokens[entry], gather, axis=1), v)
        seen = seen.at[jnp.arange(r)[:, None], old].set(True, mode="drop")
    logits, row = model(ids, attention_mask=mask, cache=row, logits_to_keep=1)
    logits = logits[:, -1][src]
    seen = seen[src]
    counts = jnp.zeros((m, v), jnp.int32)
    zero = jnp.zeros((m,), jnp.int32)
    tok, lp, raw, top_ids, top_lps = sample_rows(
        logits, rp, counts, seen, zero, greedy_tokens=_greedy_of(model)
    )
    counts = counts.at[jnp.arange(m), tok].add(1)
    stop = jnp.any(tok[:, None] == rp.stop_ids, axis=-1) | (rp.max_new <= 1)

    def put(big, small):  # big [B, K, S, D] <- small [R, K, width, D] at rows dest
        return big.at[dest, :, :width].set(small[src].astype(big.dtype), mode="drop")

    def keep_or(old, new):  # fresh targets take the new value; the others keep theirs
        cond = fresh.reshape(fresh.shape + (1,) * (new.ndim - 1))
        return old.at[dest].set(jnp.where(cond, new, old[jnp.minimum(dest, b - 1)]), mode="drop")

    s = ds.cache.valid.shape[1]
    cache = KVCache(
        k=jax.tree.map(put, ds.cache.k, row.k),
        v=jax.tree.map(put, ds.cache.v, row.v),
        index=ds.cache.index.at[dest].set((begin + p)[src], mode="drop"),
        valid=ds.cache.valid.at[dest].set(
            jnp.pad(row.valid, ((0, 0), (0, s - width)))[src], mode="drop"
        ),
    )
    ds = DecodeState(
        cache=cache,
        prev=keep_or(ds.prev, tok),
        done=keep_or(ds.done, stop),
        length=keep_or(ds.length, jnp.ones((m,), jnp.int32)),
        counts=keep_or(ds.counts, counts),
        seen=keep_or(ds.seen, seen),
    )
    return ds, tok, lp, raw, top_ids, top_lps


@functools.partial(jax.jit, static_argnames=("static",), donate_argnames=("ds", "out"))
def _decode_steps(
    state, ds: DecodeState, out: Outputs, rp: RowParams, stop, col0, until, pad, *, static
):
    """Decodes until every row is done or ``until`` tokens were made, writing column ``col0 + j``
    of ``out`` at the j-th token.

    Args:
      ds, out: donated. rp: ``[B]`` rows' settings.
      stop: ``[B]`` bool, rows the host ends now (stop strings, cancellations, idle slots).
      col0, until, pad: traced int32 scalars (the first column, the most tokens, the id written
        for rows that are done).

    Returns ``(ds, out, steps)``: the tokens made per row are ``out`` columns
    ``[col0, col0 + steps)`` where the row was live (``pad`` and zeros elsewhere).
    """
    model = nnx.merge(static.graphdef, state)
    greedy = _greedy_of(model)
    b = ds.prev.shape[0]
    ds = ds._replace(done=ds.done | stop)

    def cond(c):
        j, ds, _ = c
        return (j < until) & ~jnp.all(ds.done)

    def body(c):
        j, ds, out = c
        live = ~ds.done
        logits, cache = model(ds.prev[:, None], attention_mask=live[:, None], cache=ds.cache)
        cache = cache._replace(index=jnp.where(live, cache.index, ds.cache.index))
        tok, lp, raw, top_ids, top_lps = sample_rows(
            logits[:, 0], rp, ds.counts, ds.seen, ds.length, greedy_tokens=greedy
        )
        tok = jnp.where(live, tok, pad)
        length = ds.length + live.astype(jnp.int32)
        hit = jnp.any(tok[:, None] == rp.stop_ids, axis=-1) | (length >= rp.max_new)
        ds = DecodeState(
            cache=cache,
            prev=tok,
            done=ds.done | (live & hit),
            length=length,
            counts=ds.counts.at[jnp.arange(b), tok].add(live.astype(jnp.int32)),
            seen=ds.seen,
        )
        col = col0 + j
        zero = jnp.zeros_like(lp)
        out = Outputs(
            tokens=out.tokens.at[:, col].set(tok),
            logprobs=out.logprobs.at[:, col].set(jnp.where(live, lp, zero)),
            raw_logprobs=out.raw_logprobs.at[:, col].set(jnp.where(live, raw, zero)),
            top_ids=out.top_ids.at[:, col].set(top_ids),
            top_logprobs=out.top_logprobs.at[:, col].set(top_lps),
        )
        return j + 1, ds, out

    steps, ds, out = jax.lax.while_loop(cond, body, (jnp.int32(0), ds, out))
    return ds, out, steps


# public names; the jitted functions keep a leading underscore so that compile logs name them
# ``_prefill_rows`` / ``_decode_steps`` (tests count compilations by those names)
prefill_rows = _prefill_rows
decode_steps = _decode_steps
