"""Answer sufficiency along a trace: how much the trace prefix ``s_t`` already determines the answer.

At checkpoints t (numbers of response tokens kept) the task's answer prefix is appended to
``prompt + response[:t]`` and the model is asked for the answer right there:

- ``log p(y* | s_t)``: the teacher-forced log-probability of the ground-truth answer (and the
  answer suffix that closes it), all checkpoints in one batched forward pass;
- ``H(Y | s_t)``: the plug-in entropy of the answers in K samples at each checkpoint, all
  checkpoints × K samples in one batched generation (the shared generation core: the prefill of
  each checkpoint is shared by its K samples).

A trace that reaches *information sufficiency* drives H(Y | s_t) to ~0 with y* the answer; a
stagnant one leaves it flat.

Letters: C checkpoints, K samples per checkpoint.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from collections.abc import Callable, Sequence

import numpy as np

from jaxlab.analysis.information import token_logprobs
from jaxlab.generation.generate import generate_rows
from jaxlab.generation.params import SamplingParams

__all__ = [
    "SufficiencyCurve",
    "checkpoint_positions",
    "empirical_entropy",
    "answer_logprob_at",
    "sample_answers_at",
    "answer_sufficiency",
]


def checkpoint_positions(num_tokens: int, num_checkpoints: int) -> np.ndarray:
    """``[C]`` evenly spaced prefix lengths from 0 (the prompt alone) to ``num_tokens`` (the whole
    response), distinct and increasing."""
    if num_checkpoints < 1:
        raise ValueError(f"num_checkpoints must be >= 1, got {num_checkpoints}")
    if num_checkpoints == 1:
        return np.asarray([num_tokens], np.int64)
    return np.unique(np.round(np.linspace(0, num_tokens, num_checkpoints)).astype(np.int64))


def empirical_entropy(samples: Sequence[str]) -> float:
    """Plug-in entropy (nats) of the empirical distribution of ``samples``: ``-Σ q log q`` over the
    distinct values' frequencies q. Biased low by about (distinct - 1) / (2K) nats."""
    if not samples:
        raise ValueError("entropy of no samples")
    k = len(samples)
    return float(-sum(c / k * math.log(c / k) for c in Counter(samples).values()))


def _encode_answer(tokenizer, prefix: str, answer: str, suffix: str) -> tuple[list[int], list[int]]:
    """``(prefix ids, answer + suffix ids)``, encoded together so that the split matches how the
    text tokenizes; if the joint encoding does not start with the prefix's own tokens, separately."""
    pre = tokenizer.encode(prefix, add_special_tokens=False) if prefix else []
    joint = tokenizer.encode(prefix + answer + suffix, add_special_tokens=False)
    if joint[: len(pre)] == pre:
        return pre, joint[len(pre) :]
    return pre, tokenizer.encode(answer + suffix, add_special_tokens=False)


def answer_logprob_at(
    model,
    prompt_ids: Sequence[int],
    response_ids: Sequence[int],
    checkpoints: Sequence[int],
    prefix_ids: Sequence[int],
    answer_ids: Sequence[int],
    *,
    pad_id: int = 0,
    batch_size: int = 8,
) -> np.ndarray:
    """``[C]`` ``log p(answer_ids | prompt, response[:t], prefix)`` (nats) for each checkpoint t,
    teacher-forced in batched forward passes."""
    if not answer_ids:
        raise ValueError("the answer has no tokens")
    head = [int(i) for i in prompt_ids]
    resp = [int(i) for i in response_ids]
    rows = [head + resp[: int(t)] + list(prefix_ids) + list(answer_ids) for t in checkpoints]
    lps = token_logprobs(model, rows, batch_size=batch_size, pad_id=pad_id)
    n = len(answer_ids)
    return np.asarray([float(lp[-n:].astype(np.float64).sum()) for lp in lps])


def sample_answers_at(
    model,
    tokenizer,
    prompt_ids: Sequence[int],
    response_ids: Sequence[int],
    checkpoints: Sequence[int],
    prefix_ids: Sequence[int],
    *,
    suffix: str,
    num_samples: int = 16,
    temperature: float = 1.0,
    max_answer_tokens: int = 16,
    seed: int = 0,
) -> list[list[str]]:
    """``[C][K]`` answers sampled after ``prompt + response[:t] + prefix``: one generation of C
    prompts × ``n = K`` samples; each answer is the text up to ``suffix`` (stripped)."""
    head = [int(i) for i in prompt_ids]
    resp = [int(i) for i in response_ids]
    rows = [head + resp[: int(t)] + list(prefix_ids) for t in checkpoints]
    batch = tokenizer.pad(rows)
    params = SamplingParams(
        max_new_tokens=max_answer_tokens,
        temperature=temperature,
        n=num_samples,
        seed=seed,
        stop=(suffix,) if suffix else (),
    )
    out = generate_rows(
        model,
        batch.input_ids,
        batch.attention_mask,
        params,
        eos_ids=tokenizer.eos_token_ids,
        pad_id=tokenizer.pad_token_id,
    )
    answers = []
    for c in range(len(rows)):
        got = []
        for k in range(num_samples):
            r = c * num_samples + k
            text = tokenizer.decode(out.tokens[r, : int(out.lengths[r])])
            if suffix and suffix in text:
                text = text[: text.index(suffix)]
            got.append(text.strip())
        answers.append(got)
    return answers


@dataclasses.dataclass
class SufficiencyCurve:
    """Answer sufficiency at checkpoints along one trace."""

    checkpoints: np.ndarray  # [C] response tokens kept
    logp_answer: np.ndarray  # [C] log p(y* | s_t), nats (answer and suffix tokens)
    entropy: np.ndarray  # [C] plug-in entropy (nats) of the K sampled answers
    accuracy: np.ndarray  # [C] fraction of the K samples equal to y* (after normalize)
    answers: list[list[str]]  # [C][K] normalized sampled answers
    answer: str

    def to_dict(self) -> dict:
        return {
            "answer": self.answer,
            "checkpoints": self.checkpoints.tolist(),
            "logp_answer": self.logp_answer.tolist(),
            "entropy": self.entropy.tolist(),
            "accuracy": self.accuracy.tolist(),
            "answers": self.answers,
        }


def answer_sufficiency(
    model,
    tokenizer,
    prompt_ids: Sequence[int],
    response_ids: Sequence[int],
    answer: str,
    *,
    checkpoints: int | Sequence[int] = 20,
    answer_prefix: str = "<answer>",
    answer_suffix: str = "</answer>",
    num_samples: int = 16,
    temperature: float = 1.0,
    max_answer_tokens: int = 16,
    seed: int = 0,
    normalize: Callable[[str], str] = str.strip,
    batch_size: int = 8,
) -> SufficiencyCurve:
    """The sufficiency curve of one trace (``prompt_ids`` then ``response_ids``, token ids).

    Args:
      answer: the ground truth y* as the model should write it between prefix and suffix.
      checkpoints: a number of evenly spaced checkpoints (:func:`checkpoint_positions`), or the
        prefix lengths themselves.
      answer_prefix / answer_suffix: the task's answer format, e.g. ``<answer>`` ... ``</answer>``;
        the prefix is forced at each checkpoint, sampling stops at the suffix.
      num_samples: K answers sampled per checkpoint (``temperature``; ``max_answer_tokens`` each).
      normalize: maps a sampled answer (text before the suffix) to the value compared and counted.
    """
    resp = [int(i) for i in response_ids]
    if isinstance(checkpoints, int):
        cps = checkpoint_positions(len(resp), checkpoints)
    else:
        cps = np.asarray(sorted({int(t) for t in checkpoints}), np.int64)
        if len(cps) == 0 or cps[0] < 0 or cps[-1] > len(resp):
            raise ValueError(f"checkpoints must lie in [0, {len(resp)}], got {list(checkpoints)}")
    prefix_ids, answer_ids = _encode_answer(tokenizer, answer_prefix, answer, answer_suffix)
    logp = answer_logprob_at(
        model, prompt_ids, resp, cps, prefix_ids, answer_ids,
        pad_id=tokenizer.pad_token_id, batch_size=batch_size,
    )  # fmt: skip
    raw = sample_answers_at(
        model, tokenizer, prompt_ids, resp, cps, prefix_ids, suffix=answer_suffix,
        num_samples=num_samples, temperature=temperature, max_answer_tokens=max_answer_tokens,
        seed=seed,
    )  # fmt: skip
    answers = [[normalize(a) for a in row] for row in raw]
    target = normalize(answer)
    return SufficiencyCurve(
        checkpoints=cps,
        logp_answer=logp,
        entropy=np.asarray([empirical_entropy(row) for row in answers]),
        accuracy=np.asarray([np.mean([a == target for a in row]) for row in answers]),
        answers=answers,
        answer=answer,
    )
