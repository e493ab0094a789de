"""The native CPU kernels (jaxlab.native) against float64 numpy, and the dispatch around them."""

import dataclasses
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlab import native
from jaxlab.attention.dense import grouped_attention

# Skipped only where there is no compiler: a machine with one that fails to build or load the
# kernels fails test_kernels_build_where_a_compiler_exists instead of skipping everything.
pytestmark = pytest.mark.skipif(
    shutil.which(os.environ.get("CXX", "g++")) is None and not native.available(),
    reason="no C++ compiler to build the native kernels",
)


def test_kernels_build_where_a_compiler_exists():
    assert native.available()


def _attention_f64(q, k, v, mask, scale):
    """q [B, T, H, D], k/v [B, K, S, D], mask [B, T, S] -> [B, T, H, D]; all-hidden rows -> 0."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b, t, h, d = q.shape
    g = h // k.shape[1]
    out = np.zeros_like(q)
    for bi in range(b):
        for ti in range(t):
            for hi in range(h):
                visible = np.asarray(mask[bi, ti])
                if not visible.any():
                    continue
                logits = k[bi, hi // g] @ q[bi, ti, hi] * scale
                logits = np.where(visible, logits, -np.inf)
                p = np.exp(logits - logits.max())
                out[bi, ti, hi] = (p / p.sum()) @ v[bi, hi // g]
    return out


def _mask(rng, b, t, s):
    """Left padding, a current length per row, and a few holes; row 0's last token sees nothing."""
    start = rng.integers(0, s // 3, size=b)
    length = rng.integers(s // 2, s - t + 1, size=b)
    slots = np.arange(s)
    mask = (slots[None, None] >= start[:, None, None]) & (
        slots[None, None] < (length[:, None] + np.arange(t)[None] + 1)[..., None]
    )
    mask &= rng.random((b, 1, s)) > 0.1
    mask[0, -1] = False
    return mask


@pytest.mark.parametrize(
    "b, t, h, kv, s, d",
    [
        (1, 1, 9, 3, 256, 64),  # SmolLM2's decode shape (the AVX-512 path)
        (3, 1, 4, 4, 37, 64),  # slots not a multiple of 16
        (2, 3, 8, 2, 50, 128),  # several new tokens, head dim 128
        (2, 2, 6, 3, 29, 24),  # a head dim with no specialised path
        (2, 40, 6, 2, 100, 64),  # a prefill: three blocks of query tokens per (row, kv head)
        (1, 17, 4, 1, 40, 128),  # one token past a block
    ],
)
def test_cache_attention_matches_float64(b, t, h, kv, s, d):
    rng = np.random.default_rng(b * 100 + d)
    q = rng.normal(size=(b, t, h, d)).astype(np.float32)
    k = rng.normal(size=(b, kv, s, d)).astype(np.float32)
    v = rng.normal(size=(b, kv, s, d)).astype(np.float32)
    mask = _mask(rng, b, t, s)
    scale = d**-0.5
    got = np.asarray(native.cache_attention(q, k, v, jnp.asarray(mask), scale=scale))
    np.testing.assert_allclose(got, _attention_f64(q, k, v, mask, scale), atol=2e-6, rtol=1e-5)
    assert not got[0, -1].any()  # a row with no visible slot gives zeros
    # the XLA formulation agrees wherever a row sees something
    xla = np.asarray(grouped_attention(q, k, v, jnp.asarray(mask), scale=scale, kv_layout="bksd"))
    seen = mask.any(-1)
    np.testing.assert_allclose(got[seen], xla[seen], atol=2e-6, rtol=1e-5)


def test_cache_attention_is_the_default_for_decoding_on_cpu():
    from flax import nnx

    from jaxlab.models.decoder import Decoder, DecoderConfig
    from jaxlab.native.decoding import prepare_for_decoding

    # q/k norms (Qwen3) keep the layer as separate ops, so attention is its own call
    cfg = DecoderConfig(num_layers=2, qk_norm=True, scan_layers=False)

    def jaxpr(m, tokens):
        ids, cache = jnp.zeros((2, tokens), jnp.int32), m.init_cache(2, 48)
        return str(jax.make_jaxpr(lambda c: m(ids, cache=c))(cache))

    model = Decoder(cfg, rngs=nnx.Rngs(0))
    decoding = prepare_for_decoding(model)
    assert jaxpr(decoding, 1).count("jaxlab_cache_attention") == 2  # a decode step
    assert jaxpr(decoding, 40).count("jaxlab_cache_attention") == 2  # a prefill into the cache
    assert "jaxlab_cache_attention" not in jaxpr(model, 1)  # the model itself: XLA
    bf16 = Decoder(cfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    assert prepare_for_decoding(bf16) is bf16  # the kernels are float32 on CPU
    q, k = jnp.ones((2, 1, 4, 16)), jnp.ones((2, 2, 8, 16))
    plain = jax.make_jaxpr(
        lambda q, k: grouped_attention(q, k, k, None, scale=0.25, kv_layout="bksd")
    )(q, k)
    assert "jaxlab_cache_attention" not in str(plain)


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize(
    "m, k, n",
    [
        (1, 576, 1536),
        (8, 576, 192),
        (13, 100, 40),  # depth not a multiple of 16, ragged columns
        (32, 1536, 576),
        (5, 64, 16),
        (3, 48, 1000),  # a ragged last block of weight rows ("nt")
        (6, 300, 72),  # depth split over threads, and ragged columns
    ],
)
def test_rows_matmul_matches_float64(m, k, n, transposed):
    rng = np.random.default_rng(m * k + n)
    x = rng.normal(size=(m, k)).astype(np.float32)
    w = rng.normal(size=(n, k) if transposed else (k, n)).astype(np.float32)
    want = x.astype(np.float64) @ (w.T if transposed else w).astype(np.float64)
    got = np.asarray(native.rows_matmul(x, w, transposed=transposed))
    assert got.shape == (m, n)
    np.testing.assert_allclose(got, want, atol=1e-4 * np.sqrt(k), rtol=1e-5)


@pytest.mark.parametrize("b, v", [(1, 49152), (8, 1000), (3, 63), (2, 1)])
def test_greedy_tokens_match_float64(b, v):
    rng = np.random.default_rng(b * v)
    x = (rng.normal(size=(b, v)) * 4).astype(np.float32)
    if v > 10:
        x[0, 3] = x[0, v - 2] = 100.0  # a tie: the first index wins, as in jnp.argmax
    tokens, logprobs = jax.jit(native.greedy_tokens)(x)
    x64 = x.astype(np.float64)
    want = np.argmax(x64, axis=-1)
    lse = x64.max(-1) + np.log(np.exp(x64 - x64.max(-1, keepdims=True)).sum(-1))
    np.testing.assert_array_equal(np.asarray(tokens), want)
    np.testing.assert_allclose(np.asarray(logprobs), x64[np.arange(b), want] - lse, atol=2e-6)


def test_greedy_logprob_of_a_peaked_row_keeps_its_long_tail():
    """A float running sum that starts at exp(0) = 1 drops each later term under half an ulp:
    over a 49k vocabulary with 1-2% of the mass in small terms, -2e-4 in the log-probability."""
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(8, 49152)) * 3).astype(np.float32)
    x[:, 7] += 25.0
    tokens, logprobs = native.greedy_tokens(jnp.asarray(x))
    x64 = x.astype(np.float64)
    lse = x64.max(-1) + np.log(np.exp(x64 - x64.max(-1, keepdims=True)).sum(-1))
    np.testing.assert_array_equal(np.asarray(tokens), 7)
    np.testing.assert_allclose(np.asarray(logprobs), x64[:, 7] - lse, rtol=0, atol=1e-6)


def test_greedy_tokens_nan_and_infinite_rows_follow_jax():
    x = np.zeros((3, 100), np.float32)
    x[0, 40] = np.nan
    x[0, 70] = 5.0
    x[1] = -np.inf
    x[2, 10] = np.inf
    tokens, logprobs = native.greedy_tokens(jnp.asarray(x))
    np.testing.assert_array_equal(np.asarray(tokens), np.asarray(jnp.argmax(x, axis=-1)))
    want = jnp.take_along_axis(jax.nn.log_softmax(x), jnp.argmax(x, axis=-1)[:, None], axis=-1)
    np.testing.assert_array_equal(np.isnan(np.asarray(logprobs)), np.isnan(np.asarray(want[:, 0])))


def test_greedy_sampling_uses_the_kernel_on_cpu_float32():
    from jaxlab.generation import SamplingParams
    from jaxlab.generation.core import row_params, sample_rows
    from jaxlab.native.decoding import NativeDecoder

    x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 500)).astype(np.float32))
    rp = jax.tree.map(jnp.asarray, row_params([(SamplingParams(), 0, 0, ())] * 4))
    zeros, seen, index = jnp.zeros((4, 500), jnp.int32), jnp.zeros((4, 500), bool), jnp.zeros(4)

    def fn(x):  # generation's greedy path on a decoding model
        out = sample_rows(x, rp, zeros, seen, index, greedy_tokens=NativeDecoder.greedy_tokens)
        return out[:3]

    assert "jaxlab_greedy_tokens" in str(jax.make_jaxpr(fn)(x))
    bf16 = x.astype(jnp.bfloat16)
    assert "jaxlab_greedy_tokens" not in str(jax.make_jaxpr(NativeDecoder.greedy_tokens)(bf16))
    tokens, lp, raw = fn(x)
    want = jax.nn.log_softmax(x)[jnp.arange(4), jnp.argmax(x, axis=-1)]
    np.testing.assert_array_equal(np.asarray(tokens), np.asarray(jnp.argmax(x, axis=-1)))
    np.testing.assert_allclose(np.asarray(lp), np.asarray(want), atol=2e-6)
    np.testing.assert_array_equal(np.asarray(lp), np.asarray(raw))


def test_concurrent_calls_from_several_threads_stay_correct():
    """Calls from several host threads share the lingering pool helpers' mailboxes."""
    from concurrent.futures import ThreadPoolExecutor

    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 576)).astype(np.float32)
    ws = [rng.normal(size=(576, 384)).astype(np.float32) for _ in range(4)]
    fn = jax.jit(native.rows_matmul)
    want = [np.asarray(fn(x, w)) for w in ws]

    def hammer(i):
        return all(np.array_equal(np.asarray(fn(x, ws[i])), want[i]) for _ in range(50))

    with ThreadPoolExecutor(4) as pool:
        assert all(pool.map(hammer, range(4)))


def test_rows_matmul_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="rows_matmul"):
        native.rows_matmul(jnp.ones((2, 3)), jnp.ones((4, 5)))


def test_dot_general_sends_only_few_row_float32_matmuls_to_the_kernel():
    dims = (((2,), (0,)), ((), ()))
    w = jnp.ones((16, 32))

    def uses_kernel(x, w=w, dims=dims):
        jaxpr = str(jax.make_jaxpr(lambda x, w: native.dot_general(x, w, dims))(x, w))
        return "jaxlab_rows_matmul" in jaxpr

    assert uses_kernel(jnp.ones((4, 8, 16)))  # 32 rows
    assert not uses_kernel(jnp.ones((4, 9, 16)))  # 36 rows: XLA
    assert not uses_kernel(jnp.ones((4, 8, 16), jnp.bfloat16), w=w.astype(jnp.bfloat16))
    nt = (((1,), (1,)), ((), ()))
    assert uses_kernel(jnp.ones((32, 32)), dims=nt)  # x @ w.T: the same limit
    assert not uses_kernel(jnp.ones((33, 32)), dims=nt)
    batched = (((2,), (1,)), ((0,), (0,)))
    assert not uses_kernel(jnp.ones((2, 3, 16)), w=jnp.ones((2, 16, 5)), dims=batched)
    x = jax.random.normal(jax.random.PRNGKey(0), (3, 5, 16))
    np.testing.assert_allclose(
        native.dot_general(x, w, dims), jax.lax.dot_general(x, w, dims), rtol=1e-6, atol=1e-5
    )


def test_gradients_and_vmap_go_through_the_xla_formulation():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(4, 32)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(32, 48)), jnp.float32)
    loss = lambda f: lambda x, w: jnp.sum(jnp.sin(f(x, w)))  # noqa: E731
    got = jax.grad(loss(native.rows_matmul), argnums=(0, 1))(x, w)
    want = jax.grad(loss(jnp.matmul), argnums=(0, 1))(x, w)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    xs = jnp.stack([x, 2 * x])
    np.testing.assert_allclose(
        jax.vmap(lambda x: native.rows_matmul(x, w))(xs), xs @ w, rtol=1e-5, atol=1e-4
    )

    q = jnp.asarray(rng.normal(size=(2, 1, 4, 16)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(2, 2, 8, 16)), jnp.float32)
    mask = jnp.asarray(_mask(rng, 2, 1, 8)).at[0].set(True)

    def attn(native_kernel):
        if native_kernel:
            return lambda q, k: jnp.sum(native.cache_attention(q, k, k, mask, scale=0.25) ** 2)
        return lambda q, k: jnp.sum(
            grouped_attention(q, k, k, mask, scale=0.25, kv_layout="bksd") ** 2
        )

    got = jax.grad(attn(True), argnums=(0, 1))(q, k)
    want = jax.grad(attn(False), argnums=(0, 1))(q, k)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_the_library_file_is_named_by_source_flags_and_cpu(monkeypatch):
    name = native._library_name()
    assert name.startswith("_cpu_kernels-") and name.endswith(".so")
    with monkeypatch.context() as m:
        m.setattr(native, "_FLAGS", [*native._FLAGS, "-DJAXLAB_TEST_FLAG"])
        assert native._library_name() != name  # other flags: another build, never a stale one
    with monkeypatch.context() as m:
        m.setattr(native, "_cpu_features", lambda: "flags : fpu sse2")
        assert native._library_name() != name  # another CPU: another build


# builds for narrower vectors than this CPU's (AVX2 on an AVX-512 CPU; plain loops anywhere)
NARROWER_BUILDS = {8: "-mno-avx512f", 1: "-mno-avx512f -mno-avx2 -mno-fma"}


@pytest.mark.parametrize("lanes", sorted(NARROWER_BUILDS))
def test_narrower_vector_builds_pass_the_numeric_kernel_tests(lanes):
    """Each code path the kernels have is tested where the CPU can run it: this machine's own
    build by the tests above, narrower ones here, in a subprocess with JAXLAB_NATIVE_FLAGS."""
    if lanes >= native.vector_lanes():
        pytest.skip(f"this CPU's own build has {native.vector_lanes()} lanes")
    env = {**os.environ, "JAXLAB_NATIVE_FLAGS": NARROWER_BUILDS[lanes]}
    probe = "import jaxlab.native as n; print(n.vector_lanes())"
    got = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True)
    assert got.stdout.split()[-1:] == [str(lanes)], got.stderr[-2000:]
    selection = "matches_float64 or match_float64 or long_tail or nan_and_infinite"
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", selection],
        env=env,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stdout[-4000:]


def _huge_pages_supported() -> bool:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return "[never]" not in f.read()
    except OSError:
        return False


def test_advise_huge_pages_keeps_contents_and_skips_what_it_cannot_advise(monkeypatch):
    rng = np.random.default_rng(0)
    big = jnp.asarray(rng.normal(size=(1536, 2048)).astype(np.float32))  # 12 MiB
    small = jnp.ones((8,), jnp.float32)
    before = np.asarray(big).copy()
    advised = native.advise_huge_pages([big, small, "not an array", None])
    np.testing.assert_array_equal(np.asarray(big), before)  # same memory, same values
    if _huge_pages_supported():
        # the 2 MiB-aligned cover of the array (rounded out, clipped to the process's mappings)
        assert big.nbytes <= advised <= big.nbytes + 2 * (2 << 20)
    assert native.advise_huge_pages([small]) == 0  # under min_bytes
    monkeypatch.setenv("JAXLAB_HUGE_PAGES", "0")
    assert native.advise_huge_pages([big]) == 0
    # the weights are still used as before
    x = jnp.asarray(rng.normal(size=(8, 1536)).astype(np.float32))
    np.testing.assert_allclose(
        native.rows_matmul(x, big), np.asarray(x, np.float64) @ before, rtol=2e-5, atol=2e-4
    )


def test_huge_page_ranges_are_clipped_to_mapped_memory():
    from jaxlab.native import _clip_to_mappings

    assert _clip_to_mappings([[0x1000, 0x3000]]) == []  # the zero page region is never mapped
    a = np.ones(1 << 20, np.float32)
    lo, hi = a.ctypes.data, a.ctypes.data + a.nbytes
    pieces = _clip_to_mappings([[lo, hi]])  # one per mapping the array's memory lies in
    assert pieces[0][0] == lo and pieces[-1][1] == hi
    assert all(p[1] == q[0] for p, q in zip(pieces, pieces[1:]))
    # rounded out past the end of its mapping, the range is cut at the mapping's end
    assert _clip_to_mappings([[hi - 4096, hi + (64 << 40)]])[-1][1] < hi + (64 << 40)


def _layer_reference(x, cos, sin, mask, index, k_cache, v_cache, weights, eps):
    """One Llama decoder layer over a KV cache in float64 numpy (the cache is written first)."""
    ln1, wq, wk, wv, wo, ln2, wg, wu, wd = (np.asarray(w, np.float64) for w in weights)
    x = np.asarray(x, np.float64)
    b, t, _ = x.shape
    kv, s, d = k_cache.shape[1:]
    h = wq.shape[1] // d
    k_cache, v_cache = np.array(k_cache, np.float64), np.array(v_cache, np.float64)

    def norm(y, w):
        return w * y / np.sqrt(np.mean(y * y, -1, keepdims=True) + eps)

    def rope(y):  # y [B, T, heads, D]
        c = np.concatenate([cos, cos], -1)[:, :, None, :]
        sn = np.concatenate([sin, sin], -1)[:, :, None, :]
        rotated = np.concatenate([-y[..., d // 2 :], y[..., : d // 2]], -1)
        return y * c + rotated * sn

    n1 = norm(x, ln1)
    q = rope((n1 @ wq).reshape(b, t, h, d))
    k = rope((n1 @ wk).reshape(b, t, kv, d))
    v = (n1 @ wv).reshape(b, t, kv, d)
    attn = np.zeros((b, t, h, d))
    for bi in range(b):
        start = min(max(int(index[bi]), 0), s - t)
        k_cache[bi, :, start : start + t] = k[bi].transpose(1, 0, 2)
        v_cache[bi, :, start : start + t] = v[bi].transpose(1, 0, 2)
        for ti in range(t):
            for hi in range(h):
                ki = hi // (h // kv)
                logits = k_cache[bi, ki] @ q[bi, ti, hi] / np.sqrt(d)
                logits = np.where(mask[bi, ti], logits, -np.inf)
                if np.isfinite(logits).any():
                    p = np.exp(logits - logits.max())
                    attn[bi, ti, hi] = (p / p.sum()) @ v_cache[bi, ki]
    x1 = x + attn.reshape(b, t, h * d) @ wo
    n2 = norm(x1, ln2)
    g = n2 @ wg
    out = x1 + (g / (1 + np.exp(-g)) * (n2 @ wu)) @ wd
    return out, k_cache, v_cache


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize(
    "b, t, h, kv, d, e, f, s",
    [
        (3, 1, 4, 2, 64, 96, 160, 40),  # decode step, grouped heads
        (2, 3, 6, 3, 16, 48, 80, 24),  # several new tokens, a head dim the kernel does not unroll
        (1, 1, 9, 3, 64, 576, 1536, 48),  # SmolLM2's layer shapes
        (2, 1, 2, 1, 8, 40, 70, 20),  # widths that are not multiples of 16 (ragged strips)
        (2, 20, 4, 2, 64, 96, 160, 48),  # a prefill: attention in blocks of query tokens
        (3, 100, 2, 1, 16, 48, 80, 128),  # 300 rows: blocks of rows (the MLP's too, the last
        # partial), norms in parallel chunks
    ],
)
def test_decoder_layer_matches_float64(b, t, h, kv, d, e, f, s, packed):
    rng = np.random.default_rng(b * 100 + t * 10 + d)
    normal = lambda *shape, scale=1.0: (rng.normal(size=shape) * scale).astype(np.float32)  # noqa: E731
    weights = [
        1 + normal(e, scale=0.1),
        normal(e, h * d, scale=e**-0.5),
        normal(e, kv * d, scale=e**-0.5),
        normal(e, kv * d, scale=e**-0.5),
        normal(h * d, e, scale=(h * d) ** -0.5),
        1 + normal(e, scale=0.1),
        normal(e, f, scale=e**-0.5),
        normal(e, f, scale=e**-0.5),
        normal(f, e, scale=f**-0.5),
    ]
    x = normal(b, t, e)
    index = np.array([5, s - t, 0][:b], np.int32) if b > 1 else np.array([s // 2], np.int32)
    index = np.minimum(index, s - t)
    positions = index[:, None] + np.arange(t)[None]
    freqs = positions[..., None] * (1e4 ** -(np.arange(0, d, 2) / d))[None, None]
    cos, sin = np.cos(freqs).astype(np.float32), np.sin(freqs).astype(np.float32)
    # each new token sees the slots before it and itself; row 0 also has a hidden (padding) slot
    slots = np.arange(s)[None, None, :]
    mask = slots <= positions[..., None]
    mask[0, :, 1] = False
    k_cache, v_cache = normal(b, kv, s, d), normal(b, kv, s, d)
    want = _layer_reference(x, cos, sin, mask, index, k_cache, v_cache, weights, 1e-5)

    args = [native.pack_strips(jnp.asarray(w)) if w.ndim == 2 else w for w in weights]
    step = jax.jit(
        lambda x, kc, vc: native.decoder_layer(
            x,
            cos,
            sin,
            mask,
            index,
            kc,
            vc,
            args if packed else weights,
            eps=1e-5,
            scale=d**-0.5,
            packed=packed,
        ),
        donate_argnums=(1, 2),
    )
    got = step(x, jnp.asarray(k_cache), jnp.asarray(v_cache))
    for g, w, name in zip(got, want, ("out", "k_cache", "v_cache")):
        np.testing.assert_allclose(np.asarray(g), w, rtol=1e-4, atol=2e-4, err_msg=name)


def test_decoding_runs_one_native_call_per_plain_llama_layer():
    from flax import nnx

    from jaxlab.models.decoder import Decoder, DecoderConfig
    from jaxlab.native.decoding import prepare_for_decoding

    def kernels(cfg):
        model = Decoder(dataclasses.replace(cfg, scan_layers=False), rngs=nnx.Rngs(0))
        assert "jaxlab_" not in str(  # the model itself knows no kernels
            jax.make_jaxpr(lambda c: model(jnp.zeros((2, 1), jnp.int32), cache=c))(
                model.init_cache(2, 16)
            )
        )
        model = prepare_for_decoding(model)  # the seam generation calls
        cache = model.init_cache(2, 16)
        ids = jnp.zeros((2, 1), jnp.int32)
        return str(jax.make_jaxpr(lambda c: model(ids, cache=c))(cache))

    llama = DecoderConfig(num_layers=3)
    assert kernels(llama).count("jaxlab_decoder_layer") == 3
    # biases (Qwen2) and q/k norms (Qwen3) keep the separate ops
    assert "jaxlab_decoder_layer" not in kernels(dataclasses.replace(llama, attention_bias=True))
    assert "jaxlab_decoder_layer" not in kernels(dataclasses.replace(llama, qk_norm=True))


@pytest.mark.parametrize(
    "m, k, n",
    [(1, 64, 48), (5, 70, 37), (17, 96, 160), (32, 576, 200), (3, 40, 7), (9, 33, 96)],
)
def test_strips_matmul_matches_float64(m, k, n):
    rng = np.random.default_rng(m * 1000 + n)
    x = rng.normal(size=(m, k)).astype(np.float32)
    w = rng.normal(size=(k, n)).astype(np.float32)
    packed = native.pack_strips(jnp.asarray(w))
    # the layout: strip j holds columns 48j .. 48j + width, row-major, one strip after another
    flat, offset = np.asarray(packed).reshape(-1), 0
    for c0 in range(0, n, native.STRIP):
        strip = w[:, c0 : c0 + native.STRIP]
        np.testing.assert_array_equal(flat[offset : offset + strip.size], strip.reshape(-1))
        offset += strip.size
    got = np.asarray(jax.jit(native.strips_matmul)(jnp.asarray(x), packed))
    want = x.astype(np.float64) @ w.astype(np.float64)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4 * np.sqrt(k))


def test_strips_min_rows_follows_the_vector_width(monkeypatch):
    lanes = native.vector_lanes()
    assert lanes in (1, 8, 16)
    assert native.strips_min_rows() == (17 if lanes == 16 else 1)
    monkeypatch.setattr(native, "STRIPS_MIN_ROWS", 5)
    assert native.strips_min_rows() == 5
    x = jnp.ones((4, 8))
    assert native.use_strips(x, 5) and not native.use_strips(x, 4)


def test_generation_reads_packed_weights_for_prefill_and_many_rows(monkeypatch):
    from flax import nnx

    from jaxlab.generation import decoding_model
    from jaxlab.models.decoder import Decoder, DecoderConfig, with_layer_layout

    cfg = DecoderConfig(
        vocab_size=100, hidden_size=64, intermediate_size=112, num_layers=2, num_heads=4,
        num_kv_heads=2, max_position_embeddings=64, tie_word_embeddings=True,
    )  # fmt: skip
    model = Decoder(cfg, rngs=nnx.Rngs(0))
    plain = with_layer_layout(model, scan_layers=False)  # the usual layout only
    dec = decoding_model(model)
    assert decoding_model(model) is dec  # built once
    np.testing.assert_array_equal(
        dec.layers[0].packed_weights.get_value()[0],
        native.pack_strips(plain.layers[0].self_attn.q_proj.kernel[...]),
    )

    def jaxpr(m, rows, tokens):
        cache, ids = m.init_cache(rows, 32), jnp.zeros((rows, tokens), jnp.int32)
        return str(jax.make_jaxpr(lambda c: m(ids, cache=c))(cache))

    packed = "('packed', True)"
    monkeypatch.setattr(native, "STRIPS_MIN_ROWS", 17)  # (AVX-512's; AVX2 reads strips from 1 row)
    assert jaxpr(dec, 32, 1).count(packed) == cfg.num_layers + 1  # many rows: layers and head
    few = jaxpr(dec, 8, 1)  # few rows: the native layer on the usual layout
    assert packed not in few and few.count("jaxlab_decoder_layer") == cfg.num_layers
    assert jaxpr(dec, 2, 20).count(packed) == cfg.num_layers + 1  # a prefill (all 40 rows)
    assert "jaxlab_decoder_layer" not in jaxpr(plain, 2, 20)  # without packing: XLA
    # the same logits either way, for a prefill and for a 20-row decode step after it
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 100, (20, 13)), jnp.int32)
    for m in (plain, dec):
        logits, cache = m(ids[:, :12], cache=m.init_cache(20, 16))
        step, _ = m(ids[:, 12:], cache=cache)
        if m is plain:
            want = (logits, step)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(want[0]), rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(np.asarray(step), np.asarray(want[1]), rtol=2e-5, atol=2e-5)
