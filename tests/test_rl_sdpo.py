"""Self-distillation trainer: teacher re-prompts, batch packing (the teacher forward sees the
re-prompt, the student's does not), coverage, EMA teacher, a tiny end-to-end run with resume."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlab.config import load_config
from jaxlab.errors import ConfigError
from jaxlab.models import Decoder
from jaxlab.rl import self_distill as sd
from jaxlab.rl.tasks import ArithmeticTask
from jaxlab.tokenization import char_tokenizer


def test_teacher_contexts():
    p = ArithmeticTask(digits=2, terms=3, ops="+-").problem(3)
    full = sd.teacher_context("solution", p, 0, ["x"], [0.0])
    bare = sd.teacher_context("solution_no_reasoning", p, 0, ["x"], [0.0])
    assert bare == f"<answer>{p.answer}</answer>"
    # the reasoning: every solver step written out, then the same answer
    a, op1, b, op2, c = p.meta["expression"].split()
    first = int(a) + int(b) if op1 == "+" else int(a) - int(b)
    assert f"{a} {op1} {b} = {first}" in full and full.endswith(bare)
    assert sd.teacher_context("none", p, 0, ["x"], [1.0]) is None
    texts, rewards = ["r0", "r1", "r2", "r3"], [0.0, 1.0, 0.1, 1.0]
    assert sd.teacher_context("rollout", p, 0, texts, rewards) == "r1"
    assert sd.teacher_context("rollout", p, 1, texts, rewards) == "r3"  # never its own
    assert sd.teacher_context("rollout", p, 1, texts, rewards, exclude_self=False) == "r1"
    assert sd.teacher_context("rollout", p, 0, texts, [0.0, 0.1, 0.0, 0.0]) is None
    assert sd.teacher_context("rollout", p, 3, texts, [0, 0, 0, 1.0]) is None


def test_mixture_task_coverage():
    fams = [
        {"name": "arithmetic", "kwargs": {"digits": 1, "ops": "+"}, "label": "add"},
        {"name": "arithmetic", "kwargs": {"digits": 1, "ops": "-"}},
    ]
    task = sd.MixtureTask(families=fams, problems=4, seed=1)
    add, sub = (ArithmeticTask(digits=1, ops=o, seed=1) for o in "+-")
    got = [task.problem(i) for i in range(8)]
    assert [g.meta["family"] for g in got] == [0, 1] * 4
    assert got[0].prompt == add.problem(0).prompt and got[3].prompt == sub.problem(1).prompt
    assert [g.prompt for g in got[4:]] == [g.prompt for g in got[:4]]  # 4 distinct problems
    assert got[1].meta["label"] == "arithmetic(digits=1,ops=-)"
    assert task.reward(got[1], f"<answer>{got[1].answer}</answer>") == 1.0
    assert task.reward(got[1], f"<answer>{got[1].answer + 1}</answer>") == pytest.approx(0.1)


def test_pack_batch_teacher_sees_the_reprompt_student_does_not():
    """Completion tokens sit at the same logical positions in both rows; the logits gathered from
    one batched forward equal those of each sequence run alone."""
    tok = char_tokenizer()
    prompts = ["What is 2 + 3?", "What is 7 - 1?"]
    sols = ["<answer>5</answer>", None]  # the second row has no teacher context
    comps = ["It is 5.", "6"]
    enc = [tok.encode(x) for x in prompts]
    t_enc = [
        tok.encode(sd.DEFAULT_REPROMPT.format(prompt=p, solution=s)) if s else None
        for p, s in zip(prompts, sols)
    ]
    c_enc = [tok.encode(x) for x in comps]
    beh = [[-0.5] * len(c) for c in c_enc]
    b = sd.pack_distill_batch(
        enc, t_enc, c_enc, beh, pad_id=tok.pad_token_id, rows=4, granularity=8
    )
    for r in range(2):
        k = len(c_enc[r])
        student_text = tok.decode(b["tokens"][r][b["mask"][r] == 1])
        teacher_text = tok.decode(b["teacher_tokens"][r][b["teacher_mask"][r] == 1])
        assert "Correct solution" not in student_text and student_text.endswith(comps[r])
        assert ("<answer>5</answer>" in teacher_text) == (sols[r] is not None)
        s_idx, t_idx = b["student_index"][r, :k], b["teacher_index"][r, :k]
        np.testing.assert_array_equal(b["tokens"][r, s_idx + 1], c_enc[r])
        np.testing.assert_array_equal(b["teacher_tokens"][r, t_idx + 1], c_enc[r])
        np.testing.assert_array_equal(b["completion"][r, :k], c_enc[r])
        assert b["distill_mask"][r].sum() == (k if sols[r] else 0)
        assert b["loss_mask"][r].sum() == k and (b["completion_behaviour"][r, :k] == -0.5).all()
    assert b["mask"][2:].sum() == 0 and b["distill_mask"][2:].sum() == 0  # padding rows

    cfg = load_config("configs/rl/sdpo_tiny.yaml")
    dec = Decoder(dataclasses.replace(cfg.tiny_model, vocab_size=tok.vocab_size), rngs=nnx.Rngs(0))
    logits = dec(jnp.asarray(b["teacher_tokens"]), attention_mask=jnp.asarray(b["teacher_mask"]))
    gathered = sd._gather_positions(logits, jnp.asarray(b["teacher_index"]))
    alone = dec(jnp.asarray([t_enc[0] + c_enc[0]]))[0]
    k = len(c_enc[0])
    np.testing.assert_allclose(
        np.asarray(gathered[0, :k]), np.asarray(alone[len(t_enc[0]) - 1 : -1]), rtol=1e-5, atol=1e-5
    )


def test_live_teacher_is_not_differentiated():
    """A live teacher (the policy, no gradient) gives exactly the update of a frozen copy of the
    same weights: no gradient reaches the student through the teacher's forward."""
    import optax

    from jaxlab.rl.trainer import RLLossConfig

    tok = char_tokenizer()
    enc = [tok.encode("What is 2 + 3?"), tok.encode("What is 4 * 2?")]
    t_enc = [tok.encode(sd.DEFAULT_REPROMPT.format(prompt="What is 2 + 3?", solution="5"))] * 2
    c_enc = [tok.encode("It is 5."), tok.encode("8")]
    beh = [[-1.0] * len(c) for c in c_enc]
    batch = sd.pack_distill_batch(enc, t_enc, c_enc, beh, pad_id=tok.pad_token_id, rows=2)
    batch["advantages"] = np.zeros(2, np.float32)
    batch = {k: jnp.asarray(batch[k]) for k in sd._BATCH_KEYS}
    mcfg = load_config("configs/rl/sdpo_tiny.yaml").tiny_model
    dec = Decoder(dataclasses.replace(mcfg, vocab_size=tok.vocab_size), rngs=nnx.Rngs(1))
    live = sd.DistillConfig(teacher="live", weight=1.0, mode="full", alpha=0.5, is_clip=None)
    out = []
    for d in (live, dataclasses.replace(live, teacher="base")):
        model = nnx.clone(dec)
        opt = nnx.Optimizer(model, optax.sgd(1.0), wrt=nnx.Param)
        teacher = None if d.teacher == "live" else nnx.clone(dec)
        update = sd._make_sdpo_update_fn(RLLossConfig(), d, 1.0, 8.0, 1.0)
        out.append((update(model, opt, teacher, batch), _params(model)))
    (m_live, p_live), (m_base, p_base) = out
    assert float(m_live["distill_loss"]) > 0
    assert float(m_live["distill_loss"]) == pytest.approx(float(m_base["distill_loss"]), rel=1e-6)
    assert any(not np.allclose(a, b) for a, b in zip(p_live, _params(dec)))
    for a, b in zip(p_live, p_base):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("top_p", [1.0, 0.9])
def test_update_equals_the_every_position_logits_loss(top_p):
    """The update projects only the completion positions of the student and teacher rows; its
    loss and gradient equal those of the logits at every position, gathered afterwards (rows with
    and without a teacher prompt, a padding row, non-zero advantages, a policy + distillation mix)."""
    import optax

    from jaxlab import rl
    from jaxlab.generation.core import sampling_logprobs
    from jaxlab.rl import distill
    from jaxlab.rl.trainer import RLLossConfig

    tok = char_tokenizer()
    prompts = ["What is 2 + 3?", "What is 4 * 2?", "7 - 1?"]
    enc = [tok.encode(p) for p in prompts]
    t_enc = [tok.encode(sd.DEFAULT_REPROMPT.format(prompt=prompts[0], solution="5")), None, None]
    t_enc[2] = tok.encode(sd.DEFAULT_REPROMPT.format(prompt=prompts[2], solution="6"))
    c_enc = [tok.encode("It is 5."), tok.encode("8"), tok.encode("six")]
    rng = np.random.default_rng(0)
    beh = [list(rng.normal(-2.0, 0.3, len(c))) for c in c_enc]
    packed = sd.pack_distill_batch(enc, t_enc, c_enc, beh, pad_id=tok.pad_token_id, rows=4)
    packed["advantages"] = np.array([1.0, -0.7, 0.4, 0.0], np.float32)
    batch = {k: jnp.asarray(packed[k]) for k in sd._BATCH_KEYS}
    mcfg = load_config("configs/rl/sdpo_tiny.yaml").tiny_model
    dec = Decoder(dataclasses.replace(mcfg, vocab_size=tok.vocab_size), rngs=nnx.Rngs(3))
    teacher = Decoder(dataclasses.replace(mcfg, vocab_size=tok.vocab_size), rngs=nnx.Rngs(4))
    dcfg = sd.DistillConfig(teacher="base", weight=0.5, mode="full", alpha=0.5, is_clip=2.0)
    loss_cfg = RLLossConfig(agg="seq_mean_token_mean")
    temperature, max_len = 0.9, 8.0

    def gather(logits, index):
        return jnp.take_along_axis(logits, index[:, :, None], axis=1)

    graphdef, params, rest = nnx.split(dec, nnx.Param, ...)

    def reference(params):
        m = nnx.merge(graphdef, params, rest)
        logits = m(batch["tokens"][:, :-1], attention_mask=batch["mask"][:, :-1])
        logp = sampling_logprobs(
            logits, batch["tokens"][:, 1:], temperature=temperature, top_p=top_p
        )
        p_loss, _ = rl.policy_loss(
            logp, batch["behaviour"], batch["advantages"], batch["loss_mask"],
            clip_low=loss_cfg.clip_low, clip_high=loss_cfg.clip_high, agg=loss_cfg.agg,
            alpha=loss_cfg.alpha, max_len=max_len,
        )  # fmt: skip
        t_logits = teacher(
            batch["teacher_tokens"][:, :-1], attention_mask=batch["teacher_mask"][:, :-1]
        )
        d_loss, _ = distill.distillation_loss(
            gather(logits, batch["student_index"]),
            jax.lax.stop_gradient(gather(t_logits, batch["teacher_index"])),
            batch["completion"], batch["distill_mask"], mode=dcfg.mode, alpha=dcfg.alpha,
            topk=dcfg.topk, add_tail=dcfg.add_tail, temperature=temperature,
            behaviour_logp=batch["completion_behaviour"], is_clip=dcfg.is_clip,
            agg=loss_cfg.agg, agg_alpha=loss_cfg.alpha, max_len=max_len,
        )  # fmt: skip
        return distill.mix_losses(p_loss, d_loss, dcfg.weight)

    want, want_grads = jax.value_and_grad(reference)(params)
    model = nnx.clone(dec)
    opt = nnx.Optimizer(model, optax.sgd(0.0), wrt=nnx.Param)
    update = sd._make_sdpo_update_fn(loss_cfg, dcfg, temperature, max_len, top_p)
    got = update(model, opt, nnx.clone(teacher), batch)
    assert float(got["distill_loss"]) > 0
    np.testing.assert_allclose(float(got["loss"]), float(want), rtol=1e-5)
    np.testing.assert_allclose(
        float(got["grad_norm"]), float(optax.global_norm(want_grads)), rtol=1e-5
    )


def test_ema_update_matches_numpy():
    rng = np.random.default_rng(0)
    t = {"a": rng.normal(size=(3, 2)), "b": [rng.normal(size=4)]}
    s = {"a": rng.normal(size=(3, 2)), "b": [rng.normal(size=4)]}
    out = sd.ema_update(jax.tree.map(jnp.float32, t), jax.tree.map(jnp.float32, s), 0.3)
    np.testing.assert_allclose(np.asarray(out["a"]), 0.7 * t["a"] + 0.3 * s["a"], rtol=1e-6)
    np.testing.assert_allclose(
        np.asarray(out["b"][0]), 0.7 * t["b"][0] + 0.3 * s["b"][0], rtol=1e-6
    )


def test_config_checks():
    with pytest.raises(ConfigError, match="context"):
        load_config("configs/rl/sdpo_tiny.yaml", ["distill.context=hint"])
    with pytest.raises(ConfigError, match="alpha"):
        load_config("configs/rl/sdpo_tiny.yaml", ["distill.mode=sampled_token"])
    with pytest.raises(ConfigError, match="kl_coef"):
        load_config("configs/rl/sdpo_tiny.yaml", ["loss.kl_coef=0.1"])


def _params(model):
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]


def test_tiny_sdpo_run_ema_teacher_and_resume(tmp_path):
    """One update, then preempted: the EMA teacher is (1 - r) θ0 + r θ1, the loss is the mix, the
    policy was evaluated before and after the update; a resumed trainer restores the teacher."""
    cfg = load_config("configs/rl/sdpo_tiny.yaml", ["checkpoint.save_every=1"])
    first = sd.SDPOTrainer(cfg, tmp_path)
    theta0 = _params(first.model)
    assert all(np.array_equal(a, b) for a, b in zip(theta0, _params(first.teacher)))
    stopped = first.run_until(1, progress=False)
    assert stopped["stopped_after_updates"] == 1
    r = cfg.distill.ema_rate
    theta1, teacher1 = _params(first.model), _params(first.teacher)
    assert any(not np.array_equal(a, b) for a, b in zip(theta0, theta1))
    for t0, t1, t in zip(theta0, theta1, teacher1):
        np.testing.assert_allclose(t, (1 - r) * t0 + r * t1, rtol=1e-5, atol=1e-7)

    (line,) = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = [json.loads(x) for x in (tmp_path / "evals.jsonl").read_text().splitlines()]
    assert [e["version"] for e in evals] == [0, 1]  # before training and after the update
    assert set(evals[-1]["in_domain"]) == {"add1", "sub1"} and set(evals[-1]["ood"]) == {"add2"}
    assert line["eval_ood_accuracy"] == evals[-1]["eval_ood_accuracy"]
    # every row had a teacher (the solution context); the loss is (1 - w) policy + w distill
    assert line["teacher_rows"] == 1.0 and line["distill_tokens"] > 0
    w = cfg.distill.weight
    assert line["loss"] == pytest.approx(
        (1 - w) * line["policy_loss"] + w * line["distill_loss"], rel=1e-5, abs=1e-7
    )

    resumed = sd.SDPOTrainer(cfg, tmp_path)  # a new process would do the same
    assert resumed.resumed_from == 1
    for a, b in zip(_params(resumed.teacher), teacher1):
        np.testing.assert_array_equal(a, b)


def test_rl_train_cli_dispatches_on_kind(tmp_path, capsys):
    """``rl train`` takes rl_sdpo configs (checked before any model loads) and refuses other kinds."""
    from jaxlab.cli import main

    work = tmp_path / "w"
    assert main(["rl", "train", "configs/rl/sdpo_tiny.yaml", "--set", "distill.context=hint",
                 "--workdir", str(work)]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert "distill.context" in err and "'hint' is not one of" in err and err.count("\n") == 1
    assert main(["rl", "train", "configs/sft_smollm2_arith.yaml", "--workdir", str(work)]) == 2
    assert "kind 'sft' is not an RL config" in capsys.readouterr().err
    assert not work.exists()
