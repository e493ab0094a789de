"""The per-task event log: one record per user turn and per tool call.

A tool event holds the tool, its status ("ok" / "error"), the canonical arguments, the output
(the value the tool returned), the start / end times of the run that produced it, and how it was
served: ``"real"`` (run when the model asked), ``"speculative"`` (a speculative result promoted on
a match). A user turn is an event too (tool :data:`USER_TURN`, status ``"turn"``, the message as
its output), so that patterns can start at a turn and arguments can come from the prompt.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

__all__ = ["Event", "EventLog", "USER_TURN", "PENDING"]

USER_TURN = "<user>"


class _Pending:
    def __repr__(self) -> str:
        return "PENDING"


PENDING = _Pending()
"""The output of a call that is still running (in a hypothetical log used to look ahead)."""


@dataclasses.dataclass
class Event:
    tool: str
    status: str
    arguments: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    output: Any = None
    start: float = 0.0
    end: float = 0.0
    served: str = "real"  # "real" | "speculative" | "turn"
    step: int = -1

    @property
    def signature(self) -> tuple[str, str]:
        """``(tool, status)``: what control-flow patterns see of an event."""
        return (self.tool, self.status)

    @property
    def is_turn(self) -> bool:
        return self.tool == USER_TURN

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["arguments"] = dict(self.arguments)
        try:
            json.dumps(d["output"])
        except (TypeError, ValueError):
            d["output"] = str(d["output"])
        return d


class EventLog(Sequence[Event]):
    """The events of one task, in order."""

    def __init__(self, task_id: str = "", events: Sequence[Event] = ()):
        self.task_id = task_id
        self.events: list[Event] = list(events)

    def append(self, event: Event) -> Event:
        event.step = len(self.events)
        self.events.append(event)
        return event

    def user_turn(self, text: str, t: float = 0.0) -> Event:
        return self.append(Event(USER_TURN, "turn", {}, text, t, t, "turn"))

    def tool_events(self) -> list[Event]:
        return [e for e in self.events if not e.is_turn]

    def last_prompt(self) -> str:
        for e in reversed(self.events):
            if e.is_turn:
                return str(e.output)
        return ""

    def __getitem__(self, i):
        return self.events[i]

    def __len__(self) -> int:
        return len(self.events)

    def __iter__(self) -> Iterator[Event]:
        return iter(self.events)

    def to_json(self) -> dict[str, Any]:
        return {"task_id": self.task_id, "events": [e.to_json() for e in self.events]}
