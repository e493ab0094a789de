"""Training traces for verifiable arithmetic in three styles written from the same solver.

The solver evaluates ``a op b op c ...`` with the usual precedence (``*`` before ``+``/``-``, then
left to right) one binary step at a time. Every style writes the same steps and the same final
``<answer>N</answer>``; they differ only in what is said around the steps:

``procedural``  the steps only.
``epistemic``   epistemic verbalization where the work is: every hard step (:func:`is_hard`, e.g.
                an addition whose units carry) is followed by a check, "Wait, let me check:
                4 + 9 = 13, 9 + 3 + 1 = 13, so 133. So it is 133[, not 123]." (column by column,
                :func:`column_check`, or ``check="tens"``: ``94 + 39 = 94 + 30 + 9 = 124 + 9 =
                133``); at half of the checked steps a slip of a small model's kind (a dropped
                carry, the units off) is written first, and later steps use the check's result.
                With ``check="carry"`` the doubt comes before the result instead and there are
                no slips: "Then, 94 + 39. Wait, 4 + 9 = 13, so 94 + 39 = 133." (the units column
                that decides the carry is worked out loud, :func:`carry_note`).
``synonym``     exactly the epistemic trace with "Wait, let me check:" replaced by "Next, let me
                verify:" (with ``check="carry"``: "Wait," by "Note,"): the control for "performance follows the function, not the surface
                tokens". It contains no marker of either counting convention.

Slips and checks are drawn from a generator seeded by the problem index, so the epistemic and
synonym traces of a problem plant the same slips at the same steps.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from jaxlab.registry import Registry
from jaxlab.rl.tasks import ArithmeticTask, Problem

__all__ = [
    "TRACE_STYLES",
    "SYNONYM_WORDS",
    "Step",
    "solve_steps",
    "decompose",
    "column_check",
    "carry_note",
    "is_hard",
    "check_outcomes",
    "step_outcomes",
    "slip_spans",
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


def column_check(step: Step) -> str:
    """A check of an addition ``step`` of non-negative operands done column by column with only
    one-digit sums, units first: ``158 + 93`` -> ``8 + 3 = 11, 5 + 9 + 1 = 15, 1 + 0 + 1 = 2, so
    251`` (the shorter operand padded with 0; each column adds the carry of the one before; the
    result is the last column's sum followed by the units digits of the others, last to first)."""
    a, b = step.left, step.right
    if step.op != "+" or a < 0 or b < 0:
        raise ValueError(f"column_check needs an addition of non-negative integers, got {step}")
    da, db = str(a)[::-1], str(b)[::-1]
    n = max(len(da), len(db))
    da, db = da.ljust(n, "0"), db.ljust(n, "0")
    carry, parts, digits = 0, [], []
    for i in range(n):
        total = int(da[i]) + int(db[i]) + carry
        parts.append(f"{da[i]} + {db[i]}" + (" + 1" if carry else "") + f" = {total}")
        digits.append(str(total) if i == n - 1 else str(total % 10))
        carry = total // 10
    value = "".join(reversed(digits))
    assert int(value) == step.result, (step, value)
    return ", ".join(parts) + f", so {value}"


def carry_note(step: Step) -> str:
    """The work a doubted step shows before its result with ``check="carry"``: the units column
    that decides the carry (``94 + 39`` -> ``4 + 9 = 13``) or the borrow (``53 - 29`` -> ``13 - 9
    = 4``); for products and negative operands :func:`decompose`."""
    a, b = step.left, step.right
    if a >= 0 and b >= 0 and step.op == "+":
        return f"{a % 10} + {b % 10} = {a % 10 + b % 10}"
    if a >= 0 and b >= 0 and step.op == "-" and a >= b:
        ua = a % 10 + (10 if a % 10 < b % 10 else 0)
        return f"{ua} - {b % 10} = {ua - b % 10}"
    return decompose(step)


def is_hard(step: Step) -> bool:
    """Where a check goes: an addition whose units carry, a subtraction whose units borrow, a
    product of two numbers of two or more digits (the steps a small model gets wrong)."""
    a, b = abs(step.left), abs(step.right)
    if step.op == "+":
        return a % 10 + b % 10 >= 10
    if step.op == "-":
        return a % 10 < b % 10
    return a >= 10 and b >= 10


CHECKS = ("columns", "tens", "carry")


def check_of(step: Step, check: str = "columns") -> str:
    """The check written for ``step``: with ``check="columns"`` :func:`column_check` for additions
    of non-negative numbers, :func:`decompose` otherwise; with ``check="tens"`` always
    :func:`decompose` (``94 + 39 = 94 + 30 + 9 = 124 + 9 = 133``: whole numbers, the tens of one
    operand added first); with ``check="carry"`` :func:`carry_note`."""
    if check not in CHECKS:
        raise ValueError(f"check must be one of {CHECKS}, got {check!r}")
    if check == "carry":
        return carry_note(step)
    if check == "columns" and step.op == "+" and step.left >= 0 and step.right >= 0:
        return column_check(step)
    return decompose(step)


def _slip(step: Step, rng: np.random.Generator) -> int:
    """A wrong result of the kind a small fine-tuned model writes: mostly a dropped carry (or
    borrow), else the units or the tens off."""
    dropped = -10 if step.op == "+" else 10
    delta = int(rng.choice([dropped, dropped, dropped, -dropped, -1, 1, -2, 2]))
    return step.result + delta


_EPISTEMIC = {
    "doubt": "Wait, ",
    "check": "Wait, let me check: ",
    "fix": "So it is {r}, not {w}.",
    "confirm": "So it is {r}.",
}
# The synonym phrases' lead words: what a ban of the synonym's own surface words suppresses.
SYNONYM_WORDS: tuple[str, ...] = ("note", "next")
_SYNONYM = {
    "doubt": "Note, ",
    "check": "Next, let me verify: ",
    "fix": "So it is {r}, not {w}.",
    "confirm": "So it is {r}.",
}


def write_trace(
    problem: Problem,
    style: str,
    *,
    index: int = 0,
    slip_prob: float = 0.5,
    easy_check_prob: float = 0.0,
    check: str = "columns",
    seed: int = 0,
) -> str:
    """The ``style`` trace (:data:`TRACE_STYLES`) of an arithmetic ``problem`` (its
    ``meta["expression"]``).

    Epistemic and synonym traces check every hard step (:func:`is_hard`) and, with probability
    ``easy_check_prob``, an easy one; at a checked step a slip (:func:`_slip`) is planted with
    probability ``slip_prob``, and the check's result, not the line above it, is what the trace
    goes on with; ``check`` picks how a step is checked (:func:`check_of`). With
    ``check="carry"`` the hard steps are doubted before their result instead ("Then, 94 + 39.
    Wait, 4 + 9 = 13, so 94 + 39 = 133.") and nothing is planted. ``index`` and ``seed`` seed the
    draws (the same for every style)."""
    TRACE_STYLES.get(style)
    if check not in CHECKS:
        raise ValueError(f"check must be one of {CHECKS}, got {check!r}")
    expr = problem.meta.get("expression")
    if expr is None:
        raise ValueError("write_trace needs an arithmetic problem (meta['expression'])")
    steps = solve_steps(expr)
    rng = np.random.default_rng([seed, index, 7])
    lines = []
    phrases = _EPISTEMIC if style == "epistemic" else _SYNONYM
    for k, s in enumerate(steps):
        head = "First" if k == 0 else ("Finally" if k == len(steps) - 1 and k > 0 else "Then")
        checked = is_hard(s) or rng.random() < easy_check_prob
        slip = checked and rng.random() < slip_prob
        wrong = _slip(s, rng)
        if style == "procedural" or not checked:
            lines.append(f"{head}, {s.left} {s.op} {s.right} = {s.result}.")
            continue
        if check == "carry":
            expr = f"{s.left} {s.op} {s.right}"
            note = carry_note(s)
            lines.append(f"{head}, {expr}. {phrases['doubt']}{note}, so {expr} = {s.result}.")
            continue
        written = wrong if slip else s.result
        lines.append(f"{head}, {s.left} {s.op} {s.right} = {written}.")
        end = phrases["fix" if slip else "confirm"].format(r=s.result, w=wrong)
        lines.append(f"{phrases['check']}{check_of(s, check)}. {end}")
    lines.append(f"<answer>{steps[-1].result}</answer>")
    return "\n".join(lines)


_STEP_LINE = re.compile(r"(-?\d+) ([-+*]) (-?\d+) = (-?\d+)\.?\s*$")
_CHECK_END = re.compile(r"So it is (-?\d+)")


def check_outcomes(text: str) -> dict[str, int]:
    """What the checks of a trace (written or generated, any wording) did, step by step: a step
    line ``..., a op b = w.`` followed by a check line (one with ``": "`` that ends ``So it is
    v...``) counts as ``fixed`` (w wrong, v right), ``missed`` (both wrong), ``kept`` (both right)
    or ``broken`` (w right, v wrong); a step line without a check as ``unchecked_right`` or
    ``unchecked_wrong``. Right and wrong are judged on the operands the trace itself wrote."""
    out = dict.fromkeys(
        ("fixed", "missed", "kept", "broken", "unchecked_right", "unchecked_wrong"), 0
    )
    lines = text.splitlines()
    for j, line in enumerate(lines):
        m = _STEP_LINE.search(line)
        if m is None or ": " in line:
            continue
        a, op, b, w = int(m[1]), m[2], int(m[3]), int(m[4])
        true = _OPS[op](a, b)
        nxt = lines[j + 1] if j + 1 < len(lines) else ""
        end = _CHECK_END.search(nxt) if ": " in nxt else None
        if end is None:
            out["unchecked_right" if w == true else "unchecked_wrong"] += 1
        elif w != true:
            out["fixed" if int(end[1]) == true else "missed"] += 1
        else:
            out["kept" if int(end[1]) == true else "broken"] += 1
    return out


STEP_OUTCOMES = tuple(
    f"{h}_{d}_{r}"
    for h in ("hard", "easy")
    for d in ("doubted", "plain")
    for r in ("right", "wrong")
)


def step_outcomes(text: str) -> dict[str, int]:
    """Every step line ``..., a op b = w.`` of a trace (written or generated, any wording; check
    lines with ``": "`` are skipped) counted by whether the step is hard (:func:`is_hard` on the
    operands the trace wrote), whether the line shows work before its result (a second ``=``, as
    ``check="carry"`` traces do: ``Then, 94 + 39. Wait, 4 + 9 = 13, so 94 + 39 = 133.``) and
    whether ``w`` is right: keys :data:`STEP_OUTCOMES`, e.g. ``hard_doubted_right``."""
    out = dict.fromkeys(STEP_OUTCOMES, 0)
    for line in text.splitlines():
        m = _STEP_LINE.search(line)
        if m is None or ": " in line:
            continue
        a, op, b, w = int(m[1]), m[2], int(m[3]), int(m[4])
        true = _OPS[op](a, b)
        hard = "hard" if is_hard(Step(a, op, b, true)) else "easy"
        doubted = "doubted" if line.count("=") >= 2 else "plain"
        out[f"{hard}_{doubted}_{'right' if w == true else 'wrong'}"] += 1
    return out


_FIX = re.compile(r"So it is (-?\d+), not (-?\d+)\.")


def slip_spans(text: str) -> list[tuple[int, int]]:
    """Character spans ``[a, b)`` of the planted slips of a trace: the wrong result ``w`` at the
    end of each step line whose check ends "So it is r, not w." (for ``no_loss`` in SFT data)."""
    spans, pos = [], 0
    lines = text.split("\n")
    starts = []
    for line in lines:
        starts.append(pos)
        pos += len(line) + 1
    for j in range(1, len(lines)):
        fix = _FIX.search(lines[j])
        step = _STEP_LINE.search(lines[j - 1])
        if fix is None or step is None or step[4] != fix[2]:
            continue
        spans.append((starts[j - 1] + step.start(4), starts[j - 1] + step.end(4)))
    return spans


def trace_dataset(
    style: str,
    num_problems: int,
    *,
    task_seed: int = 0,
    start: int = 0,
    digits: int = 2,
    terms: int = 3,
    ops: str = "+-*",
    check: str = "columns",
    mask_slips: bool = False,
    seed: int = 0,
) -> list[dict]:
    """``num_problems`` chat examples ``{"messages": [user, assistant], "answer", "index"}`` of
    arithmetic problems ``start .. start + num_problems - 1`` (``ArithmeticTask`` with these
    settings) answered in ``style``. With ``mask_slips`` the assistant message carries
    ``"no_loss"``: the :func:`slip_spans` of its trace, so SFT trains the model to read a slip and
    correct it, not to write it."""
    task = ArithmeticTask(digits=digits, terms=terms, ops=ops, seed=task_seed)
    out = []
    for i in range(start, start + num_problems):
        p = task.problem(i)
        trace = write_trace(p, style, index=i, check=check, seed=seed)
        reply = {"role": "assistant", "content": trace}
        if mask_slips:
            reply["no_loss"] = [list(s) for s in slip_spans(trace)]
        out.append(
            {
                "index": i,
                "answer": p.answer,
                "messages": [{"role": "user", "content": p.prompt}, reply],
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
