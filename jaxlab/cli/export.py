"""``export``: a decoder (pretrained, HF directory, GGUF or a training run's checkpoint) as an HF
checkpoint directory for transformers and vLLM."""

from __future__ import annotations

import json
from pathlib import Path

from jaxlab.cli._common import Command
from jaxlab.errors import UserError

__all__ = ["COMMAND", "load_run"]

_DTYPES = ("float32", "bfloat16", "float16")


def _base_config_and_tokenizer(source: str):
    """The DecoderConfig and tokenizer of a pretrained source, without reading its weights."""
    from jaxlab.models.gguf_loader import _open, read_gguf_config
    from jaxlab.models.loading import LoadError, decoder_config_from_hf
    from jaxlab.models.registry import PRETRAINED, PackagedModel
    from jaxlab.tokenization import Tokenizer

    path = Path(source)
    if source in PRETRAINED:
        entry = PRETRAINED.get(source)
        if not isinstance(entry, PackagedModel):
            raise UserError(f"model {source!r} is registered with a loader; export it from Python")
        path = entry.path()
    if path.suffix == ".gguf":
        reader = _open(path)
        return read_gguf_config(reader, path), Tokenizer.from_gguf(path, reader=reader)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise LoadError(f"{source}: neither a registered name, a .gguf file nor an HF directory")
    cfg = decoder_config_from_hf(json.loads(config_file.read_text()))
    tokenizer = Tokenizer.from_directory(path) if Tokenizer.directory_has_tokenizer(path) else None
    return cfg, tokenizer


def load_run(workdir: str | Path, step: int | None = None):
    """``(model, tokenizer, step)`` from a training run's directory: its ``config.json`` (written by
    ``train-lm``, ``rl train`` or ``sft``) says which decoder was trained, ``checkpoints/`` holds
    its weights (the latest step by default). The base model's weights are not read: the decoder is
    built abstract and the checkpoint fills it; a LoRA run's model comes with its adapters
    (``save_pretrained`` merges them).
    """
    import dataclasses

    import jax.numpy as jnp
    from flax import nnx

    from jaxlab.checkpoint import Checkpointer, CheckpointError
    from jaxlab.config import from_dict
    from jaxlab.models.decoder import Decoder, DecoderConfig
    from jaxlab.models.lora import LoRAConfig
    from jaxlab.tokenization import char_tokenizer

    workdir = Path(workdir)
    if workdir.name == "checkpoints" and not (workdir / "config.json").is_file():
        workdir = workdir.parent
    config_file = workdir / "config.json"
    if not config_file.is_file() or not (workdir / "checkpoints").is_dir():
        raise UserError(
            f"{workdir}: not a training run directory (config.json and checkpoints/ expected)"
        )
    run = json.loads(config_file.read_text())
    model_field = run.get("model")
    tokenizer = None
    if isinstance(model_field, dict):  # train-lm: the architecture itself
        cfg = from_dict(DecoderConfig, model_field, prefix="model.")
    elif model_field == "tiny":  # rl train's character-level model
        tokenizer = char_tokenizer()
        cfg = from_dict(DecoderConfig, run.get("tiny_model", {}), prefix="tiny_model.")
        cfg = dataclasses.replace(cfg, vocab_size=tokenizer.vocab_size)
    elif isinstance(model_field, str):  # a pretrained name, HF directory or GGUF, fine-tuned
        cfg, tokenizer = _base_config_and_tokenizer(model_field)
        cfg = dataclasses.replace(cfg, scan_layers=True)  # trainers train stacked layers
    else:
        raise UserError(f"{config_file}: no 'model' entry naming the trained decoder")

    lora = run.get("lora")  # a LoRA run's checkpoint holds the adapters beside the base
    lora = from_dict(LoRAConfig, lora, prefix="lora.") if isinstance(lora, dict) else None
    dtype = jnp.dtype(run.get("param_dtype", "float32"))
    model = nnx.eval_shape(lambda: Decoder(cfg, dtype=dtype, lora=lora, rngs=nnx.Rngs(0)))
    ckpt = Checkpointer(workdir / "checkpoints", async_save=False)
    try:
        if ckpt.latest_step() is None:
            raise CheckpointError(f"{workdir / 'checkpoints'}: no complete checkpoint")
        step, _ = ckpt.restore(step, model=model)
    finally:
        ckpt.close()
    return model, tokenizer, step


def _run_export(args):
    import jax.numpy as jnp

    from jaxlab.cli._common import require_decoder
    from jaxlab.models import from_pretrained
    from jaxlab.models.export import parse_size, save_pretrained

    parse_size(args.max_shard_size)  # a bad size fails before any loading
    out = Path(args.out)
    if out.is_dir() and any(out.iterdir()) and not args.overwrite:
        raise UserError(f"{out} exists and is not empty; pass --overwrite to replace it")
    source = Path(args.model)
    if (source.is_dir() and (source / "checkpoints").is_dir()) or source.name == "checkpoints":
        model, tokenizer, step = load_run(source, args.step)
        what = f"{args.model} (step {step})"
    else:
        if args.step is not None:
            raise UserError("--step applies to a training run directory only")
        model, tokenizer = from_pretrained(args.model)
        what = args.model
    require_decoder(model, args.model)
    dtype = None if args.dtype is None else getattr(jnp, args.dtype)
    save_pretrained(
        model,
        tokenizer,
        out,
        max_shard_size=args.max_shard_size,
        dtype=dtype,
        overwrite=args.overwrite,
    )
    files = sorted(p.name for p in out.iterdir())
    print(f"exported {what} to {out}: {', '.join(files)}")


def _export_args(p):
    p.add_argument(
        "--model",
        required=True,
        metavar="NAME_OR_DIR_OR_CHECKPOINT",
        help="a registered model name, an HF directory, a .gguf file, or a training run's "
        "directory (config.json + checkpoints/, from train-lm, rl train or sft)",
    )
    p.add_argument("--out", required=True, help="the HF checkpoint directory to write")
    p.add_argument("--step", type=int, help="checkpoint step of a training run (default: latest)")
    p.add_argument(
        "--dtype",
        choices=_DTYPES,
        help="dtype of the written weights (default: the model's own)",
    )
    p.add_argument(
        "--max-shard-size",
        default="5GB",
        help="largest safetensors file (e.g. 5GB, 500MiB); larger models are sharded with an index",
    )
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")


COMMAND = Command(
    "export",
    "write a decoder as an HF checkpoint directory (config.json, safetensors, tokenizer)",
    _export_args,
    _run_export,
)
