"""``POST /v1/completions``: text completions of one prompt or a batch (strings or token ids),
``n`` samples each (choice ``index = prompt * n + sample``), legacy log-probabilities, streaming."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse

from jaxlab.generation import Completion
from jaxlab.serving.base import Merged, ServerState, SSEResponse, request_id
from jaxlab.serving.engine_loop import EngineFailed, RequestStream
from jaxlab.serving.errors import OpenAIError, error_body
from jaxlab.serving.protocol import (
    SSE_DONE,
    CompletionRequest,
    completion_logprobs,
    completion_token_logprobs,
    delta_logprobs,
    finish_reason,
    response_head,
    sampling_params,
    sse,
    usage,
)

__all__ = ["create_completion"]

log = logging.getLogger("jaxlab.serving")


def _prompts(state: ServerState, req: CompletionRequest) -> list[list[int]]:
    """Token ids of each prompt: a string, a list of strings, a list of ids or of id lists."""
    p = req.prompt
    if isinstance(p, str):
        p = [p]
    if not p:
        raise OpenAIError(400, "prompt is empty", param="prompt")
    out = []
    for k, one in enumerate(p):
        where = "prompt" if len(p) == 1 else f"prompt[{k}]"
        if isinstance(one, str):
            ids = state.tokenizer.encode(one)
        elif isinstance(one, int):  # a single prompt of token ids
            ids = list(p)
            state.check_prompt_ids(ids, "prompt")
            return [ids]
        else:
            ids = list(one)
        state.check_prompt_ids(ids, where)
        out.append(ids)
    return out


def _unsupported(req: CompletionRequest) -> None:
    if req.echo:
        raise OpenAIError(400, "echo is not supported", param="echo")
    if req.suffix:
        raise OpenAIError(400, "suffix is not supported", param="suffix")
    if req.best_of is not None and req.best_of != (req.n or 1):
        raise OpenAIError(400, "best_of other than n is not supported", param="best_of")


def _logprobs(state: ServerState, c: Completion, top_n: int) -> dict:
    n = len(c.tokens)
    if c.finish_reason == "eos" and n and c.tokens[-1] in state.loop.engine.eos_ids:
        n -= 1
    return completion_logprobs(
        state.strings, c.tokens[:n], completion_token_logprobs(c)[:n], c.top_logprobs, top_n
    )


async def create_completion(state: ServerState, req: CompletionRequest, request: Request):
    arrival = time.perf_counter()
    state.check_model(req.model)
    state.check_n(req.n)
    _unsupported(req)
    prompts = _prompts(state, req)
    if state.defense is not None:  # a jailbreak defense may prefix the prompts or answer
        prompts, answer = await state.defense.completion(state, req, prompts, request)
        if answer is not None:
            return answer
    top_n = req.logprobs or 0
    base = request_id("cmpl")
    plans = []
    for k, ids in enumerate(prompts):
        budget = state.completion_budget(
            len(ids),
            req.max_tokens,
            "prompt" if len(prompts) == 1 else f"prompt[{k}]",
            "max_tokens",
        )
        params = sampling_params(
            req, max_new_tokens=budget, logprobs=top_n, vocab_size=state.vocab_size
        )
        plans.append((ids, params))
    streams: list[RequestStream] = []
    try:
        for k, (ids, params) in enumerate(plans):
            streams.append(state.submit(ids, params, f"{base}-{k}", arrival))
    except Exception:
        for s in streams:
            state.loop.abort(s.request_id)
        raise
    n = plans[0][1].n
    prompt_tokens = sum(len(ids) for ids, _ in plans)
    if req.stream:
        merged = Merged(state.loop, streams)
        return SSEResponse(_stream(state, req, base, merged, n, prompt_tokens, top_n), merged)
    try:
        per_prompt = await state.collect(request, streams)
    except EngineFailed as e:
        raise OpenAIError(500, f"generation failed: {e}") from None
    choices, completion_tokens, cached = [], 0, 0
    for k, deltas in enumerate(per_prompt):
        for c in sorted((d.completion for d in deltas if d.completion), key=lambda c: c.index):
            completion_tokens += len(c.tokens)
            if c.index == 0:
                cached += getattr(c, "cached_tokens", 0)
            choices.append(
                {
                    "index": k * n + c.index,
                    "text": c.text or "",
                    "logprobs": _logprobs(state, c, top_n) if req.logprobs is not None else None,
                    "finish_reason": finish_reason(c.finish_reason),
                }
            )
    body = response_head(base, "text_completion", state.model_name)
    body["choices"] = choices
    body["usage"] = usage(prompt_tokens, completion_tokens, cached if state.prefix_cache else None)
    return JSONResponse(body)


async def _stream(
    state: ServerState,
    req: CompletionRequest,
    base: str,
    merged: Merged,
    n: int,
    prompt_tokens: int,
    top_n: int,
) -> AsyncIterator[str]:
    head = response_head(base, "text_completion", state.model_name)
    include_usage = req.include_usage
    eos_ids = state.loop.engine.eos_ids
    pending: dict[int, list] = {}
    offsets: dict[int, int] = {}

    def chunk(index: int, text: str, finish: str | None = None) -> str:
        logprobs = None
        if req.logprobs is not None:
            got = pending.pop(index, [])
            toks = [t for t, _, _ in got]
            logprobs = completion_logprobs(
                state.strings,
                toks,
                [lp for _, lp, _ in got],
                [top or [] for _, _, top in got],
                top_n,
                offsets.get(index, 0),
            )
            offsets[index] = offsets.get(index, 0) + sum(len(state.strings.get(t)[0]) for t in toks)
        obj = {
            **head,
            "choices": [
                {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}
            ],
        }
        if include_usage:
            obj["usage"] = None
        return sse(obj)

    completion_tokens, cached = 0, 0
    try:
        async for k, deltas in merged:
            for d in deltas:
                index = k * n + d.index
                if d.tokens:
                    completion_tokens += len(d.tokens)
                    lps = delta_logprobs(d)
                    tops = d.top_logprobs or [None] * len(d.tokens)
                    pending.setdefault(index, []).extend(zip(d.tokens, lps, tops))
                if d.finish_reason is not None:
                    got = pending.get(index)
                    if d.finish_reason == "eos" and got and got[-1][0] in eos_ids:
                        got.pop()
                    if d.completion is not None and d.index == 0:
                        cached += getattr(d.completion, "cached_tokens", 0)
                if d.text:
                    yield chunk(index, d.text)
                if d.finish_reason is not None:
                    yield chunk(index, "", finish_reason(d.finish_reason))
        if include_usage:
            u = usage(prompt_tokens, completion_tokens, cached if state.prefix_cache else None)
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
