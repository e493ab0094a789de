"""The agent loop over an OpenAI-compatible endpoint (a local stand-in server), over an in-process
Engine (a tiny random Llama whose weights plant a tool call, SmolLM2's tokenizer and template),
and the ``agents bench`` command."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from jaxlab.agents.executor import SpeculationConfig, SpeculativeExecutor, ToolScheduler
from jaxlab.agents.latency import LatencyModel
from jaxlab.agents.miner import Prediction
from jaxlab.agents.runtime import EngineLLM, OpenAIChatLLM, ReplayLLM, run_agent
from jaxlab.agents.tools import Effect, Tool, ToolCall, ToolRegistry, ToolState

WEATHER_CALLS: list[str] = []


def get_weather(city: str) -> dict:
    WEATHER_CALLS.append(city)
    return {"city": city, "temperature": 21}


def _registry(latency=0.01):
    return ToolRegistry(
        [
            Tool(
                "get_weather",
                get_weather,
                Effect.READ_ONLY,
                description="The weather in a city",
                parameters={
                    "type": "object",
                    "properties": {"city": {"type": "string"}},
                    "required": ["city"],
                },
                latency=LatencyModel(latency, latency),
            )
        ]
    )


class _Always:
    def __init__(self, call):
        self.call = call

    def predict(self, log, top_k, allowed=None):
        return [Prediction(self.call, 0.9)]


def test_loop_over_an_openai_compatible_endpoint():
    bodies: list[dict] = []
    replies = [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_a",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
                }
            ],
        },
        {"role": "assistant", "content": "It is 21 degrees in Oslo."},
    ]

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            bodies.append({"path": self.path, "auth": self.headers.get("Authorization"), **body})
            msg = replies[len(bodies) - 1]
            out = json.dumps(
                {"choices": [{"message": msg}], "usage": {"completion_tokens": 7}}
            ).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

        def log_message(self, *a):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        llm = OpenAIChatLLM(f"http://127.0.0.1:{server.server_port}/v1", "m", api_key="k")
        with ToolScheduler() as sched:
            ex = SpeculativeExecutor(_registry(), ToolState(), sched, task_id="t")
            result = run_agent(llm, ex, ["Weather in Oslo?"])
    finally:
        server.shutdown()
    assert [b["path"] for b in bodies] == ["/v1/chat/completions"] * 2
    assert bodies[0]["auth"] == "Bearer k"
    assert bodies[0]["tools"][0]["function"]["name"] == "get_weather"
    assert bodies[1]["messages"][-1] == {
        "role": "tool",
        "tool_call_id": "call_1",
        "content": '{"city": "Oslo", "temperature": 21}',
    }
    (ev,) = ex.log.tool_events()
    assert (ev.tool, ev.arguments, ev.status) == ("get_weather", {"city": "Oslo"}, "ok")
    assert result.messages[-1] == {"role": "assistant", "content": "It is 21 degrees in Oslo."}
    assert result.steps == 2


def test_replay_llm_scripts_turns():
    calls = [[ToolCall("a", {})], [], [ToolCall("b", {}), ToolCall("c", {})]]
    seen = []
    llm = ReplayLLM(calls, lambda step: seen.append(step) or 5)
    replies = [llm.reply([], []) for _ in range(6)]
    assert [[c.name for c in r.calls] for r in replies] == [["a"], [], [], ["b"], ["c"], []]
    assert seen == list(range(6)) and all(r.tokens == 5 for r in replies)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """A tiny random Llama that, after the forced get_weather prefix, writes
    ``{"city": "Paris"}}</tool_call>`` and stops."""
    from jaxlab.models.registry import SMOLLM2_GGUF, package_path
    from jaxlab.serving.tools import prepare_chat
    from jaxlab.testing.tiny_llama import chain_bigrams, write_tiny_llama
    from jaxlab.tokenization import Tokenizer

    tok = Tokenizer.from_gguf(package_path(SMOLLM2_GGUF))  # installed by the Makefile
    choice = {"type": "function", "function": {"name": "get_weather"}}
    turns, forced = prepare_chat(
        [{"role": "user", "content": "Weather?"}], _registry().schemas(), choice
    )
    prompt = tok.encode(tok.apply_chat_template(turns) + forced, add_special_tokens=False)
    call = tok.encode('{"city": "Paris"}}</tool_call>', add_special_tokens=False)
    path = tmp_path_factory.mktemp("tiny") / "model"
    write_tiny_llama(
        path, tok, bigrams=chain_bigrams(prompt[-1], [*call, tok.eos_token_ids[0]]), context=1024
    )
    return path, choice


def test_loop_over_an_in_process_engine_with_speculation(planted):
    from jaxlab.generation import Engine, SamplingParams
    from jaxlab.models import from_pretrained

    path, choice = planted
    model, tok = from_pretrained(str(path))
    engine = Engine(model, num_slots=1, max_len=1024, tokenizer=tok)
    llm = EngineLLM(engine, tok, SamplingParams(max_new_tokens=24), tool_choice=choice)
    WEATHER_CALLS.clear()
    with ToolScheduler() as sched:
        ex = SpeculativeExecutor(
            _registry(),
            ToolState(),
            sched,
            predictor=_Always(ToolCall("get_weather", {"city": "Paris"})),
            config=SpeculationConfig(),
            task_id="t",
        )
        result = run_agent(llm, ex, ["What is the weather in Paris?"], max_steps_per_turn=2)
    events = ex.log.tool_events()
    assert [(e.tool, dict(e.arguments)) for e in events] == [("get_weather", {"city": "Paris"})] * 2
    # each call was speculated while the model decoded and promoted: none ran for real
    assert all(e.served == "speculative" for e in events)
    assert ex.stats["promoted"] == 2 and ex.stats["real_runs"] == 0
    assert WEATHER_CALLS == ["Paris", "Paris"]  # one early run per call, nothing more
    assert [m["role"] for m in result.messages] == ["user", "assistant", "tool"] * 1 + [
        "assistant",
        "tool",
    ]
    assert result.messages[1]["tool_calls"][0]["function"]["name"] == "get_weather"
    assert json.loads(result.messages[2]["content"]) == {"city": "Paris", "temperature": 21}


def test_agents_bench_command(tmp_path):
    from jaxlab.cli import main

    out = tmp_path / "r.json"
    argv = ["agents", "bench", "--sleep-per-token", "0.5", "--test-tasks", "2", "--quiet"]
    assert main([*argv, "--modes", "serial,paste,oracle", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["calibration"]["test_tasks"] == 2
    s = result["summary"]
    assert s["serial"]["lossless"] and s["paste"]["lossless"] and s["oracle"]["lossless"]
    assert s["oracle"]["window_hit_rate"] == 1.0
    assert main([*argv, "--modes", "paste"]) == 2  # serial is needed: a user error


def test_agents_run_command_over_an_endpoint(capsys):
    """``agents run`` on a BFCL task against a stand-in endpoint that lists the directory once
    per turn and then answers."""
    from jaxlab.cli import main

    count = [0]

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            count[0] += 1
            call = {"name": "ls", "arguments": '{"a": true}'}
            msg = (
                {
                    "role": "assistant",
                    "tool_calls": [{"id": "x", "type": "function", "function": call}],
                }
                if count[0] % 2
                else {"role": "assistant", "content": "done"}
            )
            out = json.dumps({"choices": [{"message": msg}]}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

        def log_message(self, *a):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}/v1"
    try:
        assert main(["agents", "run", "multi_turn_base_1", "--url", url, "--speculate"]) == 0
    finally:
        server.shutdown()
    out = capsys.readouterr().out
    assert '[tool] {"current_directory_content": ["workspace"]}' in out
    assert "8 steps, 4 tool calls" in out and "speculation:" in out
    assert main(["agents", "run", "multi_turn_base_999", "--url", url]) == 2
