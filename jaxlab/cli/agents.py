"""``agents bench``: PASTE's replay benchmark on BFCL multi-turn tasks or scripted research tasks
(serial / PASTE / bigram / oracle), and ``agents run``: the agent loop on one BFCL task with a model choosing the calls."""

from __future__ import annotations

import json

from jaxlab.cli._common import Command, add_overwrite_arg, add_parser, check_outputs

__all__ = ["COMMAND", "format_table"]


def format_table(summary: dict) -> str:
    """The summary as a text table, one row per mode."""
    head = (
        f"{'mode':<11} {'mean s':>7} {'p95 s':>7} {'p99 s':>7} {'mean -%':>8} {'p99 -%':>7} "
        f"{'stall s':>8} {'tool x':>7} {'top1':>6} {'top3':>6} {'window':>7} {'wasted s':>9} "
        f"{'mut.blk':>7} {'mut.sbx':>7} {'lossless':>8}"
    )
    rows = [head]
    for mode, m in summary.items():
        rows.append(
            f"{mode:<11} {m['mean_s']:7.3f} {m['p95_s']:7.3f} {m['p99_s']:7.3f} "
            f"{100 * m.get('mean_reduction', 0):8.1f} {100 * m.get('p99_reduction', 0):7.1f} "
            f"{m['stall_s']:8.2f} {m.get('tool_latency_speedup', 1):7.2f} "
            f"{m['top1_hit_rate']:6.3f} {m['top3_hit_rate']:6.3f} {m['window_hit_rate']:7.3f} "
            f"{m['wasted_tool_s']:9.2f} {m['mutating_blocked']:7d} {m['mutating_sandboxed']:7d} "
            f"{str(m.get('lossless', '-')):>8}"
        )
    return "\n".join(rows)


def _run(args):
    {"bench": _run_bench, "run": _run_task}[args.agents_command](args)


def _config(args):
    from jaxlab.agents.bench import BenchConfig
    from jaxlab.errors import ConfigError

    try:
        return BenchConfig(
            model=args.model,
            test_tasks=args.test_tasks or None,
            train_fraction=args.train_fraction,
            modes=tuple(args.modes.split(",")),
            tokens_median=args.tokens_median,
            tokens_p95=args.tokens_p95,
            tokens_min=args.tokens_min,
            tokens_max=args.tokens_max,
            tool_share=args.tool_share,
            budget=args.budget,
            top_k=args.top_k,
            mutating=args.mutating,
            cost_weight=args.cost_weight,
            lookahead=not args.no_lookahead,
            window=args.window,
            seed=args.seed,
            workload=args.workload,
        )
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _run_bench(args):
    from jaxlab.agents.bench import SleepThinker, plot_runs, run_bench

    check_outputs(args, args.json, args.plot)
    config = _config(args)
    think = None
    if args.sleep_per_token:
        think = SleepThinker(args.sleep_per_token / 1000, args.sleep_fixed / 1000)
    result = run_bench(config, think=think, progress=not args.quiet)
    cal = result["calibration"]
    print(
        f"train {cal['train_tasks']} tasks ({cal['train_calls']} calls), test {cal['test_tasks']} "
        f"tasks; decode {1000 * cal['decode_per_token_s']:.1f} ms/token + "
        f"{1000 * cal['decode_fixed_s']:.1f} ms; latency scale {cal['latency_scale']:.3f}; "
        f"{cal['patterns']} patterns mined in {cal['mine_seconds']:.2f} s"
    )
    print(format_table(result["summary"]))
    b = result["bounds"]
    print(
        f"perfect speculation, chained: {-100 * b['chain_turn_reduction']:.1f}% mean within "
        f"turns, {-100 * b['chain_task_reduction']:.1f}% across turns; all calls at once: "
        f"{-100 * b['parallel_turn_reduction']:.1f}%, {-100 * b['parallel_task_reduction']:.1f}%"
        f"; serial time is "
        f"{100 * b['tool_share']:.1f}% tools, {100 * b['call_decode_share']:.1f}% decoding of "
        f"steps that call, {100 * b['answer_decode_share']:.1f}% of answers"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    if args.plot:
        plot_runs(result, args.plot)


def _run_task(args):
    from jaxlab.agents.bfcl import bfcl_registry, bfcl_state, load_bfcl_tasks
    from jaxlab.agents.executor import SpeculativeExecutor, ToolScheduler
    from jaxlab.agents.runtime import EngineLLM, OpenAIChatLLM, run_agent
    from jaxlab.errors import UserError

    tasks = {t.id: t for t in load_bfcl_tasks()}
    if args.task not in tasks:
        raise UserError(f"no BFCL task {args.task!r} (multi_turn_base_0 ... multi_turn_base_199)")
    task = tasks[args.task]
    if args.url:
        llm = OpenAIChatLLM(
            args.url, args.served_model_name or args.model, max_tokens=args.max_tokens
        )
    else:
        from jaxlab.generation import Engine, SamplingParams
        from jaxlab.models import from_pretrained

        model, tokenizer = from_pretrained(args.model)
        engine = Engine(
            model, num_slots=1, max_len=args.max_len, tokenizer=tokenizer, prefix_cache=4
        )
        llm = EngineLLM(engine, tokenizer, SamplingParams(max_new_tokens=args.max_tokens))
    registry, state = bfcl_registry(task), bfcl_state(task)
    predictor = None
    if args.speculate:
        from jaxlab.agents.bench import training_logs
        from jaxlab.agents.miner import MinerConfig, mine_patterns

        others = [t for t in tasks.values() if t.id != task.id]
        predictor = mine_patterns(
            training_logs(others), MinerConfig(prompt_words=args.prompt_words)
        )
    with ToolScheduler() as scheduler:
        executor = SpeculativeExecutor(
            registry, state, scheduler, predictor=predictor, task_id=task.id
        )
        result = run_agent(llm, executor, task.turns, max_steps_per_turn=args.max_steps)
    for m in result.messages:
        text = m.get("content") or ""
        calls = [
            c["function"]["name"] + c["function"]["arguments"] for c in m.get("tool_calls", [])
        ]
        print(f"[{m['role']}] {text[:300]}" + (f" -> {'; '.join(calls)}" if calls else ""))
    print(
        f"{result.steps} steps, {len(executor.log.tool_events())} tool calls, "
        f"{result.seconds:.1f} s ({result.llm_seconds:.1f} s model, "
        f"{result.tool_seconds:.1f} s waiting for tools)"
    )
    if predictor is not None:
        st = executor.stats
        print(
            f"speculation: {int(st['launched'])} launched, {int(st['promoted'])} promoted, "
            f"{int(st['discarded'])} discarded ({st['wasted_tool_seconds']:.1f} tool-s), "
            f"{int(st['mutating_blocked'])} mutating blocked, {int(st['sandboxed'])} sandboxed"
        )


def _args(p):
    sub = p.add_subparsers(dest="agents_command", metavar="AGENTS_COMMAND", required=True)
    b = add_parser(
        sub,
        "bench",
        "replay BFCL multi-turn gold traces (or scripted research tasks) with real decoding: "
        "serial vs PASTE vs bigram vs oracle speculation (completion time, stall, hit rates, "
        "lossless check)",
    )
    b.add_argument("--model", default="smollm2-135m-instruct", help="the thinking model")
    b.add_argument(
        "--workload",
        default="bfcl",
        choices=("bfcl", "research", "research_snippet"),
        help="BFCL multi-turn gold traces, or scripted deep-research tasks (search / fetch chains "
        "over the Python docs; research_snippet: results read by their snippets; "
        "jaxlab.agents.workloads)",
    )
    b.add_argument("--test-tasks", type=int, default=12, help="test tasks to run (0: all)")
    b.add_argument("--train-fraction", type=float, default=0.7, help="tasks mined from")
    b.add_argument(
        "--modes",
        default="serial,paste,paste_words,bigram,oracle,oracle_turn",
        help="comma-separated",
    )
    b.add_argument("--tokens-median", type=float, default=8.0, help="decoded tokens per step")
    b.add_argument("--tokens-p95", type=float, default=24.0, help="their 95th percentile")
    b.add_argument("--tokens-min", type=int, default=4, help="fewest tokens per step")
    b.add_argument("--tokens-max", type=int, default=48, help="most tokens per step")
    b.add_argument("--tool-share", type=float, default=0.5, help="tools' share of serial time")
    b.add_argument("--budget", type=int, default=3, help="speculative jobs at once per task")
    b.add_argument("--top-k", type=int, default=3, help="candidates per prediction")
    b.add_argument(
        "--mutating", default="sandbox", choices=("sandbox", "never"), help="mutating tools"
    )
    b.add_argument("--cost-weight", type=float, default=0.02, help="utility's cost weight")
    b.add_argument("--no-lookahead", action="store_true", help="no speculation while tools run")
    b.add_argument(
        "--window", type=int, default=4, help="calls a speculation chain may run ahead (1: next)"
    )
    b.add_argument("--seed", type=int, default=0, help="split, token counts and latencies")
    b.add_argument(
        "--sleep-per-token",
        type=float,
        default=0.0,
        metavar="MS",
        help="think by sleeping MS per token instead of decoding (no model)",
    )
    b.add_argument(
        "--sleep-fixed",
        type=float,
        default=0.0,
        metavar="MS",
        help="with --sleep-per-token: per step",
    )
    b.add_argument("--json", default=None, help="write the results here")
    b.add_argument("--plot", default=None, help="write the per-task serial vs PASTE PNG here")
    b.add_argument("--quiet", action="store_true", help="no progress report")
    add_overwrite_arg(b)
    r = add_parser(
        sub,
        "run",
        "the agent loop on one BFCL task, the model choosing the calls (in-process, or an "
        "OpenAI-compatible endpoint with --url)",
    )
    r.add_argument("task", help="a BFCL multi_turn_base task id, e.g. multi_turn_base_0")
    r.add_argument("--model", default="smollm2-135m-instruct", help="registered name, .gguf, dir")
    r.add_argument("--url", default=None, help="an OpenAI-compatible base url ending in /v1")
    r.add_argument("--served-model-name", default=None, help="the model id sent with --url")
    r.add_argument("--max-tokens", type=int, default=128, help="tokens per reply")
    r.add_argument("--max-len", type=int, default=8192, help="context of the in-process engine")
    r.add_argument("--max-steps", type=int, default=4, help="model replies per user turn")
    r.add_argument(
        "--speculate",
        action="store_true",
        help="PASTE: speculate with patterns mined from the other 199 tasks' gold calls",
    )
    r.add_argument(
        "--prompt-words", action="store_true", help="with --speculate: also the user's words"
    )


COMMAND = Command(
    "agents",
    "agent runtime with speculative tool execution (PASTE): bench, run",
    _args,
    _run,
)
