"""Tool calls for the OpenAI-compatible server (jaxlab.serving.tools), without a model.

Scripted replies go through both parsers: the whole-text parse gives the expected content and
calls, and the streaming parser, fed the same text in every chunking tried (whole, one character
at a time, two pieces split at every position, random chunkings with a fixed seed), gives deltas
that obey the wire rules (id / type / name once per index, indexes counting up, one call per
delta, arguments that are JSON) and reconstruct to the same content and calls, both by hand and
with the ``openai`` client's own accumulation. The prompt side renders tools and histories with
tool calls and results, and goes through SmolLM2's real chat template.
"""

from __future__ import annotations

import copy
import json
import random
import re

import pytest

from jaxlab.errors import UserError
from jaxlab.serving.tools import (
    TOOL_CALL_OPEN,
    ChatRequestError,
    ToolCallStreamParser,
    chat_finish_reason,
    format_tool_call,
    parse_tool_calls,
    prepare_chat,
    resolve_tool_choice,
    response_format_instruction,
)

CALL_ID = re.compile(r"call_[0-9a-f]{24}")
IDS = [f"call_test{i}" for i in range(50)]


def block(name, arguments=None, **extra):
    obj = {"name": name, **({} if arguments is None else {"arguments": arguments}), **extra}
    return TOOL_CALL_OPEN + json.dumps(obj) + "</tool_call>"


WEATHER = block("get_weather", {"city": "Paris"})
SEARCH = block("search", {"query": "jax", "limit": 3})

# name -> (reply, expected content, expected calls as (name, arguments object))
CASES = {
    "no_call": ("The weather is nice today.", "The weather is nice today.", []),
    "empty": ("", "", []),
    "whitespace_only": ("  \n ", "  \n ", []),
    "one_call": (WEATHER, None, [("get_weather", {"city": "Paris"})]),
    "two_calls": (
        WEATHER + "\n" + SEARCH,
        None,
        [("get_weather", {"city": "Paris"}), ("search", {"query": "jax", "limit": 3})],
    ),
    "text_before_and_after": (
        "Let me check.\n" + WEATHER + "\nDone.",
        "Let me check.\n\nDone.",
        [("get_weather", {"city": "Paris"})],
    ),
    "text_between": (
        "First " + WEATHER + " then " + SEARCH,
        "First  then ",
        [("get_weather", {"city": "Paris"}), ("search", {"query": "jax", "limit": 3})],
    ),
    "pretty_block": (
        '\n<tool_call>\n{"name": "get_weather",\n "arguments": {"city": "Paris"}}\n</tool_call>\n',
        None,
        [("get_weather", {"city": "Paris"})],
    ),
    "malformed_json": (
        'Hm <tool_call>{"name": "f", "arguments": {"a": 1,}}</tool_call> ok',
        'Hm <tool_call>{"name": "f", "arguments": {"a": 1,}}</tool_call> ok',
        [],
    ),
    "missing_name": (
        '<tool_call>{"arguments": {"a": 1}}</tool_call>',
        '<tool_call>{"arguments": {"a": 1}}</tool_call>',
        [],
    ),
    "empty_name": (block("", {}), block("", {}), []),
    "arguments_not_object": (
        block("f", [1, 2]) + block("g", "not json"),
        block("f", [1, 2]) + block("g", "not json"),
        [],
    ),
    "not_an_object": ("<tool_call>[1, 2]</tool_call>", "<tool_call>[1, 2]</tool_call>", []),
    "empty_block": ("<tool_call></tool_call>", "<tool_call></tool_call>", []),
    "text_in_block": (
        "<tool_call>I can't \"decide</tool_call> x",
        "<tool_call>I can't \"decide</tool_call> x",
        [],
    ),
    "junk_after_json": (
        '<tool_call>{"name": "f", "arguments": {}} and more</tool_call>',
        '<tool_call>{"name": "f", "arguments": {}} and more</tool_call>',
        [],
    ),
    "nan_rejected": (
        '<tool_call>{"name": "f", "arguments": {"x": NaN}}</tool_call>',
        '<tool_call>{"name": "f", "arguments": {"x": NaN}}</tool_call>',
        [],
    ),
    "unclosed_incomplete": (
        'Hi <tool_call>{"name": "f", "arguments": {"a": ',
        'Hi <tool_call>{"name": "f", "arguments": {"a": ',
        [],
    ),
    "unclosed_open_string": (
        '<tool_call>{"name": "f", "arguments": {"a": "x}}</tool_call> tail',
        '<tool_call>{"name": "f", "arguments": {"a": "x}}</tool_call> tail',
        [],
    ),
    "unclosed_complete": (
        'Sure: <tool_call>{"name": "f", "arguments": {"a": 1}}\n',
        "Sure: ",
        [("f", {"a": 1})],
    ),
    "cut_in_close_tag": (
        '<tool_call>{"name": "f", "arguments": {}}</tool_c',
        '<tool_call>{"name": "f", "arguments": {}}</tool_c',
        [],
    ),
    "implicit_close_by_next_call": (
        '<tool_call>{"name": "f", "arguments": {}}\n' + SEARCH,
        None,
        [("f", {}), ("search", {"query": "jax", "limit": 3})],
    ),
    "lookalikes": (
        "Use <tools>, <tool_call_x>, <tool_calls> or </tool_call> and <tool <",
        "Use <tools>, <tool_call_x>, <tool_calls> or </tool_call> and <tool <",
        [],
    ),
    "ends_with_partial_open": ("Answer: <tool_ca", "Answer: <tool_ca", []),
    "close_tag_inside_string": (
        block("echo", {"text": "write </tool_call> and <tool_call> here"}),
        None,
        [("echo", {"text": "write </tool_call> and <tool_call> here"})],
    ),
    "escapes": (
        block("echo", {"q": 'say "hi" \\ back\\', "n": [1, {"k": None}]}),
        None,
        [("echo", {"q": 'say "hi" \\ back\\', "n": [1, {"k": None}]})],
    ),
    "escaped_quote_then_close_tag_in_string": (
        block("echo", {"q": 'a " </tool_call> b \\'}),
        None,
        [("echo", {"q": 'a " </tool_call> b \\'})],
    ),
    "unicode": (
        '<tool_call>{"name": "get_weather", "arguments": {"city": "Zürich", "note": "雨"}}</tool_call>',
        None,
        [("get_weather", {"city": "Zürich", "note": "雨"})],
    ),
    "no_arguments": (block("now"), None, [("now", {})]),
    "parameters_alias": (
        '<tool_call>{"name": "f", "parameters": {"a": 1}}</tool_call>',
        None,
        [("f", {"a": 1})],
    ),
    "arguments_as_json_string": (block("f", json.dumps({"a": [1]})), None, [("f", {"a": [1]})]),
    "valid_then_malformed": (
        WEATHER + " <tool_call>{oops}</tool_call>",
        " <tool_call>{oops}</tool_call>",
        [("get_weather", {"city": "Paris"})],
    ),
    "malformed_then_valid": (
        "<tool_call>{oops}</tool_call>" + WEATHER,
        "<tool_call>{oops}</tool_call>",
        [("get_weather", {"city": "Paris"})],
    ),
    "stray_close_then_call": (
        "</tool_call>" + WEATHER,
        "</tool_call>",
        [("get_weather", {"city": "Paris"})],
    ),
}

REQUIRED = resolve_tool_choice(
    [{"type": "function", "function": {"name": "get_weather"}}], "required"
).forced_prefix
NAMED = resolve_tool_choice(
    [{"type": "function", "function": {"name": "get_weather"}}],
    {"type": "function", "function": {"name": "get_weather"}},
).forced_prefix

# name -> (forced prefix, reply after it, expected content, expected calls)
FORCED = {
    "required": (
        REQUIRED,
        'get_weather", "arguments": {"city": "Oslo"}}</tool_call>',
        None,
        [("get_weather", {"city": "Oslo"})],
    ),
    "required_two_calls": (
        REQUIRED,
        'get_weather", "arguments": {"city": "Oslo"}}</tool_call>\n' + SEARCH,
        None,
        [("get_weather", {"city": "Oslo"}), ("search", {"query": "jax", "limit": 3})],
    ),
    "named": (NAMED, '{"city": "Oslo"}}</tool_call>', None, [("get_weather", {"city": "Oslo"})]),
    "named_no_close_tag": (NAMED, '{"city": "Oslo"}}', None, [("get_weather", {"city": "Oslo"})]),
    "named_malformed": (NAMED, "I will not.", NAMED + "I will not.", []),
    "required_cut": (REQUIRED, "get_wea", REQUIRED + "get_wea", []),
}


def all_cases():
    for name, (text, content, calls) in CASES.items():
        yield pytest.param("", text, content, calls, id=name)
    for name, (prefix, text, content, calls) in FORCED.items():
        yield pytest.param(prefix, text, content, calls, id="forced_" + name)


def chunkings(text, seed=0, random_splits=25):
    """Ways to cut ``text`` into deltas: whole, per character, two pieces at every position,
    random pieces of 1-9 characters."""
    yield [text]
    yield list(text)
    for k in range(1, len(text)):
        yield [text[:k], text[k:]]
    rng = random.Random(seed)
    for _ in range(random_splits):
        pieces, i = [], 0
        while i < len(text):
            n = rng.randint(1, 9)
            pieces.append(text[i : i + n])
            i += n
        yield pieces


def stream(pieces, forced_prefix="", ids=IDS):
    parser = ToolCallStreamParser(forced_prefix, ids=iter(ids))
    deltas = []
    for piece in pieces:
        deltas += parser.feed(piece)
    deltas += parser.finish()
    return deltas, parser.has_calls


def reconstruct(deltas):
    """Content and calls from deltas, checking the wire rules on the way."""
    content, calls = [], []
    for delta in deltas:
        assert len(delta) == 1, delta
        if "content" in delta:
            assert isinstance(delta["content"], str) and delta["content"], delta
            content.append(delta["content"])
            continue
        (entry,) = delta["tool_calls"]  # at most one call per delta
        index = entry["index"]
        if index == len(calls):  # the first delta of a call: id, type and name, once
            assert set(entry) == {"index", "id", "type", "function"}, entry
            assert entry["type"] == "function" and isinstance(entry["id"], str)
            assert entry["function"]["name"] and entry["function"]["arguments"] == ""
            calls.append(
                {
                    "id": entry["id"],
                    "type": "function",
                    "function": {"name": entry["function"]["name"], "arguments": ""},
                }
            )
        else:  # later deltas of the latest call: arguments only
            assert index == len(calls) - 1, (index, len(calls))
            assert set(entry) == {"index", "function"} and set(entry["function"]) == {"arguments"}
            calls[index]["function"]["arguments"] += entry["function"]["arguments"]
    for call in calls:
        assert isinstance(json.loads(call["function"]["arguments"]), dict)
    return "".join(content), calls


def expected_calls(calls):
    return [
        {
            "id": IDS[i],
            "type": "function",
            "function": {"name": name, "arguments": json.dumps(args, ensure_ascii=False)},
        }
        for i, (name, args) in enumerate(calls)
    ]


# -- whole-text parse ------------------------------------------------------------------------------
@pytest.mark.parametrize("prefix,text,content,calls", list(all_cases()))
def test_parse_tool_calls(prefix, text, content, calls):
    got_content, got_calls = parse_tool_calls(text, prefix, ids=iter(IDS))
    assert got_content == content
    assert got_calls == expected_calls(calls)
    for call in got_calls:
        assert json.loads(call["function"]["arguments"]) == dict(calls[got_calls.index(call)][1])


def test_default_ids_are_fresh_call_hex():
    _, calls = parse_tool_calls(WEATHER + SEARCH)
    ids = [c["id"] for c in calls]
    assert all(CALL_ID.fullmatch(i) for i in ids) and len(set(ids)) == 2
    deltas, _ = stream([WEATHER + SEARCH], ids=[])  # an exhausted source falls back to fresh ids
    streamed = [d["tool_calls"][0]["id"] for d in deltas if "id" in d.get("tool_calls", [{}])[0]]
    assert all(CALL_ID.fullmatch(i) for i in streamed) and len(set(streamed + ids)) == 4
    counter = iter(range(10))
    _, calls = parse_tool_calls(WEATHER + SEARCH, ids=lambda: f"id{next(counter)}")
    assert [c["id"] for c in calls] == ["id0", "id1"]


# -- streaming -------------------------------------------------------------------------------------
@pytest.mark.parametrize("prefix,text,content,calls", list(all_cases()))
def test_stream_agrees_with_parse_in_every_chunking(prefix, text, content, calls):
    want_content, want_calls = parse_tool_calls(text, prefix, ids=iter(IDS))
    for pieces in chunkings(text):
        deltas, has_calls = stream(pieces, prefix)
        got_content, got_calls = reconstruct(deltas)
        assert got_content == (want_content or ""), pieces
        assert got_calls == want_calls, pieces
        assert has_calls == bool(want_calls)


def test_stream_sends_content_early_and_holds_only_a_possible_tag():
    parser = ToolCallStreamParser(ids=iter(IDS))
    assert parser.feed("Hello <to") == [{"content": "Hello "}]
    assert parser.feed("ol") == []  # "<tool" may still become <tool_call>
    assert parser.feed("s> x") == [{"content": "<tools> x"}]
    assert parser.feed(" <tool_call>") == [{"content": " "}]
    assert parser.feed('{"name": "f", "arguments": {"a": 1}}') == []  # undecided until it closes
    assert parser.feed("</tool_call> after") == [
        {
            "tool_calls": [
                {
                    "index": 0,
                    "id": IDS[0],
                    "type": "function",
                    "function": {"name": "f", "arguments": ""},
                }
            ]
        },
        {"tool_calls": [{"index": 0, "function": {"arguments": '{"a": 1}'}}]},
        {"content": " after"},
    ]
    assert parser.has_calls
    assert parser.finish() == [] and parser.finish() == []
    with pytest.raises(RuntimeError):
        parser.feed("more")


def test_stream_holds_leading_whitespace_until_content_or_end():
    parser = ToolCallStreamParser(ids=iter(IDS))
    assert parser.feed("\n ") == []
    assert parser.feed(WEATHER)[0]["tool_calls"][0]["index"] == 0
    assert parser.feed("\n") == []
    assert parser.finish() == []  # whitespace beside calls is no content (None unstreamed)
    parser = ToolCallStreamParser()
    assert parser.feed("\n ") == [] and parser.feed("Hi") == [{"content": "\n Hi"}]
    parser = ToolCallStreamParser()
    assert parser.feed(" ") == [] and parser.finish() == [{"content": " "}]


def test_forced_prefix_is_part_of_the_parsed_text():
    parser = ToolCallStreamParser(NAMED, ids=iter(IDS))
    assert parser.feed('{"city": ') == []
    deltas = parser.feed('"Oslo"}}</tool_call>') + parser.finish()
    assert reconstruct(deltas)[1] == expected_calls([("get_weather", {"city": "Oslo"})])
    parser = ToolCallStreamParser(REQUIRED)
    assert parser.feed("no") == [] and parser.finish() == [{"content": REQUIRED + "no"}]


FRAGMENTS = [
    "<tool_call>",
    "</tool_call>",
    "<tool",
    "</",
    "<",
    "{",
    "}",
    "[",
    "]",
    '"',
    "\\",
    ":",
    ",",
    " ",
    "\n",
    "a",
    "NaN",
    '"name": "f"',
    '"arguments": {}',
    '"arguments": {"x": "</tool_call>"}',
    '{"name": "g", "arguments": {"k": [1, 2]}}',
]


def test_random_text_never_raises_and_stream_agrees():
    rng = random.Random(1234)
    for _ in range(300):
        text = "".join(rng.choice(FRAGMENTS) for _ in range(rng.randint(0, 30)))
        want_content, want_calls = parse_tool_calls(text, ids=iter(IDS))
        for pieces in (list(text), next(iter(chunkings(text, seed=rng.random(), random_splits=1)))):
            got_content, got_calls = reconstruct(stream(pieces)[0])
            assert (got_content, got_calls) == (want_content or "", want_calls), text
        if not want_calls:  # nothing parsed: the text is the content, unchanged
            assert want_content == text


# -- the openai client's reconstruction ------------------------------------------------------------
def _chunk(delta, finish_reason=None):
    from openai.types.chat import ChatCompletionChunk

    return ChatCompletionChunk.model_validate(
        {
            "id": "chatcmpl-test",
            "object": "chat.completion.chunk",
            "created": 0,
            "model": "test",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
        }
    )


@pytest.mark.parametrize("prefix,text,content,calls", list(all_cases()))
def test_openai_client_reconstructs_the_unstreamed_calls(prefix, text, content, calls):
    pytest.importorskip("openai")
    from openai.lib.streaming._deltas import accumulate_delta
    from openai.lib.streaming.chat import ChatCompletionStreamState

    want_content, want_calls = parse_tool_calls(text, prefix, ids=iter(IDS))
    for pieces in (list(text), [text], next(iter(chunkings(text, random_splits=1)))):
        deltas, has_calls = stream(pieces, prefix)
        acc = {}
        for delta in deltas:
            accumulate_delta(acc, copy.deepcopy(delta))
        got = [{k: v for k, v in c.items() if k != "index"} for c in acc.get("tool_calls", [])]
        assert got == want_calls
        assert acc.get("content", "") == (want_content or "")

        # the stream helper behind client.chat.completions.stream(...).get_final_completion()
        state = ChatCompletionStreamState()
        state.handle_chunk(_chunk({"role": "assistant"}))
        for delta in deltas:
            state.handle_chunk(_chunk(delta))
        reason = chat_finish_reason("stop", has_calls)
        state.handle_chunk(_chunk({}, reason))
        choice = state.get_final_completion().choices[0]
        assert choice.finish_reason == ("tool_calls" if want_calls else "stop")
        assert (choice.message.content or "") == (want_content or "")
        final = [
            {
                "id": c.id,
                "type": c.type,
                "function": {"name": c.function.name, "arguments": c.function.arguments},
            }
            for c in choice.message.tool_calls or []
        ]
        assert final == want_calls


def test_chat_finish_reason():
    assert chat_finish_reason("stop", True) == "tool_calls"
    assert chat_finish_reason("stop", False) == "stop"
    assert chat_finish_reason("length", True) == "length"  # a cut reply says so
    assert chat_finish_reason("length", False) == "length"


# -- tools, tool_choice and the conversation -------------------------------------------------------
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The current weather in a city.",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
            "strict": True,
        },
    },
    {"type": "function", "function": {"name": "now"}},
]


def test_tools_rendered_in_a_new_system_turn_one_schema_per_line():
    turns, prefix = prepare_chat([{"role": "user", "content": "Weather in Paris?"}], TOOLS)
    assert prefix == ""
    assert [t["role"] for t in turns] == ["system", "user"]
    system = turns[0]["content"]
    lines = system.split("\n")
    schemas = [
        json.loads(line) for line in lines[lines.index("<tools>") + 1 : lines.index("</tools>")]
    ]
    assert schemas == [
        {
            "name": "get_weather",
            "description": "The current weather in a city.",
            "parameters": TOOLS[0]["function"]["parameters"],
        },
        {"name": "now"},
    ]
    assert '<tool_call>{"name": "<function name>", "arguments": ' in system
    assert "several blocks" in system and "<tool_response>" in system
    assert "only when it helps" in system


def test_tools_merge_into_the_system_message():
    messages = [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": "Weather?"},
    ]
    turns, _ = prepare_chat(messages, TOOLS, "auto")
    assert len(turns) == 2 and turns[0]["content"].startswith("Be brief.\n\n# Tools\n")
    turns, _ = prepare_chat([{"role": "developer", "content": "Dev."}, *messages[1:]], TOOLS)
    assert turns[0]["role"] == "system" and turns[0]["content"].startswith("Dev.\n\n# Tools")


def test_tool_choice_modes():
    user = [{"role": "user", "content": "hi"}]
    assert prepare_chat(user, TOOLS, "none") == (user, "")  # nothing rendered, nothing forced
    assert not resolve_tool_choice(TOOLS, "none").parse
    assert resolve_tool_choice(None, None).mode == "none"
    assert resolve_tool_choice([], "auto").mode == "none"
    assert resolve_tool_choice(TOOLS, None).mode == "auto"

    turns, prefix = prepare_chat(user, TOOLS, "required")
    assert (
        prefix == '<tool_call>{"name": "'
        and "must call at least one function" in turns[0]["content"]
    )
    turns, prefix = prepare_chat(user, TOOLS, {"type": "function", "function": {"name": "now"}})
    assert prefix == '<tool_call>{"name": "now", "arguments": '
    assert "must call the function now" in turns[0]["content"]
    # the forced prefix and a continuation parse into the call
    assert parse_tool_calls("{}}</tool_call>", prefix, ids=iter(IDS))[1] == expected_calls(
        [("now", {})]
    )


@pytest.mark.parametrize(
    "tools,tool_choice,param,match",
    [
        (
            TOOLS,
            {"type": "function", "function": {"name": "nope"}},
            "tool_choice",
            "tool_choice names the function 'nope'",
        ),
        (TOOLS, "sometimes", "tool_choice", "tool_choice must be one of"),
        (TOOLS, {"type": "function"}, "tool_choice", "must name a function"),
        (TOOLS, 3, "tool_choice", "tool_choice must be"),
        (None, "required", "tool_choice", "tool_choice 'required' needs tools"),
        (None, {"type": "function", "function": {"name": "now"}}, "tool_choice", "not among tools"),
        ({"type": "function"}, None, "tools", "tools must be a list"),
        (["now"], None, "tools[0]", r"tools\[0\] must be an object"),
        ([{"type": "retrieval"}], None, "tools[0].type", "only 'function' tools"),
        ([{"type": "function"}], None, "tools[0].function", "must be an object"),
        ([{"function": {"name": "a b"}}], None, "tools[0].function.name", "1-64 letters"),
        ([{"type": "function", "function": {}}], None, "tools[0].function.name", "got None"),
        (TOOLS + [TOOLS[1]], None, "tools[2].function.name", "'now' appears twice"),
        (
            [{"type": "function", "function": {"name": "f", "parameters": "x"}}],
            None,
            "tools[0].function.parameters",
            "JSON Schema object",
        ),
        (
            [{"type": "function", "function": {"name": "f", "description": 1}}],
            None,
            "tools[0].function.description",
            "must be a string",
        ),
    ],
)
def test_bad_tools_and_tool_choice_name_the_param(tools, tool_choice, param, match):
    with pytest.raises(ChatRequestError, match=match) as err:
        prepare_chat([{"role": "user", "content": "hi"}], tools, tool_choice)
    assert err.value.param == param and str(err.value).startswith(param)
    assert isinstance(err.value, UserError) and isinstance(err.value, ValueError)


def history():
    """A conversation with two parallel calls, their results, and a final answer."""
    return [
        {"role": "system", "content": "Be brief."},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Weather in Paris"},
                {"type": "text", "text": "and the time?"},
            ],
        },
        {
            "role": "assistant",
            "content": "Checking.",
            "tool_calls": [
                {
                    "id": "call_a",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                },
                {"id": "call_b", "type": "function", "function": {"name": "now", "arguments": ""}},
            ],
        },
        {"role": "tool", "tool_call_id": "call_a", "content": "18 C, sunny"},
        {"role": "tool", "tool_call_id": "call_b", "content": [{"type": "text", "text": "12:00"}]},
        {"role": "assistant", "content": "Sunny, 18 C; it is noon."},
        {"role": "user", "content": "Thanks"},
    ]


def test_history_with_calls_and_results():
    turns, _ = prepare_chat(history(), TOOLS)
    assert [t["role"] for t in turns] == [
        "system",
        "user",
        "assistant",
        "user",
        "assistant",
        "user",
    ]
    assert turns[1]["content"] == "Weather in Paris\nand the time?"
    assert turns[2]["content"] == (
        "Checking.\n"
        '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>\n'
        '<tool_call>{"name": "now", "arguments": {}}</tool_call>'
    )
    assert turns[3]["content"] == (
        '<tool_response>{"tool_call_id": "call_a", "name": "get_weather", "content": "18 C, sunny"}</tool_response>\n'
        '<tool_response>{"tool_call_id": "call_b", "name": "now", "content": "12:00"}</tool_response>'
    )
    # without tools in the request, the history still renders (no tools system text)
    turns, _ = prepare_chat(history())
    assert turns[0] == {"role": "system", "content": "Be brief."}


def test_history_arguments_that_are_not_an_object_stay_a_string():
    messages = [
        {"role": "user", "content": "x"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": "[1"}}],
        },
        {"role": "tool", "tool_call_id": "c", "content": "ok"},
    ]
    turns, _ = prepare_chat(messages)
    assert turns[1]["content"] == '<tool_call>{"name": "f", "arguments": "[1"}</tool_call>'


def test_parsed_calls_render_back_into_the_same_calls():
    reply = "Sure. " + WEATHER + SEARCH
    content, calls = parse_tool_calls(reply, ids=iter(IDS))
    messages = [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": content, "tool_calls": calls},
    ]
    turns, _ = prepare_chat(messages, TOOLS)
    again_content, again = parse_tool_calls(turns[-1]["content"], ids=iter(IDS))
    assert again == calls and again_content.strip() == content.strip()
    assert format_tool_call("get_weather", {"city": "Paris"}) == WEATHER


@pytest.mark.parametrize(
    "messages,param,match",
    [
        ([], "messages", "non-empty list"),
        ("hi", "messages", "non-empty list"),
        (["hi"], "messages[0]", "must be an object"),
        ([{"role": "wizard", "content": "x"}], "messages[0].role", "role is 'wizard'"),
        ([{"role": "user"}], "messages[0].content", "must be a string or a list of text parts"),
        (
            [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}],
            "messages[0].content[0].type",
            "only text parts",
        ),
        (
            [{"role": "user", "content": [{"type": "text"}]}],
            "messages[0].content[0].text",
            "string",
        ),
        ([{"role": "tool", "content": "x"}], "messages[0].tool_call_id", "is missing"),
        (
            [{"role": "tool", "tool_call_id": "zzz", "content": "x"}],
            "messages[0].tool_call_id",
            "'zzz' answers no tool call",
        ),
        (
            [{"role": "assistant", "tool_calls": [{"id": "c"}]}],
            "messages[0].tool_calls[0]",
            "must be",
        ),
        (
            [{"role": "assistant", "tool_calls": {"id": "c"}}],
            "messages[0].tool_calls",
            "must be a list",
        ),
        (
            [
                {
                    "role": "assistant",
                    "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": 3}}],
                }
            ],
            "messages[0].tool_calls[0].function.arguments",
            "must be a JSON string",
        ),
    ],
)
def test_bad_messages_name_the_param(messages, param, match):
    with pytest.raises(ChatRequestError, match=match) as err:
        prepare_chat(messages)
    assert err.value.param == param and str(err.value).startswith(param)


def test_response_format_is_a_system_instruction():
    assert response_format_instruction(None) is None
    assert response_format_instruction({"type": "text"}) is None
    assert "one JSON object" in response_format_instruction({"type": "json_object"})
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    text = response_format_instruction(
        {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}
    )
    assert json.loads(text.split("\n")[-1]) == schema
    turns, _ = prepare_chat(
        [{"role": "user", "content": "x"}], TOOLS, response_format={"type": "json_object"}
    )
    assert turns[0]["content"].startswith("# Tools") and turns[0]["content"].endswith(
        "no code fences."
    )
    for bad, param, match in [
        ({"type": "xml"}, "response_format.type", "got 'xml'"),
        ("json", "response_format", "must be an object"),
        ({"type": "json_schema"}, "response_format.json_schema", "needs"),
        (
            {"type": "json_schema", "json_schema": {"schema": 1}},
            "response_format.json_schema.schema",
            "must be an object",
        ),
    ]:
        with pytest.raises(ChatRequestError, match=match) as err:
            response_format_instruction(bad)
        assert err.value.param == param and "response_format" in str(err.value)


# -- a real chat template --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smollm2_tokenizer():
    from jaxlab.models import LoadError
    from jaxlab.models.registry import SMOLLM2_GGUF, package_path
    from jaxlab.tokenization import Tokenizer

    try:
        path = package_path(SMOLLM2_GGUF)
    except LoadError as err:
        pytest.skip(str(err))
    return Tokenizer.from_gguf(path)  # the tokenizer and template only, no weights


def test_smollm2_template_renders_calls_and_results(smollm2_tokenizer):
    turns, prefix = prepare_chat(
        history(), TOOLS, {"type": "function", "function": {"name": "get_weather"}}
    )
    prompt = smollm2_tokenizer.apply_chat_template(turns)
    expected = "".join(f"<|im_start|>{t['role']}\n{t['content']}<|im_end|>\n" for t in turns)
    assert prompt == expected + "<|im_start|>assistant\n"
    assert prompt.count("<|im_start|>system") == 1  # ours replaces the template's default
    assert '<tool_response>{"tool_call_id": "call_a", "name": "get_weather"' in prompt
    # what the server sends: the prompt, then the forced prefix the model continues
    full = prompt + prefix
    assert full.endswith('<|im_start|>assistant\n<tool_call>{"name": "get_weather", "arguments": ')
    tok = smollm2_tokenizer
    assert tok.decode(tok.encode(full, add_special_tokens=False), skip_special_tokens=False) == full
