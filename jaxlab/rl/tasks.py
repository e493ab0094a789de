"""Verifiable tasks for RL: deterministic problem generators, answer extraction and rewards.

Each task makes problem ``i`` of a seeded stream deterministically, so a dataset is just a range
of indices (a grain ``MapDataset``), reproducible and resumable. Rewards are 1.0 for a correct
answer, ``format_reward`` (default 0.1) for a well-formed but wrong one, 0.0 otherwise.

Tasks, by name: ``arithmetic`` (multi-digit expressions), ``countdown`` (reach a target with given
numbers, each used once), ``knights_knaves`` (who tells the truth), and ``toy_digits`` (a dense
reward for smoke tests of tiny models); users' own: ``jsonl`` and ``reasoning_gym``, or a Task
class by import path (:mod:`jaxlab.rl.user_tasks`, docs/rl.md).
"""

from __future__ import annotations

import abc
import ast
import dataclasses
import importlib
import inspect
import itertools
import operator
import re
import zlib
from collections import Counter
from collections.abc import Callable
from fractions import Fraction
from typing import Any

import numpy as np

from jaxlab.errors import UserError
from jaxlab.registry import Registry

__all__ = [
    "Problem",
    "Task",
    "TASKS",
    "make_task",
    "load_task_class",
    "task_dataset",
    "extract_answer",
    "extract_number",
    "ArithmeticTask",
    "CountdownTask",
    "KnightsKnavesTask",
]

TASKS = Registry("task")

# A policy can emit anything, so every pattern here runs in time linear in the completion: no
# nested or adjacent quantifiers that can trade characters (possessive ``++`` / ``*+`` and atomic
# ``(?>...)`` groups where they would), and tags are paired by one scan instead of a lazy ``.*?``
# that rescans the rest of the text from every unclosed ``<answer>``.
_TAG = re.compile(r"<(/?)answer>", re.I)
_BOXED = re.compile(r"\\boxed\{((?:[^{}]++|\{[^{}]*+\})*+)\}")
_ANSWER_IS = re.compile(r"(?:final answer|answer)(?>\s*)(?:is|:)?(?>\s*)[:=]?(?>\s*)(.+)", re.I)
_NUMBER = re.compile(r"-?\d[\d,]*+(?:\.\d+)?")
_KNIGHT_OR_KNAVE = re.compile(
    r"\b([A-Za-z]++)\W{0,3}(?:is\s++an?\s++|:\s*+|=\s*+|-\s*+)(knight|knave)", re.I
)


def _last_answer_tag(text: str) -> str | None:
    """The content of the last ``<answer>...</answer>`` pair, pairing each opening tag with the
    next closing tag and skipping closing tags that open nothing (as ``re.findall`` of
    ``<answer>(.*?)</answer>`` does), in one pass."""
    last, start = None, None
    for m in _TAG.finditer(text):
        if start is None:
            if not m.group(1):
                start = m.end()
        elif m.group(1):
            last, start = text[start : m.start()], None
    return last


def extract_answer(text: str) -> str | None:
    """The answer a completion commits to: the last ``<answer>...</answer>``, else the last
    ``\\boxed{...}``, else what follows the last "answer is" / "answer:" on its line, else None.

    Linear time in ``len(text)`` (a hostile 1 MB completion takes milliseconds)."""
    tagged = _last_answer_tag(text)
    if tagged is not None:
        return tagged.strip()
    boxed = None
    for m in _BOXED.finditer(text):
        boxed = m.group(1)
    if boxed is not None:
        return boxed.strip()
    said = None
    for m in _ANSWER_IS.finditer(text):
        said = m.group(1)
    return said.strip() if said is not None else None


def extract_number(text: str) -> Fraction | None:
    """A number from an answer (or, failing that, the last number in the text); commas ignored."""
    answer = extract_answer(text)
    for source in (answer, text):
        if source:
            found = _NUMBER.findall(source)
            if found:
                candidate = found[0] if source is answer else found[-1]
                try:
                    return Fraction(candidate.replace(",", ""))
                except ValueError:
                    continue
    return None


@dataclasses.dataclass(frozen=True)
class Problem:
    prompt: str
    answer: Any
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_record(self) -> dict[str, Any]:
        return {"prompt": self.prompt, "answer": repr(self.answer), "meta": repr(self.meta)}


class Task(abc.ABC):
    """Abstract base: subclasses define ``problem(i)`` and ``reward(problem, completion)``."""

    name = "task"

    def __init__(self, *, seed: int = 0, format_reward: float = 0.1):
        if not isinstance(format_reward, int | float) or not 0.0 <= format_reward <= 1.0:
            raise ValueError(f"format_reward must lie in [0, 1], got {format_reward!r}")
        self.seed = seed
        self.format_reward = format_reward

    def rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, index, zlib.crc32(self.name.encode())])

    @abc.abstractmethod
    def problem(self, index: int) -> Problem:
        """Problem ``index`` of this task's seeded stream (deterministic)."""

    @abc.abstractmethod
    def reward(self, problem: Problem, completion: str) -> float:
        """The verifiable reward of ``completion`` for ``problem``."""


# -- arithmetic ----------------------------------------------------------------------------------------


@TASKS.register("arithmetic")
class ArithmeticTask(Task):
    """``a op b [op c]`` with multi-digit integers; the answer is an integer."""

    name = "arithmetic"

    def __init__(self, *, digits: int = 2, terms: int = 2, ops: str = "+-*", **kw):
        super().__init__(**kw)
        if digits < 1 or terms < 2 or not ops or set(ops) - set("+-*"):
            raise ValueError(
                f"arithmetic: digits >= 1, terms >= 2 and ops from '+-*', got {digits}, {terms}, {ops!r}"
            )
        self.digits, self.terms, self.ops = digits, terms, ops

    def problem(self, index: int) -> Problem:
        rng = self.rng(index)
        lo, hi = 10 ** (self.digits - 1), 10**self.digits - 1
        nums = [int(rng.integers(lo, hi + 1)) for _ in range(self.terms)]
        ops = [self.ops[int(rng.integers(len(self.ops)))] for _ in range(self.terms - 1)]
        expr = " ".join(
            str(nums[0]) if i == 0 else f"{ops[i - 1]} {nums[i]}" for i in range(self.terms)
        )
        value = _safe_eval(expr)
        prompt = (
            f"What is {expr}? Think step by step, then give the final answer as "
            "<answer>NUMBER</answer>."
        )
        return Problem(prompt, int(value), {"expression": expr})

    def reward(self, problem: Problem, completion: str) -> float:
        got = extract_number(completion)
        if got is not None and got == problem.answer:
            return 1.0
        return self.format_reward if extract_answer(completion) is not None else 0.0


# -- countdown -----------------------------------------------------------------------------------------

_OPS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
}


def _safe_eval(expr: str) -> Fraction:
    """Evaluates +, -, *, / and parentheses over integers exactly; anything else raises ValueError."""

    def ev(node):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            left, right = ev(node.left), ev(node.right)
            if isinstance(node.op, ast.Div) and right == 0:
                raise ValueError("division by zero")
            return _OPS[type(node.op)](left, right)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -ev(node.operand)
        if (
            isinstance(node, ast.Constant)
            and isinstance(node.value, int)
            and not isinstance(node.value, bool)
        ):
            return Fraction(node.value)
        raise ValueError(f"not allowed in an expression: {ast.dump(node)[:40]}")

    if len(expr) > 200:
        raise ValueError("expression too long")
    try:
        tree = ast.parse(expr.strip(), mode="eval")
    except SyntaxError as e:
        raise ValueError(f"not an expression: {e}") from None
    return ev(tree)


def _numbers_in(expr: str) -> list[int]:
    return [int(x) for x in re.findall(r"\d+", expr)]


@TASKS.register("countdown")
class CountdownTask(Task):
    """Reach ``target`` with + - * / and parentheses, using each given number exactly once.

    Problems are made by combining the numbers along a random expression tree, so each has a
    solution with positive integer intermediate results.
    """

    name = "countdown"

    def __init__(self, *, count: int = 3, max_number: int = 50, **kw):
        super().__init__(**kw)
        if count < 2 or max_number < 2:
            raise ValueError(
                f"countdown: count >= 2 and max_number >= 2, got {count}, {max_number}"
            )
        self.count, self.max_number = count, max_number

    def problem(self, index: int) -> Problem:
        rng = self.rng(index)
        for _ in range(1000):
            nums = [int(rng.integers(1, self.max_number + 1)) for _ in range(self.count)]
            items = [(Fraction(n), str(n)) for n in nums]
            while len(items) > 1:
                i, j = sorted(rng.choice(len(items), size=2, replace=False))
                (a, ea), (b, eb) = items[i], items[j]
                if rng.random() < 0.5:
                    (a, ea), (b, eb) = (b, eb), (a, ea)
                op = "+-*/"[int(rng.integers(4))]
                if op == "-" and a - b <= 0 or op == "/" and (b == 0 or (a / b).denominator != 1):
                    op = "+"
                value = {"+": a + b, "-": a - b, "*": a * b, "/": a / b if b else a + b}[op]
                items = [x for k, x in enumerate(items) if k not in (i, j)] + [
                    (value, f"({ea} {op} {eb})")
                ]
            target, solution = items[0]
            if target.denominator == 1 and 1 <= target <= 1000:
                break
        shuffled = [nums[k] for k in rng.permutation(len(nums))]
        prompt = (
            f"Using the numbers {shuffled}, create an equation that equals {int(target)}. You may use "
            "+, -, * and / and parentheses, and each number exactly once. Show your reasoning, then give "
            "only the equation as <answer>EQUATION</answer>."
        )
        return Problem(prompt, int(target), {"numbers": shuffled, "solution": solution[1:-1]})

    def reward(self, problem: Problem, completion: str) -> float:
        answer = extract_answer(completion)
        if answer is None:
            return 0.0
        expr = answer.split("=")[0]
        try:
            value = _safe_eval(expr)
        except ValueError:
            return self.format_reward
        if Counter(_numbers_in(expr)) != Counter(problem.meta["numbers"]):
            return self.format_reward
        return 1.0 if value == problem.answer else self.format_reward


# -- knights and knaves --------------------------------------------------------------------------------

_NAMES = ["Alice", "Bob", "Carol", "Dave", "Eve", "Frank", "Grace", "Heidi"]


@TASKS.register("knights_knaves")
class KnightsKnavesTask(Task):
    """Knights always tell the truth, knaves always lie; each person makes one statement about
    others. Problems are generated until exactly one assignment is consistent."""

    name = "knights_knaves"

    def __init__(self, *, people: int = 3, **kw):
        super().__init__(**kw)
        if not 2 <= people <= len(_NAMES):
            raise ValueError(f"knights_knaves: people must be in [2, {len(_NAMES)}], got {people}")
        self.people = people

    def _statement(self, rng, speaker: int):
        others = [k for k in range(self.people) if k != speaker]
        kind = int(rng.integers(3))
        a, b = (int(x) for x in rng.choice(others, size=2, replace=len(others) < 2))
        if kind == 0 or a == b:
            role = bool(rng.integers(2))
            text = f"{_NAMES[a]} is a {'knight' if role else 'knave'}."
            return text, (lambda t, a=a, role=role: t[a] == role)
        if kind == 1:
            text = f"{_NAMES[a]} and {_NAMES[b]} are both knights."
            return text, (lambda t, a=a, b=b: t[a] and t[b])
        text = f"{_NAMES[a]} and I are the same kind."
        return text, (lambda t, a=a, s=speaker: t[a] == t[s])

    def problem(self, index: int) -> Problem:
        rng = self.rng(index)
        for _ in range(1000):
            statements = [self._statement(rng, s) for s in range(self.people)]
            consistent = [
                t
                for t in itertools.product([True, False], repeat=self.people)
                if all(fn(t) == t[s] for s, (_, fn) in enumerate(statements))
            ]
            if len(consistent) == 1:
                break
        truth = consistent[0]
        names = _NAMES[: self.people]
        said = " ".join(f'{names[s]} says: "{text}"' for s, (text, _) in enumerate(statements))
        prompt = (
            f"On an island, knights always tell the truth and knaves always lie. {said} Who is a knight "
            f"and who is a knave? Answer as <answer>{names[0]}: knight/knave, ...</answer>."
        )
        return Problem(prompt, {n: ("knight" if t else "knave") for n, t in zip(names, truth)})

    def reward(self, problem: Problem, completion: str) -> float:
        answer = extract_answer(completion)
        if answer is None:
            return 0.0
        found = {
            m.group(1).capitalize(): m.group(2).lower() for m in _KNIGHT_OR_KNAVE.finditer(answer)
        }
        if set(found) != set(problem.answer):
            return self.format_reward
        return 1.0 if found == problem.answer else self.format_reward


@TASKS.register("toy_digits")
class ToyDigitsTask(Task):
    """A smoke-test task for tiny models: the reward is the fraction of completion characters that
    are digits (a random character-level policy starts near 10%)."""

    name = "toy_digits"

    def problem(self, index: int) -> Problem:
        rng = self.rng(index)
        return Problem(f"Write some digits {int(rng.integers(100))}:", None)

    def reward(self, problem: Problem, completion: str) -> float:
        return sum(ch.isdigit() for ch in completion) / len(completion) if completion else 0.0


def load_task_class(path: str) -> Callable[..., Task]:
    """``"package.module:Attribute"`` imported: a Task subclass or a callable returning a Task.
    UserError naming what is wrong (the module, the attribute, the type)."""
    module, sep, attr = path.partition(":")
    if not sep or not module or not attr:
        raise UserError(f"task {path!r}: an import path is 'package.module:ClassName'")
    try:
        value: Any = importlib.import_module(module)
    except ImportError as e:
        raise UserError(f"task {path!r}: cannot import module {module!r} ({e})") from None
    for part in attr.split("."):
        if not hasattr(value, part):
            raise UserError(f"task {path!r}: module {module!r} has no attribute {attr!r}")
        value = getattr(value, part)
    if inspect.isclass(value) and not issubclass(value, Task):
        raise UserError(
            f"task {path!r}: {value.__name__} is not a jaxlab.rl.tasks.Task subclass "
            "(docs/rl.md shows the protocol)"
        )
    if not callable(value):
        raise UserError(f"task {path!r}: {attr} is a {type(value).__name__}, not a Task class")
    return value


# users' own tasks (jaxlab.rl.user_tasks): problems from JSONL with a named verifier, reasoning-gym
TASKS.register_lazy("jsonl", "jaxlab.rl.user_tasks:JsonlTask")
TASKS.register_lazy("reasoning_gym", "jaxlab.rl.user_tasks:ReasoningGymTask")
TASKS.register_lazy("mixture", "jaxlab.rl.self_distill:MixtureTask")  # several families


def make_task(name: str, **kwargs) -> Task:
    """A task by registry name, or by import path ``"package.module:ClassName"`` (a Task subclass
    the user wrote); an unknown name lists the known ones."""
    if name not in TASKS and ":" in name:
        task = load_task_class(name)(**kwargs)
        if not isinstance(task, Task):
            raise TypeError(f"task {name!r} made a {type(task).__name__}, not a Task")
        return task
    return TASKS.get(name)(**kwargs)


def task_dataset(task: Task, num_problems: int, *, shuffle_seed: int | None = None):
    """A grain ``MapDataset`` of ``{"index", "prompt"}`` records (the index re-creates the problem)."""
    import grain

    ds = grain.MapDataset.range(num_problems)
    if shuffle_seed is not None:
        ds = ds.shuffle(seed=shuffle_seed)
    return ds.map(lambda i: {"index": int(i), "prompt": task.problem(int(i)).prompt})
