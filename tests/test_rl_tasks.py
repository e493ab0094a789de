"""Verifiable tasks: deterministic, solvable, and rewards that accept right answers and only those."""

import itertools
import re
import subprocess
import sys
from fractions import Fraction

import pytest

from jaxlab.rl.tasks import (
    TASKS,
    extract_answer,
    extract_number,
    make_task,
    task_dataset,
)

# tasks built from a source take it as kwargs; jsonl (a file's lines) is tested in
# tests/test_rl_user_tasks.py
SOURCES = {
    "jsonl": None,
    "reasoning_gym": {"dataset": "leg_counting", "size": 20},
    "mixture": {"families": [{"name": "arithmetic"}, {"name": "countdown"}]},
}


@pytest.mark.parametrize("name", [n for n in TASKS.names() if SOURCES.get(n, {}) is not None])
def test_tasks_are_deterministic_across_processes(name):
    kw = SOURCES.get(name, {})
    here = [make_task(name, seed=7, **kw).problem(i).prompt for i in range(5)]
    code = (
        f"from jaxlab.rl.tasks import make_task; "
        f"print(repr([make_task({name!r}, seed=7, **{kw!r}).problem(i).prompt for i in range(5)]))"
    )
    there = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert there.stdout.strip() == repr(here)
    assert make_task(name, seed=8, **kw).problem(0).prompt != here[0] or name == "knights_knaves"


def _evaluate(text):
    """A separately written evaluator (recursive descent, exact Fractions) of integers, + - * /,
    unary minus and parentheses with the usual precedence; None for anything else or a division by
    zero. The reference for the tasks' own evaluator."""
    tokens = re.findall(r"\d+|\S", text)
    pos = 0

    def peek():
        return tokens[pos] if pos < len(tokens) else None

    def take():
        nonlocal pos
        if pos == len(tokens):
            raise SyntaxError("unexpected end")
        pos += 1
        return tokens[pos - 1]

    def expression():
        value = term()
        while peek() in ("+", "-"):
            op, right = take(), term()
            value = value + right if op == "+" else value - right
        return value

    def term():
        value = factor()
        while peek() in ("*", "/"):
            op, right = take(), factor()
            if op == "/" and right == 0:
                raise ZeroDivisionError
            value = value * right if op == "*" else value / right
        return value

    def factor():
        token = take()
        if token == "-":
            return -factor()
        if token == "(":
            value = expression()
            if take() != ")":
                raise SyntaxError("unclosed parenthesis")
            return value
        if token.isdigit():
            return Fraction(int(token))
        raise SyntaxError(token)

    try:
        value = expression()
    except (SyntaxError, ZeroDivisionError):
        return None
    return value if pos == len(tokens) else None


def test_reference_evaluator():
    assert _evaluate("2 + 3 * 4") == 14 and _evaluate("(2 + 3) * 4") == 20
    assert _evaluate("7 - 2 - 1") == 4 and _evaluate("8 / 4 / 2") == 1  # left-associative
    assert _evaluate("6 / 4 * 2") == 3 and _evaluate("1 / 3") == Fraction(1, 3)
    assert _evaluate("-(2 - 5) * -2") == -6
    for bad in ("2 ** 3", "1 / 0", "(1 + 2", "1 2", "3.0", "1e3", "+3", "", "abs(-1)"):
        assert _evaluate(bad) is None, bad


def test_arithmetic_answers_and_rewards():
    """The answer of the expression as the prompt shows it, by Python's integer arithmetic and by
    the reference evaluator; rewards by the task's own rule (1 right, 0.1 formatted, 0 else)."""
    task = make_task("arithmetic", digits=3, terms=3, seed=0)
    for i in range(40):
        p = task.problem(i)
        expr = re.fullmatch(r"What is (.+)\? Think step by step.*", p.prompt, re.S).group(1)
        assert re.fullmatch(r"\d+( [-+*] \d+){2}", expr), expr
        value = eval(expr, {"__builtins__": {}})  # digits and + - * only (checked above)
        assert p.answer == value == _evaluate(expr)
        assert task.reward(p, f"... so the result is <answer>{value}</answer>") == 1.0
        assert task.reward(p, f"<answer>{value + 1}</answer>") == 0.1
        assert task.reward(p, f"<answer>{-value}</answer>") == (1.0 if value == 0 else 0.1)
        assert task.reward(p, "I don't know") == 0.0
    p = task.problem(0)
    assert (
        task.reward(p, f"The answer is \\boxed{{{p.answer:,}}}.") == 1.0
    )  # boxed, with a thousands comma
    assert task.reward(p, f"Final answer: {p.answer}") == 1.0


def _all_expressions(numbers):
    """Every expression over ``numbers`` (in every order, each once) with + - * / and every
    bracketing."""
    if len(numbers) == 1:
        yield str(numbers[0])
        return
    for split in range(1, len(numbers)):
        for left_idx in itertools.combinations(range(len(numbers)), split):
            left = [numbers[k] for k in left_idx]
            right = [numbers[k] for k in range(len(numbers)) if k not in left_idx]
            for a in _all_expressions(left):
                for b in _all_expressions(right):
                    for op in "+-*/":
                        yield f"({a} {op} {b})"


def test_countdown_rewards_equal_an_independent_check():
    """Problems solvable as the prompt states them; the reward of every expression over the
    numbers (and of some with a number missing or repeated) equals the rule applied with the
    reference evaluator: 1 when it uses each given number once and equals the target, else 0.1."""
    task = make_task("countdown", count=3, seed=3)
    right = 0
    for i in range(20):
        p = task.problem(i)
        m = re.search(
            r"Using the numbers \[([\d, ]+)\], create an equation that equals (\d+)\.", p.prompt
        )
        numbers, target = [int(x) for x in m.group(1).split(",")], int(m.group(2))
        assert (numbers, target) == (p.meta["numbers"], p.answer)
        sol = p.meta["solution"]
        assert _evaluate(sol) == target
        assert sorted(int(x) for x in re.findall(r"\d+", sol)) == sorted(numbers)
        candidates = list(_all_expressions(numbers))
        candidates += (
            list(_all_expressions(numbers[:2]))
            + list(_all_expressions(numbers + numbers[:1]))[:200]
        )  # a number missing; a number used twice
        for expr in candidates:
            used = sorted(int(x) for x in re.findall(r"\d+", expr))
            value = _evaluate(expr)
            want = 1.0 if used == sorted(numbers) and value == target else 0.1
            assert task.reward(p, f"<answer>{expr}</answer>") == want, expr
            right += want == 1.0
        assert task.reward(p, f"<answer>{sol} = {target}</answer>") == 1.0
    assert right > 20  # more solutions than the generated ones, some through fractions
    p = task.problem(0)
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
        match="unknown task 'chess'; known: arithmetic, countdown, jsonl, knights_knaves, "
        "mixture, reasoning_gym, toy_digits",
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
