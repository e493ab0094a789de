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
- ``sorted_adaptive``: ``sorted`` with two changes aimed at the causes of its remaining bubble and
  waste (measured by the simulator's bubble decomposition, ``scripts/sortedrl_sweep.py``):
  *refill*: when a slot would idle because the window is held by long stragglers or by complete
  groups waiting for an update, further groups are admitted from the prompt stream, up to
  ``max_open_groups`` open at once; *straggler-aware updates*: an update that would drop an
  in-flight sample for staleness waits (slots stay busy through refill) until the sample finishes
  or ``max_update_groups`` complete groups are buffered, so the update batch is sized by what is
  ready. Staleness is still bounded by ``max_staleness``: waiting never advances the version.
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
    refills: when the queue cannot fill the free slots, groups are admitted beyond
      ``rollout_groups``, up to ``max_open_groups`` open groups.
    ready: ``ready(controller) -> groups to train on now, or None``.
    bounds_staleness: in-flight samples survive updates, and the controller guarantees that no
      trained token is older than ``max_staleness`` policy versions.
    """

    admits_while_open: bool
    ready: Callable[[Controller], list[int] | None]
    bounds_staleness: bool
    refills: bool = False


SCHEDULERS: Registry[Scheduler] = Registry("scheduler")


@dataclasses.dataclass(frozen=True, kw_only=True)
class SchedulerConfig:
    scheduler: str = "sorted"
    group_size: int = 4  # G samples per prompt
    update_groups: int = 4  # U complete groups per policy update
    rollout_groups: int = 16  # groups admitted and not yet trained (sync: the rollout batch)
    max_staleness: int = 1  # k: no trained token older than k policy versions
    num_prompts: int = 64  # prompts in the run (each becomes one group)
    # sorted_adaptive only (0: the default multiple of rollout_groups)
    max_open_groups: int = 0  # open groups at most when refilling; 0: 8 x rollout_groups
    max_update_groups: int = 0  # an update waits for stragglers until this many; 0: 4 x rollout

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
        check(
            self.max_open_groups == 0 or self.max_open_groups >= self.rollout_groups,
            "max_open_groups",
            f"must be 0 (default) or >= rollout_groups ({self.rollout_groups}), "
            f"got {self.max_open_groups}",
        )
        check(
            self.max_update_groups == 0 or self.max_update_groups >= self.update_groups,
            "max_update_groups",
            f"must be 0 (default) or >= update_groups ({self.update_groups}), "
            f"got {self.max_update_groups}",
        )

    @property
    def open_groups_cap(self) -> int:
        return self.max_open_groups or 8 * self.rollout_groups

    @property
    def update_groups_cap(self) -> int:
        return self.max_update_groups or 4 * self.rollout_groups


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
        # derived (not saved): for each group with a sample in flight, the version its oldest
        # started sample (in flight or finished) started at; and how many such groups per version
        self._live_oldest: dict[int, int] = {}
        self._live_versions: collections.Counter[int] = collections.Counter()

    # -- admission -------------------------------------------------------------------------------
    def _open_groups(self) -> int:
        return len(self.groups)

    def _admit(self, free_slots: int) -> None:
        cfg = self.config
        if self.groups and not self.scheduler.admits_while_open:
            return  # the next batch starts only after this one is trained
        while self.next_prompt < cfg.num_prompts and (
            self._open_groups() < cfg.rollout_groups
            or (
                self.scheduler.refills
                and len(self.queue) < free_slots
                and self._open_groups() < cfg.open_groups_cap
            )
        ):
            g = self.next_prompt
            self.next_prompt += 1
            self.groups[g] = [
                {"status": "queued", "attempt": 0, "started": None, "length": None}
                for _ in range(cfg.group_size)
            ]
            self.queue.extend((g, i) for i in range(cfg.group_size))

    def start(self, free_slots: int) -> list[SampleRef]:
        """Samples to start now in ``free_slots`` free slots (marked active at the current version)."""
        self._admit(free_slots)
        out = []
        while self.queue and len(out) < free_slots:
            g, i = self.queue.popleft()
            rec = self.groups[g][i]
            rec.update(status="active", started=self.version)
            self._track(g)
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
        self._track(ref.group)
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
        buffered = set(self.buffer)
        missing = [g for g in groups if g not in buffered]
        if missing:
            raise ValueError(f"groups {missing} are not complete in the rollout buffer")
        staleness = max(self.version - r["started"] for g in groups for r in self.groups[g])
        if staleness > self.config.max_staleness and self.scheduler.bounds_staleness:
            raise AssertionError(
                f"trained a token {staleness} versions old (max_staleness "
                f"{self.config.max_staleness})"
            )
        trained = set(groups)
        self.buffer = [g for g in self.buffer if g not in trained]
        for g in groups:
            del self.groups[g]
            self.trained.append(g)
        self.updates.append(
            {"version": self.version, "groups": list(groups), "staleness": staleness}
        )
        self.version += 1
        # Samples of open groups (in flight or already finished) that started more than k versions
        # ago are regenerated with the current policy: no trained token is ever older than k.
        dropped = []
        buffered = set(self.buffer)
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
            if g in buffered and any(r["status"] != "finished" for r in recs):
                self.buffer.remove(g)
        for ref in sorted(dropped, reverse=True):
            self.queue.appendleft((ref.group, ref.index))  # regenerate first, in group order
        self.dropped += len(dropped)
        self._rebuild_tracking()
        return dropped

    # -- which in-flight groups an update would make stale ------------------------------------------
    def _track(self, g: int) -> None:
        """Refreshes group ``g``'s entry after one of its samples started or finished."""
        old = self._live_oldest.pop(g, None)
        if old is not None:
            self._live_versions[old] -= 1
            if not self._live_versions[old]:
                del self._live_versions[old]
        recs = self.groups.get(g)
        if recs and any(r["status"] == "active" for r in recs):
            oldest = min(r["started"] for r in recs if r["status"] in ("active", "finished"))
            self._live_oldest[g] = oldest
            self._live_versions[oldest] += 1

    def _rebuild_tracking(self) -> None:
        self._live_oldest, self._live_versions = {}, collections.Counter()
        for g in self.groups:
            self._track(g)

    def oldest_in_flight(self) -> int | None:
        """The earliest version any sample of a group still in flight started at (the groups an
        update may make stale), or None when nothing is in flight."""
        return min(self._live_versions, default=None)

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
        self._rebuild_tracking()
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
        c._rebuild_tracking()
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
        cap = self.config.open_groups_cap if self.scheduler.refills else self.config.rollout_groups
        tracked = (dict(self._live_oldest), collections.Counter(self._live_versions))
        self._rebuild_tracking()
        assert tracked == (self._live_oldest, self._live_versions), "in-flight tracking drifted"
        assert len(self.groups) <= cap, f"{len(self.groups)} groups open, at most {cap} allowed"


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


def _would_drop_in_flight(ctrl: Controller) -> bool:
    """Whether the next update would drop, as stale, a sample of a group that still has a sample
    in flight (waiting may let that group complete before the version moves): after it, samples
    started at ``version - max_staleness`` or earlier are dropped."""
    oldest = ctrl.oldest_in_flight()
    return oldest is not None and oldest <= ctrl.version - ctrl.config.max_staleness


def _sorted_adaptive_ready(ctrl: Controller) -> list[int] | None:
    """``sorted``'s update batch, held back while the update would drop an in-flight straggler
    (until ``max_update_groups`` complete groups wait): the batch grows with what is ready
    instead of throwing away the long samples' tokens."""
    groups = _sorted_ready(ctrl)
    if groups and len(groups) < ctrl.config.update_groups_cap and _would_drop_in_flight(ctrl):
        return None
    return groups


SCHEDULERS.register(
    "sync", Scheduler(admits_while_open=False, ready=_sync_ready, bounds_staleness=False)
)
SCHEDULERS.register(
    "sorted", Scheduler(admits_while_open=True, ready=_sorted_ready, bounds_staleness=True)
)
SCHEDULERS.register(
    "sorted_adaptive",
    Scheduler(
        admits_while_open=True, ready=_sorted_adaptive_ready, bounds_staleness=True, refills=True
    ),
)
