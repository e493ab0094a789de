"""The rollout controller: which samples to generate, when to update, what to drop (sync and SortedRL).

One explicit, checkpointable state machine drives both the discrete-event simulator and the real
trainer. Samples belong to groups (G samples of one prompt, needed whole for group-normalised
advantages). The driver (simulator or trainer) asks the controller which samples to start when
slots are free, reports finished samples, asks whether an update is ready, and reports updates.

Schedulers, chosen by name:
- ``sync``: admit ``rollout_groups`` groups, generate all of them, wait for the longest, train on
  all of them in one update, repeat.
- ``sorted`` (SortedRL): keep every slot busy from a large rollout window of ``rollout_groups``
  groups; samples finish in length order into the rollout buffer; as soon as ``update_groups``
  complete groups are there, train on them (the shortest first: a micro-curriculum) while
  generation goes on. In-flight samples survive an update (their behaviour log-probs are kept
  for the importance correction) unless they started more than ``max_staleness`` policy versions
  ago; those are dropped and regenerated with the current policy. So no trained token is older
  than ``max_staleness`` versions, and ``max_staleness=0`` trains only on-policy tokens.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable
from typing import Any

from jaxlab.config import check
from jaxlab.registry import Registry

__all__ = ["SchedulerConfig", "SampleRef", "Controller", "Scheduler", "SCHEDULERS"]


@dataclasses.dataclass(frozen=True)
class Scheduler:
    """A scheduling policy of the :class:`Controller`.

    admits_while_open: new groups are admitted while earlier ones are still open (False: the
      next rollout batch starts only after this one is trained).
    ready: ``ready(controller) -> groups to train on now, or None``.
    bounds_staleness: in-flight samples survive updates, and the controller guarantees that no
      trained token is older than ``max_staleness`` policy versions.
    """

    admits_while_open: bool
    ready: Callable[[Controller], list[int] | None]
    bounds_staleness: bool


SCHEDULERS: Registry[Scheduler] = Registry("scheduler")


@dataclasses.dataclass(frozen=True, kw_only=True)
class SchedulerConfig:
    scheduler: str = "sorted"
    group_size: int = 4  # G samples per prompt
    update_groups: int = 4  # U complete groups per policy update
    rollout_groups: int = 16  # groups admitted and not yet trained (sync: the rollout batch)
    max_staleness: int = 1  # k: no trained token older than k policy versions
    num_prompts: int = 64  # prompts in the run (each becomes one group)

    def __post_init__(self):
        SCHEDULERS.check(self.scheduler, "scheduler")
        check(self.group_size >= 1, "group_size", f"must be >= 1, got {self.group_size}")
        check(self.update_groups >= 1, "update_groups", f"must be >= 1, got {self.update_groups}")
        check(
            self.rollout_groups >= self.update_groups,
            "rollout_groups",
            f"must be >= update_groups ({self.update_groups}), got {self.rollout_groups}",
        )
        check(self.max_staleness >= 0, "max_staleness", f"must be >= 0, got {self.max_staleness}")
        check(self.num_prompts >= 1, "num_prompts", f"must be >= 1, got {self.num_prompts}")


@dataclasses.dataclass(frozen=True, order=True)
class SampleRef:
    """One generation attempt: sample ``index`` of group ``group``, attempt ``attempt`` (restarts)."""

    group: int
    index: int
    attempt: int


class Controller:
    """The scheduler state machine. All state is plain data (:meth:`state_dict`)."""

    def __init__(self, config: SchedulerConfig):
        self.config = config
        self.scheduler = SCHEDULERS.get(config.scheduler)
        self.version = 0
        self.next_prompt = 0
        # group -> per-sample records: {"status", "attempt", "started", "length"}
        self.groups: dict[int, list[dict[str, Any]]] = {}
        self.queue: collections.deque[tuple[int, int]] = (
            collections.deque()
        )  # samples waiting for a slot
        self.buffer: list[int] = []  # complete groups, in completion order
        self.trained: list[int] = []  # groups trained, in order
        self.updates: list[dict[str, Any]] = []  # per update: version, groups, staleness
        self.dropped: int = 0  # attempts dropped for staleness
        self.wasted_tokens: int = 0  # tokens of finished samples dropped for staleness

    # -- admission -------------------------------------------------------------------------------
    def _open_groups(self) -> int:
        return len(self.groups)

    def _admit(self) -> None:
        cfg = self.config
        if self.groups and not self.scheduler.admits_while_open:
            return  # the next batch starts only after this one is trained
        while self._open_groups() < cfg.rollout_groups and self.next_prompt < cfg.num_prompts:
            g = self.next_prompt
            self.next_prompt += 1
            self.groups[g] = [
                {"status": "queued", "attempt": 0, "started": None, "length": None}
                for _ in range(cfg.group_size)
            ]
            self.queue.extend((g, i) for i in range(cfg.group_size))

    def start(self, free_slots: int) -> list[SampleRef]:
        """Samples to start now in ``free_slots`` free slots (marked active at the current version)."""
        self._admit()
        out = []
        while self.queue and len(out) < free_slots:
            g, i = self.queue.popleft()
            rec = self.groups[g][i]
            rec.update(status="active", started=self.version)
            out.append(SampleRef(g, i, rec["attempt"]))
        return out

    # -- completion ------------------------------------------------------------------------------
    def is_current(self, ref: SampleRef) -> bool:
        rec = self.groups.get(ref.group)
        return (
            rec is not None
            and rec[ref.index]["attempt"] == ref.attempt
            and rec[ref.index]["status"] == "active"
        )

    def finish(self, ref: SampleRef, length: int) -> bool:
        """Records a finished sample; returns False (and ignores it) for a dropped attempt."""
        if not self.is_current(ref):
            return False
        rec = self.groups[ref.group][ref.index]
        rec.update(status="finished", length=int(length))
        if all(r["status"] == "finished" for r in self.groups[ref.group]):
            self.buffer.append(ref.group)
        return True

    @property
    def active(self) -> list[SampleRef]:
        return [
            SampleRef(g, i, r["attempt"])
            for g, recs in self.groups.items()
            for i, r in enumerate(recs)
            if r["status"] == "active"
        ]

    @property
    def done(self) -> bool:
        return self.next_prompt >= self.config.num_prompts and not self.groups

    # -- updates ---------------------------------------------------------------------------------
    def ready(self) -> list[int] | None:
        """Groups to train on now, or None."""
        return self.scheduler.ready(self)

    def update(self, groups: list[int]) -> list[SampleRef]:
        """Records a policy update on ``groups``; returns the attempts dropped as stale.

        Dropped attempts may be in flight (the driver must cancel them) or finished.
        """
        missing = [g for g in groups if g not in self.buffer]
        if missing:
            raise ValueError(f"groups {missing} are not complete in the rollout buffer")
        staleness = max(self.version - r["started"] for g in groups for r in self.groups[g])
        if staleness > self.config.max_staleness and self.scheduler.bounds_staleness:
            raise AssertionError(
                f"trained a token {staleness} versions old (max_staleness "
                f"{self.config.max_staleness})"
            )
        for g in groups:
            self.buffer.remove(g)
            del self.groups[g]
            self.trained.append(g)
        self.updates.append(
            {"version": self.version, "groups": list(groups), "staleness": staleness}
        )
        self.version += 1
        # Samples of open groups (in flight or already finished) that started more than k versions
        # ago are regenerated with the current policy: no trained token is ever older than k.
        dropped = []
        for g, recs in self.groups.items():
            for i, rec in enumerate(recs):
                if (
                    rec["status"] in ("active", "finished")
                    and self.version - rec["started"] > self.config.max_staleness
                ):
                    dropped.append(SampleRef(g, i, rec["attempt"]))
                    if rec["status"] == "finished":
                        self.wasted_tokens += rec["length"]
                    rec.update(
                        status="queued", attempt=rec["attempt"] + 1, started=None, length=None
                    )
            if g in self.buffer and any(r["status"] != "finished" for r in recs):
                self.buffer.remove(g)
        for ref in sorted(dropped, reverse=True):
            self.queue.appendleft((ref.group, ref.index))  # regenerate first, in group order
        self.dropped += len(dropped)
        return dropped

    def staleness_of(self, ref: SampleRef) -> int:
        return self.version - self.groups[ref.group][ref.index]["started"]

    def requeue_active(self) -> list[SampleRef]:
        """Turns every in-flight attempt back into a queued sample (a new attempt), first in the
        queue; used when a run is checkpointed, since in-flight generations are not saved."""
        refs = self.active
        for ref in refs:
            rec = self.groups[ref.group][ref.index]
            rec.update(status="queued", attempt=rec["attempt"] + 1, started=None)
        for ref in sorted(refs, reverse=True):
            self.queue.appendleft((ref.group, ref.index))
        return refs

    # -- checkpointing ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "config": dataclasses.asdict(self.config),
            "version": self.version,
            "next_prompt": self.next_prompt,
            "groups": {str(g): recs for g, recs in self.groups.items()},
            "queue": [list(x) for x in self.queue],
            "buffer": list(self.buffer),
            "trained": list(self.trained),
            "updates": list(self.updates),
            "dropped": self.dropped,
            "wasted_tokens": self.wasted_tokens,
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> Controller:
        c = cls(SchedulerConfig(**state["config"]))
        c.version = int(state["version"])
        c.next_prompt = int(state["next_prompt"])
        c.groups = {int(g): [dict(r) for r in recs] for g, recs in state["groups"].items()}
        c.queue = collections.deque(tuple(x) for x in state["queue"])
        c.buffer = [int(g) for g in state["buffer"]]
        c.trained = [int(g) for g in state["trained"]]
        c.updates = list(state["updates"])
        c.dropped = int(state["dropped"])
        c.wasted_tokens = int(state["wasted_tokens"])
        return c

    def check_invariants(self) -> None:
        """Raises AssertionError if the state is inconsistent (used by tests and the trainer)."""
        assert len(set(self.trained)) == len(self.trained), "a group was trained twice"
        assert not set(self.trained) & set(self.groups), "a trained group is still open"
        for g in self.buffer:
            assert all(r["status"] == "finished" for r in self.groups[g]), (
                f"group {g} buffered incomplete"
            )
        queued = {(g, i) for g, i in self.queue}
        assert len(queued) == len(self.queue), "a sample is queued twice"
        for g, recs in self.groups.items():
            for i, r in enumerate(recs):
                assert (r["status"] == "queued") == ((g, i) in queued), (
                    f"sample {(g, i)} queue state"
                )
        seen = set(self.trained) | set(self.groups)
        assert seen == set(range(self.next_prompt)), "a group was lost"


def _sync_ready(ctrl: Controller) -> list[int] | None:
    """The whole rollout batch, once its longest sample has finished."""
    if ctrl.groups and len(ctrl.buffer) == len(ctrl.groups):
        return list(ctrl.buffer)
    return None


def _sorted_ready(ctrl: Controller) -> list[int] | None:
    """Every complete group once ``update_groups`` are there (a flexible update batch); at the tail
    of the run, when nothing more will complete, what is there."""
    cfg = ctrl.config
    if len(ctrl.buffer) >= cfg.update_groups:
        return list(ctrl.buffer)
    exhausted = ctrl.next_prompt >= cfg.num_prompts
    if ctrl.buffer and exhausted and len(ctrl.buffer) == len(ctrl.groups):
        return list(ctrl.buffer)
    return None


SCHEDULERS.register(
    "sync", Scheduler(admits_while_open=False, ready=_sync_ready, bounds_staleness=False)
)
SCHEDULERS.register(
    "sorted", Scheduler(admits_while_open=True, ready=_sorted_ready, bounds_staleness=True)
)
