"""jaxlab.analysis: marker counters (both conventions) on hand-written texts, surface forms, token
masks, self-information against a direct float64 computation, answer sufficiency on a tiny model
trained to a known answer distribution, the HSIC nCCA estimator against float64 numpy, and the
suppression logit bias actually removing the marker tokens."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxlab import analysis
from jaxlab.analysis import information, markers, mi, sufficiency
from jaxlab.models import Decoder, DecoderConfig
from jaxlab.testing.char_tokenizer import char_tokenizer

# -- counters ------------------------------------------------------------------------------------

TEXT = "Wait, checking this: hmmm, I am not sure. Maybe it is incorrect? Check 2wait correctly."


def test_count_substring_convention_by_hand():
    # lowercase substrings of the 10 words: wait (Wait, 2wait), hmm (in hmmm), maybe, check
    # (checking, Check); 'sure' and 'correct' are not in the 10-word list
    got = analysis.count_epistemic_by_word(TEXT, "substring")
    assert {w: c for w, c in got.items() if c} == {"wait": 2, "hmm": 1, "maybe": 1, "check": 2}
    assert list(got) == list(markers.SUBSTRING_WORDS) and len(got) == 10
    assert analysis.count_epistemic(TEXT, convention="substring") == 6
    # the reference script's own computation: text.lower().count(word)
    assert analysis.count_epistemic(TEXT, "substring") == sum(
        TEXT.lower().count(w) for w in markers.SUBSTRING_WORDS
    )


def test_count_word_boundary_convention_by_hand():
    # 13 words, no letter may touch a match: hmmm, checking, incorrect, correctly do not count;
    # 2wait does (a digit is a boundary); 'sure' counts here and not in the substring convention
    got = analysis.count_epistemic_by_word(TEXT, "word_boundary")
    assert {w: c for w, c in got.items() if c} == {"wait": 2, "maybe": 1, "sure": 1, "check": 1}
    assert len(got) == 13 and set(markers.SUBSTRING_WORDS) < set(got)
    assert set(got) - set(markers.SUBSTRING_WORDS) == {"guess", "sure", "correct"}
    assert analysis.count_epistemic(TEXT, convention="word_boundary") == 5


@pytest.mark.parametrize(
    "text, substring, word_boundary",
    [
        ("", 0, 0),
        ("The answer is 12.", 0, 0),
        ("WAIT WAIT wait", 3, 3),
        ("waiting awaited", 2, 0),  # inflections count only as substrings
        ("I guess it is correct, I am sure.", 0, 3),  # words only the 13-word list has
        ("hmmhmm", 2, 0),  # non-overlapping substrings; letters touch on both sides
        ("check_this wait_", 2, 2),  # an underscore is a boundary for the regex
        ("mighty likelyhood", 2, 0),
    ],
)
def test_conventions_differ_as_documented(text, substring, word_boundary):
    assert analysis.count_epistemic(text, "substring") == substring
    assert analysis.count_epistemic(text, "word_boundary") == word_boundary


def test_unknown_convention_names_the_known_ones():
    with pytest.raises(ValueError, match="substring"):
        analysis.count_epistemic("wait", convention="regex")


def test_epistemic_stats_rates_by_hand():
    responses = [["Wait. Hmm.", "ok"], ["maybe maybe maybe"]]
    tokens = [[10, 30], [60]]
    s = analysis.epistemic_stats(responses, convention="word_boundary", token_counts=tokens)
    assert s.total == 5 and s.num_responses == 3 and s.num_problems == 2
    assert s.per_response == pytest.approx(5 / 3)
    assert s.per_problem == pytest.approx(5 / 2)
    assert s.per_1k_tokens == pytest.approx(1000 * 5 / 100)
    assert s.per_problem_totals == [2, 3]
    assert s.by_word["maybe"] == 3 and s.by_word["wait"] == 1 and s.by_word["hmm"] == 1


def test_marker_token_mask_on_a_char_tokenizer():
    tok = char_tokenizer()
    text = "so, wait: 12 is sure"
    ids = tok.encode(text, add_special_tokens=False)
    assert len(ids) == len(text)  # one token per character
    mask = analysis.epistemic_token_mask(tok, ids, "word_boundary")
    want = np.zeros(len(text), bool)
    want[4:8] = True  # wait
    want[16:20] = True  # sure
    np.testing.assert_array_equal(mask, want)
    # the substring convention has no 'sure'
    want[16:20] = False
    np.testing.assert_array_equal(analysis.epistemic_token_mask(tok, ids, "substring"), want)


def test_spans_to_token_mask_partial_overlap():
    offsets = np.array([[0, 3], [3, 5], [5, 9], [9, 9], [9, 12]])
    # a marker spanning chars 4..6 touches tokens 1 and 2; the empty token 3 never counts
    np.testing.assert_array_equal(
        markers.spans_to_token_mask([(4, 6), (9, 9)], offsets), [False, True, True, False, False]
    )


# -- surface forms -------------------------------------------------------------------------------


def test_surface_forms_of_a_word():
    forms = analysis.expand_surface_forms("wait")
    want = set()
    for case in ("wait", "Wait", "WAIT"):
        for pre in ("", " ", "\n", "\n ", "\t"):
            for suf in ("", ".", ",", ":", ";", "!", "?"):
                want.add(pre + case + suf)
    assert forms == want and len(forms) == 3 * 5 * 7
    assert " Wait," in forms and "\n WAIT?" in forms and "wait " not in forms


class _WordTokenizer:
    """A tokenizer stand-in whose single tokens are listed strings (everything else two tokens)."""

    def __init__(self, vocab):
        self.vocab = {s: i for i, s in enumerate(vocab)}

    def encode(self, text, add_special_tokens=False):
        return [self.vocab[text]] if text in self.vocab else [900, 901]


def test_single_token_surface_ids_keep_only_single_tokens():
    tok = _WordTokenizer(["wait", " Wait", "\nHMM", " hmm,", "waiting", " sure"])
    ids, matched = analysis.single_token_surface_ids(tok, ["wait", "hmm"])
    assert ids == [0, 1, 2, 3]  # 'waiting' is not a surface form; 'sure' was not asked for
    assert matched == {"wait": [" Wait", "wait"], "hmm": ["\nHMM", " hmm,"]}


# -- self-information ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    tok = char_tokenizer()
    cfg = DecoderConfig(
        vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_layers=2,
        num_heads=4, num_kv_heads=2, max_position_embeddings=128,
    )  # fmt: skip
    return Decoder(cfg, rngs=nnx.Rngs(3)), tok


@nnx.jit
def _forward(model, ids):
    return model(ids)


def _direct_logprobs(model, ids, width=64):
    """float64 log p(x_t | x_<t) of one row, from the model's logits on that row alone, right-padded
    with zeros to ``width`` and no attention mask: causality alone keeps the padding out of the
    first len(ids) positions (one compiled shape for every row)."""
    ids = np.asarray(ids)
    padded = np.zeros((1, width), np.int32)
    padded[0, : len(ids)] = ids
    logits = np.asarray(_forward(model, jnp.asarray(padded))[0, : len(ids)], np.float64)
    logits -= logits.max(-1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    return np.concatenate([[0.0], logp[np.arange(len(ids) - 1), ids[1:]]])


def test_token_logprobs_batched_equal_direct_computation(tiny):
    model, tok = tiny
    rows = [tok.encode(t, add_special_tokens=False) for t in ("abc wait 12", "x", "hmm, 3 + 4 = 7")]
    got = analysis.token_logprobs(model, rows, batch_size=2, pad_id=tok.pad_token_id)
    for r, lp in zip(rows, got):
        assert lp.shape == (len(r),)
        np.testing.assert_allclose(lp, _direct_logprobs(model, np.asarray(r)), atol=2e-5)


def test_self_information_from_logits_against_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 5, 7)) * 3
    tokens = rng.integers(0, 7, size=(2, 5))
    mask = np.array([[1, 1, 1, 1, 0], [1, 1, 0, 1, 1]])
    got = np.asarray(
        information.self_information_from_logits(
            jnp.asarray(logits, jnp.float32), jnp.asarray(tokens), jnp.asarray(mask)
        )
    )
    want = np.zeros((2, 5))
    for b in range(2):
        for t in range(1, 5):
            z = logits[b, t - 1]
            want[b, t] = mask[b, t] * -(
                z[tokens[b, t]] - z.max() - np.log(np.exp(z - z.max()).sum())
            )
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_trace_information_split_segments_and_stagnation(tiny):
    model, tok = tiny
    prompt, response = "Q: 1+2?", "1 + 2 = 3.\nwait, check: 3.\nyes"
    (tr,) = analysis.trace_information(model, tok, [prompt], [response], chat=False)
    p = tok.encode(prompt)
    direct = -_direct_logprobs(
        model, np.asarray(p + tok.encode(response, add_special_tokens=False))
    )
    np.testing.assert_allclose(tr.info, direct[len(p) :], atol=2e-5)
    want_epi = np.zeros(len(response), bool)
    want_epi[11:15] = want_epi[17:22] = True  # 'wait', 'check'
    np.testing.assert_array_equal(tr.epistemic, want_epi)
    np.testing.assert_array_equal(tr.segments, [0] * 11 + [1] * 16 + [2] * 3)
    cum = tr.cumulative()
    np.testing.assert_allclose(cum["epistemic"][-1], tr.info[want_epi].sum(), rtol=1e-12)
    np.testing.assert_allclose(
        cum["procedural"][-1] + cum["epistemic"][-1], tr.info.sum(), rtol=1e-12
    )
    g = tr.segment_gain()
    for s in range(3):
        sel = tr.segments == s
        np.testing.assert_allclose(g["procedural"][s], tr.info[sel & ~want_epi].sum(), rtol=1e-12)
        np.testing.assert_allclose(g["epistemic"][s], tr.info[sel & want_epi].sum(), rtol=1e-12)


def test_jnp_split_cumulative_and_segments_against_numpy():
    rng = np.random.default_rng(4)
    info = rng.random((2, 9))
    epi = rng.random((2, 9)) < 0.3
    mask = np.ones((2, 9), bool)
    mask[1, 7:] = False
    e, p = information.split_information(jnp.asarray(info), jnp.asarray(epi), jnp.asarray(mask))
    np.testing.assert_allclose(e, info * (epi & mask), rtol=1e-6)
    np.testing.assert_allclose(p, info * (~epi & mask), rtol=1e-6)
    np.testing.assert_allclose(
        information.cumulative_information(jnp.asarray(info), jnp.asarray(mask)),
        np.cumsum(info * mask, axis=1),
        rtol=1e-6,
    )
    seg = np.array([0, 0, 1, 1, 1, -1, 2, 2, 2])
    got = information.segment_information_gain(jnp.asarray(info[0]), jnp.asarray(seg), 3)
    np.testing.assert_allclose(
        got, [info[0, :2].sum(), info[0, 2:5].sum(), info[0, 6:].sum()], rtol=1e-6
    )


def test_stagnation_onset_by_hand():
    gain = np.array([5.0, 4.0, 0.1, 0.0, 3.0, 0.2, 0.1, 0.05])
    toks = np.array([5, 5, 5, 0, 5, 5, 5, 5])
    # rates 1, .8, .02, (no tokens: skipped), .6, .04, .02, .01 -> first run of 2 below .1 at 5
    assert analysis.stagnation_onset(gain, toks, threshold=0.1, patience=2) == 5
    assert analysis.stagnation_onset(gain, toks, threshold=0.1, patience=1) == 2
    assert analysis.stagnation_onset(gain, toks, threshold=0.001, patience=1) == -1


# -- answer sufficiency --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fixed_answer_model():
    """A tiny char model trained to a known answer distribution after the '=' prefix:
    'Qa=' -> 42 or 17 (half each), 'Qab=' -> 42; answers end with '.'."""
    tok = char_tokenizer()
    cfg = DecoderConfig(
        vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_layers=2,
        num_heads=4, num_kv_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    model = Decoder(cfg, rngs=nnx.Rngs(0))
    texts = ["Qa=42.", "Qa=17.", "Qab=42.", "Qab=42."]
    rows = [tok.encode(t, add_special_tokens=False) + [tok.eos_token_ids[0]] for t in texts]
    width = max(map(len, rows))
    ids = np.zeros((len(rows), width), np.int32)
    w = np.zeros((len(rows), width), np.float32)
    for i, (t, r) in enumerate(zip(texts, rows)):
        ids[i, : len(r)] = r
        w[i, t.index("=") + 1 : len(r)] = 1.0  # the answer, '.' and EOS carry the loss
    ids, w = jnp.asarray(ids), jnp.asarray(w)
    opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

    @nnx.jit
    def step(model, opt):
        def loss_fn(m):
            lp = jax.nn.log_softmax(m(ids)[:, :-1], -1)
            nll = -jnp.take_along_axis(lp, ids[:, 1:, None], -1)[..., 0]
            return jnp.sum(nll * w[:, 1:]) / jnp.sum(w[:, 1:])

        loss, g = nnx.value_and_grad(loss_fn)(model)
        opt.update(model, g)
        return loss

    for _ in range(300):
        loss = step(model, opt)
    # the data's own entropy: the first digit after 'Qa=' (2 of 16 scored tokens) is a coin flip
    assert float(loss) < 2 * math.log(2) / 16 + 0.03
    return model, tok


def test_sufficiency_curve_on_a_known_answer_distribution(fixed_answer_model, monkeypatch):
    model, tok = fixed_answer_model
    calls = []
    real = sufficiency.generate_rows
    monkeypatch.setattr(
        sufficiency, "generate_rows", lambda *a, **k: calls.append(a[1].shape) or real(*a, **k)
    )
    prompt = tok.encode("Q", add_special_tokens=False)
    resp = tok.encode("ab", add_special_tokens=False)
    k = 128
    c = analysis.answer_sufficiency(
        model, tok, prompt, resp, "42", checkpoints=[1, 2], answer_prefix="=", answer_suffix=".",
        num_samples=k, temperature=1.0, max_answer_tokens=4, seed=0,
    )  # fmt: skip
    assert len(calls) == 1 and calls[0][0] == 2  # both checkpoints, K samples each: one batch
    # teacher-forced log p('42.' | s_t) against the direct float64 computation of each row
    for j, t in enumerate([1, 2]):
        row = prompt + resp[:t] + tok.encode("=42.", add_special_tokens=False)
        np.testing.assert_allclose(
            c.logp_answer[j], _direct_logprobs(model, np.asarray(row))[-3:].sum(), atol=1e-4
        )
    # known distribution: after 'a' half the mass is on 42, after 'ab' all of it
    assert c.logp_answer[0] == pytest.approx(math.log(0.5), abs=0.1)
    assert c.logp_answer[1] > -0.05

    # entropy of the sampled answers against the model's exact answer entropy (both answers scored)
    def p_of(t, ans):
        row = prompt + resp[:t] + tok.encode("=" + ans + ".", add_special_tokens=False)
        return math.exp(_direct_logprobs(model, np.asarray(row))[-len(ans) - 1 :].sum())

    p42, p17 = p_of(1, "42"), p_of(1, "17")
    rest = max(1.0 - p42 - p17, 0.0)
    exact = -sum(p * math.log(p) for p in (p42, p17, rest) if p > 0)
    sd = math.sqrt(p42 * (1 - p42) / k)  # of the sampled frequency of 42
    assert c.entropy[0] == pytest.approx(exact, abs=0.1)
    assert c.accuracy[0] == pytest.approx(p42, abs=4 * sd)
    assert c.entropy[1] == 0.0 and c.accuracy[1] == 1.0


def test_empirical_entropy_by_hand():
    assert analysis.empirical_entropy(["a", "a", "b", "c"]) == pytest.approx(
        -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25))
    )
    assert analysis.empirical_entropy(["x"] * 5) == 0.0
    np.testing.assert_array_equal(analysis.checkpoint_positions(10, 6), [0, 2, 4, 6, 8, 10])


# -- HSIC normalized CCA -------------------------------------------------------------------------


def _hsic_reference_f64(x, y, sigma=50.0, eps=1e-5):
    """The reference's formula in float64 numpy: distance via |r - 2xxᵀ + rᵀ|, Gaussian kernel with
    variance 2σ²·1, right-centring K H, explicit inverses, sum(Rx ∘ Ryᵀ)."""

    def kc(v):
        v = v.reshape(-1, 1).astype(np.float64)
        m = len(v)
        r = (v * v).sum(1).reshape(-1, 1)
        d = np.abs(r - 2 * v @ v.T + r.T)
        k = np.exp(-d / (2.0 * sigma * sigma * v.shape[1]))
        h = np.eye(m) - np.ones((m, m)) / m
        return k @ h

    m = len(x)
    kx, ky = kc(x), kc(y)
    rx = kx @ np.linalg.inv(kx + eps * m * np.eye(m))
    ry = ky @ np.linalg.inv(ky + eps * m * np.eye(m))
    return float(np.sum(rx * ry.T))


def _kc64(v, sigma=50.0):
    v = np.asarray(v, np.float64)
    k = np.exp(-((v[:, None] - v[None]) ** 2) / (2 * sigma * sigma))
    return k - k.mean(1, keepdims=True)


def test_hsic_normalized_cca_against_float64_numpy():
    rng = np.random.default_rng(1)
    m = 48
    x = rng.normal(size=m) * 40  # kernel entries spread over (0, 1] at σ = 50
    y = 0.5 * x + rng.normal(size=m) * 20
    z = rng.normal(size=m) * 40
    for a, b in ((x, y), (x, z), (y, y)):
        want = _hsic_reference_f64(a, b)
        with jax.enable_x64(True):
            got64 = mi.hsic_normalized_cca(jnp.asarray(a, jnp.float64), jnp.asarray(b, jnp.float64))
        assert float(got64) == pytest.approx(want, rel=1e-9)
        # float32: the solves are ill-conditioned by design (κ ~ 3e5 at ε·m = 4.8e-4), so the bound
        # is first-order: |ΔP| <= ‖ΔR_x‖‖R_y‖ + ‖R_x‖‖ΔR_y‖ with ‖ΔR‖ <= κ u ‖R‖ (Frobenius)
        ax, ay = (_kc64(v) + 1e-5 * m * np.eye(m) for v in (a, b))
        rx, ry = np.linalg.solve(ax, _kc64(a)), np.linalg.solve(ay, _kc64(b))
        u32 = 2.0**-24
        bound = (
            (np.linalg.cond(ax) + np.linalg.cond(ay))
            * u32
            * np.linalg.norm(rx)
            * np.linalg.norm(ry)
        )
        got32 = float(
            mi.hsic_normalized_cca(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32))
        )
        assert abs(got32 - want) <= bound
    # dependence is seen: y depends on x, z does not
    assert _hsic_reference_f64(x, y) > _hsic_reference_f64(x, z)


def test_mi_curve_equals_per_token_estimates():
    rng = np.random.default_rng(2)
    hidden = rng.normal(size=(5, 32)) * 30
    target = rng.normal(size=32) * 30
    with jax.enable_x64(True):
        curve = np.asarray(mi.mi_curve(jnp.asarray(hidden), jnp.asarray(target), batch_size=2))
    want = [_hsic_reference_f64(h, target) for h in hidden]
    np.testing.assert_allclose(curve, want, rtol=1e-9)


# -- suppression ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smol_tokenizer():
    from jaxlab.models.registry import SMOLLM2_GGUF, package_path
    from jaxlab.tokenization import Tokenizer

    return Tokenizer.from_gguf(package_path(SMOLLM2_GGUF))  # installed by the Makefile


def test_suppression_logit_bias_removes_the_marker_tokens(smol_tokenizer, tmp_path):
    from jaxlab.generation import SamplingParams, generate_rows
    from jaxlab.models import from_pretrained
    from jaxlab.testing.tiny_llama import chain_bigrams, write_tiny_llama

    tok = smol_tokenizer
    bias = analysis.suppression_logit_bias(tok)
    ids, matched = analysis.single_token_surface_ids(tok, analysis.EPISTEMIC_WORDS)
    assert sorted(bias) == ids and set(bias.values()) == {-100.0}
    # every id is, decoded alone, a surface form of a marker; and the common ones are there
    forms = set().union(*(analysis.expand_surface_forms(w) for w in analysis.EPISTEMIC_WORDS))
    assert all(tok.decode([i]) in forms for i in ids)
    for s in (" wait", "Wait", " Hmm", " check", " maybe"):
        (t,) = tok.encode(s, add_special_tokens=False)
        assert t in bias
    # a tiny random model whose planted rules write ' Wait maybe check sure' after the prompt
    prompt = tok.encode("The answer is 12.", add_special_tokens=False)
    marker_ids = [
        tok.encode(s, add_special_tokens=False)[0] for s in (" Wait", " maybe", " check", " sure")
    ]
    path = write_tiny_llama(
        tmp_path / "m", tok, bigrams=chain_bigrams(prompt[-1], marker_ids), context=128
    )
    model, _ = from_pretrained(path)
    batch = tok.pad([prompt])
    # the rule's lead over every other token is below 100, so a -100 bias must overturn it
    z = np.asarray(_forward(model, jnp.asarray([prompt]))[0, -1], np.float64)
    lead = z[marker_ids[0]] - np.delete(z, marker_ids[0]).max()
    assert 0 < lead < 100
    base = SamplingParams(max_new_tokens=4, temperature=0.0)
    plain = generate_rows(model, batch.input_ids, batch.attention_mask, base, eos_ids=(), pad_id=0)
    assert plain.tokens[0].tolist() == marker_ids  # the rule holds without the bias
    # greedy, and sampled at temperature 1 with several seeds (one compiled shape for all)
    for params in [base.replace(logit_bias=bias)] + [
        base.replace(logit_bias=bias, temperature=1.0, seed=s) for s in range(4)
    ]:
        out = generate_rows(
            model, batch.input_ids, batch.attention_mask, params, eos_ids=(), pad_id=0
        )
        assert not set(out.tokens.ravel().tolist()) & set(ids)


def test_run_intervention_bans_the_chosen_words_and_injects_wait(smol_tokenizer, tmp_path):
    from jaxlab.analysis import run_intervention, wait_message
    from jaxlab.models import from_pretrained
    from jaxlab.rl.tasks import ArithmeticTask, Problem
    from jaxlab.testing.tiny_llama import chain_bigrams, write_tiny_llama

    tok = smol_tokenizer
    problem = Problem("What is 2 + 3?", 5, {"expression": "2 + 3"})
    prompt = tok.encode(problem.prompt, add_special_tokens=False)
    chain = [tok.encode(s, add_special_tokens=False)[0] for s in (" Note", " Wait", " maybe")]
    path = write_tiny_llama(
        tmp_path / "m", tok, bigrams=chain_bigrams(prompt[-1], chain), context=128
    )
    model, _ = from_pretrained(path)
    task = ArithmeticTask(digits=1, terms=2, ops="+")

    def run(mode, **kw):
        return run_intervention(
            model, tok, task, [problem], mode, max_new_tokens=3, chat=False, **kw
        )

    base = run("baseline")
    assert base.responses == [" Note Wait maybe"] and base.suppressed_ids == 0
    assert base.markers_per_response == 2.0 and base.rewards == [0.0]
    # the default ban leaves " Note" (not a marker) and removes both markers after it
    sup = run("suppress")
    assert sup.responses[0].startswith(" Note") and sup.markers_per_response == 0.0
    assert sup.suppressed_ids == len(analysis.suppression_logit_bias(tok))
    ids = tok.encode(sup.responses[0], add_special_tokens=False)
    assert chain[1] not in ids and chain[2] not in ids
    # another word list bans that word's surface forms instead
    own = run("suppress", suppress_words=("note",))
    assert own.suppressed_ids == len(analysis.suppression_logit_bias(tok, ("note",)))
    assert not own.responses[0].lower().lstrip().startswith("note")
    # a wrong answer gets the reference's message and a continuation
    wait = run("insert_wait", wait_when="wrong")
    head = " Note Wait maybe\n\n" + wait_message(None)
    assert wait.responses[0].startswith(head) and len(wait.responses[0]) > len(head)
    assert wait.tokens_per_response > 3


def test_wilson_interval_against_scipy_and_by_hand():
    from scipy.stats import binomtest

    from jaxlab.errors import UserError

    for k, n in ((5, 32), (0, 64), (64, 64), (23, 64), (1, 3)):
        ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
        lo, hi = analysis.wilson_interval(k, n, z=1.959963984540054)
        assert (lo, hi) == pytest.approx((ci.low, ci.high), abs=1e-9)
    # by hand, k = 0 of n = 4 at z = 2: c = (0 + 4/8) / 2 = 0.25, h = 2 sqrt(4/64) / 2 = 0.25
    assert analysis.wilson_interval(0, 4, z=2.0) == pytest.approx((0.0, 0.5))
    with pytest.raises(UserError):
        analysis.wilson_interval(3, 2)
