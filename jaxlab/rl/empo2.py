"""EMPO² (Liu et al., 2026, arXiv:2602.23008): memory-augmented exploration with hybrid on- and
off-policy updates. The pieces, as pure functions, with the mechanics of the authors' code
(agent-lightning ``contrib``: ``empo2_agent.py``, ``env_verl/trainer.py``, ``daemon.py``,
``core_empo2.py``):

- modes, one per update (:data:`MODES`, :func:`sample_mode`): ``off_policy`` (p 0.17): roll out
  with tips, update without them, the ratio taken against the behaviour log-probs computed with
  tips; ``on_policy_tips`` (p 0.08): roll out and update with tips; ``on_policy`` (p 0.75): GRPO.
- the tip block (:func:`tip_block`) put into the prompt when memories are retrieved, and
  :func:`strip_spans` which removes it from a token sequence by its start and end token patterns
  (the reference's ``remove_pattern_ranges``);
- tip generation after an episode (:func:`tip_prompt`, :func:`memory_content`);
- whole-response masking (:func:`low_prob_mask`): a response whose smallest behaviour log-prob is
  below -5 is left out of the loss;
- the intrinsic novelty reward (:func:`intrinsic_reward`): 1 / (retrieved count + 1).

Letters: B responses, T tokens.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np

from jaxlab.registry import Registry

__all__ = [
    "MODES",
    "MODE_PROBS",
    "TIP_OPEN",
    "TIP_CLOSE",
    "sample_mode",
    "tip_block",
    "strip_spans",
    "find_spans",
    "tip_patterns",
    "tip_prompt",
    "memory_content",
    "low_prob_mask",
    "intrinsic_reward",
]

# What each mode does: (roll out with tips, train with tips in the prompt).
MODES: Registry = Registry("EMPO2 mode")
MODES.register("off_policy", (True, False))
MODES.register("on_policy_tips", (True, True))
MODES.register("on_policy", (False, False))
MODE_PROBS = {"off_policy": 0.17, "on_policy_tips": 0.08, "on_policy": 0.75}

TIP_OPEN = "<tip>"
TIP_CLOSE = "</tip>"
TIP_HEADER = "Here are some memories you collected in your previous exploration:"
TIP_INSTRUCTION = (
    "The episode above has ended. In two or three sentences, write tips for playing this game "
    "again: what you found where, which actions helped and which did not."
)


def sample_mode(rng: np.random.Generator, probs: Mapping[str, float] = MODE_PROBS) -> str:
    """One mode name drawn with ``probs`` (which must sum to 1), as the reference draws one
    ``random.random()`` per training step."""
    names = list(probs)
    p = np.asarray([probs[n] for n in names], np.float64)
    for n in names:
        MODES.get(n)
    if np.any(p < 0) or abs(p.sum() - 1.0) > 1e-6:
        raise ValueError(f"mode probabilities must be >= 0 and sum to 1, got {dict(probs)}")
    u = rng.random()
    return names[min(int(np.searchsorted(np.cumsum(p), u, side="right")), len(names) - 1)]


def tip_block(contents: Sequence[str]) -> str:
    """The text put at the start of the user message when memories were retrieved ('' when none
    were). It opens with :data:`TIP_OPEN` and ends with ``TIP_CLOSE + "\\n"``: byte-level BPE
    tokenizers split it from its neighbours at the same places as standalone, so
    ``strip_spans(ids, encode(TIP_OPEN), encode(TIP_CLOSE + "\\n"))`` gives exactly the tokens of
    the prompt without it (:func:`tip_patterns`)."""
    if not contents:
        return ""
    lines = "\n".join(f"- {c}" for c in contents)
    return f"{TIP_OPEN}\n{TIP_HEADER}\n{lines}\n{TIP_CLOSE}\n"


def tip_patterns(encode) -> tuple[list[int], list[int]]:
    """The start and end token patterns of a tip block under ``encode(text) -> ids``."""
    return list(encode(TIP_OPEN)), list(encode(TIP_CLOSE + "\n"))


def find_spans(
    ids: Sequence[int], start: Sequence[int], end: Sequence[int]
) -> list[tuple[int, int]]:
    """Half-open ``[i, j)`` spans of ``ids`` from each occurrence of the token pattern ``start``
    through the next occurrence of ``end`` (inclusive). An unclosed start is an error."""
    ids, start, end = list(ids), list(start), list(end)
    if not start or not end:
        raise ValueError("strip patterns must be non-empty token sequences")
    spans, i = [], 0
    while i <= len(ids) - len(start):
        if ids[i : i + len(start)] != start:
            i += 1
            continue
        j = i + len(start)
        while j <= len(ids) - len(end) and ids[j : j + len(end)] != end:
            j += 1
        if j > len(ids) - len(end):
            raise ValueError(f"a tip span opened at token {i} is never closed")
        spans.append((i, j + len(end)))
        i = j + len(end)
    return spans


def strip_spans(ids: Sequence[int], start: Sequence[int], end: Sequence[int]) -> list[int]:
    """``ids`` without the spans :func:`find_spans` finds: the prompt an off-policy update trains
    on, from the prompt the rollout sampled with."""
    out, prev = [], 0
    for i, j in find_spans(ids, start, end):
        out.extend(ids[prev:i])
        prev = j
    out.extend(ids[prev:])
    return [int(t) for t in out]


def tip_prompt(goal: str, trajectory: Sequence[tuple[str, str]], score: float) -> str:
    """The user message asking the policy for tips after an episode of (observation, action)."""
    steps = "\n".join(f"Observation: {o}\nAction: {a}" for o, a in trajectory)
    return f"Goal: {goal}\n{steps}\nFinal score: {score:g}/1\n\n{TIP_INSTRUCTION}"


def memory_content(tips: str, action: str, score: float) -> str:
    """The memory stored for one step of an episode (the reference's wording)."""
    return (
        f"{tips.strip()}; At that timestep, the specific action you took was {action}; "
        f"Eventually you got the score {score:g}/1."
    )


def low_prob_mask(behaviour_logp: jax.Array, mask: jax.Array, threshold: float = -5.0):
    """Keeps ``[B]`` (float 0/1): 0 for a response whose smallest behaviour log-prob over its
    ``mask``-ed tokens ``[B, T]`` is below ``threshold`` (the whole response leaves the loss)."""
    chex.assert_rank([behaviour_logp, mask], 2)
    chex.assert_equal_shape([behaviour_logp, mask])
    m = mask.astype(bool)
    lowest = jnp.min(jnp.where(m, behaviour_logp, jnp.inf), axis=-1)
    return (lowest >= threshold).astype(jnp.float32)


def intrinsic_reward(count):
    """Novelty bonus 1 / (count + 1) for ``count`` retrieved memories (1 for a new state)."""
    c = np.asarray(count, np.float64)
    if np.any(c < 0):
        raise ValueError(f"memory counts must be >= 0, got {count}")
    return 1.0 / (c + 1.0)
