"""Environments in worker processes: a slow step does not stall decoding, a crash does not stop a run.

    worker = EnvWorker("scienceworld", {"simplifications": "easy"})
    first = worker.reset("boil", 0)
    try:
        out = worker.step("look around")
    except EnvCrashed:        # the process died or hung: it has been restarted, the episode is lost
        ...                   # the caller marks the episode (never drops it silently)

Each :class:`EnvWorker` owns one child process (``spawn``: no JAX state is forked) holding one
environment; calls go over a pipe and are made from the trainer's thread pool, so several
environments step at once while the Engine decodes. A call that finds the process dead, or that
waits longer than ``timeout`` seconds, kills and restarts the process and raises
:class:`EnvCrashed`; the new process needs a ``reset`` before it can step.
"""

from __future__ import annotations

import multiprocessing as mp
import threading
from typing import Any

from jaxlab.envs.base import EnvError, make_env

__all__ = ["EnvCrashed", "EnvWorker"]


class EnvCrashed(RuntimeError):
    """The environment's process died or hung during a call; it was restarted."""


def _serve(conn, name: str, kwargs: dict[str, Any]) -> None:
    try:
        env = make_env(name, **kwargs)
    except Exception as e:  # the parent reports it
        conn.send(("err", type(e).__name__, str(e)))
        return
    conn.send(("ok", None))
    while True:
        try:
            msg = conn.recv()
        except EOFError:
            break
        if msg is None:
            break
        method, args, kw = msg
        try:
            conn.send(("ok", getattr(env, method)(*args, **kw)))
        except Exception as e:
            conn.send(("err", type(e).__name__, str(e)))
    env.close()


class EnvWorker:
    """One environment in its own process; the :class:`TextEnv` methods, called over a pipe."""

    _ctx = mp.get_context("spawn")

    def __init__(self, name: str, kwargs: dict[str, Any] | None = None, *, timeout: float = 120.0):
        self.name, self.kwargs, self.timeout = name, dict(kwargs or {}), timeout
        self.restarts = 0
        self._lock = threading.Lock()
        self._start()

    def _start(self) -> None:
        parent, child = self._ctx.Pipe()
        self._proc = self._ctx.Process(
            target=_serve, args=(child, self.name, self.kwargs), daemon=True
        )
        self._proc.start()
        child.close()
        self._conn = parent
        if not parent.poll(self.timeout):
            self._kill()
            raise EnvError(f"environment {self.name!r} did not start within {self.timeout} s")
        try:
            reply = parent.recv()
        except EOFError:
            raise EnvError(f"environment {self.name!r} exited while starting") from None
        if reply[0] == "err":
            self._kill()
            raise EnvError(f"environment {self.name!r} failed to start: {reply[1]}: {reply[2]}")

    def _kill(self) -> None:
        if self._proc.is_alive():
            self._proc.kill()
        self._proc.join(timeout=10)
        self._conn.close()

    @property
    def pid(self) -> int:
        return self._proc.pid

    def call(self, method: str, *args, **kw) -> Any:
        with self._lock:
            try:
                self._conn.send((method, args, kw))
                if not self._conn.poll(self.timeout):
                    raise TimeoutError(f"no answer within {self.timeout} s")
                reply = self._conn.recv()
            except (EOFError, OSError, BrokenPipeError, TimeoutError) as e:
                self._kill()
                self.restarts += 1
                self._start()
                raise EnvCrashed(
                    f"environment {self.name!r} crashed in {method}() ({type(e).__name__}: {e}); "
                    "restarted"
                ) from None
        if reply[0] == "err":
            kind, message = reply[1], reply[2]
            raise (EnvError if kind in ("EnvError", "UserError") else RuntimeError)(
                f"{self.name}.{method}: {kind}: {message}"
            )
        return reply[1]

    # the TextEnv methods
    def tasks(self):
        return self.call("tasks")

    def variations(self, task: str, split: str = "train"):
        return self.call("variations", task, split)

    def reset(self, task: str, variation: int = 0, seed: int = 0):
        return self.call("reset", task, variation, seed)

    def step(self, action: str):
        return self.call("step", action)

    def valid_actions(self):
        return self.call("valid_actions")

    def close(self) -> None:
        with self._lock:
            if self._proc.is_alive():
                try:
                    self._conn.send(None)
                except OSError:
                    pass
                self._proc.join(timeout=10)
            self._kill()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
