"""generate(): greedy decoding equals step-by-step argmax; sampling filters; stop strings; errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlab.generation import filter_logits, generate_tokens
from jaxlab.models import Decoder, DecoderConfig

CFG = DecoderConfig(
    vocab_size=50,
    hidden_size=32,
    intermediate_size=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    max_position_embeddings=128,
)


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
