"""Writes small decoders as GGUF files the way llama.cpp's converter does (for loader tests)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["write_decoder_gguf", "permute_for_gguf"]

_TO_GGUF = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def permute_for_gguf(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's Q/K row permutation (HF rotate-half halves -> interleaved pairs)."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def write_decoder_gguf(
    path: str | Path,
    state_dict: dict[str, np.ndarray],
    hf_config: dict,
    *,
    quant: str = "F32",
) -> Path:
    """Writes an HF Llama / Qwen2 / Qwen3 state dict (numpy, HF names) as a GGUF file.

    Two-dimensional weights are stored as ``quant`` (F32, F16, Q8_0, Q4_0, Q4_1, ...); norms and
    biases stay F32, as llama.cpp does.
    """
    import gguf

    arch = hf_config["model_type"]
    qtype = getattr(gguf.GGMLQuantizationType, quant)
    heads = hf_config["num_attention_heads"]
    kv_heads = hf_config.get("num_key_value_heads") or heads
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(hf_config["num_hidden_layers"])
    writer.add_context_length(hf_config["max_position_embeddings"])
    writer.add_embedding_length(hf_config["hidden_size"])
    writer.add_feed_forward_length(hf_config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    rope = hf_config.get("rope_parameters") or {}
    writer.add_rope_freq_base(float(rope.get("rope_theta", hf_config.get("rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(float(hf_config["rms_norm_eps"]))
    writer.add_vocab_size(hf_config["vocab_size"])
    head_dim = hf_config.get("head_dim")
    if head_dim and head_dim != hf_config["hidden_size"] // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)

    for name, w in state_dict.items():
        w = np.asarray(w, np.float32)
        if name == "model.embed_tokens.weight":
            out = "token_embd.weight"
        elif name == "model.norm.weight":
            out = "output_norm.weight"
        elif name == "lm_head.weight":
            if hf_config.get("tie_word_embeddings"):
                continue
            out = "output.weight"
        else:
            _, _, layer, rest = name.split(".", 3)
            module, _, param = rest.rpartition(".")
            out = f"blk.{layer}.{_TO_GGUF[module]}.{param}"
            if arch == "llama" and module in ("self_attn.q_proj", "self_attn.k_proj"):
                w = permute_for_gguf(w, heads if module.endswith("q_proj") else kv_heads)
        if w.ndim == 2 and qtype != gguf.GGMLQuantizationType.F32:
            writer.add_tensor(out, gguf.quantize(w, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(out, w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)
