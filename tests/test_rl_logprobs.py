"""Policy log-probs at the loss positions only, in chunks (jaxlab.rl.logprobs): equal to the
log-probs of the logits at every position, gathered by hand, and so are their gradients; the
chunked backward pass keeps one chunk's logits, not all of them."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlab.generation.core import sampling_logprobs
from jaxlab.models import Decoder
from jaxlab.rl.logprobs import loss_positions, response_logprobs
from jaxlab.testing import TINY_DECODER

B, W = 3, 24
STARTS, LENGTHS = (2, 9, 0), (7, 12, 0)  # row 2 has no response (a padding row)


def _batch(seed=0, vocab=TINY_DECODER.vocab_size):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, vocab, (B, W)).astype(np.int32)
    mask = np.ones((B, W), np.int32)
    mask[0, 15:] = 0  # right padding
    loss_mask = np.zeros((B, W - 1), np.float32)
    for b, (s, n) in enumerate(zip(STARTS, LENGTHS)):
        loss_mask[b, s : s + n] = 1
    behaviour = rng.normal(-2, 0.5, (B, W - 1)).astype(np.float32)
    weights = rng.normal(size=(B, W - 1)).astype(np.float32)
    return tokens, mask, loss_mask, behaviour, weights


def _reference(model, tokens, mask, loss_mask, temperature, top_p):
    """Every position's logits, then each row's loss positions picked out in numpy."""
    logits = model(jnp.asarray(tokens[:, :-1]), attention_mask=jnp.asarray(mask[:, :-1]))
    lp = np.asarray(
        sampling_logprobs(logits, jnp.asarray(tokens[:, 1:]), temperature=temperature, top_p=top_p)
    )
    return [lp[b, loss_mask[b] > 0] for b in range(B)]


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("chunk", [0, 5, 64])
def test_response_logprobs_equal_every_position_logprobs(tied, chunk):
    cfg = dataclasses.replace(TINY_DECODER, tie_word_embeddings=tied)
    model = Decoder(cfg, rngs=nnx.Rngs(1))
    tokens, mask, loss_mask, behaviour, _ = _batch()
    window = 12
    logp, lmask, beh = response_logprobs(
        model, tokens, mask, loss_mask, behaviour,
        window=window, temperature=0.7, top_p=0.9, chunk=chunk,
    )  # fmt: skip
    assert logp.shape == lmask.shape == beh.shape == (B, window)
    want = _reference(model, tokens, mask, loss_mask, 0.7, 0.9)
    for b in range(B):
        n = LENGTHS[b]
        np.testing.assert_allclose(np.asarray(logp[b, :n]), want[b], rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(np.asarray(lmask[b]), np.arange(window) < n)
        np.testing.assert_array_equal(np.asarray(beh[b, :n]), behaviour[b, loss_mask[b] > 0])


@pytest.mark.parametrize("tied", [False, True])
def test_chunked_gradient_equals_the_one_block_gradient(tied):
    cfg = dataclasses.replace(TINY_DECODER, tie_word_embeddings=tied)
    model = Decoder(cfg, rngs=nnx.Rngs(2))
    tokens, mask, loss_mask, behaviour, weights = _batch(seed=3)
    graphdef, params = nnx.split(model, nnx.Param)

    def loss(params, chunk):
        m = nnx.merge(graphdef, params)
        logp, lmask, w = response_logprobs(
            m, tokens, mask, loss_mask, weights, window=12, temperature=1.0, chunk=chunk
        )
        return jnp.sum(logp * lmask * w)

    grads = [jax.grad(loss)(params, c) for c in (0, 5)]
    flat = [jax.tree.leaves(g) for g in grads]
    assert len(flat[0]) == len(flat[1])
    for a, b in zip(*flat):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-6)
    # the output head gets a gradient through the chunked loop (not a stopped one)
    head = "embed_tokens" if tied else "lm_head"
    g = nnx.State(grads[1]).flat_state()
    assert any(
        head in "/".join(map(str, k)) and np.abs(np.asarray(v.value)).max() > 0 for k, v in g
    )


def test_chunked_backward_keeps_one_chunk_of_logits():
    """The compiled gradient's temporary memory over that of the decoder alone: with a
    vocabulary of 4096 the logits of 4 rows of 64 positions are 4 MiB; projected 8 positions at a
    time (rematerialised) the loss adds a small fraction of what the one-block projection adds."""
    cfg = dataclasses.replace(TINY_DECODER, vocab_size=4096)
    model = Decoder(cfg, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, 4096, (4, 65)).astype(np.int32)
    mask = np.ones_like(tokens)
    loss_mask = np.ones((4, 64), np.float32)
    graphdef, params = nnx.split(model, nnx.Param)

    def temp_bytes(chunk):
        def loss(params):
            m = nnx.merge(graphdef, params)
            if chunk is None:  # the decoder alone: its hidden states, no projection
                return jnp.sum(m(tokens[:, :-1], attention_mask=mask[:, :-1], return_hidden=True))
            logp, lmask = response_logprobs(
                m, tokens, mask, loss_mask, window=64, temperature=1.0, chunk=chunk
            )
            return jnp.sum(logp * lmask)

        mem = jax.jit(jax.grad(loss)).lower(params).compile().memory_analysis()
        assert mem is not None, "XLA gave no memory analysis: the test cannot check the remat"
        return mem.temp_size_in_bytes

    logits_bytes = 4 * 64 * 4096 * 4
    base = temp_bytes(None)
    full, chunked = temp_bytes(0) - base, temp_bytes(8) - base
    assert full > logits_bytes  # the one-block program holds the logits (and their gradient)
    assert chunked < logits_bytes / 4, (full, chunked)


def test_loss_positions_brute_force():
    rng = np.random.default_rng(5)
    lm = (rng.uniform(size=(6, 30)) < 0.3).astype(np.float32)
    for window in (4, 30, 40):
        index, valid = loss_positions(jnp.asarray(lm), window)
        r = min(window, 30)
        assert index.shape == valid.shape == (6, r)
        for b in range(6):
            pos = np.flatnonzero(lm[b])[:r]
            np.testing.assert_array_equal(np.asarray(index[b, : len(pos)]), pos)
            np.testing.assert_array_equal(np.asarray(valid[b]), np.arange(r) < len(pos))


@pytest.mark.parametrize(
    "agg, kl_coef, chunk",
    [("token_mean", 0.0, 0), ("delta_l", 0.1, 4), ("seq_mean_token_mean", 0.0, 5)],
)
def test_rl_update_equals_the_every_position_loss(agg, kl_coef, chunk):
    """The single-turn trainer's update (completion positions only, chunked or not) gives the
    loss and gradient of the policy loss over every position's logits."""
    import optax

    from jaxlab import rl
    from jaxlab.rl.trainer import RLLossConfig, _make_update_fn

    model = Decoder(TINY_DECODER, rngs=nnx.Rngs(4))
    ref_model = Decoder(TINY_DECODER, rngs=nnx.Rngs(5))
    tokens, mask, loss_mask, behaviour, _ = _batch(seed=6)
    adv = np.array([1.0, -0.5, 0.0], np.float32)
    loss_cfg = RLLossConfig(agg=agg, alpha=0.5, kl_coef=kl_coef, clip_low=0.2, clip_high=0.28)
    max_len = 12.0

    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def reference(params):
        m = nnx.merge(graphdef, params, rest)
        kw = dict(temperature=0.8, top_p=1.0)
        logp = sampling_logprobs(
            m(tokens[:, :-1], attention_mask=mask[:, :-1]), tokens[:, 1:], **kw
        )
        loss, _ = rl.policy_loss(
            logp, behaviour, adv, loss_mask, clip_low=0.2, clip_high=0.28, agg=agg,
            max_len=max_len, alpha=0.5,
        )  # fmt: skip
        if kl_coef:
            ref = sampling_logprobs(
                ref_model(tokens[:, :-1], attention_mask=mask[:, :-1]), tokens[:, 1:], **kw
            )
            kl = rl.kl_penalty(logp, ref, "k3")
            loss += kl_coef * rl.aggregate_loss(kl, loss_mask, agg, max_len=max_len, alpha=0.5)
        return loss

    want_loss, want_grads = jax.value_and_grad(reference)(params)
    update = _make_update_fn(loss_cfg, 0.8, max_len, 1.0, window=12, chunk=chunk)
    optimizer = nnx.Optimizer(model, optax.sgd(0.0), wrt=nnx.Param)
    metrics = update(model, optimizer, ref_model, tokens, mask, loss_mask, behaviour, adv)
    np.testing.assert_allclose(float(metrics["loss"]), float(want_loss), rtol=1e-5)
    np.testing.assert_allclose(
        float(metrics["grad_norm"]), float(optax.global_norm(want_grads)), rtol=1e-5
    )
