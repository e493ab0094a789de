"""Every Python example in the README runs as written and prints what the README says it does.

Examples are matched to their checks by a distinctive line, not by position, so that new examples
do not shift the mapping; an example without a check still has to run.
"""

import ast
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def _lines(stdout):
    return stdout.rstrip("\n").splitlines()


def _models(stdout, workdir):
    shape, token, embedding = _lines(stdout)
    assert re.fullmatch(r"\(2, \d+, 49152\)", shape)  # (2, T, 49152)
    assert token == " Paris"
    emb_shape, cosine = embedding.rsplit(" ", 1)
    assert emb_shape == "(2, 384)"
    assert 0.5 < float(cosine) <= 1.0  # two sentences about a man eating: similar


def _generate(stdout, workdir):
    lines = _lines(stdout)
    assert "Paris" in lines[0] and lines[0].endswith("['eos']")
    assert lines[1].endswith("[0 0]")  # two samples of prompt 0
    top = ast.literal_eval(lines[-1])  # the 3 likeliest (token id, log-prob) at step 0
    assert len(top) == 3 and all(isinstance(t, int) and lp <= 0 for t, lp in top)
    assert [lp for _, lp in top] == sorted((lp for _, lp in top), reverse=True)


def _engine(stdout, workdir):
    lines = _lines(stdout)
    done = [line.split(" ", 2) for line in lines[:3]]
    assert sorted(int(i) for i, _, _ in done) == [0, 1, 2]
    assert all(reason == "eos" for _, reason, _ in done)
    label, occupancy = lines[3].rsplit(" ", 1)
    assert label == "mean slot occupancy" and 0 < float(occupancy) <= 1
    assert lines[4].strip() == "3, 4, 5,"  # streamed up to the stop string "6", which is cut


def _serving(stdout, workdir):
    reply, usage = stdout.split("CompletionUsage(", 1)  # the unstreamed reply, then its usage
    assert "Paris" in reply and "completion_tokens=" in usage


def _rl(stdout, workdir):
    # By hand: rewards [1, 0] give GRPO advantages ±0.5 / (std 0.7071 + 1e-6) = ±0.7071; equal
    # log-probs give ratio 1, so ℓ = -A per token: row sums -3·0.7071 (3 tokens) and +5·0.7071
    # (5 tokens). ΔL with α = 1 weights rows by 1/L: (-0.7071 + 0.7071) / ... = 0; nothing clipped.
    # Dr. GRPO's aggregate of ones: (3/8 + 5/8) / 2 rows = 0.5.
    first, second = _lines(stdout)
    loss, clip_frac = map(float, first.split())
    assert abs(loss) < 1e-6 and clip_frac == 0.0
    assert float(second) == pytest.approx(0.5, abs=1e-7)


def _ring(stdout, workdir):
    assert float(_lines(stdout)[0]) < 1e-5  # "~1e-7": float32 rounding


def _posir(stdout, workdir):
    ndcg, buckets = _lines(stdout)[0].split(" ", 1)
    assert 0.0 <= float(ndcg) <= 1.0
    psi = ast.literal_eval(buckets)
    assert psi and all(re.fullmatch(r"Q\d", b) and math.isfinite(v) for b, v in psi.items())


def _config(stdout, workdir):
    assert _lines(stdout) == ["1e-05 3"]  # the overrides took effect


def _train(stdout, workdir):
    assert float(_lines(stdout)[0]) < 4.0  # below chance level, ln 64 = 4.16, after 20 steps
    steps = sorted(int(p.name) for p in (workdir / "ckpt").iterdir() if p.name.isdigit())
    assert steps == [10, 20]  # save_every=10, keep=2


# a line that identifies an example -> the check of its output
CHECKS = {
    "print(logits.shape)": _models,
    'generate(model, tokenizer, ["Once upon a time"], params)': _generate,
    "engine = Engine(model, num_slots=4": _engine,
    "with BackgroundServer(": _serving,
    "loss, metrics = rl.policy_loss(": _rl,
    "out = ring_attention(q, k, v, mesh=mesh": _ring,
    "report = evaluate_posir(data, model, tokenizer": _posir,
    'cfg = load_config("configs/lm_tiny.yaml"': _config,
    'with Checkpointer("/tmp/jaxlab_ckpt"': _train,
}


def test_readme_has_examples():
    assert len(BLOCKS) >= 4


@pytest.mark.parametrize("key", CHECKS)
def test_every_check_finds_its_example(key):
    assert sum(key in block for block in BLOCKS) == 1, f"no single README example contains {key!r}"


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index, tmp_path):
    code = BLOCKS[index].replace("/tmp/jaxlab_ckpt", str(tmp_path / "ckpt"))
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=README.parent
    )
    assert out.returncode == 0, out.stderr[-3000:]
    for key, check in CHECKS.items():
        if key in BLOCKS[index]:
            check(out.stdout, tmp_path)
