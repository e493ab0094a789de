"""``SamplingParams``: one validated description of how a request is sampled.

``generate``, the ``Engine``, the RL trainer and the server all take it. Semantics follow the
OpenAI API and vLLM where they define a setting:

- ``temperature=0`` is greedy (argmax); otherwise logits are divided by the temperature.
- ``top_k`` (0 = off) keeps the k most likely tokens, ``top_p`` (1 = off) the smallest set of most
  likely tokens whose probability reaches ``top_p`` (computed after top-k), ``min_p`` (0 = off)
  the tokens at least ``min_p`` times as likely as the most likely one.
- ``repetition_penalty`` (1 = off; HF / vLLM): a token seen in the prompt or the output has its
  logit divided by the penalty when positive, multiplied when negative. ``presence_penalty`` and
  ``frequency_penalty`` (0 = off; OpenAI): ``logit -= presence · [count > 0] + frequency · count``
  over the tokens generated so far. ``logit_bias`` adds a bias to the logits of token ids.
  All of these apply before temperature and filtering, in that order.
- ``stop`` strings end a sequence at their first occurrence (the text ends before it);
  ``stop_token_ids`` end it at the token (kept), as the model's end-of-sequence tokens do unless
  ``ignore_eos``.
- ``seed``: a request's samples depend only on its seed, its sample index and the token index, not
  on the other requests that share a batch or on the slot it runs in. ``None``: a seed is drawn.
- ``logprobs=n`` also returns the n most likely tokens (under the model's own distribution) with
  their log-probabilities at every step, 0 <= n <= 20.
- ``n`` samples per prompt share one prefill.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

from jaxlab.errors import ConfigError

__all__ = ["SamplingParams", "MAX_LOGPROBS"]

MAX_LOGPROBS = 20  # the most top-n alternatives a request may ask for (OpenAI's limit)
_MAX_SEED = 2**63


def _fail(field: str, message: str):
    raise ConfigError(f"SamplingParams: {field} {message}")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """How one request is sampled; frozen and validated (a bad value names its field).

    ``stop`` accepts a string or a sequence of strings, ``stop_token_ids`` a sequence of ids and
    ``logit_bias`` a mapping of token id to bias in [-100, 100]; they are stored as tuples so
    that the params are hashable.
    """

    max_new_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    logit_bias: tuple[tuple[int, float], ...] = ()
    seed: int | None = None
    logprobs: int = 0
    n: int = 1
    ignore_eos: bool = False

    def __post_init__(self):
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            _fail("max_new_tokens", f"must be >= 1 (an int), got {self.max_new_tokens!r}")
        for name in (
            "temperature",
            "top_p",
            "min_p",
            "presence_penalty",
            "frequency_penalty",
            "repetition_penalty",
        ):
            value = getattr(self, name)
            if not _is_number(value) or value != value or abs(value) == float("inf"):
                _fail(name, f"must be a finite number, got {value!r}")
            set_(name, float(value))
        if self.temperature < 0:
            _fail("temperature", f"must be >= 0 (0 is greedy), got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            _fail("top_p", f"must lie in (0, 1], got {self.top_p}")
        if not _is_int(self.top_k) or self.top_k < 0:
            _fail("top_k", f"must be an int >= 0 (0 is off), got {self.top_k!r}")
        if not 0.0 <= self.min_p <= 1.0:
            _fail("min_p", f"must lie in [0, 1], got {self.min_p}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                _fail(name, f"must lie in [-2, 2], got {getattr(self, name)}")
        if not 0.0 < self.repetition_penalty <= 10.0:
            _fail("repetition_penalty", f"must lie in (0, 10], got {self.repetition_penalty}")
        stop = (self.stop,) if isinstance(self.stop, str) else self.stop
        if stop is None:
            stop = ()
        if not isinstance(stop, Iterable) or not all(isinstance(s, str) for s in stop):
            _fail("stop", f"must be a string or a list of strings, got {self.stop!r}")
        stop = tuple(stop)
        if any(not s for s in stop):
            _fail("stop", "must not hold an empty string (it would end every sequence at once)")
        set_("stop", stop)
        ids = self.stop_token_ids if self.stop_token_ids is not None else ()
        if not isinstance(ids, Iterable) or not all(_is_int(t) and t >= 0 for t in ids):
            _fail("stop_token_ids", f"must be a list of token ids >= 0, got {ids!r}")
        set_("stop_token_ids", tuple(int(t) for t in ids))
        bias = self.logit_bias if self.logit_bias is not None else ()
        items = bias.items() if isinstance(bias, Mapping) else bias
        try:
            pairs = [(int(str(k)) if isinstance(k, str) else k, v) for k, v in items]
        except (TypeError, ValueError):
            _fail("logit_bias", f"must map token ids to biases, got {bias!r}")
        for k, v in pairs:
            if not _is_int(k) or k < 0:
                _fail("logit_bias", f"keys must be token ids >= 0, got {k!r}")
            if not _is_number(v) or not -100.0 <= v <= 100.0:
                _fail("logit_bias", f"values must lie in [-100, 100], got {v!r} for token {k}")
        if len({k for k, _ in pairs}) != len(pairs):
            _fail("logit_bias", "must not name a token id twice")
        set_("logit_bias", tuple(sorted((int(k), float(v)) for k, v in pairs)))
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed < _MAX_SEED):
            _fail("seed", f"must be None or an int in [0, 2**63), got {self.seed!r}")
        if not _is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_LOGPROBS:
            _fail("logprobs", f"must be an int in [0, {MAX_LOGPROBS}], got {self.logprobs!r}")
        if not _is_int(self.n) or self.n < 1:
            _fail("n", f"must be an int >= 1, got {self.n!r}")
        if not isinstance(self.ignore_eos, bool):
            _fail("ignore_eos", f"must be a bool, got {self.ignore_eos!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def replace(self, **changes) -> SamplingParams:
        """A copy with ``changes`` applied (validated again)."""
        return dataclasses.replace(self, **changes)

    def check_vocab(self, vocab_size: int) -> None:
        """Raises when a token id of ``stop_token_ids`` or ``logit_bias`` is outside the vocabulary."""
        for name, ids in (
            ("stop_token_ids", self.stop_token_ids),
            ("logit_bias", [k for k, _ in self.logit_bias]),
        ):
            bad = [t for t in ids if t >= vocab_size]
            if bad:
                _fail(name, f"must hold ids below the vocabulary size {vocab_size}, got {bad[0]}")
