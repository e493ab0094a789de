"""Writing jaxlab decoders as HF checkpoint directories that transformers and vLLM load.

:func:`save_pretrained` is the inverse of the HF loading path (``jaxlab.models.loading``): the
same parameter names (``model.layers.{i}.self_attn.q_proj.weight`` ...), kernels transposed back to
torch's ``[out, in]``, stacked layers split per layer, no ``lm_head`` for tied embeddings, and a
``config.json`` from which ``decoder_config_from_hf`` rebuilds the same :class:`DecoderConfig`.
HF checkpoints keep Q/K rows in the rotate-half order that jaxlab computes in, so no permutation is
applied (the GGUF loader undoes llama.cpp's interleaving when it reads).

The directory holds ``config.json``, ``generation_config.json``, ``model.safetensors`` (or
``model-0000i-of-0000n.safetensors`` shards and ``model.safetensors.index.json`` when the weights
exceed ``max_shard_size``) and the tokenizer's own files.

Arrays may be sharded over devices (and hosts): each tensor is gathered to the host on its own
(``jax.device_get``; an all-gather across processes when a process does not hold all of it), so the
host holds one shard file's tensors at a time, never the whole model. In a multi-process run every
process calls :func:`save_pretrained` (the gathers are collective) and process 0 writes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from jaxlab.errors import OutputExistsError, UserError
from jaxlab.models.decoder import Decoder, DecoderConfig

__all__ = [
    "ExportError",
    "save_pretrained",
    "hf_config_from_decoder",
    "parse_size",
    "DEFAULT_MAX_SHARD_SIZE",
]

DEFAULT_MAX_SHARD_SIZE = "5GB"  # transformers' long-standing default

# HF class names and what each family's modeling code can express
_HF_CLASSES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}


@dataclasses.dataclass(frozen=True)
class _HFFamily:
    """Which biases and norms an HF decoder family has.

    qkv_bias: ``"always"`` (Qwen2), ``"flag"`` (``attention_bias`` switches q/k/v/o together:
      Llama, Qwen3) or ``"never"`` (Mistral).
    out_bias: the output projection can carry a bias (through ``attention_bias``).
    mlp_bias: ``mlp_bias`` exists (Llama).
    qk_norm: q_norm / k_norm are always there (Qwen3).
    sliding_window_keys: config keys that switch sliding-window attention off explicitly.
    """

    qkv_bias: str
    out_bias: bool
    mlp_bias: bool
    qk_norm: bool
    sliding_window_keys: dict[str, Any]


_FAMILIES = {
    "llama": _HFFamily("flag", True, True, False, {}),
    "mistral": _HFFamily("never", False, False, False, {"sliding_window": None}),
    "qwen2": _HFFamily(
        "always", False, False, False, {"use_sliding_window": False, "sliding_window": None}
    ),
    "qwen3": _HFFamily(
        "flag", True, False, True, {"use_sliding_window": False, "sliding_window": None}
    ),
}


class ExportError(UserError):
    """A model that the HF format of its family cannot express (or an unwritable output)."""


# --------------------------------------------------------------------------------------------------
# config.json


def _refuse(cfg: DecoderConfig, what: str) -> None:
    raise ExportError(
        f"cannot export a {cfg.arch} decoder with {what}: transformers' {_HF_CLASSES[cfg.arch]} "
        "has no such parameters"
    )


def _bias_layout(cfg: DecoderConfig) -> tuple[bool, bool]:
    """``(qkv biases, output bias)`` the HF checkpoint carries; those jaxlab lacks are written as
    zeros (exactly the same function)."""
    fam = _FAMILIES[cfg.arch]
    if fam.qkv_bias == "always":
        return True, False
    if fam.qkv_bias == "never":
        return False, False
    flag = cfg.attention_bias or cfg.attention_out_bias
    return flag, flag


def _check_expressible(cfg: DecoderConfig) -> None:
    fam = _FAMILIES[cfg.arch]
    if cfg.hidden_act != "silu":
        _refuse(cfg, f"hidden_act={cfg.hidden_act!r}")
    if cfg.attention_bias and fam.qkv_bias == "never":
        _refuse(cfg, "q/k/v biases (attention_bias=True)")
    if cfg.attention_out_bias and not fam.out_bias:
        _refuse(cfg, "an output-projection bias (attention_out_bias=True)")
    if cfg.mlp_bias and not fam.mlp_bias:
        _refuse(cfg, "MLP biases (mlp_bias=True)")
    if cfg.qk_norm != fam.qk_norm:
        _refuse(cfg, f"qk_norm={cfg.qk_norm}")


def _rope_scaling(cfg: DecoderConfig) -> dict[str, Any] | None:
    if not cfg.rope_scaling:
        return None
    scaling = dict(cfg.rope_scaling)
    kind = scaling.pop("rope_type", scaling.pop("type", "default"))
    scaling.pop("rope_theta", None)
    if kind == "default":
        return None
    return {"rope_type": kind, **scaling}


def hf_config_from_decoder(
    cfg: DecoderConfig, *, dtype: Any = "float32", tokenizer: Any = None
) -> dict[str, Any]:
    """The transformers ``config.json`` of a decoder (the inverse of ``decoder_config_from_hf``).

    RoPE settings are written both in the long-standing form (``rope_theta``, ``rope_scaling``: older
    transformers, vLLM) and in transformers 5's ``rope_parameters``.

    Raises:
      ExportError: the family's HF model cannot express the config (e.g. a bias Mistral lacks).
    """
    if cfg.arch not in _FAMILIES:
        raise ExportError(
            f"no HF export for decoder architecture {cfg.arch!r}; supported: {', '.join(_FAMILIES)}"
        )
    _check_expressible(cfg)
    fam = _FAMILIES[cfg.arch]
    qkv_bias, out_bias = _bias_layout(cfg)
    scaling = _rope_scaling(cfg)
    hf: dict[str, Any] = {
        "architectures": [_HF_CLASSES[cfg.arch]],
        "model_type": cfg.arch,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "hidden_act": cfg.hidden_act,
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": scaling,
        "rope_parameters": {
            "rope_type": "default",
            **(scaling or {}),
            "rope_theta": cfg.rope_theta,
        },
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": True,
        "torch_dtype": np.dtype(dtype).name,
        "dtype": np.dtype(dtype).name,
    }
    if cfg.head_dim is not None:  # else transformers' default, hidden_size // heads
        hf["head_dim"] = cfg.head_dim
    if fam.qkv_bias == "flag":
        hf["attention_bias"] = qkv_bias or out_bias
    if fam.mlp_bias:
        hf["mlp_bias"] = cfg.mlp_bias
    hf.update(fam.sliding_window_keys)
    if cfg.arch in ("qwen2", "qwen3"):
        hf["max_window_layers"] = cfg.num_layers
    hf.update(_special_token_ids(tokenizer))
    return hf


def _special_token_ids(tokenizer: Any) -> dict[str, Any]:
    if tokenizer is None:
        return {}
    hf = tokenizer.hf
    return {
        "bos_token_id": hf.bos_token_id,
        "eos_token_id": hf.eos_token_id,
        "pad_token_id": hf.pad_token_id,
    }


def _generation_config(tokenizer: Any) -> dict[str, Any]:
    """Greedy by default (transformers' default); every end-of-turn id stops generation."""
    out: dict[str, Any] = {"_from_model_config": False}
    if tokenizer is not None:
        eos = list(tokenizer.eos_token_ids)
        if tokenizer.hf.bos_token_id is not None:
            out["bos_token_id"] = int(tokenizer.hf.bos_token_id)
        if eos:
            out["eos_token_id"] = eos[0] if len(eos) == 1 else eos
        out["pad_token_id"] = int(tokenizer.pad_token_id)
    return out


# --------------------------------------------------------------------------------------------------
# Tensors


@dataclasses.dataclass(frozen=True)
class _Tensor:
    """One HF tensor: its name, shape, dtype and how to fetch it to the host."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    fetch: Callable[[], np.ndarray]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


def _to_host(x: jax.Array) -> np.ndarray:
    """One array on the host: a device copy where this process holds it all, else an all-gather
    across processes (every process must call this for the same arrays in the same order)."""
    if not isinstance(x, jax.Array) or x.is_fully_addressable:
        return np.asarray(jax.device_get(x))
    if x.is_fully_replicated:
        return np.asarray(x.addressable_data(0))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _hf_leaf(module: tuple[str, ...], leaf: str) -> tuple[str, bool]:
    """HF ``module.param`` name and whether the array is transposed, for our path ``module/leaf``."""
    name = ".".join(module)
    if leaf == "kernel":
        return f"{name}.weight", True
    if leaf in ("weight", "bias"):
        return f"{name}.{leaf}", False
    if leaf == "embedding":
        return f"{name}.weight", False
    raise KeyError(leaf)


_LAYER_ORDER = (
    "input_layernorm",
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "self_attn.q_norm",
    "self_attn.k_norm",
    "post_attention_layernorm",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)


def _layer_sort_key(name: str) -> tuple[int, str]:
    module = name.rsplit(".", 1)[0]
    return (_LAYER_ORDER.index(module) if module in _LAYER_ORDER else len(_LAYER_ORDER), name)


def _plan_tensors(model: Decoder, dtype: Any) -> list[_Tensor]:
    """Every HF tensor of ``model``, in HF's usual order (embeddings, layer by layer, norm, head),
    with zero biases where the HF family has a bias that the model lacks."""
    cfg = model.config
    out_dtype = None if dtype is None else np.dtype(dtype)
    top: dict[str, _Tensor] = {}
    layers: dict[int, dict[str, _Tensor]] = {i: {} for i in range(cfg.num_layers)}

    def make(name, array, index, transpose):
        shape = tuple(int(d) for d in array.shape[(0 if index is None else 1) :])
        if transpose:
            shape = shape[::-1]
        tdtype = out_dtype or np.dtype(array.dtype)

        def fetch():
            x = array if index is None else array[index]
            host = _to_host(x)
            if transpose:
                host = host.T
            return np.ascontiguousarray(host.astype(tdtype, copy=False))

        return _Tensor(name, shape, tdtype, fetch)

    unknown = []
    for path, var in nnx.to_flat_state(nnx.state(model)):
        parts = tuple(str(p) for p in path)
        if not isinstance(var, nnx.Param):
            unknown.append(".".join(parts) + f" ({type(var).__name__})")
            continue
        array = var[...]
        module, leaf = parts[:-1], parts[-1]
        try:
            if module and module[0] == "layers":
                if cfg.scan_layers:
                    hf, transpose = _hf_leaf(module[1:], leaf)
                    for i in range(cfg.num_layers):
                        layers[i][hf] = make(f"model.layers.{i}.{hf}", array, i, transpose)
                else:
                    i = int(module[1])
                    hf, transpose = _hf_leaf(module[2:], leaf)
                    layers[i][hf] = make(f"model.layers.{i}.{hf}", array, None, transpose)
            elif module == ("lm_head",):
                top["lm_head.weight"] = make("lm_head.weight", array, None, leaf == "kernel")
            else:
                hf, transpose = _hf_leaf(module, leaf)
                top[f"model.{hf}"] = make(f"model.{hf}", array, None, transpose)
        except (KeyError, ValueError):
            unknown.append(".".join(parts))
    if unknown:
        raise ExportError(
            "the model has variables the HF format has no place for: "
            + ", ".join(unknown[:5])
            + (f" (+{len(unknown) - 5} more)" if len(unknown) > 5 else "")
            + "; merge adapters into the base weights before exporting"
        )

    # biases the HF family always has (or switches on together) but this model lacks: zeros
    qkv_bias, out_bias = _bias_layout(cfg)
    wanted = {}
    if qkv_bias and not cfg.attention_bias:
        d = cfg.dim_per_head
        wanted.update(
            {
                "self_attn.q_proj.bias": cfg.num_heads * d,
                "self_attn.k_proj.bias": cfg.num_kv_heads * d,
                "self_attn.v_proj.bias": cfg.num_kv_heads * d,
            }
        )
    if out_bias and not cfg.attention_out_bias:
        wanted["self_attn.o_proj.bias"] = cfg.hidden_size
    emb = top.get("model.embed_tokens.weight")
    zero_dtype = out_dtype or (emb.dtype if emb is not None else np.dtype(np.float32))
    for i in range(cfg.num_layers):
        for hf, size in wanted.items():
            layers[i][hf] = _Tensor(
                f"model.layers.{i}.{hf}",
                (size,),
                zero_dtype,
                lambda size=size: np.zeros((size,), zero_dtype),
            )

    ordered = [top.pop("model.embed_tokens.weight")] if "model.embed_tokens.weight" in top else []
    for i in range(cfg.num_layers):
        ordered += [layers[i][k] for k in sorted(layers[i], key=_layer_sort_key)]
    for name in ("model.norm.weight", "lm_head.weight"):
        if name in top:
            ordered.append(top.pop(name))
    ordered += [top[k] for k in sorted(top)]
    return ordered


_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)?\s*$", re.IGNORECASE)
_UNITS = {
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string such as ``"5GB"`` (10⁹ bytes) or ``"500MiB"`` (2²⁰ bytes)."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        m = _SIZE_RE.match(str(size))
        if not m:
            raise ExportError(
                f"max_shard_size {size!r} is not a size; give bytes or e.g. '5GB', '500MiB'"
            )
        value = int(float(m.group(1)) * _UNITS[(m.group(2) or "B").upper()])
    if value <= 0:
        raise ExportError(f"max_shard_size must be positive, got {size!r}")
    return value


def _shards(tensors: list[_Tensor], max_bytes: int) -> list[list[_Tensor]]:
    """Consecutive tensors grouped into shards of at most ``max_bytes`` (a larger tensor alone)."""
    shards: list[list[_Tensor]] = []
    size = 0
    for t in tensors:
        if not shards or size + t.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


# --------------------------------------------------------------------------------------------------
# Writing


def save_pretrained(
    model: Decoder,
    tokenizer: Any,
    directory: str | os.PathLike,
    *,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    dtype: Any = None,
    overwrite: bool = False,
) -> Path:
    """Writes ``model`` (and ``tokenizer``) as an HF checkpoint directory.

    Args:
      model: a :class:`~jaxlab.models.Decoder` (stacked or unrolled layers; arrays may be sharded;
        LoRA adapters are merged into the kernels).
      tokenizer: a :class:`jaxlab.tokenization.Tokenizer`, or None to write weights and configs only.
      directory: the output directory; an existing non-empty one is replaced only with ``overwrite``.
      max_shard_size: largest safetensors file, bytes or a string (``"5GB"``, ``"500MiB"``); above
        it the weights are split into shards with a ``model.safetensors.index.json``.
      dtype: the dtype the weights are written in (e.g. ``jnp.bfloat16``); None keeps the model's.
      overwrite: replace an existing non-empty directory.

    Returns:
      The directory. ``jaxlab.models.from_pretrained`` and ``transformers``'
      ``AutoModelForCausalLM.from_pretrained`` both load it.

    Raises:
      OutputExistsError: ``directory`` is non-empty and ``overwrite`` is false.
      ExportError: the model is not a decoder, or its family's HF format cannot express it.
    """
    if not isinstance(model, Decoder):
        raise ExportError(
            f"save_pretrained exports decoder LMs (Decoder); got a {type(model).__name__}"
        )
    from jaxlab.models.lora import merge_lora

    model = merge_lora(model)  # LoRA adapters go out merged into the kernels
    directory = Path(directory)
    problem = 0
    if directory.exists() and not directory.is_dir():
        problem = 1
    elif directory.is_dir() and any(directory.iterdir()) and not overwrite:
        problem = 2
    if jax.process_count() > 1:
        # process 0, the writer, decides for all (and no process looks after it has written)
        from jax.experimental import multihost_utils

        problem = int(multihost_utils.broadcast_one_to_all(np.int32(problem)))
    if problem == 1:
        raise ExportError(f"{directory} exists and is not a directory")
    if problem == 2:
        raise OutputExistsError(
            f"{directory} exists and is not empty; pass overwrite=True (--overwrite) to replace it"
        )
    max_bytes = parse_size(max_shard_size)
    cfg = model.config
    tensors = _plan_tensors(model, dtype)
    config_dtype = dtype if dtype is not None else tensors[0].dtype
    hf_config = hf_config_from_decoder(cfg, dtype=config_dtype, tokenizer=tokenizer)
    shards = _shards(tensors, max_bytes)

    writer = jax.process_index() == 0
    directory = directory.absolute()
    tmp = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
    if writer:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    try:
        _write(tmp if writer else None, shards, hf_config, tokenizer)
        if writer:
            if directory.exists():
                shutil.rmtree(directory)
            os.replace(tmp, directory)
    finally:
        if writer:
            shutil.rmtree(tmp, ignore_errors=True)
    if jax.process_count() > 1:  # the others return once the directory is complete
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"jaxlab.save_pretrained:{directory}")
    return directory


def _write(out: Path | None, shards, hf_config, tokenizer) -> None:
    """Fetches each shard's tensors (every process: the gathers are collective) and, where ``out``
    is given, writes them; one shard's tensors are on the host at a time."""
    from safetensors.numpy import save_file

    n = len(shards)
    weight_map: dict[str, str] = {}
    total = 0
    for k, shard in enumerate(shards):
        fname = "model.safetensors" if n == 1 else f"model-{k + 1:05d}-of-{n:05d}.safetensors"
        arrays = {}
        for t in shard:
            arrays[t.name] = t.fetch()
            assert arrays[t.name].shape == t.shape, (t.name, arrays[t.name].shape, t.shape)
            weight_map[t.name] = fname
            total += t.nbytes
        if out is not None:
            save_file(arrays, str(out / fname), metadata={"format": "pt"})
        del arrays
    if out is None:
        return
    if n > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (out / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    (out / "generation_config.json").write_text(
        json.dumps(_generation_config(tokenizer), indent=2) + "\n"
    )
    if tokenizer is not None:
        tokenizer.hf.save_pretrained(str(out))
