"""sentence-transformers model folders, written by sentence-transformers itself from a tiny random
BERT: jaxlab's embeddings equal sentence-transformers' (pooling modes, Normalize, max_seq_length,
prompts, include_prompt, a Transformer in a sub-folder); `python -m jaxlab embed --input/--output`."""

import json
import shutil
import warnings

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch  # the parity extra (make test installs it)

from jaxlab.models import LoadError, encode, from_pretrained

WORDS = (
    "the a cat dog sat on mat query passage : hello world red blue green fast slow ##s ##ing"
).split()
TEXTS = [
    "the cat sat on the mat",
    "hello world",
    "red dog ##s fast",  # word pieces
    "blue " * 30 + "green",  # longer than max_seq_length: truncated by both
    "a",
]
# float32 parity of a 2-layer width-16 BERT: jaxlab vs torch, both float32
ATOL = 2e-6


def _st_folder(tmp_path, name, *, pooling, normalize, include_prompt=True, max_seq_length=12):
    from sentence_transformers import SentenceTransformer, models
    from transformers import BertConfig, BertModel, BertTokenizerFast

    src = tmp_path / f"{name}_hf"
    src.mkdir()
    (src / "vocab.txt").write_text(
        "\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS])
    )
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=5 + len(WORDS),
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
    )
    BertModel(cfg).save_pretrained(src)
    BertTokenizerFast(str(src / "vocab.txt")).save_pretrained(src)
    mods = [
        models.Transformer(str(src), max_seq_length=max_seq_length),
        models.Pooling(16, pooling_mode=pooling, include_prompt=include_prompt),
    ]
    if normalize:
        mods.append(models.Normalize())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        st = SentenceTransformer(
            modules=mods,
            prompts={"query": "query : ", "document": "passage : "},
            default_prompt_name="query",
        )
    st.save(str(tmp_path / name))
    return tmp_path / name, st


def _st_encode(st, texts, **kw):
    return st.encode(texts, convert_to_numpy=True, batch_size=8, **kw)


@pytest.mark.parametrize(
    "pooling,normalize,include_prompt",
    [("cls", True, True), ("mean", False, False), ("lasttoken", True, True)],
)
def test_sentence_transformers_folder_gives_the_same_embeddings(
    tmp_path, pooling, normalize, include_prompt
):
    path, st = _st_folder(
        tmp_path, "st", pooling=pooling, normalize=normalize, include_prompt=include_prompt
    )
    model, tok = from_pretrained(path)
    cfg = model.config
    assert cfg.normalize is normalize and cfg.pool_prompt is include_prompt
    assert dict(cfg.prompts) == {"query": "query : ", "document": "passage : "}
    assert cfg.default_prompt_name == "query" and tok.model_max_length == 12
    # the default prompt ("query"), a named one, an explicit one, and none
    for kw in ({}, {"prompt_name": "document"}, {"prompt": "hello : "}):
        np.testing.assert_allclose(
            encode(model, tok, TEXTS, **kw), _st_encode(st, TEXTS, **kw), atol=ATOL, rtol=0
        )
    ours = encode(model, tok, TEXTS, prompt="")
    np.testing.assert_allclose(ours, _st_encode(st, TEXTS, prompt=""), atol=ATOL, rtol=0)
    if normalize:
        np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-6)
    with pytest.raises(Exception, match="prompt name 'nope'"):
        encode(model, tok, TEXTS, prompt_name="nope")


def test_transformer_in_a_subfolder_and_old_style_pooling_config(tmp_path):
    """sentence-transformers 2.x layout: the Transformer in 0_Transformer/ with its own
    sentence_bert_config.json (max_seq_length), Pooling with boolean pooling_mode_* keys."""
    from sentence_transformers import SentenceTransformer

    path, _ = _st_folder(tmp_path, "st", pooling="mean", normalize=True, max_seq_length=10)
    sub = path / "0_Transformer"
    sub.mkdir()
    for f in list(path.iterdir()):
        if f.is_file() and f.name not in (
            "modules.json",
            "config_sentence_transformers.json",
            "README.md",
        ):
            shutil.move(str(f), sub / f.name)
    (sub / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 10}))
    modules = json.loads((path / "modules.json").read_text())
    modules[0].update(path="0_Transformer", type="sentence_transformers.models.Transformer")
    modules[1]["type"] = "sentence_transformers.models.Pooling"
    modules[2]["type"] = "sentence_transformers.models.Normalize"
    (path / "modules.json").write_text(json.dumps(modules))
    (path / "1_Pooling" / "config.json").write_text(
        json.dumps(
            {
                "word_embedding_dimension": 16,
                "pooling_mode_cls_token": False,
                "pooling_mode_mean_tokens": True,
                "pooling_mode_max_tokens": False,
                "pooling_mode_mean_sqrt_len_tokens": False,
            }
        )
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        st = SentenceTransformer(str(path), device="cpu")  # sentence-transformers reads it too
    model, tok = from_pretrained(path)
    assert tok.model_max_length == 10 and model.config.pooling == "mean"
    np.testing.assert_allclose(encode(model, tok, TEXTS), _st_encode(st, TEXTS), atol=ATOL, rtol=0)


def test_unsupported_modules_are_load_errors(tmp_path):
    path, _ = _st_folder(tmp_path, "st", pooling="mean", normalize=False)
    modules = json.loads((path / "modules.json").read_text())
    modules.append(
        {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"}
    )
    (path / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(LoadError, match="Dense"):
        from_pretrained(path)
    modules.pop()
    (path / "modules.json").write_text(json.dumps(modules))
    (path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode": "weightedmean"}))
    with pytest.raises(LoadError, match="weightedmean"):
        from_pretrained(path)


def test_pooling_modes_equal_float64_numpy():
    """max and mean / sqrt(n) (and the others) against a float64 loop over the real tokens."""
    import jax.numpy as jnp

    from jaxlab.models import pool

    rng = np.random.default_rng(0)
    hidden = rng.normal(size=(3, 7, 5))
    lengths = [7, 3, 1]
    mask = np.arange(7)[None] < np.array(lengths)[:, None]
    for mode, ref in (
        ("mean", lambda h: h.mean(0)),
        ("max", lambda h: h.max(0)),
        ("cls", lambda h: h[0]),
        ("mean_sqrt_len", lambda h: h.sum(0) / np.sqrt(len(h))),
        ("lasttoken", lambda h: h[-1]),
    ):
        got = np.asarray(pool(jnp.asarray(hidden, jnp.float32), jnp.asarray(mask), mode))
        want = np.stack([ref(hidden[i, :n]) for i, n in enumerate(lengths)])
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_embed_command_files(tmp_path, capsys):
    from jaxlab.cli import main

    path, st = _st_folder(tmp_path, "st", pooling="mean", normalize=True)
    texts = TEXTS[:3]
    (tmp_path / "in.txt").write_text("\n".join(texts) + "\n")
    (tmp_path / "in.jsonl").write_text(
        "".join(json.dumps({"id": f"x{i}", "text": t}) + "\n" for i, t in enumerate(texts))
    )
    pq.write_table(pa.table({"text": texts}), tmp_path / "in.parquet")
    want = _st_encode(st, texts, prompt_name="document")
    for src, dst in (("in.txt", "a.npy"), ("in.jsonl", "b.parquet"), ("in.parquet", "c.npy")):
        args = ["embed", "--model", str(path), "--input", str(tmp_path / src)]
        assert main([*args, "--output", str(tmp_path / dst), "--prompt-name", "document"]) == 0
        if dst.endswith(".npy"):
            got = np.load(tmp_path / dst)
        else:
            table = pq.read_table(tmp_path / dst)
            assert table.column("id").to_pylist() == ["x0", "x1", "x2"]
            assert table.column("text").to_pylist() == texts
            got = np.asarray(table.column("embedding").to_pylist(), np.float32)
        np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n{"txt": "b"}\n')
    args = ["embed", "--model", str(path), "--input", str(tmp_path / "bad.jsonl")]
    assert main([*args, "--output", str(tmp_path / "bad.npy")]) == 2
    assert "bad.jsonl:2" in capsys.readouterr().err
