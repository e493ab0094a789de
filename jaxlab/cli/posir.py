"""``posir build`` (a position-controlled dataset) and ``posir eval`` (an encoder on it)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from jaxlab.cli._common import (
    Command,
    add_overwrite_arg,
    add_parser,
    check_outputs,
    non_negative_int,
    positive_int,
    registry_option,
)
from jaxlab.errors import UserError

__all__ = ["COMMAND"]


def _run_posir(args):
    {"build": _build, "eval": _eval}[args.posir_command](args)


def _build(args):
    import numpy as np

    from jaxlab.models import from_pretrained
    from jaxlab.retrieval import (
        DEFAULT_LENGTHS,
        build_posir,
        builtin_dataset,
        read_filler,
        read_items,
        save_posir,
    )

    check_outputs(args, args.out, kind="dir")
    if args.items and not args.documents:
        raise UserError("posir build --items needs --documents (text files of filler)")
    if args.items:  # a user's (query, evidence) pairs and filler documents, read before the model
        items, filler = read_items(args.items), read_filler(args.documents)
    _, tokenizer = from_pretrained(args.tokenizer_model)
    lengths = DEFAULT_LENGTHS[: args.buckets]
    if args.items:
        data = build_posir(items, filler, tokenizer, lengths=lengths, seed=args.seed)
    else:
        data = builtin_dataset(args.queries, tokenizer, seed=args.seed, lengths=lengths)
    out = save_posir(data, args.out)
    counts = np.bincount(np.searchsorted([512, 1024, 1536], data.doc_token_lengths), minlength=4)
    print(
        f"wrote {out}: {len(data)} queries, {len(data.corpus_ids)} documents; "
        f"per bucket Q1..Q4: {counts.tolist()}"
    )


def _eval(args):
    from jaxlab.models import from_pretrained
    from jaxlab.retrieval import find_datasets, load_posir

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a folder")
    folders = find_datasets(args.data)
    names = {f: "_".join(f.relative_to(Path(args.data)).parts) or "posir" for f in folders}
    exts = [".json", ".png"] + ([".run", ".qrels"] if args.trec else [])
    outputs = [out / f"{n}{ext}" for n in names.values() for ext in exts]
    if args.mteb:
        outputs += [_mteb_path(out, args.model, n) for n in names.values()]
    check_outputs(args, *outputs)
    datasets = {folder: load_posir(folder) for folder in folders}  # all checked before the model
    model, tokenizer = from_pretrained(args.model)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        _eval_folders(args, datasets, names, out, model, tokenizer)
    except BaseException:
        if created and not any(out.iterdir()):  # a failed run leaves no empty output folder
            out.rmdir()
        raise


def _model_name(model: str) -> str:
    """A registered name as it is; a path by its folder or file name."""
    return Path(model).name if ("/" in model and Path(model).exists()) else model


def _task_name(name: str) -> str:
    return "PosIR" if name == "posir" else f"PosIR_{name}"


def _mteb_path(out: Path, model: str, name: str) -> Path:
    return (
        out
        / "mteb"
        / _model_name(model).replace("/", "__")
        / "no_revision_available"
        / (f"{_task_name(name)}.json")
    )


def _eval_folders(args, datasets, names, out, model, tokenizer):
    from jaxlab.retrieval import evaluate_posir, plot_report, saliency_profile
    from jaxlab.retrieval.trec import (
        mteb_result,
        write_mteb_result,
        write_trec_qrels,
        write_trec_run,
    )

    for folder, data in datasets.items():
        t0 = time.perf_counter()
        report, run = evaluate_posir(
            data,
            model,
            tokenizer,
            strategy=args.strategy,
            max_length=args.max_length,
            batch_size=args.batch_size,
            progress=not args.quiet,
            return_run=True,
        )
        report.update(model=args.model, data=str(folder), seconds=time.perf_counter() - t0)
        sal = None
        if args.saliency:
            sal = saliency_profile(
                data, model, tokenizer, max_examples=args.saliency, max_length=args.max_length
            )
            report["saliency"] = sal
        name = names[folder]
        (out / f"{name}.json").write_text(json.dumps(report, indent=1))
        plot_report(report, out / f"{name}.png", sal)
        print(
            f"{folder}: {len(data)} queries, nDCG@10 {report['ndcg@10']:.3f}, "
            f"recall@10 {report['recall@10']:.3f}, PSI {report['psi']:.3f} "
            f"({args.strategy}, {report['seconds']:.1f} s)"
        )
        for bucket, b in report["analysis"]["buckets"].items():
            print(
                f"  {bucket}: n={b['n']:4d} nDCG@10 {b['ndcg@10']:.3f} PSI {b['psi']:.3f} "
                f"slope {b['slope']:+.3f} spearman {b['spearman']:+.2f}"
                + (" (sparse bins)" if bucket in report["analysis"]["sparse_buckets"] else "")
            )
        print(f"  wrote {out / (name + '.json')} and {out / (name + '.png')}")
        if args.trec:
            run_path = write_trec_run(out / f"{name}.run", run, tag=_model_name(args.model))
            qrels_path = write_trec_qrels(out / f"{name}.qrels", data.qrels)
            print(f"  wrote {run_path} and {qrels_path} (TREC run and qrels)")
        if args.mteb:
            result = mteb_result(
                {
                    "ndcg_at_10": report["ndcg@10"],
                    "recall_at_10": report["recall@10"],
                    "recall_at_100": report["recall@100"],
                },
                task_name=_task_name(name),
                evaluation_time=report["seconds"],
            )
            path = write_mteb_result(out / "mteb", result, model_name=_model_name(args.model))
            print(f"  wrote {path} (mteb results)")


def _posir_args(p):
    sub = p.add_subparsers(dest="posir_command", metavar="POSIR_COMMAND", required=True)
    b = add_parser(sub, "build", "write a position-controlled dataset in PosIR's layout")
    b.add_argument("--out", required=True, help="dataset folder to write")
    b.add_argument(
        "--queries", type=positive_int, default=200, help="built-in corpus: number of queries"
    )
    b.add_argument(
        "--buckets",
        type=int,
        default=4,
        choices=(1, 2, 3, 4),
        help="use the first N length buckets (Q1..Q4)",
    )
    b.add_argument("--seed", type=int, default=0, help="seed of lengths and positions")
    b.add_argument(
        "--items", help="JSONL of {query, evidence} pairs (instead of the built-in corpus)"
    )
    b.add_argument("--documents", nargs="*", help="text files whose sentences are the filler")
    b.add_argument(
        "--tokenizer-model",
        default="all-minilm-l6-v2",
        help="model whose tokenizer measures document lengths",
    )
    add_overwrite_arg(b)
    e = add_parser(sub, "eval", "evaluate an encoder on PosIR dataset(s)")
    e.add_argument("--model", default="all-minilm-l6-v2", help="registered name or HF dir")
    e.add_argument("--data", required=True, help="a dataset folder or a collection of them")
    e.add_argument("--out", required=True, help="folder for JSON reports and plots")
    registry_option(
        e,
        "--strategy",
        "jaxlab.retrieval.evaluate:STRATEGIES",
        default="chunk_max",
        help="how documents longer than the encoder's limit are embedded",
    )
    e.add_argument(
        "--max-length",
        type=positive_int,
        default=None,
        help="encoder window (default: the model's)",
    )
    e.add_argument("--batch-size", type=positive_int, default=32, help="texts per encoder call")
    e.add_argument(
        "--saliency",
        type=non_negative_int,
        default=0,
        metavar="N",
        help="also compute the gradient saliency profile over N examples",
    )
    e.add_argument(
        "--trec",
        action="store_true",
        help="also write <name>.run and <name>.qrels (TREC format, for trec_eval / ir_measures)",
    )
    e.add_argument(
        "--mteb",
        action="store_true",
        help="also write mteb/<model>/no_revision_available/PosIR*.json in mteb's results layout",
    )
    e.add_argument("--quiet", action="store_true", help="no progress report")
    add_overwrite_arg(e)


COMMAND = Command(
    "posir",
    "position-aware retrieval: `posir build` a dataset, `posir eval` an encoder on it",
    _posir_args,
    _run_posir,
)
