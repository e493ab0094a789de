"""Python and shell execution tools: a subprocess per call, in a working folder, with a timeout.

Both are ``mutating`` with no state of ours to copy (a command can change anything it can reach),
so they are never run speculatively. A call returns ``{"returncode", "stdout", "stderr"}``
(each stream cut to ``max_output`` characters), or ``{"error": "timed out after T s", ...}``
when the process outlives ``timeout`` (it is killed).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from jaxlab.agents.latency import LatencyModel
from jaxlab.agents.tools import Effect, Tool

__all__ = ["run_subprocess", "exec_tools"]


def run_subprocess(
    argv: list[str], *, cwd: str | Path, timeout: float, max_output: int = 4000
) -> dict:
    """Runs ``argv`` in ``cwd``; kills it after ``timeout`` seconds."""
    try:
        proc = subprocess.run(
            argv,
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    except subprocess.TimeoutExpired as e:

        def text(x):
            return (x.decode(errors="replace") if isinstance(x, bytes) else x or "")[:max_output]

        return {
            "error": f"timed out after {timeout} s",
            "stdout": text(e.stdout),
            "stderr": text(e.stderr),
        }
    return {
        "returncode": proc.returncode,
        "stdout": proc.stdout[:max_output],
        "stderr": proc.stderr[:max_output],
    }


def exec_tools(
    workdir: str | Path, *, timeout: float = 10.0, latency: LatencyModel | None = None
) -> list[Tool]:
    """``python(code)`` and ``shell(command)`` running in ``workdir``."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)

    def python(code: str) -> dict:
        """Runs a Python program; returns its exit status and output."""
        return run_subprocess([sys.executable, "-I", "-c", code], cwd=workdir, timeout=timeout)

    def shell(command: str) -> dict:
        """Runs a shell command line; returns its exit status and output."""
        return run_subprocess(["/bin/sh", "-c", command], cwd=workdir, timeout=timeout)

    def schema(arg):
        return {"type": "object", "properties": {arg: {"type": "string"}}, "required": [arg]}

    return [
        Tool(
            "python",
            python,
            Effect.MUTATING,
            description="Run a Python program and return its output.",
            parameters=schema("code"),
            latency=latency,
        ),
        Tool(
            "shell",
            shell,
            Effect.MUTATING,
            description="Run a shell command and return its output.",
            parameters=schema("command"),
            latency=latency,
        ),
    ]
