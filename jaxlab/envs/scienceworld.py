"""ScienceWorld (Wang et al., 2022; ``scienceworld`` 1.2.3, offline, needs Java 17 and loopback).

Steps call the simulator's raw ``server.step`` plus ``getScore`` / ``getCompleted`` (about 6 ms)
instead of ``ScienceWorldEnv.step``, which also builds look / inventory / valid-action info on every
call (50-180 ms); :meth:`ScienceWorldEnv.valid_actions` asks for the valid actions only when needed.
Each environment is its own JVM: ``JAVA_TOOL_OPTIONS`` (``-Xmx512m -XX:+UseSerialGC`` unless set)
keeps it near 240 MB.

Score: the simulator's 0-100 score divided by 100 (it can go negative, which ends the episode).
``won`` is the simulator's completion flag with a score of 100.
"""

from __future__ import annotations

import os

from jaxlab.envs.base import ENVS, EnvError, Reset, Step, check_split

__all__ = ["ScienceWorldEnv", "SIMPLIFICATIONS", "JAVA_OPTIONS"]

JAVA_OPTIONS = "-Xmx512m -XX:+UseSerialGC"
SIMPLIFICATIONS = (
    "easy",
    "teleportAction",
    "openDoors",
    "selfWateringFlowerPots",
    "noElectricalAction",
    "openContainers",
)


@ENVS.register("scienceworld")
class ScienceWorldEnv:
    """All 30 ScienceWorld tasks with their train / dev / test variations.

    Args:
      simplifications: comma-separated, from :data:`SIMPLIFICATIONS` (``"easy"`` is all of them).
      step_limit: moves per episode (the simulator's own default is 100).
      action_verbs: when set, :meth:`valid_actions` lists only the valid actions that start with
        one of these (e.g. ``("teleport to", "focus on")``). A room offers ~100-1000 valid
        actions, too many to show a small model; a short menu makes a task family learnable at
        CPU scale. Other actions can still be taken.
    """

    def __init__(
        self,
        simplifications: str = "easy",
        step_limit: int = 30,
        action_verbs: tuple[str, ...] | list[str] | None = None,
    ):
        for s in filter(None, simplifications.split(",")):
            if s not in SIMPLIFICATIONS:
                raise EnvError(f"simplification {s!r} is not one of {list(SIMPLIFICATIONS)}")
        if step_limit < 1:
            raise EnvError(f"step_limit must be >= 1, got {step_limit}")
        if isinstance(action_verbs, str) or (action_verbs is not None and not action_verbs):
            raise EnvError(
                f"action_verbs must be a non-empty list of prefixes, got {action_verbs!r}"
            )
        try:
            from scienceworld import ScienceWorldEnv as _Env
        except ImportError as e:  # pragma: no cover - the Makefile installs it
            raise EnvError(
                f"scienceworld is not installed ({e}); run `make` to set up .venv"
            ) from None
        os.environ.setdefault("JAVA_TOOL_OPTIONS", JAVA_OPTIONS)
        self.simplifications = simplifications
        self.step_limit = step_limit
        self.action_verbs = None if action_verbs is None else tuple(action_verbs)
        self._env = _Env("", envStepLimit=10_000)  # the limit is ours
        self._task_names = list(self._env.get_task_names())
        self._task = None
        self._moves = 0
        self._score = 0.0
        self._done = True

    @property
    def server(self):
        return self._env.server

    def tasks(self) -> list[str]:
        return list(self._task_names)

    def _check_task(self, task: str) -> None:
        if task not in self._task_names:
            raise EnvError(f"ScienceWorld task {task!r} is not one of {self._task_names}")

    def variations(self, task: str, split: str = "train") -> list[int]:
        self._check_task(task)
        check_split(split)
        if self._task != task:
            self._env.load(task, 0, self.simplifications)
            self._task = task
        get = {
            "train": self._env.get_variations_train,
            "dev": self._env.get_variations_dev,
            "test": self._env.get_variations_test,
        }[split]
        return [int(v) for v in get()]

    def reset(
        self, task: str, variation: int = 0, seed: int = 0, *, gold_path: bool = False
    ) -> Reset:
        """Loads ``task`` / ``variation`` (ScienceWorld itself is deterministic: ``seed`` is unused)."""
        del seed
        self._check_task(task)
        limit = self._env.get_max_variations(task)
        if not 0 <= variation < limit:
            raise EnvError(f"variation {variation} of {task!r} is outside [0, {limit})")
        self._env.load(task, int(variation), self.simplifications, generateGoldPath=gold_path)
        self._task = task
        obs, _ = self._env.reset()
        self._moves, self._score, self._done = 0, 0.0, False
        goal = self._env.get_task_description()
        return Reset(obs, goal, {"score": 0.0, "won": False, "task": task, "variation": variation})

    def gold_actions(self) -> list[str]:
        """The simulator's gold action sequence (after ``reset(..., gold_path=True)``)."""
        return list(self._env.get_gold_action_sequence())

    def valid_actions(self) -> list[str]:
        actions = self._env.get_valid_action_object_combinations()
        if self.action_verbs is not None:
            actions = [a for a in actions if a.startswith(self.action_verbs)]
        return sorted(set(actions))

    def step(self, action: str) -> Step:
        if self._done:
            raise RuntimeError("step() before reset() or after the episode ended")
        obs = self.server.step(action)
        score = float(self.server.getScore())  # 0-1 here; ScienceWorldEnv reports 100x
        completed = bool(self.server.getCompleted())
        self._moves += 1
        reward, self._score = score - self._score, score
        won = completed and score >= 1.0
        truncated = not completed and score >= 0 and self._moves >= self.step_limit
        self._done = completed or score < 0 or truncated
        info = {"score": score, "won": won, "moves": self._moves, "truncated": truncated}
        return Step(obs, reward, self._done, info)

    def close(self) -> None:
        self._env.close()
