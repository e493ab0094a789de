"""Users' own RL tasks: a Task class by import path, ``{prompt, answer}`` JSONL files scored by a
named verifier, and reasoning-gym datasets by name.

* ``task: {name: "my_pkg.tasks:MyTask", kwargs: {...}}``: any :class:`~jaxlab.rl.tasks.Task`
  subclass (or a function returning a Task) that Python can import; it is made as
  ``MyTask(seed=task.seed, **kwargs)``.
* ``task: {name: jsonl, kwargs: {path: problems.jsonl, verifier: math}}``: one problem per line,
  ``{"prompt": ..., "answer": ...}``; the verifier (:data:`VERIFIERS`: ``exact``, ``numeric``,
  ``multiple_choice``, ``math`` through math-verify) compares the completion's answer with it.
* ``task: {name: reasoning_gym, kwargs: {dataset: leg_counting, config: {...}}}``: the dataset
  built offline by reasoning-gym and scored by its own ``score_answer``.

Rewards follow the built-in tasks: 1.0 for a correct answer, ``format_reward`` for a committed but
wrong one (``<answer>...</answer>``, ``\\boxed{}`` or "answer is ..."), 0.0 otherwise. Problem
``i`` of a file of ``n`` problems is line ``i mod n`` (a run of more prompts goes round again).
"""

from __future__ import annotations

import re
import threading
import unicodedata
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path
from typing import Any

from jaxlab.errors import UserError
from jaxlab.jsonl import read_jsonl
from jaxlab.registry import Registry
from jaxlab.rl.tasks import Problem, Task, extract_answer, extract_number, load_task_class

__all__ = [
    "VERIFIERS",
    "JsonlTask",
    "ReasoningGymTask",
    "load_task_class",
    "verify_exact",
    "verify_numeric",
    "verify_multiple_choice",
    "verify_math",
]

# fn(completion, gold) -> bool: is the completion's committed answer the gold one?
VERIFIERS: Registry[Callable[[str, Any], bool]] = Registry("verifier")

_MAX_ANSWER_CHARS = 2000  # what a verifier parses of an answer (math-verify runs sympy on it)


# -- verifiers ---------------------------------------------------------------------------------------


def _answer(completion: str) -> str | None:
    answer = extract_answer(completion)
    return None if answer is None else answer[:_MAX_ANSWER_CHARS]


def _normal(text: str) -> str:
    return " ".join(unicodedata.normalize("NFKC", str(text)).casefold().split()).strip(" .")


@VERIFIERS.register("exact")
def verify_exact(completion: str, gold: Any) -> bool:
    """The committed answer equals ``gold`` up to case, Unicode form, surrounding whitespace and a
    final period."""
    answer = _answer(completion)
    return answer is not None and _normal(answer) == _normal(gold)


def _fraction(value: Any) -> Fraction | None:
    try:
        return Fraction(str(value).replace(",", "").strip())
    except (ValueError, ZeroDivisionError):
        return None


@VERIFIERS.register("numeric")
def verify_numeric(completion: str, gold: Any) -> bool:
    """The completion's number (its answer's first number, else its last) equals ``gold`` exactly
    (integers, decimals and fractions like "3/4"; commas ignored)."""
    want = _fraction(gold)
    if want is None:
        raise UserError(f"numeric verifier: the answer {gold!r} is not a number")
    answer = _answer(completion)
    if answer is not None:
        whole = _fraction(answer)
        if whole is not None:
            return whole == want
    got = extract_number(completion)
    return got is not None and got == want


_CHOICE = re.compile(r"^\W{0,3}([A-Za-z])(?:\W|$)")


@VERIFIERS.register("multiple_choice")
def verify_multiple_choice(completion: str, gold: Any) -> bool:
    """The answer's option letter ("B", "(b)", "B. text") equals ``gold``'s letter."""
    want = _CHOICE.match(str(gold).strip())
    if want is None:
        raise UserError(f"multiple_choice verifier: the answer {gold!r} is not an option letter")
    answer = _answer(completion)
    got = _CHOICE.match(answer.strip()) if answer is not None else None
    return got is not None and got.group(1).upper() == want.group(1).upper()


@VERIFIERS.register("math")
def verify_math(completion: str, gold: Any) -> bool:
    """math-verify's equivalence of the committed answer (or the whole completion, as math-verify
    reads a \\boxed{} or final expression) and ``gold`` (LaTeX or plain: "\\frac{1}{2}", "0.5",
    "(x+1)^2" and "x^2+2x+1" are equal)."""
    from math_verify import parse, verify

    # math-verify bounds its sympy work with SIGALRM, which only the main thread may set
    limit = 5 if threading.current_thread() is threading.main_thread() else None
    answer = _answer(completion)
    text = completion[-_MAX_ANSWER_CHARS:] if answer is None else answer
    gold_text = str(gold)
    wrap = lambda s: s if "$" in s or "\\boxed" in s else f"${s}$"
    want = parse(wrap(gold_text), parsing_timeout=limit) or parse(gold_text, parsing_timeout=limit)
    if not want:
        raise UserError(f"math verifier: math-verify cannot parse the answer {gold_text!r}")
    got = parse(wrap(text), parsing_timeout=limit) or parse(text, parsing_timeout=limit)
    return bool(got) and bool(verify(want, got, timeout_seconds=limit))


# -- tasks ------------------------------------------------------------------------------------------


class JsonlTask(Task):
    """Problems from a JSONL file of ``{"prompt", "answer"}`` objects, scored by a named verifier.

    ``prompt_suffix`` is appended to every prompt (e.g. an instruction on the answer's form);
    further keys of a record travel in ``Problem.meta``. A bad record is a UserError naming the file
    and line, raised when the task is made (before any training)."""

    name = "jsonl"

    def __init__(self, *, path: str, verifier: str = "exact", prompt_suffix: str = "", **kw):
        super().__init__(**kw)
        if verifier not in VERIFIERS:
            raise ValueError(f"verifier {verifier!r} is not one of {', '.join(VERIFIERS.names())}")
        self.path, self.verifier_name = Path(path), verifier
        self.verify = VERIFIERS.get(verifier)
        self.problems: list[Problem] = []
        for n, record in read_jsonl(self.path, what="task file"):
            where = f"{self.path}:{n}"
            if not isinstance(record, dict) or not {"prompt", "answer"} <= set(record):
                raise UserError(f"{where}: a task record is an object with 'prompt' and 'answer'")
            if not isinstance(record["prompt"], str) or not record["prompt"].strip():
                raise UserError(f"{where}: 'prompt' must be a non-empty string")
            if record["answer"] is None or isinstance(record["answer"], (dict, list)):
                raise UserError(f"{where}: 'answer' must be a string or a number")
            meta = {k: v for k, v in record.items() if k not in ("prompt", "answer")}
            meta["line"] = n
            self.problems.append(Problem(record["prompt"] + prompt_suffix, record["answer"], meta))
        if not self.problems:
            raise UserError(f"{self.path}: no problems")
        if verifier in ("numeric", "multiple_choice", "math"):  # a gold answer the verifier refuses
            for p in self.problems:
                try:
                    self.verify("", p.answer)
                except UserError as e:
                    raise UserError(f"{self.path}:{p.meta['line']}: {e}") from None

    def problem(self, index: int) -> Problem:
        return self.problems[index % len(self.problems)]

    def reward(self, problem: Problem, completion: str) -> float:
        if self.verify(completion, problem.answer):
            return 1.0
        return self.format_reward if extract_answer(completion) is not None else 0.0


class ReasoningGymTask(Task):
    """A reasoning-gym dataset by name (built offline, deterministic in ``seed``), scored by its own
    ``score_answer`` on the completion's committed answer. ``size`` problems; ``config`` holds the
    dataset's own options (e.g. ``{"min_animals": 2}``)."""

    name = "reasoning_gym"

    def __init__(
        self,
        *,
        dataset: str,
        size: int = 1000,
        config: dict[str, Any] | None = None,
        prompt_suffix: str = " Give the final answer as <answer>ANSWER</answer>.",
        **kw,
    ):
        super().__init__(**kw)
        import reasoning_gym

        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        try:
            self.data = reasoning_gym.create_dataset(
                dataset, size=size, seed=self.seed, **(config or {})
            )
        except (KeyError, ValueError) as e:
            names = sorted(getattr(reasoning_gym.factory, "DATASETS", {}))
            known = (
                f" (reasoning-gym has {len(names)}: {', '.join(names[:12])}, ...)" if names else ""
            )
            raise ValueError(f"reasoning-gym dataset {dataset!r}: {e}{known}") from None
        except TypeError as e:
            raise ValueError(f"reasoning-gym dataset {dataset!r}: bad config ({e})") from None
        self.dataset, self.size, self.prompt_suffix = dataset, size, prompt_suffix

    def problem(self, index: int) -> Problem:
        entry = self.data[index % self.size]
        return Problem(entry["question"] + self.prompt_suffix, entry["answer"], {"entry": entry})

    def reward(self, problem: Problem, completion: str) -> float:
        answer = _answer(completion)
        if answer is None:
            return 0.0
        score = float(self.data.score_answer(answer=answer, entry=problem.meta["entry"]))
        return score if score >= 1.0 else max(score, self.format_reward)
