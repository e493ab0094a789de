"""``security train`` (the SecurityLingua compressor), ``security extract`` (intentions of texts)
and ``security eval`` (extraction quality on the held-out pairs)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from jaxlab.cli._common import Command, add_overwrite_arg, add_parser, check_outputs
from jaxlab.errors import UserError

__all__ = ["COMMAND"]


def _run(args):
    {"train": _train, "extract": _extract, "eval": _eval}[args.security_command](args)


def _out_dir(args) -> Path:
    from jaxlab.security import default_compressor_dir

    return Path(args.out) if args.out else default_compressor_dir()


def _train(args):
    from jaxlab.security.compressor import CompressorConfig, train_compressor
    from jaxlab.security.data import SecurityDataConfig, build_dataset, save_pairs

    out = _out_dir(args)
    check_outputs(args, out / "compressor.json")
    data_cfg = SecurityDataConfig(per_template=args.per_template, seed=args.seed)
    cfg = CompressorConfig(
        encoder=args.encoder,
        max_length=args.max_length,
        batch_size=args.batch_size,
        epochs=args.epochs,
        max_steps=args.max_steps,
        lr=args.lr,
        seed=args.seed,
        data=data_cfg,
    )
    data = build_dataset(data_cfg)
    r = data.report
    print(
        f"pairs: {r['filter']['before']} drawn, {r['filter']['after']} after the P{data_cfg.percentile:g} "
        f"filter ({r['train']['pairs']} train, {r['val']['pairs']} val); test {r['test']['pairs']} "
        f"pairs from {r['families']['test']} held-out families ({r['config']['lemmatizer']} lemmas)"
    )
    train_compressor(cfg, out, data=data, progress=not args.quiet)
    out.mkdir(parents=True, exist_ok=True)
    for split in ("train", "val", "test"):
        save_pairs(getattr(data, split), out / f"pairs_{split}.jsonl")
    print(f"wrote the labelled pairs to {out}/pairs_{{train,val,test}}.jsonl")


def _extract(args):
    from jaxlab.security import extract_intention

    texts = list(args.texts)
    if args.file:
        path = Path(args.file)
        if not path.is_file():
            raise UserError(f"--file {path}: no such file")
        texts += [json.loads(line)["text"] for line in path.read_text().splitlines() if line]
    if not texts:
        texts = [sys.stdin.read()]
    for t in extract_intention(texts, compressor=args.compressor, rate=args.rate):
        print(t)


def _eval(args):
    from jaxlab.security import default_compressor_dir
    from jaxlab.security.compressor import Compressor, extraction_scores
    from jaxlab.security.data import load_pairs

    directory = Path(args.compressor) if args.compressor else default_compressor_dir()
    comp = Compressor.load(directory)
    test_file = directory / "pairs_test.jsonl"
    if not test_file.is_file():
        raise UserError(f"{test_file}: missing (security train writes it beside the model)")
    pairs = load_pairs(test_file)[: args.limit or None]
    report = {"threshold_0.5": extraction_scores(comp, pairs, threshold=0.5)}
    for rate in args.rates:
        report[f"rate_{rate:g}"] = extraction_scores(comp, pairs, rate=rate)
    for mode, s in report.items():
        print(
            f"{mode:>14}: word F1 {s['f1']:.3f} (P {s['precision']:.3f}, R {s['recall']:.3f}), "
            f"per-pair F1 {s['f1_per_pair_mean']:.3f}, request-word F1 {s['request_f1']:.3f}, "
            f"kept {s['compression_rate']:.3f} of words "
            f"(labels keep {s['label_rate']:.3f}), {s['pairs']} held-out pairs"
        )
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))
        print(f"wrote {args.out}")


def _args(p):
    sub = p.add_subparsers(dest="security_command", metavar="SECURITY_COMMAND", required=True)
    t = add_parser(sub, "train", "train the intention-extracting compressor on jailbreak pairs")
    t.add_argument("--out", default=None, help="folder to write (default: the cache's)")
    t.add_argument("--encoder", default="all-minilm-l6-v2", help="registered BERT-style encoder")
    t.add_argument("--max-length", type=int, default=128, help="tokens per chunk")
    t.add_argument("--batch-size", type=int, default=16, help="chunks per update")
    t.add_argument("--epochs", type=float, default=1.0, help="passes over the training chunks")
    t.add_argument("--max-steps", type=int, default=None, help="stop after N updates")
    t.add_argument("--lr", type=float, default=5e-5, help="peak learning rate")
    t.add_argument("--per-template", type=int, default=3, help="requests per training template")
    t.add_argument("--seed", type=int, default=0, help="seed of the splits, draws and init")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    add_overwrite_arg(t)
    x = add_parser(sub, "extract", "print the extracted intention of each text")
    x.add_argument("texts", nargs="*", help="texts (default: one read from stdin)")
    x.add_argument("--file", help='JSON lines with a "text" field')
    x.add_argument("--compressor", default=None, help="trained compressor folder")
    x.add_argument(
        "--rate", type=float, default=None, help="keep this share of words (default: p > 0.5)"
    )
    e = add_parser(sub, "eval", "word F1 and compression rate on the held-out pairs")
    e.add_argument("--compressor", default=None, help="trained compressor folder")
    e.add_argument(
        "--rates", type=float, nargs="*", default=[0.1], help="also score rate-based keeping"
    )
    e.add_argument("--limit", type=int, default=0, help="score the first N pairs (0: all)")
    e.add_argument("--out", default=None, help="write the scores as JSON")


COMMAND = Command(
    "security",
    "SecurityLingua: `security train` the compressor, `security extract` intentions, "
    "`security eval` it",
    _args,
    _run,
)
