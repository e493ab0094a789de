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

import jax
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
    "sentence_transformers_settings",
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
    hf: dict[str, Any], pooling: str = "mean", normalize: bool = False, **sentence: Any
) -> BertConfig:
    """BertConfig from a transformers ``config.json``; ``sentence`` holds the
    sentence-transformers settings (``prompts``, ``default_prompt_name``, ``pool_prompt``)."""
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
            **sentence,
        )
    except KeyError as e:
        raise LoadError(f"config.json of BERT model lacks {e.args[0]!r}") from None
    except ConfigError as e:
        raise LoadError(f"unsupported BERT config: {e}") from None


# sentence-transformers Pooling config: old boolean keys and the single "pooling_mode" of v6+
_ST_POOLING_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len",
    "pooling_mode_lasttoken": "lasttoken",
    "pooling_mode_weightedmean_tokens": "weightedmean",
}
_ST_POOLING_NAMES = {
    "cls": "cls",
    "mean": "mean",
    "max": "max",
    "mean_sqrt_len_tokens": "mean_sqrt_len",
    "lasttoken": "lasttoken",
    "weightedmean": "weightedmean",
}


def _read_json(file: Path) -> Any:
    try:
        return json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LoadError(f"{file}: not valid JSON: {e}") from None


def sentence_transformers_settings(path: Path) -> dict[str, Any]:
    """What a sentence-transformers model folder says beyond the HF checkpoint.

    ``modules.json`` lists the modules: a Transformer (its ``path`` holds config.json, weights and
    tokenizer; "" = the folder itself), a Pooling (mode from its config.json, old boolean keys or
    v6's ``pooling_mode``; ``include_prompt``) and an optional Normalize. ``max_seq_length`` comes
    from the Transformer's ``sentence_bert_config.json`` (else the tokenizer's model_max_length),
    prompts from ``config_sentence_transformers.json``. A folder without modules.json is a plain
    HF checkpoint: mean pooling, no normalisation. Modules jaxlab cannot run (Dense, ...) and
    pooling modes it does not have are a LoadError naming them.
    """
    out: dict[str, Any] = {
        "model_dir": path,
        "pooling": "mean",
        "normalize": False,
        "max_seq_length": None,
        "prompts": (),
        "default_prompt_name": None,
        "pool_prompt": True,
    }
    modules_file = path / "modules.json"
    if not modules_file.is_file():
        return out
    modules = _read_json(modules_file)
    if not isinstance(modules, list):
        raise LoadError(f"{modules_file}: must hold a list of modules")
    seen = []
    for module in sorted(modules, key=lambda m: m.get("idx", 0)):
        kind = str(module.get("type", "")).rsplit(".", 1)[-1]
        folder = path / module.get("path", "")
        seen.append(kind)
        if kind == "Transformer":
            out["model_dir"] = folder
            st = folder / "sentence_bert_config.json"
            if st.is_file():
                out["max_seq_length"] = _read_json(st).get("max_seq_length")
        elif kind == "Pooling":
            cfg_file = folder / "config.json"
            pc = _read_json(cfg_file) if cfg_file.is_file() else {}
            if "pooling_mode" in pc:
                modes = [_ST_POOLING_NAMES.get(pc["pooling_mode"], pc["pooling_mode"])]
            else:
                modes = [name for key, name in _ST_POOLING_KEYS.items() if pc.get(key)]
            if len(modes) != 1 or modes[0] not in (
                "cls",
                "mean",
                "max",
                "mean_sqrt_len",
                "lasttoken",
            ):
                raise LoadError(
                    f"{cfg_file}: pooling {modes or 'none'} is not supported; jaxlab pools by "
                    "one of cls, mean, max, mean_sqrt_len_tokens, lasttoken"
                )
            out["pooling"] = modes[0]
            out["pool_prompt"] = bool(pc.get("include_prompt", True))
        elif kind == "Normalize":
            out["normalize"] = True
        else:
            raise LoadError(
                f"{modules_file}: module {module.get('type')!r} is not supported; jaxlab runs "
                "Transformer, Pooling and Normalize"
            )
    if "Transformer" not in seen:
        raise LoadError(f"{modules_file}: no Transformer module")
    st_config = path / "config_sentence_transformers.json"
    if st_config.is_file():
        cfg = _read_json(st_config)
        prompts = cfg.get("prompts") or {}
        if not isinstance(prompts, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in prompts.items()
        ):
            raise LoadError(f"{st_config}: 'prompts' must map names to strings")
        out["prompts"] = tuple(sorted(prompts.items()))
        default = cfg.get("default_prompt_name")
        if default is not None and default not in prompts:
            raise LoadError(
                f"{st_config}: default_prompt_name {default!r} is not among the prompts "
                f"{sorted(prompts)}"
            )
        out["default_prompt_name"] = default
    return out


# --------------------------------------------------------------------------------------------------
# Weights


class _SafetensorsTensor:
    """One tensor of an open safetensors file, read only when indexed: ``t[index]`` reads just
    that slice from disk (how a sharded load reads each device's share), ``np.asarray(t)`` all."""

    def __init__(self, reader, key: str, file: Path):
        self._slice, self.key, self.file = reader.get_slice(key), key, file
        self.shape = tuple(int(d) for d in self._slice.get_shape())
        self.ndim = len(self.shape)

    def __getitem__(self, index) -> np.ndarray:
        try:
            return np.asarray(self._slice[index])
        except Exception as e:
            raise LoadError(f"{self.file}: cannot read {self.key}: {e}") from None

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = self[tuple(slice(None) for _ in self.shape)] if self.shape else self[...]
        return out if dtype is None else out.astype(dtype)


class _Transposed:
    """``array.T`` of a lazily read matrix, indexed without reading the rest."""

    def __init__(self, array):
        self.array, self.shape, self.ndim = array, tuple(reversed(array.shape)), array.ndim

    def __getitem__(self, index) -> np.ndarray:
        index = index if isinstance(index, tuple) else (index,)
        index = index + (slice(None),) * (self.ndim - len(index))
        return np.asarray(self.array[tuple(reversed(index))]).T

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        return np.asarray(self.array, dtype).T


class _Stacked:
    """``np.stack(arrays)`` of per-layer tensors, indexed without reading the other layers."""

    def __init__(self, arrays: list):
        self.arrays = arrays
        self.shape = (len(arrays), *arrays[0].shape)
        self.ndim = len(self.shape)

    def __getitem__(self, index) -> np.ndarray:
        index = index if isinstance(index, tuple) else (index,)
        index = index + (slice(None),) * (self.ndim - len(index))
        layers = range(len(self.arrays))[index[0]]
        return np.stack([np.asarray(self.arrays[i][index[1:]]) for i in layers])

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        return np.stack([np.asarray(a, dtype) for a in self.arrays])


def _place(array, var: Any, sharding) -> jax.Array:
    """``array`` (numpy or lazy) as a jax array of ``var``'s dtype in ``sharding``: each device's
    share is read on its own (devices holding the same share read it once)."""
    dtype = np.dtype(var.dtype)
    shares: dict[tuple, np.ndarray] = {}

    def share(index):
        key = tuple((s.start, s.stop, s.step) for s in index)
        if key not in shares:
            shares[key] = np.asarray(array[index]).astype(dtype, copy=False)
        return shares[key]

    return jax.make_array_from_callback(tuple(var.shape), sharding, share)


def _iter_safetensors(path: Path, lazy: bool = False) -> Iterator[tuple[str, Any]]:
    """``(name, array)`` of every tensor of an HF directory's safetensors files; ``lazy``: the
    arrays are :class:`_SafetensorsTensor` views, read when indexed (the files stay open)."""
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
            if lazy:  # the reader stays open while the views live
                reader = safe_open(str(f), framework="numpy")
                for key in reader.keys():
                    yield key, _SafetensorsTensor(reader, key, f)
                continue
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
    mesh: jax.sharding.Mesh | None = None,
    rules: Any = None,
    param_dtype: Any = None,
) -> nnx.Module:
    """Builds a model from ``(hf_name, array)`` pairs, checking every parameter is present and fits.

    Args:
      kind: ``"decoder"`` or ``"bert"``.
      config: the architecture.
      tensors: HF-named tensors, in any order; per-layer tensors are stacked.
      dtype: compute dtype, and the parameters' unless ``param_dtype`` is given.
      source: shown in error messages.
      map_key: maps an HF name to ``(our_path, layer_index or None, transpose)`` or None to skip.
      param_dtype: the parameters' dtype (decoders; e.g. float32 master weights under bfloat16
        compute).
      mesh, rules: place every parameter directly in its sharding by the logical-name rules
        (:mod:`jaxlab.sharding`); arrays that support it (lazy safetensors views) are then read
        one device's share at a time, so no process holds a whole copy of a split parameter.
    """
    cls = Decoder if kind == "decoder" else BertEncoder
    map_key = map_key or (_map_decoder_key if kind == "decoder" else _map_bert_key)
    kw = {} if param_dtype is None else {"param_dtype": param_dtype}  # decoders only
    abstract = nnx.eval_shape(lambda: cls(config, dtype=dtype, rngs=nnx.Rngs(0), **kw))
    graphdef, abstract_state = nnx.split(abstract)
    expected = {tuple(str(p) for p in path): v for path, v in nnx.to_flat_state(abstract_state)}
    num_layers = config.num_layers
    shardings = None
    if mesh is not None:
        from jaxlab import sharding as sh

        rules = sh.DEFAULT_RULES if rules is None else rules
        sh.check_fits(abstract_state, mesh, rules)
        flat = nnx.to_flat_state(sh.param_shardings(abstract_state, mesh, rules))
        shardings = {tuple(str(p) for p in path): v.get_value() for path, v in flat}

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
            array = array.T if isinstance(array, np.ndarray) else _Transposed(array)
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
        found[path] = np.stack(arrays) if shardings is None else _Stacked(arrays)

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
        if shardings is None:
            leaves.append((path, jnp.asarray(np.asarray(array), dtype=var.dtype)))
        else:
            leaves.append((path, _place(array, var, shardings[path])))
    state = nnx.from_flat_state([(path, expected[path].replace(value)) for path, value in leaves])
    return nnx.merge(graphdef, state)


def load_hf_dir(
    path: Path,
    dtype=jnp.float32,
    *,
    mesh: jax.sharding.Mesh | None = None,
    rules: Any = None,
    param_dtype: Any = None,
) -> tuple[nnx.Module, Any]:
    """``(model, tokenizer or None)`` from an HF checkpoint directory; with ``mesh``, each
    parameter is read per device share straight into its sharding (:func:`build_model`)."""
    path = Path(path)
    settings = sentence_transformers_settings(path)
    root, path = path, settings["model_dir"]  # a Transformer module may live in a sub-folder
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
        kind, config = (
            "bert",
            bert_config_from_hf(
                hf,
                settings["pooling"],
                settings["normalize"],
                prompts=settings["prompts"],
                default_prompt_name=settings["default_prompt_name"],
                pool_prompt=settings["pool_prompt"],
            ),
        )
    else:
        raise LoadError(
            f"{path}: model_type {model_type!r} is not supported; supported: "
            f"{', '.join(DECODER_ARCHS.names())}, bert"
        )
    model = build_model(
        kind,
        config,
        _iter_safetensors(path, lazy=mesh is not None),
        dtype=dtype,
        source=str(path),
        mesh=mesh,
        rules=rules,
        param_dtype=param_dtype if kind == "decoder" else None,
    )
    from jaxlab.tokenization import Tokenizer

    tokenizer = None
    for folder in (path, root):
        if Tokenizer.directory_has_tokenizer(folder):
            tokenizer = Tokenizer.from_directory(
                folder, model_max_length=settings["max_seq_length"]
            )
            break
    return model, tokenizer
