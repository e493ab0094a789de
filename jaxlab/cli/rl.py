"""``rl simulate`` (rollout scheduling, bubble ratio) and ``rl train`` (sync / SortedRL)."""

from __future__ import annotations

import dataclasses
import json

from jaxlab.cli._common import (
    Command,
    add_dtype_arg,
    add_overwrite_arg,
    add_parser,
    check_outputs,
    dtype_overrides,
    non_negative_float,
    non_negative_int,
    positive_int,
    registry_option,
)

__all__ = ["COMMAND"]


def _run_rl(args):
    {"simulate": _run_simulate, "train": _run_train}[args.rl_command](args)


def _run_simulate(args):
    from jaxlab.rl.scheduling import SchedulerConfig
    from jaxlab.rl.simulate import length_sampler, simulate

    check_outputs(args, args.json, args.plot)
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
        "wasted_fraction",
        "bubble_floor",
    ):
        value = summary[key]
        print(f"{key:22s} {value:.4f}" if isinstance(value, float) else f"{key:22s} {value}")
    parts = summary["bubble_parts"]  # where the idle slot-steps went, as fractions of all
    print("bubble_parts           " + ", ".join(f"{k} {v:.4f}" for k, v in parts.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)
    if args.plot:
        result.plot(args.plot)


def _run_train(args):
    from jaxlab.config import load_config, resolve_config_path
    from jaxlab.errors import UserError
    from jaxlab.rl.trainer import RLTrainConfig, train_rl

    kind = _config_kind(resolve_config_path(args.config))
    if kind == "rl_sdpo":  # self-distillation: the RL trainer with a teacher
        from jaxlab.rl.self_distill import SDPOTrainConfig, train_sdpo

        cfg = load_config(args.config, dtype_overrides(args), cls=SDPOTrainConfig)
        summary = train_sdpo(cfg, args.workdir, progress=not args.quiet)
    elif kind == "rl_multiturn":  # multi-turn GRPO / EMPO2 on text environments
        from jaxlab.rl.multiturn import MultiTurnConfig, MultiTurnTrainer

        cfg = load_config(args.config, dtype_overrides(args), cls=MultiTurnConfig)
        trainer = MultiTurnTrainer(cfg, args.workdir)
        try:
            summary = trainer.run(progress=not args.quiet)
        finally:
            trainer.close()
    elif kind in (None, "rl_train"):
        cfg = load_config(args.config, dtype_overrides(args), cls=RLTrainConfig)
        summary = train_rl(cfg, args.workdir, progress=not args.quiet)
    else:
        raise UserError(
            f"{args.config}: kind {kind!r} is not an RL config (rl_train, rl_sdpo or rl_multiturn)"
        )
    print(json.dumps(summary, indent=2))


def _config_kind(path) -> str | None:
    """The ``kind`` a YAML config names (None when it names none or is not a mapping)."""
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None  # load_config reports it
    return data.get("kind") if isinstance(data, dict) else None


def _rl_args(p):
    sub = p.add_subparsers(dest="rl_command", metavar="RL_COMMAND", required=True)
    sim = add_parser(
        sub,
        "simulate",
        "discrete-event simulation of rollout scheduling (bubble ratio)",
        description="Runs the real rollout controller against simulated generation and prints the "
        "bubble ratio, staleness and throughput.",
    )
    registry_option(
        sim,
        "--scheduler",
        "jaxlab.rl.scheduling:SCHEDULERS",
        default="sorted",
        help="rollout scheduler",
    )
    sim.add_argument(
        "--lengths",
        default="lognormal:6.2,1.0",
        help="length distribution: lognormal:MU,SIGMA | bimodal:SHORT,LONG,P_LONG | fixed:N | "
        "uniform:LO,HI | file:PATH",
    )
    sim.add_argument(
        "--prompts", type=positive_int, default=256, help="prompts in the run (one group each)"
    )
    sim.add_argument("--group-size", type=positive_int, default=8, help="samples per prompt (G)")
    sim.add_argument("--slots", type=positive_int, default=64, help="generation slots")
    sim.add_argument(
        "--update-groups",
        type=positive_int,
        default=4,
        help="sorted: complete groups that trigger an update",
    )
    sim.add_argument(
        "--rollout-groups",
        type=positive_int,
        default=None,
        help="groups admitted and not yet trained (sync: the batch); default 2 x slots / G",
    )
    sim.add_argument(
        "--max-staleness", type=non_negative_int, default=1, help="no trained token older than this"
    )
    sim.add_argument(
        "--update-cost",
        type=non_negative_float,
        default=0.0,
        help="decode steps per trained token of an update",
    )
    sim.add_argument("--seed", type=int, default=0, help="seed of the sampled lengths")
    sim.add_argument("--json", default=None, help="write the results here")
    sim.add_argument("--plot", default=None, help="write a slot-occupancy timeline PNG here")
    add_overwrite_arg(sim)
    train = add_parser(
        sub,
        "train",
        "RL training with the sync or SortedRL scheduler (configs/rl/*.yaml)",
        description="Trains a policy on a verifiable task; writes metrics.jsonl, timeline.png and "
        "summary.json.",
    )
    train.add_argument(
        "config",
        help="an rl_train or rl_sdpo (self-distillation) YAML config, e.g. configs/rl/tiny_sorted.yaml",
    )
    train.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config value, e.g. --set scheduler.max_staleness=2 (repeatable)",
    )
    add_dtype_arg(train)
    train.add_argument("--workdir", required=True, help="outputs go here")
    train.add_argument("--quiet", action="store_true", help="no progress report")


COMMAND = Command(
    "rl",
    "RL post-training: `rl train` (sync / SortedRL) and `rl simulate` (scheduling)",
    _rl_args,
    _run_rl,
)
