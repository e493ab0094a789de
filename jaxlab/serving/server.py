"""Running the server: load a model, build its Engine, serve it with uvicorn until told to stop.

:func:`create_state` builds everything but the HTTP side (usable in-process with
``build_app(state)``); :func:`serve` also binds the socket, prints the URL once the server
accepts connections, and on Ctrl-C or SIGTERM stops accepting, finishes the requests in flight,
stops the engine thread and returns.
"""

from __future__ import annotations

import inspect
import logging
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from jaxlab.errors import UserError
from jaxlab.generation import Engine, SamplingParams
from jaxlab.serving.base import ServerState
from jaxlab.serving.engine_loop import EngineLoop
from jaxlab.serving.metrics import ServerMetrics

__all__ = [
    "DEFAULT_MAX_LEN",
    "create_state",
    "serve",
    "BackgroundServer",
    "engine_has_prefix_cache",
]

DEFAULT_MAX_LEN = 2048  # the default context, capped by the model's own

log = logging.getLogger("jaxlab.serving")


def engine_has_prefix_cache() -> bool:
    """Whether this jaxlab's Engine takes ``prefix_cache``."""
    return "prefix_cache" in inspect.signature(Engine).parameters


def create_state(
    model: str,
    *,
    model_name: str | None = None,
    slots: int = 16,
    max_len: int | None = None,
    api_key: str | None = None,
    max_queue: int = 256,
    prefix_cache: int = 0,
    warmup: bool = True,
    warmup_prompt_len: int = 0,
    log: Callable[[str], None] | None = None,
    defense: Any = None,
) -> ServerState:
    """Loads ``model`` (a registered name, a ``.gguf`` file or an HF directory) and builds the
    engine, its loop and metrics. ``max_len`` (prompt + completion tokens of one request) defaults
    to the model's context, at most :data:`DEFAULT_MAX_LEN`. ``warmup`` compiles the engine's
    steps on one short chat before the server takes requests; ``warmup_prompt_len`` also
    compiles the prefill of 1 to ``slots`` prompts of up to that many tokens
    (:meth:`Engine.warmup`). ``defense`` is the chat and completions endpoints' jailbreak defense
    (:func:`jaxlab.security.make_defense`), None for none."""
    from jaxlab.models import Decoder, from_pretrained

    say = log or (lambda msg: None)
    if slots < 1:
        raise UserError(f"--slots must be >= 1, got {slots}")
    if max_queue < 0:
        raise UserError(f"--max-queue must be >= 0, got {max_queue}")
    if prefix_cache < 0:
        raise UserError(f"--prefix-cache must be >= 0, got {prefix_cache}")
    if prefix_cache and not engine_has_prefix_cache():
        raise UserError("--prefix-cache: this version of the Engine has no prefix cache")
    t0 = time.perf_counter()
    lm, tokenizer = from_pretrained(model)
    if not isinstance(lm, Decoder):
        raise UserError(f"{model} is a {type(lm).__name__}, not a decoder LM; the server needs one")
    if tokenizer is None:
        raise UserError(f"{model} has no tokenizer; the server needs one")
    context = lm.config.max_position_embeddings
    if max_len is None:
        max_len = min(context, DEFAULT_MAX_LEN)
    if not 2 <= max_len <= context:
        raise UserError(
            f"--max-len must lie in [2, {context}] (the model's context), got {max_len}"
        )
    say(f"loaded {model} in {time.perf_counter() - t0:.1f} s")
    kwargs = {"prefix_cache": prefix_cache} if prefix_cache else {}
    engine = Engine(lm, num_slots=slots, max_len=max_len, tokenizer=tokenizer, **kwargs)
    if warmup:
        t0 = time.perf_counter()
        try:
            text = tokenizer.apply_chat_template("Hello!")
        except ValueError:
            text = "Hello!"
        ids = tokenizer.encode(text, add_special_tokens=False)[: max_len - 2] or [0]
        engine.submit(ids, SamplingParams(max_new_tokens=2))
        engine.run()
        say(f"compiled the engine's steps in {time.perf_counter() - t0:.1f} s")
    if warmup and warmup_prompt_len > 0:
        t0 = time.perf_counter()
        shapes = engine.warmup(warmup_prompt_len)
        say(
            f"compiled {shapes} prefill shapes (prompts up to {warmup_prompt_len} tokens, "
            f"1 to {slots} at once) in {time.perf_counter() - t0:.1f} s"
        )
    state_holder: list[ServerState] = []
    metrics = ServerMetrics(lambda: state_holder[0].loop.state())
    state = ServerState(
        EngineLoop(engine, metrics, max_queue=max_queue),
        tokenizer,
        model_name or model,
        max_len,
        metrics,
        api_key=api_key,
        prefix_cache=prefix_cache,
        vocab_size=lm.config.vocab_size,
        defense=defense,
    )
    state_holder.append(state)
    return state


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.set_inheritable(True)
    return sock


def serve(
    model: str,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    slots: int = 16,
    max_len: int | None = None,
    api_key: str | None = None,
    max_queue: int = 256,
    prefix_cache: int = 0,
    model_name: str | None = None,
    access_log: bool = False,
    out=None,
    defense: Any = None,
    warmup_prompt_len: int = 0,
) -> None:
    """Serves ``model`` on ``host:port`` (0: a free port) until Ctrl-C or SIGTERM; prints
    ``... ready at http://HOST:PORT/v1`` once it accepts connections."""
    import uvicorn

    from jaxlab.serving.app import build_app

    out = out or sys.stdout

    def say(msg: str) -> None:
        print(msg, file=out, flush=True)

    sock = _bind(host, port)  # fail early, before the model loads
    try:
        state = create_state(
            model,
            model_name=model_name,
            slots=slots,
            max_len=max_len,
            api_key=api_key,
            max_queue=max_queue,
            prefix_cache=prefix_cache,
            log=say,
            defense=defense,
            warmup_prompt_len=warmup_prompt_len,
        )
    except BaseException:
        sock.close()
        raise
    bound_host, bound_port = sock.getsockname()[:2]
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    url = f"http://{shown}:{bound_port}/v1"

    class Server(uvicorn.Server):
        async def startup(self, sockets=None):
            await super().startup(sockets=sockets)
            if not self.should_exit:
                cache = f", prefix cache {prefix_cache}" if prefix_cache else ""
                if defense is not None:
                    cache += f", defense {defense.name}"
                say(
                    f"serving {state.model_name} ({slots} slots, context {state.max_len} tokens"
                    f"{cache}) ready at {url}"
                )

    config = uvicorn.Config(
        build_app(state),
        log_level="warning",
        access_log=access_log,
        timeout_keep_alive=30,
        lifespan="on",
    )
    server = Server(config)
    # uvicorn re-raises the signal that stopped it once it has drained; a SIGTERM handler that
    # does nothing lets the process end normally after that (a second Ctrl-C forces the exit).
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        sock.close()
    say("server stopped")


class BackgroundServer:
    """A server in a thread of this process, for notebooks, examples and tests::

        with BackgroundServer("smollm2-135m-instruct", slots=4) as server:
            client = openai.OpenAI(base_url=server.url, api_key="none")

    ``model`` is a model source as :func:`serve` takes (or a built :class:`ServerState`);
    ``port=0`` picks a free port; the other keywords go to :func:`create_state`. :meth:`stop`
    (or leaving the ``with`` block) finishes the requests in flight and stops the engine thread.
    """

    def __init__(self, model, *, host: str = "127.0.0.1", port: int = 0, **kwargs):
        import uvicorn

        from jaxlab.serving.app import build_app

        self.state = model if isinstance(model, ServerState) else create_state(model, **kwargs)
        sock = _bind(host, port)
        bound_host, bound_port = sock.getsockname()[:2]
        shown = f"[{bound_host}]" if ":" in bound_host else bound_host
        self.url = f"http://{shown}:{bound_port}/v1"
        config = uvicorn.Config(build_app(self.state), log_level="warning", lifespan="on")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [sock]}, name="jaxlab-http", daemon=True
        )
        self._thread.start()
        while not self._server.started:
            if not self._thread.is_alive():
                raise RuntimeError("the server failed to start; see the log")
            time.sleep(0.01)

    def stop(self, timeout: float | None = 60.0) -> None:
        self._server.should_exit = True
        self._thread.join(timeout)

    def __enter__(self) -> BackgroundServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
