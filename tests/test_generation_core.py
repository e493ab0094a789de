"""The generation core: SamplingParams, per-row sampling against numpy, and the Engine's
per-request sampling, seeds, stop strings / ids, top-n logprobs, n samples, streaming, threads."""

import dataclasses
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlab.generation import Engine, SamplingParams, core, generate, generate_rows
from jaxlab.generation import engine as engine_module
from jaxlab.models import Decoder
from jaxlab.testing import TINY_DECODER
from jaxlab.testing.char_tokenizer import char_tokenizer
from jaxlab.testing.compile_count import count_compilations

TOK = char_tokenizer()
CFG = dataclasses.replace(TINY_DECODER, vocab_size=TOK.vocab_size)
SLOTS, MAX_LEN = 4, 64  # one engine shape for the whole file: steps compile once


@pytest.fixture(scope="module")
def model():
    return Decoder(CFG, rngs=nnx.Rngs(3))


def _engine(model, **kw):
    return Engine(model, num_slots=SLOTS, max_len=MAX_LEN, tokenizer=TOK, **kw)


def _ids(text):
    return TOK.encode(text, add_special_tokens=False)


# -- SamplingParams ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field, value",
    [
        ("max_new_tokens", 0),
        ("temperature", -0.5),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("top_k", -1),
        ("min_p", 1.5),
        ("presence_penalty", 3.0),
        ("frequency_penalty", -2.5),
        ("repetition_penalty", 0.0),
        ("stop", [""]),
        ("stop", [1]),
        ("stop_token_ids", [-1]),
        ("logit_bias", {5: 200.0}),
        ("logit_bias", {-3: 1.0}),
        ("seed", -1),
        ("logprobs", 21),
        ("n", 0),
        ("temperature", float("nan")),
        ("temperature", True),
    ],
)
def test_sampling_params_name_the_bad_field(field, value):
    with pytest.raises(ValueError, match=f"SamplingParams: {field} "):
        SamplingParams(**{field: value})


def test_sampling_params_normalise_and_hash():
    p = SamplingParams(stop="\n", logit_bias={"7": 1.5, 3: -2}, stop_token_ids=[4, 2])
    assert (
        p.stop == ("\n",) and p.logit_bias == ((3, -2.0), (7, 1.5)) and p.stop_token_ids == (4, 2)
    )
    assert hash(p) == hash(
        SamplingParams(stop=["\n"], logit_bias={3: -2, 7: 1.5}, stop_token_ids=(4, 2))
    )
    assert p.replace(temperature=0.5).temperature == 0.5
    with pytest.raises(ValueError, match="SamplingParams: temperature"):
        p.replace(temperature=-1)
    with pytest.raises(ValueError, match="logit_bias must hold ids below the vocabulary size 10"):
        SamplingParams(logit_bias={12: 1.0}).check_vocab(10)


# -- per-row sampling against numpy ----------------------------------------------------------------


def _np_filtered(x, top_k, top_p, min_p):
    """Brute force: the tokens kept by top-k, then top-p (of the top-k renormalised), then min-p."""
    order = np.argsort(-x, kind="stable")
    k = len(x) if top_k == 0 else min(top_k, len(x))
    keep = order[:k]
    p = np.exp(x[keep] - x[keep].max())
    p /= p.sum()
    if top_p < 1.0:
        n = int(np.searchsorted(np.cumsum(p), top_p) + 1)
        keep, p = keep[:n], p[:n]
    if min_p > 0:
        sel = p >= min_p * p.max()
        keep = keep[sel]
    return set(keep.tolist())


def test_filter_rows_matches_brute_force_per_row():
    rng = np.random.default_rng(0)
    b, v = 6, 40
    x = rng.normal(size=(b, v)).astype(np.float32) * 2
    top_k = np.array([0, 5, 0, 12, 3, 40], np.int32)
    top_p = np.array([1.0, 1.0, 0.6, 0.8, 0.95, 0.3], np.float32)
    min_p = np.array([0.0, 0.0, 0.0, 0.1, 0.0, 0.05], np.float32)
    out = np.asarray(
        core._filter_rows(
            jnp.asarray(x), jnp.asarray(top_k), jnp.asarray(top_p), jnp.asarray(min_p)
        )
    )
    for i in range(b):
        assert set(np.flatnonzero(np.isfinite(out[i])).tolist()) == _np_filtered(
            x[i].astype(np.float64), top_k[i], top_p[i], min_p[i]
        ), i
        kept = np.isfinite(out[i])
        np.testing.assert_array_equal(out[i][kept], x[i][kept])


def test_penalties_and_bias_match_numpy():
    rng = np.random.default_rng(1)
    b, v = 3, 30
    logits = rng.normal(size=(b, v)).astype(np.float32)
    counts = rng.integers(0, 3, size=(b, v)).astype(np.int32)
    seen = rng.random((b, v)) < 0.3
    params = [
        SamplingParams(repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.25),
        SamplingParams(logit_bias={4: 3.0, 9: -100.0}),
        SamplingParams(repetition_penalty=0.8, frequency_penalty=-1.0),
    ]
    rp = core.row_params([(p, 0, 0, ()) for p in params])
    got = np.asarray(
        core._penalized(
            jnp.asarray(logits),
            jax.tree.map(jnp.asarray, rp),
            jnp.asarray(counts),
            jnp.asarray(seen),
        )
    )
    for i, p in enumerate(params):
        x = logits[i].astype(np.float64)
        hit = seen[i] | (counts[i] > 0)
        r = p.repetition_penalty
        x = np.where(hit, np.where(x > 0, x / r, x * r), x)
        x = x - p.frequency_penalty * counts[i] - p.presence_penalty * (counts[i] > 0)
        for tok, bias in p.logit_bias:
            x[tok] += bias
        np.testing.assert_allclose(got[i], x, rtol=1e-6, atol=1e-6)


def test_mixed_rows_sample_their_own_distributions():
    """Rows with different settings in one call: each row's draws follow its own filtered,
    tempered distribution (numpy), and greedy rows take the argmax."""
    probs = np.array([0.30, 0.25, 0.20, 0.10, 0.08, 0.05, 0.02])
    logits = np.log(np.tile(probs, (4, 1))).astype(np.float32)
    params = [
        SamplingParams(temperature=1.0, top_k=4, top_p=0.7),  # keeps 0, 1, 2
        SamplingParams(temperature=0.5),  # p^2 renormalised
        SamplingParams(),  # greedy
        SamplingParams(temperature=1.0, min_p=0.3),  # p >= 0.09: keeps 0-3
    ]
    n = 20_000
    rp = core.row_params([(p, 11, 0, ()) for p in params])
    rp = jax.tree.map(jnp.asarray, rp)
    zeros = jnp.zeros((4, 7), jnp.int32)
    seen = jnp.zeros((4, 7), bool)

    @jax.jit
    def draw(index):
        return core.sample_rows(jnp.asarray(logits), rp, zeros, seen, jnp.full((4,), index))[0]

    samples = np.stack([np.asarray(draw(i)) for i in range(n)])  # token index = draw number
    expected = [
        np.r_[probs[:3] / probs[:3].sum(), np.zeros(4)],
        probs**2 / (probs**2).sum(),
        np.eye(7)[0],
        np.r_[probs[:4] / probs[:4].sum(), np.zeros(3)],
    ]
    for row, want in enumerate(expected):
        freq = np.bincount(samples[:, row], minlength=7) / n
        se = np.sqrt(want * (1 - want) / n)
        assert np.all(np.abs(freq - want) <= 5 * se + 1e-12), (row, freq, want)


# -- the engine ------------------------------------------------------------------------------------


def test_one_batch_mixes_sampling_settings_without_recompiling(model):
    prompts = [_ids("abc"), _ids("hello"), _ids("xyz12"), _ids("q")]
    eng = _engine(model)
    for p in prompts:  # warm-up: compiles the steps for this engine shape
        eng.submit(p, SamplingParams(max_new_tokens=6))
    eng.run()
    mixed = [
        SamplingParams(max_new_tokens=6, temperature=0.7, top_p=0.9, seed=1),
        SamplingParams(max_new_tokens=6, temperature=1.3, top_k=5, presence_penalty=0.5),
        SamplingParams(max_new_tokens=6, temperature=0.9, min_p=0.1, repetition_penalty=1.2),
        SamplingParams(max_new_tokens=6, frequency_penalty=1.0, logit_bias={5: 2.0}, logprobs=3),
    ]
    with count_compilations() as names:
        eng = _engine(model)
        for p, params in zip(prompts, mixed):
            eng.submit(p, params)
        out = eng.run()
    assert len(out) == 4
    assert not [n for n in names if "_prefill" in n or "_decode" in n], names


def test_warmup_compiles_what_a_burst_of_newcomers_needs(model):
    """After ``warmup``, requests arriving alone or together (any count up to the slots, prompts
    up to the warmed length) compile nothing, the first engine step included; the dummies leave
    no trace in the counters or the prefix cache. (Its own cache length: shapes of its own.)"""
    eng = Engine(model, num_slots=SLOTS, max_len=48, tokenizer=TOK, prefix_cache=2)
    with count_compilations() as warm:
        assert eng.warmup(20) == 3  # one width (32: the narrowest), 1, 2 and 4 prompts at once
    assert sum("_prefill" in n for n in warm) == 3, warm
    assert eng.stats()["prefill_tokens"] == 0 and eng.stats()["prefix_cache_entries"] == 0
    params = SamplingParams(max_new_tokens=3)
    with count_compilations() as names:
        for burst in (["burst a"], ["b", "a longer prompt here"], ["one", "two", "three"]):
            for text in burst:
                eng.submit(_ids(text), params)
            eng.run()
    assert not [n for n in names if "_prefill" in n or "_decode" in n], names
    with pytest.raises(RuntimeError, match="idle"):
        eng.submit(_ids("x"), params)
        eng.warmup(8)


def test_a_seeded_request_samples_the_same_whatever_shares_its_batch(model):
    params = SamplingParams(max_new_tokens=12, temperature=1.0, seed=1234)
    alone = _engine(model)
    alone.submit(_ids("seeded"), params)
    (want,) = alone.run()

    crowded = _engine(model)
    crowded.submit(_ids("first other"), SamplingParams(max_new_tokens=3, temperature=0.8))
    crowded.submit(_ids("second"), SamplingParams(max_new_tokens=20, temperature=1.5, top_k=3))
    crowded.step()  # the others take slots 0 and 1 and advance
    rid = crowded.submit(_ids("seeded"), params)  # lands in slot 2, later, beside other rows
    crowded.submit(_ids("x"), SamplingParams(max_new_tokens=9, temperature=0.3))
    got = {c.request_id: c for c in crowded.run()}[rid]
    assert got.tokens == want.tokens
    np.testing.assert_allclose(got.logprobs, want.logprobs, atol=1e-5)
    # generate() row 0 with the same seed is sample 0 of that request
    res = generate(model, TOK, ["seeded"], params)
    assert res.tokens[0, : res.lengths[0]].tolist() == want.tokens
    # another seed gives another sequence
    other = _engine(model)
    other.submit(_ids("seeded"), params.replace(seed=99))
    assert other.run()[0].tokens != want.tokens


def test_stop_strings_and_stop_ids_end_like_generate(model):
    greedy = generate(model, TOK, ["stop here"], max_new_tokens=24)
    text = greedy.texts[0]
    assert len(text) >= 8, text
    stop = text[5:7]  # a stop string that occurs after some text
    params = SamplingParams(max_new_tokens=24, stop=[stop])
    ref = generate(model, TOK, ["stop here"], params)
    eng = _engine(model)
    eng.submit(_ids("stop here"), params)
    (c,) = eng.run()
    assert c.finish_reason == ref.finish_reasons[0] == "stop" and c.stop_reason == stop
    assert c.text == ref.texts[0] == text[: text.find(stop)]
    assert c.tokens == ref.tokens[0, : ref.lengths[0]].tolist()
    # a stop token id ends the sequence at that token, which is kept
    third = int(greedy.tokens[0, 2])
    first = greedy.tokens[0].tolist().index(third)
    ids_params = SamplingParams(max_new_tokens=24, stop_token_ids=[third])
    eng.submit(_ids("stop here"), ids_params)
    (c,) = eng.run()
    ref = generate(model, TOK, ["stop here"], ids_params)
    assert c.finish_reason == "stop" and c.stop_reason == third
    assert (
        c.tokens
        == greedy.tokens[0, : first + 1].tolist()
        == ref.tokens[0, : ref.lengths[0]].tolist()
    )
    assert ref.finish_reasons[0] == "stop"


def test_top_logprobs_match_the_model(model):
    params = SamplingParams(max_new_tokens=5, temperature=0.9, seed=5, logprobs=4)
    eng = _engine(model)
    prompt = _ids("logprobs")
    eng.submit(prompt, params)
    (c,) = eng.run()
    res = generate(model, TOK, ["logprobs"], params)
    seq = prompt + c.tokens
    logits = np.asarray(model(jnp.asarray([seq])), np.float64)[0]
    for t in range(len(c.tokens)):
        row = logits[len(prompt) - 1 + t]
        lp = row - row.max() - np.log(np.exp(row - row.max()).sum())
        top = np.argsort(-lp)[:4]
        assert [i for i, _ in c.top_logprobs[t]] == top.tolist()
        np.testing.assert_allclose([x for _, x in c.top_logprobs[t]], lp[top], atol=1e-4)
        np.testing.assert_allclose(c.raw_logprobs[t], lp[c.tokens[t]], atol=1e-4)
        assert [i for i, _ in res.top_logprobs[0][t]] == top.tolist()


def test_n_samples_share_one_prefill(model, monkeypatch):
    calls = []
    real = engine_module.prefill_rows
    monkeypatch.setattr(
        engine_module, "prefill_rows", lambda *a, **k: calls.append(a[3].shape) or real(*a, **k)
    )
    params = SamplingParams(max_new_tokens=8, temperature=1.0, seed=7, n=3)
    eng = _engine(model)
    rid = eng.submit(_ids("several"), params)
    out = eng.run()
    assert len(calls) == 1 and calls[0][0] == 1  # one prefill call of one prompt row
    assert sorted(c.index for c in out) == [0, 1, 2] and {c.request_id for c in out} == {rid}
    by_index = {c.index: c.tokens for c in out}
    assert len({tuple(t) for t in by_index.values()}) > 1  # distinct samples
    # generate(n=3) gives the same three samples (row r is sample r of the seed)
    res = generate(model, TOK, ["several"], params)
    assert res.tokens.shape[0] == 3 and res.prompt_index.tolist() == [0, 0, 0]
    for j in range(3):
        assert res.tokens[j, : res.lengths[j]].tolist() == by_index[j]
    with pytest.raises(ValueError, match="n=5 samples need as many slots"):
        eng.submit(_ids("x"), params.replace(n=5))


def test_newcomers_of_a_step_share_one_prefill_call(model, monkeypatch):
    calls = []
    real = engine_module.prefill_rows
    monkeypatch.setattr(
        engine_module, "prefill_rows", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    eng = _engine(model)
    for text in ("a", "bb", "ccc", "dddd"):
        eng.submit(_ids(text), SamplingParams(max_new_tokens=4))
    eng.step()
    assert len(calls) == 1 and eng.num_active == 4


def test_stream_deltas_add_up_to_the_completions(model):
    eng = _engine(model)
    greedy = generate(model, TOK, ["stream me"], max_new_tokens=20).texts[0]
    stop = greedy[6:9]
    eng.submit(_ids("stream me"), SamplingParams(max_new_tokens=20, stop=[stop]))
    eng.submit(_ids("other"), SamplingParams(max_new_tokens=15, temperature=0.8, seed=3))
    texts, tokens, done = {}, {}, {}
    for d in eng.stream():
        texts[d.request_id] = texts.get(d.request_id, "") + d.text
        tokens.setdefault(d.request_id, []).extend(d.tokens)
        assert stop not in texts[d.request_id] or d.request_id == 1
        if d.completion is not None:
            done[d.request_id] = d.completion
    for rid, c in done.items():
        assert texts[rid] == c.text
        assert tokens[rid][: len(c.tokens)] == c.tokens
    assert done[0].finish_reason == "stop" and done[0].text == greedy[: greedy.find(stop)]


def test_submit_and_cancel_from_other_threads(model):
    """One thread drives the engine; four others submit and cancel meanwhile. Every request that
    was not cancelled finishes with the tokens it has alone (greedy)."""
    prompts = [_ids(f"thread {i} says") for i in range(12)]
    alone = {}
    ref = _engine(model)
    for i, p in enumerate(prompts):
        ref.submit(p, SamplingParams(max_new_tokens=10, ignore_eos=True), request_id=i)
    for c in ref.run():
        alone[c.request_id] = c.tokens

    eng = _engine(model)
    results, stop = [], threading.Event()

    def drive():
        while not stop.is_set():
            if eng.wait_for_work(timeout=0.05):
                results.extend(eng.step())

    def client(k):
        for i in range(k, 12, 4):
            eng.submit(prompts[i], SamplingParams(max_new_tokens=10, ignore_eos=True), request_id=i)
            if i % 4 == 3:
                assert eng.cancel(i)

    driver = threading.Thread(target=drive)
    driver.start()
    clients = [threading.Thread(target=client, args=(k,)) for k in range(4)]
    for t in clients:
        t.start()
    for t in clients:
        t.join()
    deadline = 0
    while eng.has_work and deadline < 600:
        threading.Event().wait(0.1)
        deadline += 1
    stop.set()
    driver.join()
    got = {c.request_id: c.tokens for c in results}
    assert set(got) == {i for i in range(12) if i % 4 != 3}
    for i, toks in got.items():
        assert toks == alone[i], i
    assert not eng.cancel(3)  # long gone


def test_generate_n_and_bad_params(model):
    res = generate(model, TOK, ["ab", "cde"], max_new_tokens=4, temperature=1.0, n=2, seed=0)
    assert res.tokens.shape == (4, 4) and res.prompt_index.tolist() == [0, 0, 1, 1]
    assert len(res.texts) == 4 and list(res.prompt_lengths) == [2, 2, 3, 3]
    with pytest.raises(ValueError, match="SamplingParams: top_k"):
        generate(model, TOK, ["ab"], max_new_tokens=4, top_k=-2)
    eng = _engine(model)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        eng.submit([CFG.vocab_size + 3], SamplingParams(max_new_tokens=2))
    with pytest.raises(ValueError, match="stop strings need an Engine built with a tokenizer"):
        Engine(model, num_slots=2, max_len=32).submit([1], SamplingParams(stop=["x"]))


def test_penalties_and_bias_in_generation_match_a_step_by_step_reference(model):
    """Greedy decoding with penalties and a bias equals argmax of numpy-penalised logits of the
    model's own forward pass over the growing sequence."""
    params = SamplingParams(
        max_new_tokens=10, repetition_penalty=1.8, frequency_penalty=0.7, presence_penalty=0.4,
        logit_bias={7: 1.5}, ignore_eos=True,
    )  # fmt: skip
    prompt = _ids("aaaa bbb")
    res = generate_rows(
        model, np.asarray([prompt]), np.ones((1, len(prompt))), params, eos_ids=(), pad_id=0
    )
    seq, counts = list(prompt), np.zeros(CFG.vocab_size)
    forward = jax.jit(lambda ids: model(ids))  # causal: right padding leaves earlier rows alone
    for t in range(10):
        ids = np.zeros((1, 32), np.int32)
        ids[0, : len(seq)] = seq
        x = np.asarray(forward(jnp.asarray(ids)), np.float64)[0, len(seq) - 1]
        hit = np.isin(np.arange(CFG.vocab_size), prompt) | (counts > 0)
        x = np.where(hit, np.where(x > 0, x / 1.8, x * 1.8), x)
        x = x - 0.7 * counts - 0.4 * (counts > 0)
        x[7] += 1.5
        nxt = int(np.argmax(x))
        assert res.tokens[0, t] == nxt, t
        counts[nxt] += 1
        seq.append(nxt)


# -- prefix cache ------------------------------------------------------------------------------


def _conversation(model, engine, turns=4, params=None):
    """A growing conversation: each turn's prompt is the last prompt, its reply and new text."""
    params = params or SamplingParams(max_new_tokens=6, ignore_eos=True)
    prompt, replies = _ids("sys: hi. user: yo"), []
    for t in range(turns):
        engine.submit(prompt, params)
        (c,) = engine.run()
        replies.append((c.tokens, c.cached_tokens))
        prompt = prompt + c.tokens + _ids(f" u: t{t}")
    return replies


def test_prefix_cache_gives_the_same_tokens_and_prefills_less(model):
    off = _engine(model)
    on = _engine(model, prefix_cache=2)
    want = _conversation(model, off)
    got = _conversation(model, on)
    assert [t for t, _ in got] == [t for t, _ in want]
    assert [c for _, c in want] == [0, 0, 0, 0] and got[0][1] == 0
    assert all(c > 0 for _, c in got[1:])  # later turns reuse the history
    stats_on, stats_off = on.stats(), off.stats()
    assert stats_on["prefix_cache_hits"] == 3 and stats_on["cached_tokens"] == sum(
        c for _, c in got
    )
    assert stats_on["prefill_tokens"] + stats_on["cached_tokens"] == stats_off["prefill_tokens"]
    # with a repetition penalty the cached prompt tokens still count as seen
    penalised = SamplingParams(max_new_tokens=6, ignore_eos=True, repetition_penalty=1.5)
    assert [t for t, _ in _conversation(model, _engine(model, prefix_cache=2), 3, penalised)] == [
        t for t, _ in _conversation(model, _engine(model), 3, penalised)
    ]
    # new weights: nothing cached is reused
    on.update_weights(Decoder(CFG, rngs=nnx.Rngs(8)))
    before = on.stats()["prefix_cache_hits"]
    on.submit(_ids("sys: hi. user: yo"), SamplingParams(max_new_tokens=2))
    (c,) = on.run()
    assert c.cached_tokens == 0 and on.stats()["prefix_cache_hits"] == before


def test_sampling_logprobs_match_numpy_and_the_sampler():
    """What a trainer scores rollouts with: log-probs under temperature and top-k / top-p
    filtering (float64 numpy), equal to the sampler's own behaviour log-probs."""
    rng = np.random.default_rng(4)
    logits = rng.normal(size=(2, 3, 30)).astype(np.float32) * 2
    tokens = rng.integers(0, 30, size=(2, 3))
    for temperature, top_k, top_p in [(0.7, 0, 1.0), (1.3, 0, 0.8), (0.9, 6, 0.95)]:
        got = np.asarray(
            core.sampling_logprobs(
                jnp.asarray(logits), jnp.asarray(tokens), temperature=temperature, top_k=top_k,
                top_p=top_p,
            )
        )  # fmt: skip
        for b in range(2):
            for t in range(3):
                x = logits[b, t].astype(np.float64) / temperature
                keep = sorted(_np_filtered(x, top_k, top_p, 0.0))
                lse = np.log(np.exp(x[keep] - x[keep].max()).sum()) + x[keep].max()
                want = x[tokens[b, t]] - lse if tokens[b, t] in keep else -np.inf
                np.testing.assert_allclose(got[b, t], want, rtol=1e-5, atol=1e-5)
        # the sampler's behaviour log-prob of what it drew is the same function's value
        params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
        rp = jax.tree.map(jnp.asarray, core.row_params([(params, 3, 0, ())] * 3))
        flat = jnp.asarray(logits[0])
        tok, lp, *_ = core.sample_rows(
            flat, rp, jnp.zeros((3, 30), jnp.int32), jnp.zeros((3, 30), bool), jnp.arange(3)
        )
        again = core.sampling_logprobs(flat, tok, temperature=temperature, top_k=top_k, top_p=top_p)
        np.testing.assert_allclose(np.asarray(lp), np.asarray(again), atol=1e-5)
