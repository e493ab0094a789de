"""Continuous batching: a fixed number of decode slots, refilled the moment a sequence ends.

Each :meth:`Engine.step` first prefills queued requests into free slots (one jitted call per
newcomer, writing its KV cache rows in place), then decodes one token for every active slot in one
jitted call. A sequence leaves its slot at its own EOS or token limit; nothing waits for the
longest member of a batch. The engine records the occupied fraction of slots at every step (the
basis of SortedRL's bubble ratio), can swap in new weights between steps, and tags each generated
token with the policy version that produced it.

Letters: B slots, S cache slots per row, P prompt length.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlab import native
from jaxlab.generation.generate import decoding_model
from jaxlab.generation.sampling import sample_tokens
from jaxlab.models.decoder import Decoder, KVCache
from jaxlab.tokenization import bucket_length

__all__ = ["Request", "Completion", "Engine", "benchmark_engine_vs_static"]


@dataclasses.dataclass
class Request:
    prompt_ids: list[int]
    max_new_tokens: int
    request_id: int


@dataclasses.dataclass
class Completion:
    """A finished sequence. ``policy_versions[i]`` is the weights version that sampled token i."""

    request_id: int
    prompt_ids: list[int]
    tokens: list[int]
    logprobs: list[float]  # under the sampling distribution (behaviour log-probs)
    raw_logprobs: list[float]  # under the untempered model
    policy_versions: list[int]
    finish_reason: str  # "eos" or "length"
    submitted_step: int
    finished_step: int


@dataclasses.dataclass
class _Slot:
    request: Request
    tokens: list[int]
    logprobs: list[float]
    raw_logprobs: list[float]
    versions: list[int]
    submitted_step: int


class _Statics:
    """The jitted steps' static arguments, hashed once.

    jit hashes its static arguments at every call; a graphdef's hash walks every node of the
    model (~1,300 calls for SmolLM2), which cost ~7 ms of each ~40 ms batch-8 decode step.
    """

    __slots__ = ("graphdef", "top_k", "top_p", "greedy", "_key", "_hash")

    def __init__(self, graphdef, *, top_k: int, top_p: float, greedy: bool):
        self.graphdef, self.top_k, self.top_p, self.greedy = graphdef, top_k, top_p, greedy
        self._key = (graphdef, top_k, top_p, greedy)
        self._hash = hash(self._key)

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other) -> bool:
        return self is other or (
            isinstance(other, _Statics) and self._hash == other._hash and self._key == other._key
        )


@functools.partial(jax.jit, static_argnames=("static",), donate_argnames=("cache",))
def _prefill_slot(state, cache, slot, ids, mask, key, temperature, *, static: _Statics):
    """Prefills one request (``ids [1, P]``) into row ``slot`` of the cache; samples its first token."""
    top_k, top_p, greedy = static.top_k, static.top_p, static.greedy
    model = nnx.merge(static.graphdef, state)
    s = cache.valid.shape[1]
    row = model.init_cache(1, s)
    logits, row = model(ids, attention_mask=mask, cache=row, logits_to_keep=1)
    tok, lp, raw = sample_tokens(
        logits[:, -1], key, temperature=temperature, top_k=top_k, top_p=top_p, greedy=greedy
    )

    def put(big, small):
        start = (slot,) + (0,) * (big.ndim - 1)
        return jax.lax.dynamic_update_slice(big, small.astype(big.dtype), start)

    cache = KVCache(
        k=tuple(put(b, r) for b, r in zip(cache.k, row.k)),
        v=tuple(put(b, r) for b, r in zip(cache.v, row.v)),
        index=put(cache.index, row.index),
        valid=put(cache.valid, row.valid),
    )
    return tok[0], lp[0], raw[0], cache


@functools.partial(jax.jit, static_argnames=("static",), donate_argnames=("cache",))
def _decode_step(state, cache, prev, active, key, temperature, *, static: _Statics):
    """One token for every slot; inactive slots neither write valid cache entries nor advance."""
    top_k, top_p, greedy = static.top_k, static.top_p, static.greedy
    model = nnx.merge(static.graphdef, state)
    index = cache.index
    logits, cache = model(prev[:, None], attention_mask=active[:, None], cache=cache)
    cache = cache._replace(index=jnp.where(active, cache.index, index))
    tok, lp, raw = sample_tokens(
        logits[:, 0], key, temperature=temperature, top_k=top_k, top_p=top_p, greedy=greedy
    )
    return tok, lp, raw, cache


class Engine:
    """Continuous-batching generation over ``num_slots`` rows of a KV cache of ``max_len`` slots.

        engine = Engine(model, num_slots=8, max_len=512, eos_ids=tok.eos_token_ids, pad_id=tok.pad_token_id)
        for ids in prompts:
            engine.submit(ids, max_new_tokens=128)
        completions = engine.run()

    Args:
      model: a :class:`Decoder` (converted once to one module per layer for decoding).
      num_slots: rows decoded together.
      max_len: cache slots per row: prompt + new tokens of any request must fit.
      eos_ids, pad_id: end tokens and the id fed to idle slots.
      temperature, top_k, top_p, seed: sampling, as in :func:`jaxlab.generation.generate`.
    """

    def __init__(
        self,
        model: Decoder,
        *,
        num_slots: int = 8,
        max_len: int = 512,
        eos_ids: Sequence[int] = (),
        pad_id: int = 0,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int = 0,
        recompute_kv: bool = True,
    ):
        if not isinstance(model, Decoder):
            raise TypeError(f"Engine needs a decoder LM, got {type(model).__name__}")
        if num_slots < 1 or max_len < 2:
            raise ValueError(f"num_slots must be >= 1 and max_len >= 2, got {num_slots}, {max_len}")
        if temperature < 0 or not 0.0 < top_p <= 1.0 or top_k < 0:
            raise ValueError(
                f"bad sampling settings: temperature={temperature}, top_p={top_p}, top_k={top_k}"
            )
        self.num_slots, self.max_len = num_slots, max_len
        self.eos_ids = tuple(int(e) for e in eos_ids)
        self.pad_id = int(pad_id)
        self._temperature = jnp.float32(max(temperature, 1e-6))
        self._config = model.config
        self.policy_version = 0
        self.device = jax.devices()[0]
        self._set_model(model)
        self._static = _Statics(
            self._graphdef,
            top_k=min(int(top_k), model.config.vocab_size),
            top_p=float(top_p),
            greedy=temperature == 0.0,
        )
        self._cache = decoding_model(model).init_cache(num_slots, max_len)
        native.advise_huge_pages(jax.tree.leaves(self._cache))  # on CPU: each step reads it all
        self._key = jax.random.key(seed)
        self._queue: collections.deque[Request] = collections.deque()
        self._slots: list[_Slot | None] = [None] * num_slots
        self._prev = np.full((num_slots,), self.pad_id, np.int32)
        self._next_id = 0
        self.recompute_kv = recompute_kv
        self._stale: set[int] = set()
        self.step_count = 0
        self.occupancy: list[float] = []  # fraction of slots decoding, per step
        self.step_times: list[float] = []

    # -- weights ---------------------------------------------------------------------------------
    def _set_model(self, model: Decoder) -> None:
        graphdef, state = nnx.split(decoding_model(model))
        # the engine's own single-device copy (the trainer may keep the weights on a mesh)
        self._state = jax.device_put(state, self.device)
        native.advise_huge_pages(jax.tree.leaves(self._state))
        if hasattr(self, "_graphdef") and graphdef != self._graphdef:
            raise ValueError("update_weights needs a model of the same architecture")
        self._graphdef = graphdef

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
        self._set_model(model)
        self.policy_version += 1
        if self.recompute_kv:
            self._stale.update(i for i, s in enumerate(self._slots) if s is not None)
        return self.policy_version

    # -- snapshots -------------------------------------------------------------------------------
    def snapshot(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """The engine's state between steps: ``(arrays, meta)``, host copies of the KV caches and
        the sampling key, and JSON data for queue, slots and counters. Restoring it continues every
        in-flight sequence exactly as if nothing happened (:meth:`restore_snapshot`)."""
        cache = self._cache
        arrays = {
            "k": [np.asarray(x) for x in cache.k],
            "v": [np.asarray(x) for x in cache.v],
            "index": np.asarray(cache.index),
            "valid": np.asarray(cache.valid),
            "key": np.asarray(jax.random.key_data(self._key)),
        }

        def req(r):
            return {
                "prompt_ids": r.prompt_ids,
                "max_new_tokens": r.max_new_tokens,
                "request_id": r.request_id,
            }

        meta = {
            "queue": [req(r) for r in self._queue],
            "slots": [
                None
                if s is None
                else {
                    "request": req(s.request),
                    "tokens": s.tokens,
                    "logprobs": s.logprobs,
                    "raw_logprobs": s.raw_logprobs,
                    "versions": s.versions,
                    "submitted_step": s.submitted_step,
                }
                for s in self._slots
            ],
            "prev": self._prev.tolist(),
            "stale": sorted(self._stale),
            "step_count": self.step_count,
            "policy_version": self.policy_version,
            "next_id": self._next_id,
        }
        return arrays, meta

    def restore_snapshot(self, arrays: dict[str, Any], meta: dict[str, Any]) -> None:
        """Restores :meth:`snapshot` output into an engine built with the same settings."""
        if len(meta["slots"]) != self.num_slots or len(arrays["k"]) != len(self._cache.k):
            raise ValueError("restore_snapshot: the snapshot is of an engine with other settings")
        self._cache = type(self._cache)(
            k=tuple(jnp.asarray(x) for x in arrays["k"]),
            v=tuple(jnp.asarray(x) for x in arrays["v"]),
            index=jnp.asarray(arrays["index"]),
            valid=jnp.asarray(arrays["valid"]),
        )
        self._key = jax.random.wrap_key_data(jnp.asarray(arrays["key"]))
        self._queue = collections.deque(Request(**r) for r in meta["queue"])
        self._slots = [
            None
            if s is None
            else _Slot(
                Request(**s["request"]),
                list(s["tokens"]),
                list(s["logprobs"]),
                list(s["raw_logprobs"]),
                list(s["versions"]),
                int(s["submitted_step"]),
            )
            for s in meta["slots"]
        ]
        self._prev = np.asarray(meta["prev"], np.int32)
        self._stale = set(meta["stale"])
        self.step_count = int(meta["step_count"])
        self.policy_version = int(meta["policy_version"])
        self._next_id = int(meta["next_id"])

    # -- requests --------------------------------------------------------------------------------
    def submit(
        self, prompt_ids: Sequence[int], max_new_tokens: int, request_id: int | None = None
    ) -> int:
        """Queues a request; returns its id."""
        prompt_ids = [int(t) for t in prompt_ids]
        if not prompt_ids:
            raise ValueError("an empty prompt has nothing to condition on")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if len(prompt_ids) + max_new_tokens > self.max_len:
            raise ValueError(
                f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
                f"engine's max_len of {self.max_len}"
            )
        if len(prompt_ids) + max_new_tokens > self._config.max_position_embeddings:
            raise ValueError(
                f"prompt + max_new_tokens exceeds the model's context of "
                f"{self._config.max_position_embeddings} tokens"
            )
        if request_id is None:
            rid, self._next_id = self._next_id, self._next_id + 1
        else:
            rid = int(request_id)
        self._queue.append(Request(prompt_ids, int(max_new_tokens), rid))
        return rid

    def cancel(self, request_id: int) -> bool:
        """Drops a queued or in-flight request (its slot frees at once); returns whether it was found."""
        for k, req in enumerate(self._queue):
            if req.request_id == request_id:
                del self._queue[k]
                return True
        for i, slot in enumerate(self._slots):
            if slot is not None and slot.request.request_id == request_id:
                self._slots[i] = None
                self._prev[i] = self.pad_id
                self._stale.discard(i)
                return True
        return False

    @property
    def free_slots(self) -> int:
        """Slots that no running or queued request will take."""
        return max(self.num_slots - self.num_active - len(self._queue), 0)

    @property
    def num_active(self) -> int:
        return sum(s is not None for s in self._slots)

    @property
    def pending(self) -> int:
        return len(self._queue)

    def _next_key(self):
        self._key, sub = jax.random.split(self._key)
        return sub

    def _finish(self, i: int, reason: str) -> Completion:
        slot = self._slots[i]
        self._slots[i] = None
        self._prev[i] = self.pad_id
        return Completion(
            slot.request.request_id,
            slot.request.prompt_ids,
            slot.tokens,
            slot.logprobs,
            slot.raw_logprobs,
            slot.versions,
            reason,
            slot.submitted_step,
            self.step_count,
        )

    def _append(self, i: int, tok: int, lp: float, raw: float) -> Completion | None:
        slot = self._slots[i]
        slot.tokens.append(tok)
        slot.logprobs.append(lp)
        slot.raw_logprobs.append(raw)
        slot.versions.append(self.policy_version)
        self._prev[i] = tok
        if tok in self.eos_ids:
            return self._finish(i, "eos")
        if len(slot.tokens) >= slot.request.max_new_tokens:
            return self._finish(i, "length")
        return None

    def _prefill(self, i: int, ids_list: list[int], remaining: int):
        """Writes the cache of ``ids_list`` into row ``i``; returns the sampled next token.

        The prompt width is bucketed (left padding), leaving room for ``remaining`` more tokens.
        """
        n = len(ids_list)
        width = max(bucket_length(n, max(self.max_len - remaining, n), granularity=64), n)
        ids = np.full((1, width), self.pad_id, np.int32)
        mask = np.zeros((1, width), np.int32)
        ids[0, width - n :] = ids_list
        mask[0, width - n :] = 1
        tok, lp, raw, self._cache = _prefill_slot(
            self._state,
            self._cache,
            jnp.int32(i),
            jnp.asarray(ids),
            jnp.asarray(mask, bool),
            self._next_key(),
            self._temperature,
            static=self._static,
        )
        return tok, lp, raw

    def step(self) -> list[Completion]:
        """Fills free slots from the queue, then decodes one token for every active slot."""
        t0 = time.perf_counter()
        done: list[Completion] = []
        for i in sorted(
            self._stale
        ):  # in-flight sequences after a weight swap: rebuild their caches
            slot = self._slots[i]
            if slot is not None:
                self._prefill(
                    i,
                    slot.request.prompt_ids + slot.tokens[:-1],
                    slot.request.max_new_tokens - len(slot.tokens) + 1,
                )
        self._stale.clear()
        for i in range(self.num_slots):
            while self._slots[i] is None and self._queue:
                req = self._queue.popleft()
                tok, lp, raw = self._prefill(i, req.prompt_ids, req.max_new_tokens)
                self._slots[i] = _Slot(req, [], [], [], [], self.step_count)
                finished = self._append(i, int(tok), float(lp), float(raw))
                if finished is not None:
                    done.append(finished)
        active = np.array([s is not None for s in self._slots])
        self.occupancy.append(float(active.mean()))
        if active.any():
            tok, lp, raw, self._cache = _decode_step(
                self._state,
                self._cache,
                jnp.asarray(self._prev),
                jnp.asarray(active),
                self._next_key(),
                self._temperature,
                static=self._static,
            )
            tok, lp, raw = np.asarray(tok), np.asarray(lp), np.asarray(raw)
            for i in np.flatnonzero(active):
                finished = self._append(int(i), int(tok[i]), float(lp[i]), float(raw[i]))
                if finished is not None:
                    done.append(finished)
        self.step_count += 1
        self.step_times.append(time.perf_counter() - t0)
        return done

    def run(self, max_steps: int | None = None) -> list[Completion]:
        """Steps until every queued and active request has finished; completions in finishing order."""
        out: list[Completion] = []
        steps = 0
        while self._queue or self.num_active:
            out.extend(self.step())
            steps += 1
            if max_steps is not None and steps >= max_steps:
                break
        return out


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
