"""Native CPU kernels, compiled from ``cpu_kernels.cc`` and called through XLA's FFI.

``make demo`` / ``make test`` build the library (``python -m jaxlab.native``); on first
use a missing build is compiled once (a few seconds, needs ``g++``) into the package directory, or into
``jaxlab.paths.cache_dir()`` (``$JAXLAB_CACHE_DIR``, default ``~/.cache/jaxlab``) when that is
read-only. The file name carries a hash of the source, flags and CPU features, so an edited
kernel is never run from a stale build, nor a build from another CPU (a shared home directory or
checkout). Each build records, beside the library (``<name>.so.json``), the hash of its build key
and the SHA-256 of the library file; a library is loaded only when both match, and when the file
and its record belong to this user and no one else can write them. Any other file of that name
(copied in, truncated, replaced) is rebuilt, or, where it cannot be, not loaded. Without a compiler
jaxlab falls back to the XLA path with one warning; ``JAXLAB_NATIVE=0`` turns the kernels off.

Models know nothing of these kernels: generation reaches them through one seam,
:func:`jaxlab.native.decoding.prepare_for_decoding`, which returns a decoding copy of a model with
the CPU fast paths attached. The environment switches (``JAXLAB_NATIVE``,
``JAXLAB_NATIVE_LAYER``, ``JAXLAB_STRIPS``, ``JAXLAB_HUGE_PAGES``, ``JAXLAB_NATIVE_FLAGS``,
``CXX``) are documented in one place, ``docs/models.md`` ("Environment variables"); measured
speed-ups are in ``docs/benchmarks.md`` and ``docs/models.md`` ("Running on CPU").

:func:`cache_attention` is attention of new tokens over a ``bksd`` KV cache: XLA runs it as B·K
tiny batched matmuls, and a prefill over every slot of the cache, the empty ones too; the kernel
reads each head's slots once and skips the blocks of 16 (AVX-512) or 8 (AVX2) slots its tokens
cannot see, spread over XLA's intra-op threads.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import json
import logging
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxlab.native import reference
from jaxlab.paths import cache_dir

__all__ = [
    "available",
    "build",
    "cache_attention",
    "use_cache_attention",
    "rows_matmul",
    "pack_strips",
    "strips_matmul",
    "use_strips",
    "dot_general",
    "greedy_tokens",
    "use_greedy_tokens",
    "advise_huge_pages",
    "decoder_layer",
    "use_decoder_layer",
    "DECODER_LAYER_MAX_TOKENS",
    "ROWS_MATMUL_MAX_ROWS",
    "STRIPS_MIN_ROWS",
    "strips_min_rows",
    "vector_lanes",
]

log = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("cpu_kernels.cc")
# JAXLAB_NATIVE_FLAGS adds compiler flags: "-mno-avx512f" builds the AVX2 kernels on an AVX-512
# CPU, "-mno-avx512f -mno-avx2 -mno-fma" the plain loops (the tests run every build a CPU can)
_FLAGS = [
    "-O3",
    "-march=native",
    "-fopenmp-simd",
    "-fno-math-errno",
    "-std=c++17",
    *os.environ.get("JAXLAB_NATIVE_FLAGS", "").split(),
]
# without packed weights, more new tokens than this per row (prefill) run the decoder layer as
# separate ops
DECODER_LAYER_MAX_TOKENS = 8
# matmuls with more rows than this (prefill, training) stay on XLA (the crossover measured by
# scripts/bench_native.py; docs/models.md)
ROWS_MATMUL_MAX_ROWS = 32
# calls with at least this many rows read weights packed in column strips where they have them;
# None: the built kernels' own choice (:func:`strips_min_rows`)
STRIPS_MIN_ROWS: int | None = None


def _cpu_features() -> str:
    """The CPU's feature flags: a ``-march=native`` build runs only where they match."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return platform.processor() or platform.machine()


def _build_key() -> str:
    """SHA-256 of what a build depends on: source, flags and CPU."""
    key = _SOURCE.read_bytes() + " ".join(_FLAGS).encode() + _cpu_features().encode()
    return hashlib.sha256(key).hexdigest()


def _library_name() -> str:
    """Named by source, flags and CPU, so a stale build or one for another CPU (a shared home or
    checkout) is never loaded."""
    return f"_cpu_kernels-{_build_key()[:12]}.so"


def _record_of(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def _file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _record(path: Path) -> None:
    """Writes ``path``'s record: the build key and the library's SHA-256 (atomically)."""
    record = _record_of(path)
    tmp = record.with_name(f".{record.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"build_key": _build_key(), "sha256": _file_sha256(path)}))
    os.replace(tmp, record)


def _unverified(path: Path) -> str | None:
    """Why ``path`` must not be loaded, or None when its record vouches for it."""
    if not path.is_file():
        return "no such file"
    record = _record_of(path)
    try:
        recorded = json.loads(record.read_text())
        build_key, sha256 = recorded["build_key"], recorded["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"no readable record {record.name}"
    if build_key != _build_key():
        return "recorded for another source, flags or CPU"
    if os.name == "posix":
        for f in (path, record):
            st = f.stat()
            if st.st_uid != os.getuid() or st.st_mode & 0o022:
                return f"{f.name} belongs to another user or others can write it"
    if _file_sha256(path) != sha256:
        return "the file does not match its recorded SHA-256"
    return None


def _candidates() -> list[Path]:
    return [_SOURCE.parent / _library_name(), cache_dir() / _library_name()]


def build(force: bool = False) -> Path:
    """Compile the kernels (unless a verified build exists) and return the library's path."""
    if not force:
        for path in _candidates():
            reason = _unverified(path)
            if reason is None:
                return path
            if path.exists():
                log.warning("not loading %s (%s); rebuilding it", path, reason)
    compiler = os.environ.get("CXX", "g++")
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C++ compiler {compiler!r} on PATH to build {_SOURCE.name}")
    errors = []
    for path in _candidates():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
            os.close(fd)
        except OSError as e:
            errors.append(f"{path.parent}: {e}")
            continue
        cmd = [compiler, *_FLAGS, "-shared", "-fPIC", f"-I{jax.ffi.include_dir()}"]
        cmd += [str(_SOURCE), "-o", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            os.unlink(tmp)
            raise RuntimeError(f"building {_SOURCE.name} failed:\n{proc.stderr[-4000:]}")
        os.replace(tmp, path)  # atomic: concurrent builds never load a half-written file
        _record(path)
        return path
    raise RuntimeError("no writable directory for the kernels: " + "; ".join(errors))


_TARGETS = {
    "jaxlab_cache_attention": "CacheAttention",
    "jaxlab_rows_matmul": "RowsMatmul",
    "jaxlab_greedy_tokens": "GreedyTokens",
    "jaxlab_decoder_layer": "DecoderLayer",
}


@functools.cache
def _library() -> ctypes.CDLL | None:
    """The loaded kernels with their FFI targets registered, or None (and one warning)."""
    if os.environ.get("JAXLAB_NATIVE", "1") == "0":
        return None
    try:
        path = build()
        reason = _unverified(path)
        if reason is not None:  # e.g. replaced between the build and this load
            raise RuntimeError(f"{path}: {reason}")
        lib = ctypes.cdll.LoadLibrary(str(path))
        for target, symbol in _TARGETS.items():
            jax.ffi.register_ffi_target(
                target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu"
            )
    except (OSError, RuntimeError, AttributeError) as e:
        log.warning("jaxlab native CPU kernels unavailable, using XLA instead: %s", e)
        return None
    return lib


def available() -> bool:
    """Whether the native kernels are loaded (building them on first call if needed)."""
    return _library() is not None


def vector_lanes() -> int:
    """float32 lanes of the vectors the built kernels use: 16 (AVX-512), 8 (AVX2 + FMA), 1
    (plain loops); 0 without kernels."""
    lib = _library()
    return 0 if lib is None else int(lib.jaxlab_vector_lanes())


def strips_min_rows() -> int:
    """The fewest rows of a call that reads weights packed in column strips where it has them
    (:data:`STRIPS_MIN_ROWS` when set).

    With AVX-512, 17: below that the few-row matmul is bound by memory and the depth-split kernel
    on the usual layout is as fast. With AVX2, 1: the strips' contiguous streams read faster at
    every row count (measurements in ``docs/models.md``, "Running on CPU").
    """
    if STRIPS_MIN_ROWS is not None:
        return STRIPS_MIN_ROWS
    return 17 if vector_lanes() >= 16 else 1


def _require():
    if not available():
        raise RuntimeError("jaxlab's native CPU kernels are not available (see the log)")


def _on_cpu_float32(*xs) -> bool:
    return jax.default_backend() == "cpu" and all(x.dtype == jnp.float32 for x in xs)


# -- attention over a KV cache ---------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _cache_attention(q, k, v, mask, scale):
    call = jax.ffi.ffi_call(
        "jaxlab_cache_attention", jax.ShapeDtypeStruct(q.shape, q.dtype), vmap_method="sequential"
    )
    return call(q, k, v, mask, scale=np.float32(scale))


def _attention_fwd(q, k, v, mask, scale):
    return _cache_attention(q, k, v, mask, scale), (q, k, v, mask)


def _attention_bwd(scale, res, g):  # differentiate the jnp formulation (the kernel is forward-only)
    q, k, v, mask = res
    _, vjp = jax.vjp(lambda q, k, v: reference.cache_attention(q, k, v, mask, scale), q, k, v)
    return (*vjp(g), None)


_cache_attention.defvjp(_attention_fwd, _attention_bwd)


def cache_attention(q, k, v, mask, *, scale: float) -> jax.Array:
    """Attention of q ``[B, T, H, D]`` over k, v ``[B, K, S, D]`` with mask ``[B, T, S]`` (float32).

    A row whose mask is all False gives zeros.
    """
    _require()
    if mask is None:
        mask = jnp.ones((q.shape[0], q.shape[1], k.shape[2]), bool)
    return _cache_attention(q, k, v, mask.astype(bool), scale)


def use_cache_attention(q, k, v) -> bool:
    """The default choice over a cache: float32 on CPU, kernels built. Also for a prefill into
    the cache: it skips the cache's empty slots and each token block's future."""
    return _on_cpu_float32(q, k, v) and available()


# -- few-row matmuls -------------------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _rows_matmul(x, w, transposed):
    n = w.shape[0] if transposed else w.shape[1]
    call = jax.ffi.ffi_call(
        "jaxlab_rows_matmul",
        jax.ShapeDtypeStruct((x.shape[0], n), x.dtype),
        vmap_method="sequential",
    )
    return call(x, w, transposed=transposed, packed=False)


def _matmul_fwd(x, w, transposed):
    return _rows_matmul(x, w, transposed), (x, w)


def _matmul_bwd(transposed, res, g):
    _, vjp = jax.vjp(lambda x, w: reference.matmul(x, w, transposed), *res)
    return vjp(g)


_rows_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def rows_matmul(x, w, *, transposed: bool = False) -> jax.Array:
    """``x [M, K] @ w [K, N]``, or ``x @ w.T`` for ``w [N, K]`` with ``transposed`` (float32)."""
    _require()
    if x.ndim != 2 or w.ndim != 2 or x.shape[1] != w.shape[1 if transposed else 0]:
        raise ValueError(f"rows_matmul: x {x.shape} and w {w.shape} (transposed={transposed})")
    return _rows_matmul(x, w, transposed)


STRIP = 48  # columns per strip of a packed weight (cpu_kernels.cc: kStrip)


def pack_strips(w: jax.Array) -> jax.Array:
    """``w [K, N]`` in column strips, the layout :func:`strips_matmul` reads.

    The result has ``w``'s shape but not its element order: ``ceil(N / STRIP)`` strips of
    ``[K, width <= STRIP]`` one after the other (strip ``j`` holds columns ``STRIP·j`` on). Only
    the native kernels read it.
    """
    if w.ndim != 2:
        raise ValueError(f"pack_strips: w must be [K, N], got {w.shape}")
    k, n = w.shape
    full = n // STRIP * STRIP
    main = w[:, :full].reshape(k, n // STRIP, STRIP).transpose(1, 0, 2).reshape(-1)
    return jnp.concatenate([main, w[:, full:].reshape(-1)]).reshape(k, n)


def strips_matmul(x, w_packed) -> jax.Array:
    """``x [M, K] @ w [K, N]`` (float32, forward only) from ``w_packed = pack_strips(w)``.

    Each work item streams whole strips (contiguous memory) through register tiles that span the
    full depth: for more than a few rows, where the matmul is compute-bound, this is faster than
    :func:`rows_matmul` on a weight in its usual layout (``docs/models.md``).
    """
    _require()
    if x.ndim != 2 or w_packed.ndim != 2 or x.shape[1] != w_packed.shape[0]:
        raise ValueError(f"strips_matmul: x {x.shape} and w {w_packed.shape}")
    call = jax.ffi.ffi_call(
        "jaxlab_rows_matmul",
        jax.ShapeDtypeStruct((x.shape[0], w_packed.shape[1]), x.dtype),
        vmap_method="sequential",
    )
    return call(jax.lax.stop_gradient(x), w_packed, transposed=False, packed=True)


def use_strips(x, rows: int) -> bool:
    """Whether a call of ``rows`` rows reads packed weights (:func:`strips_matmul`) where it has
    them: at least :func:`strips_min_rows` rows (a many-row decode step, a prefill), float32 on
    CPU, kernels built (``JAXLAB_STRIPS=0`` keeps the usual layout)."""
    return (
        os.environ.get("JAXLAB_STRIPS", "1") != "0"
        and _on_cpu_float32(x)
        and available()
        and rows >= strips_min_rows()
    )


def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, **kw):
    """``jax.lax.dot_general`` that sends decoding's few-row float32 matmuls to :func:`rows_matmul`.

    Used by jaxlab's linear layers and tied LM heads. It takes ``lhs [..., K]`` against a 2-D
    weight (``[K, N]``, or ``[N, K]`` contracted on its last axis) when there are at most
    ``ROWS_MATMUL_MAX_ROWS`` rows, on CPU, in float32; everything else goes to XLA unchanged.
    """
    (lc, rc), (lb, rb) = dimension_numbers
    rows = math.prod(lhs.shape[:-1])
    if (
        not lb
        and not rb
        and tuple(lc) == (lhs.ndim - 1,)
        and rhs.ndim == 2
        and tuple(rc) in ((0,), (1,))
        and 1 <= rows <= ROWS_MATMUL_MAX_ROWS
        and preferred_element_type in (None, jnp.float32)
        and _on_cpu_float32(lhs, rhs)
        and available()
    ):
        out = _rows_matmul(lhs.reshape(rows, lhs.shape[-1]), rhs, tuple(rc) == (1,))
        return out.reshape(*lhs.shape[:-1], out.shape[-1])
    return jax.lax.dot_general(
        lhs,
        rhs,
        dimension_numbers,
        precision=precision,
        preferred_element_type=preferred_element_type,
        **kw,
    )


# -- greedy sampling -------------------------------------------------------------------------------


def greedy_tokens(logits) -> tuple[jax.Array, jax.Array]:
    """``(argmax(logits), log_softmax(logits)[argmax])`` per row of float32 ``logits [B, V]``.

    The first index of the largest value, as ``jnp.argmax`` (the first NaN if a row has one).
    Forward only: the tokens are integers and generation does not differentiate the logprob.
    """
    _require()
    if logits.ndim != 2 or logits.shape[1] == 0:
        raise ValueError(f"greedy_tokens: logits must be [B, V], got {logits.shape}")
    b = logits.shape[0]
    call = jax.ffi.ffi_call(
        "jaxlab_greedy_tokens",
        (jax.ShapeDtypeStruct((b,), jnp.int32), jax.ShapeDtypeStruct((b,), jnp.float32)),
        vmap_method="sequential",
    )
    tokens, logprobs = call(jax.lax.stop_gradient(logits))
    return tokens, logprobs


def use_greedy_tokens(logits) -> bool:
    """The default choice for greedy decoding: float32 logits ``[B, V]`` on CPU, kernels built."""
    return logits.ndim == 2 and logits.shape[1] > 0 and _on_cpu_float32(logits) and available()


# -- huge pages for the memory decoding streams -----------------------------------------------------

_HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE, _MADV_COLLAPSE = 14, 25  # linux/mman.h; MADV_COLLAPSE needs Linux >= 6.1


@functools.cache
def _madvise():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    libc.madvise.restype = ctypes.c_int
    return libc.madvise


def advise_huge_pages(arrays, *, min_bytes: int = 256 << 10) -> int:
    """Backs the host memory of CPU ``arrays`` with 2 MiB pages; returns the bytes advised.

    A decode step streams every weight and the KV cache once; on 4 KiB pages that is a TLB miss
    and a restart of the hardware prefetcher every 4 KiB (measured in ``docs/models.md``).
    The 2 MiB-aligned ranges covering the arrays are marked ``MADV_HUGEPAGE`` and collapsed now
    (``MADV_COLLAPSE``). Neither changes the memory's contents, so it is safe for whatever else
    shares those ranges. Best effort: a no-op off Linux, off CPU, for arrays under ``min_bytes``,
    with ``JAXLAB_HUGE_PAGES=0``, and where the kernel refuses.
    """
    if not sys.platform.startswith("linux") or os.environ.get("JAXLAB_HUGE_PAGES", "1") == "0":
        return 0
    ranges = []
    for a in arrays:
        if not isinstance(a, jax.Array) or a.nbytes < min_bytes:
            continue
        try:
            if any(d.platform != "cpu" for d in a.devices()) or a.is_deleted():
                continue
            for shard in a.addressable_shards:
                start = shard.data.unsafe_buffer_pointer()
                end = start + shard.data.nbytes
                ranges.append(
                    (start // _HUGE_PAGE * _HUGE_PAGE, -(-end // _HUGE_PAGE) * _HUGE_PAGE)
                )
        except Exception:  # noqa: BLE001 - an array without a host buffer is simply skipped
            continue
    merged: list[list[int]] = []
    for lo, hi in sorted(ranges):
        if merged and lo <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], hi)
        else:
            merged.append([lo, hi])
    madvise, advised = _madvise(), 0
    for lo, hi in _clip_to_mappings(merged):  # rounding out may reach past a mapping's end
        if madvise(lo, hi - lo, _MADV_HUGEPAGE) == 0:
            madvise(lo, hi - lo, _MADV_COLLAPSE)  # else khugepaged collapses them later
            advised += hi - lo
    return advised


def _clip_to_mappings(ranges: list[list[int]]) -> list[tuple[int, int]]:
    """The parts of ``ranges`` (sorted) inside this process's memory mappings."""
    try:
        with open("/proc/self/maps") as f:
            maps = sorted(
                tuple(int(x, 16) for x in line.split(None, 1)[0].split("-")) for line in f
            )
    except OSError:
        return []
    out, i = [], 0
    for lo, hi in ranges:
        while i < len(maps) and maps[i][1] <= lo:
            i += 1
        j = i
        while j < len(maps) and maps[j][0] < hi:
            a, b = max(lo, maps[j][0]), min(hi, maps[j][1])
            if a < b:
                out.append((a, b))
            j += 1
    return out


# -- a whole decoder layer of a decode step --------------------------------------------------------


def decoder_layer(
    x, cos, sin, mask, index, k_cache, v_cache, weights, *, eps: float, scale: float, packed=False
):
    """One Llama-family decoder layer over a KV cache in one call: a decode step's few new
    tokens, or with ``packed`` weights any number (a prefill).

    ``h = x + o(attn(rope(q(n1(x))), cache)); out = h + down(silu(gate(n2(h))) · up(n2(h)))``,
    where ``n1``, ``n2`` are RMSNorms and the new keys and values (after RoPE) are first written
    into the cache at each row's ``index`` (as ``dynamic_update_slice`` does).

    Args:
      x: ``[B, T, E]`` float32; ``cos``, ``sin``: ``[B, T, D/2]`` of each token's position.
      mask: ``[B, T, S]`` bool, the cache slots each new token sees (its own slot included).
      index: ``[B]`` int32, the first slot the row's new tokens are written to.
      k_cache, v_cache: ``[B, K, S, D]`` float32, updated in place (donate them in a jit).
      weights: ``(ln1 [E], wq [E, H·D], wk [E, K·D], wv [E, K·D], wo [H·D, E], ln2 [E],
        w_gate [E, F], w_up [E, F], w_down [F, E])``.
      packed: the seven matrices are :func:`pack_strips` of those (read as column strips;
        faster from :func:`strips_min_rows` rows on).

    Returns ``(out [B, T, E], k_cache, v_cache)``. Forward only (decoding).
    """
    _require()
    call = jax.ffi.ffi_call(
        "jaxlab_decoder_layer",
        (
            jax.ShapeDtypeStruct(x.shape, jnp.float32),
            jax.ShapeDtypeStruct(k_cache.shape, jnp.float32),
            jax.ShapeDtypeStruct(v_cache.shape, jnp.float32),
        ),
        input_output_aliases={5: 1, 6: 2},
        vmap_method="sequential",
    )
    return call(
        x,
        cos,
        sin,
        mask.astype(bool),
        index.astype(jnp.int32),
        k_cache,
        v_cache,
        *weights,
        eps=np.float32(eps),
        scale=np.float32(scale),
        packed=bool(packed),
    )


def use_decoder_layer(x, k_cache, packed: bool = False) -> bool:
    """The default choice over a KV cache, float32 on CPU, kernels built: a decode step of few
    rows and new tokens, or with ``packed`` weights (:func:`use_strips`) any number of them,
    prefills included (``JAXLAB_NATIVE_LAYER=0`` keeps the layer as separate ops)."""
    b, t = x.shape[0], x.shape[1]
    few = t <= DECODER_LAYER_MAX_TOKENS and b * t <= ROWS_MATMUL_MAX_ROWS
    return (
        os.environ.get("JAXLAB_NATIVE_LAYER", "1") != "0"
        and _on_cpu_float32(x, k_cache)
        and (few or (packed and use_strips(x, b * t)))
        and available()
    )
