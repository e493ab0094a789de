"""The OpenAI-compatible server, end to end: real server processes on free loopback ports, driven
by the official ``openai`` client (``max_retries=0``) and by raw HTTP where the wire format itself
is checked.

Servers: ``main`` serves a tiny random-weight Llama (SmolLM2's real tokenizer and chat template)
whose weights plant one rule, the text ``{"city": "Paris"}}</tool_call>`` after a forced
``get_weather`` call prefix, so that tool calls are parseable; everything else it writes is
random. ``aux`` serves the same model with an API key, one slot and no queue (401, 429, the
prefix cache off, draining on SIGTERM). ``smol`` serves SmolLM2-135M-Instruct for one real answer.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from jaxlab.models.registry import SMOLLM2_GGUF, package_path  # noqa: E402
from jaxlab.serving.tools import prepare_chat  # noqa: E402
from jaxlab.testing.tiny_llama import chain_bigrams, write_tiny_llama  # noqa: E402
from jaxlab.tokenization import Tokenizer  # noqa: E402

MODEL = "tiny"
KEY = "test-key-123"
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    },
    {
        "type": "function",
        "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}},
    },
]
WEATHER = {"type": "function", "function": {"name": "get_weather"}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
CALL_TEXT = '{"city": "Paris"}}</tool_call>'
SERVER_START_S = 240


def _engine_has_prefix_cache() -> bool:
    from jaxlab.serving.server import engine_has_prefix_cache

    return engine_has_prefix_cache()


# -- server processes --------------------------------------------------------------------------


class ServerProcess:
    """``python -m jaxlab serve ... --port 0`` in a subprocess; its URL is read from its output."""

    def __init__(self, *args: str):
        env = dict(os.environ)
        flags = env.get("XLA_FLAGS", "").replace("--xla_force_host_platform_device_count=8", "")
        env["XLA_FLAGS"] = flags.strip()
        env["JAXLAB_COMPILATION_CACHE"] = "0"
        env["PYTHONUNBUFFERED"] = "1"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "jaxlab", "serve", "--port", "0", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        self.lines: list[str] = []
        self.ready = threading.Event()
        self.url: str | None = None
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line)
            m = re.search(r"ready at (http://\S+)", line)
            if m:
                self.url = m.group(1)
                self.ready.set()
        self.ready.set()  # the process ended

    def wait(self) -> str:
        assert self.ready.wait(SERVER_START_S), "server did not start:\n" + self.output
        assert self.url is not None, "server exited:\n" + self.output
        return self.url

    @property
    def output(self) -> str:
        return "".join(self.lines)

    @property
    def root(self) -> str:
        return self.wait().removesuffix("/v1")

    def client(self, api_key: str = "none", **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.wait(), api_key=api_key, max_retries=0, **kw)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module")
def smol_tokenizer():
    return Tokenizer.from_gguf(package_path(SMOLLM2_GGUF))  # installed by the Makefile


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, smol_tokenizer):
    tok = smol_tokenizer
    turns, forced = prepare_chat(ASK, TOOLS, WEATHER)
    prompt = tok.encode(tok.apply_chat_template(turns) + forced, add_special_tokens=False)
    call = tok.encode(CALL_TEXT, add_special_tokens=False) + [tok.eos_token_ids[0]]
    path = tmp_path_factory.mktemp("tiny") / "model"
    return write_tiny_llama(path, tok, bigrams=chain_bigrams(prompt[-1], call), context=512)


@pytest.fixture(scope="module")
def servers(tiny_dir):
    """Starts all three at once (they load and compile side by side)."""
    common = ["--model", str(tiny_dir), "--served-model-name", MODEL, "--max-len", "512"]
    cache = ["--prefix-cache", "8"] if _engine_has_prefix_cache() else []
    procs = {
        "main": ServerProcess(*common, "--slots", "4", "--max-queue", "16", *cache),
        "aux": ServerProcess(*common, "--slots", "1", "--max-queue", "0", "--api-key", KEY),
    }
    try:
        package_path(SMOLLM2_GGUF)
        procs["smol"] = ServerProcess("--slots", "2", "--max-len", "1024")
    except Exception:  # noqa: BLE001 - the SmolLM2 test skips
        pass
    yield procs
    for p in procs.values():
        p.stop()


@pytest.fixture(scope="module")
def main(servers):
    servers["main"].wait()
    return servers["main"]


@pytest.fixture(scope="module")
def aux(servers):
    servers["aux"].wait()
    return servers["aux"]


# -- raw HTTP ------------------------------------------------------------------------------------


def _conn(server: ServerProcess) -> tuple[http.client.HTTPConnection, str]:
    u = urlsplit(server.wait())
    return http.client.HTTPConnection(u.hostname, u.port, timeout=120), u.path


def post_sse(server: ServerProcess, path: str, body: dict, headers=None) -> list[str]:
    """The ``data:`` payloads of a streamed response, up to and including ``[DONE]``."""
    conn, prefix = _conn(server)
    conn.request(
        "POST",
        prefix + path,
        json.dumps(body),
        {"Content-Type": "application/json", **(headers or {})},
    )
    resp = conn.getresponse()
    assert resp.status == 200, resp.read()
    assert resp.getheader("content-type", "").startswith("text/event-stream")
    events = []
    for raw in resp:
        line = raw.decode().rstrip("\r\n")
        if line.startswith("data: "):
            events.append(line[len("data: ") :])
            if events[-1] == "[DONE]":
                break
        else:
            assert line == "", f"unexpected SSE line {line!r}"
    conn.close()
    return events


def get_json(server: ServerProcess, path: str) -> dict:
    with urllib.request.urlopen(server.root + path, timeout=30) as r:
        return json.loads(r.read())


def metrics(server: ServerProcess) -> dict[str, float]:
    with urllib.request.urlopen(server.root + "/metrics", timeout=30) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def chat(client, messages=ASK, **kw):
    kw.setdefault("max_tokens", 12)
    kw.setdefault("temperature", 0)
    return client.chat.completions.create(model=MODEL, messages=messages, **kw)


# -- protocol pieces, in process ------------------------------------------------------------------


def test_sampling_params_from_request_fields():
    from jaxlab.serving.errors import OpenAIError
    from jaxlab.serving.protocol import ChatCompletionRequest, sampling_params

    req = ChatCompletionRequest(
        messages=ASK,
        temperature=0.5,
        top_p=0.9,
        top_k=-1,
        min_p=0.05,
        presence_penalty=0.5,
        frequency_penalty=-0.5,
        repetition_penalty=1.1,
        stop="END",
        seed=3,
        n=2,
        logit_bias={"17": -100},
        unknown_field=1,
    )
    p = sampling_params(req, max_new_tokens=7, logprobs=2)
    assert (p.max_new_tokens, p.temperature, p.top_p, p.top_k, p.min_p) == (7, 0.5, 0.9, 0, 0.05)
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.5, -0.5, 1.1)
    assert (p.stop, p.seed, p.n, p.logprobs, p.logit_bias) == (("END",), 3, 2, 2, ((17, -100.0),))
    assert sampling_params(ChatCompletionRequest(messages=ASK), max_new_tokens=1).temperature == 1.0
    with pytest.raises(OpenAIError) as e:
        sampling_params(
            req, max_new_tokens=0, param_names={"max_new_tokens": "max_completion_tokens"}
        )
    assert e.value.param == "max_completion_tokens" and e.value.status == 400
    with pytest.raises(OpenAIError) as e:
        sampling_params(req, max_new_tokens=1, vocab_size=10)
    assert e.value.param == "logit_bias" and "10" in e.value.message


def test_token_strings_give_each_token_its_bytes(smol_tokenizer):
    from jaxlab.serving.protocol import TokenStrings

    strings = TokenStrings(smol_tokenizer)
    text = "naïve café: 東京 🙂"
    ids = smol_tokenizer.encode(text, add_special_tokens=False)
    raw = b"".join(bytes(strings.get(t)[1]) for t in ids)
    assert raw.decode("utf-8") == text  # tokens may split a character; their bytes join up
    eos = smol_tokenizer.eos_token_ids[0]
    assert strings.get(eos)[0] == smol_tokenizer.hf.convert_ids_to_tokens(eos)


# -- the basics -------------------------------------------------------------------------------------


def test_models_and_health(main):
    models = main.client().models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert models.data[0].model_extra["max_model_len"] == 512
    assert main.client().models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        main.client().models.retrieve("other")
    health = get_json(main, "/health")
    assert health["status"] == "ok" and health["slots"] == 4


def test_chat_completion(main, smol_tokenizer):
    r = chat(main.client(), max_tokens=8)
    assert r.object == "chat.completion" and r.model == MODEL and r.id.startswith("chatcmpl-")
    (choice,) = r.choices
    assert choice.index == 0 and choice.message.role == "assistant"
    assert isinstance(choice.message.content, str) and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    text = smol_tokenizer.apply_chat_template(ASK)
    assert r.usage.prompt_tokens == len(smol_tokenizer.encode(text, add_special_tokens=False))
    assert 1 <= r.usage.completion_tokens <= 8
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    # unknown fields are ignored; developer is a system turn; content may be text parts
    again = main.client().chat.completions.create(
        model=MODEL,
        messages=[{"role": "developer", "content": "Be brief."}, *ASK],
        max_tokens=4,
        temperature=0,
        extra_body={"no_such_field": 1, "another": {"x": [1]}},
    )
    assert again.choices[0].message.content
    parts = chat(
        main.client(), [{"role": "user", "content": [{"type": "text", "text": ASK[0]["content"]}]}]
    )
    assert parts.choices[0].message.content == chat(main.client()).choices[0].message.content


def test_text_completion(main, smol_tokenizer):
    client = main.client()
    r = client.completions.create(model=MODEL, prompt="The sky is", max_tokens=6, temperature=0)
    assert r.object == "text_completion" and len(r.choices) == 1
    ids = smol_tokenizer.encode("The sky is")
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=6, temperature=0)
    assert by_ids.choices[0].text == r.choices[0].text
    assert r.usage.prompt_tokens == len(ids)
    batch = client.completions.create(
        model=MODEL, prompt=["The sky is", "Once upon"], max_tokens=4, temperature=0.8, n=2, seed=3
    )
    assert [c.index for c in batch.choices] == [0, 1, 2, 3]
    assert 4 <= batch.usage.completion_tokens <= 16
    assert batch.usage.prompt_tokens == len(ids) + len(smol_tokenizer.encode("Once upon"))


# -- streaming -----------------------------------------------------------------------------------


def test_chat_stream_equals_unstreamed(main):
    body = {"model": MODEL, "messages": ASK, "max_tokens": 16, "temperature": 0}
    plain = chat(main.client(), max_tokens=16)
    events = post_sse(main, "/chat/completions", {**body, "stream": True})
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" and "usage" not in c for c in chunks)
    assert all(len(c["choices"]) == 1 for c in chunks)  # no usage chunk unless asked
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert deltas[0]["role"] == "assistant" and all("role" not in d for d in deltas[1:])
    finishes = [c["choices"][0]["finish_reason"] for c in chunks]
    assert finishes[:-1] == [None] * (len(chunks) - 1)
    assert finishes[-1] == plain.choices[0].finish_reason
    content = "".join(d.get("content") or "" for d in deltas)
    assert content == plain.choices[0].message.content

    # with include_usage: every chunk carries usage null, then one chunk with choices [] and usage
    events = post_sse(
        main,
        "/chat/completions",
        {**body, "stream": True, "stream_options": {"include_usage": True}},
    )
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["usage"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["completion_tokens"] == plain.usage.completion_tokens
    assert chunks[-1]["usage"]["prompt_tokens"] == plain.usage.prompt_tokens
    # the official client reads the same stream
    stream = main.client().chat.completions.create(
        model=MODEL, messages=ASK, max_tokens=16, temperature=0, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream) == content

    # a stop string cuts both at its first occurrence; the stream never shows any of it
    middle = len(content) // 2
    stop = content[middle : middle + 3]
    assert stop.strip(), content
    cut = chat(main.client(), max_tokens=16, stop=[stop, "never-seen-stop"])
    assert cut.choices[0].message.content == content[: content.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    stream = main.client().chat.completions.create(
        model=MODEL, messages=ASK, max_tokens=16, temperature=0, stream=True, stop=stop
    )
    chunks = list(stream)
    assert (
        "".join(c.choices[0].delta.content or "" for c in chunks) == content[: content.index(stop)]
    )
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_completion_stream_equals_unstreamed(main):
    client = main.client()
    kw = dict(model=MODEL, prompt="Hello world", max_tokens=10, temperature=0)
    plain = client.completions.create(**kw)
    chunks = list(
        client.completions.create(**kw, stream=True, stream_options={"include_usage": True})
    )
    assert (
        chunks[-1].choices == []
        and chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    )
    assert "".join(c.choices[0].text for c in chunks[:-1]) == plain.choices[0].text
    assert chunks[-2].choices[0].finish_reason == plain.choices[0].finish_reason


def test_n_samples_and_seed(main):
    client = main.client()
    kw = dict(max_tokens=8, temperature=1.0)
    r = chat(client, n=2, seed=11, **kw)
    assert [c.index for c in r.choices] == [0, 1]
    assert r.choices[0].message.content != r.choices[1].message.content
    again = chat(client, n=2, seed=11, **kw)
    assert [c.message.content for c in again.choices] == [c.message.content for c in r.choices]
    other = chat(client, n=2, seed=12, **kw)
    assert [c.message.content for c in other.choices] != [c.message.content for c in r.choices]
    # streamed n=2: each index has its own role chunk and finish chunk; contents as unstreamed
    stream = chat(client, n=2, seed=11, stream=True, **kw)
    texts, finishes = {0: "", 1: ""}, {}
    for c in stream:
        (ch,) = c.choices
        texts[ch.index] += ch.delta.content or ""
        if ch.finish_reason:
            finishes[ch.index] = ch.finish_reason
    assert [texts[0], texts[1]] == [c.message.content for c in r.choices]
    assert sorted(finishes) == [0, 1]


def test_logprobs(main):
    client = main.client()
    r = chat(client, max_tokens=6, logprobs=True, top_logprobs=3)
    lp = r.choices[0].logprobs.content
    assert len(lp) == r.usage.completion_tokens - (r.choices[0].finish_reason == "stop")
    assert "".join(e.token for e in lp) == r.choices[0].message.content
    for e in lp:
        assert len(e.top_logprobs) == 3 and bytes(e.bytes).decode(errors="replace") == e.token
        assert e.logprob == pytest.approx(
            e.top_logprobs[0].logprob, abs=1e-5
        )  # greedy: the top one
        assert e.top_logprobs[0].logprob >= e.top_logprobs[1].logprob >= e.top_logprobs[2].logprob
    streamed = [
        e
        for c in chat(client, max_tokens=6, logprobs=True, top_logprobs=3, stream=True)
        if c.choices[0].logprobs
        for e in c.choices[0].logprobs.content
    ]
    assert [(e.token, round(e.logprob, 4)) for e in streamed] == [
        (e.token, round(e.logprob, 4)) for e in lp
    ]
    # sampled: the same numbers streamed and unstreamed, for the same seed
    kw = dict(max_tokens=6, logprobs=True, top_logprobs=2, temperature=0.8, seed=5)
    plain = chat(client, **kw).choices[0].logprobs.content
    streamed = [
        e
        for c in chat(client, stream=True, **kw)
        if c.choices[0].logprobs
        for e in c.choices[0].logprobs.content
    ]
    assert [(e.token, round(e.logprob, 4)) for e in streamed] == [
        (e.token, round(e.logprob, 4)) for e in plain
    ]
    for e in plain:  # a sampled token's log-prob is the model's own, as its alternatives' are
        same = [t.logprob for t in e.top_logprobs if t.token == e.token]
        if same:
            assert e.logprob == pytest.approx(same[0], abs=1e-5)
    no_top = chat(client, max_tokens=3, logprobs=True)
    assert all(e.top_logprobs == [] for e in no_top.choices[0].logprobs.content)

    c = client.completions.create(
        model=MODEL, prompt="Hello", max_tokens=5, temperature=0, logprobs=2
    )
    legacy = c.choices[0].logprobs
    assert len(legacy.tokens) == len(legacy.token_logprobs) == len(legacy.top_logprobs)
    assert all(len(t) <= 2 for t in legacy.top_logprobs)
    assert legacy.text_offset[0] == 0 and "".join(legacy.tokens) == c.choices[0].text


# -- tool calls ----------------------------------------------------------------------------------


def test_tool_call_unstreamed_and_streamed(main):
    client = main.client()
    kw = dict(tools=TOOLS, tool_choice=WEATHER, max_tokens=30)
    r = chat(client, **kw)
    (choice,) = r.choices
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}

    # the wire: id, type and name once, in the first delta of the index; arguments as fragments
    events = post_sse(
        main,
        "/chat/completions",
        {"model": MODEL, "messages": ASK, "temperature": 0, "stream": True, **kw},
    )
    chunks = [json.loads(e) for e in events[:-1]]
    calls = [tc for c in chunks for tc in (c["choices"][0]["delta"].get("tool_calls") or [])]
    assert calls[0]["index"] == 0 and calls[0]["id"] and calls[0]["type"] == "function"
    assert calls[0]["function"]["name"] == "get_weather"
    for later in calls[1:]:
        assert later["index"] == 0 and "id" not in later and "name" not in later["function"]
    args = "".join(tc["function"].get("arguments", "") for tc in calls)
    assert json.loads(args) == {"city": "Paris"}
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"

    # the official client's stream helper reconstructs the same call
    with client.chat.completions.stream(model=MODEL, messages=ASK, temperature=0, **kw) as stream:
        final = stream.get_final_completion()
    (fc,) = final.choices[0].message.tool_calls
    assert (fc.function.name, fc.function.arguments) == (
        call.function.name,
        call.function.arguments,
    )
    assert final.choices[0].finish_reason == "tool_calls"
    assert not final.choices[0].message.content


def test_tool_choice_modes(main):
    client = main.client()
    # "none": no tools in the prompt, nothing parsed
    r = chat(client, tools=TOOLS, tool_choice="none", max_tokens=5)
    assert r.choices[0].message.tool_calls is None and r.choices[0].finish_reason != "tool_calls"
    # "auto" and "required" are accepted; malformed model output stays content, never a 500
    for mode in ("auto", "required"):
        r = chat(client, tools=TOOLS, tool_choice=mode, max_tokens=8)
        assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")
        if r.choices[0].message.tool_calls is None:
            assert isinstance(r.choices[0].message.content, str)
    # response_format json_object is accepted (a best-effort instruction)
    r = chat(client, response_format={"type": "json_object"}, max_tokens=4)
    assert r.choices[0].message.content is not None


def test_tool_result_round_trip(main, smol_tokenizer):
    client = main.client()
    first = chat(client, tools=TOOLS, tool_choice=WEATHER, max_tokens=30)
    call = first.choices[0].message.tool_calls[0]
    history = [
        *ASK,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [call.model_dump(exclude_none=True)],
        },
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21, "sky": "clear"}'},
    ]
    r = chat(client, history, tools=TOOLS, max_tokens=6)
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")
    # the server rendered exactly the documented conversation: the call and the tool's result
    turns, forced = prepare_chat(history, TOOLS, None)
    text = smol_tokenizer.apply_chat_template(turns) + forced
    assert "temperature" in text and "<tool_response>" in text and "get_weather" in text
    assert r.usage.prompt_tokens == len(smol_tokenizer.encode(text, add_special_tokens=False))
    streamed = chat(client, history, tools=TOOLS, max_tokens=6, stream=True)
    text_s = "".join(c.choices[0].delta.content or "" for c in streamed)
    assert text_s == (r.choices[0].message.content or "")


# -- errors ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"temperature": -1}, "temperature"),
        ({"temperature": "hot"}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_completion_tokens": 0}, "max_completion_tokens"),
        ({"presence_penalty": 3}, "presence_penalty"),
        ({"logit_bias": {"10": 500}}, "logit_bias"),
        ({"logit_bias": {"99999999": 1}}, "logit_bias"),
        ({"n": 99}, "n"),
        ({"seed": -1}, "seed"),
        ({"logprobs": True, "top_logprobs": 30}, "top_logprobs"),
        ({"stop": [""]}, "stop"),
        (
            {"tool_choice": {"type": "function", "function": {"name": "nope"}}, "tools": TOOLS},
            "tool_choice",
        ),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"response_format": {"type": "yaml"}}, "response_format"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages"),
        ({"messages": []}, "messages"),
    ],
)
def test_bad_parameter_is_400_naming_it(main, extra, param):
    body = {"model": MODEL, "messages": ASK, "max_tokens": 4, **extra}
    with pytest.raises(openai.BadRequestError) as e:
        main.client().chat.completions.create(**body)
    err = e.value.body
    assert err["param"] == param or err["param"].startswith((param + ".", param + "[")), err
    assert err["type"] == "invalid_request_error" and err["message"]
    assert "Traceback" not in json.dumps(err)


def test_context_limit_is_400_naming_it(main):
    long = " ".join(["word"] * 700)
    with pytest.raises(openai.BadRequestError) as e:
        chat(main.client(), [{"role": "user", "content": long}])
    assert e.value.body["code"] == "context_length_exceeded" and e.value.body["param"] == "messages"
    assert "512" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        chat(main.client(), max_tokens=1000)
    assert e.value.body["param"] == "max_tokens" and "512" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        main.client().completions.create(model=MODEL, prompt=long, max_tokens=2)
    assert e.value.body["param"] == "prompt"


def test_unknown_model_and_route_are_404(main):
    with pytest.raises(openai.NotFoundError) as e:
        main.client().chat.completions.create(model="gpt-9", messages=ASK, max_tokens=2)
    assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"
    conn, prefix = _conn(main)
    conn.request("GET", prefix + "/no/such/route")
    resp = conn.getresponse()
    body = json.loads(resp.read())
    assert resp.status == 404 and body["error"]["message"]
    conn.request(
        "POST", prefix + "/chat/completions", "{not json", {"Content-Type": "application/json"}
    )
    resp = conn.getresponse()
    text = resp.read().decode()
    assert resp.status == 400 and "Traceback" not in text and json.loads(text)["error"]["message"]


def test_api_key_is_required(aux):
    with pytest.raises(openai.AuthenticationError) as e:
        aux.client(api_key="wrong").models.list()
    assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
    conn, prefix = _conn(aux)
    conn.request("GET", prefix + "/models")
    assert conn.getresponse().status == 401
    assert [m.id for m in aux.client(api_key=KEY).models.list().data] == [MODEL]
    assert get_json(aux, "/health")["status"] == "ok"  # health and metrics stay open


def test_full_queue_is_429_with_retry_after(aux):
    client = aux.client(api_key=KEY)
    stream = client.chat.completions.create(
        model=MODEL,
        messages=ASK,
        max_tokens=400,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    next(iter(stream))  # the one slot is taken
    try:
        with pytest.raises(openai.RateLimitError) as e:
            chat(client, max_tokens=2)
        assert e.value.status_code == 429 and e.value.response.headers["retry-after"]
        assert "Traceback" not in e.value.response.text
    finally:
        stream.close()
    deadline = time.time() + 20
    while get_json(aux, "/health")["requests_running"] and time.time() < deadline:
        time.sleep(0.05)
    assert chat(client, max_tokens=2).choices[0].message.content is not None


def test_disconnect_frees_the_slot(main):
    before = metrics(main).get("jaxlab_requests_cancelled_total", 0)
    conn, prefix = _conn(main)
    body = {
        "model": MODEL,
        "messages": ASK,
        "max_tokens": 450,
        "temperature": 0,
        "stream": True,
        "ignore_eos": True,
    }
    conn.request(
        "POST", prefix + "/chat/completions", json.dumps(body), {"Content-Type": "application/json"}
    )
    resp = conn.getresponse()
    seen = 0
    for raw in resp:
        seen += raw.startswith(b"data: ")
        if seen >= 4:
            break
    assert get_json(main, "/health")["slots_active"] >= 1
    conn.sock.close()
    conn.close()
    deadline = time.time() + 10
    while time.time() < deadline:
        m = metrics(main)
        if m["jaxlab_slots_active"] == 0 and m["jaxlab_requests_cancelled_total"] > before:
            break
        time.sleep(0.02)
    assert m["jaxlab_slots_active"] == 0 and m["jaxlab_requests_running"] == 0
    assert m["jaxlab_requests_cancelled_total"] == before + 1
    health = get_json(main, "/health")
    assert health["slots_active"] == 0 and health["queue_depth"] == 0

    # an unstreamed request whose client leaves is cancelled too
    conn, prefix = _conn(main)
    conn.request(
        "POST",
        prefix + "/chat/completions",
        json.dumps({**body, "stream": False}),
        {"Content-Type": "application/json"},
    )
    deadline = time.time() + 10
    while get_json(main, "/health")["slots_active"] == 0 and time.time() < deadline:
        time.sleep(0.02)
    assert get_json(main, "/health")["slots_active"] == 1
    conn.sock.close()
    conn.close()
    deadline = time.time() + 10
    while time.time() < deadline:
        m = metrics(main)
        if m["jaxlab_slots_active"] == 0 and m["jaxlab_requests_cancelled_total"] > before + 1:
            break
        time.sleep(0.02)
    assert m["jaxlab_slots_active"] == 0 and m["jaxlab_requests_cancelled_total"] == before + 2


# -- concurrency, the prefix cache, metrics -----------------------------------------------------


def test_concurrent_greedy_clients_get_what_they_get_alone(main):
    client = main.client()
    questions = [f"Question {k}: what is {k} + {k * 3}?" for k in range(8)]

    def ask(q):
        r = chat(client, [{"role": "user", "content": q}], max_tokens=10)
        return r.choices[0].message.content

    alone = [ask(q) for q in questions]
    assert len(set(alone)) > 1  # the prompts matter
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(ask, questions))
    assert together == alone


@pytest.mark.skipif(
    not _engine_has_prefix_cache(),
    reason="the Engine has no prefix_cache parameter yet (jaxlab.generation.Engine)",
)
def test_prefix_cache_on_equals_off(main, aux):
    on, off = main.client(), aux.client(api_key=KEY)
    before = metrics(main)
    history_on, history_off = [], []
    cached = []
    for turn in range(3):
        question = {"role": "user", "content": f"Turn {turn}: tell me more about item {turn}."}
        history_on.append(question)
        history_off.append(question)
        a = chat(on, history_on, max_tokens=8)
        b = chat(off, history_off, max_tokens=8)
        assert a.choices[0].message.content == b.choices[0].message.content
        assert a.usage.prompt_tokens == b.usage.prompt_tokens
        cached.append(a.usage.prompt_tokens_details.cached_tokens)
        history_on.append({"role": "assistant", "content": a.choices[0].message.content})
        history_off.append({"role": "assistant", "content": b.choices[0].message.content})
    assert cached[1] > 0 and cached[2] > cached[1]
    after = metrics(main)
    assert after["jaxlab_prefix_cache_hits_total"] > before.get("jaxlab_prefix_cache_hits_total", 0)
    assert after["jaxlab_prefix_cache_hit_rate"] > 0


def test_metrics(main):
    m = metrics(main)
    assert m['jaxlab_requests_total{endpoint="/v1/chat/completions",status="200"}'] > 0
    assert m['jaxlab_requests_total{endpoint="/v1/chat/completions",status="400"}'] > 0
    assert m["jaxlab_generation_tokens_total"] > 0 and m["jaxlab_prompt_tokens_total"] > 0
    assert m["jaxlab_time_to_first_token_seconds_count"] > 0
    assert m["jaxlab_inter_token_latency_seconds_count"] > 0
    for name in ("jaxlab_queue_depth", "jaxlab_slot_occupancy", "jaxlab_prefix_cache_hit_rate"):
        assert name in m
    assert m["jaxlab_slots"] == 4


# -- a real model ----------------------------------------------------------------------------------


def test_smollm2_answers(servers):
    if "smol" not in servers:
        pytest.skip("SmolLM2 is not installed")
    smol = servers["smol"]
    client = smol.client()
    r = client.chat.completions.create(
        model=SMOLLM2_GGUF,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=24,
        temperature=0,
    )
    assert "Paris" in r.choices[0].message.content
    assert r.choices[0].finish_reason in ("stop", "length")


# -- shutdown (last: these stop the servers) ---------------------------------------------------


def test_sigterm_drains_in_flight_requests(aux):
    conn, prefix = _conn(aux)
    body = {
        "model": MODEL,
        "messages": ASK,
        "max_tokens": 60,
        "temperature": 0,
        "stream": True,
        "ignore_eos": True,
    }
    conn.request(
        "POST",
        prefix + "/chat/completions",
        json.dumps(body),
        {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"},
    )
    resp = conn.getresponse()
    events = []
    for raw in resp:
        line = raw.decode().strip()
        if line.startswith("data: "):
            events.append(line[6:])
            if len(events) == 2:
                aux.proc.send_signal(signal.SIGTERM)
            if events[-1] == "[DONE]":
                break
    chunks = [json.loads(e) for e in events[:-1]]
    assert events[-1] == "[DONE]" and chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert sum(bool(c["choices"][0]["delta"].get("content")) for c in chunks) > 10
    assert aux.proc.wait(60) == 0
    assert "server stopped" in aux.output and "Traceback" not in aux.output


def test_ctrl_c_stops_cleanly(main):
    main.proc.send_signal(signal.SIGINT)
    assert main.proc.wait(60) == 0
    assert "server stopped" in main.output and "Traceback" not in main.output
