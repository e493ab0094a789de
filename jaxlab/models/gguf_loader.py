"""GGUF files into jaxlab decoders: metadata -> DecoderConfig, dequantised tensors -> parameters.

The ``gguf`` package parses the file and dequantises (F32, F16, BF16, Q8_0, Q4_0, Q4_1, K-quants);
the tokenizer and chat template come from the same file through transformers.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from jaxlab.config import ConfigError
from jaxlab.models.archs import gguf_architectures
from jaxlab.models.decoder import DecoderConfig
from jaxlab.models.loading import LoadError, build_model

__all__ = ["read_gguf_config", "load_gguf"]

_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")


@functools.cache
def _reader_class():
    """``gguf.GGUFReader`` parsing the metadata from a plain ndarray view of its memmap.

    The reader slices the file once per metadata value (twice per vocabulary entry); slicing an
    ``np.memmap`` runs Python-level ``__getitem__`` / ``__array_finalize__`` each time, which made
    opening SmolLM2's GGUF (~150k values) take seconds. A base-class view of the same buffer parses
    the same fields about three times as fast; tensor data still comes from the memmap.
    """
    import gguf

    class Reader(gguf.GGUFReader):
        def _get(self, offset, dtype, count=1, override_order=None):
            plain = self.__dict__.get("_plain")
            if plain is None:
                plain = self._plain = self.data.view(np.ndarray)
            count = int(count)
            end = offset + np.dtype(dtype).itemsize * count
            arr = plain[offset:end].view(dtype=dtype)[:count]
            order = self.byte_order if override_order is None else override_order
            return arr.view(arr.dtype.newbyteorder(order))

    return Reader


def _open(path: Path):
    if not path.is_file():
        raise LoadError(f"{path}: GGUF file does not exist")
    try:
        return _reader_class()(str(path))
    except Exception as e:  # truncated or corrupt files fail in many ways inside the parser
        raise LoadError(f"{path}: not a readable GGUF file (truncated or corrupt?): {e}") from None


def _field(reader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    if field is None:
        return default
    return field.contents()


def read_gguf_config(reader, path: Path) -> DecoderConfig:
    """DecoderConfig from GGUF metadata (layers, heads, KV heads, rope theta, norm eps, vocab, context)."""
    arch = _field(reader, "general.architecture")
    supported = gguf_architectures()
    if arch not in supported:
        raise LoadError(
            f"{path}: GGUF architecture {arch!r} is not supported; supported: {', '.join(supported)}"
        )

    def get(key, default=None, required=True):
        value = _field(reader, f"{arch}.{key}", default)
        if value is None and required:
            raise LoadError(f"{path}: GGUF metadata lacks {arch}.{key}")
        return value

    heads = int(get("attention.head_count"))
    width = int(get("embedding_length"))
    head_dim = _field(reader, f"{arch}.attention.key_length") or (width // heads)
    vocab = get("vocab_size", required=False)
    if vocab is None:
        tokens = reader.fields.get("tokenizer.ggml.tokens")
        if tokens is None:
            raise LoadError(f"{path}: GGUF metadata has neither {arch}.vocab_size nor a token list")
        vocab = len(tokens.data)
    names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in names:
        raise LoadError(
            f"{path}: scaled RoPE stored as rope_freqs (Llama-3.1 style) is not supported yet"
        )
    try:
        return DecoderConfig(
            arch=arch,
            vocab_size=int(vocab),
            hidden_size=width,
            intermediate_size=int(get("feed_forward_length")),
            num_layers=int(get("block_count")),
            num_heads=heads,
            num_kv_heads=int(get("attention.head_count_kv", heads)),
            head_dim=int(head_dim) if int(head_dim) != width // heads else None,
            rope_theta=float(get("rope.freq_base", 10000.0)),
            rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-6)),
            tie_word_embeddings="output.weight" not in names,
            attention_bias="blk.0.attn_q.bias" in names,
            attention_out_bias="blk.0.attn_output.bias" in names,
            qk_norm="blk.0.attn_q_norm.weight" in names,
            max_position_embeddings=int(get("context_length", 2048)),
        )
    except ConfigError as e:
        raise LoadError(f"{path}: unsupported GGUF config: {e}") from None


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undoes llama.cpp's Q/K row permutation (interleaved RoPE pairs -> HF's rotate-half halves)."""
    # llama.cpp stores reshape(n_head, 2, half, ...).swapaxes(1, 2); this is its inverse.
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tensors(reader, cfg: DecoderConfig, path: Path) -> Iterator[tuple[str, np.ndarray]]:
    import gguf

    for t in reader.tensors:
        try:
            w = np.asarray(gguf.dequantize(t.data, t.tensor_type), np.float32)
        except Exception as e:
            raise LoadError(
                f"{path}: cannot dequantise {t.name} ({t.tensor_type.name}): {e}"
            ) from None
        w = w.reshape(tuple(int(d) for d in reversed(t.shape)))  # GGUF lists dims innermost first
        if t.name == "token_embd.weight":
            yield "model.embed_tokens.weight", w
        elif t.name == "output_norm.weight":
            yield "model.norm.weight", w
        elif t.name == "output.weight":
            yield "lm_head.weight", w
        else:
            m = _BLOCK_RE.match(t.name)
            if not m or m.group(2) not in _NAMES:
                raise LoadError(f"{path}: unexpected GGUF tensor {t.name}")
            layer, kind, param = m.groups()
            if cfg.arch == "llama" and kind in ("attn_q", "attn_k"):
                w = _unpermute(w, cfg.num_heads if kind == "attn_q" else cfg.num_kv_heads)
            yield f"model.layers.{layer}.{_NAMES[kind]}.{param}", w


def load_gguf(
    path: str | Path,
    *,
    dtype=None,
    with_tokenizer: bool = True,
    mesh=None,
    rules=None,
    param_dtype=None,
):
    """``(model, tokenizer)`` from a GGUF file of a Llama / Qwen2 / Qwen3 decoder.

    The tokenizer is None when the file carries no tokenizer metadata. With ``mesh``, each
    parameter goes straight into its sharding by ``rules`` (:func:`~jaxlab.models.loading.
    build_model`); GGUF tensors are dequantised whole on the host first.
    """
    import jax.numpy as jnp

    from jaxlab.tokenization import Tokenizer

    path = Path(path)
    reader = _open(path)
    cfg = read_gguf_config(reader, path)
    model = build_model(
        "decoder",
        cfg,
        _tensors(reader, cfg, path),
        dtype=dtype or jnp.float32,
        source=str(path),
        mesh=mesh,
        rules=rules,
        param_dtype=param_dtype,
    )
    tokenizer = None
    if with_tokenizer and "tokenizer.ggml.model" in reader.fields:
        try:
            tokenizer = Tokenizer.from_gguf(path, reader=reader)
        except Exception as e:
            raise LoadError(f"{path}: cannot build the tokenizer from GGUF metadata: {e}") from None
    return model, tokenizer
