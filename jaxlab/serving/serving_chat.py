"""``POST /v1/chat/completions``: the chat template, tool calls, n samples, log-probabilities,
and streaming as OpenAI does it (the role in each choice's first delta, ``finish_reason`` in its
last, a usage chunk with ``choices: []`` only when ``stream_options.include_usage`` asks,
``data: [DONE]``)."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse

from jaxlab.generation import Completion
from jaxlab.serving.base import Merged, ServerState, SSEResponse, request_id
from jaxlab.serving.engine_loop import EngineFailed
from jaxlab.serving.errors import OpenAIError, error_body
from jaxlab.serving.protocol import (
    SSE_DONE,
    ChatCompletionRequest,
    chat_logprobs,
    completion_token_logprobs,
    delta_logprobs,
    finish_reason,
    response_head,
    sampling_params,
    sse,
    usage,
)
from jaxlab.serving.tools import (
    ChatRequestError,
    ToolCallStreamParser,
    chat_finish_reason,
    parse_tool_calls,
    prepare_chat,
    resolve_tool_choice,
)

__all__ = ["create_chat_completion"]

log = logging.getLogger("jaxlab.serving")


@dataclasses.dataclass
class _Plan:
    """A chat request made ready for the engine."""

    prompt_ids: list[int]
    forced_prefix: str
    parse_tools: bool
    top_n: int  # top alternatives per token
    want_logprobs: bool


def _plan(state: ServerState, req: ChatCompletionRequest) -> _Plan:
    try:
        turns, forced = prepare_chat(
            req.messages, req.tools, req.tool_choice, response_format=req.response_format
        )
        parse_tools = resolve_tool_choice(req.tools, req.tool_choice).parse
    except ChatRequestError as e:
        raise OpenAIError(400, str(e), param=e.param, code="invalid_value") from None
    try:
        text = state.tokenizer.apply_chat_template(turns)
    except Exception as e:  # the template rejects the conversation (e.g. role order)
        raise OpenAIError(
            400, f"the model's chat template rejects these messages: {e}", param="messages"
        ) from None
    ids = state.tokenizer.encode(text + forced, add_special_tokens=False)
    if req.top_logprobs is not None and not req.logprobs:
        raise OpenAIError(
            400, "top_logprobs needs logprobs set to true", param="top_logprobs"
        ) from None
    top_n = (req.top_logprobs or 0) if req.logprobs else 0
    return _Plan(ids, forced, parse_tools, top_n, bool(req.logprobs))


def _trim_eos(state: ServerState, c: Completion) -> int:
    """How many of a completion's tokens to show in log-probabilities (not a final end token)."""
    n = len(c.tokens)
    if c.finish_reason == "eos" and n and c.tokens[-1] in state.loop.engine.eos_ids:
        n -= 1
    return n


async def create_chat_completion(state: ServerState, req: ChatCompletionRequest, request: Request):
    arrival = time.perf_counter()
    state.check_model(req.model)
    state.check_n(req.n)
    if state.defense is not None:  # a jailbreak defense may rewrite the messages or answer
        req, answer = await state.defense(state, req, request)
        if answer is not None:
            return answer
    plan = _plan(state, req)
    tokens_param = (
        "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    )
    max_tokens = (
        req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    )
    budget = state.completion_budget(len(plan.prompt_ids), max_tokens, "messages", tokens_param)
    params = sampling_params(
        req,
        max_new_tokens=budget,
        logprobs=plan.top_n,
        param_names={"max_new_tokens": tokens_param, "logprobs": "top_logprobs"},
        vocab_size=state.vocab_size,
    )
    rid = request_id("chatcmpl")
    stream = state.submit(plan.prompt_ids, params, rid, arrival)
    if req.stream:
        merged = Merged(state.loop, [stream])
        return SSEResponse(_stream(state, req, plan, rid, merged, params.n), merged)
    try:
        (deltas,) = await state.collect(request, [stream])
    except EngineFailed as e:
        raise OpenAIError(500, f"generation failed: {e}") from None
    completions = sorted((d.completion for d in deltas if d.completion), key=lambda c: c.index)
    choices = []
    for c in completions:
        text = c.text or ""
        calls = []
        content: str | None = text
        if plan.parse_tools:
            content, calls = parse_tool_calls(text, plan.forced_prefix)
        message = {"role": "assistant", "content": content}
        if calls:
            message["tool_calls"] = calls
        choice = {
            "index": c.index,
            "message": message,
            "logprobs": None,
            "finish_reason": chat_finish_reason(finish_reason(c.finish_reason), bool(calls)),
        }
        if plan.want_logprobs:
            k = _trim_eos(state, c)
            choice["logprobs"] = {
                "content": chat_logprobs(
                    state.strings,
                    c.tokens[:k],
                    completion_token_logprobs(c)[:k],
                    c.top_logprobs,
                    plan.top_n,
                ),
                "refusal": None,
            }
        choices.append(choice)
    cached = None
    if completions and state.prefix_cache:
        cached = getattr(completions[0], "cached_tokens", 0)
    body = response_head(rid, "chat.completion", state.model_name)
    body["choices"] = choices
    body["usage"] = usage(len(plan.prompt_ids), sum(len(c.tokens) for c in completions), cached)
    return JSONResponse(body)


@dataclasses.dataclass
class _Choice:
    parser: ToolCallStreamParser | None
    pending: list[tuple[int, float, list | None]] = dataclasses.field(default_factory=list)


async def _stream(
    state: ServerState,
    req: ChatCompletionRequest,
    plan: _Plan,
    rid: str,
    merged: Merged,
    n: int,
) -> AsyncIterator[str]:
    head = response_head(rid, "chat.completion.chunk", state.model_name)
    include_usage = req.include_usage
    eos_ids = state.loop.engine.eos_ids

    def chunk(index: int, delta: dict, finish: str | None = None, logprobs=None) -> str:
        obj = {
            **head,
            "choices": [
                {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
            ],
        }
        if include_usage:
            obj["usage"] = None
        return sse(obj)

    def take_logprobs(ch: _Choice):
        if not plan.want_logprobs or not ch.pending:
            return None
        toks = [t for t, _, _ in ch.pending]
        lps = [lp for _, lp, _ in ch.pending]
        tops = [top or [] for _, _, top in ch.pending]
        ch.pending = []
        return {
            "content": chat_logprobs(state.strings, toks, lps, tops, plan.top_n),
            "refusal": None,
        }

    choices = [
        _Choice(ToolCallStreamParser(plan.forced_prefix) if plan.parse_tools else None)
        for _ in range(n)
    ]
    completion_tokens, cached = 0, 0
    try:
        # with tools the reply may be calls only, whose message content is null, as unstreamed
        first = {"role": "assistant", "content": None if plan.parse_tools else ""}
        for i in range(n):
            yield chunk(i, first)
        async for _, deltas in merged:
            for d in deltas:
                ch = choices[d.index]
                if d.tokens:
                    completion_tokens += len(d.tokens)
                    if plan.want_logprobs:
                        tops = d.top_logprobs or [None] * len(d.tokens)
                        ch.pending.extend(zip(d.tokens, delta_logprobs(d), tops))
                text = d.text or ""
                if ch.parser is not None:
                    pieces = ch.parser.feed(text) if text else []
                else:
                    pieces = [{"content": text}] if text else []
                if d.finish_reason is not None:
                    if ch.parser is not None:
                        pieces += ch.parser.finish()
                    if d.finish_reason == "eos" and ch.pending and ch.pending[-1][0] in eos_ids:
                        ch.pending.pop()
                    if d.completion is not None and d.index == 0:
                        cached = getattr(d.completion, "cached_tokens", 0)
                for piece in pieces:
                    yield chunk(d.index, piece, logprobs=take_logprobs(ch))
                if d.finish_reason is not None:
                    has_calls = ch.parser is not None and ch.parser.has_calls
                    reason = chat_finish_reason(finish_reason(d.finish_reason), has_calls)
                    yield chunk(d.index, {}, reason, logprobs=take_logprobs(ch))
        if include_usage:
            u = usage(
                len(plan.prompt_ids), completion_tokens, cached if state.prefix_cache else None
            )
            yield sse({**head, "choices": [], "usage": u})
        yield SSE_DONE
    except EngineFailed as e:
        yield sse(error_body(f"generation failed: {e}", "internal_server_error"))
        yield SSE_DONE
    except Exception as e:  # a bug: logged in full, the client gets an error event, no traceback
        log.exception("streaming %s failed", head["id"])
        yield sse(
            error_body(
                f"the server failed ({type(e).__name__}); see its log", "internal_server_error"
            )
        )
        yield SSE_DONE
    finally:
        merged.close()
