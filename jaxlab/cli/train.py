"""``train-lm``: train (or resume) a small decoder LM with Orbax checkpoints."""

from __future__ import annotations

import json

from jaxlab.cli._common import Command, add_config_args, add_dtype_arg, dtype_overrides

__all__ = ["COMMAND"]


def _run_train_lm(args):
    from jaxlab.config import load_config
    from jaxlab.train import LMTrainConfig, train_lm

    overrides = dtype_overrides(args)
    if args.data:  # the user's text: --data FILE... (json lists are YAML flow sequences)
        overrides.append(f"data.text.files={json.dumps(args.data)}")
    if args.tokenizer:
        overrides.append(f"data.text.tokenizer={json.dumps(args.tokenizer)}")
    if args.init:
        overrides.append(f"init={json.dumps(args.init)}")
    cfg = load_config(args.config, overrides, cls=LMTrainConfig)
    metrics = train_lm(cfg, args.workdir, progress=not args.quiet)
    print(json.dumps(metrics))


def _train_lm_args(p):
    add_config_args(p, "configs/lm_tiny.yaml")
    add_dtype_arg(p)
    p.add_argument(
        "--workdir",
        required=True,
        help="metrics.jsonl and checkpoints/ go here; resumes if present",
    )
    p.add_argument(
        "--data",
        nargs="+",
        metavar="FILE",
        help="train on these text files (.txt lines, .jsonl / .parquet 'text' field) "
        "instead of the counting data; shorthand for --set data.text.files=[...]",
    )
    p.add_argument(
        "--init",
        help="start from pretrained weights: a registered name, an HF folder or a .gguf file",
    )
    p.add_argument(
        "--tokenizer",
        help="tokenizer of --data: a model name or folder, or char (default: --init's)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress report")


COMMAND = Command(
    "train-lm",
    "train (or resume) a small decoder LM with Orbax checkpoints",
    _train_lm_args,
    _run_train_lm,
)
