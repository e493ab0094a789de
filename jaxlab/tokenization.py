"""Tokenizers: a thin wrapper over HF tokenizers with left-padded batches and chat templates."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import string
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxlab.paths import cache_dir

__all__ = ["Tokenizer", "Batch", "bucket_length", "char_tokenizer", "CHAR_SPECIALS", "CHARS"]

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "tokenizer.model")


@dataclasses.dataclass(frozen=True)
class Batch:
    """A left-padded batch: ``input_ids`` and ``attention_mask`` are int32 ``[B, T]``."""

    input_ids: np.ndarray
    attention_mask: np.ndarray

    @property
    def lengths(self) -> np.ndarray:
        return self.attention_mask.sum(-1)


def _tokenizer_cache_dir(path: Path) -> Path | None:
    try:
        st = path.stat()
    except OSError:
        return None
    key = hashlib.sha256(f"{path}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:20]
    return cache_dir() / "tokenizers" / f"{path.stem}-{key}"


# llama.cpp metadata keys -> transformers' names (as transformers' own GGUF tokenizer reader maps them)
_GGUF_TOKENIZER_KEYS = {
    "tokenizer.ggml.model": "tokenizer_type",
    "tokenizer.ggml.pre": "pre_tokenizer_type",
    "tokenizer.ggml.tokens": "tokens",
    "tokenizer.ggml.scores": "scores",
    "tokenizer.ggml.token_type": "token_type",
    "tokenizer.ggml.merges": "merges",
    "tokenizer.ggml.precompiled_charsmap": "precompiled_charsmap",
    "tokenizer.ggml.bos_token_id": "bos_token_id",
    "tokenizer.ggml.eos_token_id": "eos_token_id",
    "tokenizer.ggml.unknown_token_id": "unk_token_id",
    "tokenizer.ggml.padding_token_id": "pad_token_id",
    "tokenizer.ggml.add_space_prefix": "add_prefix_space",
}
_GGUF_TOKENIZER_CONFIG_KEYS = {
    "tokenizer.chat_template": "chat_template",
    "tokenizer.ggml.add_bos_token": "add_bos_token",
    "tokenizer.ggml.add_eos_token": "add_eos_token",
}
_GGUF_SPECIAL_TOKENS = {
    "bos_token": "tokenizer.ggml.bos_token_id",
    "eos_token": "tokenizer.ggml.eos_token_id",
    "unk_token": "tokenizer.ggml.unknown_token_id",
    "pad_token": "tokenizer.ggml.padding_token_id",
}


def _hf_tokenizer_from_gguf(path: Path, reader=None):
    """A transformers fast tokenizer from GGUF metadata, without torch."""
    import gguf
    from transformers import PreTrainedTokenizerFast
    from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer

    reader = reader if reader is not None else gguf.GGUFReader(str(path))

    def value(key):
        field = reader.fields.get(key)
        return None if field is None else field.contents()

    if value("tokenizer.ggml.model") is None:
        raise ValueError(f"{path}: the GGUF file carries no tokenizer")
    tokenizer = {
        name: value(key) for key, name in _GGUF_TOKENIZER_KEYS.items() if key in reader.fields
    }
    config = {
        name: value(key)
        for key, name in _GGUF_TOKENIZER_CONFIG_KEYS.items()
        if key in reader.fields
    }
    if tokenizer.get("tokenizer_type") == "llama":
        config.setdefault("add_bos_token", True)  # as llama.cpp does for sentencepiece vocabularies
    for name, key in _GGUF_SPECIAL_TOKENS.items():
        token_id = value(key)
        config[name] = tokenizer["tokens"][token_id] if token_id is not None else None
    backend, extra = convert_gguf_tokenizer(value("general.architecture"), tokenizer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, **config, **extra)


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

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            hf = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        return cls(hf, **kw)

    @classmethod
    def from_gguf(cls, path: str | Path, *, reader=None, cache: bool = True) -> Tokenizer:
        """The tokenizer and chat template stored in a GGUF file's metadata.

        The vocabulary, merges and special tokens are read with the ``gguf`` package (``reader``,
        an open ``gguf.GGUFReader``, saves parsing the file twice) and turned into a fast
        tokenizer by transformers' GGUF converter; torch is not needed. Because converting a
        large vocabulary takes seconds, the result is saved under ``$JAXLAB_CACHE_DIR`` (default
        ``~/.cache/jaxlab``), keyed by the file's path, size and modification time.
        """
        from transformers import PreTrainedTokenizerFast

        path = Path(path).absolute()
        cached = _tokenizer_cache_dir(path) if cache else None
        if cached is not None and (cached / "tokenizer_config.json").is_file():
            try:
                return cls(
                    PreTrainedTokenizerFast.from_pretrained(str(cached), local_files_only=True)
                )
            except Exception:  # a damaged cache entry: rebuild it below
                shutil.rmtree(cached, ignore_errors=True)
        hf = _hf_tokenizer_from_gguf(path, reader)
        if cached is not None:
            tmp = cached.with_name(cached.name + f".tmp{os.getpid()}")
            try:
                hf.save_pretrained(str(tmp))
                os.replace(tmp, cached)
            except OSError:
                shutil.rmtree(tmp, ignore_errors=True)  # a read-only home is fine: no cache
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
        rows, _ = self.encode_truncated(
            texts,
            max_length,
            add_special_tokens=add_special_tokens,
            truncation_side=truncation_side,
        )
        return self.pad(rows, pad_to=pad_to, side=padding_side)

    def encode_truncated(
        self,
        texts: Sequence[str],
        max_length: int | None,
        *,
        add_special_tokens: bool = True,
        truncation_side: str = "right",
    ) -> tuple[list[list[int]], int]:
        """Token lists of at most ``max_length`` tokens, special tokens kept, and how many were cut.

        As in HF tokenizers, the text is truncated before special tokens ([CLS] ... [SEP]) are added.
        """
        if truncation_side not in ("left", "right"):
            raise ValueError(f"truncation side must be 'left' or 'right', got {truncation_side!r}")
        texts = list(texts)
        if max_length is None:
            return [
                list(r) for r in self.hf(texts, add_special_tokens=add_special_tokens)["input_ids"]
            ], 0
        extra = self.hf.num_special_tokens_to_add() if add_special_tokens else 0
        if max_length <= extra:
            raise ValueError(
                f"max_length={max_length} leaves no room beside {extra} special tokens"
            )
        self.hf.truncation_side = truncation_side
        rows = [
            list(r)
            for r in self.hf(
                texts, add_special_tokens=add_special_tokens, truncation=True, max_length=max_length
            )["input_ids"]
        ]
        at_limit = [t for t, r in zip(texts, rows) if len(r) == max_length]
        full = (  # lengths past the limit are expected here: no "longer than the maximum" warning
            self.hf(at_limit, add_special_tokens=add_special_tokens, verbose=False)["input_ids"]
            if at_limit
            else []
        )
        cut = sum(len(r) > max_length for r in full)
        return rows, cut

    def pad(
        self, rows: Sequence[Sequence[int]], *, pad_to: int | None = None, side: str = "left"
    ) -> Batch:
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

    def batch_decode(
        self, rows: Sequence[Sequence[int]], *, skip_special_tokens: bool = True
    ) -> list[str]:
        return [self.decode(r, skip_special_tokens=skip_special_tokens) for r in rows]


def bucket_length(n: int, limit: int, granularity: int = 32) -> int:
    """Rounds a batch's length up to a bucket so that few shapes are ever compiled.

    Powers of two up to ``granularity``, multiples of ``granularity`` beyond, capped at ``limit``.
    """
    if n <= granularity:
        b = 1
        while b < n:
            b *= 2
        return min(b, limit)
    return min(-(-n // granularity) * granularity, limit)


# -- a character-level tokenizer for tiny models ------------------------------------------------

CHAR_SPECIALS = ["<pad>", "<eos>", "<unk>"]
CHARS = list(string.digits + string.ascii_letters + " .,:;!?'\"+-*/=()<>[]_\n")


def char_tokenizer() -> Tokenizer:
    """A character-level tokenizer (a real HF fast tokenizer) for tiny models, such as the RL
    trainer's ``model: tiny``: one token per character (digits, letters, punctuation, space,
    newline); ids 0-2 are ``<pad>``, ``<eos>``, ``<unk>``. Vocabulary size:
    ``len(CHAR_SPECIALS) + len(CHARS)``."""
    from tokenizers import Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as RawTokenizer
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(CHAR_SPECIALS + CHARS)}
    raw = RawTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    raw.decoder = decoders.Fuse()
    hf = PreTrainedTokenizerFast(
        tokenizer_object=raw, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )
    hf.chat_template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    return Tokenizer(hf)
