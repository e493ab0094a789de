"""The RL trainer and configs under bad input and restarts: values checked at load time with the
dotted key named, nothing written before the run can start, one metrics line per update and a
summary over the whole run after a resume."""

import json

import pytest

from jaxlab.checkpoint import CheckpointError
from jaxlab.cli import main
from jaxlab.config import ConfigError, load_config

SMALL = [
    "scheduler.num_prompts=6",
    "scheduler.group_size=2",
    "scheduler.update_groups=1",
    "scheduler.rollout_groups=2",
    "generation.slots=4",
    "generation.max_new_tokens=4",
    "checkpoint.save_every=1",
    "tiny_model.num_layers=1",
    "tiny_model.hidden_size=32",
    "tiny_model.intermediate_size=32",
    "tensorboard=false",
]


@pytest.mark.parametrize(
    "config, override, message",
    [
        ("rl/tiny_sorted", "loss.clip_low=-0.1", r"loss\.clip_low: must be >= 0"),
        ("rl/tiny_sorted", "loss.clip_high=-1", r"loss\.clip_high: must be >= 0"),
        ("rl/tiny_sorted", "loss.tis_cap=0", r"loss\.tis_cap: must be positive"),
        ("rl/tiny_sorted", "loss.max_len=-3", r"loss\.max_len: must be positive or null"),
        ("rl/tiny_sorted", "task.name=nope", r"task\.name: 'nope' is not one of \[.*arithmetic"),
        ("rl/tiny_sorted", "task.kwargs.digits=3", r"task\.kwargs: not accepted by task 'toy_digits'"),
        ("rl/smollm2_arith_sync", "task.kwargs.digits=0", r"task\.kwargs: arithmetic: digits >= 1"),
        ("rl/tiny_sorted", "generation.temperature=.inf", r"generation\.temperature: .*finite"),
        ("rl/tiny_sorted", "task.kwargs.format_reward=.nan", r"task\.kwargs: format_reward must lie"),
        ("rl/tiny_sorted", "generation.top_p=1.5", r"generation\.top_p: must lie in \(0, 1\]"),
        ("rl/tiny_sorted", "optim.lr=.nan", r"optim\.lr: must be a finite number, got nan"),
        ("rl/tiny_sorted", "optim.grad_clip=-1", r"optim\.grad_clip: must be positive"),
        ("rl/tiny_sorted", "optim.on_nonfinite=ignore", r"optim\.on_nonfinite: 'ignore' is not"),
        ("lm_tiny", "train.lr=.inf", r"train\.lr: must be a finite number, got inf"),
        ("lm_tiny", "train.grad_clip=-0.5", r"train\.grad_clip: must be positive"),
        ("lm_tiny", "train.on_nonfinite=nan", r"train\.on_nonfinite: 'nan' is not"),
    ],
)  # fmt: skip
def test_config_values_are_checked_where_declared(config, override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(config, [override])


def test_rl_train_writes_nothing_for_a_rejected_config_or_workdir(tmp_path, capsys):
    workdir = tmp_path / "run"
    for override in ("task.name=nope", "loss.clip_low=-1", "generation.top_p=2"):
        argv = ["rl", "train", "rl/tiny_sorted", "--set", override, "--workdir", str(workdir)]
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and override.split("=")[0] in err[0]
        assert not workdir.exists()
    a_file = tmp_path / "file"
    a_file.write_text("keep me")
    assert main(["rl", "train", "rl/tiny_sorted", "--workdir", str(a_file), "--quiet"]) == 2
    assert "is not a directory" in capsys.readouterr().err
    assert a_file.read_text() == "keep me"


def _bubble_ratio(steps, updates):
    """Idle slot-time over total slot-time, as the module docstring defines it."""
    busy = sum((e - s) * occ for s, e, occ in steps)
    total = sum(e - s for s, e, _ in steps) + sum(e - s for s, e in updates)
    return 1.0 - busy / total


def test_resumed_rl_run_keeps_one_line_per_update_and_summarises_the_whole_run(tmp_path):
    from jaxlab.rl.trainer import RLTrainer

    cfg = load_config("rl/tiny_sorted", SMALL)
    first = RLTrainer(cfg, tmp_path)
    stopped = first.run_until(2, progress=False)
    first_part_s = first.timeline.now()
    first_updates = list(first.timeline.updates)
    # as if killed after logging update 3 but before its checkpoint: a line the resumed run redoes
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"version": stopped["version"] + 1, "loss": 0.0}) + "\n")

    resumed = RLTrainer(cfg, tmp_path)
    assert resumed.resumed_from == stopped["version"]
    summary = resumed.run(progress=False)
    versions = [
        json.loads(x)["version"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()
    ]
    assert versions == list(range(1, summary["updates"] + 1))
    timeline = json.loads((tmp_path / "timeline.json").read_text())
    assert len(timeline["updates"]) == summary["updates"] > len(first_updates)
    assert timeline["updates"][: len(first_updates)] == [list(u) for u in first_updates]
    assert summary["wall_s"] >= first_part_s
    assert summary["bubble_ratio"] == pytest.approx(
        _bubble_ratio(timeline["steps"], timeline["updates"]), rel=1e-9
    )

    # a non-finite loss stops an update before its weights reach the Engine or a checkpoint
    from jaxlab.generation.engine import Completion
    from jaxlab.optim import NonFiniteError

    version, saved = resumed.ctrl.version, resumed.checkpointer.all_steps()
    real_update = resumed._policy_update
    resumed._policy_update = lambda groups: {"loss": float("nan"), "grad_norm": 0.5}
    with pytest.raises(NonFiniteError, match="optim.on_nonfinite=skip"):
        resumed.update([0])
    assert resumed.ctrl.version == version and resumed.engine.policy_version == version
    assert resumed.checkpointer.all_steps() == saved
    # a task that scores a sample NaN is an error naming the task and the group
    resumed._policy_update = real_update
    resumed.task.reward = lambda problem, text: float("nan")
    for i in range(cfg.scheduler.group_size):
        resumed.finished[(0, i)] = Completion(
            0, [], [1, 2], [-0.1, -0.2], [-0.1, -0.2], [0, 0], "eos", 0, 1
        )
    with pytest.raises(
        ValueError, match="task 'toy_digits' gave reward nan to sample 0 of group 0"
    ):
        resumed._policy_update([0])

    # a config the checkpoints do not fit is refused, and the run's config.json stays as it was
    before = (tmp_path / "config.json").read_text()
    other = load_config("rl/tiny_sorted", [*SMALL, "tiny_model.hidden_size=48"])
    with pytest.raises(CheckpointError, match="hidden_size|shape"):
        RLTrainer(other, tmp_path)
    assert (tmp_path / "config.json").read_text() == before
