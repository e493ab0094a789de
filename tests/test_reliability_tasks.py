"""RL answer extraction under hostile model outputs: linear time on 1 MB completions, and the same
answers as the straightforward (backtracking) patterns on ordinary text."""

import re
import time

import numpy as np
import pytest

from jaxlab.rl.tasks import extract_answer, make_task

# The straightforward patterns, fine on short text but quadratic or worse on hostile text; the
# reference for what extract_answer and the knights-and-knaves checker answer.
_REF_TAG = re.compile(r"<answer>(.*?)</answer>", re.S | re.I)
_REF_BOXED = re.compile(r"\\boxed\{((?:[^{}]|\{[^{}]*\})*)\}")
_REF_IS = re.compile(r"(?:final answer|answer)\s*(?:is|:)?\s*[:=]?\s*(.+)", re.I)
_REF_KK = re.compile(r"([A-Za-z]+)\W{0,3}(?:is\s+an?\s+|:\s*|=\s*|-\s*)(knight|knave)", re.I)


def _reference_answer(text):
    for pattern in (_REF_TAG, _REF_BOXED):
        found = pattern.findall(text)
        if found:
            return found[-1].strip()
    lines = [m.group(1).strip() for m in _REF_IS.finditer(text)]
    return lines[-1] if lines else None


PIECES = [
    "<answer>", "</answer>", "<ANSWER>", "</Answer>", "\\boxed{", "{", "}", "answer", "answer is",
    "Final Answer:", " = ", ":", " ", "\n", "42", "-7", "x", "Alice", " is a ", "knight", "knave",
    ", ", "Bob: ",
]  # fmt: skip


def test_extraction_matches_the_reference_patterns_on_random_text():
    rng = np.random.default_rng(0)
    kk = make_task("knights_knaves", people=2)
    problem = kk.problem(0)
    checked = 0
    for _ in range(3000):
        text = "".join(rng.choice(PIECES, size=int(rng.integers(1, 14))))
        # the linear patterns take no whitespace-only rest of a line at the very end of the text
        # as an "answer is" answer; the reference makes it "" there. Not compared.
        if text != text.rstrip():
            continue
        assert extract_answer(text) == _reference_answer(text), repr(text)
        ref = _reference_answer(text)
        want = (
            0.0
            if ref is None
            else (
                1.0
                if {m.group(1).capitalize(): m.group(2).lower() for m in _REF_KK.finditer(ref)}
                == problem.answer
                else 0.1
            )
        )
        # the names found must be exactly the problem's; the reference finds mid-word names
        # ("xAlice") that the linear pattern (word starts only) does not
        if ref is not None and not re.search(r"[A-Za-z](Alice|Bob)", ref):
            assert kk.reward(problem, text) == want, repr(text)
        checked += 1
    assert checked > 1000


def test_knights_and_knaves_answers_in_every_spelling_match_the_reference():
    rng = np.random.default_rng(1)
    task = make_task("knights_knaves", people=4)
    separators = [": ", ":", " is a ", " is an ", " = ", "=", " - ", " -- ", " is  a ", ", ", " "]
    for index in range(300):
        problem = task.problem(index)
        names = list(problem.answer)
        roles = [
            problem.answer[n] if rng.random() < 0.7 else rng.choice(["knight", "knave"])
            for n in names
        ]
        shown = [n if rng.random() < 0.9 else n.lower() for n in names]
        parts = [f"{n}{rng.choice(separators)}{r}" for n, r in zip(shown, roles)]
        if rng.random() < 0.2:
            parts = parts[:-1]
        answer = ", ".join(parts)
        text = f"Thinking... <answer>{answer}</answer>"
        found = {m.group(1).capitalize(): m.group(2).lower() for m in _REF_KK.finditer(answer)}
        want = 1.0 if found == problem.answer else 0.1
        assert task.reward(problem, text) == want, text


HOSTILE = {
    "letters_in_tags": "<answer>" + "A" * 1_000_000 + "</answer>",
    "unclosed_tags": "<answer>" * 125_000,
    "unclosed_tags_then_text": "<answer> x " * 90_000,
    "newlines_after_answer": "answer" + "\n" * 1_000_000,
    "spaces_after_answer_is": ("answer is" + " " * 1000 + "\n") * 1000,
    "unclosed_boxed": "\\boxed{" * 140_000,
    "nested_braces": "\\boxed{" + "{" * 1_000_000 + "}" * 10,
    "digits_and_commas": "1," * 500_000,
    "knights_words": "<answer>" + "Alice is a " * 90_000 + "</answer>",
    "knights_spaces": "<answer>Alice is" + " " * 1_000_000 + "</answer>",
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_megabyte_outputs_are_scored_fast(name):
    text = HOSTILE[name]
    assert len(text) >= 900_000
    tasks = [
        make_task("arithmetic"),
        make_task("countdown"),
        make_task("knights_knaves"),
        make_task("toy_digits"),
    ]
    start = time.perf_counter()
    for task in tasks:
        reward = task.reward(task.problem(0), text)
        assert 0.0 <= reward <= 1.0
    elapsed = time.perf_counter() - start
    # the backtracking patterns took over 20 s on 50 kB; linear ones take well under a second
    assert elapsed < 3.0, f"{name}: {elapsed:.2f} s"
