"""The agent loop: LLM -> tool calls -> LLM, over an in-process Engine or any OpenAI-compatible
endpoint, with the server's tool-call format.

Each step :func:`run_agent` lets the executor speculate (PASTE) and then asks the model for its
reply (so a turn's first call is speculated the moment the user's message arrives, in parallel
with the model's first decode); every call in the reply runs through :meth:`SpeculativeExecutor.execute` (promoted from a
speculation or run for real) and its result goes back as a ``tool`` message; a reply without calls
ends the user turn. Backends:

- :class:`EngineLLM`: a :class:`jaxlab.generation.Engine` in this process. The conversation is
  rendered exactly as ``jaxlab serve`` renders it (:func:`jaxlab.serving.tools.prepare_chat`:
  tool schemas in the system turn, calls as ``<tool_call>{"name": ..., "arguments": {...}}
  </tool_call>``, results as ``<tool_response>`` turns) and the reply parsed with
  :func:`~jaxlab.serving.tools.parse_tool_calls`.
- :class:`OpenAIChatLLM`: ``POST {base_url}/chat/completions`` with ``tools`` (``jaxlab serve``,
  vLLM, OpenAI ...), standard library HTTP only.
- :class:`ReplayLLM`: replays given calls, spending a real decode per step (the benchmark's).
"""

from __future__ import annotations

import dataclasses
import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from jaxlab.agents.executor import SpeculativeExecutor
from jaxlab.agents.tools import ToolCall, render_output
from jaxlab.errors import UserError

__all__ = [
    "LLMReply",
    "LLM",
    "EngineLLM",
    "OpenAIChatLLM",
    "ReplayLLM",
    "AgentResult",
    "run_agent",
]


@dataclasses.dataclass
class LLMReply:
    """A model reply: its text outside calls, its calls, tokens generated, seconds it took."""

    content: str | None
    calls: list[ToolCall]
    tokens: int = 0
    seconds: float = 0.0


class LLM(Protocol):
    def reply(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> LLMReply: ...

    def decode_estimate(self) -> float:
        """Expected seconds of the next reply (the speculation's time window)."""
        ...


def _calls_from_openai(calls: Sequence[dict[str, Any]]) -> list[ToolCall]:
    out = []
    for c in calls or ():
        fn = c.get("function", {})
        try:
            args = json.loads(fn.get("arguments") or "{}")
        except ValueError:
            args = {}
        out.append(ToolCall(fn.get("name", ""), args if isinstance(args, dict) else {}))
    return out


class _Timing:
    def __init__(self):
        self.seconds: list[float] = []

    def decode_estimate(self) -> float:
        if not self.seconds:
            return float("inf")
        recent = self.seconds[-8:]
        return sum(recent) / len(recent)


class EngineLLM(_Timing):
    """A model served by an in-process :class:`~jaxlab.generation.Engine` (one request at a
    time), prompted and parsed in the server's tool-call format."""

    def __init__(self, engine, tokenizer, params=None, *, tool_choice: Any = None):
        from jaxlab.generation import SamplingParams

        super().__init__()
        self.engine, self.tokenizer = engine, tokenizer
        self.params = params or SamplingParams(max_new_tokens=128, temperature=0.0)
        self.tool_choice = tool_choice

    def prompt_ids(self, messages, tools) -> tuple[list[int], str]:
        from jaxlab.serving.tools import prepare_chat

        turns, forced = prepare_chat(messages, tools or None, self.tool_choice if tools else None)
        text = self.tokenizer.apply_chat_template(turns)
        return self.tokenizer.encode(text + forced, add_special_tokens=False), forced

    def reply(self, messages, tools) -> LLMReply:
        from jaxlab.serving.tools import parse_tool_calls

        t0 = time.perf_counter()
        ids, forced = self.prompt_ids(messages, tools)
        rid = self.engine.submit(ids, self.params)
        (completion,) = [c for c in self.engine.run() if c.request_id == rid]
        content, calls = parse_tool_calls(completion.text or "", forced)
        dt = time.perf_counter() - t0
        self.seconds.append(dt)
        return LLMReply(content, _calls_from_openai(calls), len(completion.tokens), dt)


class OpenAIChatLLM(_Timing):
    """Any OpenAI-compatible chat endpoint (``base_url`` ends in ``/v1``)."""

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key: str | None = None,
        max_tokens: int = 256,
        temperature: float = 0.0,
        timeout: float = 300.0,
    ):
        super().__init__()
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.api_key = model, api_key
        self.max_tokens, self.temperature, self.timeout = max_tokens, temperature, timeout

    def reply(self, messages, tools) -> LLMReply:
        t0 = time.perf_counter()
        body = {
            "model": self.model,
            "messages": messages,
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
        }
        if tools:
            body["tools"] = tools
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(self.url, json.dumps(body).encode(), headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                data = json.loads(r.read())
        except urllib.error.HTTPError as e:
            raise UserError(f"{self.url} answered {e.code}: {e.read()[:500]!r}") from None
        except urllib.error.URLError as e:
            raise UserError(f"cannot reach {self.url}: {e.reason}") from None
        message = data["choices"][0]["message"]
        dt = time.perf_counter() - t0
        self.seconds.append(dt)
        tokens = int(data.get("usage", {}).get("completion_tokens", 0))
        return LLMReply(
            message.get("content"), _calls_from_openai(message.get("tool_calls")), tokens, dt
        )


class ReplayLLM(_Timing):
    """Replays scripted calls: reply ``i`` of turn ``t`` is ``calls[t][i]`` (then a reply without
    calls ends the turn), each after ``think(step)`` — the benchmark's real decode of a sampled
    number of tokens; ``think`` returns the tokens it decoded."""

    def __init__(
        self,
        calls: Sequence[Sequence[ToolCall]],
        think: Callable[[int], int],
        estimate: Callable[[int], float] | None = None,
    ):
        super().__init__()
        self.calls = [list(t) for t in calls]
        self.think = think
        self.estimate = estimate
        self.turn, self.index, self.step = 0, 0, 0

    def decode_estimate(self) -> float:
        if self.estimate is not None:
            return self.estimate(self.step)
        return super().decode_estimate()

    def reply(self, messages, tools) -> LLMReply:
        t0 = time.perf_counter()
        tokens = self.think(self.step)
        self.step += 1
        turn = self.calls[self.turn] if self.turn < len(self.calls) else []
        if self.index < len(turn):
            calls = [turn[self.index]]
            self.index += 1
            content = None
        else:
            calls, content = [], "done"
            self.turn, self.index = self.turn + 1, 0
        dt = time.perf_counter() - t0
        self.seconds.append(dt)
        return LLMReply(content, calls, tokens, dt)


@dataclasses.dataclass
class AgentResult:
    """A finished task: the conversation, the executor (log, stats), and time split."""

    messages: list[dict[str, Any]]
    executor: SpeculativeExecutor
    seconds: float
    llm_seconds: float
    steps: int

    @property
    def tool_seconds(self) -> float:
        """Seconds the loop waited for tools (stall)."""
        return self.executor.stats["stall_seconds"]


def run_agent(
    llm: LLM,
    executor: SpeculativeExecutor,
    turns: Sequence[str],
    *,
    system: str | None = None,
    max_steps_per_turn: int = 16,
) -> AgentResult:
    """Runs the loop over the user ``turns``; returns the :class:`AgentResult`."""
    tools = executor.registry.schemas()
    messages: list[dict[str, Any]] = []
    if system:
        messages.append({"role": "system", "content": system})
    t0 = time.perf_counter()
    llm_seconds, steps, call_id = 0.0, 0, 0
    try:
        for text in turns:
            messages.append({"role": "user", "content": text})
            executor.user_turn(text)
            for _ in range(max_steps_per_turn):
                executor.speculate(llm.decode_estimate())
                reply = llm.reply(messages, tools)
                llm_seconds += reply.seconds
                steps += 1
                if not reply.calls:
                    messages.append({"role": "assistant", "content": reply.content or ""})
                    break
                entries = []
                for call in reply.calls:
                    call_id += 1
                    entries.append(
                        {
                            "id": f"call_{call_id}",
                            "type": "function",
                            "function": {
                                "name": call.name,
                                "arguments": json.dumps(dict(call.arguments)),
                            },
                        }
                    )
                messages.append(
                    {"role": "assistant", "content": reply.content, "tool_calls": entries}
                )
                for call, entry in zip(reply.calls, entries):
                    event = executor.execute(call.name, dict(call.arguments))
                    messages.append(
                        {
                            "role": "tool",
                            "tool_call_id": entry["id"],
                            "content": render_output(event.output),
                        }
                    )
    finally:
        executor.close()
    return AgentResult(messages, executor, time.perf_counter() - t0, llm_seconds, steps)
