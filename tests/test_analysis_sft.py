"""Supervised fine-tuning (jaxlab.sft) and the analysis traces: the assistant-token mask on a real
chat template, packing by hand, the loss against float64 numpy, the export of the trained model, a short
training run with an Orbax resume, the trace styles and the command line."""

from __future__ import annotations

import dataclasses
import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlab import analysis, sft
from jaxlab.analysis.traces import solve_steps
from jaxlab.models import Decoder, DecoderConfig, from_pretrained, save_pretrained
from jaxlab.rl.tasks import ArithmeticTask
from jaxlab.testing.char_tokenizer import char_tokenizer


@pytest.fixture(scope="module")
def smol_tokenizer():
    from jaxlab.models.registry import SMOLLM2_GGUF, package_path
    from jaxlab.tokenization import Tokenizer

    return Tokenizer.from_gguf(package_path(SMOLLM2_GGUF))  # installed by the Makefile


CONV = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2 + 3?"},
    {"role": "assistant", "content": "2 + 3 = 5.\n<answer>5</answer>"},
    {"role": "user", "content": "And 4 + 4?"},
    {"role": "assistant", "content": "Wait, 4 + 4 = 8."},
]


def test_assistant_mask_on_the_chat_template(smol_tokenizer):
    tok = smol_tokenizer
    ids, mask = sft.chat_example_tokens(tok, CONV)
    full = tok.encode(
        tok.apply_chat_template(CONV, add_generation_prompt=False), add_special_tokens=False
    )
    assert ids == full[: len(ids)] and len(ids) == len(mask)
    ids, mask = np.asarray(ids), np.asarray(mask, bool)
    # the loss tokens are exactly each assistant turn's content and its end-of-turn token
    starts = np.flatnonzero(mask & ~np.r_[False, mask[:-1]])
    ends = np.flatnonzero(mask & ~np.r_[mask[1:], False]) + 1
    pieces = [tok.decode(ids[a:b], skip_special_tokens=False) for a, b in zip(starts, ends)]
    assert pieces == [CONV[2]["content"] + "<|im_end|>", CONV[4]["content"] + "<|im_end|>"]
    # and nothing of the system / user turns or the role headers
    context = tok.decode(ids[~mask], skip_special_tokens=False)
    assert "What is 2 + 3?" in context and "assistant\n" in context and "= 5" not in context


def test_no_loss_spans_mask_exactly_the_slip_tokens(smol_tokenizer):
    tok = smol_tokenizer
    task = ArithmeticTask(digits=2, terms=3, ops="+", seed=0)
    data = analysis.trace_dataset("epistemic", 6, ops="+", mask_slips=True)
    n_masked = 0
    for ex, plain in zip(data, analysis.trace_dataset("epistemic", 6, ops="+")):
        reply = ex["messages"][1]
        assert reply["content"] == plain["messages"][1]["content"]
        ids, mask = sft.chat_example_tokens(tok, ex["messages"])
        ids0, mask0 = sft.chat_example_tokens(tok, plain["messages"])
        assert ids == ids0
        # the tokens that lost their loss spell the planted wrong results, in order
        dropped = [i for i, (m, m0) in enumerate(zip(mask, mask0)) if m != m0]
        assert all(mask0[i] == 1 and mask[i] == 0 for i in dropped)
        wrong = [reply["content"][a:b] for a, b in reply["no_loss"]]
        assert tok.decode([ids[i] for i in dropped]) == "".join(wrong)
        for w in wrong:  # each span is a slip: the check line below it says "not w"
            assert f", not {w}." in reply["content"]
            assert int(w) not in [
                s.result for s in solve_steps(task.problem(ex["index"]).meta["expression"])
            ]
        n_masked += len(dropped)
    assert n_masked > 0
    bad = {"role": "assistant", "content": "2 + 3 = 5.", "no_loss": [[4, 40]]}
    with pytest.raises(ValueError, match="outside"):
        sft.chat_example_tokens(tok, [CONV[1], bad])


def test_slip_spans_by_hand():
    text = "First, 63 + 77 = 130.\nWait: so 140. So it is 140, not 130.\nThen, 140 + 1 = 141."
    assert analysis.traces.slip_spans(text) == [(17, 20)]
    assert analysis.traces.slip_spans(text.replace("not 130", "not 131")) == []


def test_conversation_without_assistant_is_an_error(smol_tokenizer):
    with pytest.raises(ValueError, match="assistant"):
        sft.chat_example_tokens(smol_tokenizer, CONV[:2])


def test_packing_by_hand():
    ex = [([1, 2, 3], [0, 1, 1]), ([4, 5, 6, 7], [0, 0, 1, 1]), ([8, 9], [1, 1])]
    rows = sft.pack_examples(ex, 6, pad_id=0)
    np.testing.assert_array_equal(rows["tokens"], [[1, 2, 3, 0, 0, 0], [4, 5, 6, 7, 8, 9]])
    np.testing.assert_array_equal(rows["loss_mask"], [[0, 1, 1, 0, 0, 0], [0, 0, 1, 1, 1, 1]])
    np.testing.assert_array_equal(rows["attention_mask"], [[1, 1, 1, 0, 0, 0], [1] * 6])
    rows = sft.pack_examples(ex, 3, pad_id=0, packing=False)  # one per row, the long one truncated
    np.testing.assert_array_equal(rows["tokens"], [[1, 2, 3], [4, 5, 6], [8, 9, 0]])
    np.testing.assert_array_equal(rows["loss_mask"], [[0, 1, 1], [0, 0, 1], [1, 1, 0]])


@nnx.jit
def _forward(model, ids, mask):
    return model(ids, attention_mask=mask)


def _tiny(vocab, tie=False, seed=0):
    cfg = DecoderConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
        num_kv_heads=2, max_position_embeddings=64, tie_word_embeddings=tie,
    )  # fmt: skip
    return Decoder(cfg, rngs=nnx.Rngs(seed))


def test_sft_loss_against_float64_numpy():
    model = _tiny(40)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 40, size=(3, 9)).astype(np.int32)
    loss_mask = (rng.random((3, 9)) < 0.5).astype(np.int32)
    attn = np.ones((3, 9), np.int32)
    attn[2, 6:] = 0
    loss_mask[2, 6:] = 0
    got = float(sft.sft_loss(model, jnp.asarray(tokens), jnp.asarray(loss_mask), jnp.asarray(attn)))
    # each row alone: its real tokens, then zeros and no attention mask (causality alone keeps
    # what follows out of the scored positions; one compiled shape for every row)
    nll, n = 0.0, 0
    for b in range(3):
        real = int(attn[b].sum())
        row = np.zeros((1, 9), np.int32)
        row[0, :real] = tokens[b, :real]
        row = jnp.asarray(row)
        logits = np.asarray(_forward(model, row, jnp.ones_like(row)))[0].astype(np.float64)
        for t in range(1, real):
            if loss_mask[b, t]:
                z = logits[t - 1]
                nll -= z[tokens[b, t]] - z.max() - np.log(np.exp(z - z.max()).sum())
                n += 1
    assert got == pytest.approx(nll / n, rel=1e-5)


def test_train_sft_learns_resumes_and_exports(tmp_path):
    tok = char_tokenizer()  # its chat template: each message's content on its own line
    base = save_pretrained(_tiny(tok.vocab_size, seed=4), tok, tmp_path / "base")
    data = analysis.trace_dataset("epistemic", 8, digits=1, terms=2, ops="+")
    analysis.write_sft_jsonl(data, tmp_path / "d.jsonl")
    cfg = sft.SFTConfig(
        model=str(base),
        data=sft.SFTDataConfig(path=str(tmp_path / "d.jsonl"), seq_len=256, batch_size=2),
        train=sft.OptimConfig(lr=1e-2, warmup_steps=0, steps=8),
        checkpoint=sft.CheckpointConfig(save_every=4, keep=2, async_save=False),
        log_every=4,
    )
    work = tmp_path / "run"
    sft.train_sft(cfg, work, progress=False)
    lines = [json.loads(x) for x in (work / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [4, 8]
    first_loss = lines[0]["loss"]
    # resume: the run continues from the Orbax checkpoint of step 8 up to 12
    cfg2 = dataclasses.replace(cfg, train=sft.OptimConfig(lr=1e-2, warmup_steps=0, steps=12))
    sft.train_sft(cfg2, work, progress=False)
    lines = [json.loads(x) for x in (work / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [4, 8, 12]
    assert lines[-1]["loss"] < first_loss

    # the exported model is the trained one: lower loss on the data than the base model
    def loss_of(path):
        model, _ = from_pretrained(path)
        rows = sft.pack_examples(
            [sft.chat_example_tokens(tok, d["messages"]) for d in data], 256, pad_id=0
        )
        return float(
            nnx.jit(sft.sft_loss)(
                model, *(jnp.asarray(rows[k]) for k in ("tokens", "loss_mask", "attention_mask"))
            )
        )

    assert loss_of(work / "model") < loss_of(base) - 0.5


# -- traces ---------------------------------------------------------------------------------------


def test_column_check_and_hard_steps_by_hand():
    from jaxlab.analysis.traces import Step, column_check, is_hard

    assert column_check(Step(158, "+", 93, 251)) == (
        "8 + 3 = 11, 5 + 9 + 1 = 15, 1 + 0 + 1 = 2, so 251"
    )
    assert column_check(Step(63, "+", 77, 140)) == "3 + 7 = 10, 6 + 7 + 1 = 14, so 140"
    assert column_check(Step(148, "+", 13, 161)) == "8 + 3 = 11, 4 + 1 + 1 = 6, 1 + 0 = 1, so 161"
    assert column_check(Step(21, "+", 63, 84)) == "1 + 3 = 4, 2 + 6 = 8, so 84"
    with pytest.raises(ValueError):
        column_check(Step(5, "-", 3, 2))
    assert [is_hard(Step(a, "+", b, a + b)) for a, b in ((63, 77), (21, 63), (15, 5), (14, 5))] == [
        True, False, True, False,
    ]  # fmt: skip
    assert is_hard(Step(52, "-", 19, 33)) and not is_hard(Step(59, "-", 12, 47))
    assert is_hard(Step(12, "*", 13, 156)) and not is_hard(Step(12, "*", 3, 36))


def _check_line_is_true(line: str, step_result: int) -> int:
    """Every one-digit sum of a column check holds and its 'so V' is the step's result; returns
    the value the line ends on ('So it is R[, not W].')."""
    body, end = line.split(": ", 1)[1].split(". So it is ")
    *columns, last = body.split(", ")
    assert last == f"so {step_result}", line
    for col in columns:
        lhs, rhs = col.split(" = ")
        assert sum(int(x) for x in lhs.split(" + ")) == int(rhs), col
    return int(end.split(",")[0].rstrip("."))


def test_trace_styles_share_the_solver_and_check_the_hard_steps():
    from jaxlab.analysis.traces import is_hard, solve_steps

    task = ArithmeticTask(digits=2, terms=3, ops="+", seed=0)
    n_slips = n_checks = 0
    for i in range(60):
        p = task.problem(i)
        traces = {
            s: analysis.write_trace(p, s, index=i) for s in ("procedural", "epistemic", "synonym")
        }
        for s, t in traces.items():
            assert t.endswith(f"<answer>{p.answer}</answer>"), s
            assert task.reward(p, t) == 1.0
        assert analysis.count_epistemic(traces["procedural"], "word_boundary") == 0
        assert analysis.count_epistemic(traces["synonym"], "word_boundary") == 0
        assert analysis.count_epistemic(traces["synonym"], "substring") == 0
        # the synonym trace is the epistemic one with the marker phrase swapped
        assert (
            traces["synonym"].replace("Next, let me verify: ", "Wait, let me check: ")
            == (traces["epistemic"])
        )
        # a check (and its markers) follows exactly the hard steps; its column sums are true, it
        # ends on the true result, and a slip written above it is named and not carried on
        steps = solve_steps(p.meta["expression"])
        lines = traces["epistemic"].splitlines()[:-1]
        k = 0
        for j, line in enumerate(lines):
            if line.startswith("Wait, let me check: "):
                continue
            s = steps[k]
            written = int(line.rsplit(" = ", 1)[1].rstrip("."))
            checked = j + 1 < len(lines) and lines[j + 1].startswith("Wait")
            assert checked == is_hard(s), line
            if checked:
                n_checks += 1
                assert _check_line_is_true(lines[j + 1], s.result) == s.result
                assert analysis.count_epistemic(lines[j + 1], "word_boundary") == 2
                if written != s.result:
                    n_slips += 1
                    assert lines[j + 1].endswith(f"not {written}.")
            else:
                assert written == s.result, line
            k += 1
        assert k == len(steps)
    assert n_checks > 40 and 0.3 < n_slips / n_checks < 0.7


def test_tens_first_checks_are_true_and_match_the_column_traces():
    task = ArithmeticTask(digits=2, terms=3, ops="+", seed=0)
    for i in range(30):
        p = task.problem(i)
        cols = analysis.write_trace(p, "epistemic", index=i).splitlines()
        tens = analysis.write_trace(p, "epistemic", index=i, check="tens").splitlines()
        assert len(cols) == len(tens)
        for a, b in zip(cols, tens):
            if not b.startswith("Wait, let me check: "):
                assert a == b  # the same steps, slips and answer; only the check differs
                continue
            assert a.split(". So it is ")[1] == b.split(". So it is ")[1]
            chain = b.split(": ", 1)[1].split(". ")[0].split(" = ")
            assert len(chain) == 4 and len({eval(x) for x in chain}) == 1, b  # noqa: S307
    with pytest.raises(ValueError):
        analysis.write_trace(task.problem(0), "epistemic", check="digits")


def test_check_outcomes_by_hand():
    from jaxlab.analysis.traces import check_outcomes

    text = (
        "First, 63 + 77 = 130.\n"  # wrong, fixed
        "Wait, let me check: 3 + 7 = 10, 6 + 7 + 1 = 14, so 140. So it is 140, not 130.\n"
        "Then, 140 + 15 = 155.\n"  # right, kept
        "Hold on: 0 + 5 = 5, 4 + 1 = 5, 1 + 0 = 1, so 155. So it is 155.\n"
        "Then, 155 + 9 = 164.\n"  # right, unchecked
        "Then, 164 + 8 = 170.\n"  # wrong, check missed it
        "Wait, let me check: 4 + 8 = 12, so 170. So it is 170.\n"
        "Then, 170 + 1 = 171.\n"  # right, check broke it
        "Wait, let me check: so 172. So it is 172, not 171.\n"
        "Finally, 172 - 2 = 17.\n"  # wrong, unchecked
        "<answer>17</answer>"
    )
    assert check_outcomes(text) == {
        "fixed": 1, "missed": 1, "kept": 1, "broken": 1, "unchecked_right": 1, "unchecked_wrong": 1,
    }  # fmt: skip
    task = ArithmeticTask(digits=2, terms=3, ops="+", seed=0)
    for i in range(20):  # the written traces: every slip fixed, every other step right
        c = check_outcomes(analysis.write_trace(task.problem(i), "synonym", index=i))
        assert c["missed"] == c["broken"] == c["unchecked_wrong"] == 0


def test_carry_traces_doubt_the_hard_steps_before_their_result():
    from jaxlab.analysis.traces import (
        SYNONYM_WORDS,
        Step,
        carry_note,
        is_hard,
        solve_steps,
        step_outcomes,
    )

    assert carry_note(Step(94, "+", 39, 133)) == "4 + 9 = 13"
    assert carry_note(Step(53, "-", 29, 24)) == "13 - 9 = 4"
    assert carry_note(Step(23, "*", 45, 1035)) == "23 * 45 = 40 * 23 + 5 * 23 = 920 + 115 = 1035"
    task = ArithmeticTask(digits=2, terms=3, ops="+-*", seed=0)
    n_doubts = 0
    for i in range(60):
        p = task.problem(i)
        ep, syn, proc = (
            analysis.write_trace(p, s, index=i, check="carry")
            for s in ("epistemic", "synonym", "procedural")
        )
        assert task.reward(p, ep) == task.reward(p, syn) == 1.0
        assert syn.replace("Note, ", "Wait, ") == ep
        # the own-word control bans the lead word of every synonym line
        for line in syn.splitlines():
            if ". " in line and "<answer>" not in line:
                assert line.split(". ", 1)[1].split(",")[0].lower() in SYNONYM_WORDS
        assert analysis.count_epistemic(syn, "word_boundary") == 0
        assert proc == analysis.write_trace(p, "procedural", index=i)
        steps = solve_steps(p.meta["expression"])
        lines = ep.splitlines()[:-1]
        assert len(lines) == len(steps)  # one line per step, nothing planted
        for s, line in zip(steps, lines):
            expr = f"{s.left} {s.op} {s.right}"
            if is_hard(s):
                n_doubts += 1
                note = line.split(". Wait, ", 1)[1].rsplit(", so ", 1)
                assert note[1] == f"{expr} = {s.result}."
                stages = note[0].split(" = ")  # every stage of the shown work is true
                assert len(stages) >= 2 and len({eval(x) for x in stages}) == 1, line  # noqa: S307
                assert analysis.count_epistemic(line, "word_boundary") == 1
            else:
                assert line.endswith(f"{expr} = {s.result}.") and "Wait" not in line
        c = step_outcomes(ep)
        hard = sum(is_hard(s) for s in steps)
        assert c["hard_doubted_right"] == hard and c["easy_plain_right"] == len(steps) - hard
        assert sum(c.values()) == len(steps)
    assert n_doubts > 40
    # generated text: judged on the operands it wrote, any wording
    assert step_outcomes(
        "First, 94 + 39. Hmm, 4 + 9 = 13, so 94 + 39 = 123.\n"  # hard, doubted, wrong
        "Then, 123 + 41 = 164.\n"  # easy, plain, right
        "Then, 164 + 28 = 182.\n"  # hard, plain, wrong
        "Finally, 192 + 3. Note, 2 + 3 = 5, so 192 + 3 = 195.\n<answer>195</answer>"
    ) == {
        "hard_doubted_right": 0, "hard_doubted_wrong": 1, "hard_plain_right": 0,
        "hard_plain_wrong": 1, "easy_doubted_right": 1, "easy_doubted_wrong": 0,
        "easy_plain_right": 1, "easy_plain_wrong": 0,
    }  # fmt: skip


def test_analyze_count_and_traces_commands(tmp_path, capsys):
    from jaxlab.cli import main

    tok = char_tokenizer()
    path = save_pretrained(_tiny(tok.vocab_size, seed=2), tok, tmp_path / "m")
    recs = [
        {"prompt": "1+2?", "response": "1 + 2 = 3.\nwait, yes 3.", "answer": "3"},
        {"prompt": "2+2?", "response": "2 + 2 = 4.", "answer": "4"},
    ]
    src = tmp_path / "t.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert main(["analyze", "count", "--input", str(src), "--out-dir", str(tmp_path / "c")]) == 0
    counts = json.loads((tmp_path / "c" / "count.json").read_text())
    assert counts["substring"]["total"] == 1 and counts["word_boundary"]["per_problem"] == 0.5
    out = tmp_path / "o"
    argv = [
        "analyze",
        "traces",
        "--model",
        str(path),
        "--input",
        str(src),
        "--out-dir",
        str(out),
        "--no-chat",
    ]
    assert main(argv) == 0
    res = json.loads((out / "traces.json").read_text())
    assert (out / "traces.png").stat().st_size > 1000
    assert res["traces"][0]["epistemic"][11:15] == [1, 1, 1, 1]
    assert res["markers"]["per_1k_tokens"] == pytest.approx(1000 / (23 + 10))
    assert main(argv) == 2  # outputs exist: --overwrite is needed
    assert "--overwrite" in capsys.readouterr().err
