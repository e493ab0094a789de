"""The RL trainer end to end on a tiny character-level model (CPU, about a minute)."""

import json

import jax
import numpy as np
import pytest
from flax import nnx

from jaxlab.config import load_config
from jaxlab.rl.trainer import train_rl


@pytest.mark.parametrize("scheduler", ["sorted", "sync"])
def test_tiny_rl_run_improves_reward(scheduler, tmp_path):
    cfg = load_config(f"configs/rl/tiny_{scheduler}.yaml")
    summary = train_rl(cfg, tmp_path, progress=False)
    assert summary["reward_last_quarter"] > summary["reward_first_quarter"] + 0.05
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert (
        len(lines) == summary["updates"]
        and sum(x["groups"] for x in lines) == cfg.scheduler.num_prompts
    )
    assert all(x["max_token_staleness"] <= cfg.scheduler.max_staleness for x in lines)
    assert 0.0 <= summary["bubble_ratio"] <= 1.0
    assert (tmp_path / "timeline.png").stat().st_size > 0


def test_max_staleness_zero_trains_only_on_policy_tokens(tmp_path):
    cfg = load_config(
        "configs/rl/tiny_sorted.yaml",
        ["scheduler.max_staleness=0", "scheduler.num_prompts=16", "optim.lr=1e-3"],
    )
    summary = train_rl(cfg, tmp_path, progress=False)
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert summary["max_staleness"] == 0 and all(x["max_token_staleness"] == 0 for x in lines)
    # on-policy: the importance ratio of every trained token is 1 before the update
    assert all(abs(x["ratio_mean"] - 1.0) < 1e-3 and x["clip_frac"] == 0.0 for x in lines)


def test_preempted_run_resumes_from_its_checkpoint(tmp_path):
    from jaxlab.rl.trainer import RLTrainer

    cfg = load_config(
        "configs/rl/tiny_sorted.yaml", ["scheduler.num_prompts=24", "checkpoint.save_every=2"]
    )
    first = RLTrainer(cfg, tmp_path)
    stopped = first.run_until(3, progress=False)  # as if preempted after 3 updates
    assert stopped["stopped_after_updates"] == 3
    version = stopped["version"]
    assert first.checkpointer.latest_step() == version

    resumed = RLTrainer(cfg, tmp_path)  # a new process would do the same
    assert resumed.resumed_from == version and resumed.ctrl.version == version
    assert resumed.engine.policy_version == version
    assert int(resumed.optimizer.step[...]) == version  # one optimizer step per update
    resumed.ctrl.check_invariants()
    summary = resumed.run(progress=False)
    assert sorted(resumed.ctrl.trained) == list(range(24))  # every group trained once, none lost
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["version"] for x in lines] == list(range(1, summary["updates"] + 1))
    assert sum(x["groups"] for x in lines) == 24

    # exact: the same run without the interruption gives the same updates and the same weights
    straight = RLTrainer(cfg, tmp_path / "straight")
    straight.run(progress=False)
    again = [
        json.loads(x) for x in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()
    ]
    timing = {"time", "bubble_ratio", "update_s", "samples_per_s", "tokens_per_s"}
    assert len(again) == len(lines)
    for a, b in zip(again, lines, strict=True):
        assert {k: v for k, v in a.items() if k not in timing} == {
            k: v for k, v in b.items() if k not in timing
        }
    for a, b in zip(
        jax.tree.leaves(nnx.state(straight.model)),
        jax.tree.leaves(nnx.state(resumed.model)),
        strict=True,
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
