"""The OpenAI wire format: request models, their mapping onto :class:`SamplingParams`, and the
pieces every response is built from (usage, log-probabilities, SSE events).

Requests are pydantic models that ignore unknown fields, as OpenAI's API does; a value of the
wrong type is a 400 naming its field (:mod:`jaxlab.serving.errors`). Chat messages, tools,
``tool_choice`` and ``response_format`` are checked and rendered by :mod:`jaxlab.serving.tools`. Fields beyond OpenAI's that
vLLM also accepts (``top_k``, ``min_p``, ``repetition_penalty``, ``stop_token_ids``,
``ignore_eos``) are honoured. Responses are plain dicts shaped as the official client's types.
"""

from __future__ import annotations

import functools
import json
import re
import time
from typing import Any

from pydantic import BaseModel, ConfigDict

from jaxlab.generation import Completion, Delta, SamplingParams
from jaxlab.serving.errors import OpenAIError
from jaxlab.tokenization import Tokenizer

__all__ = [
    "StreamOptions",
    "ChatCompletionRequest",
    "CompletionRequest",
    "sampling_params",
    "param_error",
    "finish_reason",
    "usage",
    "TokenStrings",
    "delta_logprobs",
    "completion_token_logprobs",
    "chat_logprobs",
    "completion_logprobs",
    "sse",
    "SSE_DONE",
]


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Model):
    include_usage: bool | None = False


class _SamplingRequest(_Model):
    """Fields chat and text completions share."""

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    seed: int | None = None
    n: int | None = None
    logit_bias: dict[str, float] | None = None
    ignore_eos: bool | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_SamplingRequest):
    messages: list[dict[str, Any]]
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None


class CompletionRequest(_SamplingRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = None
    echo: bool | None = False
    best_of: int | None = None
    suffix: str | None = None


# -- sampling ------------------------------------------------------------------------------------

_FIELD = re.compile(r"SamplingParams: (\w+) (.*)", re.S)


def sampling_params(
    req: _SamplingRequest,
    *,
    max_new_tokens: int,
    logprobs: int = 0,
    param_names: dict[str, str] | None = None,
    vocab_size: int | None = None,
) -> SamplingParams:
    """The request's :class:`SamplingParams` (OpenAI's defaults: temperature 1, top_p 1).

    ``param_names`` maps SamplingParams fields to the request fields they came from (for
    ``max_new_tokens`` and ``logprobs``), so that a bad value is a 400 naming the field the client
    sent. With ``vocab_size``, token ids (``logit_bias``, ``stop_token_ids``) are checked too."""
    names = {"max_new_tokens": "max_tokens", **(param_names or {})}
    top_k = req.top_k if req.top_k not in (None, -1) else 0
    try:
        params = SamplingParams(
            max_new_tokens=max_new_tokens,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=top_k,
            min_p=req.min_p or 0.0,
            presence_penalty=req.presence_penalty or 0.0,
            frequency_penalty=req.frequency_penalty or 0.0,
            repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
            stop=req.stop or (),
            stop_token_ids=tuple(req.stop_token_ids or ()),
            logit_bias=req.logit_bias or (),
            seed=req.seed,
            logprobs=logprobs,
            n=1 if req.n is None else req.n,
            ignore_eos=bool(req.ignore_eos),
        )
        if vocab_size is not None:
            params.check_vocab(vocab_size)
    except ValueError as e:
        raise param_error(e, names) from None
    return params


def param_error(e: ValueError, names: dict[str, str] | None = None) -> OpenAIError:
    """A :class:`SamplingParams` error as a 400 whose ``param`` is the request field (``names``
    maps SamplingParams fields to request fields where they differ)."""
    m = _FIELD.match(str(e))
    if m is None:
        return OpenAIError(400, str(e), code="invalid_value")
    field, rest = m.groups()
    param = (names or {}).get(field, field)
    return OpenAIError(400, f"{param} {rest}", param=param, code="invalid_value")


def finish_reason(engine_reason: str) -> str:
    """The Engine's finish reason in OpenAI's words: an end token or a stop string is ``stop``."""
    return "length" if engine_reason == "length" else "stop"


def response_head(rid: str, obj: str, model: str) -> dict:
    """The fields every OpenAI response and stream chunk starts with: id, object, created, model,
    system_fingerprint (None: the server does not pin a backend configuration)."""
    return {
        "id": rid,
        "object": obj,
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": None,
    }


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int | None = None) -> dict:
    out = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
    if cached_tokens is not None:
        out["prompt_tokens_details"] = {"cached_tokens": cached_tokens}
    return out


# -- log-probabilities ---------------------------------------------------------------------------

# The sampled token's log-probability is reported under the model's own distribution, as OpenAI
# and vLLM do (and as ``top_logprobs`` are), in streamed and unstreamed answers alike.


def delta_logprobs(d: Delta) -> list[float]:
    """The reported log-probabilities of a delta's tokens (the model's own)."""
    return list(d.raw_logprobs)


def completion_token_logprobs(c: Completion) -> list[float]:
    """The reported log-probabilities of a completion's tokens (the model's own)."""
    return list(c.raw_logprobs)


@functools.lru_cache(maxsize=1)
def _unicode_to_byte() -> dict[str, int]:
    """The inverse of GPT-2's byte-to-unicode table (byte-level BPE vocabularies spell bytes so)."""
    bs = list(range(ord("!"), ord("~") + 1))
    bs += list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


class TokenStrings:
    """A token id's text and UTF-8 bytes, as log-probabilities report them: for byte-level BPE
    vocabularies the token's own bytes (a token may hold part of a character; its text then
    shows U+FFFD), otherwise the UTF-8 of its decoded text."""

    def __init__(self, tokenizer: Tokenizer):
        self.hf = tokenizer.hf
        backend = getattr(self.hf, "backend_tokenizer", None)
        decoder = getattr(backend, "decoder", None)
        self.byte_level = type(decoder).__name__ == "ByteLevel"
        self.special = set(getattr(self.hf, "all_special_ids", ()) or ())
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def get(self, token_id: int) -> tuple[str, list[int]]:
        hit = self._cache.get(token_id)
        if hit is not None:
            return hit
        out = None
        if self.byte_level and token_id not in self.special:
            piece = self.hf.convert_ids_to_tokens(int(token_id))
            table = _unicode_to_byte()
            if isinstance(piece, str) and piece and all(c in table for c in piece):
                raw = bytes(table[c] for c in piece)
                out = (raw.decode("utf-8", errors="replace"), list(raw))
        if out is None:
            text = self.hf.decode([int(token_id)], skip_special_tokens=False)
            out = (text, list(text.encode("utf-8")))
        self._cache[token_id] = out
        return out


def chat_logprobs(
    strings: TokenStrings,
    tokens: list[int],
    logprobs: list[float],
    tops: list[list[tuple[int, float]]] | None,
    top_n: int,
) -> list[dict]:
    """``choices[i].logprobs.content`` entries of a chat completion (``top_n`` alternatives)."""
    out = []
    for k, (tok, lp) in enumerate(zip(tokens, logprobs)):
        text, raw = strings.get(tok)
        alts = []
        if top_n and tops is not None and k < len(tops):
            for alt, alt_lp in tops[k][:top_n]:
                alt_text, alt_raw = strings.get(alt)
                alts.append({"token": alt_text, "logprob": float(alt_lp), "bytes": alt_raw})
        out.append({"token": text, "logprob": float(lp), "bytes": raw, "top_logprobs": alts})
    return out


def completion_logprobs(
    strings: TokenStrings,
    tokens: list[int],
    logprobs: list[float],
    tops: list[list[tuple[int, float]]] | None,
    top_n: int,
    offset: int = 0,
) -> dict:
    """``choices[i].logprobs`` of a text completion (the legacy shape): ``tokens``,
    ``token_logprobs``, ``top_logprobs`` (a dict per token) and ``text_offset`` (characters into
    the completion text, from ``offset``)."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for k, (tok, lp) in enumerate(zip(tokens, logprobs)):
        text, _ = strings.get(tok)
        out["tokens"].append(text)
        out["token_logprobs"].append(float(lp))
        top = {}
        if top_n and tops is not None and k < len(tops):
            for alt, alt_lp in tops[k][:top_n]:
                top.setdefault(strings.get(alt)[0], float(alt_lp))
        out["top_logprobs"].append(top)
        out["text_offset"].append(offset)
        offset += len(text)
    return out


# -- server-sent events --------------------------------------------------------------------------


def sse(obj: dict) -> str:
    """One server-sent event carrying ``obj`` as JSON."""
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


SSE_DONE = "data: [DONE]\n\n"
