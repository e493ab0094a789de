"""``analyze count|traces|sufficiency|mi|intervene``: epistemic markers and the information of
reasoning traces (:mod:`jaxlab.analysis`); each writes a JSON of the numbers and a PNG.

Trace files are JSONL, one trace per line: ``{"prompt": ..., "response": ..., "answer": ...}``
(``answer`` for sufficiency and mi), or ``{"messages": [user, assistant], "answer": ...}`` as the
SFT data; ``count`` also reads ``{"responses": [...]}`` (several responses to one problem).
"""

from __future__ import annotations

import json
from pathlib import Path

from jaxlab.cli._common import (
    Command,
    add_overwrite_arg,
    add_parser,
    check_outputs,
    registry_option,
)
from jaxlab.errors import UserError
from jaxlab.jsonl import read_jsonl

__all__ = ["COMMAND", "read_traces"]


def read_traces(path: str, limit: int | None = None) -> list[dict]:
    """Records ``{"prompt", "response", "answer"?, "responses"?}`` of a trace JSONL file."""
    out = []
    for n, rec in read_jsonl(path, what="trace file"):
        if "messages" in rec:
            msgs = rec["messages"]
            users = [m["content"] for m in msgs if m.get("role") == "user"]
            bots = [m["content"] for m in msgs if m.get("role") == "assistant"]
            if not users or not bots:
                raise UserError(f"{path}:{n}: messages need a user and an assistant turn")
            rec = {**rec, "prompt": users[-1], "response": bots[-1]}
        if "responses" not in rec and ("prompt" not in rec or "response" not in rec):
            raise UserError(f"{path}:{n}: expected prompt and response (or messages)")
        if "answer" in rec:
            rec["answer"] = str(rec["answer"])
        out.append(rec)
        if limit is not None and len(out) >= limit:
            break
    if not out:
        raise UserError(f"{path}: no traces")
    return out


def _load_model(name: str):
    from jaxlab.cli._common import require_decoder
    from jaxlab.models import from_pretrained

    model, tokenizer = from_pretrained(name)
    require_decoder(model, name)
    if tokenizer is None:
        raise UserError(f"{name} has no tokenizer")
    return model, tokenizer


def _write(args, name: str, data: dict) -> Path:
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps(data, indent=1))
    print(f"wrote {path}")
    return path


def _outputs(args, name):
    out = Path(args.out_dir)
    check_outputs(args, out / f"{name}.json", out / f"{name}.png")
    return out / f"{name}.png"


def _run_count(args):
    from jaxlab.analysis import epistemic_stats

    recs = read_traces(args.input, args.limit)
    responses = [r.get("responses") or [r["response"]] for r in recs]
    result = {c: epistemic_stats(responses, convention=c).to_dict() for c in args.conventions}
    for c, s in result.items():
        print(
            f"{c:14s} total {s['total']:6d}  per response {s['per_response']:.3f}  "
            f"per problem {s['per_problem']:.3f}"
        )
    if args.out_dir:
        check_outputs(args, Path(args.out_dir) / "count.json")
        _write(args, "count", result)


def _run_traces(args):
    from jaxlab.analysis import epistemic_stats, trace_information
    from jaxlab.analysis.plots import plot_information

    png = _outputs(args, "traces")
    recs = read_traces(args.input, args.limit)
    model, tok = _load_model(args.model)
    segment = int(args.segment) if args.segment.isdigit() else args.segment
    infos = trace_information(
        model, tok, [r["prompt"] for r in recs], [r["response"] for r in recs],
        chat=not args.no_chat, convention=args.convention, segment=segment,
    )  # fmt: skip
    stats = epistemic_stats(
        [[r["response"]] for r in recs],
        convention=args.convention,
        token_counts=[[len(t.tokens)] for t in infos],
    )
    for i, t in enumerate(infos):
        print(
            f"trace {i}: {len(t.tokens)} tokens, {t.info.sum():.1f} nats "
            f"({t.info[t.epistemic].sum():.1f} epistemic), stagnation onset {t.stagnation()}"
        )
    _write(args, "traces", {"model": args.model, "markers": stats.to_dict(),
                            "traces": [t.to_dict() for t in infos]})  # fmt: skip
    plot_information(infos[: args.plot_max], png)


def _run_sufficiency(args):
    from jaxlab.analysis import answer_sufficiency
    from jaxlab.analysis.information import encode_trace
    from jaxlab.analysis.plots import plot_sufficiency

    png = _outputs(args, "sufficiency")
    recs = read_traces(args.input, args.limit)
    if any("answer" not in r for r in recs):
        raise UserError("sufficiency needs an 'answer' in every trace record")
    model, tok = _load_model(args.model)
    curves = []
    for i, r in enumerate(recs):
        p, resp = encode_trace(tok, r["prompt"], r["response"], chat=not args.no_chat)
        c = answer_sufficiency(
            model, tok, p, resp, r["answer"], checkpoints=args.checkpoints,
            answer_prefix=args.answer_prefix, answer_suffix=args.answer_suffix,
            num_samples=args.samples, temperature=args.temperature, seed=args.seed,
            max_answer_tokens=args.max_answer_tokens,
        )  # fmt: skip
        print(
            f"trace {i}: H(Y|s_t) {c.entropy[0]:.2f} -> {c.entropy[-1]:.2f} nats, "
            f"log p(y*|s_t) {c.logp_answer[0]:.2f} -> {c.logp_answer[-1]:.2f}"
        )
        curves.append(c)
    _write(args, "sufficiency", {"model": args.model, "curves": [c.to_dict() for c in curves]})
    plot_sufficiency(curves[: args.plot_max], png)


def _run_mi(args):
    import numpy as np

    from jaxlab.analysis import epistemic_token_mask, trace_mi
    from jaxlab.analysis.plots import plot_mi

    png = _outputs(args, "mi")
    recs = read_traces(args.input, args.limit)
    if any("answer" not in r for r in recs):
        raise UserError("mi needs an 'answer' in every trace record")
    model, tok = _load_model(args.model)
    rows, curves = [], []
    for i, r in enumerate(recs):
        ids, mi = trace_mi(
            model, tok, r["response"], r["answer"], max_tokens=args.max_tokens, sigma=args.sigma
        )
        epi = epistemic_token_mask(tok, ids)
        curves.append((mi, epi))
        top = np.argsort(mi)[::-1][:5]
        print(f"trace {i}: {len(ids)} tokens, MI mean {mi.mean():.3f}, peaks at {top.tolist()}")
        rows.append({"tokens": ids.tolist(), "mi": mi.tolist(), "epistemic": epi.astype(int).tolist(),
                     "mean_mi_epistemic": float(mi[epi].mean()) if epi.any() else None,
                     "mean_mi_other": float(mi[~epi].mean()) if (~epi).any() else None})  # fmt: skip
    _write(args, "mi", {"model": args.model, "sigma": args.sigma, "traces": rows})
    plot_mi(curves[: args.plot_max], png)


def _run_intervene(args):
    from jaxlab.analysis import run_intervention
    from jaxlab.analysis.plots import plot_interventions
    from jaxlab.rl.tasks import make_task

    png = _outputs(args, "intervene")
    model, tok = _load_model(args.model)
    task = make_task(args.task, seed=args.task_seed)
    problems = [task.problem(args.start + i) for i in range(args.problems)]
    results = {}
    for mode in args.modes:
        res = run_intervention(
            model, tok, task, problems, mode, max_new_tokens=args.max_new_tokens,
            temperature=args.temperature, seed=args.seed, num_shots=args.shots,
            wait_when=args.wait_when,
        )  # fmt: skip
        print(
            f"{mode:12s} accuracy {res.accuracy:.3f}  markers/response {res.markers_per_response:.2f}"
            f"  tokens/response {res.tokens_per_response:.1f}"
        )
        results[mode] = res.to_dict()
    _write(args, "intervene", {"model": args.model, "task": args.task, "results": results})
    plot_interventions(results, png, title=f"{args.model}: {args.task}")


def _common(p, model=True):
    if model:
        p.add_argument(
            "--model", default="smollm2-135m-instruct", help="registered name, .gguf or HF dir"
        )
    p.add_argument("--out-dir", required=True, help="JSON and PNG go here")
    add_overwrite_arg(p)


def _inputs(p):
    p.add_argument(
        "--input", required=True, help="trace JSONL (prompt/response/answer or messages)"
    )
    p.add_argument("--limit", type=int, default=None, help="read at most this many traces")
    p.add_argument("--no-chat", action="store_true", help="prompts are raw text, not chat turns")
    p.add_argument("--plot-max", type=int, default=6, help="traces drawn in the plot")


def _analyze_args(p):
    sub = p.add_subparsers(dest="analyze_command", metavar="ANALYZE_COMMAND", required=True)
    c = add_parser(sub, "count", "epistemic-marker counts under both conventions (no model)")
    c.add_argument("--input", required=True, help="JSONL of traces or {'responses': [...]}")
    c.add_argument("--limit", type=int, default=None)
    c.add_argument(
        "--conventions", nargs="+", default=["substring", "word_boundary"],
        choices=["substring", "word_boundary"], help="counting conventions",
    )  # fmt: skip
    c.add_argument("--out-dir", default=None, help="also write count.json here")
    add_overwrite_arg(c)

    t = add_parser(sub, "traces", "per-token self-information, epistemic vs procedural, stagnation")
    _inputs(t)
    _common(t)
    registry_option(t, "--convention", "jaxlab.analysis.markers:CONVENTIONS", default="word_boundary",
                    help="marker convention of the token mask")  # fmt: skip
    t.add_argument("--segment", default="line", help="'line' or a window size in tokens")

    s = add_parser(sub, "sufficiency", "H(Y | s_t) and log p(y* | s_t) at checkpoints along traces")
    _inputs(s)
    _common(s)
    s.add_argument("--checkpoints", type=int, default=20, help="checkpoints per trace")
    s.add_argument("--samples", type=int, default=16, help="answers sampled per checkpoint (K)")
    s.add_argument("--temperature", type=float, default=1.0)
    s.add_argument("--max-answer-tokens", type=int, default=16)
    s.add_argument("--answer-prefix", default="<answer>", help="forced at each checkpoint")
    s.add_argument("--answer-suffix", default="</answer>", help="ends a sampled answer")
    s.add_argument("--seed", type=int, default=0)

    m = add_parser(sub, "mi", "HSIC normalized-CCA MI between token hidden states and the answer's")
    _inputs(m)
    _common(m)
    m.add_argument("--sigma", type=float, default=50.0, help="Gaussian kernel width")
    m.add_argument("--max-tokens", type=int, default=2500, help="trace tokens kept")

    v = add_parser(sub, "intervene", "accuracy and markers under suppress / induce / insert_wait")
    _common(v)
    registry_option(v, "--task", "jaxlab.rl.tasks:TASKS", default="arithmetic", help="task")
    v.add_argument("--task-seed", type=int, default=0)
    v.add_argument("--start", type=int, default=10000, help="index of the first problem")
    v.add_argument("--problems", type=int, default=32)
    v.add_argument(
        "--modes", nargs="+", default=["baseline", "suppress", "induce", "insert_wait"],
        choices=["baseline", "suppress", "induce", "insert_wait"],
    )  # fmt: skip
    v.add_argument("--max-new-tokens", type=int, default=256)
    v.add_argument("--temperature", type=float, default=0.0)
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--shots", type=int, default=2, choices=[1, 2], help="induce: examples shown")
    v.add_argument("--wait-when", default="always", choices=["always", "wrong"],
                   help="insert_wait after every response (the reference) or only wrong ones")  # fmt: skip


def _run_analyze(args):
    {
        "count": _run_count,
        "traces": _run_traces,
        "sufficiency": _run_sufficiency,
        "mi": _run_mi,
        "intervene": _run_intervene,
    }[args.analyze_command](args)


COMMAND = Command(
    "analyze",
    "epistemic markers and information of reasoning traces: count, traces, sufficiency, mi, intervene",
    _analyze_args,
    _run_analyze,
)
