"""The one metrics writer of the trainers: JSON lines always, TensorBoard when it is installed.

    with MetricWriter(workdir, step_key="step") as log:
        log.write({"step": 10, "loss": 2.3, "lr": 1e-3, "grad_norm": 0.8, "tokens_per_s": 5e3})

Each ``write`` appends one JSON object to ``workdir/metrics.jsonl`` and, when ``tensorboardX`` is
installed and ``tensorboard`` is true, writes every numeric value as a TensorBoard scalar under its
JSONL key in ``workdir/tensorboard`` (step = the record's ``step_key`` value). In a multi-process
run only process 0 writes (``jax.process_index() == 0``); on the others the writer does nothing, so
trainers call it unconditionally.
"""

from __future__ import annotations

import json
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
    """

    def __init__(
        self,
        workdir: str | Path,
        *,
        append: bool = False,
        tensorboard: bool = True,
        step_key: str = "step",
    ):
        self.workdir = Path(workdir)
        self.step_key = step_key
        self.active = jax.process_index() == 0
        self.file = None
        self.tb = None
        if not self.active:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.file = (self.workdir / "metrics.jsonl").open("a" if append else "w")
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
        self.file.write(json.dumps(dict(metrics)) + "\n")
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
