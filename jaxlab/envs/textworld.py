"""TextWorld (Côté et al., 2018; ``textworld`` 1.7.0, offline): generated games, cached on disk.

Tasks are game families, a variation is the generator's seed:

- ``coin-<level>``: the coin-collector family (``tw-make tw-coin_collector --level L``): a chain of
  rooms, the coin in one of them, the classic exploration test. Level 1 has the coin in the first
  room; the chain and the distractor rooms grow with the level.
- ``quest-<length>``: small custom quests (``tw-make custom --world-size 3 --nb-objects 4
  --quest-length N``).

Games are generated once with ``tw-make`` (3-5 s each, byte-identical for the same seed) into
``cache_dir`` (default ``$JAXLAB_TEXTWORLD_GAMES`` or ``~/.cache/jaxlab/textworld``) and reused.
``goal="objective"`` gives the game's own objective text (which, in coin-collector games, spells
out the path); ``goal="short"`` only says what to find, so the agent must explore.

Score: points over the game's maximum; ``won`` is TextWorld's own flag. Variations: seed
``% 5 == 4`` is ``test``, ``== 3`` is ``dev``, the rest ``train``, among ``num_variations`` seeds.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from jaxlab.envs.base import ENVS, EnvError, Reset, Step, check_split

__all__ = ["TextWorldEnv", "game_path", "make_game"]

_TASK = re.compile(r"^(coin|quest)-(\d+)$")


def default_cache_dir() -> Path:
    return Path(
        os.environ.get("JAXLAB_TEXTWORLD_GAMES", Path.home() / ".cache" / "jaxlab" / "textworld")
    )


def _parse(task: str) -> tuple[str, int]:
    m = _TASK.match(task)
    if not m or int(m.group(2)) < 1:
        raise EnvError(
            f"TextWorld task {task!r} is not 'coin-<level>' or 'quest-<length>' (positive integers)"
        )
    return m.group(1), int(m.group(2))


def game_path(task: str, seed: int, cache_dir: str | Path | None = None) -> Path:
    family, n = _parse(task)
    return Path(cache_dir or default_cache_dir()) / f"{family}-{n}-seed{seed}.z8"


def make_game(task: str, seed: int, cache_dir: str | Path | None = None) -> Path:
    """Generates the game of ``task`` and ``seed`` into the cache (if missing); returns its path."""
    path = game_path(task, seed, cache_dir)
    if path.is_file():
        return path
    family, n = _parse(task)
    path.parent.mkdir(parents=True, exist_ok=True)
    tw_make = Path(sys.executable).with_name("tw-make")
    if family == "coin":
        args = ["tw-coin_collector", "--level", str(n)]
    else:
        args = ["custom", "--world-size", "3", "--nb-objects", "4", "--quest-length", str(n)]
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.z8")
    cmd = [str(tw_make), *args, "--seed", str(seed), "--output", str(tmp), "--silent", "-f"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if done.returncode != 0 or not tmp.is_file():
        raise EnvError(f"tw-make failed for {task} seed {seed}: {done.stderr.strip()[-500:]}")
    for suffix in (".json", ".ni"):  # the game's metadata travels with it
        if tmp.with_suffix(suffix).is_file():
            tmp.with_suffix(suffix).replace(path.with_suffix(suffix))
    tmp.replace(path)
    return path


def _clean(text: str) -> str:
    """The game's feedback without the status line and prompt it appends (``>   -= Room =-0/1``)."""
    text = text.split("\n>")[0]
    return re.sub(r"\n{3,}", "\n\n", text).strip()


@ENVS.register("textworld")
class TextWorldEnv:
    """Generated TextWorld games; see the module docstring for tasks, splits and goals."""

    def __init__(
        self,
        tasks: tuple[str, ...] = ("coin-1", "coin-2", "coin-3"),
        num_variations: int = 20,
        step_limit: int = 10,
        goal: str = "short",
        cache_dir: str | None = None,
    ):
        for t in tasks:
            _parse(t)
        if goal not in ("short", "objective"):
            raise EnvError(f"goal {goal!r} is not 'short' or 'objective'")
        if num_variations < 5 or step_limit < 1:
            raise EnvError("num_variations must be >= 5 and step_limit >= 1")
        try:
            import textworld  # noqa: F401
        except ImportError as e:  # pragma: no cover - the Makefile installs it
            raise EnvError(
                f"textworld is not installed ({e}); run `make` to set up .venv"
            ) from None
        self._tasks = list(tasks)
        self.num_variations, self.step_limit, self.goal = num_variations, step_limit, goal
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
        self._env = None
        self._state = None
        self._done = True

    def tasks(self) -> list[str]:
        return list(self._tasks)

    def variations(self, task: str, split: str = "train") -> list[int]:
        self._check_task(task)
        check_split(split)
        want = {"train": (0, 1, 2), "dev": (3,), "test": (4,)}[split]
        return [v for v in range(self.num_variations) if v % 5 in want]

    def _check_task(self, task: str) -> None:
        if task not in self._tasks:
            raise EnvError(f"task {task!r} is not one of {self._tasks}")

    def reset(self, task: str, variation: int = 0, seed: int = 0) -> Reset:
        import textworld

        del seed  # the game is the variation's; play itself is deterministic
        self._check_task(task)
        if not 0 <= variation < self.num_variations:
            raise EnvError(f"variation {variation} is outside [0, {self.num_variations})")
        path = make_game(task, variation, self.cache_dir)
        if self._env is not None:
            self._env.close()
        infos = textworld.EnvInfos(
            admissible_commands=True,
            policy_commands=True,
            objective=True,
            won=True,
            lost=True,
            max_score=True,
            description=True,
        )
        self._env = textworld.start(str(path), request_infos=infos)
        self._state = self._env.reset()
        self._walkthrough = list(self._state.policy_commands)
        self._moves, self._score, self._done = 0, 0.0, False
        family = _parse(task)[0]
        goal = (
            self._state.objective
            if self.goal == "objective"
            else "Find the coin and take it."
            if family == "coin"
            else self._state.objective
        )
        obs = _clean(self._state.description)
        return Reset(obs, goal, {"score": 0.0, "won": False, "task": task, "variation": variation})

    def walkthrough(self) -> list[str]:
        """The game's winning command sequence from the start of the episode."""
        return list(self._walkthrough)

    def valid_actions(self) -> list[str]:
        cmds = [c for c in self._state.admissible_commands if c not in ("inventory", "look")]
        return sorted(cmds) + ["look"]

    def step(self, action: str) -> Step:
        if self._done:
            raise RuntimeError("step() before reset() or after the episode ended")
        self._state, points, done = self._env.step(action)
        self._moves += 1
        max_score = max(float(self._state.max_score or 1), 1.0)
        score = float(points) / max_score  # TextWorld returns the cumulative score
        reward, self._score = score - self._score, score
        won = bool(self._state.won)
        truncated = not done and self._moves >= self.step_limit
        self._done = bool(done) or truncated
        obs = _clean(self._state.feedback)
        info = {"score": score, "won": won, "moves": self._moves, "truncated": truncated}
        return Step(obs, reward, self._done, info)

    def close(self) -> None:
        if self._env is not None:
            self._env.close()
            self._env = None
