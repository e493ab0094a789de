"""Continuous batching: a fixed number of decode slots, refilled the moment a sequence ends.

Each :meth:`Engine.step` prefills the newcomers that fit into free slots in one jitted call (a
request with ``n`` samples takes ``n`` slots and one prefill), then decodes one token for every
active slot in one jitted call; both are the shared core of :mod:`jaxlab.generation.core`, so
each request samples with its own :class:`SamplingParams` and one batch mixes them without
recompiling. A sequence leaves its slot at its own end token, stop string or token limit; nothing
waits for the longest member of a batch. The engine records the occupied fraction of slots at
every step (the basis of SortedRL's bubble ratio), can swap in new weights between steps, and
tags each generated token with the policy version that produced it.

Threads: one thread drives :meth:`step` (or :meth:`step_deltas`, :meth:`stream`, :meth:`run`);
:meth:`submit` and :meth:`cancel` may be called from any other thread meanwhile.

Letters: B slots, S cache slots per row, P prompt width, V vocab.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import threading
import time
from collections.abc import Hashable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlab.generation.core import (
    DecodeState,
    PrefixStore,
    RowParams,
    Statics,
    clear_row,
    decode_steps,
    empty_outputs,
    empty_store,
    prefill_rows,
    row_params,
    set_row,
    store_row,
)
from jaxlab.generation.generate import cut_at_stop, decoding_model
from jaxlab.generation.params import SamplingParams
from jaxlab.models.decoder import Decoder, KVCache, with_layer_layout
from jaxlab.models.lora import merge_lora
from jaxlab.sharding import DEFAULT_RULES, Rules, logical_spec, param_shardings
from jaxlab.tokenization import Tokenizer, bucket_length

__all__ = ["Request", "Completion", "Delta", "Engine", "benchmark_engine_vs_static"]

# the jitted steps' static argument (kept under this name for code that inspects it)
_Statics = Statics


@dataclasses.dataclass
class Request:
    prompt_ids: list[int]
    params: SamplingParams
    request_id: Hashable
    seed: int  # params.seed, or one drawn from the engine's generator

    @property
    def max_new_tokens(self) -> int:
        return self.params.max_new_tokens


@dataclasses.dataclass
class Completion:
    """A finished sequence. ``policy_versions[i]`` is the weights version that sampled token i.

    ``finish_reason``: "eos" (a model end token), "stop" (a stop string or stop token id; which
    one is ``stop_reason``) or "length". ``index`` is the sample's index among the request's
    ``n``. ``text`` (with a tokenizer) ends before a stop string; ``tokens`` keep it.
    """

    request_id: Hashable
    prompt_ids: list[int]
    tokens: list[int]
    logprobs: list[float]  # under the sampling distribution (behaviour log-probs)
    raw_logprobs: list[float]  # under the untempered model
    policy_versions: list[int]
    finish_reason: str
    submitted_step: int
    finished_step: int
    index: int = 0
    text: str | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None  # per token (params.logprobs)
    stop_reason: str | int | None = None
    cached_tokens: int = 0  # prompt tokens served from the prefix cache


@dataclasses.dataclass
class Delta:
    """What one step added to one sequence: its new tokens and text (``None`` without a
    tokenizer; text that could begin a stop string, or an incomplete UTF-8 character, is held
    back until it is decided). The last delta of a sequence carries ``finish_reason`` and the
    :class:`Completion`. ``logprobs`` are under the distribution sampled from (the behaviour
    log-probs), ``raw_logprobs`` under the model's own distribution."""

    request_id: Hashable
    index: int
    tokens: list[int]
    logprobs: list[float]
    text: str | None
    top_logprobs: list[list[tuple[int, float]]] | None = None
    finish_reason: str | None = None
    completion: Completion | None = None
    raw_logprobs: list[float] = dataclasses.field(default_factory=list)  # under the model itself


class _TextStream:
    """Incremental detokenization of one sequence (prefix / read offsets, as TGI and vLLM do),
    with stop-string detection and the hold-back that keeps a stop string out of the stream."""

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str]):
        self.tokenizer, self.stop = tokenizer, tuple(stop)
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.prefix = self.read = 0
        self.text = ""
        self.sent = self.checked = 0

    def update(self, tokens: Sequence[int]) -> str | None:
        """Decodes what ``tokens`` added; returns the first stop string now in the text, if any."""
        decode = self.tokenizer.decode
        before = decode(tokens[self.prefix : self.read])
        now = decode(tokens[self.prefix :])
        if len(now) > len(before) and not now.endswith("\ufffd"):
            self.text += now[len(before) :]
            self.prefix, self.read = self.read, len(tokens)
        if not self.stop:
            return None
        window = self.text[max(0, self.checked - self.hold) :]
        self.checked = len(self.text)
        hits = [(window.find(s), s) for s in self.stop if s in window]
        return min(hits)[1] if hits else None

    def take(self) -> str:
        """New text that can be sent now."""
        end = max(self.sent, len(self.text) - self.hold)
        out, self.sent = self.text[self.sent : end], end
        return out


@dataclasses.dataclass
class _Seq:
    """A sequence in a slot."""

    request: Request
    index: int
    submitted_step: int
    tokens: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[float] = dataclasses.field(default_factory=list)
    raw_logprobs: list[float] = dataclasses.field(default_factory=list)
    versions: list[int] = dataclasses.field(default_factory=list)
    top: list[list[tuple[int, float]]] | None = None
    text: _TextStream | None = None
    cached_tokens: int = 0  # prompt tokens whose keys and values came from the prefix cache
    # where the sequence's tokens lie in its cache row: the prompt and the generated tokens fed
    # at its (re)prefill, the slot the next fed token goes to, and how many generated tokens
    # the prefill fed (those after are fed one per step from next_slot on)
    fed_slots: np.ndarray | None = None
    next_slot: int = 0
    fed_generated: int = 0


@dataclasses.dataclass
class _Item:
    """One prompt row of a prefill: its ids, the tokens still to come and its targets
    ``(slot, sample index, fresh)``; with a cached prefix, the store entry, how many tokens
    come from it, their slots and the slot the rest starts at."""

    ids: list[int]
    rest: int
    targets: list[tuple[int, int, bool]]
    entry: int = 0
    cached: int = 0
    start: int = 0
    prefix_slots: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int32))
    gather: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int32))

    @property
    def new_ids(self) -> list[int]:
        return self.ids[self.cached :]

    def cap(self, max_len: int) -> int:
        """The widest new part this row allows: ``start + width + rest <= max_len``."""
        return max_len - self.rest - self.start


@dataclasses.dataclass
class _Entry:
    """A prefix-cache entry: its tokens, the store slots they lie in, when it was last used."""

    tokens: np.ndarray
    slots: np.ndarray
    used: int


MIN_PREFIX = 8  # fewer cached tokens than this are not worth a copy
# Prefill widths: at least this many columns, powers of two up to 64, then multiples of 64. Few
# shapes (5 up to 256 tokens), so that :meth:`Engine.warmup` can compile them all ahead.
MIN_PREFILL_WIDTH = 32


def _params_to_json(p: SamplingParams) -> dict[str, Any]:
    d = dataclasses.asdict(p)
    d["stop"], d["stop_token_ids"] = list(p.stop), list(p.stop_token_ids)
    d["logit_bias"] = [list(x) for x in p.logit_bias]
    return d


class Engine:
    """Continuous-batching generation over ``num_slots`` rows of a KV cache of ``max_len`` slots.

        engine = Engine(model, num_slots=8, max_len=512, tokenizer=tok)
        engine.submit(ids, SamplingParams(max_new_tokens=128, temperature=0.7, stop=["\\n\\n"]))
        completions = engine.run()           # or: for delta in engine.stream(): ...

    Args:
      model: a :class:`Decoder` (converted once to its decoding form, see :func:`decoding_model`).
      num_slots: rows decoded together.
      max_len: cache slots per row: prompt + new tokens of any request must fit.
      eos_ids, pad_id: end tokens and the id fed to idle slots (default: the tokenizer's).
      tokenizer: needed for stop strings and for text in deltas and completions.
      params: the :class:`SamplingParams` of a :meth:`submit` that gives none (its
        ``max_new_tokens`` may be overridden per submit); ``temperature``, ``top_k``, ``top_p``
        are shorthands for it.
      seed: seeds the generator that draws the seeds of requests that bring none.
      recompute_kv: see :meth:`update_weights`.
      prefix_cache: how many finished sequences to keep the keys and values of (0: none). A new
        request whose prompt starts with one of them (at least :data:`MIN_PREFIX` tokens) copies
        that prefix into its slot and prefills only the rest: multi-turn chats and agent loops
        resend their whole history every turn. Least recently used entries go first; each
        entry holds one cache row (``max_len`` slots of every layer). New weights clear it.
      mesh: decode tensor-parallel over this mesh (:func:`jaxlab.mesh.make_mesh`): the weights
        are placed by ``rules`` (heads, key/value heads, the MLP and the vocabulary split over
        ``tensor``; FSDP's ``embed`` split too if the mesh has ``fsdp``), the KV cache and the
        prefix store are split by key/value heads, and XLA partitions the jitted steps (GSPMD);
        greedy output equals one device's. None: one device, with the CPU's native kernels.
      rules: logical-name rules for ``mesh`` (:data:`jaxlab.sharding.DEFAULT_RULES`).
    """

    def __init__(
        self,
        model: Decoder,
        *,
        num_slots: int = 8,
        max_len: int = 512,
        eos_ids: Sequence[int] | None = None,
        pad_id: int | None = None,
        tokenizer: Tokenizer | None = None,
        params: SamplingParams | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int = 0,
        recompute_kv: bool = True,
        prefix_cache: int = 0,
        mesh: jax.sharding.Mesh | None = None,
        rules: Rules = DEFAULT_RULES,
    ):
        if not isinstance(model, Decoder):
            raise TypeError(f"Engine needs a decoder LM, got {type(model).__name__}")
        if num_slots < 1 or max_len < 2:
            raise ValueError(f"num_slots must be >= 1 and max_len >= 2, got {num_slots}, {max_len}")
        shorthand = {
            k: v
            for k, v in dict(temperature=temperature, top_k=top_k, top_p=top_p).items()
            if v is not None
        }
        self.default_params = (params or SamplingParams()).replace(**shorthand)
        self.num_slots, self.max_len = num_slots, max_len
        self.tokenizer = tokenizer
        if eos_ids is None:
            eos_ids = tokenizer.eos_token_ids if tokenizer is not None else ()
        if pad_id is None:
            pad_id = tokenizer.pad_token_id if tokenizer is not None else 0
        self.eos_ids = tuple(int(e) for e in eos_ids)
        self.pad_id = int(pad_id)
        self._config = model.config
        self._prefix_meta: list[_Entry | None] = [None] * max(int(prefix_cache), 0)
        self._prefix_clock = itertools.count()
        self._stats = dict.fromkeys(
            ("prefill_tokens", "prefix_cache_queries", "prefix_cache_hits", "cached_tokens"), 0
        )
        self.policy_version = 0
        self.device = jax.devices()[0]
        self.mesh, self.rules = mesh, rules
        self._set_model(model)
        self._static = Statics.of(self._graphdef)
        self._reset_state()
        self._rng = np.random.default_rng(seed)
        self._queue: collections.deque[Request] = collections.deque()
        self._slots: list[_Seq | None] = [None] * num_slots
        self._next_id = 0
        self.recompute_kv = recompute_kv
        self._stale: set[int] = set()
        self._cancelled: set[Hashable] = set()
        self._lock = threading.Lock()  # queue, ids, cancellations
        self._work = threading.Condition(self._lock)
        self._step_lock = threading.RLock()  # one step at a time; slots and device state
        self.step_count = 0
        self.occupancy: list[float] = []  # fraction of slots decoding, per step
        self.step_times: list[float] = []

    # -- device state --------------------------------------------------------------------------
    def _reset_state(self) -> None:
        b, v = self.num_slots, self._config.vocab_size
        cache = self._decoding.init_cache(b, self.max_len)
        ds = DecodeState(
            cache=cache,
            prev=jnp.full((b,), self.pad_id, jnp.int32),
            done=jnp.ones((b,), bool),
            length=jnp.zeros((b,), jnp.int32),
            counts=jnp.zeros((b, v), jnp.int32),
            seen=jnp.zeros((b, v), bool),
        )
        store = empty_store(cache, len(self._prefix_meta)) if self._prefix_meta else None
        # Committed to the device like the steps' outputs that replace them, so that the first
        # step's signature is the later steps' one (an uncommitted first state compiles twice).
        self._ds, self._out, self._store = self._place((ds, empty_outputs(b, 1), store))
        self._rp = row_params([(SamplingParams(max_new_tokens=1), 0, 0, ())] * b)
        self._rp_dev: RowParams | None = None

    def _place(self, tree: Any) -> Any:
        """``tree`` (decode state, outputs, prefix store) committed where the steps keep it: the
        engine's device, or on a mesh the keys and values ``[B, K, S, D]`` split by key/value
        heads and everything else replicated."""
        if self.mesh is None:
            return jax.device_put(tree, self.device)
        replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())

        def kv(x):
            spec = logical_spec((None, "kv_heads", None, None), x.shape, self.mesh, self.rules)
            return jax.device_put(x, jax.sharding.NamedSharding(self.mesh, spec))

        def put(node):
            if isinstance(node, KVCache | PrefixStore):
                rest = {f: jax.device_put(getattr(node, f), replicated) for f in node._fields}
                rest.update(k=tuple(map(kv, node.k)), v=tuple(map(kv, node.v)))
                return type(node)(**rest)
            return jax.device_put(node, replicated)

        return jax.tree.map(put, tree, is_leaf=lambda n: isinstance(n, KVCache | PrefixStore))

    def _rows_on_device(self) -> RowParams:
        if self._rp_dev is None:
            self._rp_dev = jax.tree.map(jnp.asarray, self._rp)
        return self._rp_dev

    def _ensure_capacity(self, stop_ids: int, bias: int) -> None:
        """Widens the per-row stop-id / logit-bias arrays when a request needs more room."""
        ns, nb = self._rp.stop_ids.shape[1], self._rp.bias_ids.shape[1]
        if stop_ids <= ns and bias <= nb:
            return
        old = self._rp
        new = row_params(
            [(SamplingParams(max_new_tokens=1), 0, 0, ())] * self.num_slots,
            stop_capacity=max(ns, stop_ids),
            bias_capacity=max(nb, bias),
        )
        for name in RowParams._fields:
            a, b = getattr(new, name), getattr(old, name)
            if a.ndim == 2 and name != "seed":
                a[:, : b.shape[1]] = b
            else:
                a[...] = b
        self._rp, self._rp_dev = new, None

    # -- weights ---------------------------------------------------------------------------------
    def _set_model(self, model: Decoder) -> None:
        if self.mesh is None:
            dec = decoding_model(model)
            graphdef, state = nnx.split(dec)
            # the engine's own single-device copy (the trainer may keep the weights on a mesh)
            self._state = jax.device_put(state, self.device)
        else:  # XLA's partitioned steps (the native CPU kernels run on one device)
            dec = with_layer_layout(merge_lora(model), scan_layers=False)
            graphdef, state = nnx.split(dec)
            self._state = jax.device_put(state, param_shardings(state, self.mesh, self.rules))
        if hasattr(self, "_graphdef") and graphdef != self._graphdef:
            raise ValueError("update_weights needs a model of the same architecture")
        self._graphdef = graphdef
        self._decoding = dec
        self._prefix_meta = [None] * len(self._prefix_meta)  # keys and values of other weights

    def update_weights(self, model: Decoder) -> int:
        """Swaps in new weights between steps; returns the new policy version.

        Sequences in flight continue with the new weights; their earlier tokens keep the version
        that sampled them (``Completion.policy_versions``), with their behaviour log-probs. Their
        KV caches are recomputed with the new weights at the next step (``recompute_kv=True``), so
        that later tokens are sampled from the new policy given the whole prefix; with False the
        old keys/values are kept (cheaper, but later tokens then mix both policies).
        """
        if model.config != self._config:
            raise ValueError("update_weights needs a model with the same config")
        with self._step_lock:
            self._set_model(model)
            self.policy_version += 1
            if self.recompute_kv:
                self._stale.update(i for i, s in enumerate(self._slots) if s is not None)
            return self.policy_version

    # -- snapshots -------------------------------------------------------------------------------
    def snapshot(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """The engine's state between steps: ``(arrays, meta)``, host copies of the KV caches and
        per-row device state, and JSON data for queue, slots, counters and the seed generator.
        Restoring it continues every in-flight sequence exactly as if nothing happened
        (:meth:`restore_snapshot`)."""
        with self._step_lock, self._lock:
            ds = self._ds
            arrays = {
                "k": [np.asarray(x) for x in ds.cache.k],
                "v": [np.asarray(x) for x in ds.cache.v],
                "index": np.asarray(ds.cache.index),
                "valid": np.asarray(ds.cache.valid),
                "prev": np.asarray(ds.prev),
                "done": np.asarray(ds.done),
                "length": np.asarray(ds.length),
                "counts": np.asarray(ds.counts),
                "seen": np.asarray(ds.seen),
            }

            def req(r: Request):
                return {
                    "prompt_ids": r.prompt_ids,
                    "params": _params_to_json(r.params),
                    "request_id": r.request_id,
                    "seed": r.seed,
                }

            meta = {
                "queue": [req(r) for r in self._queue],
                "slots": [
                    None
                    if s is None
                    else {
                        "request": req(s.request),
                        "index": s.index,
                        "tokens": s.tokens,
                        "logprobs": s.logprobs,
                        "raw_logprobs": s.raw_logprobs,
                        "versions": s.versions,
                        "top": s.top,
                        "submitted_step": s.submitted_step,
                    }
                    for s in self._slots
                ],
                "stale": sorted(self._stale),
                "cancelled": sorted(self._cancelled, key=repr),
                "step_count": self.step_count,
                "policy_version": self.policy_version,
                "next_id": self._next_id,
                "rng": self._rng.bit_generator.state,
            }
            return arrays, meta

    def restore_snapshot(self, arrays: dict[str, Any], meta: dict[str, Any]) -> None:
        """Restores :meth:`snapshot` output into an engine built with the same settings."""
        if len(meta["slots"]) != self.num_slots or len(arrays["k"]) != len(self._ds.cache.k):
            raise ValueError("restore_snapshot: the snapshot is of an engine with other settings")

        def req(r):
            p = dict(r["params"])
            p["logit_bias"] = [tuple(x) for x in p["logit_bias"]]
            return Request(list(r["prompt_ids"]), SamplingParams(**p), r["request_id"], r["seed"])

        with self._step_lock, self._lock:
            self._ds = self._place(
                DecodeState(
                    cache=KVCache(
                        k=tuple(jnp.asarray(x) for x in arrays["k"]),
                        v=tuple(jnp.asarray(x) for x in arrays["v"]),
                        index=jnp.asarray(arrays["index"]),
                        valid=jnp.asarray(arrays["valid"]),
                    ),
                    prev=jnp.asarray(arrays["prev"]),
                    done=jnp.asarray(arrays["done"]),
                    length=jnp.asarray(arrays["length"]),
                    counts=jnp.asarray(arrays["counts"]),
                    seen=jnp.asarray(arrays["seen"]),
                )
            )
            self._queue = collections.deque(req(r) for r in meta["queue"])
            self._slots = [None] * self.num_slots
            for i, s in enumerate(meta["slots"]):
                if s is None:
                    clear_row(self._rp, i)
                    continue
                seq = _Seq(
                    req(s["request"]),
                    int(s["index"]),
                    int(s["submitted_step"]),
                    list(s["tokens"]),
                    list(s["logprobs"]),
                    list(s["raw_logprobs"]),
                    list(s["versions"]),
                    None if s["top"] is None else [[tuple(x) for x in t] for t in s["top"]],
                )
                if self.tokenizer is not None:
                    seq.text = _TextStream(self.tokenizer, seq.request.params.stop)
                    seq.text.update(seq.tokens)
                    seq.text.take()
                self._admit_row(i, seq)
                self._slots[i] = seq
            self._rp_dev = None
            self._stale = set(meta["stale"])
            self._cancelled = set(meta.get("cancelled", ()))
            self.step_count = int(meta["step_count"])
            self.policy_version = int(meta["policy_version"])
            self._next_id = int(meta["next_id"])
            self._rng.bit_generator.state = meta["rng"]

    # -- requests --------------------------------------------------------------------------------
    def submit(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams | int | None = None,
        request_id: Hashable | None = None,
        *,
        max_new_tokens: int | None = None,
    ) -> Hashable:
        """Queues a request; returns its id. Safe to call from any thread.

        ``params`` is a :class:`SamplingParams` (default: the engine's); an int is taken as
        ``max_new_tokens`` (as is the keyword), which overrides the params' own.
        """
        if isinstance(params, int) and not isinstance(params, bool):
            params, max_new_tokens = None, params
        if params is None:
            params = self.default_params
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}")
        if max_new_tokens is not None:
            if max_new_tokens < 1:
                raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
            params = params.replace(max_new_tokens=int(max_new_tokens))
        prompt_ids = [int(t) for t in prompt_ids]
        if not prompt_ids:
            raise ValueError("an empty prompt has nothing to condition on")
        vocab = self._config.vocab_size
        if min(prompt_ids) < 0 or max(prompt_ids) >= vocab:
            bad = next(t for t in prompt_ids if not 0 <= t < vocab)
            raise ValueError(f"prompt token id {bad} is outside the vocabulary of {vocab}")
        params.check_vocab(vocab)
        n_new = params.max_new_tokens
        if len(prompt_ids) + n_new > self.max_len:
            raise ValueError(
                f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({n_new}) exceeds the "
                f"engine's max_len of {self.max_len}"
            )
        if len(prompt_ids) + n_new > self._config.max_position_embeddings:
            raise ValueError(
                f"prompt + max_new_tokens exceeds the model's context of "
                f"{self._config.max_position_embeddings} tokens"
            )
        if params.n > self.num_slots:
            raise ValueError(
                f"n={params.n} samples need as many slots; the engine has {self.num_slots}"
            )
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need an Engine built with a tokenizer")
        with self._lock:
            if request_id is None:
                request_id, self._next_id = self._next_id, self._next_id + 1
            seed = params.seed if params.seed is not None else int(self._rng.integers(2**63))
            self._queue.append(Request(prompt_ids, params, request_id, seed))
            self._work.notify_all()
        return request_id

    def cancel(self, request_id: Hashable) -> bool:
        """Drops a queued or in-flight request (all its samples; no completion is reported);
        returns whether it was found. Safe to call from any thread: a request in flight leaves its
        slot at once when no step is running, else before the next step decodes."""
        with self._lock:
            for k, req in enumerate(self._queue):
                if req.request_id == request_id:
                    del self._queue[k]
                    return True
            found = any(s is not None and s.request.request_id == request_id for s in self._slots)
            if found:
                self._cancelled.add(request_id)
        if found and self._step_lock.acquire(blocking=False):
            try:
                self._apply_cancellations()
            finally:
                self._step_lock.release()
        return found

    def _apply_cancellations(self) -> None:
        with self._lock:
            cancelled, self._cancelled = self._cancelled, set()
        for i, seq in enumerate(self._slots):
            if seq is not None and seq.request.request_id in cancelled:
                self._free(i)

    def wait_for_work(self, timeout: float | None = None) -> bool:
        """Blocks until a request is queued or in flight (or ``timeout`` seconds); returns whether
        there is work. For a thread that drives the engine while others submit."""
        with self._work:
            return self._work.wait_for(lambda: self.has_work, timeout)

    @property
    def has_work(self) -> bool:
        return bool(self._queue) or self.num_active > 0

    @property
    def free_slots(self) -> int:
        """Slots that no running or queued request will take."""
        queued = sum(r.params.n for r in self._queue)
        return max(self.num_slots - self.num_active - queued, 0)

    @property
    def num_active(self) -> int:
        return sum(s is not None for s in self._slots)

    @property
    def pending(self) -> int:
        return len(self._queue)

    # -- slots -----------------------------------------------------------------------------------
    def _stop_ids(self, p: SamplingParams) -> tuple[int, ...]:
        return tuple(dict.fromkeys((() if p.ignore_eos else self.eos_ids) + p.stop_token_ids))

    def _admit_row(self, i: int, seq: _Seq) -> None:
        p = seq.request.params
        stop = self._stop_ids(p)
        self._ensure_capacity(len(stop), len(p.logit_bias))
        set_row(self._rp, i, p, seq.request.seed, seq.index, stop)
        self._rp_dev = None

    def _free(self, i: int) -> None:
        self._slots[i] = None
        self._stale.discard(i)
        clear_row(self._rp, i)
        self._rp_dev = None

    def _finish(self, i: int, reason: str, stop_reason=None) -> Delta:
        seq = self._slots[i]
        text = None
        if seq.text is not None:
            text, cut, hit = cut_at_stop(
                self.tokenizer, np.asarray(seq.tokens), len(seq.tokens), seq.request.params.stop
            )
            if hit:
                del seq.tokens[cut:], seq.logprobs[cut:], seq.raw_logprobs[cut:]
                del seq.versions[cut:]
                if seq.top is not None:
                    del seq.top[cut:]
        self._remember(i)
        completion = Completion(
            seq.request.request_id,
            seq.request.prompt_ids,
            seq.tokens,
            seq.logprobs,
            seq.raw_logprobs,
            seq.versions,
            reason,
            seq.submitted_step,
            self.step_count,
            index=seq.index,
            text=text,
            top_logprobs=seq.top,
            stop_reason=stop_reason,
            cached_tokens=seq.cached_tokens,
        )
        rest = None
        if seq.text is not None:
            rest = text[seq.text.sent :] if len(text) >= seq.text.sent else ""
        self._free(i)
        return Delta(seq.request.request_id, seq.index, [], [], rest, None, reason, completion)

    def _append(self, i: int, tok: int, lp: float, raw: float, top) -> list[Delta]:
        """Adds a sampled token to slot ``i``; returns its delta (and the final one if it ended)."""
        seq = self._slots[i]
        p = seq.request.params
        seq.tokens.append(tok)
        seq.logprobs.append(lp)
        seq.raw_logprobs.append(raw)
        seq.versions.append(self.policy_version)
        new_top = None
        if seq.top is not None:
            new_top = [list(zip(top[0][: p.logprobs], top[1][: p.logprobs]))]
            seq.top.extend(new_top)
        hit = seq.text.update(seq.tokens) if seq.text is not None else None
        delta = Delta(
            seq.request.request_id,
            seq.index,
            [tok],
            [lp],
            None if seq.text is None else ("" if hit is not None else seq.text.take()),
            new_top,
            raw_logprobs=[raw],
        )
        out = [delta]
        if tok in self.eos_ids and not p.ignore_eos:
            out.append(self._finish(i, "eos"))
        elif tok in p.stop_token_ids:
            out.append(self._finish(i, "stop", tok))
        elif hit is not None:
            out.append(self._finish(i, "stop", hit))
        elif len(seq.tokens) >= p.max_new_tokens:
            out.append(self._finish(i, "length"))
        return out

    # -- prefill ---------------------------------------------------------------------------------
    def _admit(self) -> list[tuple[Request, list[int]]]:
        """Takes queued requests (first come, first served) into free slots."""
        free = [i for i, s in enumerate(self._slots) if s is None]
        taken = []
        with self._lock:
            while self._queue and self._queue[0].params.n <= len(free):
                req = self._queue.popleft()
                slots, free = free[: req.params.n], free[req.params.n :]
                taken.append((req, slots))
        return taken

    def _prefill(self, admitted: list[tuple[Request, list[int]]]) -> list[Delta]:
        """Prefills newcomers and stale in-flight rows, in as few calls as their widths allow."""
        items = []  # _Item per prompt
        for i in sorted(self._stale):  # in flight after a weight swap: rebuild their caches
            seq = self._slots[i]
            if seq is not None:
                ids = seq.request.prompt_ids + seq.tokens[:-1]
                rest = seq.request.max_new_tokens - len(seq.tokens) + 1
                items.append(_Item(ids, rest, [(i, 0, False)]))
        self._stale.clear()
        for req, slots in admitted:
            entry, cached = self._lookup_prefix(req.prompt_ids)
            for j, i in enumerate(slots):
                seq = _Seq(req, j, self.step_count, cached_tokens=cached)
                if req.params.logprobs:
                    seq.top = []
                if self.tokenizer is not None:
                    seq.text = _TextStream(self.tokenizer, req.params.stop)
                self._slots[i] = seq
                self._admit_row(i, seq)
            item = _Item(
                req.prompt_ids, req.max_new_tokens, [(i, j, True) for j, i in enumerate(slots)]
            )
            if cached:  # the prefix is gathered to the row's first slots
                meta = self._prefix_meta[entry]
                meta.used = next(self._prefix_clock)
                item.entry, item.cached, item.start = entry, cached, cached
                item.prefix_slots = np.arange(cached, dtype=np.int32)
                item.gather = meta.slots[:cached]
            items.append(item)
        groups, group = [], []
        for (
            item
        ) in items:  # one call's rows share a width P: P >= each new part, start + P + rest <= S
            trial = [*group, item]
            if group and max(len(x.new_ids) for x in trial) > min(
                x.cap(self.max_len) for x in trial
            ):
                groups.append(group)
                trial = [item]
            group = trial
        if group:
            groups.append(group)
        deltas = []
        for group in groups:
            deltas.extend(self._prefill_group(group))
        return deltas

    def _prefill_group(self, group: list[_Item]) -> list[Delta]:
        longest = max(len(x.new_ids) for x in group)
        cap = min(x.cap(self.max_len) for x in group)
        width = max(bucket_length(max(longest, MIN_PREFILL_WIDTH), cap, granularity=64), longest)
        r = bucket_length(len(group), 2 * len(group), granularity=64)
        targets = [(k, t) for k, x in enumerate(group) for t in x.targets]
        m = bucket_length(len(targets), 2 * len(targets), granularity=64)
        ids = np.full((r, width), self.pad_id, np.int32)
        mask = np.zeros((r, width), bool)
        start = np.zeros((r,), np.int32)
        entry = np.zeros((r,), np.int32)
        for k, x in enumerate(group):
            new = x.new_ids
            ids[k, width - len(new) :] = new
            mask[k, width - len(new) :] = True
            start[k], entry[k] = x.start, x.entry
        src = np.zeros((m,), np.int32)
        dest = np.full((m,), self.num_slots, np.int32)
        fresh = np.zeros((m,), bool)
        slot_rows = np.zeros((m,), np.int32)
        for t, (k, (i, _, is_fresh)) in enumerate(targets):
            src[t], dest[t], fresh[t], slot_rows[t] = k, i, is_fresh, i
        rp = jax.tree.map(lambda a: jnp.asarray(a[slot_rows]), self._rp)  # the targets' rows
        prefix = {}
        if any(x.cached for x in group):
            longest_row = int(start.max()) + width
            row_len = max(bucket_length(longest_row, self.max_len, granularity=64), longest_row)
            gather = np.zeros((r, row_len), np.int32)
            for k, x in enumerate(group):
                gather[k, : len(x.gather)] = x.gather
            prefix = dict(
                start=jnp.asarray(start),
                entry=jnp.asarray(entry),
                gather=jnp.asarray(gather),
                store=self._store,
                row_len=row_len,
            )
        self._ds, tok, lp, raw, top_ids, top_lps = prefill_rows(
            self._state,
            self._ds,
            rp,
            jnp.asarray(ids),
            jnp.asarray(mask),
            jnp.asarray(src),
            jnp.asarray(dest),
            jnp.asarray(fresh),
            static=self._static,
            **prefix,
        )
        for x in group:  # where each row's tokens now lie in its cache row
            for i, _, _ in x.targets:
                seq = self._slots[i]
                seq.fed_slots = np.concatenate(
                    [x.prefix_slots, x.start + width - len(x.new_ids) + np.arange(len(x.new_ids))]
                ).astype(np.int32)
                seq.next_slot = x.start + width
                seq.fed_generated = len(x.ids) - len(seq.request.prompt_ids)
            self._stats["prefill_tokens"] += len(x.new_ids)
        tok, lp, raw = np.asarray(tok), np.asarray(lp), np.asarray(raw)
        want_top = any(self._slots[i].top is not None for _, (i, _, f) in targets if f)
        top = (np.asarray(top_ids), np.asarray(top_lps)) if want_top else None
        deltas = []
        for t, (_, (i, _, is_fresh)) in enumerate(targets):
            if is_fresh:
                row_top = None if top is None else (top[0][t].tolist(), top[1][t].tolist())
                deltas.extend(self._append(i, int(tok[t]), float(lp[t]), float(raw[t]), row_top))
        return deltas

    # -- prefix cache ----------------------------------------------------------------------------
    def _lookup_prefix(self, prompt: list[int]) -> tuple[int, int]:
        """``(entry, tokens)``: the cached sequence sharing the longest prefix with ``prompt``
        (at most all of it but its last token, which must be run for its logits); ``(0, 0)``
        below :data:`MIN_PREFIX` tokens or with the cache off."""
        if self._store is None:
            return 0, 0
        self._stats["prefix_cache_queries"] += 1
        ids = np.asarray(prompt, np.int32)
        best, best_len = 0, 0
        for e, meta in enumerate(self._prefix_meta):
            if meta is None:
                continue
            n = min(len(ids) - 1, len(meta.tokens))
            diff = np.flatnonzero(ids[:n] != meta.tokens[:n])
            common = int(diff[0]) if len(diff) else n
            if common > best_len:
                best, best_len = e, common
        if best_len < MIN_PREFIX:
            return 0, 0
        self._stats["prefix_cache_hits"] += 1
        self._stats["cached_tokens"] += best_len
        return best, best_len

    def _remember(self, i: int) -> None:
        """Keeps the keys and values slot ``i``'s sequence has in the cache (its prompt and the
        tokens fed so far) as a prefix-cache entry, replacing an entry it extends or the least
        recently used one."""
        seq = self._slots[i]
        if self._store is None or seq is None or seq.fed_slots is None:
            return
        fed = seq.request.prompt_ids + seq.tokens[: max(len(seq.tokens) - 1, 0)]
        extra = len(fed) - len(seq.request.prompt_ids) - seq.fed_generated
        slots = np.concatenate([seq.fed_slots, seq.next_slot + np.arange(max(extra, 0))])
        tokens = np.asarray(fed, np.int32)[: len(slots)]
        slots = slots[: len(tokens)].astype(np.int32)
        if len(tokens) < MIN_PREFIX:
            return
        victim = None
        for e, meta in enumerate(self._prefix_meta):
            if meta is None:
                victim = e if victim is None else victim
                continue
            n = min(len(tokens), len(meta.tokens))
            if np.array_equal(tokens[:n], meta.tokens[:n]):
                if len(meta.tokens) >= len(tokens):  # already covered
                    meta.used = next(self._prefix_clock)
                    return
                victim = e  # the new sequence extends it
                break
        if victim is None:
            victim = min(range(len(self._prefix_meta)), key=lambda e: self._prefix_meta[e].used)
        row_tokens = np.full((self.max_len,), -1, np.int32)
        row_tokens[slots] = tokens
        self._store = store_row(
            self._store,
            self._ds.cache,
            jnp.int32(i),
            jnp.int32(victim),
            jnp.asarray(row_tokens),
            jnp.int32(int(slots[-1]) + 1),
        )
        self._prefix_meta[victim] = _Entry(tokens, slots, next(self._prefix_clock))

    def stats(self) -> dict[str, Any]:
        """Counters since the engine was built: prefill and prefix-cache work, and the current
        queue, active slots and cached entries."""
        return {
            **self._stats,
            "prefix_cache_entries": sum(m is not None for m in self._prefix_meta),
            "queue": len(self._queue),
            "active": self.num_active,
            "slots": self.num_slots,
            "steps": self.step_count,
        }

    # -- stepping --------------------------------------------------------------------------------
    def step_deltas(self) -> list[Delta]:
        """One step: fills free slots from the queue (one prefill call), then decodes one token for
        every active slot; returns what each sequence gained (final deltas carry completions)."""
        with self._step_lock:
            t0 = time.perf_counter()
            self._apply_cancellations()
            deltas = self._prefill(self._admit())
            active = np.array([s is not None for s in self._slots])
            self.occupancy.append(float(active.mean()))
            if active.any():
                self._ds, self._out, steps = decode_steps(
                    self._state,
                    self._ds,
                    self._out,
                    self._rows_on_device(),
                    jnp.asarray(~active),
                    jnp.int32(0),
                    jnp.int32(1),
                    jnp.int32(self.pad_id),
                    static=self._static,
                )
                out = self._out
                if int(steps) != 1:
                    raise RuntimeError("engine state out of step: no slot was live on the device")
                tok = np.asarray(out.tokens)[:, 0]
                lp, raw = np.asarray(out.logprobs)[:, 0], np.asarray(out.raw_logprobs)[:, 0]
                top = None
                if any(s is not None and s.top is not None for s in self._slots):
                    top = (np.asarray(out.top_ids)[:, 0], np.asarray(out.top_logprobs)[:, 0])
                for i in np.flatnonzero(active):
                    row_top = None if top is None else (top[0][i].tolist(), top[1][i].tolist())
                    deltas.extend(
                        self._append(int(i), int(tok[i]), float(lp[i]), float(raw[i]), row_top)
                    )
            self.step_count += 1
            self.step_times.append(time.perf_counter() - t0)
            return deltas

    def step(self) -> list[Completion]:
        """Fills free slots from the queue, then decodes one token for every active slot; returns
        the sequences that finished."""
        return [d.completion for d in self.step_deltas() if d.completion is not None]

    def stream(self, max_steps: int | None = None) -> Iterator[Delta]:
        """Steps until every queued and active request has finished, yielding each step's deltas
        as they come."""
        steps = 0
        while self.has_work:
            yield from self.step_deltas()
            steps += 1
            if max_steps is not None and steps >= max_steps:
                break

    def warmup(self, max_prompt_len: int = 128, *, counts: Sequence[int] | None = None) -> int:
        """Compiles the steps ahead of traffic: the prefill of ``r`` new prompts at once, for
        every prefill width up to ``max_prompt_len`` tokens and each ``r`` in ``counts`` (default:
        the powers of two up to ``num_slots``, the buckets a step's newcomers are padded to), and
        the decode step. Requests with prompts up to ``max_prompt_len`` tokens then start without
        compiling, however many arrive together. Runs real steps on dummy prompts; nothing of
        them stays (counters, prefix cache; a prompt extending a prefix-cache entry compiles its
        own variant once). Returns the number of prefill shapes run. Needs an idle engine."""
        if self.has_work:
            raise RuntimeError("warmup needs an idle engine")
        if counts is None:
            counts = [1 << k for k in range(self.num_slots.bit_length())]
            counts = [c for c in counts if c < self.num_slots] + [self.num_slots]
        top = min(int(max_prompt_len), self.max_len - 2)
        widths = sorted(
            {bucket_length(max(n, MIN_PREFILL_WIDTH), top, 64) for n in range(1, top + 1)}
        )
        stats, store = dict(self._stats), self._store
        self._store = None  # the prefix cache neither serves nor keeps the dummies
        params = SamplingParams(max_new_tokens=2, ignore_eos=True)  # a prefill, then a decode
        done = 0
        for n in widths:
            for r in sorted({min(int(c), self.num_slots) for c in counts if int(c) >= 1}):
                for k in range(r):
                    self.submit([self.pad_id] * (n - 1) + [k], params)
                self.run()
                done += 1
        self._stats, self._store = stats, store
        return done

    def run(self, max_steps: int | None = None) -> list[Completion]:
        """Steps until every queued and active request has finished; completions in finishing order."""
        return [d.completion for d in self.stream(max_steps) if d.completion is not None]


def benchmark_engine_vs_static(
    model,
    tokenizer,
    *,
    num_requests=64,
    num_slots=8,
    prompt_len=32,
    median_new=32,
    sigma=1.0,
    max_new=192,
    seed=0,
) -> dict:
    """Engine vs static batching on requests whose lengths follow a log-normal distribution.

    EOS is ignored so that each request generates exactly its drawn length on both sides. Static
    batching runs groups of ``num_slots`` requests, each until its longest member is done.
    """
    from jaxlab.generation.generate import generate_tokens

    rng = np.random.default_rng(seed)
    lengths = np.clip(
        np.round(np.exp(rng.normal(np.log(median_new), sigma, num_requests))), 4, max_new
    ).astype(int)
    prompts = rng.integers(100, 40000, size=(num_requests, prompt_len)).astype(np.int32)
    max_len = prompt_len + max_new + 8

    # static batching
    def static():
        for start in range(0, num_requests, num_slots):
            n = int(lengths[start : start + num_slots].max())
            ids = prompts[start : start + num_slots]
            generate_tokens(
                model,
                ids,
                np.ones_like(ids),
                max_new_tokens=n,
                eos_ids=(),
                pad_id=tokenizer.pad_token_id,
            )

    static()  # warm-up: compile every shape used
    t0 = time.perf_counter()
    static()
    static_s = time.perf_counter() - t0
    batches = [lengths[s : s + num_slots] for s in range(0, num_requests, num_slots)]
    static_occ = float(sum(b.sum() for b in batches) / sum(len(b) * b.max() for b in batches))

    def engine_run():
        eng = Engine(
            model, num_slots=num_slots, max_len=max_len, eos_ids=(), pad_id=tokenizer.pad_token_id
        )
        for ids, n in zip(prompts, lengths):
            eng.submit(ids, int(n))
        out = eng.run()
        assert sorted(len(c.tokens) for c in out) == sorted(lengths.tolist())
        return eng

    engine_run()  # warm-up
    t0 = time.perf_counter()
    eng = engine_run()
    engine_s = time.perf_counter() - t0
    result = {
        "requests": num_requests,
        "slots": num_slots,
        "median_new_tokens": median_new,
        "sigma": sigma,
        "total_new_tokens": int(lengths.sum()),
        "longest": int(lengths.max()),
        "static_s": static_s,
        "engine_s": engine_s,
        "speedup": static_s / engine_s,
        "static_occupancy": static_occ,
        "engine_occupancy": float(np.mean(eng.occupancy)),
        "static_tok_s": float(lengths.sum() / static_s),
        "engine_tok_s": float(lengths.sum() / engine_s),
    }
    print(
        f"\nEngine vs static batching: {num_requests} requests, {num_slots} slots, log-normal lengths "
        f"(median {median_new}, sigma {sigma}, max {int(lengths.max())}), {int(lengths.sum())} tokens"
    )
    print(f"{'':8s} {'time s':>8s} {'tok/s':>8s} {'occupancy':>10s}")
    print(f"{'static':8s} {static_s:8.2f} {result['static_tok_s']:8.1f} {static_occ:10.2f}")
    print(
        f"{'engine':8s} {engine_s:8.2f} {result['engine_tok_s']:8.1f} {result['engine_occupancy']:10.2f}"
    )
    return result
