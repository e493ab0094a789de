"""Verifiable tasks: deterministic, solvable, and rewards that accept right answers and only those."""

import itertools
import re
import subprocess
import sys
from collections import Counter

import pytest

from jaxlab.rl.tasks import (
    TASKS,
    _numbers_in,
    _safe_eval,
    extract_answer,
    extract_number,
    make_task,
    task_dataset,
)


@pytest.mark.parametrize("name", TASKS.names())
def test_tasks_are_deterministic_across_processes(name):
    here = [make_task(name, seed=7).problem(i).prompt for i in range(5)]
    code = (
        f"from jaxlab.rl.tasks import make_task; "
        f"print(repr([make_task({name!r}, seed=7).problem(i).prompt for i in range(5)]))"
    )
    there = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert there.stdout.strip() == repr(here)
    assert make_task(name, seed=8).problem(0).prompt != here[0] or name == "knights_knaves"


def test_arithmetic_rewards():
    task = make_task("arithmetic", digits=3, terms=3, seed=0)
    for i in range(20):
        p = task.problem(i)
        assert p.answer == _safe_eval(p.meta["expression"])
        assert task.reward(p, f"... so the result is <answer>{p.answer}</answer>") == 1.0
        assert task.reward(p, f"<answer>{p.answer + 1}</answer>") == 0.1
        assert task.reward(p, "I don't know") == 0.0
    p = task.problem(0)
    assert (
        task.reward(p, f"The answer is \\boxed{{{p.answer:,}}}.") == 1.0
    )  # boxed, with a thousands comma
    assert task.reward(p, f"Final answer: {p.answer}") == 1.0


def test_countdown_problems_are_solvable_and_checked_strictly():
    task = make_task("countdown", count=4, seed=3)
    for i in range(30):
        p = task.problem(i)
        sol = p.meta["solution"]
        assert _safe_eval(sol) == p.answer
        assert Counter(_numbers_in(sol)) == Counter(p.meta["numbers"])
        assert task.reward(p, f"<answer>{sol}</answer>") == 1.0
        assert task.reward(p, f"<answer>{sol} = {p.answer}</answer>") == 1.0
    p = task.problem(0)
    nums = p.meta["numbers"]
    assert (
        task.reward(p, f"<answer>{' + '.join(map(str, nums[:-1]))}</answer>") == 0.1
    )  # a number unused
    assert (
        task.reward(p, "<answer>__import__('os').system('true')</answer>") == 0.1
    )  # never evaluated
    assert task.reward(p, "no tags") == 0.0


def _consistent_assignments(prompt, names):
    statements = re.findall(r'(\w+) says: "([^"]+)"', prompt)
    out = []
    for roles in itertools.product([True, False], repeat=len(names)):
        knight = dict(zip(names, roles))
        ok = True
        for speaker, text in statements:
            if m := re.fullmatch(r"(\w+) is a (knight|knave)\.", text):
                claim = knight[m.group(1)] == (m.group(2) == "knight")
            elif m := re.fullmatch(r"(\w+) and (\w+) are both knights\.", text):
                claim = knight[m.group(1)] and knight[m.group(2)]
            elif m := re.fullmatch(r"(\w+) and I are the same kind\.", text):
                claim = knight[m.group(1)] == knight[speaker]
            else:
                raise AssertionError(f"unparsed statement {text!r}")
            ok &= claim == knight[speaker]
        if ok:
            out.append({n: "knight" if knight[n] else "knave" for n in names})
    return out


def test_knights_and_knaves_have_unique_solutions():
    task = make_task("knights_knaves", people=4, seed=1)
    for i in range(10):
        p = task.problem(i)
        names = list(p.answer)
        assert len(names) == 4
        right = ", ".join(f"{n}: {r}" for n, r in p.answer.items())
        assert task.reward(p, f"<answer>{right}</answer>") == 1.0
        flipped = dict(
            p.answer, **{names[0]: "knight" if p.answer[names[0]] == "knave" else "knave"}
        )
        assert (
            task.reward(
                p, "<answer>" + ", ".join(f"{n} is a {r}" for n, r in flipped.items()) + "</answer>"
            )
            == 0.1
        )
        # brute force over the statements as rendered in the prompt: exactly one consistent assignment
        assert _consistent_assignments(p.prompt, names) == [p.answer]


def test_answer_extraction():
    assert extract_answer("x <answer> 42 </answer> y <answer>7</answer>") == "7"
    assert extract_answer("so \\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
    assert extract_answer("The answer is 12.") == "12."
    assert extract_answer("nothing here") is None
    assert extract_number("The answer is -1,234.") == -1234
    assert extract_number("we get 3 then 5") == 5


def test_unknown_task_and_bad_settings():  # noqa: D103
    with pytest.raises(
        ValueError,
        match="unknown task 'chess'; known: arithmetic, countdown, knights_knaves, toy_digits",
    ):
        make_task("chess")
    with pytest.raises(ValueError, match="countdown: count >= 2"):
        make_task("countdown", count=1)


def test_task_dataset_is_a_resumable_grain_dataset():
    task = make_task("arithmetic", seed=0)
    ds = task_dataset(task, 10, shuffle_seed=1)
    records = [ds[i] for i in range(10)]
    assert sorted(r["index"] for r in records) == list(range(10))
    assert all(r["prompt"] == task.problem(r["index"]).prompt for r in records)
    it = iter(ds.to_iter_dataset())
    first = [next(it) for _ in range(3)]
    state = it.get_state()
    rest = [next(it)["index"] for _ in range(3)]
    it2 = iter(ds.to_iter_dataset())
    it2.set_state(state)
    assert [next(it2)["index"] for _ in range(3)] == rest and len(first) == 3
