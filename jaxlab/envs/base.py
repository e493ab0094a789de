"""The multi-turn text-environment interface shared by ScienceWorld, TextWorld and the tiny env.

    env = make_env("tiny", num_rooms=5)
    first = env.reset(task="coin", variation=3, seed=0)   # -> Reset(observation, goal, info)
    out = env.step("go east")                              # -> Step(observation, reward, done, info)

Rewards are normalised so that an episode's score lies in [0, 1] (ScienceWorld's 0-100 score is
divided by 100, TextWorld's points by the game's maximum): ``Step.reward`` is the change of the
score, ``Step.info["score"]`` the score so far and ``Step.info["won"]`` whether the task is solved.
An episode ends when the environment says so or after ``step_limit`` steps (``info["truncated"]``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol, runtime_checkable

from jaxlab.errors import UserError
from jaxlab.registry import Registry

__all__ = ["ENVS", "Reset", "Step", "TextEnv", "EnvError", "make_env", "SPLITS"]

SPLITS = ("train", "dev", "test")
ENVS: Registry = Registry("environment")
ENVS.register_lazy("tiny", "jaxlab.envs.tiny:TinyRoomsEnv")
ENVS.register_lazy("scienceworld", "jaxlab.envs.scienceworld:ScienceWorldEnv")
ENVS.register_lazy("textworld", "jaxlab.envs.textworld:TextWorldEnv")


class EnvError(UserError):
    """A bad task, variation or split name, or an environment that cannot start."""


@dataclasses.dataclass(frozen=True)
class Reset:
    observation: str
    goal: str
    info: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Step:
    observation: str
    reward: float
    done: bool
    info: dict[str, Any] = dataclasses.field(default_factory=dict)


@runtime_checkable
class TextEnv(Protocol):
    """One episode at a time of a text game; see the module docstring for the reward contract."""

    step_limit: int

    def tasks(self) -> list[str]:
        """Task names of this environment."""
        ...

    def variations(self, task: str, split: str = "train") -> list[int]:
        """Variation ids of ``task`` in ``split`` (``train``, ``dev`` or ``test``)."""
        ...

    def reset(self, task: str, variation: int = 0, seed: int = 0) -> Reset: ...

    def step(self, action: str) -> Step: ...

    def valid_actions(self) -> list[str] | None:
        """The actions the game accepts now, or None where the game cannot list them cheaply."""
        ...

    def close(self) -> None: ...


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise EnvError(f"split {split!r} is not one of {list(SPLITS)}")


def make_env(name: str, **kwargs) -> TextEnv:
    """Builds a registered environment by name (``tiny``, ``scienceworld``, ``textworld``)."""
    return ENVS.get(name)(**kwargs)
