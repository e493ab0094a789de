"""Native CPU kernels, compiled from ``cpu_kernels.cc`` and called through XLA's FFI.

``make demo`` / ``make test`` build the library (``python -m jaxlab.attention.native``); on first
use a missing build is compiled once (~3 s, needs ``g++``) into the package directory, or into
``$JAXLAB_CACHE`` / ``~/.cache/jaxlab`` when that is read-only. The file name carries a hash of
the source and flags, so an edited kernel is never run from a stale build. Without a compiler
jaxlab falls back to the XLA path with one warning; ``JAXLAB_NATIVE=0`` turns the kernels off.

:func:`cache_attention` is attention of a few new tokens over a ``bksd`` KV cache: XLA runs it
as B·K tiny batched matmuls (~60 ms per SmolLM2 decode step at batch 32); the kernel reads
each head's slots once and skips hidden ones, spread over XLA's intra-op threads.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["available", "build", "cache_attention", "CACHE_ATTENTION_MAX_TOKENS"]

log = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("cpu_kernels.cc")
_FLAGS = ["-O3", "-march=native", "-fopenmp-simd", "-fno-math-errno", "-std=c++17"]
_TARGET = "jaxlab_cache_attention"
# more new tokens than this per row (prefill into the cache) stay on XLA's batched matmuls
CACHE_ATTENTION_MAX_TOKENS = 8


def _library_name() -> str:
    digest = hashlib.sha256(_SOURCE.read_bytes() + " ".join(_FLAGS).encode()).hexdigest()[:12]
    return f"_cpu_kernels-{digest}.so"


def _candidates() -> list[Path]:
    cache = Path(os.environ.get("JAXLAB_CACHE", Path.home() / ".cache" / "jaxlab"))
    return [_SOURCE.parent / _library_name(), cache / _library_name()]


def build(force: bool = False) -> Path:
    """Compile the kernels (if not already built) and return the library's path."""
    if not force:
        for path in _candidates():
            if path.exists():
                return path
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
        for old in path.parent.glob("_cpu_kernels-*.so"):
            if old != path:
                old.unlink(missing_ok=True)
        return path
    raise RuntimeError("no writable directory for the kernels: " + "; ".join(errors))


@functools.cache
def available() -> bool:
    """Whether the native kernels are loaded (building them on first call if needed)."""
    if os.environ.get("JAXLAB_NATIVE", "1") == "0":
        return False
    try:
        lib = ctypes.cdll.LoadLibrary(str(build()))
        jax.ffi.register_ffi_target(
            _TARGET, jax.ffi.pycapsule(lib.CacheAttention), platform="cpu"
        )
    except (OSError, RuntimeError) as e:
        log.warning("jaxlab native CPU kernels unavailable, using XLA instead: %s", e)
        return False
    return True


def _reference(q, k, v, mask, scale):
    from jaxlab.attention.dense import grouped_attention

    return grouped_attention(q, k, v, mask, scale=scale, kv_layout="bksd", native=False)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _cache_attention(q, k, v, mask, scale):
    call = jax.ffi.ffi_call(
        _TARGET, jax.ShapeDtypeStruct(q.shape, q.dtype), vmap_method="sequential"
    )
    return call(q, k, v, mask, scale=np.float32(scale))


def _fwd(q, k, v, mask, scale):
    return _cache_attention(q, k, v, mask, scale), (q, k, v, mask)


def _bwd(scale, res, g):  # differentiate the XLA formulation (the kernel is forward-only)
    q, k, v, mask = res
    _, vjp = jax.vjp(lambda q, k, v: _reference(q, k, v, mask, scale), q, k, v)
    return (*vjp(g), None)


_cache_attention.defvjp(_fwd, _bwd)


def cache_attention(q, k, v, mask, *, scale: float) -> jax.Array:
    """Attention of q ``[B, T, H, D]`` over k, v ``[B, K, S, D]`` with mask ``[B, T, S]`` (float32).

    A row whose mask is all False gives zeros.
    """
    if not available():
        raise RuntimeError("jaxlab's native CPU kernels are not available (see the log)")
    if mask is None:
        mask = jnp.ones((q.shape[0], q.shape[1], k.shape[2]), bool)
    return _cache_attention(q, k, v, mask.astype(bool), scale)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    try:
        print(f"built {build(force='--force' in sys.argv)}")
    except RuntimeError as e:  # the XLA path still works; say so and do not fail the install
        print(f"native kernels not built ({e}); jaxlab will use XLA for them", file=sys.stderr)
