"""Supervised fine-tuning of chat models: loss on assistant tokens only, packing, Orbax checkpoints.

Data is a JSONL file, one conversation per line: ``{"messages": [{"role", "content"}, ...]}``
(other keys are ignored). Each conversation is rendered with the tokenizer's chat template; the
tokens an assistant turn adds (its content and the end-of-turn token) carry the loss, everything
else (system, user, the template's role headers) is context only.

With ``packing`` whole conversations are packed greedily, in order, into rows of ``seq_len`` tokens
(a conversation never straddles two rows; one longer than ``seq_len`` is truncated). Packed
conversations share a row's causal attention, so a later one can attend to an earlier one in the
same row; positions run on across the row. Without packing each conversation has a row of its own,
right-padded. The loss is the mean cross-entropy over all assistant tokens of a batch.

``python -m jaxlab sft CONFIG --workdir DIR`` trains (or resumes from ``DIR/checkpoints``), logs
``DIR/metrics.jsonl`` and writes the fine-tuned model as an HF checkpoint directory ``DIR/model``
(:func:`jaxlab.models.save_pretrained`), which ``jaxlab.models.from_pretrained`` loads.

Letters: B batch, T tokens, V vocab.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Sequence
from pathlib import Path

import chex
import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxlab.checkpoint import CheckpointConfig, Checkpointer
from jaxlab.config import check, register_config
from jaxlab.errors import UserError
from jaxlab.jsonl import read_jsonl
from jaxlab.metric_writer import MetricWriter
from jaxlab.models.decoder import Decoder, with_layer_layout
from jaxlab.models.lora import LoRAConfig, add_lora, trainable
from jaxlab.models.lora import value_and_grad as lora_value_and_grad
from jaxlab.progress import progress as progress_bar
from jaxlab.train import OptimConfig, learning_rate, make_optimizer

__all__ = [
    "SFTDataConfig",
    "SFTConfig",
    "chat_example_tokens",
    "pack_examples",
    "load_chat_jsonl",
    "sft_loss",
    "sft_step",
    "train_sft",
]


@dataclasses.dataclass(frozen=True, kw_only=True)
class SFTDataConfig:
    path: str = ""  # JSONL of {"messages": [...]} conversations
    seq_len: int = 512
    batch_size: int = 8
    packing: bool = True
    seed: int = 0

    def __post_init__(self):
        check(self.seq_len >= 8, "seq_len", f"must be >= 8, got {self.seq_len}")
        check(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")


@register_config("sft")
@dataclasses.dataclass(frozen=True, kw_only=True)
class SFTConfig:
    model: str = "smollm2-135m-instruct"  # a registered name, an HF directory or a .gguf file
    data: SFTDataConfig = dataclasses.field(default_factory=SFTDataConfig)
    train: OptimConfig = dataclasses.field(
        default_factory=lambda: OptimConfig(lr=5e-5, warmup_steps=5, steps=100, grad_clip=1.0)
    )
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    log_every: int = 5
    export: bool = True  # write DIR/model (HF format) at the end
    tensorboard: bool = False
    # rank > 0: train LoRA adapters on the projections (the base weights frozen, no optimizer
    # state for them); the export merges them into the kernels
    lora: LoRAConfig = dataclasses.field(default_factory=LoRAConfig)

    def __post_init__(self):
        check(bool(self.model), "model", "must name a model")
        check(self.log_every >= 1, "log_every", f"must be >= 1, got {self.log_every}")


# -- data --------------------------------------------------------------------------------------


def chat_example_tokens(tokenizer, messages: Sequence[dict]) -> tuple[list[int], list[int]]:
    """``(token ids, loss mask)`` of one conversation: mask 1 on the tokens each assistant turn adds
    to the rendered template (content and end-of-turn), 0 elsewhere. An assistant message may carry
    ``"no_loss": [[a, b], ...]``, character spans of its content whose tokens get mask 0 (text the
    model should read but not learn to write, such as a planted slip).

    The rendering up to turn i (with the generation prompt) must tokenize to a prefix of the
    rendering through turn i, as it does for ChatML-style templates; otherwise a UserError.
    """
    if not messages or not all(isinstance(m, dict) and "role" in m for m in messages):
        raise UserError(
            f"a conversation must be a list of {{role, content}} messages: {messages!r}"
        )
    if not any(m["role"] == "assistant" for m in messages):
        raise UserError("a conversation without an assistant turn has nothing to learn")
    ids: list[int] = []
    mask: list[int] = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = tokenizer.encode(
            tokenizer.apply_chat_template(list(messages[:i]), add_generation_prompt=True),
            add_special_tokens=False,
        )
        through = tokenizer.encode(
            tokenizer.apply_chat_template(list(messages[: i + 1]), add_generation_prompt=False),
            add_special_tokens=False,
        )
        if through[: len(ids)] != ids or through[: len(before)] != before or len(before) < len(ids):
            raise UserError(
                "the chat template does not render conversations as prefixes of each other; "
                "assistant tokens cannot be located"
            )
        mask += [0] * (len(before) - len(ids))
        new = through[len(before) :]
        # the turn's own tokens, through the end-of-turn token (not the newline the template
        # may write after it)
        keep = len(new)
        eos = set(tokenizer.eos_token_ids)
        for k, t in enumerate(new):
            if t in eos:
                keep = k + 1
                break
        turn = [1] * keep + [0] * (len(new) - keep)
        if m.get("no_loss"):
            turn = _mask_spans(tokenizer, new, turn, m["content"], m["no_loss"])
        mask += turn
        ids = through
    return ids, mask


def _mask_spans(tokenizer, new, turn, content, spans):
    """``turn`` with 0 on the tokens of ``new`` (one assistant turn) that overlap a character span
    ``[a, b)`` of the turn's ``content``."""
    from jaxlab.analysis.markers import spans_to_token_mask, token_char_offsets

    offsets = token_char_offsets(tokenizer, new)
    start = tokenizer.decode(list(new)).find(content)
    if start < 0:
        raise UserError("an assistant turn with no_loss spans must render its content verbatim")
    for a, b in spans:
        if not 0 <= a < b <= len(content):
            raise UserError(
                f"no_loss span [{a}, {b}) is outside the content ({len(content)} chars)"
            )
    hit = spans_to_token_mask([(a + start, b + start) for a, b in spans], offsets)
    return [0 if h else t for t, h in zip(turn, hit)]


def pack_examples(
    examples: Sequence[tuple[Sequence[int], Sequence[int]]],
    seq_len: int,
    *,
    pad_id: int,
    packing: bool = True,
) -> dict[str, np.ndarray]:
    """Rows ``{"tokens", "loss_mask", "attention_mask"}`` ``[N, seq_len]`` (int32) from
    ``(ids, mask)`` examples; see the module docstring for the packing rule."""
    rows: list[tuple[list[int], list[int]]] = []
    cur_ids: list[int] = []
    cur_mask: list[int] = []
    for ids, mask in examples:
        ids, mask = list(ids)[:seq_len], list(mask)[:seq_len]
        if len(ids) != len(mask):
            raise ValueError("ids and mask of an example differ in length")
        if not packing or (cur_ids and len(cur_ids) + len(ids) > seq_len):
            if cur_ids:
                rows.append((cur_ids, cur_mask))
            cur_ids, cur_mask = [], []
        cur_ids += ids
        cur_mask += mask
    if cur_ids:
        rows.append((cur_ids, cur_mask))
    n = len(rows)
    tokens = np.full((n, seq_len), pad_id, np.int32)
    loss = np.zeros((n, seq_len), np.int32)
    attn = np.zeros((n, seq_len), np.int32)
    for r, (ids, mask) in enumerate(rows):
        tokens[r, : len(ids)] = ids
        loss[r, : len(ids)] = mask
        attn[r, : len(ids)] = 1
    return {"tokens": tokens, "loss_mask": loss, "attention_mask": attn}


def load_chat_jsonl(path: str | Path) -> list[list[dict]]:
    """The conversations of a JSONL file (``{"messages": [...]}`` per line) or of a parquet file
    with a ``messages`` column (a list of ``{role, content}`` structs per row)."""
    from jaxlab.data.records import file_format, iter_records

    if file_format(path) == "parquet":
        records = iter_records(path)
    else:
        what = 'data file (a JSONL of {"messages": [...]} lines)'
        records = ((f"{path}:{n}", rec) for n, rec in read_jsonl(path, what=what))
    out = []
    for where, rec in records:
        if not isinstance(rec, dict) or not isinstance(rec.get("messages"), list):
            raise UserError(f"{where}: expected an object with a 'messages' list")
        out.append(rec["messages"])
    if not out:
        raise UserError(f"{path}: no conversations")
    return out


# -- loss and step -----------------------------------------------------------------------------


def sft_loss(
    model: Decoder, tokens: jax.Array, loss_mask: jax.Array, attention_mask: jax.Array
) -> jax.Array:
    """Mean next-token cross-entropy over the positions t >= 1 with ``loss_mask[:, t]`` (each
    predicted from the tokens before it). ``tokens``, ``loss_mask``, ``attention_mask``: ``[B, T]``."""
    chex.assert_rank([tokens, loss_mask, attention_mask], 2)
    chex.assert_equal_shape([tokens, loss_mask, attention_mask])
    logits = model(tokens[:, :-1], attention_mask=attention_mask[:, :-1])
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    w = loss_mask[:, 1:].astype(jnp.float32)
    return jnp.sum(nll * w) / jnp.maximum(jnp.sum(w), 1.0)


@nnx.jit(donate_argnums=(0, 1))
def sft_step(model, optimizer, tokens, loss_mask, attention_mask) -> dict[str, jax.Array]:
    """One update of the trainable parameters (the LoRA adapters of a model that has them);
    returns ``{"loss", "grad_norm"}`` (the norm before clipping)."""
    loss, grads = lora_value_and_grad(sft_loss, model, tokens, loss_mask, attention_mask)
    optimizer.update(model, grads)
    return {"loss": loss, "grad_norm": optax.global_norm(grads)}


# -- training ----------------------------------------------------------------------------------


def _load(cfg: SFTConfig):
    from jaxlab.models import from_pretrained

    model, tokenizer = from_pretrained(cfg.model)
    if not isinstance(model, Decoder) or tokenizer is None:
        raise UserError(f"{cfg.model} is not a decoder LM with a tokenizer")
    model = with_layer_layout(model, scan_layers=True)
    return add_lora(model, cfg.lora, rngs=nnx.Rngs(cfg.train.seed)), tokenizer


def train_sft(cfg: SFTConfig, workdir: str | Path, *, progress: bool = True) -> dict[str, float]:
    """Fine-tunes ``cfg.model`` on ``cfg.data.path`` (or resumes); returns the last metrics."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    model, tokenizer = _load(cfg)
    convs = load_chat_jsonl(cfg.data.path)
    examples = [chat_example_tokens(tokenizer, m) for m in convs]
    rows = pack_examples(
        examples, cfg.data.seq_len, pad_id=tokenizer.pad_token_id, packing=cfg.data.packing
    )
    n_rows = len(rows["tokens"])
    if n_rows < cfg.data.batch_size:
        raise UserError(
            f"{n_rows} packed rows are fewer than batch_size={cfg.data.batch_size}; "
            "lower data.batch_size or data.seq_len"
        )
    data = iter(
        grain.MapDataset.range(n_rows)
        .shuffle(seed=cfg.data.seed)
        .repeat()
        .map(lambda i: {k: v[int(i)] for k, v in rows.items()})
        .batch(cfg.data.batch_size, drop_remainder=True)
        .to_iter_dataset()
    )
    optimizer = nnx.Optimizer(model, make_optimizer(cfg.train), wrt=trainable(model))
    metrics: dict[str, float] = {}
    assistant_tokens = int(rows["loss_mask"].sum())
    with Checkpointer.from_config(workdir / "checkpoints", cfg.checkpoint) as ckpt:
        start = ckpt.restore_or(0, model=model, optimizer=optimizer, data_iter=data)
        (workdir / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
        log = MetricWriter(workdir, append=True, tensorboard=cfg.tensorboard, step_key="step")
        bar = progress_bar(
            range(start, cfg.train.steps), initial=start, total=cfg.train.steps, desc="sft",
            enabled=progress,
        )  # fmt: skip
        t0, last = time.perf_counter(), start
        for step in bar:
            batch = next(data)
            out = sft_step(
                model,
                optimizer,
                jnp.asarray(batch["tokens"]),
                jnp.asarray(batch["loss_mask"]),
                jnp.asarray(batch["attention_mask"]),
            )
            if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.train.steps:
                loss, grad_norm = float(out["loss"]), float(out["grad_norm"])  # waits for the step
                elapsed = max(time.perf_counter() - t0, 1e-9)
                metrics = {
                    "step": step + 1,
                    "loss": loss,
                    "grad_norm": grad_norm,
                    "lr": float(learning_rate(cfg.train, step)),
                    "steps_per_s": (step + 1 - last) / elapsed,
                    "rows": n_rows,
                    "assistant_tokens": assistant_tokens,
                }
                t0, last = time.perf_counter(), step + 1
                log.write(metrics)
                bar.set_postfix(loss=f"{metrics['loss']:.4f}")
            ckpt.save(
                step + 1, model=model, optimizer=optimizer, data_iter=data,
                force=step + 1 == cfg.train.steps,
            )  # fmt: skip
        log.close()
    if cfg.export:
        from jaxlab.models import save_pretrained

        save_pretrained(model, tokenizer, workdir / "model", overwrite=True)
    return metrics
