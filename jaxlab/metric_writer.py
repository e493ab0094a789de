"""The one metrics writer of the trainers: JSON lines always, TensorBoard when it is installed.

    with MetricWriter(workdir, step_key="step") as log:
        log.write({"step": 10, "loss": 2.3, "lr": 1e-3, "grad_norm": 0.8, "tokens_per_s": 5e3})

Each ``write`` appends one JSON object to ``workdir/metrics.jsonl`` (a NaN or infinite number as
the string ``"NaN"``, ``"Infinity"`` or ``"-Infinity"``, which ``float()`` reads back: the file
stays valid JSON) and, when ``tensorboardX`` is installed and ``tensorboard`` is true, writes
every numeric value as a TensorBoard scalar under its JSONL key in ``workdir/tensorboard`` (step =
the record's ``step_key`` value). In a multi-process
run only process 0 writes (``jax.process_index() == 0``); on the others the writer does nothing, so
trainers call it unconditionally.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax

__all__ = ["MetricWriter"]


class MetricWriter:
    """Metrics to ``metrics.jsonl`` (and TensorBoard event files) under ``workdir``.

    Args:
      workdir: the run's directory (created if missing).
      append: keep earlier lines (a resumed run) instead of starting the file afresh.
      tensorboard: also write TensorBoard events when ``tensorboardX`` can be imported.
      step_key: the record key that holds the step (a number; not written as a scalar itself).
      keep_until: with ``append``, first drop the lines whose step is above this one (a run resumed
        from its checkpoint at that step redoes them) and any line a kill left unfinished.
    """

    def __init__(
        self,
        workdir: str | Path,
        *,
        append: bool = False,
        tensorboard: bool = True,
        step_key: str = "step",
        keep_until: int | None = None,
    ):
        self.workdir = Path(workdir)
        self.step_key = step_key
        self.active = jax.process_index() == 0
        self.file = None
        self.tb = None
        if not self.active:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        path = self.workdir / "metrics.jsonl"
        if append and keep_until is not None and path.exists():
            _trim(path, step_key, keep_until)
        self.file = path.open("a" if append else "w")
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:
                pass
            else:
                # tensorboardX names event files by the second: a suffix keeps a writer opened in
                # the same second (a quick resume) from overwriting the previous one's file
                suffix = f".{os.getpid()}.{time.time_ns()}"
                self.tb = SummaryWriter(str(self.workdir / "tensorboard"), filename_suffix=suffix)

    def write(self, metrics: Mapping[str, Any]) -> None:
        """Appends one record (JSON-serializable values; numbers become TensorBoard scalars)."""
        if self.file is None:
            return
        self.file.write(json.dumps(_json_safe(dict(metrics)), allow_nan=False) + "\n")
        self.file.flush()
        if self.tb is not None:
            step = int(metrics.get(self.step_key, 0))
            for key, value in metrics.items():
                if key != self.step_key and isinstance(value, int | float):
                    self.tb.add_scalar(key, value, step)
            self.tb.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
        if self.tb is not None:
            self.tb.close()
            self.tb = None

    def __enter__(self) -> MetricWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, Mapping):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def _trim(path: Path, step_key: str, keep_until: int) -> None:
    """Rewrites ``path`` keeping the complete records whose ``step_key`` is at most ``keep_until``
    (atomically: a kill during the rewrite leaves the old file)."""
    kept = []
    with path.open() as f:
        for line in f:
            if not line.endswith("\n"):
                continue  # a line cut short by a kill
            try:
                record = json.loads(line)
                step = float(record[step_key])
            except (ValueError, KeyError, TypeError):
                continue
            if step <= keep_until:
                kept.append(line)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(kept))
    os.replace(tmp, path)
