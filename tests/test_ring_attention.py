"""Ring attention over 8 virtual CPU devices (4 for the Pallas kernels) against the single-device reference."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from jaxlab.attention.ring import ring_attention
from jaxlab.attention.sparse import (
    VerticalSlashPattern,
    pattern_from_budgets,
    sparse_attention_reference,
)

G = 16
T = 256


def _mesh(layout, n=8):
    devs = np.array(jax.devices()[:n])
    if layout == "hierarchical":
        return Mesh(devs.reshape(2, n // 2), ("node", "local")), ("node", "local")
    return Mesh(devs, ("sp",)), "sp"


@functools.cache
def _inputs(seed, heads, dtype=jnp.float32, t=T):
    """q, k, v, the loss weights and a pattern; cached: the tests share them (read-only arrays)."""
    return _make_inputs(jax.random.key(seed), heads, dtype, t)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _make_inputs(key, heads, dtype, t):
    h, kvh = heads
    ks = jax.random.split(key, 5)
    q = jax.random.normal(ks[0], (1, t, h, 16), dtype)
    k = jax.random.normal(ks[1], (1, t, kvh, 16), dtype)
    v = jax.random.normal(ks[2], (1, t, kvh, 16), dtype)
    w = jax.random.normal(ks[3], (1, t, h, 16), jnp.float32)
    pat = pattern_from_budgets(
        ks[4], 1, h, t, vertical_size=20, slash_size=4, sink_tokens=3, window=2, fill=0.0
    )
    # head 0 sees nothing but its verticals, head 1 only the main block diagonal
    pat = VerticalSlashPattern(
        pat.vertical_idx.at[0, 1].set(-1),
        pat.slash_idx.at[0, 0].set(-1).at[0, 1].set(jnp.where(jnp.arange(4) == 0, 0, -1)),
    )
    return q, k, v, w, pat


def _loss_and_grads(fn, q, k, v, w):
    """``(out, lse)`` and the gradients of a loss of both, from one compiled function.

    (out, lse) are the primal outputs of the differentiated call: ring attention's custom_vjp
    forward rule runs the same ``_fwd`` as a plain call, which a second, forward-only compile
    would only repeat.
    """

    def loss(q, k, v):
        out, lse = fn(q, k, v)
        val = jnp.sum(out.astype(jnp.float32) * w) + 0.1 * jnp.sum(
            jnp.where(jnp.isfinite(lse), lse, 0.0)
        )
        return val, (out, lse)

    (_, outs), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return outs, grads


@functools.cache
def _reference(heads, sparse, dtype):
    """``_check``'s single-device reference; it depends on neither the layout, the implementation
    nor the number of devices, so each (heads, sparse, dtype) is computed once and shared."""
    q, k, v, w, pat = _inputs(0, heads, dtype)
    pat = pat if sparse else None
    ref = lambda q, k, v: sparse_attention_reference(  # noqa: E731
        *(x.astype(jnp.float32) for x in (q, k, v)), pat, block_size=G
    )
    return jax.device_get(_loss_and_grads(ref, q, k, v, w))


def _check(layout, heads, sparse, implementation, dtype=jnp.float32, vertical_mode="ring", world=8):
    q, k, v, w, pat = _inputs(0, heads, dtype)
    pat = pat if sparse else None
    # float32: summation order only (measured ~6e-7); bfloat16 inputs and outputs: about 2 ulp
    # of bfloat16 (measured 6.4e-3 on out, 5.6e-3 on the normalized gradients)
    out_atol, grad_atol = (2e-5, 1e-5) if dtype == jnp.float32 else (1.5e-2, 1.5e-2)
    mesh, axis = _mesh(layout, world)
    ring = lambda q, k, v: ring_attention(  # noqa: E731
        q,
        k,
        v,
        mesh=mesh,
        axis_name=axis,
        layout=layout,
        pattern=pat,
        block_size=G,
        implementation=implementation,
        vertical_mode=vertical_mode,
        return_lse=True,
        bar_block=8,
    )
    (out, lse), grads = _loss_and_grads(ring, q, k, v, w)
    (out_r, lse_r), grads_r = _reference(heads, sparse, dtype)
    np.testing.assert_allclose(
        np.asarray(out, np.float32),
        np.asarray(out_r),
        atol=out_atol,
    )
    fin = np.isfinite(np.asarray(lse_r))
    np.testing.assert_array_equal(np.isfinite(np.asarray(lse)), fin)
    np.testing.assert_allclose(np.asarray(lse)[fin], np.asarray(lse_r)[fin], atol=out_atol)
    for name, a, b in zip("qkv", grads, grads_r, strict=True):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        scale = np.abs(b).max()
        np.testing.assert_allclose(
            a / scale,
            b / scale,
            atol=grad_atol,
            err_msg=f"d{name}",
        )


# Every layout with both head layouts and with both dense and sparse patterns, and every
# (heads, sparse) pair: a pairwise-covering half of the 4 x 2 x 2 grid (each case compiles a ring).
_XLA_CASES = [
    (layout, heads, sparse)
    for i, layout in enumerate(["contiguous", "zigzag", "striped", "hierarchical"])
    for heads, sparse in ([((4, 1), False), ((4, 4), True)], [((4, 1), True), ((4, 4), False)])[
        i % 2
    ]
]


@pytest.mark.parametrize(
    "layout,heads,sparse",
    _XLA_CASES,
    ids=[f"{lay}-{h[0]}q{h[1]}kv-{'sparse' if sp else 'dense'}" for lay, h, sp in _XLA_CASES],
)
def test_ring_xla_matches_reference(layout, heads, sparse):
    _check(layout, heads, sparse, "xla")


# The Pallas cases ring over 4 devices: each ring step compiles its own interpret-mode kernels (3
# for the backward), which is nearly all of their time. 4 steps still hold the diagonal chunk,
# earlier chunks and later (causally masked) ones; with T = 256 every device holds 4 blocks (2 per
# zigzag half), and hierarchical is 2 × 2 (outer and inner shifts, dK/dV travel home on both).
# The XLA tests run these layouts over 8 devices; only the per-step kernel differs from them.
PALLAS_WORLD = 4


@pytest.mark.parametrize("layout", ["striped", "hierarchical"])
def test_ring_pallas_matches_reference(layout):
    _check(layout, (4, 1), True, "pallas", world=PALLAS_WORLD)


def test_ring_pallas_dense_zigzag():
    _check("zigzag", (4, 4), False, "pallas", world=PALLAS_WORLD)


@pytest.mark.parametrize("implementation", ["xla", "pallas"])
def test_gathered_verticals_match_reference(implementation):
    world = PALLAS_WORLD if implementation == "pallas" else 8
    _check("striped", (4, 1), True, implementation, vertical_mode="gathered", world=world)


def test_ring_bfloat16_close_to_float32_reference():
    _check("striped", (4, 1), True, "xla", dtype=jnp.bfloat16)


def test_ring_errors():
    q, k, v, _, pat = _inputs(1, (4, 1), t=T)
    mesh, axis = _mesh("striped")
    with pytest.raises(ValueError, match="multiple of"):
        ring_attention(q[:, :200], k[:, :200], v[:, :200], mesh=mesh, axis_name=axis, block_size=G)
    with pytest.raises(ValueError, match="causal"):
        ring_attention(q, k, v, mesh=mesh, axis_name=axis, pattern=pat, causal=False, block_size=G)
    with pytest.raises(ValueError, match="hierarchical"):
        ring_attention(q, k, v, mesh=mesh, axis_name=axis, layout="hierarchical", block_size=G)
    with pytest.raises(ValueError, match="implementation"):
        ring_attention(q, k, v, mesh=mesh, axis_name=axis, implementation="cuda", block_size=G)


def test_collective_permute_counts():
    """Flat ring: W−1 shifts of (k, v) forward; backward adds W−1 of (k, v) and W of (dk, dv)."""
    q, k, v, _, _ = _inputs(2, (4, 1))
    mesh, axis = _mesh("striped")
    fn = lambda q, k, v: ring_attention(
        q,
        k,
        v,
        mesh=mesh,
        axis_name=axis,
        block_size=G,  # noqa: E731
        implementation="xla",
    )
    fwd_hlo = jax.jit(fn).lower(q, k, v).compile().as_text()
    # one lowering of the gradient, read as traced and compiled below
    grad_lowered = jax.jit(jax.grad(lambda q, k, v: fn(q, k, v).sum(), argnums=(0, 1, 2))).lower(
        q, k, v
    )
    grad_hlo = grad_lowered.compile().as_text()

    def count(txt):
        return sum(
            1
            for line in txt.splitlines()
            if " collective-permute(" in line or " collective-permute-start(" in line
        )

    w = 8
    assert count(fwd_hlo) == 2 * (w - 1)
    # as traced: forward 2(W−1); backward shifts (k, v) W−1 times again and (dk, dv) W times
    assert grad_lowered.as_text().count("collective_permute") == 2 * (w - 1) * 2 + 2 * w
    # compiled: XLA shares the backward's (k, v) shifts with the forward's identical ones
    assert count(grad_hlo) == 2 * (w - 1) + 2 * w
    assert "all-gather" not in fwd_hlo
    # hierarchical 2 × 4: inner shifts 3 per outer step (×2), outer shift once, of (k, v)
    mesh_h, axis_h = _mesh("hierarchical")
    hlo_h = (
        jax.jit(
            lambda q, k, v: ring_attention(
                q,
                k,
                v,
                mesh=mesh_h,
                axis_name=axis_h,
                layout="hierarchical",
                block_size=G,
                implementation="xla",
            )
        )
        .lower(q, k, v)
        .compile()
        .as_text()
    )
    assert count(hlo_h) == 2 * (2 * 3 + 1)
