"""Decoder/encoder behaviour that needs no reference library: KV cache, masks, attention registry,
gradients against finite differences."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlab.attention import attention, attention_implementations, grouped_attention
from jaxlab.models import BertConfig, BertEncoder, Decoder, DecoderConfig
from jaxlab.models.layers import padding_positions

CFG = DecoderConfig(
    vocab_size=97,
    hidden_size=48,
    intermediate_size=80,
    num_layers=3,
    num_heads=6,
    num_kv_heads=2,
    qk_norm=True,
    attention_bias=True,
)


def _left_padded(rng, lengths, width, vocab):
    ids = rng.integers(0, vocab, size=(len(lengths), width)).astype(np.int32)
    mask = np.zeros((len(lengths), width), np.int32)
    for i, n in enumerate(lengths):
        mask[i, width - n :] = 1
    return ids, mask


def test_cached_prefill_and_decode_equal_full_forward():
    model = Decoder(CFG, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    ids, mask = _left_padded(rng, [10, 4, 7], 10, CFG.vocab_size)
    full = np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))

    # prefill 6 tokens into a 16-slot cache, then feed the remaining 4 one at a time
    cache = model.init_cache(3, 16)
    logits, cache = model(
        jnp.asarray(ids[:, :6]), attention_mask=jnp.asarray(mask[:, :6]), cache=cache
    )
    steps = [np.asarray(logits)]
    for t in range(6, 10):
        logits, cache = model(
            jnp.asarray(ids[:, t : t + 1]),
            attention_mask=jnp.asarray(mask[:, t : t + 1]),
            cache=cache,
        )
        steps.append(np.asarray(logits))
    cached = np.concatenate(steps, axis=1)
    real = mask.astype(bool)
    np.testing.assert_allclose(cached[real], full[real], rtol=1e-5, atol=1e-5)
    assert np.array_equal(np.asarray(cache.index), [10, 10, 10])
    assert np.array_equal(np.asarray(cache.valid)[:, :10], real)


def test_rows_with_different_cache_offsets():
    """Rows sit at different cache offsets (continuous batching): each row's logits equal those of
    its own sequence run alone, uncached."""
    model = Decoder(CFG, rngs=nnx.Rngs(1))
    rng = np.random.default_rng(1)
    a = rng.integers(0, CFG.vocab_size, size=9).astype(np.int32)  # row 0: 6 tokens, then 3 more
    b = rng.integers(0, CFG.vocab_size, size=5).astype(np.int32)  # row 1: 2 tokens, then 3 more

    def alone(seq):
        return np.asarray(model(jnp.asarray(seq[None])))[0]

    cache = model.init_cache(2, 16)
    first = np.zeros((2, 6), np.int32)
    first[0], first[1, :2] = a[:6], b[:2]
    mask = np.zeros((2, 6), np.int32)
    mask[0], mask[1, :2] = 1, 1  # row 1's tail is right padding: masked, and not written as valid
    _, cache = model(jnp.asarray(first), attention_mask=jnp.asarray(mask), cache=cache)
    cache = cache._replace(
        index=jnp.asarray([6, 2], jnp.int32)
    )  # each row writes after its own tokens
    logits, cache = model(jnp.asarray(np.stack([a[6:], b[2:]])), cache=cache)
    np.testing.assert_allclose(np.asarray(logits)[0], alone(a)[6:], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(logits)[1], alone(b)[2:], rtol=1e-5, atol=1e-5)
    assert np.array_equal(np.asarray(cache.index), [9, 5])


def test_logits_to_keep_is_the_tail_of_the_full_logits():
    model = Decoder(CFG, rngs=nnx.Rngs(1))
    ids = jnp.asarray(np.random.default_rng(2).integers(0, CFG.vocab_size, (2, 6)), jnp.int32)
    mask = jnp.asarray([[0, 0, 1, 1, 1, 1], [1] * 6])
    full = np.asarray(model(ids, attention_mask=mask))
    tail = np.asarray(model(ids, attention_mask=mask, logits_to_keep=2))
    assert tail.shape == (2, 2, CFG.vocab_size)
    np.testing.assert_allclose(tail, full[:, -2:], rtol=1e-6, atol=1e-6)
    logits, _ = model(ids, attention_mask=mask, cache=model.init_cache(2, 8), logits_to_keep=1)
    np.testing.assert_allclose(np.asarray(logits)[:, 0], full[:, -1], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"logits_to_keep must lie in \[1, 6\], got 7"):
        model(ids, logits_to_keep=7)


def test_padding_positions():
    mask = jnp.asarray([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]])
    assert np.array_equal(
        np.asarray(padding_positions(mask)), [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4], [0] * 5]
    )


@pytest.mark.parametrize("impl", [i for i in attention_implementations() if i != "cudnn"])
@pytest.mark.parametrize("batch,masked", [(2, True), (1, True), (3, False)])
def test_attention_implementations_agree_with_float64(impl, batch, masked):
    rng = np.random.default_rng(3)
    q = rng.normal(size=(batch, 5, 6, 8))
    k = rng.normal(size=(batch, 7, 2, 8))
    v = rng.normal(size=(batch, 7, 2, 8))
    mask = rng.random((batch, 5, 7)) < 0.7 if masked else np.ones((batch, 5, 7), bool)
    mask[-1, 2] = not masked  # a row that sees nothing stays finite
    out = np.asarray(
        attention(
            *(jnp.asarray(x, jnp.float32) for x in (q, k, v)),
            jnp.asarray(mask) if masked else None,
            implementation=impl,
        )
    )
    if impl == "xla":  # one sequence at a time (CPU, large logits) gives the same
        looped = grouped_attention(
            *(jnp.asarray(x, jnp.float32) for x in (q, k, v)),
            jnp.asarray(mask) if masked else None,
            scale=8**-0.5,
            per_sequence=True,
        )
        np.testing.assert_allclose(np.asarray(looped), out, rtol=1e-5, atol=1e-6)
    # float64 numpy reference
    kk, vv = np.repeat(k, 3, axis=2), np.repeat(v, 3, axis=2)
    s = np.einsum("bthd,bshd->bhts", q, kk) / np.sqrt(8)
    s = np.where(mask[:, None], s, -1e30)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    ref = np.einsum("bhts,bshd->bthd", p, vv)
    assert np.isfinite(out).all()
    seen = mask.any(-1)
    np.testing.assert_allclose(out[seen], ref[seen], rtol=1e-5, atol=1e-5)


def test_attention_errors():
    q = jnp.zeros((1, 3, 4, 8))
    k = jnp.zeros((1, 3, 3, 8))
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        attention(q, k, k)
    with pytest.raises(ValueError, match="unknown attention implementation 'flash'; known:"):
        attention(q, q, q, implementation="flash")
    with pytest.raises(ValueError, match=r"mask \(1, 3\) must be \[B, T, S\]"):
        attention(q, q, q, jnp.ones((1, 3), bool))


def _next_token_loss(model, ids, mask):
    """Mean next-token cross-entropy over real tokens of a left-padded batch."""
    logits = model(ids, attention_mask=mask)[:, :-1]
    logp = jax.nn.log_softmax(logits, axis=-1)
    picked = jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
    weight = (mask[:, :-1] * mask[:, 1:]).astype(logits.dtype)
    return -jnp.sum(picked * weight) / jnp.sum(weight)


@pytest.mark.parametrize(
    "cfg",
    [
        CFG,  # stacked layers (training's layout), q/k norms, q/k/v biases
        dataclasses.replace(
            CFG,
            scan_layers=False,
            tie_word_embeddings=True,
            qk_norm=False,
            attention_out_bias=True,
            mlp_bias=True,
        ),
    ],
    ids=["scan", "unrolled-tied"],
)
def test_decoder_gradients_equal_finite_differences(cfg):
    """The gradient (jitted, of the split state, as training takes it) checked per parameter array
    against float64 central differences along a random direction; the float32 model's gradient
    equals the float64 model's to float32 precision."""
    ids, mask = _left_padded(np.random.default_rng(0), [7, 4], 7, cfg.vocab_size)
    ids, mask = jnp.asarray(ids), jnp.asarray(mask)
    model32 = Decoder(cfg, rngs=nnx.Rngs(0))

    def value_and_grad(graphdef):  # one compile per dtype serves the gradient and the differences
        return jax.jit(
            jax.value_and_grad(lambda s: _next_token_loss(nnx.merge(graphdef, s), ids, mask))
        )

    with jax.enable_x64(True):  # the same values in a float64 model (float64 throughout)
        abstract = nnx.eval_shape(lambda: Decoder(cfg, dtype=jnp.float64, rngs=nnx.Rngs(0)))
        graphdef = nnx.graphdef(abstract)
        state = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), nnx.state(model32))
        loss_and_grad = value_and_grad(graphdef)
        loss, grads = loss_and_grad(state)
        assert loss.dtype == jnp.float64  # float64 logits
        flat = nnx.to_flat_state(state)
        grad_leaves = {p: np.asarray(v[...]) for p, v in nnx.to_flat_state(grads)}
        rng = np.random.default_rng(1)
        eps = 1e-6  # in float64 the truncation (~eps²) and rounding (~1e-16 / eps) errors are tiny
        for path, var in flat:
            direction = rng.normal(size=var[...].shape)

            def shifted(step, path=path, direction=direction):
                leaves = [
                    (p, v.replace(v[...] + step * direction) if p == path else v) for p, v in flat
                ]
                return float(loss_and_grad(nnx.from_flat_state(leaves))[0])

            numeric = (shifted(eps) - shifted(-eps)) / (2 * eps)
            analytic = float(np.sum(grad_leaves[path] * direction))
            assert grad_leaves[path].dtype == np.float64
            assert abs(numeric - analytic) <= 1e-5 * abs(analytic), (path, numeric, analytic)
        assert len(grad_leaves) == len(flat) == len(jax.tree.leaves(nnx.state(model32)))

    graphdef32, state32 = nnx.split(model32)
    _, grads32 = value_and_grad(graphdef32)(state32)
    for path, var in nnx.to_flat_state(grads32):
        g32, g64 = np.asarray(var[...]), grad_leaves[path]
        assert g32.dtype == np.float32
        np.testing.assert_allclose(g32, g64, rtol=0, atol=1e-4 * np.abs(g64).max(), err_msg=path)


def test_bert_pooling_and_normalisation():
    cfg = BertConfig(pooling="mean", normalize=True)
    model = BertEncoder(cfg, rngs=nnx.Rngs(0))
    ids = jnp.asarray([[5, 6, 7, 0], [8, 9, 0, 0]])
    mask = jnp.asarray([[1, 1, 1, 0], [1, 1, 0, 0]])
    emb = np.asarray(model.embed(ids, attention_mask=mask))
    np.testing.assert_allclose(np.linalg.norm(emb, axis=-1), 1.0, rtol=1e-6)
    # padding does not change the embedding of the shorter text
    alone = np.asarray(model.embed(ids[1:, :2], attention_mask=mask[1:, :2]))
    np.testing.assert_allclose(emb[1], alone[0], rtol=1e-5, atol=1e-6)


def test_layer_layouts_convert_both_ways_and_agree():
    from jaxlab.models.decoder import with_layer_layout

    model = Decoder(CFG, rngs=nnx.Rngs(4))
    unrolled = with_layer_layout(model, scan_layers=False)
    assert not unrolled.config.scan_layers and len(unrolled.layers) == CFG.num_layers
    assert with_layer_layout(unrolled, scan_layers=False) is unrolled
    ids = jnp.asarray(np.random.default_rng(0).integers(0, CFG.vocab_size, (2, 9)), jnp.int32)
    np.testing.assert_allclose(
        np.asarray(unrolled(ids)), np.asarray(model(ids)), rtol=1e-5, atol=1e-5
    )
    back = with_layer_layout(unrolled, scan_layers=True)
    for a, b in zip(jax.tree.leaves(nnx.state(back)), jax.tree.leaves(nnx.state(model))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    cache = unrolled.init_cache(2, 16)
    assert isinstance(cache.k, tuple) and cache.k[0].shape == (
        2,
        CFG.num_kv_heads,
        16,
        CFG.dim_per_head,
    )
