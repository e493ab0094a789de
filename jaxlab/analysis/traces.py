"""Training traces for verifiable arithmetic in three styles written from the same solver.

The solver evaluates ``a op b op c ...`` with the usual precedence (``*`` before ``+``/``-``, then
left to right) one binary step at a time. Every style writes the same steps and the same final
``<answer>N</answer>``; they differ only in what is said around the steps:

``procedural``  the steps only.
``epistemic``   epistemic verbalization that does work: at some steps a slip is planted (a wrong
                result is written), doubt is stated ("Wait, that seems off."), the step is checked
                by decomposing it (``23 * 4 = 20 * 4 + 3 * 4 = 80 + 12 = 92``) and the slip is
                corrected; at other steps a correct result is checked the same way ("Hmm, let me
                check ... Yes, that is correct."). Later steps use the corrected value.
``synonym``     exactly the epistemic trace with every marker word replaced by a neutral phrase
                that keeps its function ("Hold on", "let me verify", "that holds"): the control
                for "performance follows the function, not the surface tokens". It contains no
                marker of either counting convention.

Slips and checks are drawn from a generator seeded by the problem index, so the epistemic and
synonym traces of a problem plant the same slips at the same steps.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from jaxlab.registry import Registry
from jaxlab.rl.tasks import ArithmeticTask, Problem

__all__ = [
    "TRACE_STYLES",
    "Step",
    "solve_steps",
    "decompose",
    "write_trace",
    "trace_dataset",
    "write_sft_jsonl",
]

TRACE_STYLES = Registry("trace style")
for _name in ("procedural", "epistemic", "synonym"):
    TRACE_STYLES.register(_name, _name)


@dataclasses.dataclass(frozen=True)
class Step:
    left: int
    op: str
    right: int
    result: int


_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def solve_steps(expression: str) -> list[Step]:
    """The binary steps that evaluate ``expression`` (integers and ``+ - *``, space separated)."""
    parts = expression.split()
    if len(parts) % 2 == 0 or not parts:
        raise ValueError(f"not an expression of the form 'a op b ...': {expression!r}")
    nums = [int(p) for p in parts[0::2]]
    ops = parts[1::2]
    if set(ops) - set(_OPS):
        raise ValueError(f"unsupported operator in {expression!r}")
    steps: list[Step] = []
    for prec in ("*", "+-"):  # multiplications first, then additions / subtractions, left to right
        i = 0
        while i < len(ops):
            if ops[i] not in prec:
                i += 1
                continue
            a, b = nums[i], nums[i + 1]
            r = _OPS[ops[i]](a, b)
            steps.append(Step(a, ops[i], b, r))
            nums[i : i + 2] = [r]
            del ops[i]
    return steps


def decompose(step: Step) -> str:
    """A check of ``step`` that does the work another way: split the right operand into tens and
    units (or the left one for a small right operand), e.g. ``23 * 4 = 20 * 4 + 3 * 4 = 80 + 12 = 92``."""
    a, op, b, r = step.left, step.op, step.right, step.result
    if op == "*":
        big, small = (a, b) if abs(a) >= abs(b) else (b, a)
        tens, units = (abs(big) // 10) * 10, abs(big) % 10
        sign = -1 if big < 0 else 1
        if tens == 0 or units == 0:
            return f"{a} * {b} = {r}"
        t, u = sign * tens * small, sign * units * small
        return (
            f"{a} * {b} = {sign * tens} * {small} + {sign * units} * {small} = {t} + {u} = {r}"
        ).replace("+ -", "- ")
    tens, units = (abs(b) // 10) * 10, abs(b) % 10
    if tens == 0 or units == 0:
        return f"{a} {op} {b} = {r}"
    mid = a + tens if op == "+" else a - tens
    return f"{a} {op} {b} = {a} {op} {tens} {op} {units} = {mid} {op} {units} = {r}"


def _slip(result: int, rng: np.random.Generator) -> int:
    delta = int(rng.choice([-10, -2, -1, 1, 2, 10]))
    return result + delta


_EPISTEMIC = {
    "doubt": "Wait, that seems off. Let me check: ",
    "fix": "So it is {r}, not {w}.",
    "probe": "Hmm, let me check: ",
    "confirm": "Yes, that is correct.",
}
_SYNONYM = {
    "doubt": "Hold on, that looks off. Let me verify: ",
    "fix": "So it is {r}, not {w}.",
    "probe": "Now, let me verify: ",
    "confirm": "Yes, that holds.",
}


def write_trace(
    problem: Problem,
    style: str,
    *,
    index: int = 0,
    slip_prob: float = 0.35,
    check_prob: float = 0.5,
    seed: int = 0,
) -> str:
    """The ``style`` trace (:data:`TRACE_STYLES`) of an arithmetic ``problem`` (its
    ``meta["expression"]``); ``index`` seeds where slips and checks go (the same for every
    style)."""
    TRACE_STYLES.get(style)
    expr = problem.meta.get("expression")
    if expr is None:
        raise ValueError("write_trace needs an arithmetic problem (meta['expression'])")
    steps = solve_steps(expr)
    rng = np.random.default_rng([seed, index, 7])
    lines = []
    phrases = _EPISTEMIC if style == "epistemic" else _SYNONYM
    for k, s in enumerate(steps):
        head = "First" if k == 0 else ("Finally" if k == len(steps) - 1 and k > 0 else "Then")
        slip = rng.random() < slip_prob
        check = rng.random() < check_prob
        wrong = _slip(s.result, rng)
        if style == "procedural" or not (slip or check):
            lines.append(f"{head}, {s.left} {s.op} {s.right} = {s.result}.")
        elif slip:
            lines.append(f"{head}, {s.left} {s.op} {s.right} = {wrong}.")
            fix = phrases["fix"].format(r=s.result, w=wrong)
            lines.append(f"{phrases['doubt']}{decompose(s)}. {fix}")
        else:
            lines.append(f"{head}, {s.left} {s.op} {s.right} = {s.result}.")
            lines.append(f"{phrases['probe']}{decompose(s)}. {phrases['confirm']}")
    lines.append(f"<answer>{steps[-1].result}</answer>")
    return "\n".join(lines)


def trace_dataset(
    style: str,
    num_problems: int,
    *,
    task_seed: int = 0,
    start: int = 0,
    digits: int = 2,
    terms: int = 3,
    ops: str = "+-*",
    seed: int = 0,
) -> list[dict]:
    """``num_problems`` chat examples ``{"messages": [user, assistant], "answer", "index"}`` of
    arithmetic problems ``start .. start + num_problems - 1`` (``ArithmeticTask`` with these
    settings) answered in ``style``."""
    task = ArithmeticTask(digits=digits, terms=terms, ops=ops, seed=task_seed)
    out = []
    for i in range(start, start + num_problems):
        p = task.problem(i)
        out.append(
            {
                "index": i,
                "answer": p.answer,
                "messages": [
                    {"role": "user", "content": p.prompt},
                    {"role": "assistant", "content": write_trace(p, style, index=i, seed=seed)},
                ],
            }
        )
    return out


def write_sft_jsonl(examples: Iterable[dict], path: str | Path) -> Path:
    """Writes chat examples one JSON object per line (what ``python -m jaxlab sft`` reads)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for ex in examples:
            f.write(json.dumps(ex) + "\n")
    return path
