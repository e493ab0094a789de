"""On a real accelerator: the compiled (not interpret-mode) Pallas block-sparse kernels, ring
attention through them, and generation, against their references.

Every test here is marked ``gpu``: conftest skips them unless JAX's default backend is a GPU (they
are collected everywhere, so they cannot silently disappear). The interpret-mode twins of the
kernel tests run on CPU in ``test_block_sparse_kernel.py`` and ``test_ring_attention.py``.

Float32 cases trace the kernels and references under ``jax.default_matmul_precision("highest")``:
Triton's dots then multiply in IEEE float32 (by default they use TF32, ~1e-3 relative), so the
float32 bounds are those of summation order, as in interpret mode. Bfloat16 cases run at the
default precision with bfloat16 bounds.
"""

import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlab.attention import layouts
from jaxlab.attention.sparse import VerticalSlashPattern, pattern_from_budgets
from pallas_kernels.block_sparse_attention import (
    block_sparse_attention_bwd,
    block_sparse_attention_bwd_reference,
    block_sparse_attention_fwd,
    block_sparse_attention_fwd_reference,
    merge_partial,
)

pytestmark = pytest.mark.gpu

# Shapes that lower through Triton (tests/test_block_sparse_kernel.py cross-lowers the same
# tiling for CUDA on CPU): blocks of 128 tokens, 64-wide key / query / bar tiles, head dim 64 or
# 128; 2048 tokens over a 2-way striped ring, so a step holds 1024 local queries and keys.
G = 128
TILE = 64
T = 2048
WORLD = 2

# Bounds, per dtype. float32 at IEEE precision: summation order (interpret mode on CPU at these
# shapes measured the errors written beside each bound; a GPU sums in another order, hence the
# margin). bfloat16: the kernels round probabilities (and dS) to bfloat16 before their matmuls.
BOUNDS = {
    # out, lse (absolute); gradients as max |error| / max |reference| per array
    "float32": dict(out=1e-5, lse=1e-5, grad=1e-5),  # measured 7.2e-7, 9.5e-7, 9.8e-7
    "bfloat16": dict(out=3e-2, lse=1e-4, grad=2e-2),  # measured 3.0e-3, 9.5e-7, 2.8e-3
}


def _precision(dtype):
    if dtype == "float32":
        return jax.default_matmul_precision("highest")
    return contextlib.nullcontext()


@functools.partial(jax.jit, static_argnames=("h", "kvh", "d", "dense", "dtype"))
def _setup(key, rank, src, *, h, kvh, d, dense, dtype):
    """q, k, v, dO of one ring step (rank's queries against src's keys) and its plan; one head
    of the pattern sees nothing, one only the main diagonal."""
    ks = jax.random.split(key, 5)
    tl = T // WORLD
    q = jax.random.normal(ks[0], (1, tl, h, d), dtype)
    k = jax.random.normal(ks[1], (1, tl, kvh, d), dtype)
    v = jax.random.normal(ks[2], (1, tl, kvh, d), dtype)
    do = jax.random.normal(ks[3], (1, tl, h, d), dtype)
    pat = None
    if not dense:
        pat = pattern_from_budgets(
            ks[4], 1, h, T, vertical_size=96, slash_size=8, sink_tokens=4, window=4, fill=0.0
        )
        pat = VerticalSlashPattern(
            pat.vertical_idx.at[0, 0].set(-1).at[0, 1].set(-1),
            pat.slash_idx.at[0, 0].set(-1).at[0, 1].set(jnp.where(jnp.arange(8) == 0, 0, -1)),
        )
    blocks = jnp.asarray(layouts.layout_blocks("striped", T // G, WORLD))
    plan = layouts.step_plan(
        pat,
        blocks[rank],
        blocks[src],
        num_blocks=T // G,
        block_size=G,
        batch_heads=(1, h),
        bar_block=TILE,
    )
    return q, k, v, do, plan


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def _check_kernels(q, k, v, do, plan, dtype, *, interpret):
    """The compiled kernels (``interpret=False``; interpret mode for measuring the bounds on CPU)
    against the jnp references on the same inputs: forward, merged forward, backward."""
    bound = BOUNDS[dtype]
    kw = dict(block_size=G, interpret=interpret)
    with _precision(dtype):
        fwd = jax.jit(functools.partial(block_sparse_attention_fwd, block_k=TILE, **kw))
        bwd = jax.jit(
            functools.partial(block_sparse_attention_bwd, block_q=TILE, block_k=TILE, **kw)
        )
        fwd_ref = jax.jit(functools.partial(block_sparse_attention_fwd_reference, block_size=G))
        bwd_ref = jax.jit(functools.partial(block_sparse_attention_bwd_reference, block_size=G))
        f32 = [x.astype(jnp.float32) for x in (q, k, v, do)]
        o, lse = fwd(q, k, v, plan)
        o_ref, lse_ref = fwd_ref(*f32[:3], plan)
        o_prev, lse_prev = o_ref * 0.5, lse_ref - 1.0
        o2, lse2 = fwd(q, k, v, plan, o_prev=o_prev, lse_prev=lse_prev)
        delta = jnp.einsum("bqhd,bqhd->bhq", o_ref, f32[3])
        grads = bwd(q, k, v, lse_ref, do, delta, plan)
        grads_ref = bwd_ref(*f32[:3], lse_ref, f32[3], delta, plan)
    errors = {}
    fin = np.isfinite(np.asarray(lse_ref))
    np.testing.assert_array_equal(np.isfinite(np.asarray(lse)), fin)  # empty rows: -inf, no NaN
    assert np.isfinite(np.asarray(o)).all()
    errors["out"] = float(np.abs(np.asarray(o) - np.asarray(o_ref)).max())
    errors["lse"] = float(np.abs(np.asarray(lse)[fin] - np.asarray(lse_ref)[fin]).max())
    tr = lambda x: jnp.swapaxes(x, 1, 2)  # noqa: E731  [B, H, T] <-> [B, T, H]
    m_o, m_lse = merge_partial(o_prev, tr(lse_prev), o_ref, tr(lse_ref))
    errors["out"] = max(errors["out"], float(np.abs(np.asarray(o2) - np.asarray(m_o)).max()))
    fin2 = np.isfinite(np.asarray(tr(m_lse)))
    errors["lse"] = max(
        errors["lse"],
        float(np.abs(np.asarray(lse2)[fin2] - np.asarray(tr(m_lse))[fin2]).max()),
    )
    errors["grad"] = max(_rel(a, b) for a, b in zip(grads, grads_ref, strict=True))
    for name, err in errors.items():
        assert err <= bound[name], (name, err, bound[name])
    return errors


KERNEL_CASES = [
    # (dtype, (query heads, kv heads), head dim, step, dense)
    ("float32", (4, 1), 64, "diagonal", False),
    ("float32", (4, 2), 64, "earlier chunk", False),
    ("float32", (4, 1), 64, "diagonal", True),
    ("bfloat16", (4, 1), 128, "diagonal", False),
    ("bfloat16", (4, 2), 128, "earlier chunk", False),
]


@pytest.mark.parametrize(
    "dtype,heads,d,step,dense",
    KERNEL_CASES,
    ids=[
        f"{c[0]}-{c[1][0]}q{c[1][1]}kv-d{c[2]}-{c[3]}{'-dense' if c[4] else ''}"
        for c in KERNEL_CASES
    ],
)
def test_compiled_kernels_match_reference(dtype, heads, d, step, dense):
    rank, src = (1, 1) if step == "diagonal" else (1, 0)
    h, kvh = heads
    q, k, v, do, plan = _setup(
        jax.random.key(0), rank, src, h=h, kvh=kvh, d=d, dense=dense, dtype=jnp.dtype(dtype)
    )
    if not dense:
        assert int(plan.bar_cnt.sum()) > 0  # the bar (gathered column) kernels have work
    _check_kernels(q, k, v, do, plan, dtype, interpret=False)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_ring_attention_through_compiled_kernels_matches_reference(dtype):
    """ring_attention's custom VJP with the compiled kernels (a ring of one GPU: the diagonal
    step only) against the jnp reference and its autodiff gradients."""
    from jax.sharding import Mesh

    from jaxlab.attention.ring import ring_attention
    from jaxlab.attention.sparse import sparse_attention_reference

    ks = jax.random.split(jax.random.key(1), 5)
    t, h, kvh, d = 1024, 4, 1, 64 if dtype == "float32" else 128
    q = jax.random.normal(ks[0], (1, t, h, d), dtype)
    k = jax.random.normal(ks[1], (1, t, kvh, d), dtype)
    v = jax.random.normal(ks[2], (1, t, kvh, d), dtype)
    w = jax.random.normal(ks[3], (1, t, h, d), jnp.float32)
    pat = pattern_from_budgets(
        ks[4], 1, h, t, vertical_size=96, slash_size=8, sink_tokens=4, window=4, fill=0.0
    )
    mesh = Mesh(np.array(jax.devices()[:1]), ("sp",))

    def loss(fn):
        def inner(q, k, v):
            out = fn(q, k, v)
            return jnp.sum(out.astype(jnp.float32) * w), out

        return jax.jit(jax.value_and_grad(inner, argnums=(0, 1, 2), has_aux=True))

    ring = lambda q, k, v: ring_attention(  # noqa: E731
        q, k, v, mesh=mesh, pattern=pat, block_size=G, implementation="pallas", interpret=False
    )
    ref = lambda q, k, v: sparse_attention_reference(  # noqa: E731
        *(x.astype(jnp.float32) for x in (q, k, v)), pat, block_size=G
    )[0]
    with _precision(dtype):
        (_, out), grads = loss(ring)(q, k, v)
        (_, out_r), grads_r = loss(ref)(q, k, v)
    bound = BOUNDS[dtype]
    assert np.abs(np.asarray(out, np.float32) - np.asarray(out_r)).max() <= bound["out"]
    for a, b in zip(grads, grads_r, strict=True):
        assert _rel(a, b) <= bound["grad"]


# -- generation -----------------------------------------------------------------------------------


def test_greedy_generation_on_gpu_equals_step_by_step_argmax():
    """generate_tokens and the Engine on the GPU: every token the argmax of a full forward pass
    over the tokens before it (no cache), at IEEE float32 matmuls."""
    from jaxlab.generation import Engine, generate_tokens
    from jaxlab.models import Decoder
    from jaxlab.testing import TINY_DECODER

    n = 8
    model = Decoder(TINY_DECODER, rngs=nnx.Rngs(0))
    assert jax.tree.leaves(nnx.state(model))[0].devices() == {jax.devices()[0]}
    ids = np.array([[0, 0, 3, 4, 5], [6, 7, 8, 9, 10]], np.int32)
    mask = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], np.int32)
    with jax.default_matmul_precision("highest"):
        tokens, logprobs, _, lengths, _ = generate_tokens(
            model, ids, mask, max_new_tokens=n, eos_ids=(), pad_id=0
        )
        assert list(lengths) == [n, n]
        for row in range(2):
            seq = list(ids[row][mask[row] == 1])
            for t in range(n):
                logits = np.asarray(model(jnp.asarray([seq])), np.float64)[0, -1]
                nxt = int(np.argmax(logits))
                assert tokens[row, t] == nxt, (row, t)
                lse = np.log(np.exp(logits - logits.max()).sum()) + logits.max()
                assert abs(logprobs[row, t] - (logits[nxt] - lse)) < 1e-4
                seq.append(nxt)
        engine = Engine(model, num_slots=2, max_len=64, eos_ids=(), pad_id=0)
        for row in range(2):
            engine.submit([int(x) for x in ids[row][mask[row] == 1]], n)
        done = {c.request_id: c for c in engine.run()}
    for row in range(2):
        assert done[row].tokens == tokens[row].tolist()


def test_smollm2_on_gpu_matches_transformers():
    """SmolLM2's logits and greedy generation on the GPU against transformers (PyTorch on the
    CPU), with the bounds and checks of tests/test_pretrained.py."""
    import warnings

    import torch
    from test_pretrained import (
        GEN_PROMPTS,
        LOGITS_RTOL,
        _check_greedy,
        _hf_teacher_forced,
        _rel_err,
    )
    from transformers import AutoModelForCausalLM

    from jaxlab.generation import generate_tokens
    from jaxlab.models import from_pretrained
    from jaxlab.models.registry import SMOLLM2_GGUF, package_path

    model, tokenizer = from_pretrained(SMOLLM2_GGUF)
    assert jax.tree.leaves(nnx.state(model))[0].devices() == {jax.devices()[0]}
    path = package_path(SMOLLM2_GGUF)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32
        ).eval()
    eos, pad, n = tokenizer.eos_token_ids, tokenizer.pad_token_id, 32
    prompts = [tokenizer.encode(p) for p in GEN_PROMPTS]
    batch = tokenizer(GEN_PROMPTS)
    with jax.default_matmul_precision("highest"):
        ours = np.asarray(
            model(jnp.asarray(batch.input_ids), attention_mask=jnp.asarray(batch.attention_mask))
        )
        toks, lps, _, lens, ended = generate_tokens(
            model, batch.input_ids, batch.attention_mask, max_new_tokens=n, eos_ids=eos, pad_id=pad
        )
    positions = np.maximum(np.cumsum(batch.attention_mask, -1) - 1, 0)
    with torch.no_grad():
        ref = hf(
            torch.tensor(batch.input_ids),
            attention_mask=torch.tensor(batch.attention_mask),
            position_ids=torch.tensor(positions),
        ).logits.numpy()
    real = batch.attention_mask.astype(bool)
    assert _rel_err(ours[real], ref[real]) < LOGITS_RTOL
    generated = [row[: int(k)] for row, k in zip(toks, lens)]
    hf_logits = _hf_teacher_forced(hf, prompts, generated)
    checked = _check_greedy(toks, lps, lens, ended, hf_logits, eos, n)
    assert checked >= len(GEN_PROMPTS) * n // 2
