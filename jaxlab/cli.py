"""``python -m jaxlab <command>``: one CLI, a subcommand per area, ``--help`` everywhere.

Commands import their area lazily, so ``--help`` is fast and a command only pays for what it uses.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Callable

__all__ = ["main", "build_parser"]


@dataclasses.dataclass(frozen=True)
class Command:
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], None]


def _add_config_args(p: argparse.ArgumentParser, default: str | None) -> None:
    p.add_argument("--config", default=default, help=f"YAML config file (default: {default})")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config value, e.g. --set train.lr=1e-5 (repeatable)",
    )


def _require_decoder(model, name):
    from jaxlab.models import Decoder

    if not isinstance(model, Decoder):
        raise TypeError(
            f"{name} is a {type(model).__name__}, not a decoder LM; this command needs a decoder"
        )


def _resolve_config(path: str | None) -> str | None:
    """A config path as given, or else relative to the jaxlab checkout (configs/ is not installed)."""
    from pathlib import Path

    if path is None or Path(path).exists():
        return path
    beside = Path(__file__).resolve().parents[1] / path
    return str(beside) if beside.exists() else path


# -- demo --------------------------------------------------------------------------------------------


def _run_demo(args):
    import jax

    from jaxlab.generation import generate
    from jaxlab.models import from_pretrained

    print(f"jaxlab demo on {jax.default_backend()} ({jax.device_count()} device(s))")
    t0 = time.perf_counter()
    model, tokenizer = from_pretrained(args.model)
    load_s = time.perf_counter() - t0
    _require_decoder(model, args.model)
    cfg = model.config
    print(
        f"loaded {args.model}: {cfg.num_layers} layers, width {cfg.hidden_size}, "
        f"{cfg.num_heads}/{cfg.num_kv_heads} heads, vocab {cfg.vocab_size} in {load_s:.1f} s"
    )
    print(f"\nuser: {args.question}")
    t0 = time.perf_counter()
    out = generate(model, tokenizer, [args.question], max_new_tokens=args.max_new_tokens, chat=True)
    first_s = time.perf_counter() - t0
    t0 = time.perf_counter()  # again, now compiled: the steady-state speed
    out = generate(model, tokenizer, [args.question], max_new_tokens=args.max_new_tokens, chat=True)
    gen_s = time.perf_counter() - t0
    n = int(out.lengths[0])
    print(f"assistant: {out.texts[0].strip()}\n")
    print(
        f"{n} tokens ({out.finish_reasons[0]}); first call {first_s:.1f} s including compilation, "
        f"then {gen_s:.2f} s = {n / gen_s:.1f} tokens/s (greedy, batch 1, float32)"
    )
    if not args.skip_rl:
        _demo_rl()
    if not args.skip_posir:
        _demo_posir()
    if not args.skip_sky:
        _demo_sky()


def _demo_posir():
    """PosIR on the built-in corpus (short documents): nDCG@10 of MiniLM by evidence position."""
    import numpy as np

    from jaxlab.models import from_pretrained
    from jaxlab.retrieval import builtin_dataset, evaluate_posir

    model, tokenizer = from_pretrained("all-minilm-l6-v2")
    data = builtin_dataset(80, tokenizer, seed=0, lengths=((128, 512),))
    t0 = time.perf_counter()
    rep = evaluate_posir(data, model, tokenizer, strategy="truncate")
    thirds = np.array_split(np.argsort(data.relative_positions), 3)
    ndcg = np.asarray(rep["per_query"]["ndcg@10"])
    print(
        f"\nPosIR (built-in corpus, {len(data)} queries, all-MiniLM-L6-v2): nDCG@10 "
        f"{rep['ndcg@10']:.3f}, recall@10 {rep['recall@10']:.3f} in {time.perf_counter() - t0:.1f} s"
    )
    print(
        "  evidence in the first / middle / last third: "
        + " / ".join(f"{ndcg[t].mean():.3f}" for t in thirds)
    )


def _demo_sky():
    """Simulate a LAMOST plate, subtract its sky with Super Sky and with a quickly trained SMI."""
    from jaxlab.sky import SMIConfig, evaluate_sky, simulate_plate, smi_sky, super_sky, train_smi

    t0 = time.perf_counter()
    plate = simulate_plate(0)
    train = [simulate_plate(1000 + i) for i in range(16)]
    model, history = train_smi(
        train, SMIConfig(steps_shift=100, steps_shared=80, steps_individual=80), progress=False
    )
    print(
        f"\nsky: simulated {plate.n_fibers}-fibre plate ({int(plate.is_sky.sum())} sky fibres, "
        f"{plate.meta['SKYSRC']} night sky); SMI trained on 16 plates in {history['seconds']:.0f} s"
    )
    for name, sky in (("Super Sky", super_sky(plate)), ("SMI", smi_sky(model, plate))):
        rep = evaluate_sky(plate, sky)
        err, chi2 = rep["sky_error_pct"], rep["chi2_per_pixel"]["all"]
        print(
            f"  {name:9s} sky error vs truth: blue {err['blue']:.2f} %, all {err['all']:.2f} %; chi2/pixel {chi2:.3f}"
        )
    print(
        f"  ({time.perf_counter() - t0:.0f} s; `python -m jaxlab sky --help` for simulate / train / subtract / evaluate)"
    )


def _demo_rl():
    """A short RL run of both schedulers on a tiny character-level model: bubble ratio and reward."""
    import tempfile

    from jaxlab.config import load_config
    from jaxlab.rl.trainer import train_rl

    print("\nRL on a tiny model (toy_digits task), sync vs SortedRL rollouts:")
    rows = []
    for name in ("sync", "sorted"):
        cfg = load_config(
            _resolve_config(f"configs/rl/tiny_{name}.yaml"), ["scheduler.num_prompts=32"]
        )
        with tempfile.TemporaryDirectory() as tmp:
            rows.append((name, train_rl(cfg, tmp, progress=False)))
    print(
        f"{'scheduler':10s} {'bubble ratio':>13s} {'reward first/last quarter':>27s} {'updates':>8s}"
    )
    for name, s in rows:
        print(
            f"{name:10s} {s['bubble_ratio']:13.2f} {s['reward_first_quarter']:13.3f} -> "
            f"{s['reward_last_quarter']:.3f} {s['updates']:8d}"
        )


def _demo_args(p):
    p.add_argument(
        "--model", default="smollm2-135m-instruct", help="registered name, .gguf file or HF dir"
    )
    p.add_argument("--question", default="What is the capital of France?")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--skip-rl", action="store_true", help="skip the short RL run on a tiny model")
    p.add_argument("--skip-posir", action="store_true", help="skip the short PosIR evaluation")
    p.add_argument("--skip-sky", action="store_true", help="skip the short sky-subtraction step")


# -- config ------------------------------------------------------------------------------------------


def _run_config(args):
    import yaml

    import jaxlab.rl.trainer  # noqa: F401  (registers config kinds)
    import jaxlab.train  # noqa: F401
    from jaxlab.config import config_kinds, load_config, to_dict

    if args.action == "kinds":
        for kind, cls in sorted(config_kinds().items()):
            print(f"{kind}: {cls.__module__}.{cls.__name__}")
        return
    if args.config is None:
        raise ValueError("config show needs --config FILE")
    cfg = load_config(_resolve_config(args.config), args.overrides)
    kind = next(k for k, c in config_kinds().items() if isinstance(cfg, c))
    print(yaml.safe_dump({"kind": kind, **to_dict(cfg)}, sort_keys=False), end="")


def _config_args(p):
    p.add_argument(
        "action",
        choices=["show", "kinds"],
        help="show: print the resolved config; kinds: list them",
    )
    _add_config_args(p, None)


# -- train-lm ----------------------------------------------------------------------------------------


def _run_train_lm(args):
    from jaxlab.config import load_config
    from jaxlab.train import LMTrainConfig, train_lm

    cfg = load_config(_resolve_config(args.config), args.overrides, cls=LMTrainConfig)
    metrics = train_lm(cfg, args.workdir, progress=not args.quiet)
    print(json.dumps(metrics))


def _train_lm_args(p):
    _add_config_args(p, "configs/lm_tiny.yaml")
    p.add_argument(
        "--workdir",
        required=True,
        help="metrics.jsonl and checkpoints/ go here; resumes if present",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")


# -- generate ----------------------------------------------------------------------------------------


def _run_generate(args):
    from jaxlab.generation import generate
    from jaxlab.models import from_pretrained

    model, tokenizer = from_pretrained(args.model)
    _require_decoder(model, args.model)
    out = generate(
        model,
        tokenizer,
        args.prompt,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        chat=args.chat,
    )
    for text in out.texts:
        print(text)


def _generate_args(p):
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument(
        "--prompt", action="append", required=True, help="a prompt (repeatable: one batch)"
    )
    p.add_argument("--chat", action="store_true", help="render prompts with the chat template")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)


# -- chat --------------------------------------------------------------------------------------------


def _run_chat(args):
    from jaxlab.generation import generate
    from jaxlab.models import from_pretrained

    model, tokenizer = from_pretrained(args.model)
    _require_decoder(model, args.model)
    if tokenizer is None:
        raise ValueError(f"{args.model} has no tokenizer to chat with")
    messages = [{"role": "system", "content": args.system}] if args.system else []
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"chatting with {args.model}; an empty line or Ctrl-D ends the chat")
    while True:
        try:
            line = input("you: " if interactive else "")
        except EOFError:
            break
        if not line.strip():
            if interactive:
                break
            continue
        messages.append({"role": "user", "content": line})
        print("assistant: ", end="", flush=True)
        out = generate(
            model,
            tokenizer,
            [messages],
            max_new_tokens=args.max_new_tokens,
            chat=True,
            temperature=args.temperature,
            top_p=args.top_p,
            seed=args.seed + len(messages),
            stream=lambda text: print(text, end="", flush=True),
        )
        print(flush=True)
        messages.append({"role": "assistant", "content": out.texts[0].strip()})


def _chat_args(p):
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument(
        "--system", default=None, help="a system prompt (default: the chat template's own)"
    )
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)


# -- rl ----------------------------------------------------------------------------------------------


def _run_rl(args):
    if args.rl_command == "simulate":
        return _run_rl_simulate(args)
    if args.rl_command == "train":
        return _run_rl_train(args)
    raise ValueError(f"unknown rl command {args.rl_command!r}")


def _run_rl_simulate(args):
    from jaxlab.rl.scheduling import SchedulerConfig
    from jaxlab.rl.simulate import length_sampler, simulate

    cfg = SchedulerConfig(
        scheduler=args.scheduler,
        group_size=args.group_size,
        update_groups=args.update_groups,
        rollout_groups=args.rollout_groups
        or max(args.update_groups, -(-args.slots // args.group_size) * 2),
        max_staleness=args.max_staleness,
        num_prompts=args.prompts,
    )
    result = simulate(
        cfg,
        slots=args.slots,
        lengths=length_sampler(args.lengths),
        seed=args.seed,
        update_cost=args.update_cost,
    )
    summary = {
        "config": dataclasses.asdict(cfg),
        "slots": args.slots,
        "lengths": args.lengths,
        **result.summary(),
    }
    for key in (
        "bubble_ratio",
        "rollout_bubble_ratio",
        "useful_ratio",
        "max_staleness",
        "throughput",
        "total_steps",
        "updates",
        "wasted_tokens",
    ):
        value = summary[key]
        print(f"{key:22s} {value:.4f}" if isinstance(value, float) else f"{key:22s} {value}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)
    if args.plot:
        _plot_occupancy(
            result.occupancy, args.plot, f"{args.scheduler}: bubble ratio {result.bubble_ratio:.2f}"
        )


def _run_rl_train(args):
    from jaxlab.config import load_config
    from jaxlab.rl.trainer import RLTrainConfig, train_rl

    cfg = load_config(_resolve_config(args.config), args.overrides, cls=RLTrainConfig)
    summary = train_rl(cfg, args.workdir, progress=not args.quiet)
    print(json.dumps(summary, indent=2))


def _plot_occupancy(occupancy, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3))
    ax.plot(occupancy, lw=0.6)
    ax.set_xlabel("decode step")
    ax.set_ylabel("slot occupancy")
    ax.set_ylim(0, 1.05)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _rl_args(p):
    sub = p.add_subparsers(dest="rl_command", metavar="RL_COMMAND", required=True)
    sim = sub.add_parser(
        "simulate",
        help="discrete-event simulation of rollout scheduling (bubble ratio)",
        description="Runs the real rollout controller against simulated generation and prints the bubble "
        "ratio, staleness and throughput.",
    )
    sim.add_argument("--scheduler", choices=["sync", "sorted"], default="sorted")
    sim.add_argument(
        "--lengths",
        default="lognormal:6.2,1.0",
        help="lognormal:MU,SIGMA | bimodal:SHORT,LONG,P_LONG | fixed:N | uniform:LO,HI | file:PATH",
    )
    sim.add_argument("--prompts", type=int, default=256)
    sim.add_argument("--group-size", type=int, default=8)
    sim.add_argument("--slots", type=int, default=64)
    sim.add_argument(
        "--update-groups",
        type=int,
        default=4,
        help="sorted: complete groups that trigger an update",
    )
    sim.add_argument(
        "--rollout-groups",
        type=int,
        default=None,
        help="groups admitted and not yet trained (sync: the batch); default 2 x slots / G",
    )
    sim.add_argument("--max-staleness", type=int, default=1)
    sim.add_argument(
        "--update-cost", type=float, default=0.0, help="decode steps per trained token of an update"
    )
    sim.add_argument("--seed", type=int, default=0)
    sim.add_argument("--json", default=None, help="write the results here")
    sim.add_argument("--plot", default=None, help="write a slot-occupancy timeline PNG here")
    train = sub.add_parser(
        "train",
        help="RL training with the sync or SortedRL scheduler (configs/rl/*.yaml)",
        description="Trains a policy on a verifiable task; writes metrics.jsonl, timeline.png and summary.json.",
    )
    train.add_argument("config", help="an rl_train YAML config, e.g. configs/rl/tiny_sorted.yaml")
    train.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config value, e.g. --set scheduler.max_staleness=2 (repeatable)",
    )
    train.add_argument("--workdir", required=True, help="outputs go here")
    train.add_argument("--quiet", action="store_true", help="no progress bar")


# -- embed -------------------------------------------------------------------------------------------


def _run_embed(args):
    import numpy as np

    from jaxlab.models import encode, from_pretrained

    model, tokenizer = from_pretrained(args.model)
    emb = encode(model, tokenizer, args.text, batch_size=args.batch_size)
    np.set_printoptions(precision=4, suppress=True)
    for text, e in zip(args.text, emb):
        print(f"{text!r}: dim {e.shape[0]}, |e| = {np.linalg.norm(e):.4f}, first 4 = {e[:4]}")
    if len(args.text) > 1:
        print("cosine similarities:")
        print(emb @ emb.T)


def _embed_args(p):
    p.add_argument("--model", default="all-minilm-l6-v2")
    p.add_argument("--text", action="append", required=True, help="a text (repeatable)")
    p.add_argument("--batch-size", type=int, default=32)


# -- posir -------------------------------------------------------------------------------------------


def _run_posir(args):
    from jaxlab.models import from_pretrained
    from jaxlab.retrieval import PosIRError

    try:
        if args.posir_command == "build":
            _posir_build(args, from_pretrained)
        else:
            _posir_eval(args, from_pretrained)
    except PosIRError as e:
        raise ValueError(str(e)) from None


def _posir_build(args, from_pretrained):
    from pathlib import Path

    import numpy as np

    from jaxlab.retrieval import (
        DEFAULT_LENGTHS,
        build_posir,
        builtin_dataset,
        save_posir,
        split_sentences,
    )

    _, tokenizer = from_pretrained(args.tokenizer_model)
    lengths = DEFAULT_LENGTHS[: args.buckets]
    if args.items:  # a user's (query, evidence) pairs and filler documents
        import json

        items = []
        for n, line in enumerate(Path(args.items).read_text().splitlines()):
            if line.strip():
                row = json.loads(line)
                if not {"query", "evidence"} <= set(row):
                    raise ValueError(f"{args.items}:{n + 1}: needs keys 'query' and 'evidence'")
                items.append((row["query"], row["evidence"]))
        if not args.documents:
            raise ValueError("posir build --items needs --documents (text files of filler)")
        filler = [s for f in args.documents for s in split_sentences(Path(f).read_text())]
        data = build_posir(items, filler, tokenizer, lengths=lengths, seed=args.seed)
    else:
        data = builtin_dataset(args.queries, tokenizer, seed=args.seed, lengths=lengths)
    out = save_posir(data, args.out)
    counts = np.bincount(np.searchsorted([512, 1024, 1536], data.doc_token_lengths), minlength=4)
    print(
        f"wrote {out}: {len(data)} queries, {len(data.corpus_ids)} documents; "
        f"per bucket Q1..Q4: {counts.tolist()}"
    )


def _posir_eval(args, from_pretrained):
    import json
    from pathlib import Path

    from jaxlab.retrieval import (
        evaluate_posir,
        find_datasets,
        load_posir,
        plot_report,
        saliency_profile,
    )

    model, tokenizer = from_pretrained(args.model)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for folder in find_datasets(args.data):
        data = load_posir(folder)
        t0 = time.perf_counter()
        report = evaluate_posir(
            data,
            model,
            tokenizer,
            strategy=args.strategy,
            max_length=args.max_length,
            batch_size=args.batch_size,
            progress=args.progress,
        )
        report.update(model=args.model, data=str(folder), seconds=time.perf_counter() - t0)
        sal = None
        if args.saliency:
            sal = saliency_profile(
                data, model, tokenizer, max_examples=args.saliency, max_length=args.max_length
            )
            report["saliency"] = sal
        name = "_".join(folder.relative_to(Path(args.data)).parts) or "posir"
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
            )
        print(f"  wrote {out / (name + '.json')} and {out / (name + '.png')}")


def _posir_args(p):
    sub = p.add_subparsers(dest="posir_command", metavar="POSIR_COMMAND", required=True)
    b = sub.add_parser("build", help="write a position-controlled dataset in PosIR's layout")
    b.add_argument("--out", required=True, help="dataset folder to write")
    b.add_argument("--queries", type=int, default=200, help="built-in corpus: number of queries")
    b.add_argument(
        "--buckets",
        type=int,
        default=4,
        choices=(1, 2, 3, 4),
        help="use the first N length buckets (Q1..Q4)",
    )
    b.add_argument("--seed", type=int, default=0)
    b.add_argument(
        "--items", help="JSONL of {query, evidence} pairs (instead of the built-in corpus)"
    )
    b.add_argument("--documents", nargs="*", help="text files whose sentences are the filler")
    b.add_argument(
        "--tokenizer-model",
        default="all-minilm-l6-v2",
        help="model whose tokenizer measures document lengths",
    )
    e = sub.add_parser("eval", help="evaluate an encoder on PosIR dataset(s)")
    e.add_argument("--model", default="all-minilm-l6-v2")
    e.add_argument("--data", required=True, help="a dataset folder or a collection of them")
    e.add_argument("--out", required=True, help="folder for JSON reports and plots")
    e.add_argument(
        "--strategy", default="chunk_max", choices=("truncate", "chunk_max", "chunk_mean")
    )
    e.add_argument("--max-length", type=int, default=None)
    e.add_argument("--batch-size", type=int, default=32)
    e.add_argument(
        "--saliency",
        type=int,
        default=0,
        metavar="N",
        help="also compute the gradient saliency profile over N examples",
    )
    e.add_argument("--progress", action="store_true")


# -- sky ---------------------------------------------------------------------------------------------


def _run_sky(args):
    {
        "simulate": _sky_simulate,
        "train": _sky_train,
        "subtract": _sky_subtract,
        "evaluate": _sky_evaluate,
    }[args.sky_command](args)


def _sky_simulate(args):
    from jaxlab.sky import simulate_plate, write_plate

    t0 = time.perf_counter()
    plate = simulate_plate(args.seed, n_fibers=args.fibers, n_sky=args.sky_fibers)
    write_plate(plate, args.out, overwrite=args.overwrite)
    print(
        f"wrote {args.out}: {plate.n_fibers} fibres ({int(plate.is_sky.sum())} sky) x {plate.n_pix} pixels, "
        f"{plate.wavelength[0]:.0f}-{plate.wavelength[-1]:.0f} Å, sky source {plate.meta['SKYSRC']}, "
        f"moon {plate.meta['MOON']:.2f} x dark continuum ({time.perf_counter() - t0:.1f} s)"
    )


def _smi_train_plates(n: int, seed: int, like):
    from jaxlab.sky import simulate_plate

    return [
        simulate_plate(
            seed + i,
            n_fibers=like.n_fibers if like else 250,
            n_sky=like.is_sky.sum() if like else 20,
        )
        for i in range(n)
    ]


def _sky_train(args):
    from jaxlab.sky import SMIConfig, read_plate, save_smi, train_smi

    t0 = time.perf_counter()
    if args.plates:
        plates = [read_plate(p) for p in args.plates]
        print(f"training SMI on {len(plates)} plate file(s)")
    else:
        print(
            f"simulating {args.simulate} training plates (seeds {args.seed}..{args.seed + args.simulate - 1})"
        )
        plates = _smi_train_plates(args.simulate, args.seed, None)
    config = SMIConfig(steps_shift=args.steps, steps_shared=args.steps, steps_individual=args.steps)
    model, history = train_smi(plates, config, progress=True, log=print)
    save_smi(model, args.out, history)
    print(
        f"saved the SMI model to {args.out} (training {history['seconds']:.1f} s, total {time.perf_counter() - t0:.1f} s)"
    )


def _sky_subtract(args):
    from jaxlab.sky import load_smi, pca_clean, read_plate, smi_sky, super_sky, write_plate

    plate = read_plate(args.plate)
    t0 = time.perf_counter()
    if args.method == "supersky":
        sky = super_sky(plate)
    elif args.method == "pca":
        sky = pca_clean(plate)
    else:
        if args.model:
            model = load_smi(args.model)
        else:
            from jaxlab.sky import SMIConfig, train_smi

            print(
                f"no --model: training SMI on {args.train_plates} simulated plates first (see `sky train`)"
            )
            plates = _smi_train_plates(args.train_plates, 10_000, plate)
            steps = args.train_steps
            model, history = train_smi(
                plates,
                SMIConfig(steps_shift=steps, steps_shared=steps, steps_individual=steps),
                log=print,
            )
            print(f"trained in {history['seconds']:.1f} s")
            t0 = time.perf_counter()
        sky = smi_sky(model, plate)
    seconds = time.perf_counter() - t0
    out = plate.with_sky(sky, args.method)
    write_plate(out, args.out, overwrite=args.overwrite)
    print(
        f"{args.method}: sky of {plate.n_fibers} fibres in {seconds:.2f} s -> {args.out} (SKY, SKYSUB)"
    )


def _sky_evaluate(args):
    from jaxlab.sky import evaluate_sky, read_plate
    from jaxlab.sky.plots import plot_sky

    reports = {}
    for path in args.plates:
        plate = read_plate(path)
        rep = evaluate_sky(plate)
        rep["method"] = plate.meta.get("SKYMETH", "?")
        reports[path] = rep
        print(
            f"{path} [{rep['method']}]"
            + ("" if rep["has_truth"] else " (no truth: sky fibres only)")
        )
        for key in (
            "sky_error_pct",
            "sky_rms_error_pct",
            "chi2_per_pixel",
            "line_residual_pct",
            "continuum_residual_pct",
        ):
            if key in rep:
                v = rep[key]
                print(
                    f"  {key:24s} blue {v['blue']:7.3f}  red {v['red']:7.3f}  all {v['all']:7.3f}"
                )
        if args.plot:
            target = (
                args.plot
                if len(args.plates) == 1
                else args.plot.replace(".png", f"_{len(reports)}.png")
            )
            plot_sky(plate, target)
            print(f"  plot: {target}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(reports if len(reports) > 1 else next(iter(reports.values())), f, indent=2)
        print(f"metrics: {args.json}")


def _sky_args(p):
    sub = p.add_subparsers(
        dest="sky_command", metavar="{simulate,train,subtract,evaluate}", required=True
    )
    s = sub.add_parser("simulate", help="write a simulated LAMOST-like plate with truth layers")
    s.add_argument("--out", required=True, help="plate FITS file to write (docs/sky_format.md)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--fibers", type=int, default=250)
    s.add_argument("--sky-fibers", type=int, default=20)
    s.add_argument("--overwrite", action="store_true")
    t = sub.add_parser("train", help="train an SMI model (on plate files, or on simulated plates)")
    t.add_argument("--out", required=True, help="directory for the Orbax checkpoint")
    t.add_argument("--plates", nargs="*", help="training plate FITS files (default: simulate)")
    t.add_argument("--simulate", type=int, default=24, help="number of simulated training plates")
    t.add_argument("--seed", type=int, default=1000)
    t.add_argument("--steps", type=int, default=300, help="optimizer steps per training stage")
    u = sub.add_parser("subtract", help="estimate every fibre's sky; write SKY and SKYSUB")
    u.add_argument("plate")
    u.add_argument("--method", choices=("supersky", "pca", "smi"), default="supersky")
    u.add_argument("--out", required=True)
    u.add_argument("--model", help="SMI model directory from `sky train` (smi only)")
    u.add_argument(
        "--train-plates", type=int, default=16, help="without --model: simulated plates to train on"
    )
    u.add_argument("--train-steps", type=int, default=200, help="without --model: steps per stage")
    u.add_argument("--overwrite", action="store_true")
    e = sub.add_parser("evaluate", help="metrics (blue / red / all) of subtracted plate(s)")
    e.add_argument("plates", nargs="+")
    e.add_argument("--json", help="write the metrics as JSON")
    e.add_argument("--plot", help="PNG with a fibre's spectrum, residuals and error by wavelength")


# -- main --------------------------------------------------------------------------------------------


COMMANDS = [
    Command(
        "demo",
        "load SmolLM2-135M-Instruct and answer a chat question (what `make demo` runs)",
        _demo_args,
        _run_demo,
    ),
    Command("generate", "continue prompts with a decoder LM", _generate_args, _run_generate),
    Command(
        "chat",
        "an interactive chat that streams the reply as it is generated",
        _chat_args,
        _run_chat,
    ),
    Command(
        "embed",
        "sentence embeddings with an encoder (all-MiniLM-L6-v2 by default)",
        _embed_args,
        _run_embed,
    ),
    Command(
        "posir",
        "position-aware retrieval: `posir build` a dataset, `posir eval` an encoder on it",
        _posir_args,
        _run_posir,
    ),
    Command(
        "rl",
        "RL post-training: `rl train` (sync / SortedRL) and `rl simulate` (scheduling)",
        _rl_args,
        _run_rl,
    ),
    Command(
        "sky",
        "sky subtraction: `sky simulate | train | subtract | evaluate` (SMI, Super Sky, PCA)",
        _sky_args,
        _run_sky,
    ),
    Command(
        "train-lm",
        "train (or resume) a small decoder LM with Orbax checkpoints",
        _train_lm_args,
        _run_train_lm,
    ),
    Command(
        "config",
        "show a config with overrides applied, or list config kinds",
        _config_args,
        _run_config,
    ),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m jaxlab", description="jaxlab: research systems in JAX/Flax"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for cmd in COMMANDS:
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help)
        cmd.add_arguments(p)
        p.set_defaults(_run=cmd.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from jaxlab.checkpoint import CheckpointError
    from jaxlab.config import ConfigError
    from jaxlab.models.loading import LoadError
    from jaxlab.sky.plate import SkyFormatError

    try:
        args._run(args)
    except (
        ConfigError,
        LoadError,
        CheckpointError,
        SkyFormatError,
        ValueError,
        TypeError,
        FileNotFoundError,
    ) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
