"""generate(): greedy decoding equals step-by-step argmax; sampling filters; stop strings; errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlab.generation import filter_logits, generate_tokens
from jaxlab.models import Decoder
from jaxlab.testing import TINY_DECODER

CFG = TINY_DECODER


def test_greedy_equals_recomputed_argmax():
    model = Decoder(CFG, rngs=nnx.Rngs(0))
    ids = np.array([[0, 0, 3, 4, 5], [6, 7, 8, 9, 10]], np.int32)
    mask = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], np.int32)
    tokens, logprobs, raw, lengths, ended = generate_tokens(
        model, ids, mask, max_new_tokens=6, eos_ids=(49,), pad_id=0
    )
    for row in range(2):
        seq = list(ids[row][mask[row] == 1])
        for t in range(int(lengths[row])):
            logits = np.asarray(model(jnp.asarray([seq])))[0, -1]
            nxt = int(np.argmax(logits))
            assert tokens[row, t] == nxt
            lp = logits - logits.max() - np.log(np.exp(logits - logits.max()).sum())
            assert abs(logprobs[row, t] - lp[nxt]) < 1e-4
            seq.append(nxt)
    np.testing.assert_array_equal(logprobs, raw)  # greedy: both are the model's log-probabilities


def test_eos_ends_a_row_and_pads_after():
    model = Decoder(CFG, rngs=nnx.Rngs(0))
    ids = np.array([[1, 2, 3]], np.int32)
    first, *_ = generate_tokens(
        model, ids, np.ones_like(ids), max_new_tokens=4, eos_ids=(49,), pad_id=0
    )
    eos = int(first[0, 1])  # make the second generated token an end token
    tokens, logprobs, _, lengths, ended = generate_tokens(
        model, ids, np.ones_like(ids), max_new_tokens=4, eos_ids=(eos,), pad_id=0
    )
    assert lengths[0] == 2 and ended[0]
    assert (tokens[0, 2:] == 0).all() and (logprobs[0, 2:] == 0).all()


def test_filter_logits_against_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 20)).astype(np.float32)
    out = np.asarray(filter_logits(jnp.asarray(logits), temperature=0.7, top_k=8, top_p=0.6))
    for row, x in zip(out, logits / 0.7):
        keep = np.argsort(-x)[:8]
        p = np.exp(x[keep] - x[keep].max())
        p /= p.sum()
        n = int(np.searchsorted(np.cumsum(p), 0.6) + 1)  # smallest prefix reaching 0.6
        expected = set(keep[:n].tolist())
        assert set(np.flatnonzero(np.isfinite(row)).tolist()) == expected


def test_sampling_is_reproducible_and_logprobs_are_of_the_filtered_distribution():
    model = Decoder(CFG, rngs=nnx.Rngs(0))
    ids = np.array([[1, 2, 3]] * 4, np.int32)
    kw = dict(max_new_tokens=5, eos_ids=(), pad_id=0, temperature=0.8, top_k=5, seed=7)
    a = generate_tokens(model, ids, np.ones_like(ids), **kw)
    b = generate_tokens(model, ids, np.ones_like(ids), **kw)
    np.testing.assert_array_equal(a[0], b[0])
    # the first token's log-probability under temperature 0.8 and top-5, recomputed
    logits = np.asarray(model(jnp.asarray(ids[:1])))[0, -1] / 0.8
    keep = np.argsort(-logits)[:5]
    logz = np.log(np.exp(logits[keep] - logits[keep].max()).sum()) + logits[keep].max()
    for row in range(4):
        tok = a[0][row, 0]
        assert tok in keep
        assert abs(a[1][row, 0] - (logits[tok] - logz)) < 1e-4


def test_context_check_uses_the_real_prompt_length():
    model = Decoder(CFG, rngs=nnx.Rngs(0))
    ids = np.zeros((1, 120), np.int32)
    mask = np.zeros((1, 120), np.int32)
    mask[0, -10:] = 1  # 10 real tokens in a wide padded batch: 10 + 100 fits in 128
    tokens, *_ = generate_tokens(model, ids, mask, max_new_tokens=100, eos_ids=(), pad_id=0)
    assert tokens.shape == (1, 100)


def test_top_k_larger_than_the_vocabulary_keeps_everything():
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(2, 7)), jnp.float32)
    np.testing.assert_array_equal(
        np.asarray(filter_logits(logits, temperature=1.0, top_k=100, top_p=1.0)), np.asarray(logits)
    )


def test_generation_input_errors():
    model = Decoder(CFG, rngs=nnx.Rngs(0))
    ids = np.ones((1, 4), np.int32)
    with pytest.raises(ValueError, match="exceeds the model's context of 128"):
        generate_tokens(model, ids, ids, max_new_tokens=200, eos_ids=(), pad_id=0)
    with pytest.raises(ValueError, match="top_p must lie in"):
        generate_tokens(model, ids, ids, max_new_tokens=2, eos_ids=(), pad_id=0, top_p=0.0)
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        generate_tokens(model, ids, ids, max_new_tokens=2, eos_ids=(), pad_id=0, temperature=-1.0)
    with pytest.raises(TypeError, match="needs a decoder LM, got BertEncoder"):
        from jaxlab.models import BertConfig, BertEncoder

        generate_tokens(
            BertEncoder(BertConfig(), rngs=nnx.Rngs(0)),
            ids,
            ids,
            max_new_tokens=2,
            eos_ids=(),
            pad_id=0,
        )
    assert jax.device_count() == 8  # conftest's virtual devices are in place


def test_bucketed_shapes_do_not_recompile():
    from jaxlab.testing.compile_count import count_compilations

    model = Decoder(CFG, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)

    def run(b, p, n):
        ids = rng.integers(1, 50, size=(b, p)).astype(np.int32)
        generate_tokens(model, ids, np.ones_like(ids), max_new_tokens=n, eos_ids=(), pad_id=0)

    run(3, 5, 20)  # compiles prefill and decode for the (4, 8, 32) bucket
    with count_compilations() as names:
        run(4, 7, 30)
        run(2 + 1, 6, 25)
        run(4, 8, 17)
    assert not [n for n in names if "_prefill" in n or "_decode" in n], names
    with count_compilations() as names:
        run(5, 8, 20)  # a new batch bucket (8) compiles once more
    assert sum("_prefill" in n for n in names) == 1


def test_bad_requests_fail_before_any_compilation():
    from jaxlab.models import LoadError, from_pretrained
    from jaxlab.testing.compile_count import count_compilations

    model = Decoder(CFG, rngs=nnx.Rngs(0))
    with count_compilations() as names:
        with pytest.raises(
            ValueError, match=r"prompt \(130 tokens\) \+ max_new_tokens \(1\) exceeds"
        ):
            long = np.ones((1, 130), np.int32)
            generate_tokens(model, long, long, max_new_tokens=1, eos_ids=(), pad_id=0)
        with pytest.raises(
            ValueError, match=r"prompt \(4 tokens\) \+ max_new_tokens \(125\) exceeds"
        ):
            short = np.ones((1, 4), np.int32)
            generate_tokens(model, short, short, max_new_tokens=125, eos_ids=(), pad_id=0)
        with pytest.raises(ValueError, match="non-empty"):
            generate_tokens(
                model,
                np.zeros((0, 4), np.int32),
                np.zeros((0, 4), np.int32),
                max_new_tokens=2,
                eos_ids=(),
                pad_id=0,
            )
        with pytest.raises(LoadError, match="not a registered name"):
            from_pretrained("no-such-model")
    assert not [n for n in names if "_prefill" in n or "_decode" in n]


def test_sampling_never_leaves_the_top_k_top_p_set_and_matches_its_distribution():
    from jaxlab.generation import sample_tokens

    logits = jnp.log(jnp.asarray([[0.30, 0.25, 0.20, 0.10, 0.08, 0.05, 0.02]], jnp.float32))
    n = 40_000
    keys = jax.random.split(jax.random.key(0), n)
    draw = jax.jit(
        jax.vmap(lambda k: sample_tokens(logits, k, temperature=1.0, top_k=4, top_p=0.7)[0][0])
    )
    samples = np.asarray(draw(keys))
    # top-4 keeps ids 0-3 (mass 0.85); top-p 0.7 within them keeps 0, 1, 2 (0.30+0.25 < 0.7 <= +0.20)
    assert set(np.unique(samples).tolist()) == {0, 1, 2}
    expected = np.array([0.30, 0.25, 0.20]) / 0.75
    freq = np.bincount(samples, minlength=3)[:3] / n
    se = np.sqrt(expected * (1 - expected) / n)
    assert np.all(np.abs(freq - expected) < 5 * se), (freq, expected)
    # temperature sharpens: at T=0.5 the probabilities are p^2 renormalised
    draw_t = jax.jit(jax.vmap(lambda k: sample_tokens(logits, k, temperature=0.5)[0][0]))
    p = np.array([0.30, 0.25, 0.20, 0.10, 0.08, 0.05, 0.02]) ** 2
    p /= p.sum()
    freq = np.bincount(np.asarray(draw_t(keys)), minlength=7) / n
    assert np.all(np.abs(freq - p) < 5 * np.sqrt(p * (1 - p) / n) + 1e-4)
