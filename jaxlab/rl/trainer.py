"""The RL trainer: Engine rollouts driven by the scheduling controller, group advantages, policy updates.

    cfg = load_config("rl/tiny_sorted")  # a shipped config by name, or any YAML path
    summary = train_rl(cfg, "runs/rl")

One loop serves both schedulers (``sync`` and SortedRL's ``sorted``): the controller decides which
samples the Engine generates and when an update is ready; the trainer scores finished groups with
the task's verifiable reward, computes advantages and the policy loss (any aggregation mode by
name), updates the policy with optax, and swaps the new weights into the Engine. Samples that the
controller drops as too stale are cancelled in the Engine and regenerated.

Writes ``metrics.jsonl`` (one line per update, through :class:`jaxlab.metric_writer.MetricWriter`:
TensorBoard events too when tensorboardX is installed), ``timeline.json`` and ``timeline.png`` (slot
occupancy and update intervals over wall-clock time) and ``summary.json``. Besides the loss terms and
rewards, each line holds ``lr`` and ``grad_norm`` (before clipping) of the update, ``update_s`` (its
wall time) and ``samples_per_s`` / ``tokens_per_s``: trained samples and trained tokens (prompt +
completion) per second of wall time since the previous line. The optimizer comes from
:mod:`jaxlab.optim`, as in ``jaxlab.train``.

Bubble ratio (measured): idle slot-time over total slot-time, where each Engine step contributes
its duration times the fraction of idle slots, and each policy update its whole duration (all
slots idle while the device trains).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxlab import rl
from jaxlab.checkpoint import CheckpointConfig, Checkpointer
from jaxlab.config import check, check_dtype, register_config
from jaxlab.errors import UserError
from jaxlab.generation import Engine, SamplingParams
from jaxlab.mesh import MeshConfig, make_mesh
from jaxlab.metric_writer import MetricWriter
from jaxlab.models import Decoder, DecoderConfig, from_pretrained
from jaxlab.models.lora import LoRAConfig, add_lora, has_lora, trainable, without_lora
from jaxlab.models.lora import value_and_grad as lora_value_and_grad
from jaxlab.optim import (
    NONFINITE_POLICIES,
    check_finite_step,
    check_optimizer_settings,
    learning_rate_schedule,
    make_optimizer,
    poison_if_nonfinite,
    skipped_updates,
)
from jaxlab.progress import progress as progress_bar
from jaxlab.rl.logprobs import response_logprobs
from jaxlab.rl.plots import plot_occupancy
from jaxlab.rl.scheduling import Controller, SampleRef, SchedulerConfig
from jaxlab.rl.tasks import TASKS, make_task, task_dataset
from jaxlab.sharding import pin, shard_model
from jaxlab.tokenization import bucket_length, char_tokenizer

__all__ = [
    "RLTaskConfig",
    "RLLossConfig",
    "RLGenerationConfig",
    "RLOptimConfig",
    "RLTrainConfig",
    "train_rl",
]


@dataclasses.dataclass(frozen=True, kw_only=True)
class RLTaskConfig:
    name: str = "arithmetic"
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    seed: int = 0
    shuffle_seed: int | None = None  # None: problems in index order

    def __post_init__(self):
        check(
            self.name in TASKS or ":" in self.name,
            "name",
            f"{self.name!r} is not one of {TASKS.names()} nor an import path 'package.module:Class'",
        )
        try:  # the task's own checks of its kwargs, at load time rather than after outputs exist
            make_task(self.name, seed=self.seed, **self.kwargs)
        except TypeError as e:
            check(False, "kwargs", f"not accepted by task {self.name!r}: {e}")
        except ValueError as e:
            check(False, "kwargs", str(e))
        except UserError as e:  # an import path that does not import, a bad task file
            check(False, "name" if ":" in self.name else "kwargs", str(e))


@dataclasses.dataclass(frozen=True, kw_only=True)
class RLLossConfig:
    agg: str = "token_mean"
    alpha: float = 1.0  # delta_l
    max_len: float | None = (
        None  # delta_l / seq_mean_token_sum_norm; default: generation.max_new_tokens
    )
    clip_low: float = 0.2
    clip_high: float = 0.28
    advantage: str = "grpo"
    kl_coef: float = 0.0
    kl_kind: str = "k3"
    tis_cap: float = 2.0

    def __post_init__(self):
        check(
            self.agg in rl.AGGREGATION_MODES,
            "agg",
            f"{self.agg!r} is not one of {rl.AGGREGATION_MODES.names()}",
        )
        check(
            self.advantage in rl.ADVANTAGE_ESTIMATORS,
            "advantage",
            f"{self.advantage!r} is not one of {rl.ADVANTAGE_ESTIMATORS.names()}",
        )
        check(
            self.kl_kind in rl.KL_ESTIMATORS,
            "kl_kind",
            f"{self.kl_kind!r} is not one of {rl.KL_ESTIMATORS.names()}",
        )
        check(0 <= self.alpha <= 1, "alpha", f"must lie in [0, 1], got {self.alpha}")
        check(
            math.isfinite(self.kl_coef) and self.kl_coef >= 0,
            "kl_coef",
            f"must be a finite number >= 0, got {self.kl_coef}",
        )
        for name in ("clip_low", "clip_high"):
            value = getattr(self, name)
            check(math.isfinite(value) and value >= 0, name, f"must be >= 0, got {value}")
        check(
            math.isfinite(self.tis_cap) and self.tis_cap > 0,
            "tis_cap",
            f"must be positive, got {self.tis_cap}",
        )
        check(
            self.max_len is None or (math.isfinite(self.max_len) and self.max_len > 0),
            "max_len",
            f"must be positive or null, got {self.max_len}",
        )


@dataclasses.dataclass(frozen=True, kw_only=True)
class RLGenerationConfig:
    """Rollout settings; the sampling ones are checked by :class:`SamplingParams`."""

    slots: int = 8
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    chat: bool = True

    def __post_init__(self):
        check(self.slots >= 1, "slots", f"must be >= 1, got {self.slots}")
        check(
            math.isfinite(self.temperature) and self.temperature > 0,
            "temperature",
            f"RL samples: must be finite and > 0, got {self.temperature}",
        )
        try:
            self.sampling_params()
        except ValueError as e:
            field = str(e).split(": ", 1)[-1].split(" ", 1)
            check(False, field[0], field[1] if len(field) > 1 else str(e))

    def sampling_params(self) -> SamplingParams:
        """The :class:`SamplingParams` rollouts are drawn with."""
        return SamplingParams(
            max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_p=self.top_p
        )


@dataclasses.dataclass(frozen=True, kw_only=True)
class RLOptimConfig:
    lr: float = 1e-5
    warmup_steps: int = 0  # policy updates of linear warmup; constant lr afterwards
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    grad_clip: float = 1.0
    seed: int = 0
    # a NaN or infinite loss or gradient norm: "stop" the run, or "skip" the update
    on_nonfinite: str = "stop"

    def __post_init__(self):
        check(
            self.on_nonfinite in NONFINITE_POLICIES,
            "on_nonfinite",
            f"{self.on_nonfinite!r} is not one of {list(NONFINITE_POLICIES)}",
        )
        check_optimizer_settings(**self.optimizer_settings())

    def optimizer_settings(self) -> dict:
        """Keyword arguments of :func:`jaxlab.optim.make_optimizer` (no decay: the number of
        updates depends on the scheduler)."""
        return dict(
            lr=self.lr,
            warmup_steps=self.warmup_steps,
            weight_decay=self.weight_decay,
            b1=self.b1,
            b2=self.b2,
            grad_clip=self.grad_clip,
            skip_nonfinite=self.on_nonfinite == "skip",
        )


@register_config("rl_train")
@dataclasses.dataclass(frozen=True, kw_only=True)
class RLTrainConfig:
    model: str = (
        "smollm2-135m-instruct"  # a registered name, HF dir or .gguf, or "tiny" (char-level)
    )
    tiny_model: DecoderConfig = dataclasses.field(
        default_factory=DecoderConfig
    )  # used when model == "tiny"
    task: RLTaskConfig = dataclasses.field(default_factory=RLTaskConfig)
    scheduler: SchedulerConfig = dataclasses.field(default_factory=SchedulerConfig)
    loss: RLLossConfig = dataclasses.field(default_factory=RLLossConfig)
    generation: RLGenerationConfig = dataclasses.field(default_factory=RLGenerationConfig)
    optim: RLOptimConfig = dataclasses.field(default_factory=RLOptimConfig)
    checkpoint: CheckpointConfig = dataclasses.field(
        default_factory=lambda: CheckpointConfig(save_every=4, keep=2)
    )
    # the policy update runs on the mesh: the batch split over data x fsdp, the weights and
    # optimizer state sharded by jaxlab.sharding's rules (fsdp, tensor); generation keeps its own
    # single-device copy of the weights
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    # compute dtype (activations, logits before their float32 cast, rollouts' KV cache) and the
    # weights' / optimizer state's: dtype=bfloat16 with float32 weights is the GPU setting
    dtype: str = "float32"
    param_dtype: str = "float32"
    # rank > 0: train LoRA adapters on the projections; the base weights stay frozen (no
    # optimizer state) and are the KL reference policy without a copy; rollouts and exports use
    # the merged weights
    lora: LoRAConfig = dataclasses.field(default_factory=LoRAConfig)
    tensorboard: bool = (
        True  # also write metrics as TensorBoard events when tensorboardX is installed
    )

    # the update projects the completion positions onto the vocabulary this many at a time
    # (0: all at once), recomputing each chunk's logits in the backward pass: the logits'
    # memory is [rows, logits_chunk, vocab] instead of [rows, max_new_tokens, vocab]
    logits_chunk: int = 0

    def __post_init__(self):
        check_dtype(self.dtype, "dtype")
        check_dtype(self.param_dtype, "param_dtype")
        check(self.logits_chunk >= 0, "logits_chunk", f"must be >= 0, got {self.logits_chunk}")


def load_policy(cfg) -> tuple[Decoder, Any]:
    """``(decoder, tokenizer)`` of an RL config (``model``, ``tiny_model``, ``dtype``,
    ``param_dtype``, ``optim.seed``): a tiny character-level decoder for ``model: tiny``, else a
    pretrained one (a registered name, HF directory or .gguf) in the config's dtypes."""
    dtypes = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
    if cfg.model == "tiny":
        tokenizer = char_tokenizer()
        mcfg = dataclasses.replace(cfg.tiny_model, vocab_size=tokenizer.vocab_size)
        # initialised in one compiled program (not one per parameter initialiser)
        make = lambda: Decoder(mcfg, rngs=nnx.Rngs(cfg.optim.seed), **dtypes)  # noqa: E731
        return nnx.jit(make)(), tokenizer
    model, tokenizer = from_pretrained(cfg.model, **dtypes)
    if not isinstance(model, Decoder) or tokenizer is None:
        raise UserError(f"{cfg.model} is not a decoder LM with a tokenizer")
    return model, tokenizer


@functools.lru_cache(maxsize=8)  # trainers of one config in a process share the compiled update
def _make_update_fn(
    loss_cfg: RLLossConfig,
    temperature: float,
    max_len: float,
    top_p: float = 1.0,
    *,
    window: int,
    chunk: int = 0,
):
    """One policy update. The log-probs are those of the ``window`` (= ``max_new_tokens``)
    completion positions of each row only, projected ``chunk`` positions at a time when
    ``chunk > 0`` (:func:`jaxlab.rl.logprobs.response_logprobs`): never the ``[N, T, V]`` logits
    of the prompts and the padding."""
    kw = dict(window=window, temperature=temperature, top_p=top_p, chunk=chunk)

    @nnx.jit
    def update(model, optimizer, ref_model, tokens, mask, loss_mask, behaviour_logp, advantages):
        def loss_fn(m):
            logp, lmask, behaviour = response_logprobs(
                m, tokens, mask, loss_mask, behaviour_logp, **kw
            )
            loss, metrics = rl.policy_loss(
                logp,
                behaviour,
                advantages,
                lmask,
                clip_low=loss_cfg.clip_low,
                clip_high=loss_cfg.clip_high,
                agg=loss_cfg.agg,
                max_len=max_len,
                alpha=loss_cfg.alpha,
            )
            if loss_cfg.kl_coef > 0:
                ref = without_lora(m) if has_lora(m) else ref_model  # LoRA: the base weights
                ref_logp = jax.lax.stop_gradient(
                    response_logprobs(ref, tokens, mask, loss_mask, **kw)[0]
                )
                kl = rl.kl_penalty(logp, ref_logp, loss_cfg.kl_kind)
                kl_loss = rl.aggregate_loss(
                    kl, lmask, loss_cfg.agg, max_len=max_len, alpha=loss_cfg.alpha
                )
                loss = loss + loss_cfg.kl_coef * kl_loss
                metrics["kl"] = rl.masked_mean(kl, lmask)
            return loss, metrics

        (loss, metrics), grads = lora_value_and_grad(loss_fn, model, has_aux=True)
        grads = poison_if_nonfinite(loss, grads)  # skip_nonfinite then skips the whole update
        optimizer.update(model, grads)
        pin(model, optimizer)  # weights and optimizer state stay in their shardings
        metrics["loss"] = loss
        metrics["grad_norm"] = optax.global_norm(grads)
        return metrics

    return update


class _Timeline:
    def __init__(self):
        self.t0 = time.perf_counter()
        self.steps: list[tuple[float, float, float]] = []  # (start, end, occupancy)
        self.updates: list[tuple[float, float]] = []

    def state_dict(self) -> dict[str, Any]:
        return {"now": self.now(), "steps": self.steps, "updates": self.updates}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> _Timeline:
        """The timeline of a restored run: its clock continues from the saved time, so that the
        summary's wall time and bubble ratio cover every part of the run."""
        timeline = cls()
        timeline.t0 -= float(state["now"])
        timeline.steps = [tuple(map(float, x)) for x in state["steps"]]
        timeline.updates = [tuple(map(float, x)) for x in state["updates"]]
        return timeline

    def now(self) -> float:
        return time.perf_counter() - self.t0

    def bubble_ratio(self, since: float = 0.0) -> float:
        """Idle slot-time / total slot-time, over intervals starting at ``since`` seconds."""
        busy = sum((e - s) * occ for s, e, occ in self.steps if s >= since)
        total = sum(e - s for s, e, _ in self.steps if s >= since) + sum(
            e - s for s, e in self.updates if s >= since
        )
        return 1.0 - busy / total if total else 0.0

    def plot(self, path: Path, title: str) -> None:
        plot_occupancy(self.steps, self.updates, path, title, xlabel="seconds")


class RLTrainer:
    """The training loop's state: policy, optimizer, task, Engine, controller and bookkeeping."""

    def __init__(self, cfg: RLTrainConfig, workdir: str | Path):
        self.cfg = cfg
        self.workdir = Path(workdir)
        if self.workdir.exists() and not self.workdir.is_dir():
            raise UserError(f"{self.workdir}: the workdir exists and is not a directory")
        # nothing is written under workdir until the policy, the task and any checkpoint loaded
        self.model, self.tokenizer = load_policy(cfg)
        self.model = add_lora(self.model, cfg.lora, rngs=nnx.Rngs(cfg.optim.seed))
        self.mesh = make_mesh(cfg.mesh)
        self.batch_sharding = jax.sharding.NamedSharding(
            self.mesh, jax.sharding.PartitionSpec(("data", "fsdp"))
        )
        # Weights and optimizer state live on the mesh from the start, placed as the update keeps
        # them (jaxlab.sharding.pin): inputs placed otherwise would compile the update twice.
        shard_model(self.model, self.mesh)
        # the KL reference: a frozen copy, or with LoRA the base weights under the adapters
        needs_copy = cfg.loss.kl_coef > 0 and not has_lora(self.model)
        self.ref_model = nnx.clone(self.model) if needs_copy else None
        self.task = make_task(cfg.task.name, seed=cfg.task.seed, **cfg.task.kwargs)
        # prompts through grain: group g is record g of the (optionally shuffled) dataset; the
        # controller's next group is the data position, saved with its state
        self.prompts = task_dataset(
            self.task, cfg.scheduler.num_prompts, shuffle_seed=cfg.task.shuffle_seed
        )
        gen = cfg.generation
        self.max_len = cfg.loss.max_len or float(gen.max_new_tokens)
        settings = cfg.optim.optimizer_settings()
        self.lr_at = learning_rate_schedule(
            lr=settings["lr"], warmup_steps=settings["warmup_steps"]
        )
        tx = make_optimizer(**settings)
        self.optimizer = nnx.Optimizer(self.model, tx, wrt=trainable(self.model))
        shard_model(self.optimizer, self.mesh)
        self.update_fn = _make_update_fn(
            cfg.loss,
            gen.temperature,
            self.max_len,
            gen.top_p,
            window=gen.max_new_tokens,
            chunk=cfg.logits_chunk,
        )
        longest_prompt = max(
            len(self.prompt_ids(g)) for g in range(min(cfg.scheduler.num_prompts, 64))
        )
        self.engine = Engine(
            self.model,
            num_slots=gen.slots,
            max_len=2 * longest_prompt + gen.max_new_tokens + 8,
            eos_ids=self.tokenizer.eos_token_ids,
            pad_id=self.tokenizer.pad_token_id,
            params=gen.sampling_params(),
            seed=cfg.optim.seed,
        )
        self.ctrl = Controller(cfg.scheduler)
        self.by_request: dict[int, SampleRef] = {}
        self.request_of: dict[SampleRef, int] = {}
        self.finished: dict[tuple[int, int], Any] = {}
        self.timeline = _Timeline()
        self.rewards_seen: list[float] = []
        self.trained_samples = 0
        self._last_update_end = 0.0  # timeline seconds
        self.checkpointer = Checkpointer.from_config(self.workdir / "checkpoints", cfg.checkpoint)
        self.resumed_from = self._restore()
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))

    # -- checkpoints -----------------------------------------------------------------------------
    def _save(self, force: bool = False) -> None:
        """Saves the whole run state at an update boundary (every ``save_every`` versions): model,
        optimizer, controller, finished samples of open groups, the Engine's in-flight sequences
        (KV caches, tokens, behaviour log-probs, sampling key) and which request is which sample, so
        that a resumed run continues exactly as an uninterrupted one."""
        arrays, engine_meta = self._checkpoint_arrays()
        finished = {
            f"{g},{i}": dataclasses.asdict(c)
            for (g, i), c in self.finished.items()
            if g in self.ctrl.groups and self.ctrl.groups[g][i]["status"] == "finished"
        }
        extra = {
            "controller": self.ctrl.state_dict(),
            "finished": finished,
            "rewards_seen": self.rewards_seen,
            "trained_samples": self.trained_samples,
            "engine": engine_meta,
            "requests": [[rid, *dataclasses.astuple(ref)] for rid, ref in self.by_request.items()],
            "timeline": self.timeline.state_dict(),
            "last_update_end": self._last_update_end,
        }
        self.checkpointer.save(
            self.ctrl.version,
            model=self.model,
            optimizer=self.optimizer,
            extra=extra,
            arrays=arrays,
            force=force,
        )

    def _checkpoint_arrays(self) -> tuple[Any, dict[str, Any]]:
        """``(arrays, engine metadata)`` saved with each checkpoint: the Engine's snapshot
        (subclasses with more array state, e.g. a teacher, add theirs)."""
        return self.engine.snapshot()

    def _restore_arrays(self, arrays: Any, engine_meta: dict[str, Any]) -> None:
        """Puts restored ``arrays`` (as :meth:`_checkpoint_arrays` gave them) back in place."""
        self.engine.restore_snapshot(arrays, engine_meta)

    def _restore(self) -> int | None:
        """Restores the latest checkpoint in ``workdir/checkpoints``, if any; returns its version."""
        if self.checkpointer.latest_step() is None:
            return None
        from jaxlab.generation.engine import Completion

        arrays, _ = self._checkpoint_arrays()  # the target structure
        step, restored = self.checkpointer.restore(
            model=self.model, optimizer=self.optimizer, arrays=arrays
        )
        extra = restored["extra"]
        self.ctrl = Controller.from_state_dict(extra["controller"])
        self.finished = {
            tuple(int(x) for x in key.split(",")): Completion(**value)
            for key, value in extra["finished"].items()
        }
        self.rewards_seen = list(extra["rewards_seen"])
        self.trained_samples = int(extra["trained_samples"])
        if "timeline" in extra:  # checkpoints written before the timeline was saved lack it
            self.timeline = _Timeline.from_state_dict(extra["timeline"])
            self._last_update_end = float(extra["last_update_end"])
        self.engine._set_model(self.model)  # the restored weights, without marking slots stale
        self._restore_arrays(restored["arrays"], extra["engine"])
        self.by_request = {int(r[0]): SampleRef(*map(int, r[1:])) for r in extra["requests"]}
        self.request_of = {ref: rid for rid, ref in self.by_request.items()}
        return step

    def problem(self, group: int):
        return self.task.problem(int(self.prompts[group]["index"]))

    def prompt_ids(self, group: int) -> list[int]:
        text = self.prompts[group]["prompt"]
        if self.cfg.generation.chat:
            return self.tokenizer.encode(
                self.tokenizer.apply_chat_template(text), add_special_tokens=False
            )
        return self.tokenizer.encode(text)

    def run(self, *, progress: bool = True) -> dict[str, Any]:
        """Trains until every prompt's group is trained; returns (and writes) the summary."""
        return self.run_until(None, progress=progress)

    def run_until(self, max_updates: int | None, *, progress: bool = True) -> dict[str, Any]:
        """Trains until done, or stops after ``max_updates`` more updates and saves (a preemption)."""
        cfg = self.cfg
        bar = progress_bar(
            total=cfg.scheduler.num_prompts,
            initial=len(self.ctrl.trained),
            desc=f"rl {cfg.scheduler.scheduler}",
            enabled=progress,
        )
        updates = 0
        log = MetricWriter(
            self.workdir,
            append=self.resumed_from is not None,
            tensorboard=cfg.tensorboard,
            step_key="version",
            keep_until=self.resumed_from,
        )
        with log, self.checkpointer:
            while not self.ctrl.done:
                groups = self.ctrl.ready()
                if not groups:
                    self.rollout_step()
                    continue
                metrics = self.update(groups)
                log.write(metrics)
                bar.update(len(groups))
                bar.set_postfix(
                    reward=f"{metrics['reward_mean']:.3f}", bubble=f"{metrics['bubble_ratio']:.2f}"
                )
                updates += 1
                if max_updates is not None and updates >= max_updates and not self.ctrl.done:
                    self._save(force=True)
                    bar.close()
                    return {"stopped_after_updates": updates, "version": self.ctrl.version}
                self._save(force=self.ctrl.done)
        bar.close()
        return self.write_summary()

    def rollout_step(self) -> None:
        """Starts what the controller asks for, runs one Engine step, reports finished samples."""
        for ref in self.ctrl.start(self.engine.free_slots):
            rid = self.engine.submit(self.prompt_ids(ref.group), self.cfg.generation.max_new_tokens)
            self.by_request[rid], self.request_of[ref] = ref, rid
        if not self.engine.num_active and not self.engine.pending:
            raise RuntimeError("the rollout stalled: nothing to generate and nothing to train")
        t_start = self.timeline.now()
        done = self.engine.step()
        self.timeline.steps.append((t_start, self.timeline.now(), self.engine.occupancy[-1]))
        for c in done:
            ref = self.by_request.pop(c.request_id, None)
            if ref is None:
                continue
            self.request_of.pop(ref, None)
            if self.ctrl.finish(ref, len(c.tokens)):
                self.finished[(ref.group, ref.index)] = c

    def update(self, groups: list[int]) -> dict[str, Any]:
        """Scores ``groups``, runs one policy update, swaps weights, cancels what became stale."""
        cfg, ctrl = self.cfg, self.ctrl
        t_start = self.timeline.now()
        lr = self.lr_at(int(self.optimizer.step[...]))  # the rate this update applies
        metrics = self._policy_update(groups)
        if cfg.optim.on_nonfinite == "stop":  # before the weights reach the Engine or a checkpoint
            check_finite_step(
                ctrl.version + 1, metrics["loss"], metrics["grad_norm"], key="optim.on_nonfinite"
            )
        else:
            metrics["skipped_updates"] = skipped_updates(self.optimizer.opt_state)
        samples = len(groups) * cfg.scheduler.group_size
        self.trained_samples += samples
        for ref in ctrl.update(groups):
            self.finished.pop((ref.group, ref.index), None)
            rid = self.request_of.pop(ref, None)
            if rid is not None:
                self.engine.cancel(rid)
                self.by_request.pop(rid, None)
        self.engine.update_weights(self.model)
        now = self.timeline.now()
        self.timeline.updates.append((t_start, now))
        interval = max(now - self._last_update_end, 1e-9)  # since the previous metrics line
        self._last_update_end = now
        metrics.update(
            version=ctrl.version,
            lr=lr,
            time=now,
            bubble_ratio=self.timeline.bubble_ratio(),
            trained_samples=self.trained_samples,
            dropped=ctrl.dropped,
            update_s=now - t_start,
            samples_per_s=samples / interval,
            tokens_per_s=metrics["batch_tokens"] / interval,
        )
        return metrics

    def _group_advantages(
        self, rewards: list[float], staleness: list[int], num_groups: int
    ) -> np.ndarray:
        """Advantages ``[num_groups * G]`` of the groups' rewards (in group order), after checking
        that no trained token is older than the scheduler allows; the rewards are recorded."""
        cfg = self.cfg
        if self.ctrl.scheduler.bounds_staleness and max(staleness) > cfg.scheduler.max_staleness:
            raise AssertionError(
                f"a trained token is {max(staleness)} versions old (max_staleness "
                f"{cfg.scheduler.max_staleness})"
            )
        self.rewards_seen.extend(rewards)
        reward_arr = np.asarray(rewards, np.float32).reshape(num_groups, -1)
        return np.asarray(
            rl.compute_advantages(jnp.asarray(reward_arr), cfg.loss.advantage)
        ).reshape(-1)

    def _policy_update(self, groups: list[int]) -> dict[str, Any]:
        cfg, tokenizer = self.cfg, self.tokenizer
        g_size = cfg.scheduler.group_size
        rows, rewards, staleness = [], [], []
        for g in groups:
            problem = self.problem(g)
            for i in range(g_size):
                c = self.finished.pop((g, i))
                reward = float(self.task.reward(problem, tokenizer.decode(c.tokens)))
                if not math.isfinite(reward):
                    raise UserError(
                        f"task {cfg.task.name!r} gave reward {reward} to sample {i} of group {g}; "
                        "rewards must be finite"
                    )
                rewards.append(reward)
                staleness.append(self.ctrl.version - min(c.policy_versions))
                if len(c.tokens) > cfg.generation.max_new_tokens:  # the update's window
                    raise ValueError(
                        f"a completion of {len(c.tokens)} tokens exceeds max_new_tokens "
                        f"({cfg.generation.max_new_tokens})"
                    )
                rows.append((self.prompt_ids(g), c))
        adv = self._group_advantages(rewards, staleness, len(groups))

        # right-padded [N, T] sequences; the loss covers completion tokens only. N and T are bucketed
        # (padding rows carry no loss and do not count as sequences), so updates rarely recompile.
        width = bucket_length(max(len(p) + len(c.tokens) for p, c in rows), 1 << 20, granularity=64)
        n = bucket_length(len(rows), 2 * len(rows), granularity=64)
        shards = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
        n = -(-n // shards) * shards  # rows split evenly over the batch axes (data x fsdp)
        adv = np.pad(adv, (0, n - len(rows)))
        tokens = np.full((n, width), tokenizer.pad_token_id, np.int32)
        mask = np.zeros((n, width), np.int32)
        loss_mask = np.zeros((n, width - 1), np.float32)
        behaviour = np.zeros((n, width - 1), np.float32)
        for r, (p, c) in enumerate(rows):
            seq = p + c.tokens
            tokens[r, : len(seq)] = seq
            mask[r, : len(seq)] = 1
            loss_mask[r, len(p) - 1 : len(seq) - 1] = (
                1  # predicting completion token j from position j-1
            )
            behaviour[r, len(p) - 1 : len(seq) - 1] = c.logprobs
        batch = jax.device_put(
            (tokens, mask, loss_mask, behaviour, adv.astype(np.float32)), self.batch_sharding
        )
        with jax.set_mesh(self.mesh):
            metrics = self.update_fn(self.model, self.optimizer, self.ref_model, *batch)
        out = {k: float(v) for k, v in metrics.items()}
        out.update(
            reward_mean=float(np.asarray(rewards, np.float32).mean()),
            reward_max=max(rewards),
            groups=len(groups),
            max_token_staleness=int(max(staleness)),
            mean_length=float(np.mean([len(c.tokens) for _, c in rows])),
            batch_tokens=sum(len(p) + len(c.tokens) for p, c in rows),  # prompt + completion
        )
        return out

    def write_summary(self) -> dict[str, Any]:
        ctrl, timeline, seen = self.ctrl, self.timeline, self.rewards_seen
        quarter = max(len(seen) // 4, 1)
        summary = {
            "scheduler": self.cfg.scheduler.scheduler,
            "bubble_ratio": timeline.bubble_ratio(),
            # the second half of the run, after the first calls compiled the Engine and the update
            "bubble_ratio_second_half": timeline.bubble_ratio(since=timeline.now() / 2),
            "wall_s": timeline.now(),
            "s_per_trained_sample": timeline.now() / max(self.trained_samples, 1),
            "updates": len(ctrl.updates),
            "max_staleness": max((u["staleness"] for u in ctrl.updates), default=0),
            "dropped": ctrl.dropped,
            "reward_first_quarter": float(np.mean(seen[:quarter])),
            "reward_last_quarter": float(np.mean(seen[-quarter:])),
        }
        (self.workdir / "summary.json").write_text(json.dumps(summary, indent=2))
        (self.workdir / "timeline.json").write_text(
            json.dumps({"steps": timeline.steps, "updates": timeline.updates})
        )
        timeline.plot(
            self.workdir / "timeline.png",
            f"{self.cfg.scheduler.scheduler}: bubble ratio {summary['bubble_ratio']:.2f}",
        )
        return summary


def train_rl(cfg: RLTrainConfig, workdir: str | Path, *, progress: bool = True) -> dict[str, Any]:
    """Runs RL on ``cfg.task`` until every prompt's group is trained; returns the summary."""
    return RLTrainer(cfg, workdir).run(progress=progress)
