"""Test-time controls of epistemic verbalization, as in Section 3.4.3 of the information-allocation
paper (reference: ``eval/utils/epistemic_controls.py`` and ``eval/eval_section_3_4_3.py``):

``baseline``     the prompt as it is.
``suppress``     a logit bias of -100 on every token id that is, on its own, a surface form of one
                 of the 13 marker words (:func:`jaxlab.analysis.markers.expand_surface_forms`:
                 prefixes "", " ", "\\n", "\\n ", "\\t"; lower / Capitalized / UPPER; with and without
                 ". , : ; ! ?"). Surfaces that take several tokens are not blocked, as in the
                 reference.
``induce``       a 1- or 2-shot prompt before the question, with the reference's instruction
                 ("Below are examples of a solution. In this way, you can express uncertainty by
                 using phrases such as "hmm" or "wait."") and worked examples in the task's format.
``insert_wait``  generate once, then append ``"\\n\\nWait {answer} is not the answer. Please think
                 again.\\n"`` after the response and continue. The reference does this after every
                 response; ``wait_when="wrong"`` only after a wrong one (a correct one is kept).

Every mode runs through :func:`jaxlab.generation.generate` with a per-request
:class:`~jaxlab.generation.SamplingParams` (``logit_bias`` for ``suppress``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence

import numpy as np

from jaxlab.analysis.markers import (
    EPISTEMIC_WORDS,
    count_epistemic,
    single_token_surface_ids,
)
from jaxlab.errors import UserError
from jaxlab.generation.generate import generate
from jaxlab.generation.params import SamplingParams
from jaxlab.registry import Registry
from jaxlab.rl.tasks import ArithmeticTask, Problem, Task, extract_answer

__all__ = [
    "INTERVENTIONS",
    "INDUCTION_INSTRUCTION",
    "suppression_logit_bias",
    "induction_examples",
    "induction_prompt",
    "wait_message",
    "InterventionResult",
    "run_intervention",
    "wilson_interval",
]

INTERVENTIONS = Registry("intervention")
for _name in ("baseline", "suppress", "induce", "insert_wait"):
    INTERVENTIONS.register(_name, _name)

INDUCTION_INSTRUCTION = (
    "Below are examples of a solution. In this way, you can express uncertainty by using phrases "
    'such as "hmm" or "wait."\n\n'
)


def suppression_logit_bias(
    tokenizer, words: Iterable[str] = EPISTEMIC_WORDS, bias: float = -100.0
) -> dict[int, float]:
    """``{token id: bias}`` for every single-token surface form of ``words`` (the ``suppress``
    control); pass it as ``SamplingParams(logit_bias=...)``."""
    ids, _ = single_token_surface_ids(tokenizer, words)
    return {i: float(bias) for i in ids}


def induction_examples(num_shots: int) -> list[str]:
    """The worked examples of the ``induce`` prompt: epistemic-style traces of fixed arithmetic
    problems (the task's own format; the reference's are two long competition-math solutions)."""
    from jaxlab.analysis.traces import write_trace

    if num_shots not in (1, 2):
        raise UserError(f"num_shots must be 1 or 2, got {num_shots}")
    task = ArithmeticTask(digits=2, terms=3, ops="+-", seed=12345)
    out = []
    for k in range(num_shots):
        p = task.problem(k)
        trace = write_trace(p, "epistemic", index=k, slip_prob=0.5, easy_check_prob=1.0, seed=1)
        out.append(f"[Example {k + 1}] {p.prompt}\n{trace}")
    return out


def induction_prompt(question: str, num_shots: int = 2) -> str:
    """The reference's instruction, ``num_shots`` worked examples, then ``question``."""
    shots = "\n\n".join(induction_examples(num_shots))
    return INDUCTION_INSTRUCTION + shots + "\n\n" + question


def wait_message(answer: str | None) -> str:
    """The reference's intervention text for a response that answered ``answer``."""
    cleaned = (answer or "").strip()
    if cleaned:
        return f"Wait {cleaned} is not the answer. Please think again.\n"
    return "Wait that is not the answer. Please think again.\n"


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion (``successes`` of ``n``; ``z`` = 1.96 for
    95%): ``(c - h, c + h)`` with ``c = (p + z^2 / 2n) / (1 + z^2 / n)`` and
    ``h = z sqrt(p (1 - p) / n + z^2 / 4n^2) / (1 + z^2 / n)``. Unlike ``p +- z sqrt(p (1 - p) / n)``
    it stays inside [0, 1] and is not empty at 0 or n successes."""
    if n < 1 or not 0 <= successes <= n:
        raise UserError(
            f"wilson_interval needs 0 <= successes <= n and n >= 1, got {successes}, {n}"
        )
    p = successes / n
    d = 1.0 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return float(max(c - h, 0.0)), float(min(c + h, 1.0))


@dataclasses.dataclass
class InterventionResult:
    mode: str
    accuracy: float  # mean reward == 1 over problems (one response each)
    markers_per_response: float  # word-boundary count (the paper's convention)
    markers_substring_per_response: float
    tokens_per_response: float
    suppressed_ids: int
    prompts: list[str]
    responses: list[str]
    rewards: list[float]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def run_intervention(
    model,
    tokenizer,
    task: Task,
    problems: Sequence[Problem],
    mode: str,
    *,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    seed: int = 0,
    num_shots: int = 2,
    wait_when: str = "always",
    wait_max_new_tokens: int | None = None,
    chat: bool = True,
    suppress_words: Iterable[str] = EPISTEMIC_WORDS,
) -> InterventionResult:
    """Runs one control (:data:`INTERVENTIONS`) on ``problems`` and scores the responses with
    ``task.reward`` (1.0 = correct). ``suppress`` bans every single-token surface form of
    ``suppress_words`` (the 13 markers by default; other words for a control, e.g. a synonym's)."""
    INTERVENTIONS.get(mode)
    if wait_when not in ("always", "wrong"):
        raise UserError(f"wait_when must be 'always' or 'wrong', got {wait_when!r}")
    bias = suppression_logit_bias(tokenizer, tuple(suppress_words)) if mode == "suppress" else {}
    params = SamplingParams(
        max_new_tokens=max_new_tokens, temperature=temperature, seed=seed, logit_bias=bias
    )
    questions = [p.prompt for p in problems]
    if mode == "induce":
        questions = [induction_prompt(q, num_shots) for q in questions]
    rendered = [tokenizer.apply_chat_template(q) for q in questions] if chat else questions
    res = generate(model, tokenizer, rendered, params)
    responses = list(res.texts)
    lengths = [int(n) for n in res.lengths]
    if mode == "insert_wait":
        redo = [
            i
            for i, (p, r) in enumerate(zip(problems, responses))
            if wait_when == "always" or task.reward(p, r) < 1.0
        ]
        if redo:
            follow = [
                rendered[i]
                + responses[i].rstrip()
                + "\n\n"
                + wait_message(extract_answer(responses[i]))
                for i in redo
            ]
            more = generate(
                model,
                tokenizer,
                follow,
                params.replace(max_new_tokens=wait_max_new_tokens or max_new_tokens),
            )
            for j, i in enumerate(redo):
                msg = wait_message(extract_answer(responses[i]))
                responses[i] = responses[i].rstrip() + "\n\n" + msg + more.texts[j]
                lengths[i] += int(more.lengths[j])
    rewards = [float(task.reward(p, r)) for p, r in zip(problems, responses)]
    n = max(len(responses), 1)
    return InterventionResult(
        mode=mode,
        accuracy=float(np.mean([r == 1.0 for r in rewards])) if rewards else 0.0,
        markers_per_response=sum(count_epistemic(r, "word_boundary") for r in responses) / n,
        markers_substring_per_response=sum(count_epistemic(r, "substring") for r in responses) / n,
        tokens_per_response=sum(lengths) / n,
        suppressed_ids=len(bias),
        prompts=rendered,
        responses=responses,
        rewards=rewards,
    )
