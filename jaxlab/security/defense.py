"""Jailbreak defenses for the chat and text-completion endpoints (``python -m jaxlab serve
--defense NAME``).

A defense is called by the chat handler before the request is templated (by the completions
handler before its prompts are submitted): it may rewrite the messages (prefix the prompts), or
answer the request itself (a refusal). ``none`` does nothing; the others:

``securitylingua``
  The compressor extracts the intention of the last user message (in a worker thread, one
  extraction at a time, while the event loop and the engine go on; a compressor loaded from a
  directory first compiles the shapes of one request, ``Compressor.warmup``); the system prompt
  becomes :data:`SECURITYLINGUA_TEMPLATE` filled with the request's own system prompt (or
  :data:`DEFAULT_SYSTEM_PROMPT` when it has none) and the intention. Every other message,
  the user's prompt included, is passed on byte for byte.
``self-reminder``
  Xie et al.'s self-reminder: :data:`SELF_REMINDER_SYSTEM` in front of the system prompt and
  :data:`SELF_REMINDER_SUFFIX` after the last user message.
``guardrail``
  The served model is first asked to classify the last user message (:data:`GUARDRAIL_SYSTEM`).
  By default (``mode="logits"``) the verdict is read from the logits of the first reply token:
  p(unsafe) = softmax over the first tokens of the two label words (:data:`GUARDRAIL_LABELS`),
  and the request is refused when p(unsafe) > :data:`GUARDRAIL_THRESHOLD` (0.5); with
  ``mode="generate"`` the model writes a few greedy tokens and a reply containing "unsafe" is
  refused. A refused request is answered with :data:`REFUSAL` without generating; anything else
  goes on unchanged.

Text completions (``/v1/completions``) have no system role: SecurityLingua puts the same text
(:func:`securitylingua_system_prompt` with the default system prompt) followed by a blank line in
front of each prompt, as tokens of its own, so that the prompt's own tokens follow unchanged
(:func:`completion_prefix_ids`); self-reminder puts :data:`SELF_REMINDER_SYSTEM` and a blank line in
front (no suffix: text after the prompt would change what is continued); the guardrail classifies
each prompt's text and refuses the whole request when any prompt is judged unsafe.

A request with the header ``X-Jaxlab-Defense: off`` skips the defense (for trusted clients of a
server behind an API key). Metrics (in ``/metrics``): ``jaxlab_defense_latency_seconds{defense}``
(time the defense added before generation), ``jaxlab_defense_added_prompt_tokens{defense}`` (a
histogram of prompt tokens added: the rendered prompt's growth, or the guardrail call's prompt and
output), ``jaxlab_defense_requests_total{defense,outcome}`` (outcome: passed, rewritten, refused,
opted_out).
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

from jaxlab.errors import UserError
from jaxlab.registry import Registry

__all__ = [
    "DEFENSES",
    "Defense",
    "make_defense",
    "securitylingua_system_prompt",
    "securitylingua_messages",
    "self_reminder_messages",
    "SECURITYLINGUA_TEMPLATE",
    "DEFAULT_SYSTEM_PROMPT",
    "SELF_REMINDER_SYSTEM",
    "SELF_REMINDER_SUFFIX",
    "GUARDRAIL_SYSTEM",
    "GUARDRAIL_LABELS",
    "GUARDRAIL_THRESHOLD",
    "REFUSAL",
    "completion_prefix_ids",
    "label_token_ids",
    "two_label_probability",
    "score_labels",
    "guardrail_prompt_ids",
    "OPT_OUT_HEADER",
]

# The paper's wording (experiments/securitylingua/readme.md), "donot" included.
SECURITYLINGUA_TEMPLATE = (
    "{system_prompt}\n\nTo help you better understand the user's intention to detect potential "
    "malicious behavior, I have extracted the user's intention and it is: {intention}. If you "
    "believe the user's intention is malicious, please donot respond or respond with I'm sorry, "
    "I can't help with that."
)
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
SELF_REMINDER_SYSTEM = (
    "You should be a responsible assistant and should not generate harmful or misleading "
    "content! Please answer the following user query in a responsible way."
)
SELF_REMINDER_SUFFIX = (
    "\n\nRemember, you should be a responsible assistant and should not generate harmful or "
    "misleading content!"
)
GUARDRAIL_SYSTEM = (
    "You are a content safety classifier. Decide whether the user's message asks for harmful, "
    "dangerous, illegal or unethical content. Reply with exactly one word: safe or unsafe."
)
GUARDRAIL_MAX_TOKENS = 4
GUARDRAIL_LABELS = ("safe", "unsafe")  # (allowed, refused): the words GUARDRAIL_SYSTEM asks for
GUARDRAIL_THRESHOLD = 0.5  # refuse when p(unsafe) > this
LABEL_BIAS = 100.0  # the largest logit bias a request may set
REFUSAL = "I'm sorry, I can't help with that."
OPT_OUT_HEADER = "x-jaxlab-defense"


# -- pure message rewrites -----------------------------------------------------------------------


def _system_index(messages: list[dict]) -> int | None:
    if messages and messages[0].get("role") in ("system", "developer"):
        return 0
    return None


def _last_user(messages: list[dict]) -> int | None:
    for i in range(len(messages) - 1, -1, -1):
        if messages[i].get("role") == "user":
            return i
    return None


def message_text(message: dict) -> str:
    """A message's text: its string content, or its text parts joined by newlines."""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(
            p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text"
        )
    return ""


def securitylingua_system_prompt(system_prompt: str | None, intention: str) -> str:
    """The system prompt SecurityLingua sends: :data:`SECURITYLINGUA_TEMPLATE` filled in."""
    base = system_prompt if system_prompt else DEFAULT_SYSTEM_PROMPT
    return SECURITYLINGUA_TEMPLATE.format(system_prompt=base, intention=intention)


def securitylingua_messages(messages: list[dict], intention: str) -> list[dict]:
    """``messages`` with the system prompt augmented by ``intention`` (a new first message when
    there is none); every other message is the same object."""
    out = list(messages)
    k = _system_index(out)
    if k is None:
        out.insert(0, {"role": "system", "content": securitylingua_system_prompt(None, intention)})
    else:
        out[k] = {
            **out[k],
            "content": securitylingua_system_prompt(message_text(out[k]), intention),
        }
    return out


def self_reminder_messages(messages: list[dict]) -> list[dict]:
    out = list(messages)
    k = _system_index(out)
    if k is None:
        out.insert(0, {"role": "system", "content": SELF_REMINDER_SYSTEM})
    else:
        out[k] = {**out[k], "content": f"{SELF_REMINDER_SYSTEM}\n\n{message_text(out[k])}"}
    u = _last_user(out)
    if u is not None:
        out[u] = {**out[u], "content": message_text(out[u]) + SELF_REMINDER_SUFFIX}
    return out


def completion_prefix_ids(tokenizer, block: str, prompt_ids: list[int]) -> list[int]:
    """A text-completion prompt with ``block`` in front: ``block``'s own tokens, then
    ``prompt_ids`` unchanged (after the tokens the tokenizer puts at the start of every text, e.g.
    BOS, which stay first)."""
    lead = tokenizer.encode("")  # what encode() adds in front of any text
    k = len(lead) if lead and list(prompt_ids[: len(lead)]) == list(lead) else 0
    body = tokenizer.encode(block, add_special_tokens=False)
    return [*prompt_ids[:k], *body, *prompt_ids[k:]]


def securitylingua_completion_block(intention: str) -> str:
    """What SecurityLingua puts in front of a text-completion prompt: the system prompt it would
    send to a chat (with the default system prompt) and a blank line."""
    return securitylingua_system_prompt(None, intention) + "\n\n"


SELF_REMINDER_COMPLETION_BLOCK = SELF_REMINDER_SYSTEM + "\n\n"


def two_label_probability(logit_a, logit_b):
    """p(b) of a two-way softmax over the logits of two labels: ``1 / (1 + exp(a - b))``
    (arrays broadcast; numpy in, numpy out)."""
    import numpy as np

    d = np.asarray(logit_a, np.float64) - np.asarray(logit_b, np.float64)
    return np.exp(-np.logaddexp(0.0, d))


def label_token_ids(tokenizer, labels: tuple[str, str]) -> tuple[int, int]:
    """The first token of each label word as a reply begins with it (no leading space); the two
    must differ (a label scores as its first token: ``unsafe`` = ``uns`` + ``afe`` in SmolLM2's
    vocabulary, and no other label starts with ``uns``)."""
    ids = tuple(tokenizer.encode(w, add_special_tokens=False)[0] for w in labels)
    if len(set(ids)) != len(ids):
        raise UserError(f"labels {labels} begin with the same token {ids[0]}: pick other words")
    return ids


def guardrail_prompt_ids(tokenizer, text: str, room: int | None = None) -> list[int]:
    """Token ids of the guardrail's classification prompt for a user message ``text`` (system
    :data:`GUARDRAIL_SYSTEM`, the assistant's turn opened). With ``room``, a longer prompt keeps
    the message's end (where a wrapped request usually is) to fit ``room`` tokens."""
    frame = lambda t: tokenizer.apply_chat_template(  # noqa: E731
        [{"role": "system", "content": GUARDRAIL_SYSTEM}, {"role": "user", "content": t}]
    )
    ids = tokenizer.encode(frame(text), add_special_tokens=False)
    if room is not None and len(ids) > room:
        body = tokenizer.encode(text, add_special_tokens=False)
        overhead = len(ids) - len(body)
        ids = tokenizer.encode(
            frame(tokenizer.decode(body[len(body) - max(room - overhead - 8, 1) :])),
            add_special_tokens=False,
        )[-room:]
    return ids


async def score_labels(state, ids: list[int], label_ids: tuple[int, int], request=None) -> float:
    """p(second label) of a two-way softmax over the served model's logits of the two label tokens
    after the prompt ``ids``, from one engine step: both labels get the largest logit bias
    (:data:`LABEL_BIAS`) and one token is sampled at temperature 1, so that the sampled label's
    reported log-probability under the biased distribution is its log-share of the two (the rest
    of the vocabulary weighs ``exp(-100)`` against them); the other label's share is the
    complement. Queued beside the other requests like any request."""
    import math

    from jaxlab.generation import SamplingParams
    from jaxlab.serving.base import request_id

    a, b = label_ids
    params = SamplingParams(
        max_new_tokens=1,
        temperature=1.0,
        seed=0,
        logit_bias=((a, LABEL_BIAS), (b, LABEL_BIAS)),
    )
    stream = state.submit(ids, params, request_id("score"), time.perf_counter())
    (deltas,) = await state.collect(request, [stream])
    done = [d.completion for d in deltas if d.completion is not None]
    if not done or not done[0].tokens:
        raise RuntimeError("the label scoring request returned no token")
    tok, lp = done[0].tokens[0], float(done[0].logprobs[0])
    if tok not in (a, b):
        raise RuntimeError(f"the label scoring request sampled token {tok}, not a label")
    lp = min(lp, 0.0)
    return math.exp(lp) if tok == b else -math.expm1(lp)


# -- the hook ------------------------------------------------------------------------------------


class _Metrics:
    def __init__(self, registry):
        from prometheus_client import Counter, Histogram

        self.latency = Histogram(
            "jaxlab_defense_latency_seconds",
            "time a jailbreak defense adds before generation",
            ["defense"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5, 10, 30),
            registry=registry,
        )
        self.tokens = Histogram(
            "jaxlab_defense_added_prompt_tokens",
            "prompt tokens a jailbreak defense adds (its own model call's included)",
            ["defense"],
            buckets=(-64, 0, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096),
            registry=registry,
        )
        self.requests = Counter(
            "jaxlab_defense_requests",
            "chat requests seen by the jailbreak defense, by outcome",
            ["defense", "outcome"],
            registry=registry,
        )


_METRICS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_METRICS_LOCK = threading.Lock()


@dataclasses.dataclass
class Outcome:
    """What a defense did to one request."""

    messages: list[dict] | None  # the rewritten messages (None: unchanged)
    refusal: str | None = None  # answer this instead of generating
    added_tokens: int | None = None
    score: float | None = None  # the guardrail's p(unsafe) (logits mode)


@dataclasses.dataclass
class PromptOutcome:
    """What a defense did to one text-completion request's prompts."""

    prompts: list[list[int]] | None  # the rewritten prompts' token ids (None: unchanged)
    refusal: str | None = None  # answer every choice with this instead of generating
    added_tokens: int | None = None
    score: float | None = None  # the guardrail's largest p(unsafe) (logits mode)


class Defense:
    """The chat handler's hook: ``await defense(state, req, request)`` returns ``(req, None)``
    to go on (``req`` possibly rewritten) or ``(req, response)`` to answer with ``response``."""

    name = "none"

    def metrics(self, state) -> _Metrics:
        """The defense metrics of ``state``'s registry (one set, labelled by defense, shared by
        the defenses a server is switched between)."""
        reg = state.metrics.registry
        with _METRICS_LOCK:
            if reg not in _METRICS:
                _METRICS[reg] = _Metrics(reg)
            return _METRICS[reg]

    async def apply(self, state, req, request) -> Outcome:
        return Outcome(None)

    async def __call__(self, state, req, request=None):
        m = self.metrics(state)
        headers = request.headers if request is not None else {}
        if headers.get(OPT_OUT_HEADER, "").strip().lower() in ("off", "none", "0", "false"):
            m.requests.labels(self.name, "opted_out").inc()
            return req, None
        t0 = time.perf_counter()
        out = await self.apply(state, req, request)
        m.latency.labels(self.name).observe(time.perf_counter() - t0)
        if out.added_tokens is not None:
            m.tokens.labels(self.name).observe(out.added_tokens)
        if out.refusal is not None:
            m.requests.labels(self.name, "refused").inc()
            return req, refusal_response(state, req, out.refusal)
        if out.messages is None:
            m.requests.labels(self.name, "passed").inc()
            return req, None
        m.requests.labels(self.name, "rewritten").inc()
        return req.model_copy(update={"messages": out.messages}), None

    async def apply_completion(self, state, prompts: list[list[int]], request) -> PromptOutcome:
        return PromptOutcome(None)

    async def completion(self, state, req, prompts: list[list[int]], request=None):
        """The completions handler's hook: ``(prompts, None)`` to go on with ``prompts`` (token
        ids, possibly prefixed) or ``(prompts, response)`` to answer with ``response``."""
        m = self.metrics(state)
        headers = request.headers if request is not None else {}
        if headers.get(OPT_OUT_HEADER, "").strip().lower() in ("off", "none", "0", "false"):
            m.requests.labels(self.name, "opted_out").inc()
            return prompts, None
        t0 = time.perf_counter()
        out = await self.apply_completion(state, prompts, request)
        m.latency.labels(self.name).observe(time.perf_counter() - t0)
        if out.added_tokens is not None:
            m.tokens.labels(self.name).observe(out.added_tokens)
        if out.refusal is not None:
            m.requests.labels(self.name, "refused").inc()
            return prompts, completion_refusal_response(state, req, prompts, out.refusal)
        if out.prompts is None:
            m.requests.labels(self.name, "passed").inc()
            return prompts, None
        m.requests.labels(self.name, "rewritten").inc()
        return out.prompts, None


def _prompt_tokens(state, req, messages) -> int | None:
    """Tokens of the prompt these messages render to (None where the chat cannot be templated:
    the handler reports that)."""
    from jaxlab.serving.tools import prepare_chat

    try:
        turns, forced = prepare_chat(
            messages, req.tools, req.tool_choice, response_format=req.response_format
        )
        text = state.tokenizer.apply_chat_template(turns)
    except Exception:  # noqa: BLE001 - the handler answers a bad request with its 400
        return None
    return len(state.tokenizer.encode(text + forced, add_special_tokens=False))


def _growth(state, req, messages) -> int | None:
    a, b = _prompt_tokens(state, req, req.messages), _prompt_tokens(state, req, messages)
    return None if a is None or b is None else b - a


class NoDefense(Defense):
    name = "none"


class SelfReminder(Defense):
    name = "self-reminder"

    async def apply(self, state, req, request) -> Outcome:
        messages = self_reminder_messages(req.messages)
        return Outcome(messages, added_tokens=_growth(state, req, messages))

    async def apply_completion(self, state, prompts, request) -> PromptOutcome:
        tok = state.tokenizer
        out = [completion_prefix_ids(tok, SELF_REMINDER_COMPLETION_BLOCK, ids) for ids in prompts]
        return PromptOutcome(out, added_tokens=sum(map(len, out)) - sum(map(len, prompts)))


class SecurityLingua(Defense):
    name = "securitylingua"

    def __init__(self, compressor, *, threshold: float = 0.5, rate: float | None = None):
        self.compressor, self.threshold, self.rate = compressor, threshold, rate
        self._lock = asyncio.Lock()

    def intention(self, text: str) -> str:
        return self.compressor.extract([text], threshold=self.threshold, rate=self.rate)[0]

    async def apply(self, state, req, request) -> Outcome:
        u = _last_user(req.messages)
        if u is None:
            return Outcome(None)
        text = message_text(req.messages[u])
        async with self._lock:  # one extraction at a time beside the engine thread
            intention = await asyncio.to_thread(self.intention, text)
        messages = securitylingua_messages(req.messages, intention)
        return Outcome(messages, added_tokens=_growth(state, req, messages))

    async def apply_completion(self, state, prompts, request) -> PromptOutcome:
        tok = state.tokenizer
        texts = [tok.decode(ids, skip_special_tokens=True) for ids in prompts]
        async with self._lock:
            intentions = await asyncio.to_thread(
                self.compressor.extract, texts, threshold=self.threshold, rate=self.rate
            )
        out = [
            completion_prefix_ids(tok, securitylingua_completion_block(i), ids)
            for i, ids in zip(intentions, prompts)
        ]
        return PromptOutcome(out, added_tokens=sum(map(len, out)) - sum(map(len, prompts)))


class Guardrail(Defense):
    """The served model classifies the last user message first (see the module docstring).

    ``mode``: ``"logits"`` (p(unsafe) from the two label tokens' logits, refused above
    ``threshold``) or ``"generate"`` (a few greedy tokens, refused when they contain "unsafe").
    The outcome's ``score`` is p(unsafe) (logits mode)."""

    name = "guardrail"

    def __init__(self, *, mode: str = "logits", threshold: float = GUARDRAIL_THRESHOLD):
        if mode not in ("logits", "generate"):
            raise UserError(f"guardrail mode must be 'logits' or 'generate', got {mode!r}")
        if not 0.0 <= threshold < 1.0:
            raise UserError(f"guardrail threshold must lie in [0, 1), got {threshold}")
        self.mode, self.threshold = mode, threshold

    async def classify(self, state, text: str, request=None) -> tuple[bool, int, float | None]:
        """``(unsafe, tokens the classification cost: its prompt and output, p(unsafe) or None
        in generate mode)`` for one text."""
        from jaxlab.generation import SamplingParams
        from jaxlab.serving.base import request_id

        tok = state.tokenizer
        out_tokens = 1 if self.mode == "logits" else GUARDRAIL_MAX_TOKENS
        ids = guardrail_prompt_ids(tok, text, room=state.max_len - out_tokens)
        if self.mode == "logits":
            labels = label_token_ids(tok, GUARDRAIL_LABELS)
            p = await score_labels(state, ids, labels, request)
            return p > self.threshold, len(ids) + 1, p
        params = SamplingParams(max_new_tokens=GUARDRAIL_MAX_TOKENS, temperature=0.0)
        stream = state.submit(ids, params, request_id("guard"), time.perf_counter())
        (deltas,) = await state.collect(request, [stream])
        done = [d.completion for d in deltas if d.completion is not None]
        reply = (done[0].text or "") if done else ""
        added = len(ids) + (len(done[0].tokens) if done else 0)
        return "unsafe" in reply.lower(), added, None

    async def apply(self, state, req, request) -> Outcome:
        u = _last_user(req.messages)
        if u is None:
            return Outcome(None)
        unsafe, added, p = await self.classify(state, message_text(req.messages[u]), request)
        return Outcome(None, refusal=REFUSAL if unsafe else None, added_tokens=added, score=p)

    async def apply_completion(self, state, prompts, request) -> PromptOutcome:
        added, refuse, scores = 0, False, []
        for ids in prompts:
            text = state.tokenizer.decode(ids, skip_special_tokens=True)
            unsafe, n, p = await self.classify(state, text, request)
            added, refuse = added + n, refuse or unsafe
            scores.append(p)
        score = max(scores) if None not in scores else None
        refusal = REFUSAL if refuse else None
        return PromptOutcome(None, refusal=refusal, added_tokens=added, score=score)


def refusal_response(state, req, text: str):
    """A chat completion whose one choice is ``text`` (``stop``), streamed if asked."""
    from fastapi.responses import JSONResponse, StreamingResponse

    from jaxlab.serving.base import SSE_HEADERS, request_id
    from jaxlab.serving.protocol import SSE_DONE, response_head, sse, usage

    rid = request_id("chatcmpl")
    n_out = len(state.tokenizer.encode(text, add_special_tokens=False))
    n_in = _prompt_tokens(state, req, req.messages) or 0
    head = response_head(rid, "chat.completion", state.model_name)
    n = req.n or 1
    if not req.stream:
        choices = [
            {
                "index": i,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": "stop",
            }
            for i in range(n)
        ]
        body = {**head, "choices": choices}
        body["usage"] = usage(n_in, n * n_out)
        return JSONResponse(body)

    def events():
        def chunk(i, delta, finish=None):
            c = {"index": i, "delta": delta, "logprobs": None, "finish_reason": finish}
            obj = {**head, "object": "chat.completion.chunk", "choices": [c]}
            if req.include_usage:
                obj["usage"] = None
            return sse(obj)

        for i in range(n):
            yield chunk(i, {"role": "assistant", "content": ""})
            yield chunk(i, {"content": text})
            yield chunk(i, {}, "stop")
        if req.include_usage:
            obj = {**head, "object": "chat.completion.chunk", "choices": []}
            yield sse(obj | {"usage": usage(n_in, n * n_out)})
        yield SSE_DONE

    return StreamingResponse(events(), media_type="text/event-stream", headers=SSE_HEADERS)


def completion_refusal_response(state, req, prompts: list[list[int]], text: str):
    """A text completion whose every choice (``n`` per prompt) is ``text`` (``stop``), streamed
    if asked."""
    from fastapi.responses import JSONResponse, StreamingResponse

    from jaxlab.serving.base import SSE_HEADERS, request_id
    from jaxlab.serving.protocol import SSE_DONE, response_head, sse, usage

    rid = request_id("cmpl")
    n_out = len(state.tokenizer.encode(text, add_special_tokens=False))
    count = len(prompts) * (req.n or 1)
    head = response_head(rid, "text_completion", state.model_name)
    n_in = sum(map(len, prompts))
    if not req.stream:
        choices = [
            {"index": i, "text": text, "logprobs": None, "finish_reason": "stop"}
            for i in range(count)
        ]
        return JSONResponse({**head, "choices": choices, "usage": usage(n_in, count * n_out)})

    def events():
        for i in range(count):
            for piece, finish in ((text, None), ("", "stop")):
                c = {"index": i, "text": piece, "logprobs": None, "finish_reason": finish}
                obj = {**head, "choices": [c]}
                if req.include_usage:
                    obj["usage"] = None
                yield sse(obj)
        if req.include_usage:
            yield sse({**head, "choices": [], "usage": usage(n_in, count * n_out)})
        yield SSE_DONE

    return StreamingResponse(events(), media_type="text/event-stream", headers=SSE_HEADERS)


# -- registry --------------------------------------------------------------------------------------

DEFENSES: Registry[Callable[..., Defense]] = Registry("defense")
DEFENSES.register("none", lambda **kw: NoDefense())
DEFENSES.register("self-reminder", lambda **kw: SelfReminder())
DEFENSES.register(
    "guardrail",
    lambda *, guardrail_mode="logits", guardrail_threshold=GUARDRAIL_THRESHOLD, **kw: Guardrail(
        mode=guardrail_mode, threshold=guardrail_threshold
    ),
)


def _securitylingua(*, compressor: Any = None, threshold: float = 0.5, rate=None, **kw):
    from jaxlab.security.compressor import Compressor

    if compressor is None:
        raise UserError("--defense securitylingua needs --compressor DIR (a trained compressor)")
    if isinstance(compressor, str | Path):
        compressor = Compressor.load(compressor)
        compressor.warmup()  # compile one request's shapes now, not on the first requests
    return SecurityLingua(compressor, threshold=threshold, rate=rate)


DEFENSES.register("securitylingua", _securitylingua)


def make_defense(name: str, **kwargs) -> Defense:
    """The defense registered as ``name`` (``compressor=`` a directory or a Compressor for
    ``securitylingua``; ``guardrail_mode=`` "logits" or "generate" and ``guardrail_threshold=``
    for ``guardrail``)."""
    if name not in DEFENSES:
        raise UserError(f"unknown defense {name!r}; known: {DEFENSES.names()}")
    return DEFENSES.get(name)(**kwargs)
