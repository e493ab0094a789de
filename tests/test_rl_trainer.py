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
    # the shared metrics writer's keys: learning rate, gradient norm, throughput
    assert all(x["lr"] == pytest.approx(cfg.optim.lr) and x["grad_norm"] > 0 for x in lines)
    assert all(
        x["tokens_per_s"] > 0 and x["samples_per_s"] > 0 and x["update_s"] > 0 for x in lines
    )
    assert 0.0 <= summary["bubble_ratio"] <= 1.0
    assert (tmp_path / "timeline.png").stat().st_size > 0


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.7, 0.9)])
def test_max_staleness_zero_trains_only_on_policy_tokens(tmp_path, temperature, top_p):
    """The trainer scores tokens under the distribution the Engine sampled them from: at any
    temperature and with top-p, the first update's ratio is exactly 1 on-policy."""
    cfg = load_config(
        "configs/rl/tiny_sorted.yaml",
        [
            "scheduler.max_staleness=0",
            "scheduler.num_prompts=16",
            "optim.lr=1e-3",
            f"generation.temperature={temperature}",
            f"generation.top_p={top_p}",
        ],
    )
    summary = train_rl(cfg, tmp_path, progress=False)
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert summary["max_staleness"] == 0 and all(x["max_token_staleness"] == 0 for x in lines)
    # on-policy: the importance ratio of every trained token is 1 before the update
    assert all(abs(x["ratio_mean"] - 1.0) < 1e-3 and x["clip_frac"] == 0.0 for x in lines)


def test_preempted_run_resumes_from_its_checkpoint(tmp_path):
    from jaxlab.rl.trainer import RLTrainer

    cfg = load_config(
        "configs/rl/tiny_sorted.yaml", ["scheduler.num_prompts=13", "checkpoint.save_every=2"]
    )
    first = RLTrainer(cfg, tmp_path)
    # an update trains at most rollout_groups (6) groups, so 13 prompts take at least 3 updates
    stopped = first.run_until(2, progress=False)  # as if preempted after 2 updates
    assert stopped["stopped_after_updates"] == 2
    version = stopped["version"]
    assert first.checkpointer.latest_step() == version

    resumed = RLTrainer(cfg, tmp_path)  # a new process would do the same
    assert resumed.resumed_from == version and resumed.ctrl.version == version
    assert resumed.engine.policy_version == version
    assert int(resumed.optimizer.step[...]) == version  # one optimizer step per update
    resumed.ctrl.check_invariants()
    summary = resumed.run(progress=False)
    assert sorted(resumed.ctrl.trained) == list(range(13))  # every group trained once, none lost
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["version"] for x in lines] == list(range(1, summary["updates"] + 1))
    assert sum(x["groups"] for x in lines) == 13

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


def test_data_parallel_update_and_tensorboard(tmp_path):
    """The first update on a 2-way data mesh, and on a 2 x 2 FSDP x tensor mesh with chunked
    logits, equals the single-device one; TensorBoard events exist."""
    from jaxlab.rl.trainer import RLTrainer

    base = ["scheduler.num_prompts=8", "checkpoint.save_every=100"]
    one = RLTrainer(load_config("configs/rl/tiny_sync.yaml", base), tmp_path / "one")
    two = RLTrainer(
        load_config("configs/rl/tiny_sync.yaml", [*base, "mesh.data=2"]), tmp_path / "two"
    )
    assert len(jax.tree.leaves(nnx.state(two.model))[0].sharding.device_set) == 2
    # FSDP x tensor parallel: weights and optimizer state split, not replicated; and the
    # completion logits projected 8 positions at a time (the same loss and gradient)
    four = RLTrainer(
        load_config(
            "configs/rl/tiny_sync.yaml",
            [*base, "mesh.fsdp=2", "mesh.tensor=2", "logits_chunk=8"],
        ),
        tmp_path / "four",
    )
    kernel = four.model.layers.mlp.up_proj.kernel[...]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    assert kernel.addressable_shards[0].data.shape[1:] == (
        kernel.shape[1] // 2,
        kernel.shape[2] // 2,
    )
    for trainer in (one, two, four):
        trainer.run_until(1, progress=False)
    a, *others = (
        json.loads((tmp_path / d / "metrics.jsonl").read_text().splitlines()[0])
        for d in ("one", "two", "four")
    )
    for b in others:
        assert a["reward_mean"] == b["reward_mean"]  # the same samples (generation is unchanged)
        for key in ("loss", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7)
    # weights after one AdamW step: the step is ~lr·sign(g), so entries whose gradient is near
    # Adam's eps move by a reduction-order-dependent fraction of lr; bound that by 1% of lr
    lr = one.cfg.optim.lr
    for other in (two, four):
        for x, y in zip(
            jax.tree.leaves(nnx.state(one.model)),
            jax.tree.leaves(nnx.state(other.model)),
            strict=True,
        ):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=0.01 * lr)
    up = four.model.layers.mlp.up_proj.kernel[...]
    assert up.sharding.spec == kernel.sharding.spec  # the update kept the placement
    # the TensorBoard events (TFRecord-framed Event protos) hold the JSONL scalars
    import struct

    from tensorboardX.proto.event_pb2 import Event

    (events,) = (tmp_path / "one" / "tensorboard").glob("events.out.tfevents.*")
    raw, scalars, pos = events.read_bytes(), {}, 0
    while pos < len(raw):
        (length,) = struct.unpack("<Q", raw[pos : pos + 8])
        event = Event.FromString(raw[pos + 12 : pos + 12 + length])
        pos += 12 + length + 4
        for v in event.summary.value:
            scalars[(v.tag, event.step)] = v.simple_value
    assert scalars[("reward_mean", 1)] == pytest.approx(a["reward_mean"])
    assert scalars[("loss", 1)] == pytest.approx(a["loss"], rel=1e-6)


def test_prompts_come_from_a_grain_dataset(tmp_path):
    from jaxlab.rl.trainer import RLTrainer

    cfg = load_config(
        "configs/rl/tiny_sync.yaml", ["scheduler.num_prompts=8", "task.shuffle_seed=3"]
    )
    trainer = RLTrainer(cfg, tmp_path)
    order = [trainer.prompts[g]["index"] for g in range(8)]
    assert sorted(order) == list(range(8)) and order != list(range(8))
    assert trainer.problem(0).prompt == trainer.task.problem(order[0]).prompt
