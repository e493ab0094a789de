"""The SortedRL sweep's real-trainer counterpart: measured bubble ratios vs the simulator's.

    python scripts/sortedrl_real_check.py [--out docs/results/sortedrl] [--prompts 48]

Runs the real RL trainer (``jaxlab.rl.trainer``: Engine continuous batching, policy updates,
stale samples cancelled) on a tiny character-level decoder and the ``toy_digits`` task, CPU, for
``sync``, ``sorted`` and ``sorted_adaptive`` at a few sweep points. Each run logs the length of
every finished generation; the simulator then predicts the run's bubble ratio from those lengths
(``file:`` distribution, 5 seeds) and its measured update time, and the two are compared:

- rollout bubble, per decode step (the simulator's unit): 1 - mean slot occupancy over the
  Engine's steps;
- whole-run bubble in seconds (``RLTrainer``'s own ``bubble_ratio``: Engine steps weighted by
  their duration, all slots idle during updates); the simulator gets the update cost measured in
  the run (seconds per trained token / seconds per Engine step) and the same unit.

Writes ``real_check.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from jaxlab.rl.scheduling import SchedulerConfig
from jaxlab.rl.simulate import simulate
from jaxlab.rl.trainer import RLTrainConfig, RLTrainer

# (slots, group size, update groups, rollout window, max staleness)
POINTS = {"s16-g4": (16, 4, 1, 8, 1), "s16-g8": (16, 8, 1, 4, 2)}
SCHEDULERS = ("sync", "sorted", "sorted_adaptive")


def train_config(scheduler, slots, group, update, window, k, prompts, max_new_tokens):
    base = RLTrainConfig()
    return dataclasses.replace(
        base,
        model="tiny",
        tiny_model=dataclasses.replace(
            base.tiny_model,
            hidden_size=64,
            intermediate_size=128,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
            max_position_embeddings=256,
        ),
        task=dataclasses.replace(base.task, name="toy_digits"),
        scheduler=SchedulerConfig(
            scheduler=scheduler,
            group_size=group,
            update_groups=update,
            rollout_groups=window,
            max_staleness=k,
            num_prompts=prompts,
        ),
        loss=dataclasses.replace(base.loss, agg="token_mean"),
        generation=dataclasses.replace(
            base.generation,
            slots=slots,
            max_new_tokens=max_new_tokens,
            temperature=1.0,
            chat=False,
        ),
        optim=dataclasses.replace(base.optim, lr=3e-3),
        tensorboard=False,
    )


def run_real(cfg, workdir):
    trainer = RLTrainer(cfg, workdir)
    lengths: list[int] = []
    finish = trainer.ctrl.finish

    def logged_finish(ref, length):  # every finished generation, trained or later dropped
        lengths.append(int(length))
        return finish(ref, length)

    update_tokens: list[int] = []  # trained tokens per update
    update = trainer.ctrl.update

    def logged_update(groups):
        update_tokens.append(sum(r["length"] for g in groups for r in trainer.ctrl.groups[g]))
        return update(groups)

    trainer.ctrl.finish, trainer.ctrl.update = logged_finish, logged_update
    t0 = time.perf_counter()
    summary = trainer.run(progress=False)
    steps, updates = trainer.timeline.steps, trainer.timeline.updates
    occ = np.array([o for _, _, o in steps])
    step_s = np.array([e - s for s, e, _ in steps])
    upd_s = np.array([e - s for s, e in updates])
    return {
        "summary": summary,
        "lengths": lengths,
        "wall_s": time.perf_counter() - t0,
        "rollout_bubble_per_step": float(1 - occ.mean()),
        "engine_steps": int(len(steps)),
        "step_s_median": float(np.median(step_s)),
        "update_s_total": float(upd_s.sum()),
        "updates": len(updates),
        # seconds per trained token of an update (median over updates: robust to compilations)
        "update_s_per_token": float(np.median(upd_s / np.asarray(update_tokens))),
        "bubble_time": float(summary["bubble_ratio"]),
        "bubble_time_second_half": float(summary["bubble_ratio_second_half"]),
        "dropped": int(summary["dropped"]),
        "max_staleness": int(summary["max_staleness"]),
    }


def predict(sched_cfg, slots, lengths, update_cost, seeds=5):
    table = np.asarray(lengths)

    def draw(rng):
        return int(table[rng.integers(len(table))])

    rows = [
        simulate(
            sched_cfg, slots=slots, lengths=draw, seed=s, update_cost=update_cost, record=False
        )
        for s in range(seeds)
    ]
    return {
        "rollout_bubble": [r.rollout_bubble_ratio for r in rows],
        "bubble_with_updates": [r.bubble_ratio for r in rows],
        "parts": {
            k: float(np.mean([r.bubble_parts[k] for r in rows])) for k in rows[0].bubble_parts
        },
        "wasted_fraction": [r.wasted_fraction for r in rows],
    }


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="docs/results/sortedrl")
    p.add_argument("--prompts", type=int, default=48)
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument(
        "--points", default=",".join(POINTS), help="comma-separated: " + ", ".join(POINTS)
    )
    p.add_argument("--schedulers", default=",".join(SCHEDULERS))
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for point in args.points.split(","):
        slots, group, update, window, k = POINTS[point]
        for sched in args.schedulers.split(","):
            cfg = train_config(
                sched, slots, group, update, window, k, args.prompts, args.max_new_tokens
            )
            with tempfile.TemporaryDirectory() as tmp:
                real = run_real(cfg, tmp)
            lengths = real.pop("lengths")
            # update cost in Engine steps per trained token, as measured in this run
            cost = real["update_s_per_token"] / real["step_s_median"]
            pred = predict(cfg.scheduler, slots, lengths, cost)
            row = {
                "point": point,
                "scheduler": sched,
                "slots": slots,
                "group_size": group,
                "update_groups": update,
                "rollout_groups": window,
                "max_staleness": k,
                "prompts": args.prompts,
                "max_new_tokens": args.max_new_tokens,
                "lengths_mean": float(np.mean(lengths)),
                "lengths_p50_p90_max": [
                    float(np.median(lengths)),
                    float(np.percentile(lengths, 90)),
                    int(np.max(lengths)),
                ],
                "update_cost_steps_per_token": cost,
                **real,
                "predicted": pred,
            }
            results.append(row)
            pr, pb = np.mean(pred["rollout_bubble"]), np.mean(pred["bubble_with_updates"])
            print(
                f"{point} {sched:15s} rollout bubble: measured {real['rollout_bubble_per_step']:.3f}"
                f" predicted {pr:.3f} (sd {np.std(pred['rollout_bubble']):.3f}); with updates:"
                f" measured {real['bubble_time']:.3f} predicted {pb:.3f}; dropped "
                f"{real['dropped']}, wall {real['wall_s']:.0f} s",
                flush=True,
            )
            (out / "real_check.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
