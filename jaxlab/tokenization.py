"""Tokenizers: a thin wrapper over HF tokenizers with left-padded batches and chat templates."""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["Tokenizer", "Batch"]

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "tokenizer.model")


@dataclasses.dataclass(frozen=True)
class Batch:
    """A left-padded batch: ``input_ids`` and ``attention_mask`` are int32 ``[B, T]``."""

    input_ids: np.ndarray
    attention_mask: np.ndarray

    @property
    def lengths(self) -> np.ndarray:
        return self.attention_mask.sum(-1)


class Tokenizer:
    """Wraps a ``transformers`` tokenizer.

    Batches are left-padded (so that generation appends on the right), decoding strips special
    tokens, and ``eos_token_ids`` includes the chat template's end-of-turn token.
    """

    def __init__(self, hf_tokenizer: Any, *, model_max_length: int | None = None):
        self.hf = hf_tokenizer
        self.hf.padding_side = "left"
        limit = model_max_length or getattr(hf_tokenizer, "model_max_length", None)
        self.model_max_length = int(limit) if limit and limit < 1_000_000_000 else None

    # -- construction ----------------------------------------------------------------------------
    @staticmethod
    def directory_has_tokenizer(path: str | Path) -> bool:
        return any((Path(path) / f).is_file() for f in _TOKENIZER_FILES)

    @classmethod
    def from_directory(cls, path: str | Path, **kw) -> Tokenizer:
        from transformers import AutoTokenizer

        return cls(AutoTokenizer.from_pretrained(str(path), local_files_only=True), **kw)

    @classmethod
    def from_gguf(cls, path: str | Path) -> Tokenizer:
        """The tokenizer and chat template stored in a GGUF file's metadata."""
        from transformers import AutoTokenizer

        path = Path(path)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            hf = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
        return cls(hf)

    # -- properties ------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    @property
    def pad_token_id(self) -> int:
        pad = self.hf.pad_token_id
        if pad is None:
            pad = self.hf.eos_token_id if self.hf.eos_token_id is not None else 0
        return int(pad)

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """Ids that end a generation: EOS, and the chat end-of-turn token where there is one."""
        ids = []
        if self.hf.eos_token_id is not None:
            ids.append(int(self.hf.eos_token_id))
        for tok in ("<|im_end|>", "<|eot_id|>", "<|endoftext|>", "<end_of_turn>"):
            tid = self.hf.convert_tokens_to_ids(tok) if tok in self.hf.get_vocab() else None
            if tid is not None and tid not in ids:
                ids.append(int(tid))
        return tuple(ids)

    # -- encoding --------------------------------------------------------------------------------
    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=add_special_tokens))

    def __call__(
        self,
        texts: Sequence[str],
        *,
        max_length: int | None = None,
        pad_to: int | None = None,
        add_special_tokens: bool = True,
        truncation_side: str = "right",
        padding_side: str = "left",
    ) -> Batch:
        """Encodes ``texts`` into a left-padded :class:`Batch`.

        Args:
          max_length: truncate each text to at most this many tokens (from ``truncation_side``).
          pad_to: pad to this length (at least the longest row); by default the longest row.
          padding_side: ``"left"`` for decoders (generation appends on the right), ``"right"``
            for encoders with absolute positions (BERT).
        """
        if isinstance(texts, str):
            raise TypeError("Tokenizer expects a list of texts; wrap a single text in a list")
        rows = [self.encode(t, add_special_tokens=add_special_tokens) for t in texts]
        if max_length is not None:
            rows = [r[:max_length] if truncation_side == "right" else r[-max_length:] for r in rows]
        return self.pad(rows, pad_to=pad_to, side=padding_side)

    def pad(self, rows: Sequence[Sequence[int]], *, pad_to: int | None = None, side: str = "left") -> Batch:
        """Pads token lists (on the left by default) into a :class:`Batch`."""
        if side not in ("left", "right"):
            raise ValueError(f"padding side must be 'left' or 'right', got {side!r}")
        longest = max((len(r) for r in rows), default=0)
        width = max(longest, pad_to or 0)
        ids = np.full((len(rows), width), self.pad_token_id, np.int32)
        mask = np.zeros((len(rows), width), np.int32)
        for i, r in enumerate(rows):
            if r:
                cols = slice(width - len(r), width) if side == "left" else slice(0, len(r))
                ids[i, cols] = r
                mask[i, cols] = 1
        return Batch(ids, mask)

    def apply_chat_template(
        self, messages: list[dict[str, str]] | str, *, add_generation_prompt: bool = True, **kw
    ) -> str:
        """Renders a conversation (or one user message) with the model's chat template."""
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        if not getattr(self.hf, "chat_template", None):
            raise ValueError("this tokenizer has no chat template")
        return self.hf.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt, **kw
        )

    # -- decoding --------------------------------------------------------------------------------
    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def batch_decode(self, rows: Sequence[Sequence[int]], *, skip_special_tokens: bool = True) -> list[str]:
        return [self.decode(r, skip_special_tokens=skip_special_tokens) for r in rows]
