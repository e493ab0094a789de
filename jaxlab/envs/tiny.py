"""A tiny pure-Python exploration game for fast tests: find the coin in a small maze of rooms.

Each variation is a random spanning tree of ``num_rooms`` rooms on a grid (deterministic from the
variation id), the player starts in room 0 and the coin lies in the room farthest from it. Rooms
are named, the observation lists the exits, and the goal does not say where the coin is: the agent
has to explore. ``take coin`` in the coin's room wins (score 1); nothing else scores.

Actions: ``go north|south|east|west``, ``take coin``, ``look``. Variations: ``variation % 5 == 4``
is ``test``, ``== 3`` is ``dev``, the rest ``train``, among ``num_variations``.
"""

from __future__ import annotations

import collections
import random

from jaxlab.envs.base import ENVS, EnvError, Reset, Step, check_split

__all__ = ["TinyRoomsEnv"]

_NAMES = [
    "kitchen", "hallway", "cellar", "attic", "garden", "library", "pantry", "study",
    "gallery", "workshop", "bedroom", "bathroom", "porch", "garage", "office", "lounge",
]  # fmt: skip
_DIRS = {"north": (0, 1), "south": (0, -1), "east": (1, 0), "west": (-1, 0)}
_OPPOSITE = {"north": "south", "south": "north", "east": "west", "west": "east"}


def _layout(num_rooms: int, variation: int):
    """Rooms on a grid joined as a random tree: ``(names, exits[room][dir] = room, coin_room)``."""
    rng = random.Random(variation * 7919 + num_rooms)
    pos = {(0, 0): 0}
    cells = [(0, 0)]
    exits: list[dict[str, int]] = [{}]
    while len(cells) < num_rooms:
        room = rng.randrange(len(cells))
        d = rng.choice(sorted(_DIRS))
        x, y = cells[room]
        cell = (x + _DIRS[d][0], y + _DIRS[d][1])
        if cell in pos:
            continue
        pos[cell] = len(cells)
        cells.append(cell)
        exits.append({})
        exits[room][d] = pos[cell]
        exits[pos[cell]][_OPPOSITE[d]] = room
    names = rng.sample(_NAMES, num_rooms)
    dist = {0: 0}
    queue = collections.deque([0])
    while queue:
        r = queue.popleft()
        for nxt in exits[r].values():
            if nxt not in dist:
                dist[nxt] = dist[r] + 1
                queue.append(nxt)
    coin = max(range(num_rooms), key=lambda r: (dist[r], -r))
    return names, exits, coin


@ENVS.register("tiny")
class TinyRoomsEnv:
    """Find-the-coin in ``num_rooms`` rooms; ``step_limit`` moves per episode."""

    def __init__(self, num_rooms: int = 4, num_variations: int = 50, step_limit: int = 8):
        if not 2 <= num_rooms <= len(_NAMES):
            raise EnvError(f"num_rooms must lie in [2, {len(_NAMES)}], got {num_rooms}")
        if num_variations < 5 or step_limit < 1:
            raise EnvError("num_variations must be >= 5 and step_limit >= 1")
        self.num_rooms, self.num_variations, self.step_limit = num_rooms, num_variations, step_limit
        self._state = None

    def tasks(self) -> list[str]:
        return ["coin"]

    def variations(self, task: str, split: str = "train") -> list[int]:
        self._check_task(task)
        check_split(split)
        want = {"train": (0, 1, 2), "dev": (3,), "test": (4,)}[split]
        return [v for v in range(self.num_variations) if v % 5 in want]

    def _check_task(self, task: str) -> None:
        if task != "coin":
            raise EnvError(f"task {task!r} is not one of {self.tasks()}")

    def walkthrough(self) -> list[str]:
        """The shortest winning action sequence of the current episode (breadth-first search)."""
        _, exits, coin, room, _, _ = self._state
        prev = {room: None}
        queue = collections.deque([room])
        while queue:
            r = queue.popleft()
            for d, nxt in sorted(exits[r].items()):
                if nxt not in prev:
                    prev[nxt] = (r, d)
                    queue.append(nxt)
        path, r = [], coin
        while prev[r] is not None:
            r, d = prev[r]
            path.append(f"go {d}")
        return path[::-1] + ["take coin"]

    def _describe(self) -> str:
        names, exits, coin, room, _, _ = self._state
        text = f"You are in the {names[room]}. Exits: {', '.join(sorted(exits[room]))}."
        if room == coin:
            text += " There is a coin on the floor."
        return text

    def reset(self, task: str = "coin", variation: int = 0, seed: int = 0) -> Reset:
        self._check_task(task)
        if not 0 <= variation < self.num_variations:
            raise EnvError(f"variation {variation} is outside [0, {self.num_variations})")
        names, exits, coin = _layout(self.num_rooms, variation)
        self._state = [names, exits, coin, 0, 0, False]
        return Reset(self._describe(), "Find the coin and take it.", {"score": 0.0, "won": False})

    def valid_actions(self) -> list[str]:
        _, exits, coin, room, _, _ = self._state
        return (
            [f"go {d}" for d in sorted(exits[room])] + ["look"] + (["take coin"] * (room == coin))
        )

    def step(self, action: str) -> Step:
        if self._state is None or self._state[5]:
            raise RuntimeError("step() before reset() or after the episode ended")
        names, exits, coin, room, moves, _ = self._state
        moves += 1
        words = action.strip().lower().rstrip(".").split()
        reward, won = 0.0, False
        if words[:1] == ["go"] and len(words) == 2 and words[1] in exits[room]:
            room = exits[room][words[1]]
            self._state[3] = room
            obs = self._describe()
        elif words == ["take", "coin"] and room == coin:
            obs, reward, won = "You take the coin. You win!", 1.0, True
        elif words == ["look"]:
            obs = self._describe()
        else:
            obs = "Nothing happens."
        truncated = not won and moves >= self.step_limit
        done = won or truncated
        self._state[4], self._state[5] = moves, done
        info = {"score": reward, "won": won, "moves": moves, "truncated": truncated}
        return Step(obs, reward, done, info)

    def close(self) -> None:
        self._state = None
