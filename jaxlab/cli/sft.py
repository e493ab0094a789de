"""``sft CONFIG``: supervised fine-tuning of a chat model on assistant tokens (:mod:`jaxlab.sft`)."""

from __future__ import annotations

import json

from jaxlab.cli._common import Command

__all__ = ["COMMAND"]


def _run_sft(args):
    from jaxlab.config import load_config
    from jaxlab.sft import SFTConfig, train_sft

    cfg = load_config(args.config, args.overrides, cls=SFTConfig)
    metrics = train_sft(cfg, args.workdir, progress=not args.quiet)
    print(json.dumps(metrics))


def _sft_args(p):
    p.add_argument("config", help="an sft YAML config, e.g. configs/sft_smollm2_arith.yaml")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config value, e.g. --set data.path=traces.jsonl (repeatable)",
    )
    p.add_argument(
        "--workdir",
        required=True,
        help="metrics.jsonl, checkpoints/ and the exported model/ go here; resumes if present",
    )
    p.add_argument("--quiet", action="store_true", help="no progress report")


COMMAND = Command(
    "sft",
    "supervised fine-tuning of a chat model (loss on assistant tokens, packing, Orbax)",
    _sft_args,
    _run_sft,
)
