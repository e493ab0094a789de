"""Next-token LM training: a small, complete trainer (grain data, optax, Orbax, JSONL metrics).

The optimizer comes from :mod:`jaxlab.optim` and the metrics go through
:class:`jaxlab.metric_writer.MetricWriter` (``metrics.jsonl``, TensorBoard when installed), as in
the RL trainer. Each metrics line holds ``step``, ``loss``, ``grad_norm`` (before clipping, of the
last step), ``lr`` (the learning rate of the last step), ``steps_per_s`` and ``tokens_per_s``
(batch tokens B·T per second since the previous line).

It is the reference loop the RL trainer builds on and what ``python -m jaxlab train-lm`` runs.
The built-in data is a synthetic "counting" language (each sequence counts up from a random start,
modulo a random stride), learnable in a few hundred steps on a CPU. ``data.text.files`` trains on
the user's own text (plain text, JSONL, parquet) through :mod:`jaxlab.data.text`: tokenized,
packed with document-boundary attention masks, shuffled, sharded by process, resumable; ``init``
starts from pretrained weights (a registered name, an HF folder or a .gguf file).
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxlab.checkpoint import CheckpointConfig, Checkpointer
from jaxlab.config import check, check_dtype, register_config
from jaxlab.data.text import TextDataConfig, lm_batch, read_documents, text_dataset
from jaxlab.errors import UserError
from jaxlab.mesh import MeshConfig, make_mesh
from jaxlab.metric_writer import MetricWriter
from jaxlab.models import lora
from jaxlab.models.decoder import Decoder, DecoderConfig
from jaxlab.optim import (
    NONFINITE_POLICIES,
    check_finite_step,
    check_optimizer_settings,
    learning_rate_schedule,
    poison_if_nonfinite,
    skipped_updates,
)
from jaxlab.optim import make_optimizer as _make_optimizer
from jaxlab.progress import progress as progress_bar
from jaxlab.sharding import create_sharded, logical_spec, pin, shard_model

__all__ = [
    "DataConfig",
    "OptimConfig",
    "CheckpointConfig",
    "LMTrainConfig",
    "counting_dataset",
    "make_optimizer",
    "learning_rate",
    "train_step",
    "train_step_with_metrics",
    "accumulated_value_and_grad",
    "train_lm",
]


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataConfig:
    seq_len: int = 32
    batch_size: int = 8
    num_examples: int = 4096
    seed: int = 0
    # gradient accumulation: the batch runs as this many equal micro-batches whose gradients are
    # averaged before one update (the same update as the whole batch, with less activation memory)
    micro_batches: int = 1
    # the user's text instead of the counting data (files empty: counting data)
    text: TextDataConfig = dataclasses.field(default_factory=TextDataConfig)

    def __post_init__(self):
        check(self.seq_len >= 2, "seq_len", f"must be >= 2, got {self.seq_len}")
        check(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")
        check(
            isinstance(self.micro_batches, int)
            and self.micro_batches >= 1
            and self.batch_size % self.micro_batches == 0,
            "micro_batches",
            f"must be a positive divisor of batch_size={self.batch_size}, got {self.micro_batches!r}",
        )
        check(
            self.num_examples >= self.batch_size,
            "num_examples",
            f"must be >= batch_size ({self.batch_size}), got {self.num_examples}",
        )


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimConfig:
    lr: float = 3e-3
    warmup_steps: int = 10
    steps: int = 200
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.95
    grad_clip: float = 1.0
    seed: int = 0
    # a NaN or infinite loss or gradient norm: "stop" the run, or "skip" the update
    on_nonfinite: str = "stop"

    def __post_init__(self):
        check(self.steps >= 1, "steps", f"must be >= 1, got {self.steps}")
        check(
            self.on_nonfinite in NONFINITE_POLICIES,
            "on_nonfinite",
            f"{self.on_nonfinite!r} is not one of {list(NONFINITE_POLICIES)}",
        )
        check_optimizer_settings(**self.optimizer_settings())

    def optimizer_settings(self) -> dict:
        """Keyword arguments of :func:`jaxlab.optim.make_optimizer`: warmup, then cosine decay to 0
        at ``steps``."""
        return dict(
            lr=self.lr,
            warmup_steps=self.warmup_steps,
            decay_steps=self.steps,
            weight_decay=self.weight_decay,
            b1=self.b1,
            b2=self.b2,
            grad_clip=self.grad_clip,
            skip_nonfinite=self.on_nonfinite == "skip",
        )


@register_config("lm_train")
@dataclasses.dataclass(frozen=True, kw_only=True)
class LMTrainConfig:
    model: DecoderConfig = dataclasses.field(default_factory=DecoderConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    train: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    # compute dtype (activations, KV cache) and weight / optimizer-state dtype: bfloat16 compute
    # with float32 master weights is mixed precision (the GPU choice)
    dtype: str = "float32"
    param_dtype: str = "float32"
    # start from pretrained weights (registered name, HF folder or .gguf); `model` is then ignored
    init: str | None = None
    log_every: int = 10
    tensorboard: bool = (
        True  # also write metrics as TensorBoard events when tensorboardX is installed
    )

    def __post_init__(self):
        check(self.log_every >= 1, "log_every", f"must be >= 1, got {self.log_every}")
        check_dtype(self.dtype, "dtype")
        check_dtype(self.param_dtype, "param_dtype")
        split = [a for a in ("data", "fsdp") if getattr(self.mesh, a) != -1]
        n = int(np.prod([getattr(self.mesh, a) for a in split]))
        check(
            self.data.batch_size % n == 0,
            "mesh.data",
            f"batch_size={self.data.batch_size} does not split over {n} batch shards "
            "(mesh.data x mesh.fsdp)",
        )


def counting_dataset(cfg: DataConfig, vocab_size: int) -> grain.IterDataset:
    """Batches ``{"tokens": int32 [B, T]}`` of counting sequences, shuffled, repeated forever."""

    def make(index: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([cfg.seed, index])
        start, stride = rng.integers(0, vocab_size), rng.integers(1, 4)
        return {"tokens": ((start + stride * np.arange(cfg.seq_len)) % vocab_size).astype(np.int32)}

    return (
        grain.MapDataset.range(cfg.num_examples)
        .shuffle(seed=cfg.seed)
        .repeat()
        .map(make)
        .batch(cfg.batch_size, drop_remainder=True)
        .to_iter_dataset()
    )


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
    """The optimizer of ``cfg`` (:func:`jaxlab.optim.make_optimizer`)."""
    return _make_optimizer(**cfg.optimizer_settings())


def learning_rate(cfg: OptimConfig, step: int) -> float:
    """The learning rate of update ``step`` (0-based) under ``cfg``."""
    s = cfg.optimizer_settings()
    return learning_rate_schedule(
        lr=s["lr"], warmup_steps=s["warmup_steps"], decay_steps=s["decay_steps"]
    )(step)


def next_token_loss(model: Decoder, tokens: jax.Array) -> jax.Array:
    logits = model(tokens[:, :-1])
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))


def accumulated_value_and_grad(loss_fn, model, tokens: jax.Array, micro_batches: int = 1):
    """``nnx.value_and_grad(loss_fn)(model, tokens)`` computed over ``micro_batches`` equal slices
    of the batch ``tokens [B, ...]`` in a ``lax.scan`` and averaged: for a loss that is a mean
    over equal-sized examples, the full batch's value and gradient with one micro-batch's
    activations in memory. Gradients are of :func:`jaxlab.models.lora.trainable` (the LoRA
    adapters of a model that has them)."""
    if micro_batches == 1:
        return lora.value_and_grad(loss_fn, model, tokens)
    b = tokens.shape[0]
    if b % micro_batches:
        raise ValueError(f"batch {b} does not split into {micro_batches} micro-batches")
    graphdef, params, rest = nnx.split(model, lora.trainable(model), ...)

    def loss_of(params, micro):
        return loss_fn(nnx.merge(graphdef, params, rest), micro)

    micro = tokens.reshape(micro_batches, b // micro_batches, *tokens.shape[1:])

    def add(carry, x):
        value, grads = jax.value_and_grad(loss_of)(params, x)
        return jax.tree.map(jnp.add, carry, (value, grads)), None

    zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
    (total, grads), _ = jax.lax.scan(add, zeros, micro)
    return total / micro_batches, jax.tree.map(lambda g: g / micro_batches, grads)


@nnx.jit(donate_argnums=(0, 1), static_argnames=("micro_batches",))
def train_step_with_metrics(
    model: Decoder, optimizer: nnx.Optimizer, tokens: jax.Array, micro_batches: int = 1
) -> dict[str, jax.Array]:
    """One update on ``tokens`` ``[B, T]`` (over ``micro_batches`` accumulated slices); returns
    ``{"loss", "grad_norm"}`` (the norm before clipping). A non-finite loss makes the gradient
    NaN, so that an optimizer built with ``skip_nonfinite`` skips the update."""
    loss, grads = accumulated_value_and_grad(next_token_loss, model, tokens, micro_batches)
    grads = poison_if_nonfinite(loss, grads)
    optimizer.update(model, grads)
    pin(model, optimizer)  # under a mesh: weights and optimizer state stay where they were
    return {"loss": loss, "grad_norm": optax.global_norm(grads)}


def train_step(model: Decoder, optimizer: nnx.Optimizer, tokens: jax.Array) -> jax.Array:
    """One update on ``tokens`` ``[B, T]``; returns the loss."""
    return train_step_with_metrics(model, optimizer, tokens)["loss"]


def packed_next_token_loss(model: Decoder, packed: jax.Array) -> jax.Array:
    """Mean next-token NLL over the predicted positions of packed rows. ``packed`` int32
    ``[B, 5, T]`` stacks inputs, targets, segment ids, positions and the loss mask
    (:func:`jaxlab.data.text.lm_batch`); attention stays within each document."""
    inputs, targets, seg, pos, mask = (packed[:, i] for i in range(5))
    logits = model(inputs, positions=pos, segment_ids=seg)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    mask = mask.astype(jnp.float32)
    return jnp.sum(nll * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def stack_lm_batch(batch: dict[str, np.ndarray]) -> np.ndarray:
    """The ``[B, 5, T]`` int32 array :func:`packed_next_token_loss` takes."""
    keys = ("inputs", "targets", "segment_ids", "positions", "loss_mask")
    return np.stack([np.asarray(batch[k], np.int32) for k in keys], axis=1)


@nnx.jit(donate_argnums=(0, 1), static_argnames=("micro_batches",))
def text_train_step_with_metrics(
    model: Decoder, optimizer: nnx.Optimizer, packed: jax.Array, micro_batches: int = 1
) -> dict[str, jax.Array]:
    """:func:`train_step_with_metrics` on packed text rows ``[B, 5, T]``. With micro-batches the
    update averages the micro-batches' mean losses (each over its own predicted tokens)."""
    loss, grads = accumulated_value_and_grad(packed_next_token_loss, model, packed, micro_batches)
    grads = poison_if_nonfinite(loss, grads)
    optimizer.update(model, grads)
    pin(model, optimizer)
    return {"loss": loss, "grad_norm": optax.global_norm(grads)}


def _text_tokenizer(cfg: LMTrainConfig, init_tokenizer):
    """The tokenizer of the text data: ``data.text.tokenizer`` (``char`` or a model), else the
    pretrained init's."""
    name = cfg.data.text.tokenizer
    if name == "char":
        from jaxlab.tokenization import char_tokenizer

        return char_tokenizer()
    if name is not None:
        from jaxlab.models import from_pretrained

        return from_pretrained(name)[1]
    if init_tokenizer is None:
        raise UserError(
            "data.text.files needs a tokenizer: set init (pretrained weights and their tokenizer) "
            "or data.text.tokenizer (a model name or folder, or char)"
        )
    return init_tokenizer


def train_lm(cfg: LMTrainConfig, workdir: str | Path, *, progress: bool = True) -> dict[str, float]:
    """Trains (or resumes) a decoder on the counting data; returns the last metrics.

    Writes ``metrics.jsonl``, ``config.json`` and ``checkpoints/`` under ``workdir``. A resumed
    run first trims ``metrics.jsonl`` to the restored step. A NaN or infinite loss or gradient norm
    stops the run before anything more is saved (``train.on_nonfinite=stop``, raising
    :class:`jaxlab.optim.NonFiniteError`) or skips that update (``skip``; the count is logged as
    ``skipped_updates``).
    """
    workdir = Path(workdir)
    if workdir.exists() and not workdir.is_dir():
        raise UserError(f"{workdir}: the workdir exists and is not a directory")
    mesh = make_mesh(cfg.mesh)
    with jax.set_mesh(mesh):
        return _train_lm(cfg, Path(workdir), mesh, progress)


def _train_lm(cfg, workdir, mesh, progress):
    text = bool(cfg.data.text.files)
    shape = (
        (cfg.data.batch_size, 5, cfg.data.seq_len)
        if text
        else (cfg.data.batch_size, cfg.data.seq_len)
    )
    batch_spec = logical_spec(("batch",) + (None,) * (len(shape) - 1), shape, mesh)
    batch_sharding = jax.sharding.NamedSharding(mesh, batch_spec)
    dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    init_tokenizer = None
    if cfg.init:  # pretrained weights, placed in their shardings as they are read
        from jaxlab.models import from_pretrained

        model, init_tokenizer = from_pretrained(
            cfg.init, dtype=dtype, param_dtype=param_dtype, mesh=mesh
        )
        if not isinstance(model, Decoder):
            raise UserError(f"init {cfg.init!r} is a {type(model).__name__}, not a decoder LM")
    else:
        model = create_sharded(  # each device builds only its share of the weights
            lambda: Decoder(
                cfg.model, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(cfg.train.seed)
            ),
            mesh,
        )
    optimizer = shard_model(nnx.Optimizer(model, make_optimizer(cfg.train), wrt=nnx.Param), mesh)
    if text:  # read, checked and tokenizer-matched before anything is written
        tokenizer = _text_tokenizer(cfg, init_tokenizer)
        if tokenizer.vocab_size > model.config.vocab_size:
            raise UserError(
                f"the tokenizer has {tokenizer.vocab_size} tokens, the model's vocab_size is "
                f"{model.config.vocab_size}"
            )
        if cfg.data.seq_len > model.config.max_position_embeddings:
            raise UserError(
                f"data.seq_len={cfg.data.seq_len} exceeds the model's max_position_embeddings "
                f"{model.config.max_position_embeddings}"
            )
        texts = read_documents(
            cfg.data.text.files, field=cfg.data.text.field, documents=cfg.data.text.documents
        )
        n_proc = jax.process_count()
        data = iter(
            text_dataset(
                texts,
                tokenizer,
                seq_len=cfg.data.seq_len,
                batch_size=cfg.data.batch_size // n_proc,
                seed=cfg.data.seed,
            )
        )
    else:
        data = iter(counting_dataset(cfg.data, cfg.model.vocab_size))
    workdir.mkdir(parents=True, exist_ok=True)  # only once the model and the data are good
    metrics: dict[str, float] = {}
    with Checkpointer.from_config(workdir / "checkpoints", cfg.checkpoint) as ckpt:
        start = ckpt.restore_or(0, model=model, optimizer=optimizer, data_iter=data)
        (workdir / "config.json").write_text(
            json.dumps(dataclasses.asdict(cfg), indent=2)
        )  # after a good restore
        log = MetricWriter(
            workdir, append=True, tensorboard=cfg.tensorboard, step_key="step", keep_until=start
        )
        bar = progress_bar(
            range(start, cfg.train.steps),
            initial=start,
            total=cfg.train.steps,
            desc="train-lm",
            enabled=progress,
        )
        tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
        t0, last = time.perf_counter(), start
        stop_on_nonfinite = cfg.train.on_nonfinite == "stop"
        for step in bar:
            if text:
                local = stack_lm_batch(lm_batch(next(data)))
                packed = (
                    jax.device_put(local, batch_sharding)
                    if jax.process_count() == 1
                    else jax.make_array_from_process_local_data(batch_sharding, local)
                )
                out = text_train_step_with_metrics(model, optimizer, packed, cfg.data.micro_batches)
            else:
                tokens = jax.device_put(next(data)["tokens"], batch_sharding)
                out = train_step_with_metrics(model, optimizer, tokens, cfg.data.micro_batches)
            last_step = step + 1 == cfg.train.steps
            saving = ckpt.will_save(step + 1, force=last_step)
            # a NaN update leaves NaN weights for good: checked before every save
            if stop_on_nonfinite and saving:
                check_finite_step(
                    step + 1, float(out["loss"]), float(out["grad_norm"]), key="train.on_nonfinite"
                )
            if (step + 1) % cfg.log_every == 0 or last_step:
                loss, grad_norm = float(out["loss"]), float(out["grad_norm"])  # waits for the step
                if stop_on_nonfinite:
                    check_finite_step(step + 1, loss, grad_norm, key="train.on_nonfinite")
                elapsed = max(time.perf_counter() - t0, 1e-9)
                metrics = {
                    "step": step + 1,
                    "loss": loss,
                    "grad_norm": grad_norm,
                    "lr": learning_rate(cfg.train, step),
                    "steps_per_s": (step + 1 - last) / elapsed,
                    "tokens_per_s": (step + 1 - last) * tokens_per_step / elapsed,
                }
                if not stop_on_nonfinite:
                    metrics["skipped_updates"] = skipped_updates(optimizer.opt_state)
                t0, last = time.perf_counter(), step + 1
                log.write(metrics)
                bar.set_postfix(loss=f"{metrics['loss']:.4f}")
            ckpt.save(
                step + 1,
                model=model,
                optimizer=optimizer,
                data_iter=data,
                force=last_step,
            )
        log.close()
    return metrics
