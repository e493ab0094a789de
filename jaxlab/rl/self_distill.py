"""Self-distillation (SDPO-style) on top of the RL trainer: teacher re-prompts, teacher weights,
mixed policy / distillation updates, task coverage and in-domain / OOD evaluation.

    cfg = load_config("rl/sdpo_tiny")          # kind: rl_sdpo
    summary = train_sdpo(cfg, "runs/sdpo")     # or: python -m jaxlab rl train configs/rl/sdpo_*.yaml

Each trained sample (prompt x, completion y from the behaviour policy) gets a *teacher prompt*
x' built from x and a richer context chosen by ``distill.context`` (:data:`TEACHER_CONTEXTS`):

| context | what the teacher sees besides the task prompt |
|---|---|
| ``none`` | nothing: plain GRPO (no teacher forward) |
| ``rollout`` | a successful rollout of the same group (reward >= ``success_threshold``; by default not the row's own); rows of groups without one carry no distillation loss |
| ``solution_no_reasoning`` | the ground-truth solution without its reasoning (``<answer>...</answer>``) |
| ``solution`` | the ground-truth solution with its reasoning (the solver's steps, then the answer) |

x' = ``reprompt_template.format(prompt=x, solution=context)`` (SDPO's "Correct solution:" template by
default), rendered with the chat template like x. All teacher rows [x'; y] are scored in one
batched forward by the teacher weights chosen by ``distill.teacher`` (:data:`TEACHER_WEIGHTS`):
``live`` (the policy itself, no gradient), ``ema`` (θ_T ← (1 − r) θ_T + r θ after every update,
r = ``ema_rate``) or ``base`` (the initial weights, frozen). The student forward sees [x; y] only.
The loss is (1 − w) · policy_loss + w · distill_loss (:mod:`jaxlab.rl.distill`), both aggregated
with ``loss.agg``.

Coverage: the ``mixture`` task (:class:`MixtureTask`) interleaves task families and can cap the
number of distinct training problems. Evaluation (``evaluation``): greedy answers to held-out
problems of the in-domain families (by default the training task's) and of OOD families, at the
start, every ``evaluation.every`` updates and at the end: accuracy, mean response length in tokens
and epistemic markers per response (:mod:`jaxlab.analysis.markers`), one line per evaluation in
``evals.jsonl`` (the in-domain / OOD means also in ``metrics.jsonl``).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxlab import rl
from jaxlab.analysis.markers import count_epistemic
from jaxlab.config import check, register_config
from jaxlab.errors import UserError
from jaxlab.generation.core import sampling_logprobs
from jaxlab.optim import poison_if_nonfinite
from jaxlab.registry import Registry
from jaxlab.rl import distill
from jaxlab.rl.tasks import TASKS, Problem, Task, extract_answer, make_task
from jaxlab.rl.trainer import RLLossConfig, RLTrainConfig, RLTrainer
from jaxlab.sharding import pin
from jaxlab.tokenization import bucket_length

__all__ = [
    "TEACHER_CONTEXTS",
    "TEACHER_WEIGHTS",
    "MixtureTask",
    "solution_text",
    "teacher_context",
    "ema_update",
    "DistillConfig",
    "SDPOEvalConfig",
    "SDPOTrainConfig",
    "SDPOTrainer",
    "evaluate_families",
    "pack_distill_batch",
    "train_sdpo",
]

TEACHER_CONTEXTS = Registry("teacher context")
for _c in ("none", "rollout", "solution_no_reasoning", "solution"):
    TEACHER_CONTEXTS.register(_c, _c)
TEACHER_WEIGHTS = Registry("teacher weights")
for _w in ("live", "ema", "base"):
    TEACHER_WEIGHTS.register(_w, _w)

# lasgroup/SDPO's default re-prompt (solution section inlined)
DEFAULT_REPROMPT = (
    "{prompt}\n\nCorrect solution:\n\n{solution}\n\nCorrectly solve the original question."
)


# -- task coverage -----------------------------------------------------------------------------------


def _family_label(spec: dict[str, Any]) -> str:
    if "label" in spec:
        return str(spec["label"])
    kw = ",".join(f"{k}={v}" for k, v in sorted(spec.get("kwargs", {}).items()))
    return f"{spec['name']}({kw})" if kw else spec["name"]


def _check_families(families: Any, field: str) -> None:
    ok = isinstance(families, list | tuple) and all(
        isinstance(f, dict) and "name" in f and set(f) <= {"name", "kwargs", "label"}
        for f in families
    )
    check(ok, field, f"must be a list of {{name, kwargs, label}} mappings, got {families!r}")


@TASKS.register("mixture")
class MixtureTask(Task):
    """Problems interleaved from several task families: problem i is problem ⌊i / F⌋ of family
    i mod F (F families), with i taken modulo ``problems`` when set (the number of distinct
    problems); rewards are each family's own. ``families``: ``[{name, kwargs, label}]``."""

    name = "mixture"

    def __init__(self, *, families: list[dict[str, Any]], problems: int | None = None, **kw):
        super().__init__(**kw)
        if not isinstance(families, list | tuple) or not families:
            raise ValueError(f"mixture: families must be a non-empty list, got {families!r}")
        for f in families:
            if not isinstance(f, dict) or "name" not in f or f["name"] == "mixture":
                raise ValueError(f"mixture: each family is a {{name, kwargs}} mapping, got {f!r}")
        if problems is not None and problems < 1:
            raise ValueError(f"mixture: problems must be >= 1 or null, got {problems}")
        self.families = [dict(f) for f in families]
        self.labels = [_family_label(f) for f in families]
        self.tasks = [
            make_task(
                f["name"], seed=self.seed, format_reward=self.format_reward, **f.get("kwargs", {})
            )
            for f in families
        ]
        self.problems = problems

    def problem(self, index: int) -> Problem:
        i = index % self.problems if self.problems else index
        f = i % len(self.tasks)
        p = self.tasks[f].problem(i // len(self.tasks))
        return Problem(p.prompt, p.answer, {**p.meta, "family": f, "label": self.labels[f]})

    def reward(self, problem: Problem, completion: str) -> float:
        return self.tasks[problem.meta["family"]].reward(problem, completion)


# -- teacher contexts --------------------------------------------------------------------------------


def solution_text(problem: Problem, *, reasoning: bool) -> str:
    """The ground-truth solution of ``problem`` as a completion would write it.

    With ``reasoning``: arithmetic gets the solver's steps (the procedural trace of
    :mod:`jaxlab.analysis.traces`), countdown its equation worked out, then the answer tag; tasks
    without written reasoning (knights and knaves) get the answer alone. Without ``reasoning``:
    only ``<answer>...</answer>``."""
    meta = problem.meta
    if "expression" in meta:
        if reasoning:
            from jaxlab.analysis.traces import write_trace

            return write_trace(problem, "procedural")
        return f"<answer>{problem.answer}</answer>"
    if "solution" in meta:  # countdown
        answer = f"<answer>{meta['solution']}</answer>"
        return f"{meta['solution']} = {problem.answer}.\n{answer}" if reasoning else answer
    if isinstance(problem.answer, dict):  # knights and knaves
        return "<answer>" + ", ".join(f"{k}: {v}" for k, v in problem.answer.items()) + "</answer>"
    return f"<answer>{problem.answer}</answer>"


def teacher_context(
    context: str,
    problem: Problem,
    row: int,
    completions: list[str],
    rewards: list[float],
    *,
    success_threshold: float = 1.0,
    exclude_self: bool = True,
) -> str | None:
    """What the teacher of sample ``row`` of a group sees besides the prompt, or None when it has
    nothing to see (then the row carries no distillation loss). ``completions`` / ``rewards``:
    the whole group's."""
    TEACHER_CONTEXTS.get(context)
    if context == "none":
        return None
    if context == "solution":
        return solution_text(problem, reasoning=True)
    if context == "solution_no_reasoning":
        return solution_text(problem, reasoning=False)
    for j, (c, r) in enumerate(zip(completions, rewards)):  # rollout: the first other success
        if r >= success_threshold and not (exclude_self and j == row):
            return c
    return None


def ema_update(teacher, student, rate: float):
    """θ_T ← (1 − rate) · θ_T + rate · θ over matching pytrees (rate 0 keeps the teacher)."""
    return jax.tree.map(
        lambda t, s: ((1.0 - rate) * t + rate * s).astype(t.dtype), teacher, student
    )


# -- configs ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class DistillConfig:
    context: str = "solution"  # TEACHER_CONTEXTS; "none" is plain GRPO
    teacher: str = "ema"  # TEACHER_WEIGHTS: live | ema | base
    ema_rate: float = 0.05  # teacher: ema
    weight: float = 1.0  # w in (1 - w) * policy_loss + w * distill_loss
    mode: str = "full"  # jaxlab.rl.distill.DISTILL_MODES
    alpha: float = 0.5  # 0 forward KL, 1 reverse KL, between: generalised JSD
    topk: int = 20  # mode: topk
    add_tail: bool = True  # mode: topk
    is_clip: float | None = 2.0  # clip of π_student / π_behaviour on the distillation loss
    success_threshold: float = 1.0  # context: rollout, what counts as a successful rollout
    exclude_self: bool = True  # context: rollout, never the row's own completion
    reprompt_template: str = DEFAULT_REPROMPT

    def __post_init__(self):
        for field, reg in (
            ("context", TEACHER_CONTEXTS),
            ("teacher", TEACHER_WEIGHTS),
            ("mode", distill.DISTILL_MODES),
        ):
            value = getattr(self, field)
            check(value in reg, field, f"{value!r} is not one of {reg.names()}")
        check(0.0 <= self.weight <= 1.0, "weight", f"must lie in [0, 1], got {self.weight}")
        check(0.0 <= self.alpha <= 1.0, "alpha", f"must lie in [0, 1], got {self.alpha}")
        check(
            self.mode != "sampled_token" or self.alpha == 1.0,
            "alpha",
            f"mode 'sampled_token' is the reverse KL (alpha 1), got {self.alpha}",
        )
        check(0.0 <= self.ema_rate <= 1.0, "ema_rate", f"must lie in [0, 1], got {self.ema_rate}")
        check(self.topk >= 1, "topk", f"must be >= 1, got {self.topk}")
        check(
            self.is_clip is None or (math.isfinite(self.is_clip) and self.is_clip > 0),
            "is_clip",
            f"must be positive or null, got {self.is_clip}",
        )
        try:
            self.reprompt_template.format(prompt="p", solution="s")
        except (KeyError, IndexError, ValueError) as e:
            check(False, "reprompt_template", f"takes {{prompt}} and {{solution}} only: {e}")
        check(
            "{solution}" in self.reprompt_template and "{prompt}" in self.reprompt_template,
            "reprompt_template",
            "must contain {prompt} and {solution}",
        )

    @property
    def active(self) -> bool:
        return self.context != "none" and self.weight > 0


@dataclasses.dataclass(frozen=True, kw_only=True)
class SDPOEvalConfig:
    every: int = 0  # evaluate every this many updates (0: at the start and the end only)
    at_start: bool = True  # also evaluate the initial policy
    problems: int = 16  # held-out problems per family
    start: int = 100_000  # index of the first held-out problem (training uses 0 ..)
    in_domain: list[dict[str, Any]] | None = None  # families; None: the training task's
    ood: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    max_new_tokens: int | None = None  # default: generation.max_new_tokens
    batch_size: int = 32
    convention: str = "substring"  # epistemic counting convention (jaxlab.analysis.markers)

    def __post_init__(self):
        check(self.every >= 0, "every", f"must be >= 0, got {self.every}")
        check(self.problems >= 0, "problems", f"must be >= 0, got {self.problems}")
        check(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")
        if self.in_domain is not None:
            _check_families(self.in_domain, "in_domain")
        _check_families(self.ood, "ood")
        for spec in (self.in_domain or []) + list(self.ood):
            try:
                make_task(spec["name"], **spec.get("kwargs", {}))
            except (TypeError, ValueError) as e:
                check(False, "ood" if spec in self.ood else "in_domain", f"{spec!r}: {e}")
        from jaxlab.analysis.markers import CONVENTIONS

        check(
            self.convention in CONVENTIONS,
            "convention",
            f"{self.convention!r} is not one of {CONVENTIONS.names()}",
        )


@register_config("rl_sdpo")
@dataclasses.dataclass(frozen=True, kw_only=True)
class SDPOTrainConfig(RLTrainConfig):
    """:class:`RLTrainConfig` plus the teacher (``distill``) and the evaluation."""

    distill: DistillConfig = dataclasses.field(default_factory=DistillConfig)
    evaluation: SDPOEvalConfig = dataclasses.field(default_factory=SDPOEvalConfig)

    def __post_init__(self):
        check(
            self.loss.kl_coef == 0 or not self.distill.active,
            "loss.kl_coef",
            "a reference-KL penalty is not combined with self-distillation; set it to 0",
        )


# -- batches ------------------------------------------------------------------------------------------


def pack_distill_batch(
    prompts: list[list[int]],
    teacher_prompts: list[list[int] | None],
    completions: list[list[int]],
    behaviour: list[list[float]],
    *,
    pad_id: int,
    rows: int,
    granularity: int = 64,
    completion_width: int | None = None,
) -> dict[str, np.ndarray]:
    """Right-padded student rows [x; y] and teacher rows [x'; y] with the completion positions of
    both (N = ``rows`` >= the number of samples; padding rows carry no loss).

    Returns numpy arrays: ``tokens`` / ``mask`` ``[N, W]``, ``loss_mask`` / ``behaviour`` ``[N, W-1]``
    (the policy loss's, as the RL trainer packs them), ``teacher_tokens`` / ``teacher_mask``
    ``[N, W']``, and over C completion positions: ``student_index`` / ``teacher_index`` ``[N, C]``
    (the position whose logits predict completion token j), ``completion`` ``[N, C]``,
    ``completion_behaviour`` ``[N, C]``, ``distill_mask`` ``[N, C]`` (0 for rows without a teacher
    prompt). ``completion_width``: C when given (e.g. the maximum number of new tokens, so that
    C, and the compiled update, do not change from batch to batch)."""
    n = len(prompts)
    if not (len(teacher_prompts) == len(completions) == len(behaviour) == n) or rows < n:
        raise ValueError("pack_distill_batch: one teacher prompt, completion and behaviour per row")
    teach = [tp if tp is not None else p for tp, p in zip(teacher_prompts, prompts)]
    width = bucket_length(
        max(len(p) + len(c) for p, c in zip(prompts, completions)), 1 << 20, granularity=granularity
    )
    t_width = bucket_length(
        max(len(p) + len(c) for p, c in zip(teach, completions)), 1 << 20, granularity=granularity
    )
    longest = max(max(len(c) for c in completions), 1)
    if completion_width is not None and completion_width < longest:
        raise ValueError(
            f"pack_distill_batch: completion_width {completion_width} < longest completion {longest}"
        )
    c_width = completion_width or bucket_length(longest, 1 << 20, granularity=16)
    out = {
        "tokens": np.full((rows, width), pad_id, np.int32),
        "mask": np.zeros((rows, width), np.int32),
        "loss_mask": np.zeros((rows, width - 1), np.float32),
        "behaviour": np.zeros((rows, width - 1), np.float32),
        "teacher_tokens": np.full((rows, t_width), pad_id, np.int32),
        "teacher_mask": np.zeros((rows, t_width), np.int32),
        "student_index": np.zeros((rows, c_width), np.int32),
        "teacher_index": np.zeros((rows, c_width), np.int32),
        "completion": np.zeros((rows, c_width), np.int32),
        "completion_behaviour": np.zeros((rows, c_width), np.float32),
        "distill_mask": np.zeros((rows, c_width), np.float32),
    }
    for r, (p, tp, c, b) in enumerate(zip(prompts, teach, completions, behaviour)):
        k = len(c)
        seq, tseq = p + c, tp + c
        out["tokens"][r, : len(seq)] = seq
        out["mask"][r, : len(seq)] = 1
        out["loss_mask"][r, len(p) - 1 : len(seq) - 1] = 1
        out["behaviour"][r, len(p) - 1 : len(seq) - 1] = b
        out["teacher_tokens"][r, : len(tseq)] = tseq
        out["teacher_mask"][r, : len(tseq)] = 1
        out["student_index"][r, :k] = np.arange(len(p) - 1, len(p) - 1 + k)
        out["teacher_index"][r, :k] = np.arange(len(tp) - 1, len(tp) - 1 + k)
        out["completion"][r, :k] = c
        out["completion_behaviour"][r, :k] = b
        out["distill_mask"][r, :k] = 1.0 if teacher_prompts[r] is not None else 0.0
    return out


_BATCH_KEYS = (
    "tokens",
    "mask",
    "loss_mask",
    "behaviour",
    "advantages",
    "teacher_tokens",
    "teacher_mask",
    "student_index",
    "teacher_index",
    "completion",
    "completion_behaviour",
    "distill_mask",
)


def _gather_positions(x, index):
    """``x [N, W, D]`` at ``index [N, C]`` → ``[N, C, D]``."""
    return jnp.take_along_axis(x, index[:, :, None].astype(jnp.int32), axis=1)


@functools.lru_cache(maxsize=8)
def _make_sdpo_update_fn(
    loss_cfg: RLLossConfig, dcfg: DistillConfig, temperature: float, max_len: float, top_p: float
):
    """The jitted SDPO update: student forward, teacher forward (one batch of re-prompts),
    (1 − w) · policy + w · distillation loss, optimizer step, EMA teacher step."""
    agg_kw = dict(max_len=max_len)

    @nnx.jit
    def update(model, optimizer, teacher, batch):
        def logits_at(m, tokens, mask, index):
            """The logits at ``index [N, C]`` only: the vocabulary projection of those hidden
            states, not of every prompt and padding position."""
            hidden = m(tokens[:, :-1], attention_mask=mask[:, :-1], return_hidden=True)
            return m.logits_from_hidden(_gather_positions(hidden, index))

        def teacher_logits(m):
            t_model = m if teacher is None else teacher
            logits = logits_at(
                t_model, batch["teacher_tokens"], batch["teacher_mask"], batch["teacher_index"]
            )
            return jax.lax.stop_gradient(logits)

        def loss_fn(m):
            logits = logits_at(m, batch["tokens"], batch["mask"], batch["student_index"])
            completion = batch["completion"]
            logp = sampling_logprobs(logits, completion, temperature=temperature, top_p=top_p)
            # a row's completion fills its first k of the C slots, k = its loss positions
            k = jnp.sum(batch["loss_mask"] > 0, axis=1, keepdims=True)
            completion_mask = (jnp.arange(completion.shape[1])[None] < k).astype(jnp.float32)
            p_loss, metrics = rl.policy_loss(
                logp,
                batch["completion_behaviour"],
                batch["advantages"],
                completion_mask,
                clip_low=loss_cfg.clip_low,
                clip_high=loss_cfg.clip_high,
                agg=loss_cfg.agg,
                alpha=loss_cfg.alpha,
                **agg_kw,
            )
            d_loss, d_metrics = distill.distillation_loss(
                logits,
                teacher_logits(m),
                batch["completion"],
                batch["distill_mask"],
                mode=dcfg.mode,
                alpha=dcfg.alpha,
                topk=dcfg.topk,
                add_tail=dcfg.add_tail,
                temperature=temperature,
                behaviour_logp=batch["completion_behaviour"],
                is_clip=dcfg.is_clip,
                agg=loss_cfg.agg,
                agg_alpha=loss_cfg.alpha,
                **agg_kw,
            )
            metrics.update(d_metrics, policy_loss=p_loss, distill_loss=d_loss)
            return distill.mix_losses(p_loss, d_loss, dcfg.weight), metrics

        (loss, metrics), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
        grads = poison_if_nonfinite(loss, grads)
        optimizer.update(model, grads)
        pin(model, optimizer)
        if teacher is not None and dcfg.teacher == "ema":
            new = ema_update(
                nnx.state(teacher, nnx.Param), nnx.state(model, nnx.Param), dcfg.ema_rate
            )
            nnx.update(teacher, new)
        metrics["loss"] = loss
        metrics["grad_norm"] = optax.global_norm(grads)
        return metrics

    return update


# -- evaluation ---------------------------------------------------------------------------------------


def evaluate_families(
    model,
    tokenizer,
    families: list[dict[str, Any]],
    *,
    problems: int,
    start: int,
    max_new_tokens: int,
    chat: bool = True,
    convention: str = "substring",
    batch_size: int = 32,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """Greedy answers to problems ``start .. start + problems - 1`` of each family (all families'
    prompts batched together): per family label ``{accuracy, mean_tokens,
    epistemic_per_response, responses}``. Accuracy counts a reward of 1 from a response that
    commits to an answer (:func:`jaxlab.rl.tasks.extract_answer`: a tag, ``\\boxed`` or "answer
    is"), so that a truncated response whose last number happens to be right does not count."""
    from jaxlab.analysis.markers import count_epistemic
    from jaxlab.generation import generate

    items = []  # (family label, task, problem)
    for spec in families:
        task = make_task(spec["name"], seed=seed, **spec.get("kwargs", {}))
        items += [(_family_label(spec), task, task.problem(start + i)) for i in range(problems)]
    texts, lengths = [], []
    for b in range(0, len(items), batch_size):
        res = generate(
            model,
            tokenizer,
            [p.prompt for _, _, p in items[b : b + batch_size]],
            max_new_tokens=max_new_tokens,
            chat=chat,
        )
        texts += list(res.texts)
        lengths += [int(x) for x in res.lengths]
    out: dict[str, dict[str, float]] = {}
    for spec in families:
        label = _family_label(spec)
        rows = [k for k, (lab, _, _) in enumerate(items) if lab == label]
        n = max(len(rows), 1)
        out[label] = {
            "accuracy": sum(
                extract_answer(texts[k]) is not None
                and items[k][1].reward(items[k][2], texts[k]) >= 1.0
                for k in rows
            )
            / n,
            "mean_tokens": float(np.mean([lengths[k] for k in rows])) if rows else 0.0,
            "epistemic_per_response": sum(count_epistemic(texts[k], convention) for k in rows) / n,
            "responses": len(rows),
        }
    return out


def _mean_over(results: dict[str, dict[str, float]], key: str) -> float:
    return float(np.mean([r[key] for r in results.values()])) if results else float("nan")


# -- the trainer ----------------------------------------------------------------------------------------


class SDPOTrainer(RLTrainer):
    """:class:`RLTrainer` whose updates add the self-distillation loss (``cfg.distill``) and which
    evaluates in-domain and OOD families (``cfg.evaluation``)."""

    cfg: SDPOTrainConfig

    def __init__(self, cfg: SDPOTrainConfig, workdir: str | Path):
        if not isinstance(cfg, SDPOTrainConfig):
            raise UserError(f"SDPOTrainer needs an rl_sdpo config, got {type(cfg).__name__}")
        super().__init__(cfg, workdir)
        gen = cfg.generation
        # fields that only shape the batch are left out of the compiled update's cache key
        key = dataclasses.replace(
            cfg.distill,
            context="solution",
            success_threshold=1.0,
            exclude_self=True,
            reprompt_template=DEFAULT_REPROMPT,
        )
        self.sdpo_update_fn = _make_sdpo_update_fn(
            cfg.loss, key, gen.temperature, self.max_len, gen.top_p
        )
        self.evals_path = self.workdir / "evals.jsonl"
        if self.resumed_from is None:
            self.evals_path.unlink(missing_ok=True)
        self.last_eval: dict[str, Any] | None = None

    # the teacher's weights: built before the checkpoint restore (from the initial weights), and
    # saved with every checkpoint when they are not the live policy
    def _make_teacher(self):
        d = self.cfg.distill
        if not d.active or d.teacher == "live":
            return None
        return nnx.clone(self.model)

    def _restore(self) -> int | None:
        self.teacher = self._make_teacher()
        return super()._restore()

    def _checkpoint_arrays(self):
        arrays, meta = super()._checkpoint_arrays()
        if getattr(self, "teacher", None) is None or self.cfg.distill.teacher != "ema":
            return arrays, meta
        return {"engine": arrays, "teacher": nnx.state(self.teacher, nnx.Param)}, meta

    def _restore_arrays(self, arrays, engine_meta):
        if self.teacher is not None and self.cfg.distill.teacher == "ema":
            nnx.update(self.teacher, arrays["teacher"])
            arrays = arrays["engine"]
        super()._restore_arrays(arrays, engine_meta)

    # -- evaluation --
    def evaluate(self) -> dict[str, Any]:
        """Evaluates the current policy; appends a line to ``evals.jsonl`` and returns it."""
        cfg, ev = self.cfg, self.cfg.evaluation
        in_domain = ev.in_domain
        if in_domain is None:
            if cfg.task.name == "mixture":
                in_domain = list(cfg.task.kwargs["families"])
            else:
                in_domain = [{"name": cfg.task.name, "kwargs": dict(cfg.task.kwargs)}]
        kw = dict(
            problems=ev.problems,
            start=ev.start,
            max_new_tokens=ev.max_new_tokens or cfg.generation.max_new_tokens,
            chat=cfg.generation.chat,
            convention=ev.convention,
            batch_size=ev.batch_size,
            seed=cfg.task.seed,
        )
        ind = evaluate_families(self.model, self.tokenizer, in_domain, **kw)
        ood = evaluate_families(self.model, self.tokenizer, list(ev.ood), **kw)
        line = {
            "version": self.ctrl.version,
            "trained_samples": self.trained_samples,
            "in_domain": ind,
            "ood": ood,
            "eval_id_accuracy": _mean_over(ind, "accuracy"),
            "eval_ood_accuracy": _mean_over(ood, "accuracy"),
            "eval_id_tokens": _mean_over(ind, "mean_tokens"),
            "eval_ood_tokens": _mean_over(ood, "mean_tokens"),
            "eval_id_epistemic": _mean_over(ind, "epistemic_per_response"),
            "eval_ood_epistemic": _mean_over(ood, "epistemic_per_response"),
        }
        with open(self.evals_path, "a") as f:
            f.write(json.dumps(line) + "\n")
        self.last_eval = line
        return line

    def update(self, groups: list[int]) -> dict[str, Any]:
        ev = self.cfg.evaluation
        if self.ctrl.version == 0 and self.resumed_from is None and ev.problems and ev.at_start:
            self.evaluate()
        metrics = super().update(groups)
        every = self.cfg.evaluation.every
        due = self.ctrl.done or (every and self.ctrl.version % every == 0)
        if due and self.cfg.evaluation.problems:
            line = self.evaluate()
            metrics.update({k: v for k, v in line.items() if k.startswith("eval_")})
        return metrics

    def write_summary(self) -> dict[str, Any]:
        summary = super().write_summary()
        if self.last_eval is not None:
            summary.update({k: v for k, v in self.last_eval.items() if k.startswith("eval_")})
            (self.workdir / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary

    # -- the update --
    def teacher_prompt_ids(self, group: int, context: str | None) -> list[int] | None:
        """The teacher's prompt ids for a sample of ``group`` given its context (None: none)."""
        if context is None:
            return None
        text = self.cfg.distill.reprompt_template.format(
            prompt=self.prompts[group]["prompt"], solution=context
        )
        if self.cfg.generation.chat:
            return self.tokenizer.encode(
                self.tokenizer.apply_chat_template(text), add_special_tokens=False
            )
        return self.tokenizer.encode(text)

    def _policy_update(self, groups: list[int]) -> dict[str, Any]:
        cfg, tokenizer, d = self.cfg, self.tokenizer, self.cfg.distill
        if not d.active:  # plain GRPO, plus the rollouts' epistemic markers
            texts = [
                tokenizer.decode(self.finished[(g, i)].tokens)
                for g in groups
                for i in range(cfg.scheduler.group_size)
            ]
            out = super()._policy_update(groups)
            out["rollout_epistemic"] = float(
                np.mean([count_epistemic(t, cfg.evaluation.convention) for t in texts])
            )
            return out
        g_size = cfg.scheduler.group_size
        prompts, teacher_prompts, completions, behaviour = [], [], [], []
        rewards, staleness, lengths, epistemic = [], [], [], []
        for g in groups:
            problem = self.problem(g)
            cs = [self.finished.pop((g, i)) for i in range(g_size)]
            texts = [tokenizer.decode(c.tokens) for c in cs]
            rs = []
            for i, text in enumerate(texts):
                reward = float(self.task.reward(problem, text))
                if not math.isfinite(reward):
                    raise UserError(
                        f"task {cfg.task.name!r} gave reward {reward} to sample {i} of group {g}; "
                        "rewards must be finite"
                    )
                rs.append(reward)
            p_ids = self.prompt_ids(g)
            for i, c in enumerate(cs):
                ctx = teacher_context(
                    d.context,
                    problem,
                    i,
                    texts,
                    rs,
                    success_threshold=d.success_threshold,
                    exclude_self=d.exclude_self,
                )
                prompts.append(p_ids)
                teacher_prompts.append(self.teacher_prompt_ids(g, ctx))
                completions.append(list(c.tokens))
                behaviour.append(list(c.logprobs))
                staleness.append(self.ctrl.version - min(c.policy_versions))
                lengths.append(len(c.tokens))
            rewards.extend(rs)
            epistemic += [count_epistemic(t, cfg.evaluation.convention) for t in texts]
        adv = self._group_advantages(rewards, staleness, len(groups))
        n = bucket_length(len(prompts), 2 * len(prompts), granularity=64)
        shards = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
        n = -(-n // shards) * shards
        batch = pack_distill_batch(
            prompts,
            teacher_prompts,
            completions,
            behaviour,
            pad_id=tokenizer.pad_token_id,
            rows=n,
            completion_width=cfg.generation.max_new_tokens,
        )
        batch["advantages"] = np.pad(adv, (0, n - len(prompts))).astype(np.float32)
        batch = jax.device_put({k: batch[k] for k in _BATCH_KEYS}, self.batch_sharding)
        with jax.set_mesh(self.mesh):
            metrics = self.sdpo_update_fn(self.model, self.optimizer, self.teacher, batch)
        out = {k: float(v) for k, v in metrics.items()}
        with_teacher = sum(tp is not None for tp in teacher_prompts)
        out.update(
            reward_mean=float(np.asarray(rewards, np.float32).mean()),
            reward_max=max(rewards),
            groups=len(groups),
            max_token_staleness=int(max(staleness)),
            mean_length=float(np.mean(lengths)),
            batch_tokens=sum(len(p) + len(c) for p, c in zip(prompts, completions)),
            rollout_epistemic=float(np.mean(epistemic)),
            teacher_rows=with_teacher / len(prompts),
            teacher_tokens=sum(
                len(tp) + len(c) for tp, c in zip(teacher_prompts, completions) if tp is not None
            ),
        )
        return out


def train_sdpo(
    cfg: SDPOTrainConfig, workdir: str | Path, *, progress: bool = True
) -> dict[str, Any]:
    """Runs self-distillation RL until every prompt's group is trained; returns the summary."""
    return SDPOTrainer(cfg, workdir).run(progress=progress)
