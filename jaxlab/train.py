"""Next-token LM training: a small, complete trainer (grain data, optax, Orbax, JSONL metrics).

It is the reference loop the RL trainer builds on and what ``python -m jaxlab train-lm`` runs.
The built-in data is a synthetic "counting" language (each sequence counts up from a random start,
modulo a random stride), learnable in a few hundred steps on a CPU.
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
from tqdm.auto import tqdm

from jaxlab.checkpoint import CheckpointConfig, Checkpointer
from jaxlab.config import check, register_config
from jaxlab.mesh import MeshConfig, make_mesh
from jaxlab.models.decoder import Decoder, DecoderConfig

__all__ = [
    "DataConfig",
    "OptimConfig",
    "CheckpointConfig",
    "LMTrainConfig",
    "counting_dataset",
    "make_optimizer",
    "train_step",
    "train_lm",
]


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataConfig:
    seq_len: int = 32
    batch_size: int = 8
    num_examples: int = 4096
    seed: int = 0

    def __post_init__(self):
        check(self.seq_len >= 2, "seq_len", f"must be >= 2, got {self.seq_len}")
        check(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")
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

    def __post_init__(self):
        check(self.lr > 0, "lr", f"must be positive, got {self.lr}")
        check(self.steps >= 1, "steps", f"must be >= 1, got {self.steps}")
        check(0 <= self.warmup_steps, "warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        check(
            0 <= self.b1 < 1 and 0 <= self.b2 < 1,
            "b1/b2",
            f"must lie in [0, 1), got {self.b1}, {self.b2}",
        )
        check(self.grad_clip > 0, "grad_clip", f"must be positive, got {self.grad_clip}")


@register_config("lm_train")
@dataclasses.dataclass(frozen=True, kw_only=True)
class LMTrainConfig:
    model: DecoderConfig = dataclasses.field(default_factory=DecoderConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    train: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    log_every: int = 10

    def __post_init__(self):
        check(self.log_every >= 1, "log_every", f"must be >= 1, got {self.log_every}")
        check(
            self.data.batch_size % self.mesh.data == 0,
            "mesh.data",
            f"batch_size={self.data.batch_size} does not split over {self.mesh.data} replicas",
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
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, cfg.lr, max(cfg.warmup_steps, 1), max(cfg.steps, cfg.warmup_steps + 1)
    )
    return optax.chain(
        optax.clip_by_global_norm(cfg.grad_clip),
        optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay),
    )


def next_token_loss(model: Decoder, tokens: jax.Array) -> jax.Array:
    logits = model(tokens[:, :-1])
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))


@nnx.jit(donate_argnums=(0, 1))
def train_step(model: Decoder, optimizer: nnx.Optimizer, tokens: jax.Array) -> jax.Array:
    loss, grads = nnx.value_and_grad(next_token_loss)(model, tokens)
    optimizer.update(model, grads)
    return loss


def train_lm(cfg: LMTrainConfig, workdir: str | Path, *, progress: bool = True) -> dict[str, float]:
    """Trains (or resumes) a decoder on the counting data; returns the last metrics.

    Writes ``metrics.jsonl``, ``config.json`` and ``checkpoints/`` under ``workdir``.
    """
    mesh = make_mesh(cfg.mesh)
    with jax.set_mesh(mesh):
        return _train_lm(cfg, Path(workdir), mesh, progress)


def _train_lm(cfg, workdir, mesh, progress):
    workdir.mkdir(parents=True, exist_ok=True)
    batch_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    model = Decoder(cfg.model, rngs=nnx.Rngs(cfg.train.seed))
    optimizer = nnx.Optimizer(model, make_optimizer(cfg.train), wrt=nnx.Param)
    data = iter(counting_dataset(cfg.data, cfg.model.vocab_size))
    metrics: dict[str, float] = {}
    with Checkpointer(
        workdir / "checkpoints",
        save_every=cfg.checkpoint.save_every,
        keep=cfg.checkpoint.keep,
        async_save=cfg.checkpoint.async_save,
    ) as ckpt:
        start = ckpt.restore_or(0, model=model, optimizer=optimizer, data_iter=data)
        (workdir / "config.json").write_text(
            json.dumps(dataclasses.asdict(cfg), indent=2)
        )  # after a good restore
        log = (workdir / "metrics.jsonl").open("a")
        bar = tqdm(
            range(start, cfg.train.steps),
            initial=start,
            total=cfg.train.steps,
            desc="train-lm",
            disable=not progress,
        )
        t0 = time.perf_counter()
        for step in bar:
            tokens = jax.device_put(next(data)["tokens"], batch_sharding)
            loss = train_step(model, optimizer, tokens)
            if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.train.steps:
                metrics = {
                    "step": step + 1,
                    "loss": float(loss),
                    "steps_per_s": cfg.log_every / max(time.perf_counter() - t0, 1e-9),
                }
                t0 = time.perf_counter()
                log.write(json.dumps(metrics) + "\n")
                log.flush()
                bar.set_postfix(loss=f"{metrics['loss']:.4f}")
            ckpt.save(
                step + 1,
                model=model,
                optimizer=optimizer,
                data_iter=data,
                force=step + 1 == cfg.train.steps,
            )
        log.close()
    return metrics
