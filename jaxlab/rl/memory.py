"""EMPO²'s episodic memory: per-task lists of (key embedding, tip text, score), retrieved by cosine.

Mechanics as in the authors' memory server (agent-lightning ``empo2_server/server_mem.py``):

- one list per task (variation); an entry is ``{key: embedding of the history up to a step,
  content: tip text, score: the episode's return}``;
- an entry whose content is already stored is not added again; at most ``capacity`` entries, the
  oldest first out;
- retrieval: entries with cosine(query, key) > ``threshold`` (0.5), the ``top_k`` (10) highest
  scores first; it returns how many were found (at most ``top_k``) and their contents.

Embedders map texts to L2-normalised rows ``[N, D]``: ``minilm`` (all-MiniLM-L6-v2, the
reference's BERT embedder) and ``hash`` (hashed bag of words, deterministic, for tests).
"""

from __future__ import annotations

import collections
import hashlib
import re
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from jaxlab.registry import Registry

__all__ = ["MemoryStore", "EMBEDDERS", "make_embedder", "hash_embed"]

EMBEDDERS: Registry = Registry("memory embedder")


class MemoryStore:
    """Per-task bounded FIFO of tips keyed by history embeddings ``[D]``."""

    def __init__(self, capacity: int = 1000, threshold: float = 0.5, top_k: int = 10):
        if capacity < 1 or top_k < 1:
            raise ValueError(f"capacity and top_k must be >= 1, got {capacity}, {top_k}")
        self.capacity, self.threshold, self.top_k = capacity, threshold, top_k
        self._entries: dict[str, collections.deque] = {}

    def __len__(self) -> int:
        return sum(len(d) for d in self._entries.values())

    def size(self, task: str) -> int:
        return len(self._entries.get(task, ()))

    def tasks(self) -> list[str]:
        return sorted(self._entries)

    def add(self, task: str, key: np.ndarray, content: str, score: float) -> bool:
        """Stores a tip; returns False (and stores nothing) when ``content`` is already there."""
        entries = self._entries.setdefault(task, collections.deque())
        if any(e["content"] == content for e in entries):
            return False
        key = np.asarray(key, np.float32).reshape(-1)
        entries.append({"key": key, "content": content, "score": float(score)})
        while len(entries) > self.capacity:
            entries.popleft()
        return True

    def retrieve(self, task: str, query: np.ndarray) -> tuple[int, list[str]]:
        """``(count, contents)``: entries with cosine > threshold, highest score first, top k."""
        entries = self._entries.get(task)
        if not entries:
            return 0, []
        keys = np.stack([e["key"] for e in entries])  # [N, D]
        q = np.asarray(query, np.float32).reshape(-1)
        cos = keys @ q / np.maximum(np.linalg.norm(keys, axis=1) * np.linalg.norm(q), 1e-12)
        hits = np.flatnonzero(cos > self.threshold)
        # highest score first; among equal scores the older entry first (a stable sort)
        order = hits[np.argsort([-entries[i]["score"] for i in hits], kind="stable")]
        chosen = order[: self.top_k]
        return len(chosen), [entries[i]["content"] for i in chosen]

    # -- checkpointing ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state (keys as float lists)."""
        return {
            "capacity": self.capacity,
            "threshold": self.threshold,
            "top_k": self.top_k,
            "entries": {
                task: [
                    {"key": e["key"].tolist(), "content": e["content"], "score": e["score"]}
                    for e in entries
                ]
                for task, entries in self._entries.items()
            },
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> MemoryStore:
        store = cls(int(state["capacity"]), float(state["threshold"]), int(state["top_k"]))
        for task, entries in state["entries"].items():
            store._entries[task] = collections.deque(
                {"key": np.asarray(e["key"], np.float32), "content": e["content"],
                 "score": float(e["score"])}
                for e in entries
            )  # fmt: skip
        return store


_WORD = re.compile(r"[a-z0-9]+")


def hash_embed(texts: Sequence[str], dim: int = 256) -> np.ndarray:
    """Hashed bag of words (with counts), L2-normalised: ``[N, dim]`` float32. Deterministic."""
    out = np.zeros((len(texts), dim), np.float32)
    for i, text in enumerate(texts):
        for word in _WORD.findall(text.lower()):
            h = int.from_bytes(hashlib.blake2b(word.encode(), digest_size=4).digest(), "little")
            out[i, h % dim] += 1.0
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    return out / np.maximum(norms, 1e-12)


def _minilm() -> Callable[[Sequence[str]], np.ndarray]:
    from jaxlab.models import encode, from_pretrained

    model, tokenizer = from_pretrained("all-minilm-l6-v2")

    def embed(texts: Sequence[str]) -> np.ndarray:
        # the tail of a history matters most: keep its last 1000 characters (~256 tokens)
        return encode(model, tokenizer, [t[-1000:] for t in texts], batch_size=32, max_length=256)

    return embed


EMBEDDERS.register("hash", lambda: hash_embed)
EMBEDDERS.register("minilm", _minilm)


def make_embedder(name: str) -> Callable[[Sequence[str]], np.ndarray]:
    """The embedding function ``texts -> [N, D]`` of ``name``: ``hash`` or ``minilm`` (which loads
    the model once, here)."""
    return EMBEDDERS.get(name)()
