"""Progress of long work, one convention everywhere.

On a terminal (or in a notebook) :func:`progress` draws a tqdm bar. When its stream is a file or a
pipe (``python -m jaxlab sky train 2> log``, a CI log) it writes a few plain summary lines
instead of hundreds of carriage-return refreshes: one each time another quarter of the work is
done (or, when the total is unknown, at most one every ``interval`` seconds), and one at the end
with the elapsed time and rate. ``enabled=False`` writes nothing.

    for batch in progress(batches, desc="encode", total=len(batches)):
        ...

    bar = progress(total=n, desc="rl sorted")
    bar.update(4)
    bar.set_postfix(reward=0.31)
    bar.close()
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import IO, Any

__all__ = ["progress", "Progress", "is_interactive"]


def is_interactive(stream: IO[str] | None = None) -> bool:
    """Whether ``stream`` (default stderr) shows a live bar: a terminal or a Jupyter kernel."""
    stream = sys.stderr if stream is None else stream
    try:
        if stream.isatty():
            return True
    except (AttributeError, ValueError):  # no isatty, or a closed file
        return False
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None
    return type(shell).__name__ == "ZMQInteractiveShell"


class Progress:
    """A progress report over ``iterable`` or up to ``total``: a tqdm bar or summary lines (see the
    module docstring). Iterate over it, or call :meth:`update`; :meth:`close` ends it (iteration
    to the end, and leaving a ``with`` block, close it too)."""

    def __init__(
        self,
        iterable: Iterable[Any] | None = None,
        *,
        total: int | None = None,
        desc: str = "",
        initial: int = 0,
        enabled: bool = True,
        stream: IO[str] | None = None,
        interval: float = 30.0,
        unit: str = "it",
    ):
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        self.iterable, self.total, self.desc, self.unit = iterable, total, desc, unit
        self.n = initial
        self.stream = sys.stderr if stream is None else stream
        self.interval = interval
        self._initial = initial
        self._postfix: dict[str, Any] = {}
        self._closed = not enabled
        self._bar = None
        self._start = self._last_line = time.perf_counter()
        self._quarter = self._quarters_done(initial)
        # "bar" (tqdm), "lines" (summary lines) or "off"
        self.mode = "off" if not enabled else "bar" if is_interactive(self.stream) else "lines"
        if self.mode == "bar":
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc=desc, initial=initial, file=self.stream, unit=unit)

    def __iter__(self) -> Iterator[Any]:
        if self.iterable is None:
            raise TypeError("progress(...) without an iterable is updated by hand, not iterated")
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def update(self, n: int = 1) -> None:
        """Records ``n`` more units of work done."""
        self.n += n
        if self._bar is not None:
            self._bar.update(n)
            return
        if self._closed:
            return
        now = time.perf_counter()
        quarter = self._quarters_done(self.n)
        if self.total and quarter > self._quarter and self.n < self.total:
            self._quarter = quarter
            self._line(now)
        elif not self.total and now - self._last_line >= self.interval:
            self._line(now)

    def set_postfix(self, values: dict[str, Any] | None = None, **kw: Any) -> None:
        """Values shown beside the count (the latest ones go into each summary line)."""
        self._postfix.update(values or {}, **kw)
        if self._bar is not None:
            self._bar.set_postfix(self._postfix)

    def close(self) -> None:
        """Ends the report: closes the bar, or writes the final summary line."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
            self._closed = True
            return
        if self._closed:
            return
        self._closed = True
        self._line(time.perf_counter(), final=True)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _quarters_done(self, n: int) -> int:
        return 4 * n // self.total if self.total else 0

    def _line(self, now: float, final: bool = False) -> None:
        self._last_line = now
        elapsed = now - self._start
        done = self.n - self._initial
        count = f"{self.n}/{self.total}" if self.total else f"{self.n}"
        pct = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        rate = f", {done / elapsed:.2f} {self.unit}/s" if elapsed > 0 and done else ""
        extra = "".join(f", {k}={v}" for k, v in self._postfix.items())
        head = f"{self.desc}: " if self.desc else ""
        tail = " done" if final else ""
        print(f"{head}{count}{pct} in {elapsed:.1f} s{rate}{extra}{tail}", file=self.stream)
        try:
            self.stream.flush()
        except (AttributeError, ValueError):
            pass


def progress(iterable: Iterable[Any] | None = None, **kwargs: Any) -> Progress:
    """A :class:`Progress` over ``iterable`` (or updated by hand); keyword arguments as there:
    ``total``, ``desc``, ``initial``, ``enabled``, ``stream``, ``interval``, ``unit``."""
    return Progress(iterable, **kwargs)
