"""Continuous batching: same greedy tokens as generate, immediate refill, weight swaps, versions."""

import numpy as np
import pytest
from flax import nnx

from jaxlab.generation import Engine, generate_tokens
from jaxlab.models import Decoder, DecoderConfig
from jaxlab.testing import TINY_DECODER

CFG = TINY_DECODER
EOS = 49


def _requests(seed=0, n=7):
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(1, 49, size=int(k)).tolist() for k in rng.integers(2, 14, size=n)]
    news = rng.integers(2, 14, size=n).tolist()
    return prompts, news


def test_engine_greedy_equals_generate():
    model = Decoder(CFG, rngs=nnx.Rngs(0))
    prompts, news = _requests()
    eng = Engine(model, num_slots=3, max_len=48, eos_ids=(EOS,), pad_id=0)
    for p, n in zip(prompts, news):
        eng.submit(p, n)
    out = {c.request_id: c for c in eng.run()}
    assert sorted(out) == list(range(len(prompts)))
    for i, (p, n) in enumerate(zip(prompts, news)):
        ids = np.array([p], np.int32)
        toks, lps, raw, lens, _ = generate_tokens(
            model, ids, np.ones_like(ids), max_new_tokens=n, eos_ids=(EOS,), pad_id=0
        )
        assert out[i].tokens == toks[0, : lens[0]].tolist()
        np.testing.assert_allclose(out[i].logprobs, lps[0, : lens[0]], atol=1e-5)
        np.testing.assert_allclose(out[i].raw_logprobs, raw[0, : lens[0]], atol=1e-5)
        assert out[i].finish_reason == ("eos" if out[i].tokens[-1] == EOS else "length")
        assert len(out[i].tokens) <= n


def test_slots_are_refilled_at_once():
    model = Decoder(CFG, rngs=nnx.Rngs(0))
    eng = Engine(model, num_slots=2, max_len=64, eos_ids=(), pad_id=0)
    eng.submit([1, 2, 3], 2)  # short
    eng.submit([4, 5], 20)  # long
    eng.submit([6, 7, 8], 3)  # waits for the short one's slot
    finished_at = {}
    while eng.pending or eng.num_active:
        waiting = eng.pending + eng.num_active  # sequences that want a slot at this step
        for c in eng.step():
            finished_at[c.request_id] = eng.step_count
        # the long request never holds the others back: every step decodes as many sequences as
        # there are, up to the two slots
        assert eng.occupancy[-1] == min(waiting, 2) / 2
    # request 0 ends after 1 prefill token + 1 decoded token; request 2 starts on the very next step
    assert finished_at[0] == 1 and finished_at[2] == 1 + 2
    assert eng.occupancy[:3] == [1.0, 1.0, 1.0] and eng.occupancy[-1] == 0.5
    assert len(eng.occupancy) == eng.step_count


def test_weight_swap_tags_tokens_with_policy_versions():
    model = Decoder(CFG, rngs=nnx.Rngs(0))
    other = Decoder(CFG, rngs=nnx.Rngs(1))
    eng = Engine(model, num_slots=1, max_len=64, eos_ids=(), pad_id=0)
    prompt = [3, 1, 4, 1, 5]
    eng.submit(prompt, 8)
    for _ in range(3):
        eng.step()
    assert eng.update_weights(other) == 1
    (c,) = eng.run()
    assert c.policy_versions == [
        0,
        0,
        0,
        0,
        1,
        1,
        1,
        1,
    ]  # 1 prefill + 3 decode steps under version 0
    # after the swap, tokens follow the new weights given the same prefix
    ids = np.array([prompt + c.tokens[:4]], np.int32)
    toks, *_ = generate_tokens(
        other, ids, np.ones_like(ids), max_new_tokens=4, eos_ids=(), pad_id=0
    )
    assert c.tokens[4:] == toks[0].tolist()
    with pytest.raises(ValueError, match="same config"):
        eng.update_weights(Decoder(DecoderConfig(), rngs=nnx.Rngs(0)))


def test_engine_errors():
    model = Decoder(CFG, rngs=nnx.Rngs(0))
    eng = Engine(model, num_slots=2, max_len=32, eos_ids=(), pad_id=0)
    with pytest.raises(ValueError, match="exceeds the engine's max_len of 32"):
        eng.submit(list(range(1, 30)), 8)
    with pytest.raises(ValueError, match="empty prompt"):
        eng.submit([], 4)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        eng.submit([1], 0)
    assert eng.run() == []


def test_long_requests_fill_the_cache_exactly():
    """prompt + max_new_tokens == max_len: the bucketed prompt width must leave room (no clamped writes)."""
    model = Decoder(CFG, rngs=nnx.Rngs(2))
    eng = Engine(model, num_slots=2, max_len=64, eos_ids=(), pad_id=0)
    prompts = [list(range(1, 21)), list(range(5, 12))]
    for p, n in zip(prompts, [44, 57]):
        eng.submit(p, n)
    out = {c.request_id: c for c in eng.run()}
    for i, (p, n) in enumerate(zip(prompts, [44, 57])):
        ids = np.array([p], np.int32)
        toks, *_ = generate_tokens(
            model, ids, np.ones_like(ids), max_new_tokens=n, eos_ids=(), pad_id=0
        )
        assert out[i].tokens == toks[0].tolist()


def test_cancel_frees_the_slot_and_drops_queued_requests():
    model = Decoder(CFG, rngs=nnx.Rngs(0))
    eng = Engine(model, num_slots=1, max_len=64, eos_ids=(), pad_id=0)
    a = eng.submit([1, 2], 30)
    b = eng.submit([3, 4], 30)
    c = eng.submit([5, 6], 2)
    eng.step()
    assert eng.cancel(a) and eng.cancel(b) and not eng.cancel(99)
    assert eng.free_slots == 0  # c is queued for the freed slot
    (done,) = eng.run()
    assert done.request_id == c and len(done.tokens) == 2


def test_a_second_engine_reuses_the_compiled_steps_and_hashes_statics_once(monkeypatch):
    """Engines of one architecture share the jitted prefill / decode (static arguments compare
    equal), and a step does not re-hash the model's graphdef (that walks every node)."""
    from jaxlab.generation import engine as engine_module
    from jaxlab.testing.compile_count import count_compilations

    def run(model):
        eng = Engine(model, num_slots=2, max_len=32, eos_ids=(), pad_id=0)
        eng.submit([1, 2, 3], 4)
        eng.submit([4, 5], 6)
        return eng, eng.run()

    run(Decoder(CFG, rngs=nnx.Rngs(0)))
    hashes = []
    real = engine_module._Statics.__init__

    def counting_init(self, graphdef, **kw):
        real(self, graphdef, **kw)
        hashes.append(self._hash)

    monkeypatch.setattr(engine_module._Statics, "__init__", counting_init)
    graphdef_type = type(nnx.graphdef(Decoder(CFG, rngs=nnx.Rngs(1))))
    graphdef_hash, calls = graphdef_type.__hash__, []
    monkeypatch.setattr(
        graphdef_type, "__hash__", lambda self: calls.append(1) or graphdef_hash(self)
    )
    with count_compilations() as names:
        eng, out = run(Decoder(CFG, rngs=nnx.Rngs(2)))  # other weights, same architecture
    assert not [n for n in names if "_prefill" in n or "_decode" in n], names
    assert sorted(len(c.tokens) for c in out) == [4, 6] and eng.step_count >= 5
    assert len(hashes) == 1 and len(calls) <= 2  # hashed when the engine was built, not per step
