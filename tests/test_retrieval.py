"""PosIR: layout I/O, builder, metrics against brute force, retrieval, strategies, saliency, CLI."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlab.models import encode, from_pretrained
from jaxlab.models.bert import BertConfig, BertEncoder
from jaxlab.retrieval import (
    PosIRError,
    builtin_dataset,
    embed_documents,
    evaluate_posir,
    load_posir,
    ndcg_at_k,
    position_analysis,
    recall_at_k,
    retrieve,
    save_posir,
)
from jaxlab.retrieval.evaluate import token_saliency


@pytest.fixture(scope="module")
def minilm():
    return from_pretrained("all-minilm-l6-v2")


@pytest.fixture(scope="module")
def small(minilm):
    return builtin_dataset(24, minilm[1], seed=1, lengths=((128, 512), (513, 1024)))


def _brute_ndcg(run, rel, k):
    dcg = sum(rel.get(d, 0) / math.log2(i + 2) for i, d in enumerate(run[:k]))
    best = max(  # the best ordering of the judged documents, by trying them all
        sum(g / math.log2(i + 2) for i, g in enumerate(perm[:k]))
        for perm in itertools.permutations(rel.values())
    )
    return dcg / best if best > 0 else 0.0


def test_ndcg_and_recall_equal_brute_force():
    rng = np.random.default_rng(0)
    docs = [f"d{i}" for i in range(12)]
    runs, rels = [], []
    for _ in range(30):
        runs.append(list(rng.permutation(docs)))
        judged = rng.choice(docs, size=rng.integers(1, 5), replace=False)
        rels.append({d: int(rng.integers(0, 3)) for d in judged})
    got = ndcg_at_k(runs, rels, 10)
    want = [_brute_ndcg(r, q, 10) for r, q in zip(runs, rels)]
    np.testing.assert_allclose(got, want, atol=1e-12)
    assert ndcg_at_k([["b", "a"]], [{"a": 1}], 10)[0] == pytest.approx(1 / math.log2(3))
    rec = recall_at_k(runs, rels, 5)
    want_rec = [
        len({d for d, g in q.items() if g > 0} & set(r[:5]))
        / max(1, sum(g > 0 for g in q.values()))
        for r, q in zip(runs, rels)
    ]
    np.testing.assert_allclose(rec, want_rec)


def test_position_analysis_equals_brute_force():
    rng = np.random.default_rng(1)
    n = 400
    ndcg = rng.random(n)
    relpos = rng.random(n)
    relpos[:3] = [0.0, 1.0, 0.05]
    tokens = rng.integers(10, 2500, n)
    rep = position_analysis(ndcg, relpos, tokens)
    edges = [0, 512, 1024, 1536, np.inf]
    for b, name in enumerate(("Q1", "Q2", "Q3", "Q4")):
        sel = [i for i in range(n) if edges[b] < tokens[i] <= edges[b + 1]]
        bins = {}
        for i in sel:
            j = min(int(relpos[i] * 20), 19)
            bins.setdefault(j, []).append(ndcg[i])
        means = {j: sum(v) / len(v) for j, v in bins.items()}
        got = rep["buckets"][name]
        assert got["n"] == len(sel)
        for j in range(20):
            if j in means:
                assert got["bin_means"][j] == pytest.approx(means[j])
            else:
                assert got["bin_means"][j] is None
        vals = list(means.values())
        assert got["ndcg@10"] == pytest.approx(sum(vals) / len(vals))
        assert got["psi"] == pytest.approx(1 - min(vals) / max(vals))
        # Spearman from its definition on the bin centres (no ties)
        keys = sorted(means)
        x = np.array([(j + 0.5) / 20 for j in keys])
        y = np.array([means[j] for j in keys])
        rx, ry = x.argsort().argsort(), y.argsort().argsort()
        m = len(keys)
        rho = 1 - 6 * np.sum((rx - ry) ** 2) / (m * (m * m - 1))
        assert got["spearman"] == pytest.approx(rho)
        slope = np.polyfit(x, y, 1)[0]
        assert got["slope"] == pytest.approx(slope)
    assert rep["ndcg@10"] == pytest.approx(ndcg.mean())


def test_retrieve_is_exact():
    rng = np.random.default_rng(2)
    q = rng.normal(size=(7, 16))
    d = rng.normal(size=(50, 16))
    idx, scores = retrieve(q, d, k=10)
    full = q @ d.T
    np.testing.assert_array_equal(idx, np.argsort(-full, axis=1, kind="stable")[:, :10])
    np.testing.assert_allclose(scores, np.take_along_axis(full, idx, 1))


def test_builder_places_evidence_and_round_trips(small, minilm, tmp_path):
    for i in range(len(small)):
        doc = small.corpus_texts[small.corpus_ids.index(small.positive(i))]
        s, e = small.spans[i]
        assert (
            doc[s:e].startswith("The ") and small.query_texts[i].split(" of ")[-1][:-1] in doc[s:e]
        )
        assert len(doc) == small.doc_char_lengths[i]
    assert ((small.doc_token_lengths >= 128) & (small.doc_token_lengths <= 1024)).all()
    again = builtin_dataset(24, minilm[1], seed=1, lengths=((128, 512), (513, 1024)))
    assert again.corpus_texts == small.corpus_texts  # deterministic
    loaded = load_posir(save_posir(small, tmp_path / "eng" / "synthetic"))
    assert loaded.query_texts == small.query_texts and loaded.corpus_texts == small.corpus_texts
    np.testing.assert_array_equal(loaded.spans, small.spans)
    assert loaded.qrels == small.qrels


def _corrupt(tmp_path, small, **changes):
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = save_posir(small, tmp_path / "bad")
    for name, fn in changes.items():
        path = root / name
        table = fn(pq.read_table(path))
        pq.write_table(table if isinstance(table, pa.Table) else pa.table(table), path)
    return root


def test_bad_datasets_are_clear_errors(small, tmp_path):
    with pytest.raises(PosIRError, match="not a directory"):
        load_posir(tmp_path / "none")
    root = save_posir(small, tmp_path / "ok")
    (root / "corpus.parquet").unlink()
    with pytest.raises(PosIRError, match="corpus.parquet: missing"):
        load_posir(root)
    cases = {
        "missing columns": {"queries.parquet": lambda t: t.drop(["pos_char_span"])},
        "not inside": {
            "queries.parquet": lambda t: t.set_column(
                2, "pos_char_span", [[[0, 10**7]] * t.num_rows]
            )
        },
        "unknown corpus-id": {
            "qrels/test.parquet": lambda t: t.set_column(1, "corpus-id", [["nope"] * t.num_rows])
        },
        "duplicate _id": {
            "corpus.parquet": lambda t: t.set_column(0, "_id", [["same"] * t.num_rows])
        },
        "has .* characters": {
            "queries.parquet": lambda t: t.set_column(3, "pos_char_length", [[10**6] * t.num_rows])
        },
    }
    for i, (msg, change) in enumerate(cases.items()):
        with pytest.raises(PosIRError, match=msg):
            load_posir(_corrupt(tmp_path / str(i), small, **change))
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "queries.parquet").write_text("not parquet")
    with pytest.raises(PosIRError, match="not a readable parquet"):
        load_posir(tmp_path / "x")


def test_long_document_strategies(minilm):
    model, tok = minilm
    text = " ".join(["The harbour master of Corlin walked along the quay at dawn."] * 60)
    ids = tok.hf(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > 600
    trunc = embed_documents(model, tok, [text], strategy="truncate").vectors
    np.testing.assert_allclose(trunc, encode(model, tok, [text]), atol=1e-6)
    width = tok.model_max_length - 2  # 256 for all-MiniLM-L6-v2 (its max_seq_length)
    windows = [tok.decode(ids[s : s + width]) for s in range(0, len(ids), width)]
    parts = encode(model, tok, windows)
    mean = embed_documents(model, tok, [text], strategy="chunk_mean").vectors[0]
    np.testing.assert_allclose(mean, parts.mean(0) / np.linalg.norm(parts.mean(0)), atol=1e-4)
    # MaxP: a document scores as its best window; two documents, queries near each window
    other = "A weaver repaired the old mill in the early morning."
    docs = embed_documents(model, tok, [other, text], strategy="chunk_max")
    queries = encode(model, tok, ["harbour master of Corlin", "weaver mill"])
    want = np.stack([queries @ encode(model, tok, [other])[0], (queries @ parts.T).max(1)], 1)
    np.testing.assert_allclose(docs.scores(queries), want, atol=1e-4)
    with pytest.raises(ValueError, match="strategy"):
        embed_documents(model, tok, [text], strategy="middle")


def test_evaluate_report_matches_direct_ranking(small, minilm):
    model, tok = minilm
    rep = evaluate_posir(small, model, tok, strategy="truncate")
    q = encode(model, tok, small.query_texts)
    d = encode(model, tok, small.corpus_texts)
    ranks = np.argsort(-(q @ d.T), axis=1)
    want = [
        1 / math.log2(list(ranks[i]).index(small.corpus_ids.index(small.positive(i))) + 2)
        if small.corpus_ids.index(small.positive(i)) in ranks[i][:10]
        else 0.0
        for i in range(len(small))
    ]
    np.testing.assert_allclose(rep["per_query"]["ndcg@10"], want, atol=1e-6)
    assert set(rep["analysis"]["buckets"]) <= {"Q1", "Q2"}
    assert 0 <= rep["recall@10"] <= rep["recall@100"] <= 1


def test_token_saliency_equals_finite_differences():
    cfg = BertConfig(
        vocab_size=40,
        hidden_size=16,
        num_layers=2,
        num_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
    )
    model = BertEncoder(cfg, rngs=nnx.Rngs(0))
    ids = jnp.asarray([1, 5, 9, 3, 7, 2])
    q = jax.random.normal(jax.random.key(1), (16,))
    got = token_saliency(model, ids, q)

    def cos(e):
        h = model.from_word_embeddings(e[None])[0].mean(0)
        return float(jnp.dot(h / jnp.linalg.norm(h), q / jnp.linalg.norm(q)))

    e0 = np.asarray(model.word_embeddings(ids[None])[0], np.float64)
    eps = 1e-3
    for t in (0, 3):
        g = np.zeros(16)
        for j in range(16):
            hi, lo = e0.copy(), e0.copy()
            hi[t, j] += eps
            lo[t, j] -= eps
            g[j] = (cos(jnp.asarray(hi, jnp.float32)) - cos(jnp.asarray(lo, jnp.float32))) / (
                2 * eps
            )
        assert got[t] == pytest.approx(np.linalg.norm(g), rel=2e-2)


def test_posir_cli_build_and_eval(tmp_path, capsys):
    from jaxlab.cli import main

    assert (
        main(["posir", "build", "--out", str(tmp_path / "d"), "--queries", "16", "--buckets", "1"])
        == 0
    )
    assert (
        main(
            [
                "posir",
                "eval",
                "--data",
                str(tmp_path / "d"),
                "--out",
                str(tmp_path / "r"),
                "--strategy",
                "truncate",
                "--saliency",
                "2",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "nDCG@10" in out and (tmp_path / "r" / "posir.png").exists()
    assert main(["posir", "eval", "--data", str(tmp_path / "none"), "--out", str(tmp_path)]) == 2
