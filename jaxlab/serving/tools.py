"""Tool calls and JSON mode for the OpenAI-compatible server: the prompt format and its parsers.

The format
----------
Models are taught the format in the system turn (:meth:`ToolChoice.system_text`): the functions'
schemas, one JSON object per line between ``<tools>`` tags, and the rule that a call is written as ::

    <tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>

one block per call, several blocks for several calls in one turn. Earlier calls in the history are
rendered the same way (:func:`format_tool_call`), and a ``tool`` message comes back as a user turn
``<tool_response>{"tool_call_id": ..., "name": ..., "content": ...}</tool_response>`` (many chat
templates, SmolLM2's ChatML among them, know no tool role); consecutive results share one turn.

``tool_choice``: ``"none"`` renders no tools and parses nothing; ``"auto"`` (the default when there
are tools) lets the model choose; ``"required"`` and a named function
``{"type": "function", "function": {"name": N}}`` also return a forced prefix
(``<tool_call>{"name": "`` or ``<tool_call>{"name": "N", "arguments": ``) that the server appends to
the rendered prompt, so that the model starts inside a call. The parsers are given the same prefix
and parse ``prefix + output``.

Parsing
-------
A block runs from ``<tool_call>`` to the first ``</tool_call>`` that is not inside a JSON string
(a ``</tool_call>`` in an argument's text does not end it). A new ``<tool_call>`` outside strings
also ends the block before it, and the end of the output ends the last one: such unclosed blocks
count when their JSON is complete (a model that stops without the close tag, or a stop sequence
that removed it). A block is a call when its text is one JSON object with a non-empty string
``name`` and an object ``arguments`` (missing means ``{}``; ``parameters`` is accepted for it, and
so is a string holding a JSON object); the arguments are re-serialised with :func:`json.dumps`. Any
other block (invalid JSON, no name, non-object arguments, an unclosed block cut short) stays in the
content as written. Parsing never raises.

:func:`parse_tool_calls` parses a whole output; :class:`ToolCallStreamParser` turns text deltas
into OpenAI ``delta`` fragments. For any chunking of the same output, the streamed content
fragments concatenate to the parsed content and the streamed calls, accumulated as the ``openai``
client does, equal the parsed calls. For that a call is sent only when its block is decided (closed,
or at the end): a streamed fragment cannot be taken back, so a block that might still turn out
malformed is never half sent. Content streams as it comes, holding back only text that may be the
start of ``<tool_call>`` and, while the content is all whitespace, that whitespace.

JSON mode
---------
``response_format`` ``{"type": "json_object"}`` (and ``json_schema``) is a best effort:
:func:`response_format_instruction` asks for one JSON object in the system turn; decoding is not
constrained, so the reply may still not be JSON.
"""

from __future__ import annotations

import dataclasses
import json
import re
import secrets
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from jaxlab.errors import UserError

__all__ = [
    "TOOL_CALL_OPEN",
    "TOOL_CALL_CLOSE",
    "TOOL_RESPONSE_OPEN",
    "TOOL_RESPONSE_CLOSE",
    "ChatRequestError",
    "ToolChoice",
    "resolve_tool_choice",
    "format_tool_call",
    "prepare_chat",
    "response_format_instruction",
    "new_call_id",
    "parse_tool_calls",
    "ToolCallStreamParser",
    "chat_finish_reason",
]

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"
TOOL_RESPONSE_OPEN = "<tool_response>"
TOOL_RESPONSE_CLOSE = "</tool_response>"

_FUNCTION_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # OpenAI's rule for function names
_TOOL_CHOICES = ("none", "auto", "required")


class ChatRequestError(UserError):
    """A bad chat request field. ``param`` is its path in the request (``tool_choice``,
    ``tools[0].function.name``, ``messages[2].tool_call_id``, ``response_format.type``), for the
    HTTP 400 error body; the message names it too."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


# -- tools and tool_choice -------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, eq=False)
class ToolChoice:
    """A validated ``tools`` / ``tool_choice`` pair.

    ``mode`` is ``"none"``, ``"auto"``, ``"required"`` or ``"function"`` (then ``function`` is the
    name); ``tools`` holds each function's ``{"name", "description"?, "parameters"?}``.
    """

    mode: str
    function: str | None = None
    tools: tuple[dict[str, Any], ...] = ()

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(t["name"] for t in self.tools)

    @property
    def parse(self) -> bool:
        """Whether the output is parsed for calls (not for ``"none"``)."""
        return self.mode != "none"

    @property
    def forced_prefix(self) -> str:
        """Text the server appends after the rendered prompt so that the reply starts in a call."""
        if self.mode == "required":
            return TOOL_CALL_OPEN + '{"name": "'
        if self.mode == "function":
            return TOOL_CALL_OPEN + '{"name": ' + _dumps(self.function) + ', "arguments": '
        return ""

    def system_text(self) -> str:
        """The tools' part of the system turn ("" for ``"none"``)."""
        if self.mode == "none":
            return ""
        schemas = "\n".join(_dumps(t) for t in self.tools)
        rule = {
            "auto": "Call a function only when it helps; otherwise answer directly.",
            "required": "You must call at least one function in this reply.",
            "function": f"You must call the function {self.function} in this reply.",
        }[self.mode]
        return (
            "# Tools\n\n"
            "You can call functions to answer. The available functions, one JSON schema per line:\n"
            f"<tools>\n{schemas}\n</tools>\n\n"
            "To call a function, write a block\n"
            f'{TOOL_CALL_OPEN}{{"name": "<function name>", "arguments": '
            f"{{<the arguments as a JSON object>}}}}{TOOL_CALL_CLOSE}\n"
            "Write one block per call; for several calls in one turn, write several blocks. "
            f"The results come back in {TOOL_RESPONSE_OPEN}{TOOL_RESPONSE_CLOSE} blocks. {rule}"
        )


def _validate_tools(tools: Any) -> tuple[dict[str, Any], ...]:
    if tools is None:
        return ()
    if not isinstance(tools, list | tuple):
        raise ChatRequestError(
            "tools",
            'tools must be a list of {"type": "function", "function": {...}} objects, '
            f"got {type(tools).__name__}",
        )
    specs: list[dict[str, Any]] = []
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, Mapping):
            raise ChatRequestError(where, f"{where} must be an object, got {type(tool).__name__}")
        if tool.get("type", "function") != "function":
            raise ChatRequestError(
                f"{where}.type",
                f"{where}.type is {tool.get('type')!r}; only 'function' tools are supported",
            )
        fn = tool.get("function")
        if not isinstance(fn, Mapping):
            raise ChatRequestError(f"{where}.function", f"{where}.function must be an object")
        name = fn.get("name")
        if not isinstance(name, str) or not _FUNCTION_NAME.fullmatch(name):
            raise ChatRequestError(
                f"{where}.function.name",
                f"{where}.function.name must be 1-64 letters, digits, '_' or '-', got {name!r}",
            )
        if any(s["name"] == name for s in specs):
            raise ChatRequestError(
                f"{where}.function.name", f"{where}.function.name {name!r} appears twice"
            )
        spec: dict[str, Any] = {"name": name}
        description = fn.get("description")
        if description is not None:
            if not isinstance(description, str):
                raise ChatRequestError(
                    f"{where}.function.description",
                    f"{where}.function.description must be a string",
                )
            if description:
                spec["description"] = description
        parameters = fn.get("parameters")
        if parameters is not None:
            if not isinstance(parameters, Mapping):
                raise ChatRequestError(
                    f"{where}.function.parameters",
                    f"{where}.function.parameters must be a JSON Schema object",
                )
            spec["parameters"] = dict(parameters)
        specs.append(spec)
    return tuple(specs)


def resolve_tool_choice(tools: Any = None, tool_choice: Any = None) -> ToolChoice:
    """Validates ``tools`` and ``tool_choice`` as a chat request carries them.

    ``tool_choice`` defaults to ``"auto"`` with tools and ``"none"`` without; ``"auto"`` without
    tools means ``"none"``. Raises :class:`ChatRequestError` (``param`` ``"tools"`` or
    ``"tool_choice"``) for a malformed entry, ``"required"`` without tools, or a named function
    that is not among the tools.
    """
    specs = _validate_tools(tools)
    names = [s["name"] for s in specs]
    if tool_choice is None:
        return ToolChoice("auto" if specs else "none", tools=specs)
    if isinstance(tool_choice, str):
        if tool_choice not in _TOOL_CHOICES:
            raise ChatRequestError(
                "tool_choice",
                f"tool_choice must be one of {', '.join(_TOOL_CHOICES)} or "
                f'{{"type": "function", "function": {{"name": ...}}}}, got {tool_choice!r}',
            )
        if tool_choice == "required" and not specs:
            raise ChatRequestError("tool_choice", "tool_choice 'required' needs tools")
        return ToolChoice(tool_choice if specs else "none", tools=specs)
    if isinstance(tool_choice, Mapping):
        fn = tool_choice.get("function")
        name = fn.get("name") if isinstance(fn, Mapping) else None
        if tool_choice.get("type") != "function" or not isinstance(name, str):
            raise ChatRequestError(
                "tool_choice",
                'tool_choice must name a function as {"type": "function", "function": {"name": ...}}, '
                f"got {_dumps(tool_choice)}",
            )
        if name not in names:
            raise ChatRequestError(
                "tool_choice",
                f"tool_choice names the function {name!r}, which is not among tools "
                f"({', '.join(names) or 'none given'})",
            )
        return ToolChoice("function", function=name, tools=specs)
    raise ChatRequestError(
        "tool_choice",
        f"tool_choice must be a string or an object, got {type(tool_choice).__name__}",
    )


# -- the conversation ------------------------------------------------------------------------------
def format_tool_call(name: str, arguments: Mapping[str, Any] | str) -> str:
    """One call as the model writes it: ``<tool_call>{"name": ..., "arguments": ...}</tool_call>``."""
    if isinstance(arguments, Mapping):
        arguments = dict(arguments)
    return TOOL_CALL_OPEN + _dumps({"name": name, "arguments": arguments}) + TOOL_CALL_CLOSE


def _text_content(content: Any, where: str, *, allow_none: bool = False) -> str:
    """A message's content: a string, or text parts joined by newlines."""
    if content is None and allow_none:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, Mapping):
                raise ChatRequestError(
                    f"{where}[{j}]", f"{where}[{j}] must be a content part object"
                )
            kind = part.get("type")
            if kind != "text":
                raise ChatRequestError(
                    f"{where}[{j}].type",
                    f"{where}[{j}].type is {kind!r}; only text parts are supported",
                )
            text = part.get("text")
            if not isinstance(text, str):
                raise ChatRequestError(f"{where}[{j}].text", f"{where}[{j}].text must be a string")
            texts.append(text)
        return "\n".join(texts)
    raise ChatRequestError(
        where,
        f"{where} must be a string or a list of text parts, got {type(content).__name__}",
    )


def _call_arguments(arguments: Any, where: str) -> dict[str, Any] | str:
    """A history call's arguments: the JSON object its string holds (a string that is not one is
    kept as a string)."""
    if arguments is None or arguments == "":
        return {}
    if isinstance(arguments, Mapping):
        return dict(arguments)
    if not isinstance(arguments, str):
        raise ChatRequestError(where, f"{where} must be a JSON string")
    try:
        value = json.loads(arguments)
    except ValueError:
        return arguments
    return value if isinstance(value, dict) else arguments


def _convert_messages(messages: Any) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise ChatRequestError("messages", "messages must be a non-empty list of message objects")
    turns: list[dict[str, str]] = []
    names_by_id: dict[str, str] = {}
    results_turn = -1  # index of the user turn that holds the latest run of tool results
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, Mapping):
            raise ChatRequestError(where, f"{where} must be an object")
        role = message.get("role")
        if role in ("system", "developer", "user"):
            content = _text_content(message.get("content"), f"{where}.content")
            turns.append({"role": "user" if role == "user" else "system", "content": content})
        elif role == "assistant":
            content = _text_content(message.get("content"), f"{where}.content", allow_none=True)
            calls = message.get("tool_calls") or []
            if not isinstance(calls, list):
                raise ChatRequestError(f"{where}.tool_calls", f"{where}.tool_calls must be a list")
            blocks = []
            for j, call in enumerate(calls):
                cwhere = f"{where}.tool_calls[{j}]"
                fn = call.get("function") if isinstance(call, Mapping) else None
                name = fn.get("name") if isinstance(fn, Mapping) else None
                if not isinstance(name, str) or not name:
                    raise ChatRequestError(
                        cwhere,
                        f'{cwhere} must be {{"id", "type", "function": {{"name", ...}}}}',
                    )
                args = _call_arguments(fn.get("arguments"), f"{cwhere}.function.arguments")
                call_id = call.get("id")
                if isinstance(call_id, str) and call_id:
                    names_by_id[call_id] = name
                blocks.append(format_tool_call(name, args))
            if blocks:
                if not content.strip():
                    content = ""
                elif not content.endswith("\n"):
                    content += "\n"
                content += "\n".join(blocks)
            turns.append({"role": "assistant", "content": content})
        elif role == "tool":
            call_id = message.get("tool_call_id")
            if not isinstance(call_id, str) or not call_id:
                raise ChatRequestError(
                    f"{where}.tool_call_id",
                    f"{where}.tool_call_id is missing: a tool message answers a call by its id",
                )
            if call_id not in names_by_id:
                raise ChatRequestError(
                    f"{where}.tool_call_id",
                    f"{where}.tool_call_id {call_id!r} answers no tool call of an earlier "
                    "assistant message",
                )
            content = _text_content(message.get("content"), f"{where}.content")
            block = (
                TOOL_RESPONSE_OPEN
                + _dumps(
                    {"tool_call_id": call_id, "name": names_by_id[call_id], "content": content}
                )
                + TOOL_RESPONSE_CLOSE
            )
            if results_turn == len(turns) - 1 and results_turn >= 0:
                turns[-1]["content"] += "\n" + block
            else:
                turns.append({"role": "user", "content": block})
                results_turn = len(turns) - 1
        else:
            raise ChatRequestError(
                f"{where}.role",
                f"{where}.role is {role!r}; expected system, developer, user, assistant or tool",
            )
    return turns


def response_format_instruction(response_format: Any) -> str | None:
    """The system-turn instruction for ``response_format``, or None for plain text.

    Best effort: ``{"type": "json_object"}`` asks for one JSON object and ``{"type":
    "json_schema", "json_schema": {"schema": ...}}`` also shows the schema, but decoding is not
    constrained, so the model may still answer otherwise. Raises :class:`ChatRequestError`
    (``param`` ``"response_format"``) for an unknown type.
    """
    if response_format is None:
        return None
    if not isinstance(response_format, Mapping):
        raise ChatRequestError("response_format", "response_format must be an object")
    kind = response_format.get("type")
    if kind == "text":
        return None
    base = (
        "Answer with one JSON object and nothing else: no text before or after it and no code "
        "fences."
    )
    if kind == "json_object":
        return base
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, Mapping):
            raise ChatRequestError(
                "response_format.json_schema",
                'response_format json_schema needs a "json_schema" object',
            )
        schema = spec.get("schema")
        if schema is None:
            return base
        if not isinstance(schema, Mapping):
            raise ChatRequestError(
                "response_format.json_schema.schema",
                "response_format json_schema.schema must be an object",
            )
        return f"{base} The object must follow this JSON schema:\n{_dumps(schema)}"
    raise ChatRequestError(
        "response_format.type",
        f"response_format.type must be text, json_object or json_schema, got {kind!r}",
    )


def prepare_chat(
    messages: Any, tools: Any = None, tool_choice: Any = None, *, response_format: Any = None
) -> tuple[list[dict[str, str]], str]:
    """A chat request's messages as chat-template turns, and the forced assistant prefix.

    Returns ``(turns, forced_prefix)``: ``turns`` are ``{"role", "content"}`` dicts with string
    content and roles system / user / assistant, for ``Tokenizer.apply_chat_template``. The tools'
    instructions (unless ``tool_choice`` is ``"none"``) and the ``response_format`` instruction are
    appended to the first message when it is a system (or developer) message, else they become a
    new system message in front. Assistant tool calls become ``<tool_call>`` blocks and tool
    results ``<tool_response>`` user turns (see the module docstring). ``forced_prefix`` is ""
    except for ``tool_choice`` ``"required"`` or a named function: the server appends it to the
    rendered prompt and gives it to :func:`parse_tool_calls` / :class:`ToolCallStreamParser`.

    Raises :class:`ChatRequestError` naming the bad field.
    """
    choice = resolve_tool_choice(tools, tool_choice)
    instruction = response_format_instruction(response_format)
    turns = _convert_messages(messages)
    extra = "\n\n".join(t for t in (choice.system_text(), instruction) if t)
    if extra:
        if turns[0]["role"] == "system":
            first = turns[0]["content"]
            turns[0] = {"role": "system", "content": f"{first}\n\n{extra}" if first else extra}
        else:
            turns.insert(0, {"role": "system", "content": extra})
    return turns, choice.forced_prefix


# -- parsing ---------------------------------------------------------------------------------------
def new_call_id() -> str:
    """A fresh tool-call id, ``call_`` and 24 random hex digits."""
    return "call_" + secrets.token_hex(12)


IdSource = Iterable[str] | Callable[[], str] | None


def _id_factory(ids: IdSource) -> Callable[[], str]:
    """Ids from a factory, or from an iterable (fresh random ones once it runs out)."""
    if ids is None:
        return new_call_id
    if callable(ids):
        return ids
    if isinstance(ids, str):
        raise TypeError("ids must be an iterable of id strings or a function, not a string")
    it = iter(ids)
    return lambda: next(it, None) or new_call_id()


class _BlockEnd:
    """Finds where a ``<tool_call>`` block's text ends; resumes where it stopped as text grows.

    The block ends at the first ``</tool_call>`` (closed) or ``<tool_call>`` (unclosed) outside a
    JSON string; strings are tracked only when the block starts with ``{``.
    """

    __slots__ = ("pos", "json", "in_string", "escape")

    def __init__(self):
        self.pos = 0
        self.json: bool | None = None
        self.in_string = False
        self.escape = False

    def find(self, body: str) -> tuple[int, bool] | None:
        """``(index, closed)`` of the block's end in ``body``, or None while undecided."""
        i, n = self.pos, len(body)
        while i < n:
            c = body[i]
            if self.in_string:
                if self.escape:
                    self.escape = False
                elif c == "\\":
                    self.escape = True
                elif c == '"':
                    self.in_string = False
                i += 1
                continue
            if self.json is None:
                if c.isspace():
                    i += 1
                    continue
                self.json = c == "{"
            if c == "<":
                if body.startswith(TOOL_CALL_CLOSE, i):
                    self.pos = i
                    return i, True
                if body.startswith(TOOL_CALL_OPEN, i):
                    self.pos = i
                    return i, False
                rest = body[i : i + len(TOOL_CALL_CLOSE)]
                if len(rest) < len(TOOL_CALL_CLOSE) and (
                    TOOL_CALL_CLOSE.startswith(rest) or TOOL_CALL_OPEN.startswith(rest)
                ):
                    break  # a tag may be starting: wait for more text
            elif c == '"' and self.json:
                self.in_string = True
            i += 1
        self.pos = i
        return None


def _reject_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def _parse_call(body: str) -> tuple[str, str] | None:
    """``(name, arguments JSON)`` when a block's text is a call, else None."""
    text = body.strip()
    if not text.startswith("{"):
        return None
    try:
        obj = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        return None
    if not isinstance(obj, dict):
        return None
    name = obj.get("name")
    if not isinstance(name, str) or not name.strip():
        return None
    args = obj["arguments"] if "arguments" in obj else obj.get("parameters", {})
    if isinstance(args, str):
        try:
            args = json.loads(args, parse_constant=_reject_constant)
        except (ValueError, RecursionError):
            return None
    if not isinstance(args, dict):
        return None
    return name.strip(), _dumps(args)


def parse_tool_calls(
    text: str, forced_prefix: str = "", *, ids: IdSource = None
) -> tuple[str | None, list[dict[str, Any]]]:
    """Splits a whole reply into content and tool calls.

    Args:
      text: the generated text (after the forced prefix, if any).
      forced_prefix: the prefix the prompt ended with (:attr:`ToolChoice.forced_prefix`).
      ids: the calls' ids: an iterable of strings or a function returning one (default
        :func:`new_call_id`).

    Returns:
      ``(content, calls)``: content is the text outside call blocks (None when there are calls and
      it is only whitespace); each call is ``{"id", "type": "function", "function": {"name",
      "arguments": "<JSON object>"}}``. Malformed blocks stay in the content; never raises.
    """
    text = forced_prefix + text
    next_id = _id_factory(ids)
    content: list[str] = []
    calls: list[dict[str, Any]] = []
    pos = 0
    while True:
        start = text.find(TOOL_CALL_OPEN, pos)
        if start < 0:
            content.append(text[pos:])
            break
        content.append(text[pos:start])
        body_start = start + len(TOOL_CALL_OPEN)
        end = _BlockEnd().find(text[body_start:])
        if end is None:
            body, pos = text[body_start:], len(text)
        else:
            j, closed = end
            body = text[body_start : body_start + j]
            pos = body_start + j + (len(TOOL_CALL_CLOSE) if closed else 0)
        call = _parse_call(body)
        if call is None:
            content.append(text[start:pos])
        else:
            name, arguments = call
            calls.append(
                {
                    "id": next_id(),
                    "type": "function",
                    "function": {"name": name, "arguments": arguments},
                }
            )
    joined = "".join(content)
    return (None if calls and not joined.strip() else joined), calls


def _partial_tag(text: str, tag: str) -> int:
    """Length of the longest end of ``text`` that is a proper start of ``tag``."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0


class ToolCallStreamParser:
    """Turns a reply's text deltas into OpenAI chat ``delta`` fragments, as they arrive.

    :meth:`feed` and :meth:`finish` return lists of deltas in order, each either
    ``{"content": str}`` or ``{"tool_calls": [one entry]}``: call ``i`` first comes as
    ``{"index": i, "id", "type": "function", "function": {"name", "arguments": ""}}``, then its
    arguments as ``{"index": i, "function": {"arguments": str}}``; indexes count up from 0.
    A call is sent when its block is decided (closed, or ended by the output's end); content is
    sent as it comes, except text that may be the start of ``<tool_call>`` and, while all the
    content so far is whitespace, that whitespace (dropped at the end when there were calls, as
    :func:`parse_tool_calls` returns None then). The deltas of any chunking of a text agree with
    ``parse_tool_calls(text, forced_prefix, ids=...)`` given the same ids.

    Args:
      forced_prefix: the prefix the prompt ended with (:attr:`ToolChoice.forced_prefix`).
      ids: the calls' ids: an iterable of strings or a function returning one (default
        :func:`new_call_id`).
    """

    def __init__(self, forced_prefix: str = "", ids: IdSource = None):
        self._next_id = _id_factory(ids)
        self._out: list[dict[str, Any]] = []
        self._held = ""  # outside blocks: an end that may start <tool_call>
        self._body: str | None = None  # inside a block: its text after <tool_call>
        self._end = _BlockEnd()
        self._blank = ""  # content held while all content so far is whitespace
        self._content_started = False
        self._calls = 0
        self._finished = False
        self._consume(forced_prefix)

    @property
    def has_calls(self) -> bool:
        """Whether at least one call was parsed (then the finish reason is ``tool_calls``)."""
        return self._calls > 0

    def feed(self, text: str) -> list[dict[str, Any]]:
        """The deltas that ``text`` (the next piece of the reply) decides."""
        if self._finished:
            raise RuntimeError("feed() after finish()")
        self._consume(text)
        return self._take()

    def finish(self) -> list[dict[str, Any]]:
        """The deltas still held back, at the end of the reply."""
        if self._finished:
            return []
        self._finished = True
        if self._body is not None:
            self._block(self._body, closed=False)
            self._body = None
        else:
            self._emit_content(self._held)
            self._held = ""
        if self._blank and not self._calls:
            self._out.append({"content": self._blank})
        self._blank = ""
        return self._take()

    # -- internals -------------------------------------------------------------------------------
    def _consume(self, text: str) -> None:
        while text:
            if self._body is None:
                buf, text = self._held + text, ""
                start = buf.find(TOOL_CALL_OPEN)
                if start >= 0:
                    self._emit_content(buf[:start])
                    self._held = ""
                    self._body, self._end = "", _BlockEnd()
                    text = buf[start + len(TOOL_CALL_OPEN) :]
                    continue
                keep = _partial_tag(buf, TOOL_CALL_OPEN)
                self._emit_content(buf[: len(buf) - keep])
                self._held = buf[len(buf) - keep :]
            else:
                self._body += text
                text = ""
                end = self._end.find(self._body)
                if end is None:
                    return
                j, closed = end
                body, rest = self._body[:j], self._body[j:]
                if closed:
                    rest = rest[len(TOOL_CALL_CLOSE) :]
                self._body = None
                self._block(body, closed)
                text = rest

    def _block(self, body: str, closed: bool) -> None:
        call = _parse_call(body)
        if call is None:
            self._emit_content(TOOL_CALL_OPEN + body + (TOOL_CALL_CLOSE if closed else ""))
            return
        name, arguments = call
        index = self._calls
        self._calls += 1
        first = {"name": name, "arguments": ""}
        self._out.append(
            {
                "tool_calls": [
                    {"index": index, "id": self._next_id(), "type": "function", "function": first}
                ]
            }
        )
        self._out.append({"tool_calls": [{"index": index, "function": {"arguments": arguments}}]})

    def _emit_content(self, text: str) -> None:
        if not text:
            return
        if not self._content_started:
            if not text.strip():
                self._blank += text
                return
            text, self._blank = self._blank + text, ""
            self._content_started = True
        self._out.append({"content": text})

    def _take(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for delta in self._out:
            if "content" in delta and out and "content" in out[-1]:
                out[-1] = {"content": out[-1]["content"] + delta["content"]}
            else:
                out.append(delta)
        self._out = []
        return out


def chat_finish_reason(reason: str, has_calls: bool) -> str:
    """A chat choice's ``finish_reason``: ``"tool_calls"`` when calls were parsed, unless the
    generation was cut by the token limit (``"length"`` stays, as OpenAI reports a cut reply);
    otherwise the engine's reason."""
    if has_calls and reason != "length":
        return "tool_calls"
    return reason
