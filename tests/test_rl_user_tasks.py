"""Users' own RL tasks: a Task by import path, JSONL problems with named verifiers (math through
math-verify), reasoning-gym datasets by name; tiny RL runs on the first two."""

import json
import sys
import textwrap

import pytest

from jaxlab.config import ConfigError, load_config
from jaxlab.errors import UserError
from jaxlab.rl.tasks import extract_answer, make_task
from jaxlab.rl.trainer import RLTaskConfig, train_rl
from jaxlab.rl.user_tasks import (
    VERIFIERS,
    verify_exact,
    verify_math,
    verify_multiple_choice,
    verify_numeric,
)

USER_TASK = textwrap.dedent(
    '''
    from jaxlab.rl.tasks import Problem, Task
    from jaxlab.rl.user_tasks import JsonlTask

    class CountDigits(Task):
        """Reward: the share of digit characters."""

        name = "count_digits"

        def __init__(self, *, word="digits", **kw):
            super().__init__(**kw)
            self.word = word

        def problem(self, index):
            return Problem(f"Write {self.word} {index}:", None)

        def reward(self, problem, completion):
            return sum(c.isdigit() for c in completion) / max(len(completion), 1)

    class RecordingJsonl(JsonlTask):
        """The jsonl task (numeric verifier) as a user's subclass that keeps every reward given."""

        seen = []

        def reward(self, problem, completion):
            r = super().reward(problem, completion)
            RecordingJsonl.seen.append((problem, completion, r))
            return r

    NOT_A_TASK = 3
    '''
)


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "my_rl_tasks.py").write_text(USER_TASK)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_rl_tasks"
    sys.modules.pop("my_rl_tasks", None)


def _tiny(task_overrides):
    """The smallest run that still updates twice: 4 prompts of 2 samples, one layer, 8 tokens."""
    return load_config(
        "configs/rl/tiny_sync.yaml",
        [
            "scheduler.num_prompts=4",
            "scheduler.group_size=2",
            "scheduler.update_groups=2",
            "scheduler.rollout_groups=2",
            "generation.slots=4",
            "generation.max_new_tokens=8",
            "tiny_model.num_layers=1",
            "tiny_model.hidden_size=32",
            "tiny_model.intermediate_size=64",
            "tensorboard=false",
            *task_overrides,
        ],
    )


def test_user_jsonl_task_by_import_path_trains(user_module, tmp_path):
    """One tiny run covers both: a Task subclass loaded by import path, which is the jsonl task
    (problems from a file, the numeric verifier) keeping the rewards it gives."""
    task = make_task(f"{user_module}:CountDigits", seed=0, word="numbers")
    assert task.problem(3).prompt == "Write numbers 3:"
    assert task.reward(task.problem(0), "12ab") == 0.5
    path = tmp_path / "p.jsonl"
    path.write_text(
        "".join(json.dumps({"prompt": f"{i}+1=", "answer": i + 1}) + "\n" for i in range(3))
    )
    name = f"{user_module}:RecordingJsonl"
    cfg = _tiny([f"task.name={name}", f"task.kwargs={{path: {path}, verifier: numeric}}"])
    summary = train_rl(cfg, tmp_path / "run", progress=False)
    seen = sys.modules[user_module].RecordingJsonl.seen
    assert len(seen) == cfg.scheduler.num_prompts * cfg.scheduler.group_size
    assert {p.prompt for p, _, _ in seen} == {"0+1=", "1+1=", "2+1="}  # 4 prompts: 0, 1, 2, 0
    # the rewards the trainer trained on are the verifier's, recomputed from the completions
    by_hand = [
        1.0 if verify_numeric(c, p.answer) else (0.1 if extract_answer(c) is not None else 0.0)
        for p, c, _ in seen
    ]
    assert [r for _, _, r in seen] == by_hand
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    got = sum(x["reward_mean"] * x["groups"] for x in lines) / sum(x["groups"] for x in lines)
    assert got == pytest.approx(sum(by_hand) / len(by_hand), abs=1e-6)
    assert summary["updates"] == len(lines) == 2


def test_bad_import_paths_are_config_errors(user_module):
    for name, match in (
        ("no_such_module_xyz:Task", "cannot import module"),
        (f"{user_module}:Missing", "has no attribute"),
        ("json:JSONDecoder", "not a jaxlab.rl.tasks.Task subclass"),
        (f"{user_module}:NOT_A_TASK", "not a Task class"),
    ):
        with pytest.raises(ConfigError, match=match):
            RLTaskConfig(name=name)


@pytest.mark.parametrize(
    "verifier, completion, gold, want",
    [
        ("exact", "so <answer> Paris. </answer>", "paris", True),
        ("exact", "<answer>Lyon</answer>", "Paris", False),
        ("exact", "Paris", "Paris", False),  # no committed answer
        ("numeric", "<answer>1,234</answer>", 1234, True),
        ("numeric", "the answer is 0.75", "3/4", True),
        ("numeric", "<answer>3/4</answer>", "0.75", True),
        ("numeric", "I think 12 then 13", 13, True),  # the last number of an uncommitted text
        ("numeric", "<answer>12</answer>", 13, False),
        ("multiple_choice", "<answer>(b)</answer>", "B", True),
        ("multiple_choice", "The answer is C. because", "C", True),
        ("multiple_choice", "<answer>A</answer>", "B", False),
        ("math", "<answer>\\frac{1}{2}</answer>", "0.5", True),
        ("math", "so \\boxed{(x+1)^2}", "x^2+2x+1", True),
        ("math", "<answer>2\\sqrt{2}</answer>", "\\sqrt{8}", True),
        ("math", "<answer>3</answer>", "\\frac{1}{2}", False),
    ],
)
def test_verifiers_on_hand_worked_answers(verifier, completion, gold, want):
    fn = VERIFIERS.get(verifier)
    assert fn(completion, gold) is want


def test_jsonl_task_rewards_and_errors(tmp_path):
    path = tmp_path / "p.jsonl"
    rows = [
        {"prompt": "What is 1/2 + 1/4?", "answer": "\\frac{3}{4}", "source": "hand"},
        {"prompt": "What is 2+2?", "answer": "4"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = make_task("jsonl", seed=0, path=str(path), verifier="math", prompt_suffix=" Answer:")
    p0, p1 = task.problem(0), task.problem(1)
    assert p0.prompt == "What is 1/2 + 1/4? Answer:" and p0.meta == {"source": "hand", "line": 1}
    assert task.problem(2) == p0  # a longer run goes round the file again
    assert task.reward(p0, "<answer>0.75</answer>") == 1.0
    assert task.reward(p0, "<answer>0.7</answer>") == pytest.approx(0.1)
    assert task.reward(p1, "four") == 0.0
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "answer": "1"}\n{"prompt": "b"}\n')
    with pytest.raises(UserError, match=r"bad.jsonl:2: .*'prompt' and 'answer'"):
        make_task("jsonl", path=str(bad))
    bad.write_text('{"prompt": "a", "answer": "x"}\n')
    with pytest.raises(UserError, match=r"bad.jsonl:1: numeric verifier"):
        make_task("jsonl", path=str(bad), verifier="numeric")
    with pytest.raises(ConfigError, match="verifier 'fuzzy'"):
        RLTaskConfig(name="jsonl", kwargs={"path": str(path), "verifier": "fuzzy"})
    assert verify_exact and verify_math and verify_numeric and verify_multiple_choice


def test_reasoning_gym_by_name():
    import reasoning_gym

    task = make_task("reasoning_gym", seed=5, dataset="leg_counting", size=4)
    ref = reasoning_gym.create_dataset("leg_counting", size=4, seed=5)  # built the same way
    for i in range(4):
        p = task.problem(i)
        assert p.prompt.startswith(ref[i]["question"]) and p.answer == ref[i]["answer"]
        assert task.reward(p, f"... <answer>{ref[i]['answer']}</answer>") == 1.0
        wrong = str(int(ref[i]["answer"]) + 1)
        assert task.reward(p, f"<answer>{wrong}</answer>") == pytest.approx(0.1)
        assert task.reward(p, "no idea") == 0.0
    with pytest.raises(ConfigError, match="no_such_dataset"):
        RLTaskConfig(name="reasoning_gym", kwargs={"dataset": "no_such_dataset"})
