"""Multi-turn RL on text environments: GRPO and EMPO² in one trainer, chosen by ``algo``.

    cfg = load_config("rl/empo2_tiny")
    trainer = MultiTurnTrainer(cfg, "runs/empo2")
    trainer.run()                                   # metrics.jsonl, checkpoints, summary.json
    trainer.evaluate("test", trials=3)              # success after 1..k trials, memory on

One update: pick ``groups`` (task, variation) pairs of the training split, play ``episodes`` (G)
episodes of each in lock step through the :class:`~jaxlab.generation.Engine` (every turn is a
prompt: goal, the history trimmed to a budget, the observation, the valid actions; the response
is one short action line), the environments stepping in worker processes from a thread pool while
the Engine decodes. Every turn is a sample; its reward is the final score of its episode (the
paper's setting) plus, with EMPO², the intrinsic reward of its step; a group for GRPO is all turns
of the G episodes of one pair. Only the model's own tokens carry loss. The loss is the clipped
surrogate against the behaviour log-probs (clip 0.2 / 0.3, dual clip 10: the reference's settings).

EMPO² (``algo: empo2``, :mod:`jaxlab.rl.empo2`, :mod:`jaxlab.rl.memory`) adds, per update, a mode
drawn with probabilities (0.17 off-policy, 0.08 on-policy with tips, 0.75 on-policy): in the tip
modes every turn's prompt starts with the memories retrieved for the current history; in
off-policy mode the update trains on the prompt with the tip span removed (token for token), so
the ratio is π_θ(a | s) / π_behaviour(a | s, tips). After every episode the policy writes tips,
stored per step in the memory of that (task, variation). Responses whose smallest behaviour
log-prob is below -5 are masked. The memory is saved with every checkpoint.

An episode whose environment process crashes is restarted, marked ``crashed`` in the metrics and
left out of the loss (its return is unknown); it is never dropped silently.
"""

from __future__ import annotations

import concurrent.futures
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
from jaxlab.envs import ENVS, EnvCrashed, EnvWorker, make_env
from jaxlab.errors import UserError
from jaxlab.generation import Engine, SamplingParams
from jaxlab.mesh import MeshConfig, make_mesh
from jaxlab.metric_writer import MetricWriter
from jaxlab.models import DecoderConfig
from jaxlab.models.lora import LoRAConfig, add_lora, trainable
from jaxlab.optim import check_finite_step, make_optimizer, poison_if_nonfinite
from jaxlab.rl.empo2 import (
    MODE_PROBS,
    MODES,
    intrinsic_reward,
    low_prob_mask,
    memory_content,
    sample_mode,
    strip_spans,
    tip_block,
    tip_patterns,
    tip_prompt,
)
from jaxlab.rl.logprobs import response_logprobs
from jaxlab.rl.memory import EMBEDDERS, MemoryStore, make_embedder
from jaxlab.rl.trainer import RLOptimConfig, load_policy
from jaxlab.sharding import pin, shard_model
from jaxlab.tokenization import bucket_length

__all__ = [
    "MultiTurnEnvConfig",
    "EMPO2Config",
    "MultiTurnConfig",
    "MultiTurnTrainer",
    "ALGOS",
    "build_batch",
    "pack_rows",
    "parse_action",
    "training_prompt",
    "group_advantages",
]

ALGOS = ("grpo", "empo2")


@dataclasses.dataclass(frozen=True, kw_only=True)
class MultiTurnEnvConfig:
    name: str = "tiny"
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    tasks: tuple[str, ...] = ()  # training tasks; empty: all of the environment's
    eval_tasks: tuple[str, ...] = ()  # held-out tasks for evaluate(); empty: the training tasks
    split: str = "train"
    # games per training task: the first N variations of the split (0: all of them); few games
    # are revisited often, so their memories get used
    train_variations: int = 0
    workers: str = "process"  # "process": EnvWorker per episode; "inline": in this process
    show_valid_actions: bool = True
    # the assistant's reply starts with this (small models then name an action instead of
    # retelling the observation); the action is the earliest valid action the reply names
    action_prefix: str = "Action:"

    def __post_init__(self):
        check(self.name in ENVS, "name", f"{self.name!r} is not one of {ENVS.names()}")
        check(self.split in ("train", "dev", "test"), "split", f"unknown split {self.split!r}")
        check(
            self.train_variations >= 0,
            "train_variations",
            f"must be >= 0 (0: all), got {self.train_variations}",
        )
        check(
            self.workers in ("process", "inline"),
            "workers",
            f"{self.workers!r} is not 'process' or 'inline'",
        )


@dataclasses.dataclass(frozen=True, kw_only=True)
class EMPO2Config:
    mode_probs: dict[str, float] = dataclasses.field(default_factory=lambda: dict(MODE_PROBS))
    memory_capacity: int = 1000
    threshold: float = 0.5
    top_k: int = 10
    embedder: str = "minilm"
    mask_threshold: float = -5.0
    intrinsic_coef: float = 1.0  # 0 turns the novelty reward off
    tip_max_tokens: int = 128

    def __post_init__(self):
        for name in self.mode_probs:
            check(name in MODES, "mode_probs", f"{name!r} is not one of {MODES.names()}")
        total = sum(self.mode_probs.values())
        check(
            all(p >= 0 for p in self.mode_probs.values()) and abs(total - 1) < 1e-6,
            "mode_probs",
            f"must be >= 0 and sum to 1, got {self.mode_probs}",
        )
        check(
            self.embedder in EMBEDDERS,
            "embedder",
            f"{self.embedder!r} is not one of {EMBEDDERS.names()}",
        )
        check(self.memory_capacity >= 1 and self.top_k >= 1, "top_k", "capacity and top_k >= 1")
        check(
            -1 <= self.threshold < 1,
            "threshold",
            f"cosine threshold in [-1, 1), got {self.threshold}",
        )
        check(
            self.intrinsic_coef >= 0, "intrinsic_coef", f"must be >= 0, got {self.intrinsic_coef}"
        )
        check(
            self.tip_max_tokens >= 1, "tip_max_tokens", f"must be >= 1, got {self.tip_max_tokens}"
        )


@register_config("rl_multiturn")
@dataclasses.dataclass(frozen=True, kw_only=True)
class MultiTurnConfig:
    algo: str = "empo2"
    model: str = "smollm2-135m-instruct"  # a registered name, HF dir or .gguf, or "tiny"
    tiny_model: DecoderConfig = dataclasses.field(default_factory=DecoderConfig)
    env: MultiTurnEnvConfig = dataclasses.field(default_factory=MultiTurnEnvConfig)
    empo2: EMPO2Config = dataclasses.field(default_factory=EMPO2Config)
    updates: int = 20
    groups: int = 1  # (task, variation) pairs per update
    episodes: int = 4  # G: episodes per pair
    max_turns: int = 8
    history_turns: int = 4  # past (action, observation) pairs kept in the prompt
    max_prompt_tokens: int = 768
    max_new_tokens: int = 16
    temperature: float = 1.0
    chat: bool = True
    clip_low: float = 0.2
    clip_high: float = 0.3
    dual_clip: float | None = 10.0
    agg: str = "token_mean"
    micro_batch: int = 4  # rows per gradient micro-batch (the update is one optimizer step)
    optim: RLOptimConfig = dataclasses.field(default_factory=RLOptimConfig)
    checkpoint: CheckpointConfig = dataclasses.field(
        default_factory=lambda: CheckpointConfig(save_every=5, keep=2)
    )
    seed: int = 0
    # as in rl_train: compute and weight dtypes, and LoRA adapters (rank > 0) trained in place of
    # the full weights; rollouts use the merged weights
    dtype: str = "float32"
    param_dtype: str = "float32"
    lora: LoRAConfig = dataclasses.field(default_factory=LoRAConfig)
    # the policy update on a mesh, as in rl_train: rows split over data x fsdp (micro_batch must
    # be a multiple of data * fsdp), weights and optimizer state by jaxlab.sharding's rules;
    # rollouts decode a single-device copy of the weights
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)

    def __post_init__(self):
        check_dtype(self.dtype, "dtype")
        check_dtype(self.param_dtype, "param_dtype")
        check(self.algo in ALGOS, "algo", f"{self.algo!r} is not one of {list(ALGOS)}")
        check(
            self.agg in rl.AGGREGATION_MODES,
            "agg",
            f"{self.agg!r} is not one of {rl.AGGREGATION_MODES.names()}",
        )
        for name in (
            "updates", "groups", "max_turns", "max_prompt_tokens", "max_new_tokens", "micro_batch"
        ):  # fmt: skip
            check(getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")
        check(
            self.episodes >= 2,
            "episodes",
            f"GRPO needs >= 2 episodes per group, got {self.episodes}",
        )
        check(self.history_turns >= 0, "history_turns", f"must be >= 0, got {self.history_turns}")
        check(
            math.isfinite(self.temperature) and self.temperature > 0,
            "temperature",
            f"must be finite and > 0, got {self.temperature}",
        )
        check(
            self.dual_clip is None or self.dual_clip > 1,
            "dual_clip",
            f"must be > 1, got {self.dual_clip}",
        )


@dataclasses.dataclass
class Turn:
    prompt: list[int]  # the prompt the action was sampled with (tips included)
    plain_prompt: list[int]  # the same prompt without tips
    tokens: list[int]
    logprobs: list[float]  # behaviour log-probs, under the prompt above
    action: str
    observation: str  # what the action was taken in
    key_text: str  # the history the memory is keyed by
    intrinsic: float
    had_tips: bool


@dataclasses.dataclass
class Episode:
    task: str
    variation: int
    group: int
    goal: str = ""
    observation: str = ""
    turns: list[Turn] = dataclasses.field(default_factory=list)
    history: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (action, obs)
    score: float = 0.0
    won: bool = False
    done: bool = False
    crashed: bool = False

    @property
    def memory_key(self) -> str:
        return f"{self.task}/{self.variation}"


@functools.lru_cache(maxsize=8)
def _make_update_fn(clip_low, clip_high, dual_clip, agg, temperature, max_len, micro_batch, window):
    """One optimizer step over the batch, its gradient summed over micro-batches of
    ``micro_batch`` rows in a ``lax.scan`` with the aggregation's normaliser taken over the whole
    batch: the full batch's gradient with one micro-batch's activations in memory, and logits at
    the ``window`` response positions of a row only
    (:func:`jaxlab.rl.logprobs.response_logprobs`). A micro-batch with no response token of
    non-zero advantage contributes exactly nothing and is not computed (in a sparse-reward run
    most groups have equal rewards, hence zero advantages)."""

    @nnx.jit
    def update(model, optimizer, tokens, mask, loss_mask, behaviour_logp, advantages):
        norm = rl.loss_normalizer(loss_mask, agg, max_len=max_len)
        # the trained weights: all parameters, or only the LoRA adapters
        graphdef, params, rest = nnx.split(model, trainable(model), ...)

        def loss_of(params, micro):
            m = nnx.merge(graphdef, params, rest)
            tok, msk, lmask, beh, adv = micro
            logp, lmask, beh = response_logprobs(
                m, tok, msk, lmask, beh, window=window, temperature=temperature
            )
            return rl.policy_loss(
                logp, beh, adv, lmask, clip_low=clip_low, clip_high=clip_high,
                dual_clip=dual_clip, agg=agg, max_len=max_len, normalizer=norm,
            )  # fmt: skip

        k = tokens.shape[0] // micro_batch
        # micro-batch i holds rows i, i+k, i+2k, ...: with the rows split over the mesh's batch
        # axes in contiguous blocks, every micro-batch spans all devices
        split = lambda x: jnp.swapaxes(x.reshape(micro_batch, k, *x.shape[1:]), 0, 1)  # noqa: E731
        micro = tuple(map(split, (tokens, mask, loss_mask, behaviour_logp, advantages)))

        grad_of = jax.value_and_grad(loss_of, has_aux=True)
        first = jax.tree.map(lambda x: x[0], micro)
        nothing = jax.tree.map(
            lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(grad_of, params, first)
        )

        def add(carry, x):
            _, _, lmask, _, adv = x
            # the loss is proportional to the advantages: a micro-batch whose response tokens all
            # have advantage 0 (a group of equal rewards, padding rows) adds exactly 0 to the loss
            # and the gradient, so its forward and backward are skipped
            active = jnp.any((lmask > 0) & (adv[:, None] != 0))
            (value, metrics), grads = jax.lax.cond(
                active, lambda x: grad_of(params, x), lambda x: nothing, x
            )
            loss, g = carry
            return (loss + value, jax.tree.map(jnp.add, g, grads)), (metrics, active)

        zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
        (loss, grads), (per_micro, used) = jax.lax.scan(add, zeros, micro)
        grads = poison_if_nonfinite(loss, grads)
        optimizer.update(model, grads)
        pin(model, optimizer)  # weights and optimizer state stay in their shardings
        # the loss's metrics are over the micro-batches trained above; NaN when none was
        weight = used / jnp.maximum(jnp.sum(used), 1)
        metrics = {}
        for name, v in per_micro.items():
            if name == "ratio_max":
                value = jnp.max(jnp.where(used, v, -jnp.inf))
            elif name == "ratio_min":
                value = jnp.min(jnp.where(used, v, jnp.inf))
            else:
                value = jnp.sum(weight * v)
            metrics[name] = jnp.where(jnp.any(used), value, jnp.nan)
        metrics["trained_micro_batches"] = jnp.sum(used)
        metrics["loss"] = loss
        metrics["grad_norm"] = optax.global_norm(grads)
        return metrics

    return update


_low_prob_mask = jax.jit(low_prob_mask, static_argnames="threshold")
_grpo_advantages = jax.jit(rl.grpo_advantages)


def group_advantages(rewards: list[np.ndarray]) -> list[np.ndarray]:
    """GRPO advantages per group, a group being all turns of its G episodes: ``[N_g]`` each.

    The group mean is taken out in float64 first (GRPO is shift-invariant): rewards such as
    ``0.1 + 0.1 / (count + 1)`` are not exact in float32, and a group of equal rewards would
    otherwise get a mean that misses them by an ulp, which the division by a near-zero standard
    deviation blows up into equal, non-zero advantages."""
    out = []
    for r in rewards:
        centred = np.asarray(r, np.float64) - np.mean(r, dtype=np.float64)
        out.append(np.asarray(_grpo_advantages(jnp.asarray(centred, jnp.float32)[None]))[0])
    return out


def parse_action(text: str, valid: list[str] | None) -> str:
    """The action a reply names: the valid action that occurs earliest in it (the longest one at
    the same position), else its first line (``look`` when empty)."""
    low = text.lower()
    best = None
    for a in valid or ():
        at = low.find(a.lower())
        if at >= 0 and (best is None or (at, -len(a)) < (best[0], -len(best[1]))):
            best = (at, a)
    if best is not None:
        return best[1]
    return text.strip().split("\n")[0].strip()[:100] or "look"


def build_batch(rows, pad_id: int, multiple: int = 1, shape: tuple[int, int] | None = None):
    """Right-padded training arrays from ``(train prompt, Turn)`` rows: ``tokens, mask [N, W]``,
    ``loss_mask, behaviour [N, W-1]`` (position j predicts token j+1; the loss covers the
    response only, its behaviour log-probs are the turn's own: those of the prompt it was sampled
    with, whatever prompt it is trained on). N and W are bucketed so that updates rarely recompile."""
    width = bucket_length(max(len(p) + len(t.tokens) for p, t in rows), 1 << 20, granularity=64)
    n = bucket_length(len(rows), 1 << 20, granularity=16)
    if shape is not None:  # a fixed shape: one compilation for the whole run
        n, width = max(n, shape[0]), max(width, shape[1])
    n = -(-n // multiple) * multiple
    tokens = np.full((n, width), pad_id, np.int32)
    mask = np.zeros((n, width), np.int32)
    loss_mask = np.zeros((n, width - 1), np.float32)
    behaviour = np.zeros((n, width - 1), np.float32)
    for r, (p, t) in enumerate(rows):
        seq = list(p) + list(t.tokens)
        tokens[r, : len(seq)] = seq
        mask[r, : len(seq)] = 1
        loss_mask[r, len(p) - 1 : len(seq) - 1] = 1
        behaviour[r, len(p) - 1 : len(seq) - 1] = t.logprobs
    return tokens, mask, loss_mask, behaviour


def pack_rows(live: np.ndarray, micro_batch: int) -> np.ndarray:
    """A row order (``new = old[order]``) that puts the ``live`` rows ``[N]`` (bool) into the
    first micro-batches of the update's layout, where micro-batch j holds rows j, j + k, j + 2k,
    ... (k = N / micro_batch): the update skips micro-batches without a live row, and the loss,
    a sum over rows, does not depend on their order."""
    n = live.shape[0]
    if n % micro_batch:
        raise ValueError(f"{n} rows are not a multiple of micro_batch {micro_batch}")
    k = n // micro_batch
    ranked = np.argsort(~live, kind="stable")  # live rows first
    r = np.arange(n)
    order = np.empty(n, np.int64)
    order[(r % micro_batch) * k + r // micro_batch] = ranked
    return order


def training_prompt(turn: Turn, mode: str, tip_start, tip_end) -> list[int]:
    """The prompt a turn is trained on: as sampled, except in a mode that rolls out with tips and
    trains without them (off-policy), where the tip span is removed token for token."""
    _, train_tips = MODES.get(mode)
    if train_tips or not turn.had_tips:
        return turn.prompt
    prompt = strip_spans(turn.prompt, tip_start, tip_end)
    if prompt != turn.plain_prompt:
        raise AssertionError("tip stripping did not give the tip-free prompt")
    return prompt


class MultiTurnTrainer:
    """Policy, optimizer, Engine, environments, memory and bookkeeping of one multi-turn run."""

    def __init__(self, cfg: MultiTurnConfig, workdir: str | Path):
        self.cfg = cfg
        self.workdir = Path(workdir)
        self.model, self.tokenizer = load_policy(cfg)
        self.model = add_lora(self.model, cfg.lora, rngs=nnx.Rngs(cfg.optim.seed))
        self.mesh = make_mesh(cfg.mesh)
        shards = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
        if cfg.micro_batch % shards:
            raise UserError(
                f"micro_batch {cfg.micro_batch} must be a multiple of mesh data x fsdp ({shards})"
            )
        self.batch_sharding = jax.sharding.NamedSharding(
            self.mesh, jax.sharding.PartitionSpec(("data", "fsdp"))
        )
        shard_model(self.model, self.mesh)  # placed as the update keeps them: one compilation
        self.optimizer = nnx.Optimizer(
            self.model, make_optimizer(**cfg.optim.optimizer_settings()), wrt=trainable(self.model)
        )
        shard_model(self.optimizer, self.mesh)
        self.update_fn = _make_update_fn(
            cfg.clip_low, cfg.clip_high, cfg.dual_clip, cfg.agg, cfg.temperature,
            float(cfg.max_new_tokens), cfg.micro_batch, cfg.max_new_tokens,
        )  # fmt: skip
        self.empo2 = cfg.algo == "empo2"
        # every update pads to the largest batch a run can make: one compilation of the update
        self.batch_shape = (
            cfg.groups * cfg.episodes * cfg.max_turns,
            -(-(cfg.max_prompt_tokens + cfg.max_new_tokens) // 64) * 64,
        )
        longest = cfg.max_prompt_tokens + max(cfg.max_new_tokens, cfg.empo2.tip_max_tokens)
        n_slots = cfg.groups * cfg.episodes
        self.engine = Engine(
            self.model,
            num_slots=n_slots,
            max_len=longest + 8,
            tokenizer=self.tokenizer,
            params=SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature),
            seed=cfg.seed,
        )
        # environments: one per episode slot, each in its own process unless inline
        env_cfg = cfg.env
        self.envs = [
            EnvWorker(env_cfg.name, env_cfg.kwargs)
            if env_cfg.workers == "process"
            else make_env(env_cfg.name, **env_cfg.kwargs)
            for _ in range(n_slots)
        ]
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=n_slots)
        tasks = list(env_cfg.tasks) or self.envs[0].tasks()
        keep = env_cfg.train_variations or None
        self.train_pairs = [
            (t, v) for t in tasks for v in self.envs[0].variations(t, env_cfg.split)[:keep]
        ]
        if not self.train_pairs:
            raise UserError(f"environment {env_cfg.name!r} has no {env_cfg.split} variations")
        self.eval_tasks = list(env_cfg.eval_tasks) or tasks
        self.memory = MemoryStore(cfg.empo2.memory_capacity, cfg.empo2.threshold, cfg.empo2.top_k)
        self.embed = make_embedder(cfg.empo2.embedder) if self.empo2 else None
        enc = lambda text: self.tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
        self._encode = enc
        self.tip_start, self.tip_end = tip_patterns(enc)
        self.rng = np.random.default_rng(cfg.seed)
        self.update_index = 0
        self.totals = {"env_steps": 0, "sampled_tokens": 0, "episodes": 0, "crashed": 0}
        self.checkpointer = Checkpointer.from_config(self.workdir / "checkpoints", cfg.checkpoint)
        self.resumed_from = self._restore()
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))

    # -- checkpoints -----------------------------------------------------------------------------
    def _save(self, force: bool = False) -> None:
        extra = {
            "update": self.update_index,
            "memory": self.memory.state_dict(),
            "rng": self.rng.bit_generator.state,
            "totals": self.totals,
        }
        self.checkpointer.save(
            self.update_index, model=self.model, optimizer=self.optimizer, extra=extra, force=force
        )

    def _restore(self) -> int | None:
        if self.checkpointer.latest_step() is None:
            return None
        step, restored = self.checkpointer.restore(model=self.model, optimizer=self.optimizer)
        extra = restored["extra"]
        self.update_index = int(extra["update"])
        self.memory = MemoryStore.from_state_dict(extra["memory"])
        self.rng.bit_generator.state = extra["rng"]
        self.totals = dict(extra["totals"])
        self.engine.update_weights(self.model)
        return step

    def close(self) -> None:
        self.checkpointer.close()
        self.pool.shutdown()
        for env in self.envs:
            env.close()

    # -- prompts ---------------------------------------------------------------------------------
    def _render(self, text: str, prefix: str = "") -> list[int]:
        if self.cfg.chat:
            text = self.tokenizer.apply_chat_template(text)
        return self._encode(text + prefix)

    def _turn_text(self, ep: Episode, valid: list[str] | None, history_turns: int) -> str:
        lines = [f"Goal: {ep.goal}"]
        past = ep.history[-history_turns:] if history_turns else []
        if past:
            lines.append("Your last actions and what followed:")
            lines += [f"> {a}\n{o}" for a, o in past]
        lines.append(f"Now: {ep.observation}")
        if valid and self.cfg.env.show_valid_actions:
            lines.append(f"Valid actions: {', '.join(valid)}")
        lines.append("Reply with one action only.")
        return "\n".join(lines)

    def _prompt(self, ep: Episode, valid, tips: str) -> tuple[list[int], list[int], str]:
        """(prompt with tips, prompt without, history text), the history cut to fit the budget."""
        for h in range(self.cfg.history_turns, -1, -1):
            body = self._turn_text(ep, valid, h)
            prefix = self.cfg.env.action_prefix
            plain = self._render(body, prefix)
            full = self._render(tips + body, prefix) if tips else plain
            if len(full) <= self.cfg.max_prompt_tokens:
                return full, plain, body
        if len(plain) <= self.cfg.max_prompt_tokens:  # the tips alone are too long: drop them
            return plain, plain, body
        raise UserError(
            f"a prompt of {len(plain)} tokens without history exceeds max_prompt_tokens "
            f"({self.cfg.max_prompt_tokens}); raise it or shorten the observations"
        )

    # -- rollouts --------------------------------------------------------------------------------
    def _env_call(self, i: int, method: str, *args):
        return getattr(self.envs[i], method)(*args)

    def play(self, pairs: list[tuple[str, int]], *, use_tips: bool, episodes: int) -> list[Episode]:
        """Plays ``episodes`` episodes of every (task, variation) pair in lock step."""
        cfg = self.cfg
        eps = [Episode(t, v, g) for g, (t, v) in enumerate(pairs) for _ in range(episodes)]
        if len(eps) > len(self.envs):
            raise ValueError(f"{len(eps)} episodes at once need as many environments")
        resets = [
            self.pool.submit(self._env_call, i, "reset", e.task, e.variation, 0)
            for i, e in enumerate(eps)
        ]
        for e, fut in zip(eps, resets):
            first = fut.result()
            e.goal, e.observation = first.goal, first.observation
        for _ in range(cfg.max_turns):
            live = [i for i, e in enumerate(eps) if not e.done]
            if not live:
                break
            valid = (
                [self.pool.submit(self._env_call, i, "valid_actions") for i in live]
                if cfg.env.show_valid_actions
                else [None] * len(live)
            )
            valid = [v.result() if v is not None else None for v in valid]
            counts, contents = [0] * len(live), [[] for _ in live]
            # the memory's key: the history (goal, past turns, observation) without action lists
            key_texts = [self._turn_text(eps[i], None, cfg.history_turns) for i in live]
            if self.empo2:  # retrieval for the novelty reward, and for tips in the tip modes
                keys = self.embed(key_texts)
                for j, i in enumerate(live):
                    counts[j], contents[j] = self.memory.retrieve(eps[i].memory_key, keys[j])
            requests = {}
            for j, i in enumerate(live):
                tips = tip_block(contents[j]) if use_tips else ""
                full, plain, body = self._prompt(eps[i], valid[j], tips)
                rid = self.engine.submit(
                    full,
                    SamplingParams(
                        max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, stop=("\n",)
                    ),
                )
                requests[rid] = (i, full, plain, key_texts[j], counts[j])
            steps = {}
            while requests.keys() - steps.keys():
                for c in self.engine.step():  # env steps run in the pool while decoding goes on
                    i, full, plain, key_text, count = requests[c.request_id]
                    action = parse_action(c.text or "", valid[live.index(i)])
                    eps[i].turns.append(
                        Turn(full, plain, list(c.tokens), list(c.logprobs), action,
                             eps[i].observation, key_text, float(intrinsic_reward(count)),
                             full is not plain)
                    )  # fmt: skip
                    self.totals["sampled_tokens"] += len(c.tokens)
                    steps[c.request_id] = (i, self.pool.submit(self._env_call, i, "step", action))
            for i, fut in steps.values():
                e = eps[i]
                try:
                    out = fut.result()
                except EnvCrashed:
                    e.crashed, e.done = True, True
                    continue
                self.totals["env_steps"] += 1
                e.history.append((e.turns[-1].action, out.observation))
                e.observation, e.score = out.observation, float(out.info.get("score", 0.0))
                e.won, e.done = bool(out.info.get("won", False)), out.done
        self.totals["episodes"] += len(eps)
        self.totals["crashed"] += sum(e.crashed for e in eps)
        return eps

    def write_tips(self, eps: list[Episode]) -> int:
        """The policy's tips after each episode, stored per step; returns entries added."""
        todo = [e for e in eps if e.turns and not e.crashed]
        if not todo:
            return 0
        params = SamplingParams(
            max_new_tokens=self.cfg.empo2.tip_max_tokens, temperature=self.cfg.temperature
        )
        ids = {}
        for k, e in enumerate(todo):
            traj = [(t.observation, t.action) for t in e.turns]
            while True:  # the oldest steps go first when the trajectory is too long
                prompt = self._render(tip_prompt(e.goal, traj, e.score))
                if len(prompt) <= self.cfg.max_prompt_tokens or len(traj) == 1:
                    break
                traj = traj[1:]
            ids[self.engine.submit(prompt[-self.cfg.max_prompt_tokens :], params)] = k
        tips = {}
        while len(tips) < len(ids):
            for c in self.engine.step():
                tips[ids[c.request_id]] = (c.text or "").strip().replace("\n", " ")
                self.totals["sampled_tokens"] += len(c.tokens)
        added = 0
        for k, e in enumerate(todo):
            keys = self.embed([t.key_text for t in e.turns])
            for t, key in zip(e.turns, keys):
                added += self.memory.add(
                    e.memory_key, key, memory_content(tips[k], t.action, e.score), e.score
                )
        return added

    # -- updates ---------------------------------------------------------------------------------
    def update(self) -> dict[str, Any]:
        cfg = self.cfg
        t0 = time.perf_counter()
        mode = sample_mode(self.rng, cfg.empo2.mode_probs) if self.empo2 else "on_policy"
        rollout_tips, _ = MODES.get(mode)
        picks = self.rng.choice(len(self.train_pairs), size=cfg.groups, replace=False)
        pairs = [self.train_pairs[int(p)] for p in picks]
        eps = self.play(pairs, use_tips=rollout_tips, episodes=cfg.episodes)
        added = self.write_tips(eps) if self.empo2 else 0
        t_rollout = time.perf_counter() - t0

        # samples: every turn of every episode that did not crash
        rows, rewards = [], []
        for g in range(len(pairs)):
            group = [e for e in eps if e.group == g and not e.crashed]
            r = []
            for e in group:
                for t in e.turns:
                    bonus = cfg.empo2.intrinsic_coef * t.intrinsic if self.empo2 else 0.0
                    r.append(e.score + bonus)
                    rows.append((training_prompt(t, mode, self.tip_start, self.tip_end), t))
            rewards.append(np.asarray(r, np.float32))
        adv = np.concatenate([a for a in group_advantages(rewards) if a.size] or [np.zeros(0)])
        metrics = self._train(rows, adv) if rows else {"loss": 0.0, "grad_norm": 0.0}
        self.engine.update_weights(self.model)
        self.update_index += 1
        done = [e for e in eps if not e.crashed]
        # the novelty bonus moves an advantage only where it differs within a group
        novelty = [
            [t.intrinsic for e in eps if e.group == g for t in e.turns] for g in range(len(pairs))
        ]
        bonus_std = [np.std(b) if b and np.ptp(b) > 0 else 0.0 for b in novelty]  # 0: all equal
        metrics.update(
            update=self.update_index,
            mode=mode,
            games=" ".join(f"{t}/{v}" for t, v in pairs),
            success=float(np.mean([e.won for e in done])) if done else 0.0,
            score=float(np.mean([e.score for e in done])) if done else 0.0,
            turns=len(rows),
            crashed_episodes=sum(e.crashed for e in eps),
            memory_added=added,
            memory_size=len(self.memory),
            tip_turns=sum(t.had_tips for e in eps for t in e.turns),
            intrinsic_mean=float(np.mean([t.intrinsic for e in eps for t in e.turns] or [0.0])),
            intrinsic_group_std=float(np.mean(bonus_std)),
            rollout_s=t_rollout,
            update_s=time.perf_counter() - t0 - t_rollout,
            **self.totals,
        )
        return metrics

    def _train(self, rows, adv) -> dict[str, Any]:
        cfg = self.cfg
        tokens, mask, loss_mask, behaviour = build_batch(
            rows, self.tokenizer.pad_token_id, cfg.micro_batch, self.batch_shape
        )
        n = tokens.shape[0]
        masked = 0
        if self.empo2:  # whole responses with a very unlikely behaviour token leave the loss
            keep = np.asarray(
                _low_prob_mask(
                    jnp.asarray(behaviour), jnp.asarray(loss_mask), cfg.empo2.mask_threshold
                )
            )
            masked = int(len(rows) - keep[: len(rows)].sum())
            loss_mask *= keep[:, None]
        adv_full = np.zeros((n,), np.float32)
        adv_full[: len(rows)] = adv
        # rows with signal packed into as few micro-batches as possible: the others are skipped
        src = pack_rows((adv_full != 0) & (loss_mask.sum(1) > 0), cfg.micro_batch)
        out = self.apply_update(
            tokens[src], mask[src], loss_mask[src], behaviour[src], adv_full[src]
        )
        if cfg.optim.on_nonfinite == "stop":
            check_finite_step(
                self.update_index + 1, out["loss"], out["grad_norm"], key="optim.on_nonfinite"
            )
        out.update(masked_responses=masked, batch_rows=len(rows))
        return out

    def apply_update(self, tokens, mask, loss_mask, behaviour, advantages) -> dict[str, float]:
        """One optimizer step on a padded batch (``tokens, mask [N, W]``, ``loss_mask, behaviour
        [N, W-1]``, ``advantages [N]``; N a multiple of ``micro_batch``), on the run's mesh. A row
        trains at most ``max_new_tokens`` tokens (one response)."""
        longest = int(np.max(np.sum(np.asarray(loss_mask) > 0, axis=1), initial=0))
        if longest > self.cfg.max_new_tokens:
            raise ValueError(
                f"a row has {longest} loss positions, more than max_new_tokens "
                f"({self.cfg.max_new_tokens}): a row is one turn's response"
            )
        batch = jax.device_put(
            (tokens, mask, loss_mask, behaviour, advantages), self.batch_sharding
        )
        with jax.set_mesh(self.mesh):
            metrics = self.update_fn(self.model, self.optimizer, *batch)
        return {k: float(v) for k, v in metrics.items()}

    # -- the loop --------------------------------------------------------------------------------
    def run(self, max_updates: int | None = None, *, progress: bool = True) -> dict[str, Any]:
        """Runs until ``cfg.updates`` (or ``max_updates`` more); writes metrics.jsonl."""
        cfg = self.cfg
        stop = (
            cfg.updates
            if max_updates is None
            else min(cfg.updates, self.update_index + max_updates)
        )
        with MetricWriter(
            self.workdir, append=self.resumed_from is not None, tensorboard=False,
            step_key="update", keep_until=self.resumed_from,
        ) as log:  # fmt: skip
            while self.update_index < stop:
                m = self.update()
                log.write(m)
                if progress:
                    print(
                        f"update {m['update']}/{cfg.updates} {m['mode']:>14s} success "
                        f"{m['success']:.2f} score {m['score']:.2f} loss {m['loss']:+.4f} memory "
                        f"{m['memory_size']} ({m['rollout_s']:.0f}+{m['update_s']:.0f} s)",
                        flush=True,
                    )
                self._save(force=self.update_index == stop)
        self.checkpointer.wait()
        return {"update": self.update_index, **self.totals}

    def evaluate(
        self, split: str = "test", *, trials: int = 3, memory: bool = True, pairs=None
    ) -> dict[str, Any]:
        """Success after 1..k trials on unseen games, no weight updates: trial t sees the memories
        written after trials < t (``memory=True``), in a memory of its own that is then discarded.

        Returns ``{"success_at": [k=1..trials], "per_trial": [...], "games": n, "won": {...}}``,
        ``won`` mapping each game ("task/variation") to whether each trial won it."""
        if pairs is None:
            pairs = [(t, v) for t in self.eval_tasks for v in self.envs[0].variations(t, split)]
        saved_memory, saved_flag = self.memory, self.empo2
        self.memory = MemoryStore(
            self.cfg.empo2.memory_capacity, self.cfg.empo2.threshold, self.cfg.empo2.top_k
        )
        if memory and self.embed is None:
            self.embed = make_embedder(self.cfg.empo2.embedder)
        self.empo2 = memory
        n = len(self.envs)
        won = np.zeros((trials, len(pairs)), bool)
        try:
            for t in range(trials):
                for s in range(0, len(pairs), n):
                    chunk = pairs[s : s + n]
                    eps = self.play(chunk, use_tips=memory, episodes=1)
                    won[t, s : s + len(chunk)] = [e.won for e in eps]
                    if memory:
                        self.write_tips(eps)
        finally:
            self.memory, self.empo2 = saved_memory, saved_flag
        return {
            "success_at": [float(won[: k + 1].any(axis=0).mean()) for k in range(trials)],
            "per_trial": [float(w.mean()) for w in won],
            "games": len(pairs),
            "won": {f"{t}/{v}": won[:, i].tolist() for i, (t, v) in enumerate(pairs)},
        }
