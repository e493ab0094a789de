"""The SecurityLingua compressor: a keep/drop token classifier on a BERT-style encoder.

A prompt is split into words (:func:`jaxlab.security.data.split_words`), tokenized whole with
the encoder's WordPiece tokenizer (each sub-word token belongs to the word its characters lie
in), cut into chunks of at most ``max_length`` tokens at word boundaries, and classified token by
token. A word's keep probability is the mean of its sub-words' (LLMLingua-2's
``token_to_word="mean"``); the paper keeps words with probability above a fixed 0.5, LLMLingua-2
keeps the share ``rate`` of them (a percentile threshold). The kept words, joined by spaces, are
the extracted intention.

Letters: B batch (chunks), T tokens, E encoder width, W words.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import json
import shutil
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlab.checkpoint import Checkpointer
from jaxlab.config import check
from jaxlab.errors import UserError
from jaxlab.models.bert import BertConfig, BertEncoder
from jaxlab.optim import make_optimizer
from jaxlab.progress import progress as progress_bar
from jaxlab.security.data import (
    LabelledPair,
    SecurityData,
    SecurityDataConfig,
    build_dataset,
    split_words,
)
from jaxlab.tokenization import Tokenizer

__all__ = [
    "TokenClassifier",
    "CompressorConfig",
    "Compressor",
    "token_classification_loss",
    "word_probabilities",
    "keep_mask",
    "encode_words",
    "chunk_words",
    "train_compressor",
    "extraction_scores",
    "IGNORE",
]

IGNORE = -1  # label of tokens that carry none ([CLS], [SEP], padding)
CONFIG_FILE = "compressor.json"


class TokenClassifier(nnx.Module):
    """An encoder with a linear keep/drop head: ``model(ids, mask)`` gives logits ``[B, T, 2]``."""

    def __init__(self, encoder: BertEncoder, *, rngs: nnx.Rngs, dropout: float = 0.1):
        self.encoder = encoder
        e = encoder.config.hidden_size
        self.dropout = nnx.Dropout(dropout, rngs=rngs)
        self.head = nnx.Linear(e, 2, dtype=encoder.dtype, param_dtype=encoder.dtype, rngs=rngs)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
        h = self.encoder(input_ids, attention_mask=attention_mask)
        return self.head(self.dropout(h))


def token_classification_loss(
    logits: jax.Array,  # [B, T, 2]
    labels: jax.Array,  # [B, T] int: 0 drop, 1 keep, IGNORE none
) -> jax.Array:
    """Mean cross-entropy over the tokens that carry a label (the HF token-classification loss)."""
    chex.assert_rank(logits, 3)
    chex.assert_rank(labels, 2)
    chex.assert_equal_shape_prefix([logits, labels], 2)
    valid = labels != IGNORE
    logp = jax.nn.log_softmax(logits.astype(jnp.promote_types(logits.dtype, jnp.float32)), -1)
    nll = -jnp.take_along_axis(logp, jnp.where(valid, labels, 0)[..., None], -1)[..., 0]
    return jnp.sum(jnp.where(valid, nll, 0.0)) / jnp.maximum(jnp.sum(valid), 1)


def word_probabilities(
    token_probs: jax.Array,  # [B, T]
    word_ids: jax.Array,  # [B, T] int: the chunk-local word of each token, -1 for none
    num_words: int,
) -> jax.Array:  # [B, W]
    """Each word's probability as the mean of its sub-word tokens' (0 for a word with none)."""
    chex.assert_rank([token_probs, word_ids], 2)
    chex.assert_equal_shape([token_probs, word_ids])
    onehot = (word_ids[..., None] == jnp.arange(num_words)).astype(token_probs.dtype)  # [B,T,W]
    total = jnp.einsum("bt,btw->bw", token_probs, onehot)
    count = jnp.sum(onehot, axis=1)
    return jnp.where(count > 0, total / jnp.maximum(count, 1), 0.0)


def keep_mask(
    probs: np.ndarray,  # [W]
    *,
    threshold: float = 0.5,
    rate: float | None = None,
    weights: np.ndarray | None = None,  # [W] tokens per word
) -> np.ndarray:  # [W] bool
    """Words to keep: ``p > threshold`` (SecurityLingua), or with ``rate`` LLMLingua-2's rule,
    ``p > percentile(p repeated by weights, int(100 (1 - rate) + 1))``."""
    probs = np.asarray(probs)
    if rate is None:
        return probs > threshold
    if not 0 < rate <= 1:
        raise ValueError(f"rate must lie in (0, 1], got {rate}")
    if probs.size == 0:
        return probs > 0
    w = np.ones(probs.shape, int) if weights is None else np.asarray(weights, int)
    t = np.percentile(np.repeat(probs, w), int(100 * (1 - rate) + 1))
    return probs > t


# -- words to tokens ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Chunk:
    """Token ids of a chunk (with [CLS] and [SEP]) and each token's word (-1 for none), the word
    index being the text's."""

    ids: list[int]
    words: list[int]


def encode_words(tokenizer: Tokenizer, text: str) -> tuple[list[str], list[int], list[int]]:
    """``(words, token ids, token -> word)`` of ``text`` without special tokens. A token whose
    characters start inside a word belongs to it (WordPiece splits at spaces and punctuation,
    as :func:`split_words` does)."""
    words = split_words(text)
    starts = [w.start for w in words]
    enc = tokenizer.hf(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    ids, owner = [], []
    for tok, (a, _) in zip(enc["input_ids"], enc["offset_mapping"]):
        k = bisect.bisect_right(starts, a) - 1
        if k < 0 or a >= words[k].end:  # not inside a word (should not happen)
            continue
        ids.append(tok)
        owner.append(k)
    return [w.text for w in words], ids, owner


def chunk_words(
    ids: Sequence[int], owner: Sequence[int], max_length: int, cls_id: int, sep_id: int
) -> list[Chunk]:
    """Cuts a token sequence into chunks of at most ``max_length`` tokens with [CLS] and [SEP],
    at word boundaries (a word longer than a chunk is cut)."""
    room = max_length - 2
    if room < 1:
        raise ValueError(f"max_length must be >= 3, got {max_length}")
    chunks, start, n = [], 0, len(ids)
    while start < n:
        end = min(start + room, n)
        if end < n and owner[end] == owner[end - 1]:  # do not split a word if it can be helped
            k = end - 1
            while k > start and owner[k] == owner[end]:
                k -= 1
            if k > start:
                end = k + 1
        chunks.append(Chunk([cls_id, *ids[start:end], sep_id], [-1, *owner[start:end], -1]))
        start = end
    return chunks


# -- the compressor ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class CompressorConfig:
    """Training settings of :func:`train_compressor` (saved with the model)."""

    encoder: str = "all-minilm-l6-v2"
    max_length: int = 128
    batch_size: int = 16
    epochs: float = 1.0
    max_steps: int | None = None
    lr: float = 5e-5
    warmup_steps: int = 30
    weight_decay: float = 0.01
    grad_clip: float = 10.0  # the reference's MAX_GRAD_NORM
    dropout: float = 0.1
    seed: int = 0
    data: SecurityDataConfig = SecurityDataConfig()

    def __post_init__(self):
        check(self.max_length >= 8, "max_length", f"must be >= 8, got {self.max_length}")
        check(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")
        check(self.epochs > 0, "epochs", f"must be positive, got {self.epochs}")
        check(
            self.max_steps is None or self.max_steps >= 1,
            "max_steps",
            f"must be >= 1 or null, got {self.max_steps}",
        )
        check(0 <= self.dropout < 1, "dropout", f"must lie in [0, 1), got {self.dropout}")


@functools.lru_cache(maxsize=8)
def _probs_fn(graphdef):
    @jax.jit
    def run(state, ids, mask, words):  # [B, T] each -> word probabilities [B, T]
        model = nnx.merge(graphdef, state)
        logits = model(ids, mask)
        p = jax.nn.softmax(logits.astype(jnp.float32), -1)[..., 1]
        return word_probabilities(p, words, ids.shape[1])

    return run


class Compressor:
    """A trained (or any) :class:`TokenClassifier` with its tokenizer, ready to extract.

    ``extract(texts)`` is batched over all the texts' chunks and runs one jitted forward per
    batch. The forward's cost on a CPU grows with the padded tokens (rows x length), so batches
    are cut to few fixed shapes that waste little (:meth:`shapes`): each chunk goes to the
    shortest of four lengths (quarters of ``max_length``) that holds it, and a batch has exactly
    as many rows as chunks up to 8, then a multiple of 8 (at most ``batch_size``). One request's
    text of ``n`` chunks thus runs as ``[n - 1, max_length]`` and ``[1, L]`` (or ``[n,
    max_length]``); :meth:`warmup` compiles those shapes ahead. Padding never changes a chunk's
    result (masked keys, row-wise everything else) beyond float rounding.
    """

    def __init__(
        self,
        model: TokenClassifier,
        tokenizer: Tokenizer,
        *,
        max_length: int = 128,
        batch_size: int = 32,
        info: dict | None = None,
    ):
        model.eval()
        self.model, self.tokenizer = model, tokenizer
        self.max_length, self.batch_size = max_length, batch_size
        self.info = info or {}
        self._graphdef, self._state = nnx.split(model)
        hf = tokenizer.hf
        self.cls_id, self.sep_id, self.pad_id = hf.cls_token_id, hf.sep_token_id, hf.pad_token_id
        if self.cls_id is None or self.sep_id is None:
            raise UserError("the compressor needs a BERT-style tokenizer with [CLS] and [SEP]")

    # -- files ---------------------------------------------------------------------------------
    def save(self, directory: str | Path, *, extra: dict | None = None) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.tokenizer.hf.save_pretrained(directory / "tokenizer")
        enc = self.model.encoder
        meta = {
            "bert": dataclasses.asdict(enc.config),
            "dtype": jnp.dtype(enc.dtype).name,
            "max_length": self.max_length,
            **(extra or self.info),
        }
        (directory / CONFIG_FILE).write_text(json.dumps(meta, indent=1, default=str))
        params = nnx.state(self.model, nnx.Param).to_pure_dict()  # weights only, no RNG state
        shutil.rmtree(directory / "checkpoints", ignore_errors=True)  # one step 0, the newest
        with Checkpointer(directory / "checkpoints", keep=1, async_save=False) as ckpt:
            ckpt.save(0, arrays=params, force=True)
        return directory

    @classmethod
    def load(cls, directory: str | Path, *, batch_size: int = 32) -> Compressor:
        directory = Path(directory)
        meta_path = directory / CONFIG_FILE
        if not meta_path.is_file():
            raise UserError(
                f"{directory}: no {CONFIG_FILE}; not a compressor directory (python -m jaxlab "
                "security train --out DIR writes one)"
            )
        meta = json.loads(meta_path.read_text())
        dtype = jnp.dtype(meta.get("dtype", "float32"))
        encoder = BertEncoder(BertConfig(**meta["bert"]), dtype=dtype, rngs=nnx.Rngs(0))
        model = TokenClassifier(encoder, rngs=nnx.Rngs(0))
        params = nnx.state(model, nnx.Param)
        with Checkpointer(directory / "checkpoints", keep=1, async_save=False) as ckpt:
            _, restored = ckpt.restore(arrays=params.to_pure_dict())
        nnx.replace_by_pure_dict(params, restored["arrays"])
        nnx.update(model, params)
        tokenizer = Tokenizer.from_directory(directory / "tokenizer")
        return cls(
            model, tokenizer, max_length=meta["max_length"], batch_size=batch_size, info=meta
        )

    # -- inference -------------------------------------------------------------------------------
    def chunks(self, text: str) -> tuple[list[str], list[Chunk], np.ndarray]:
        """``(words, chunks, tokens per word [W])`` of one text."""
        words, ids, owner = encode_words(self.tokenizer, text)
        chunks = chunk_words(ids, owner, self.max_length, self.cls_id, self.sep_id)
        return words, chunks, np.bincount(np.asarray(owner, int), minlength=len(words))

    def lengths(self) -> tuple[int, ...]:
        """The padded chunk lengths: the quarters of ``max_length`` (at least 3 tokens)."""
        t = self.max_length
        return tuple(sorted({max(-(-t * k // 4), 3) for k in (1, 2, 3)} | {t}))

    def rows(self, n: int) -> int:
        """Rows of a batch of ``n <= batch_size`` chunks: ``n`` up to 8, then a multiple of 8."""
        return n if n <= 8 else min(-(-n // 8) * 8, self.batch_size)

    def shapes(self, counts: Sequence[int]) -> list[tuple[int, int]]:
        """The ``(rows, length)`` batches that chunks of these token counts run in."""
        return [(rows, t) for t, idx in self._plan(counts) for rows, _ in idx]

    def _plan(self, counts: Sequence[int]) -> list[tuple[int, list[tuple[int, list[int]]]]]:
        """``[(length, [(rows, chunk indices), ...]), ...]``: chunks grouped by padded length,
        each group cut into batches of at most ``batch_size``."""
        lengths = self.lengths()
        groups: dict[int, list[int]] = {}
        for i, n in enumerate(counts):
            groups.setdefault(lengths[bisect.bisect_left(lengths, n)], []).append(i)
        plan = []
        for t in sorted(groups):
            idx = groups[t]
            parts = [idx[s : s + self.batch_size] for s in range(0, len(idx), self.batch_size)]
            plan.append((t, [(self.rows(len(p)), p) for p in parts]))
        return plan

    def _batch(
        self, chunks: Sequence[Chunk], rows: int, length: int | None = None
    ) -> tuple[np.ndarray, ...]:
        """``ids, mask, words [rows, length]`` (``length`` defaults to ``max_length``); the words
        chunk-local (the chunk's first word is 0)."""
        t = self.max_length if length is None else length
        ids = np.full((rows, t), self.pad_id, np.int32)
        mask = np.zeros((rows, t), np.int32)
        words = np.full((rows, t), -1, np.int32)
        for i, c in enumerate(chunks):
            n = len(c.ids)
            ids[i, :n], mask[i, :n] = c.ids, 1
            w = np.asarray(c.words, np.int32)
            owned = w >= 0
            words[i, :n] = np.where(owned, w - (w[owned].min() if owned.any() else 0), -1)
        return ids, mask, words

    def warmup(self, max_chunks: int = 8) -> list[tuple[int, int]]:
        """Compiles the forward for every shape one text of up to ``max_chunks`` chunks uses
        (``[r, max_length]`` for ``r <= max_chunks`` and ``[1, L]`` for the shorter lengths), so
        that no request pays a compile; returns the shapes."""
        run = _probs_fn(self._graphdef)
        shapes = [(self.rows(r), self.max_length) for r in range(1, max_chunks + 1)]
        shapes = sorted(set(shapes) | {(1, t) for t in self.lengths()})
        for rows, t in shapes:
            z = np.zeros((rows, t), np.int32)
            jax.block_until_ready(run(self._state, z, z, z))
        return shapes

    def word_probs(self, texts: Sequence[str]) -> list[tuple[list[str], np.ndarray, np.ndarray]]:
        """Per text: ``(words, keep probabilities [W], tokens per word [W])``; a word without
        tokens (none in practice) gets probability 0."""
        if isinstance(texts, str):
            raise TypeError("pass a list of texts; wrap a single text in a list")
        per_text = [self.chunks(t) for t in texts]
        flat = [(k, c) for k, (_, cs, _) in enumerate(per_text) for c in cs]
        probs = [np.zeros(len(w), np.float32) for w, _, _ in per_text]
        run = _probs_fn(self._graphdef)
        for t, batches in self._plan([len(c.ids) for _, c in flat]):
            for rows, idx in batches:
                part = [flat[i] for i in idx]
                out = np.asarray(run(self._state, *self._batch([c for _, c in part], rows, t)))
                for i, (k, c) in enumerate(part):
                    owned = [w for w in c.words if w >= 0]
                    if not owned:
                        continue
                    base = min(owned)
                    span = min(max(owned) - base + 1, t)
                    probs[k][base : base + span] = out[i, :span]
        return [(w, p, n) for (w, _, n), p in zip(per_text, probs)]

    def extract(
        self, texts: Sequence[str], *, threshold: float = 0.5, rate: float | None = None
    ) -> list[str]:
        """The kept words of each text, joined by spaces (see :func:`keep_mask`)."""
        out = []
        for words, p, n in self.word_probs(texts):
            keep = keep_mask(p, threshold=threshold, rate=rate, weights=np.maximum(n, 1))
            out.append(" ".join(w for w, k in zip(words, keep) if k))
        return out

    def examples(self, pairs: Sequence[LabelledPair]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Training rows of labelled pairs: ``ids, mask, labels`` ``[N, max_length]`` (each
        token labelled with its word's label; [CLS], [SEP] and padding IGNORE)."""
        rows = []
        for lp in pairs:
            words, ids, owner = encode_words(self.tokenizer, lp.pair.extended)
            if len(words) != len(lp.words):
                raise ValueError("the pair's words differ from the text's")
            for c in chunk_words(ids, owner, self.max_length, self.cls_id, self.sep_id):
                rows.append((c.ids, [int(lp.labels[w]) if w >= 0 else IGNORE for w in c.words]))
        t = self.max_length
        ids = np.full((len(rows), t), self.pad_id, np.int32)
        mask = np.zeros((len(rows), t), np.int32)
        labels = np.full((len(rows), t), IGNORE, np.int32)
        for i, (r, lab) in enumerate(rows):
            ids[i, : len(r)], mask[i, : len(r)], labels[i, : len(r)] = r, 1, lab
        return ids, mask, labels


# -- training -------------------------------------------------------------------------------------


def _loss(model: TokenClassifier, ids, mask, labels):
    return token_classification_loss(model(ids, mask), labels)


@nnx.jit(donate_argnums=(0, 1))
def _train_step(model, optimizer, ids, mask, labels):
    loss, grads = nnx.value_and_grad(_loss)(model, ids, mask, labels)
    optimizer.update(model, grads)
    return loss


def train_compressor(
    cfg: CompressorConfig,
    out: str | Path,
    *,
    data: SecurityData | None = None,
    progress: bool = True,
    log=print,
) -> dict:
    """Fine-tunes ``cfg.encoder`` (a registered BERT-style encoder) as a keep/drop classifier on
    the training pairs, reports validation loss, and saves the compressor to ``out``.

    Returns the training report (also in ``out/compressor.json``).
    """
    from jaxlab.models import from_pretrained

    t0 = time.perf_counter()
    data = data or build_dataset(cfg.data)
    encoder, tokenizer = from_pretrained(cfg.encoder)
    if not isinstance(encoder, BertEncoder):
        raise UserError(f"{cfg.encoder} is a {type(encoder).__name__}, not a BERT-style encoder")
    model = TokenClassifier(encoder, rngs=nnx.Rngs(cfg.seed), dropout=cfg.dropout)
    comp = Compressor(model, tokenizer, max_length=cfg.max_length)
    ids, mask, labels = comp.examples(data.train)
    v_ids, v_mask, v_labels = comp.examples(data.val)
    n = len(ids)
    steps_per_epoch = max(n // cfg.batch_size, 1)
    steps = int(round(cfg.epochs * steps_per_epoch))
    steps = min(steps, cfg.max_steps) if cfg.max_steps else steps
    tx = make_optimizer(
        lr=cfg.lr,
        warmup_steps=min(cfg.warmup_steps, max(steps - 1, 0)),
        decay_steps=steps,
        weight_decay=cfg.weight_decay,
        grad_clip=cfg.grad_clip,
    )
    model.train()
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    rng = np.random.default_rng(cfg.seed)
    order = np.concatenate([rng.permutation(n) for _ in range(-(-steps // steps_per_epoch))])
    log(
        f"training on {n} chunks of <= {cfg.max_length} tokens ({len(data.train)} pairs, "
        f"{float((labels == 1).sum() / max((labels >= 0).sum(), 1)):.3f} of tokens kept), "
        f"{steps} steps of {cfg.batch_size}"
    )
    losses = []
    bar = progress_bar(range(steps), desc="security-train", enabled=progress, total=steps)
    t_train = time.perf_counter()
    for step in bar:
        idx = order[step * cfg.batch_size : (step + 1) * cfg.batch_size]
        if len(idx) < cfg.batch_size:
            idx = rng.choice(n, cfg.batch_size)
        loss = _train_step(model, optimizer, ids[idx], mask[idx], labels[idx])
        if (step + 1) % 10 == 0 or step + 1 == steps:
            losses.append((step + 1, float(loss)))
            bar.set_postfix(loss=f"{losses[-1][1]:.4f}")
    train_s = time.perf_counter() - t_train
    model.eval()
    comp = Compressor(model, tokenizer, max_length=cfg.max_length)
    val_loss = _eval_loss(comp, v_ids, v_mask, v_labels, cfg.batch_size)
    report = {
        "config": dataclasses.asdict(cfg),
        "data": data.report,
        "train_chunks": n,
        "steps": steps,
        "train_seconds": train_s,
        "total_seconds": time.perf_counter() - t0,
        "loss_curve": losses,
        "val_loss": val_loss,
    }
    comp.info = report
    comp.save(out, extra=report)
    log(
        f"trained in {train_s:.0f} s: final loss {losses[-1][1]:.4f}, val loss {val_loss:.4f}; "
        f"wrote {out}"
    )
    return report


def _eval_loss(comp: Compressor, ids, mask, labels, batch_size: int) -> float:
    if not len(ids):
        return float("nan")

    @functools.partial(jax.jit, static_argnums=0)
    def nll_sum(graphdef, state, i, m, y):
        logits = nnx.merge(graphdef, state)(i, m)
        return token_classification_loss(logits, y) * jnp.sum(y != IGNORE), jnp.sum(y != IGNORE)

    total, count = 0.0, 0
    for s in range(0, len(ids), batch_size):
        sl = slice(s, s + batch_size)
        pad = batch_size - len(ids[sl])
        grow = lambda a, v, pad=pad: np.concatenate([a, np.full((pad, a.shape[1]), v, a.dtype)])
        a, c = nll_sum(
            comp._graphdef,
            comp._state,
            grow(ids[sl], comp.pad_id),
            grow(mask[sl], 0),
            grow(labels[sl], IGNORE),
        )
        total, count = total + float(a), count + int(c)
    return total / max(count, 1)


def extraction_scores(
    comp: Compressor,
    pairs: Sequence[LabelledPair],
    *,
    threshold: float = 0.5,
    rate: float | None = None,
) -> dict:
    """Word-level precision / recall / F1 of the kept words against the alignment labels (micro,
    over all words of all pairs, commas included), the mean per-pair F1, the compression rate
    (kept words / words, mean over pairs), and ``request_f1``: the F1 of the kept words as a bag
    (lower-cased) against the original request's words, which does not depend on the alignment."""
    tp = fp = fn = 0
    f1s, rates, bag_f1s = [], [], []
    for lp, (words, p, n) in zip(pairs, comp.word_probs([lp.pair.extended for lp in pairs])):
        pred = keep_mask(p, threshold=threshold, rate=rate, weights=np.maximum(n, 1))
        gold = np.asarray(lp.labels, bool)
        a, b, c = int((pred & gold).sum()), int((pred & ~gold).sum()), int((~pred & gold).sum())
        tp, fp, fn = tp + a, fp + b, fn + c
        f1s.append(2 * a / max(2 * a + b + c, 1))
        rates.append(pred.mean() if len(pred) else 0.0)
        kept = Counter(w.lower() for w, k in zip(words, pred) if k and w != ",")
        want = Counter(w.text.lower() for w in split_words(lp.pair.original) if w.text != ",")
        common = sum((kept & want).values())
        bag_f1s.append(2 * common / max(sum(kept.values()) + sum(want.values()), 1))
    precision = tp / max(tp + fp, 1)
    recall = tp / max(tp + fn, 1)
    return {
        "pairs": len(pairs),
        "precision": precision,
        "recall": recall,
        "f1": 2 * tp / max(2 * tp + fp + fn, 1),
        "f1_per_pair_mean": float(np.mean(f1s)) if f1s else 0.0,
        "compression_rate": float(np.mean(rates)) if rates else 0.0,
        "request_f1": float(np.mean(bag_f1s)) if bag_f1s else 0.0,
        "label_rate": float(np.mean([np.mean(lp.labels) for lp in pairs])) if pairs else 0.0,
    }
