"""Users' text corpora for language-model training, through grain.

Documents (plain text, JSONL or parquet records: :mod:`jaxlab.data.records`) are sharded by
process, shuffled (a new order every epoch), tokenized with the model's tokenizer (BOS when the
tokenizer has one, EOS after each document) and packed by grain's concat-then-split packer into
rows of ``seq_len + 1`` tokens with ``segment_ids`` (1, 2, ... per document piece in the row, 0 =
padding) and ``positions`` (restarting at 0 for each piece), then batched. The iterator is a grain
``DatasetIterator`` whose state goes into the checkpoint, so a resumed run continues with the
exact next batch.

A batch (:func:`lm_batch`) holds ``inputs``, ``targets``, ``segment_ids``, ``positions`` and
``loss_mask`` ``[B, T]``: position t predicts token t + 1 of the same document; the first token of
a document is never predicted from the previous document, and attention is masked to the
document (``Decoder(..., segment_ids=...)``).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np
from grain.experimental import ConcatThenSplitIterDataset

from jaxlab.config import check
from jaxlab.data.records import TEXT_FORMATS, RecordError, record_texts

__all__ = [
    "TextDataConfig",
    "read_documents",
    "tokenize_document",
    "text_dataset",
    "lm_batch",
]


@dataclasses.dataclass(frozen=True, kw_only=True)
class TextDataConfig:
    """Where the text is and how to read it.

    files: text / JSONL / parquet files (format from the suffix: .jsonl, .parquet, else text);
    field: the text field of JSONL / parquet records; documents: a text file's documents are its
    lines (``line``) or its paragraphs (``blank_line``); tokenizer: a model name or folder whose
    tokenizer to use (default: the pretrained init's), or ``char`` (the character-level one).
    """

    files: tuple[str, ...] = ()
    field: str = "text"
    documents: str = "line"
    tokenizer: str | None = None

    def __post_init__(self):
        check(
            isinstance(self.files, (tuple, list)) and all(isinstance(f, str) for f in self.files),
            "files",
            f"must be a list of paths, got {self.files!r}",
        )
        object.__setattr__(self, "files", tuple(self.files))
        check(
            self.documents in ("line", "blank_line"),
            "documents",
            f"{self.documents!r} is not one of ['line', 'blank_line']",
        )


def read_documents(
    files: Sequence[str | os.PathLike], *, field: str = "text", documents: str = "line"
) -> list[str]:
    """Every document's text, in file order; a record without ``field`` (or not a string) is a
    :class:`~jaxlab.data.records.RecordError` naming its file and line."""
    if not files:
        raise RecordError(f"no text files given (formats: {', '.join(TEXT_FORMATS)})")
    texts = [t for _, _, t in record_texts(files, field=field, documents=documents)]
    if not texts:
        raise RecordError(f"{', '.join(map(str, files))}: no documents")
    return texts


def tokenize_document(tokenizer, text: str) -> np.ndarray:
    """int32 ids of one document: [BOS] (if the tokenizer has one) + text + EOS."""
    hf = tokenizer.hf
    ids = list(hf(text, add_special_tokens=False, verbose=False)["input_ids"])
    bos = getattr(hf, "bos_token_id", None)
    eos = tokenizer.eos_token_ids[0] if tokenizer.eos_token_ids else None
    return np.asarray(
        ([bos] if bos is not None else []) + ids + ([eos] if eos is not None else []), np.int32
    )


def text_dataset(
    texts: Sequence[str],
    tokenizer,
    *,
    seq_len: int,
    batch_size: int,
    seed: int = 0,
    shard_index: int | None = None,
    shard_count: int | None = None,
) -> grain.IterDataset:
    """Batches of packed rows ``{"tokens", "tokens_segment_ids", "tokens_positions"}``, each
    ``int32 [batch_size, seq_len + 1]``, repeated forever over this process's shard of ``texts``
    (documents ``shard_index::shard_count``; default ``jax.process_index()`` of
    ``jax.process_count()``), shuffled anew each epoch."""
    if shard_index is None or shard_count is None:
        import jax

        shard_index, shard_count = jax.process_index(), jax.process_count()
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard {shard_index} of {shard_count}")
    docs = grain.MapDataset.source(list(texts))[shard_index::shard_count]
    if len(docs) == 0:
        raise RecordError(
            f"process {shard_index} of {shard_count} gets no documents: the corpus has "
            f"{len(texts)}; give at least one document per process"
        )
    ds = (
        docs.shuffle(seed=seed)
        .repeat()
        .map(lambda t: {"tokens": tokenize_document(tokenizer, t)})
        .to_iter_dataset()
    )
    ds = ConcatThenSplitIterDataset(ds, length_struct={"tokens": seq_len + 1})
    return ds.batch(batch_size, drop_remainder=True)


def lm_batch(packed: dict[str, Any]) -> dict[str, np.ndarray]:
    """Inputs, targets and masks ``[B, T]`` of a packed batch ``[B, T + 1]``: position t of a row
    predicts token t + 1 when both belong to the same document piece (segment id > 0)."""
    tokens = np.asarray(packed["tokens"], np.int32)
    seg = np.asarray(packed["tokens_segment_ids"], np.int32)
    pos = np.asarray(packed["tokens_positions"], np.int32)
    return {
        "inputs": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "segment_ids": seg[:, :-1],
        "positions": pos[:, :-1],
        "loss_mask": (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0),
    }
