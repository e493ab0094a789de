"""What every endpoint shares: the server's state and the steps of handling a generation request
(model name, context budget, admission, waiting for the result while watching the client)."""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from collections.abc import Hashable, Sequence
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse

from jaxlab.generation import Delta, SamplingParams
from jaxlab.serving.engine_loop import EngineLoop, QueueFull, RequestStream
from jaxlab.serving.errors import OpenAIError
from jaxlab.serving.metrics import ServerMetrics
from jaxlab.serving.protocol import TokenStrings, param_error
from jaxlab.tokenization import Tokenizer

__all__ = ["ServerState", "Merged", "SSEResponse", "ClientGone", "request_id"]

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class ClientGone(Exception):
    """The client closed the connection before its answer was ready."""


def request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


@dataclasses.dataclass
class ServerState:
    """One server: the engine loop, the tokenizer and the settings the endpoints read.

    ``max_len`` is the context the server gives a request (prompt + completion tokens).
    """

    loop: EngineLoop
    tokenizer: Tokenizer
    model_name: str
    max_len: int
    metrics: ServerMetrics
    api_key: str | None = None
    prefix_cache: int = 0
    vocab_size: int = 0  # the model's (default: the tokenizer's)
    # a chat hook run before templating (jaxlab.security.defense.Defense): may rewrite or answer
    defense: Any = None
    created: int = dataclasses.field(default_factory=lambda: int(time.time()))

    def __post_init__(self):
        self.strings = TokenStrings(self.tokenizer)
        self.vocab_size = self.vocab_size or self.tokenizer.vocab_size

    @property
    def num_slots(self) -> int:
        return self.loop.engine.num_slots

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise OpenAIError(
                404,
                f"The model {name!r} does not exist; this server serves {self.model_name!r}",
                param="model",
                code="model_not_found",
            )

    def check_n(self, n: int | None) -> None:
        if n is not None and isinstance(n, int) and n > self.num_slots:
            raise OpenAIError(
                400,
                f"n={n} samples need as many decode slots; this server has {self.num_slots}",
                param="n",
                code="invalid_value",
            )

    def completion_budget(
        self, prompt_tokens: int, max_tokens: int | None, prompt_param: str, tokens_param: str
    ) -> int:
        """How many tokens a request may generate: ``max_tokens`` if the context holds it, else a
        400 naming the limit; by default all that the context leaves."""
        what = "messages" if prompt_param == "messages" else "prompt"
        if prompt_tokens >= self.max_len:
            raise OpenAIError(
                400,
                f"This model's maximum context length is {self.max_len} tokens. However, your "
                f"{what} resulted in {prompt_tokens} tokens, which leaves no room for a "
                f"completion. Please reduce the length of the {what}.",
                param=prompt_param,
                code="context_length_exceeded",
            )
        if max_tokens is None:
            return self.max_len - prompt_tokens
        if max_tokens < 1:
            raise OpenAIError(
                400,
                f"{tokens_param} must be >= 1, got {max_tokens}",
                param=tokens_param,
                code="invalid_value",
            )
        if prompt_tokens + max_tokens > self.max_len:
            raise OpenAIError(
                400,
                f"This model's maximum context length is {self.max_len} tokens. However, you "
                f"requested {prompt_tokens + max_tokens} tokens ({prompt_tokens} in the {what}, "
                f"{max_tokens} in the completion). Please reduce the length of the {what} or "
                "completion.",
                param=tokens_param,
                code="context_length_exceeded",
            )
        return max_tokens

    def check_prompt_ids(self, ids: Sequence[int], param: str) -> None:
        vocab = self.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise OpenAIError(
                400,
                f"{param} holds the token id {bad[0]}, outside the vocabulary of {vocab}",
                param=param,
                code="invalid_value",
            )
        if not ids:
            raise OpenAIError(400, f"{param} is empty", param=param, code="invalid_value")

    def submit(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        rid: Hashable,
        arrival: float,
    ) -> RequestStream:
        """Admits a request (429 with ``Retry-After`` when full; the engine's refusal is a 400)."""
        try:
            return self.loop.add(prompt_ids, params, rid, arrival=arrival)
        except QueueFull as e:
            raise OpenAIError(
                429,
                str(e),
                code="queue_full",
                type="rate_limit_exceeded",
                headers={"Retry-After": "1"},
            ) from None
        except ValueError as e:
            raise param_error(e) from None

    async def collect(
        self, request: Request | None, streams: Sequence[RequestStream]
    ) -> list[list[Delta]]:
        """Every delta of each request (all its samples), aborting them if the client leaves."""
        out: list[list[Delta]] = [[] for _ in streams]
        merged = Merged(self.loop, streams, request)
        try:
            async for k, ds in merged:
                out[k].extend(ds)
        finally:
            merged.close()
        return out


class Merged:
    """The step deltas of several requests as they come: ``async for k, deltas in merged``
    (``k`` the request's position). With ``request``, the HTTP client is watched meanwhile (for
    unstreamed answers; Starlette watches streamed ones itself) and :class:`ClientGone` raised as
    soon as it disconnects. :meth:`close` (synchronous, so that it also runs in a generator being
    cancelled) stops waiting and aborts the requests still in flight."""

    def __init__(
        self, loop: EngineLoop, streams: Sequence[RequestStream], request: Request | None = None
    ):
        self.loop, self.streams = loop, list(streams)
        self._tasks: dict[asyncio.Future, int] = {}
        self._ready: list[tuple[int, list[Delta]]] = []
        self._watch = asyncio.ensure_future(_disconnected(request)) if request else None
        for k, s in enumerate(self.streams):
            if not s.complete:
                self._arm(k)

    def _arm(self, k: int) -> None:
        self._tasks[asyncio.ensure_future(self.loop.next(self.streams[k]))] = k

    def __aiter__(self):
        return self

    async def __anext__(self) -> tuple[int, list[Delta]]:
        while not self._ready:
            if not self._tasks:
                raise StopAsyncIteration
            waiting = set(self._tasks)
            if self._watch is not None:
                waiting.add(self._watch)
            done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            if self._watch is not None and self._watch in done:
                raise ClientGone()
            for task in done:
                k = self._tasks.pop(task)
                ds = task.result()  # EngineFailed propagates
                if not self.streams[k].complete:
                    self._arm(k)
                self._ready.append((k, ds))
        return self._ready.pop(0)

    def close(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
        for task in self._tasks:
            task.cancel()
        self._tasks.clear()
        for s in self.streams:
            if not s.complete:
                self.loop.abort(s.request_id)


async def _disconnected(request: Request) -> None:
    """Returns when the client has disconnected (the request body has been read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class SSEResponse(StreamingResponse):
    """A server-sent-event stream of ``merged``'s requests: however the response ends (finished,
    the client gone, the server stopping), the requests still in flight are aborted, even when
    the client left before the first event was produced."""

    def __init__(self, content, merged: Merged):
        super().__init__(content, media_type="text/event-stream", headers=SSE_HEADERS)
        self.merged = merged

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.merged.close()
