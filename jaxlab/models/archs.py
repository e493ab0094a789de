"""The decoder architectures jaxlab supports, in one table.

``DecoderConfig(arch=...)`` validation, the HF ``config.json`` mapping (``model_type``) and the GGUF
loader (``general.architecture``) all read this registry; adding an architecture is one entry.
"""

from __future__ import annotations

import dataclasses

from jaxlab.registry import Registry

__all__ = ["Architecture", "DECODER_ARCHS", "gguf_architectures"]


@dataclasses.dataclass(frozen=True)
class Architecture:
    """How a decoder family differs from plain Llama, as far as loading goes.

    qkv_bias: q/k/v projections always have a bias (Qwen2); otherwise HF's ``attention_bias``
      says so.
    out_bias_follows_hf: HF's ``attention_bias`` also biases the output projection (Llama, Mistral,
      Qwen3).
    qk_norm: per-head RMSNorm on q and k before RoPE (Qwen3).
    sliding_window_by_default: HF's ``use_sliding_window`` defaults to true (Mistral).
    gguf: GGUF files name this architecture in ``general.architecture`` (llama.cpp stores Mistral
      models as ``llama``).
    """

    qkv_bias: bool = False
    out_bias_follows_hf: bool = False
    qk_norm: bool = False
    sliding_window_by_default: bool = False
    gguf: bool = True


DECODER_ARCHS: Registry[Architecture] = Registry("decoder architecture")
DECODER_ARCHS.register("llama", Architecture(out_bias_follows_hf=True))
DECODER_ARCHS.register(
    "mistral", Architecture(out_bias_follows_hf=True, sliding_window_by_default=True, gguf=False)
)
DECODER_ARCHS.register("qwen2", Architecture(qkv_bias=True))
DECODER_ARCHS.register("qwen3", Architecture(out_bias_follows_hf=True, qk_norm=True))


def gguf_architectures() -> list[str]:
    """The architectures the GGUF loader reads."""
    return [name for name, arch in DECODER_ARCHS.items() if arch.gguf]
