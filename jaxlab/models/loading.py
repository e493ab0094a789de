"""Loading HF checkpoint directories (config.json + safetensors) into jaxlab models.

:func:`jaxlab.models.from_pretrained` (``jaxlab.models.registry``) is the entry point; it resolves
registered names and ``.gguf`` files and comes here for directories.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlab.config import ConfigError
from jaxlab.errors import UserError
from jaxlab.models.archs import DECODER_ARCHS
from jaxlab.models.bert import BertConfig, BertEncoder
from jaxlab.models.decoder import Decoder, DecoderConfig

__all__ = [
    "LoadError",
    "load_hf_dir",
    "decoder_config_from_hf",
    "bert_config_from_hf",
    "build_model",
]


class LoadError(UserError):
    """A checkpoint cannot be loaded: missing file, unknown architecture, shape mismatch, corrupt data."""


# --------------------------------------------------------------------------------------------------
# Configs


def _rope(hf: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or None
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    kind = (
        params.get("rope_type") or (scaling or {}).get("rope_type") or (scaling or {}).get("type")
    )
    if kind in (None, "default"):
        return float(theta), None
    merged = {**(scaling or {}), **{k: v for k, v in params.items() if k != "rope_theta"}}
    merged["rope_type"] = kind
    merged.pop("type", None)
    return float(theta), merged


def decoder_config_from_hf(hf: dict[str, Any]) -> DecoderConfig:
    """Maps a transformers ``config.json`` of a decoder in :data:`DECODER_ARCHS` (Llama, Mistral,
    Qwen2, Qwen3) to DecoderConfig."""
    arch = hf.get("model_type")
    if arch not in DECODER_ARCHS:
        raise LoadError(
            f"model_type {arch!r} is not a supported decoder; supported: "
            f"{', '.join(DECODER_ARCHS.names())}"
        )
    spec = DECODER_ARCHS.get(arch)
    theta, scaling = _rope(hf)
    if hf.get("sliding_window") and hf.get("use_sliding_window", spec.sliding_window_by_default):
        raise LoadError(f"{arch} with sliding-window attention is not supported")
    hf_bias = bool(hf.get("attention_bias", False))
    try:
        return DecoderConfig(
            arch=arch,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=hf["num_attention_heads"],
            num_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
            head_dim=hf.get("head_dim"),
            rope_theta=theta,
            rope_scaling=scaling,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=spec.qkv_bias or hf_bias,
            attention_out_bias=spec.out_bias_follows_hf and hf_bias,
            mlp_bias=bool(hf.get("mlp_bias", False)),
            qk_norm=spec.qk_norm,
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            hidden_act=hf.get("hidden_act", "silu"),
        )
    except KeyError as e:
        raise LoadError(f"config.json of {arch} model lacks {e.args[0]!r}") from None
    except ConfigError as e:
        raise LoadError(f"unsupported {arch} config: {e}") from None


def bert_config_from_hf(
    hf: dict[str, Any], pooling: str = "mean", normalize: bool = False
) -> BertConfig:
    if hf.get("position_embedding_type", "absolute") != "absolute":
        raise LoadError(
            f"BERT position_embedding_type {hf['position_embedding_type']!r} is not supported"
        )
    try:
        return BertConfig(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=hf["num_attention_heads"],
            max_position_embeddings=hf.get("max_position_embeddings", 512),
            type_vocab_size=hf.get("type_vocab_size", 2),
            layer_norm_eps=hf.get("layer_norm_eps", 1e-12),
            hidden_act=hf.get("hidden_act", "gelu"),
            pooling=pooling,
            normalize=normalize,
        )
    except KeyError as e:
        raise LoadError(f"config.json of BERT model lacks {e.args[0]!r}") from None
    except ConfigError as e:
        raise LoadError(f"unsupported BERT config: {e}") from None


def _sentence_transformers_settings(path: Path) -> tuple[str, bool]:
    """Pooling mode and normalisation from a sentence-transformers model directory, if present."""
    modules_file = path / "modules.json"
    if not modules_file.is_file():
        return "mean", False
    pooling, normalize = "mean", False
    for module in json.loads(modules_file.read_text()):
        kind = module.get("type", "")
        if kind.endswith("Normalize"):
            normalize = True
        elif kind.endswith("Pooling"):
            cfg_file = path / module.get("path", "") / "config.json"
            if cfg_file.is_file():
                pc = json.loads(cfg_file.read_text())
                if pc.get("pooling_mode_cls_token"):
                    pooling = "cls"
                elif pc.get("pooling_mode_max_tokens"):
                    pooling = "max"
    return pooling, normalize


# --------------------------------------------------------------------------------------------------
# Weights


def _iter_safetensors(path: Path) -> Iterator[tuple[str, np.ndarray]]:
    from safetensors import safe_open

    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        files = sorted(set(weight_map.values()))
    else:
        files = sorted(p.name for p in path.glob("*.safetensors"))
    if not files:
        other = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")]
        hint = f" (found {', '.join(other)}: convert to safetensors)" if other else ""
        raise LoadError(f"{path}: no *.safetensors weights{hint}")
    for name in files:
        f = path / name
        if not f.is_file():
            raise LoadError(f"{path}: weight shard {name} listed in the index is missing")
        try:
            with safe_open(str(f), framework="numpy") as reader:
                for key in reader.keys():
                    yield key, reader.get_tensor(key)
        except LoadError:
            raise
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise LoadError(f"{f}: cannot read safetensors file: {e}") from None


_LAYER_RE = re.compile(r"^(?:model\.)?layers\.(\d+)\.(.+)$")
_BERT_LAYER_RE = re.compile(r"^encoder\.layer\.(\d+)\.(.+)$")
_IGNORED = re.compile(r"(rotary_emb\.inv_freq|^pooler\.|^cls\.|embeddings\.position_ids|^heads\.)")

_BERT_LAYER_NAMES = {
    "attention.self.query": "query",
    "attention.self.key": "key",
    "attention.self.value": "value",
    "attention.output.dense": "attention_output",
    "attention.output.LayerNorm": "attention_layernorm",
    "intermediate.dense": "intermediate",
    "output.dense": "output",
    "output.LayerNorm": "output_layernorm",
}
_BERT_TOP_NAMES = {
    "embeddings.word_embeddings": "word_embeddings",
    "embeddings.position_embeddings": "position_embeddings",
    "embeddings.token_type_embeddings": "token_type_embeddings",
    "embeddings.LayerNorm": "embeddings_layernorm",
}


def _leaf(module_path: str, param: str, is_embedding: bool) -> tuple[tuple[str, ...], bool]:
    """Our (path, transpose?) for an HF ``module.param`` name."""
    parts = tuple(module_path.split("."))
    if param == "weight":
        if is_embedding:
            return parts + ("embedding",), False
        if parts[-1].endswith(("norm", "layernorm")):
            return parts + ("weight",), False
        return parts + ("kernel",), True
    if param == "bias":
        return parts + ("bias",), False
    if param in ("gamma", "beta"):  # old-style LayerNorm names
        return parts + ({"gamma": "weight", "beta": "bias"}[param],), False
    raise KeyError(param)


def _map_decoder_key(key: str) -> tuple[tuple[str, ...], int | None, bool] | None:
    if _IGNORED.search(key):
        return None
    key = key.removeprefix("model.") if not key.startswith("model.layers") else key
    m = _LAYER_RE.match(key)
    if m:
        module, _, param = m.group(2).rpartition(".")
        path, transpose = _leaf(module, param, False)
        return ("layers",) + path, int(m.group(1)), transpose
    module, _, param = key.rpartition(".")
    if module == "embed_tokens":
        return ("embed_tokens", "embedding"), None, False
    path, transpose = _leaf(module, param, False)
    return path, None, transpose


def _map_bert_key(key: str) -> tuple[tuple[str, ...], int | None, bool] | None:
    key = key.removeprefix("bert.")
    if _IGNORED.search(key):
        return None
    m = _BERT_LAYER_RE.match(key)
    if m:
        module, _, param = m.group(2).rpartition(".")
        if module not in _BERT_LAYER_NAMES:
            raise KeyError(key)
        path, transpose = _leaf(_BERT_LAYER_NAMES[module], param, False)
        return ("layers",) + path, int(m.group(1)), transpose
    module, _, param = key.rpartition(".")
    if module not in _BERT_TOP_NAMES:
        raise KeyError(key)
    ours = _BERT_TOP_NAMES[module]
    if module.endswith("LayerNorm"):
        return (ours, {"gamma": "weight", "beta": "bias"}.get(param, param)), None, False
    return (ours, "embedding"), None, False


def build_model(
    kind: str,
    config: DecoderConfig | BertConfig,
    tensors: Iterator[tuple[str, np.ndarray]],
    *,
    dtype,
    source: str,
    map_key: Callable | None = None,
) -> nnx.Module:
    """Builds a model from ``(hf_name, array)`` pairs, checking every parameter is present and fits.

    Args:
      kind: ``"decoder"`` or ``"bert"``.
      config: the architecture.
      tensors: HF-named tensors, in any order; per-layer tensors are stacked.
      dtype: parameter dtype.
      source: shown in error messages.
      map_key: maps an HF name to ``(our_path, layer_index or None, transpose)`` or None to skip.
    """
    cls = Decoder if kind == "decoder" else BertEncoder
    map_key = map_key or (_map_decoder_key if kind == "decoder" else _map_bert_key)
    abstract = nnx.eval_shape(lambda: cls(config, dtype=dtype, rngs=nnx.Rngs(0)))
    graphdef, abstract_state = nnx.split(abstract)
    expected = {tuple(str(p) for p in path): v for path, v in nnx.to_flat_state(abstract_state)}
    num_layers = config.num_layers

    found: dict[tuple[str, ...], Any] = {}
    layered: dict[tuple[str, ...], list[Any]] = {}
    unexpected: list[str] = []
    for key, array in tensors:
        try:
            mapped = map_key(key)
        except KeyError:
            unexpected.append(key)
            continue
        if mapped is None:
            continue
        path, layer, transpose = mapped
        if transpose:
            array = array.T
        if layer is not None and not getattr(config, "scan_layers", True):
            if layer >= num_layers:
                raise LoadError(
                    f"{source}: tensor {key} is for layer {layer}, but the config has {num_layers}"
                )
            path, layer = ("layers", str(layer), *path[1:]), None  # one module per layer
        if path not in expected:
            if path == ("lm_head", "kernel") and getattr(config, "tie_word_embeddings", False):
                continue  # some tied checkpoints store the head as well
            unexpected.append(key)
            continue
        if layer is None:
            found[path] = array
        else:
            if layer >= num_layers:
                raise LoadError(
                    f"{source}: tensor {key} is for layer {layer}, but the config has {num_layers}"
                )
            layered.setdefault(path, [None] * num_layers)[layer] = array
    if unexpected:
        raise LoadError(
            f"{source}: unexpected tensors for a {kind} model: {', '.join(unexpected[:5])}"
            + (f" (+{len(unexpected) - 5} more)" if len(unexpected) > 5 else "")
        )
    for path, arrays in layered.items():
        missing_layers = [i for i, a in enumerate(arrays) if a is None]
        if missing_layers:
            raise LoadError(f"{source}: {'.'.join(path)} is missing for layers {missing_layers}")
        found[path] = np.stack(arrays)

    leaves = []
    for path, var in expected.items():
        if path not in found:
            raise LoadError(f"{source}: missing weight for {'.'.join(path)} (shape {var.shape})")
        array = found[path]
        if tuple(array.shape) != tuple(var.shape):
            raise LoadError(
                f"{source}: {'.'.join(path)} has shape {tuple(array.shape)}, "
                f"the config needs {tuple(var.shape)}"
            )
        leaves.append((path, jnp.asarray(array, dtype=var.dtype)))
    state = nnx.from_flat_state([(path, expected[path].replace(value)) for path, value in leaves])
    return nnx.merge(graphdef, state)


def load_hf_dir(path: Path, dtype=jnp.float32) -> tuple[nnx.Module, Any]:
    """``(model, tokenizer or None)`` from an HF checkpoint directory."""
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise LoadError(
            f"{path}: no config.json; an HF checkpoint directory needs config.json and *.safetensors"
        )
    try:
        hf = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LoadError(f"{config_file}: not valid JSON: {e}") from None
    if not isinstance(hf, dict):
        raise LoadError(f"{config_file}: must hold a JSON object, got {type(hf).__name__}")
    model_type = hf.get("model_type")
    if model_type in DECODER_ARCHS:
        kind, config = "decoder", decoder_config_from_hf(hf)
    elif model_type == "bert":
        pooling, normalize = _sentence_transformers_settings(path)
        kind, config = "bert", bert_config_from_hf(hf, pooling, normalize)
    else:
        raise LoadError(
            f"{path}: model_type {model_type!r} is not supported; supported: "
            f"{', '.join(DECODER_ARCHS.names())}, bert"
        )
    model = build_model(kind, config, _iter_safetensors(path), dtype=dtype, source=str(path))
    from jaxlab.tokenization import Tokenizer

    tokenizer = None
    if Tokenizer.directory_has_tokenizer(path):
        st_config = path / "sentence_bert_config.json"
        limit = (
            json.loads(st_config.read_text()).get("max_seq_length") if st_config.is_file() else None
        )
        tokenizer = Tokenizer.from_directory(path, model_max_length=limit)
    return model, tokenizer
