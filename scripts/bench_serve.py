"""Serving benchmark: concurrent streaming chat clients against ``python -m jaxlab serve`` on
loopback, a multi-turn agent-like workload with the prefix cache on and off, and (when installed)
llama-cpp-python's OpenAI server on the same GGUF file with the same clients.

    python scripts/bench_serve.py [--concurrency 1 4 16 64] [--requests-per-client 2]
        [--min-tokens 128] [--max-tokens 256] [--level-time 240] [--turns 10]
        [--slots 16] [--max-len 2048] [--anchor auto|off] [--out runs/bench_serve.json]

Concurrency levels (each after an untimed warm-up of ``c`` short requests at once, which
compiles the level's prompt shapes): ``c`` clients each stream chat replies (the official ``openai`` async client,
``stream_options.include_usage``) until ``c x --requests-per-client`` requests (at most
``--max-requests``) have been sent or ``--level-time`` seconds have passed; replies have a length
drawn from [--min-tokens, --max-tokens], the end tokens blocked with ``logit_bias`` so that each
reply has exactly that length on every server. Per level: aggregate output tokens/s (all tokens /
wall time), time to first token and inter-token latency (gaps between streamed chunks) p50 / p99,
errors, requests completed, and the server's slots and requests still in use afterwards (from
``/metrics``; must be 0).

Multi-turn: one client holds a ``--turns``-turn conversation under an agent-like system prompt
(tool schemas), each turn resending the whole history (greedy, ``--turn-tokens`` per reply), on a
server with ``--prefix-cache`` and one without: prompt tokens sent, tokens prefilled and wall time
(the Engine's counters in ``/metrics``); the replies must be identical.

The anchor: ``python -m llama_cpp.server`` (``pip install 'llama-cpp-python[server]'``, not
installed by the Makefile; see docs/benchmarks.md for a build that works on these CPUs) with
``--n_threads`` = the CPU count and ``--interrupt_requests False`` (with the default, each new request
cuts off the running one).

Writes the numbers as JSON to ``--out`` and prints tables with the issue's goals checked.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

QUESTIONS = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how a refrigerator works, step by step, to a curious ten-year-old.",
    "Describe a walk through a busy market in a city you imagine, with sounds and smells.",
    "Give a detailed plan for learning to play the guitar in three months.",
    "Write a letter from a sailor to his family, describing a storm at sea.",
    "Explain the water cycle and why it matters for farming.",
    "Tell the history of an invented kingdom, from its founding to its fall.",
    "Describe how to bake bread at home, including what can go wrong.",
]

AGENT_SYSTEM = (
    "You are a careful research assistant working in a terminal. You can call tools to search the "
    "web, read files and run commands; think step by step and explain what you do. "
    "Tools available: search(query: str) -> list of results with title, url and snippet; "
    "visit(url: str) -> the page text; read_file(path: str) -> the file content; "
    "write_file(path: str, content: str) -> ok; run(command: str) -> stdout and stderr; "
    "python(code: str) -> the printed output. Always cite the pages you used, keep notes in "
    "notes.md, and finish with a short summary of what you found and what remains open. "
) * 3


# -- servers -----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server subprocess; ready when ``GET /v1/models`` answers."""

    def __init__(self, name: str, cmd: list[str], port: int, env=None):
        self.name, self.port = name, port
        self.url = f"http://127.0.0.1:{port}/v1"
        self.log: list[str] = []
        self.proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, **(env or {})},
        )
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self):
        for line in self.proc.stdout:
            self.log.append(line)

    def wait(self, timeout: float = 900) -> str:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited:\n{''.join(self.log[-40:])}")
            try:
                with urllib.request.urlopen(self.url + "/models", timeout=5) as r:
                    return json.loads(r.read())["data"][0]["id"]
            except OSError:
                time.sleep(0.5)
        raise RuntimeError(f"{self.name} did not start in {timeout} s")

    def metrics(self) -> dict[str, float]:
        try:
            with urllib.request.urlopen(self.url.removesuffix("/v1") + "/metrics", timeout=10) as r:
                text = r.read().decode()
        except OSError:
            return {}
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                try:
                    out[name] = float(value)
                except ValueError:
                    pass
        return out

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def jaxlab_server(args, *, prefix_cache: int) -> Server:
    port = free_port()
    cmd = [sys.executable, "-m", "jaxlab", "serve", "--model", args.model, "--port", str(port)]
    cmd += ["--slots", str(args.slots), "--max-len", str(args.max_len)]
    cmd += ["--max-queue", str(max(args.concurrency) * 2)]
    if prefix_cache:
        cmd += ["--prefix-cache", str(prefix_cache)]
    name = f"jaxlab (prefix cache {prefix_cache})" if prefix_cache else "jaxlab"
    return Server(name, cmd, port)


def anchor_server(args, gguf: Path) -> Server | None:
    if args.anchor == "off":
        return None
    if importlib.util.find_spec("llama_cpp") is None:
        print("llama-cpp-python is not installed: no anchor (see the docstring)")
        return None
    port = free_port()
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1"]
    cmd += ["--port", str(port), "--n_ctx", str(args.max_len), "--n_threads", str(os.cpu_count())]
    cmd += ["--interrupt_requests", "False"]
    return Server("llama-cpp-python", cmd, port)


# -- clients -----------------------------------------------------------------------------------


async def stream_one(client, model: str, messages, max_tokens: int, bias: dict) -> dict:
    t0 = time.perf_counter()
    stamps, tokens, text = [], None, []
    try:
        stream = await client.chat.completions.create(
            model=model,
            messages=messages,
            max_tokens=max_tokens,
            temperature=0.7,
            logit_bias=bias,
            stream=True,
            stream_options={"include_usage": True},
        )
        finish = None
        async for chunk in stream:
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
            for choice in chunk.choices:
                if choice.delta.content:
                    stamps.append(time.perf_counter())
                    text.append(choice.delta.content)
                finish = choice.finish_reason or finish
        if tokens is None:
            tokens = len(stamps)
        return {
            "ok": finish is not None,
            "tokens": tokens,
            "ttft": stamps[0] - t0 if stamps else None,
            "itl": list(np.diff(stamps)) if len(stamps) > 1 else [],
            "finish": finish,
        }
    except Exception as e:  # noqa: BLE001 - counted as an error
        return {
            "ok": False,
            "tokens": 0,
            "ttft": None,
            "itl": [],
            "error": f"{type(e).__name__}: {e}",
        }


async def warm_up(server: Server, model: str, bias: dict, c: int) -> None:
    """``c`` short requests at once, untimed: the prompt shapes of a level compile here (a
    server that compiles a new shape would otherwise charge it to that level's first tokens)."""
    import openai

    client = openai.AsyncOpenAI(base_url=server.url, api_key="none", max_retries=0, timeout=3600)
    msgs = [[{"role": "user", "content": f"{q} (warm-up)"}] for q in QUESTIONS]
    await asyncio.gather(
        *(stream_one(client, model, msgs[k % len(msgs)], 4, bias) for k in range(c))
    )
    await client.close()


def pct(values, q) -> float | None:
    return float(np.percentile(values, q)) if len(values) else None


async def run_level(server: Server, model: str, c: int, args, bias: dict, seed: int) -> dict:
    import openai

    rng = np.random.default_rng(seed)
    n_requests = min(c * args.requests_per_client, args.max_requests)
    lengths = rng.integers(args.min_tokens, args.max_tokens + 1, n_requests).tolist()
    client = openai.AsyncOpenAI(base_url=server.url, api_key="none", max_retries=0, timeout=3600)
    next_request = [0]
    results = []
    t0 = time.perf_counter()
    deadline = t0 + args.level_time

    async def worker(w: int):
        while next_request[0] < n_requests and time.perf_counter() < deadline:
            k = next_request[0]
            next_request[0] += 1
            q = QUESTIONS[(w + k) % len(QUESTIONS)]
            msgs = [{"role": "user", "content": f"{q} (request {k})"}]
            results.append(await stream_one(client, model, msgs, lengths[k], bias))

    await asyncio.gather(*(worker(w) for w in range(c)))
    wall = time.perf_counter() - t0
    await client.close()
    await asyncio.sleep(0.5)
    m = server.metrics()
    ok = [r for r in results if r["ok"]]
    ttft = [r["ttft"] for r in ok if r["ttft"] is not None]
    itl = [x for r in ok for x in r["itl"]]
    tokens = sum(r["tokens"] for r in ok)
    return {
        "concurrency": c,
        "requests": len(results),
        "completed": len(ok),
        "errors": len(results) - len(ok),
        "error_examples": [r["error"] for r in results if "error" in r][:3],
        "tokens": tokens,
        "wall_s": wall,
        "tok_s": tokens / wall if wall else 0.0,
        "ttft_p50": pct(ttft, 50),
        "ttft_p99": pct(ttft, 99),
        "itl_p50": pct(itl, 50),
        "itl_p99": pct(itl, 99),
        "slots_in_use_after": m.get("jaxlab_slots_active"),
        "requests_running_after": m.get("jaxlab_requests_running"),
    }


async def multi_turn(server: Server, model: str, args, bias: dict) -> dict:
    import openai

    client = openai.AsyncOpenAI(base_url=server.url, api_key="none", max_retries=0, timeout=3600)
    before = server.metrics()
    messages = [{"role": "system", "content": AGENT_SYSTEM}]
    replies, prompt_tokens, cached = [], 0, 0
    t0 = time.perf_counter()
    for turn in range(args.turns):
        messages.append(
            {
                "role": "user",
                "content": f"Step {turn + 1}: the last command printed 'ok {turn}'. "
                "What do you do next, and why?",
            }
        )
        r = await client.chat.completions.create(
            model=model,
            messages=messages,
            max_tokens=args.turn_tokens,
            temperature=0,
            logit_bias=bias,
        )
        text = r.choices[0].message.content
        replies.append(text)
        prompt_tokens += r.usage.prompt_tokens
        details = r.usage.prompt_tokens_details
        cached += (details.cached_tokens or 0) if details else 0
        messages.append({"role": "assistant", "content": text})
    wall = time.perf_counter() - t0
    await client.close()
    after = server.metrics()
    prefill = after.get("jaxlab_prefill_tokens_total", 0) - before.get(
        "jaxlab_prefill_tokens_total", 0
    )
    return {
        "turns": args.turns,
        "prompt_tokens": prompt_tokens,
        "prefill_tokens": prefill,
        "cached_tokens": cached,
        "wall_s": wall,
        "replies": replies,
    }


# -- report ------------------------------------------------------------------------------------


def fmt(x, spec=".2f") -> str:
    return "-" if x is None else format(x, spec)


def print_levels(name: str, levels: list[dict], base: float | None):
    print(f"\n{name}")
    head = (
        f"{'clients':>7} {'reqs':>5} {'done':>5} {'err':>4} {'tok/s':>8} {'vs 1':>6} "
        f"{'TTFT p50':>9} {'p99':>7} {'ITL p50':>8} {'p99':>7} {'slots left':>10}"
    )
    print(head)
    for r in levels:
        ratio = r["tok_s"] / base if base else None
        left = r["slots_in_use_after"]
        print(
            f"{r['concurrency']:>7} {r['requests']:>5} {r['completed']:>5} {r['errors']:>4} "
            f"{r['tok_s']:>8.1f} {fmt(ratio, '.2f'):>6} {fmt(r['ttft_p50']):>9} "
            f"{fmt(r['ttft_p99']):>7} {fmt(r['itl_p50'], '.3f'):>8} {fmt(r['itl_p99'], '.3f'):>7} "
            f"{fmt(left, '.0f'):>10}"
        )
        for e in r["error_examples"]:
            print(f"        error: {e[:160]}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--requests-per-client", type=int, default=2)
    p.add_argument("--max-requests", type=int, default=128)
    p.add_argument("--min-tokens", type=int, default=128)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--level-time", type=float, default=240.0, help="no new request after this")
    p.add_argument("--turns", type=int, default=10)
    p.add_argument("--turn-tokens", type=int, default=48)
    p.add_argument("--slots", type=int, default=16)
    p.add_argument("--max-len", type=int, default=2048)
    p.add_argument("--prefix-cache", type=int, default=16)
    p.add_argument("--anchor", choices=("auto", "off"), default="auto")
    p.add_argument("--anchor-max-concurrency", type=int, default=16)
    p.add_argument("--out", default="runs/bench_serve.json")
    args = p.parse_args()

    from jaxlab.models.registry import package_path
    from jaxlab.tokenization import Tokenizer

    gguf = package_path(args.model) if args.model == "smollm2-135m-instruct" else Path(args.model)
    tokenizer = Tokenizer.from_gguf(gguf) if str(gguf).endswith(".gguf") else None
    eos = tokenizer.eos_token_ids if tokenizer is not None else ()
    bias = {str(t): -100 for t in eos}  # every reply runs to its max_tokens
    result = {
        "args": vars(args),
        "machine": {"cpus": os.cpu_count(), "platform": sys.platform},
        "date": time.strftime("%Y-%m-%d"),
    }

    def run(server: Server, concurrency: list[int]) -> list[dict]:
        model = server.wait()
        levels = []
        for c in concurrency:
            asyncio.run(warm_up(server, model, bias, c))
            levels.append(asyncio.run(run_level(server, model, c, args, bias, seed=c)))
        return levels

    server = jaxlab_server(args, prefix_cache=0)
    try:
        t0 = time.perf_counter()
        model = server.wait()
        result["jaxlab_start_s"] = time.perf_counter() - t0
        result["jaxlab"] = run(server, args.concurrency)
        result["multi_turn_off"] = asyncio.run(multi_turn(server, model, args, bias))
    finally:
        server.stop()
    cached = jaxlab_server(args, prefix_cache=args.prefix_cache)
    try:
        model = cached.wait()
        result["multi_turn_on"] = asyncio.run(multi_turn(cached, model, args, bias))
    finally:
        cached.stop()
    anchor = anchor_server(args, gguf)
    if anchor is not None:
        try:
            levels = [c for c in args.concurrency if c <= args.anchor_max_concurrency]
            result["anchor"] = run(anchor, levels)
        finally:
            anchor.stop()

    base = result["jaxlab"][0]["tok_s"] if result["jaxlab"] else None
    print_levels(f"jaxlab serve ({args.slots} slots), {args.model}", result["jaxlab"], base)
    if "anchor" in result:
        print_levels("llama-cpp-python server", result["anchor"], base)
    off, on = result["multi_turn_off"], result["multi_turn_on"]
    print(f"\nmulti-turn ({args.turns} turns, {args.turn_tokens} tokens per reply, greedy)")
    print(f"{'prefix cache':>12} {'prompt tok':>10} {'prefilled':>10} {'cached':>8} {'wall s':>8}")
    for name, r in (("off", off), (f"{args.prefix_cache}", on)):
        print(
            f"{name:>12} {r['prompt_tokens']:>10} {r['prefill_tokens']:>10.0f} "
            f"{r['cached_tokens']:>8} {r['wall_s']:>8.2f}"
        )
    same = off["replies"] == on["replies"]
    cut = off["prefill_tokens"] / on["prefill_tokens"] if on["prefill_tokens"] else None
    result["multi_turn_same_replies"] = same
    result["prefill_cut"] = cut

    goals = []
    by_c = {r["concurrency"]: r for r in result["jaxlab"]}
    if 16 in by_c and 1 in by_c:
        goals.append(("16 streams >= 4x one stream", by_c[16]["tok_s"] / by_c[1]["tok_s"], 4.0))
        if by_c[16]["ttft_p99"] is not None:
            goals.append(("TTFT p99 at 16 streams < 2 s", by_c[16]["ttft_p99"], 2.0))
    anchor_by_c = {r["concurrency"]: r for r in result.get("anchor", [])}
    if 16 in by_c and 16 in anchor_by_c and anchor_by_c[16]["tok_s"]:
        goals.append(
            ("16 streams >= 2x llama-cpp-python", by_c[16]["tok_s"] / anchor_by_c[16]["tok_s"], 2.0)
        )
    if cut is not None:
        goals.append(("prefix cache cuts prefill >= 5x", cut, 5.0))
    print(f"\nreplies identical with the prefix cache on and off: {same}")
    errors = sum(r["errors"] for r in result["jaxlab"])
    leaked = sum((r["slots_in_use_after"] or 0) for r in result["jaxlab"])
    print(f"jaxlab errors: {errors}; slots left in use after the levels: {leaked:.0f}")
    for name, value, target in goals:
        ok = value < target if "TTFT" in name else value >= target
        print(f"goal {name}: {value:.2f} ({'met' if ok else 'NOT met'})")
    result["goals"] = [{"goal": n, "value": v, "target": t} for n, v, t in goals]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
