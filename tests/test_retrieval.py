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


TINY_BERT = BertConfig(
    vocab_size=40,
    hidden_size=16,
    num_layers=2,
    num_heads=2,
    intermediate_size=32,
    max_position_embeddings=32,
)


def _float64_copy(model):
    """The same BERT in float64 (float64 throughout); call under ``jax.enable_x64(True)``."""
    abstract = nnx.eval_shape(
        lambda: BertEncoder(model.config, dtype=jnp.float64, rngs=nnx.Rngs(0))
    )
    values = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), nnx.state(model))
    return nnx.merge(nnx.graphdef(abstract), values)


def test_token_saliency_equals_float64_differences():
    """Every token's saliency against the full gradient [T, E] by float64 central differences of
    cos(query, mean-pooled document) (all T·E coordinates in one jitted batch)."""
    model = BertEncoder(TINY_BERT, rngs=nnx.Rngs(0))
    ids = jnp.asarray([1, 5, 9, 3, 7, 2])
    q = jax.random.normal(jax.random.key(1), (16,))
    got = token_saliency(model, ids, q)
    with jax.enable_x64(True):
        model64 = _float64_copy(model)
        q64 = np.asarray(q, np.float64)
        q64 = q64 / np.linalg.norm(q64)
        e0 = np.asarray(model64.word_embeddings(ids[None])[0])  # [T, E] float64

        def cos(e):  # written from the definition: mean over the row, L2-normalised, · q/|q|
            h = model64.from_word_embeddings(e[None])[0].mean(0)
            return jnp.dot(h / jnp.linalg.norm(h), q64)

        t, e = e0.shape
        eps = 1e-6  # float64: truncation ~eps², rounding ~1e-16/eps
        basis = np.eye(t * e).reshape(t * e, t, e)
        values = np.asarray(
            jax.jit(jax.vmap(cos))(np.concatenate([e0 + eps * basis, e0 - eps * basis]))
        )
        grad = ((values[: t * e] - values[t * e :]) / (2 * eps)).reshape(t, e)
        want = np.linalg.norm(grad, axis=-1)
        got64 = token_saliency(model64, ids, q64)
    assert got64.dtype == np.float64 and got.dtype == np.float32
    np.testing.assert_allclose(got64, want, rtol=1e-8)
    np.testing.assert_allclose(got, want, rtol=1e-5)  # the float32 model, to float32 precision


def _percentile_by_hand(values, q):
    """Linear interpolation between order statistics (numpy's default definition)."""
    ordered = sorted(values)
    rank = q / 100 * (len(ordered) - 1)
    lo = math.floor(rank)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (rank - lo) * (ordered[hi] - ordered[lo])


def _resample_by_hand(values, points):
    """``values`` spread evenly over [0, 1], read at ``points`` evenly spaced positions."""
    out = []
    for j in range(points):
        x = j / (points - 1) * (len(values) - 1)
        k = min(math.floor(x), len(values) - 2)
        out.append(values[k] + (x - k) * (values[k + 1] - values[k]))
    return out


def test_saliency_profile_equals_a_separately_written_profile(small, minilm):
    """saliency_profile against its docstring, written out in Python: the queries picked by a loop,
    the document truncated by hand around [CLS]/[SEP], the gradient of cos by jax.grad, the 99th
    percentile, resampling and mean / population SD by hand."""
    import statistics

    from jaxlab.retrieval import saliency_profile

    model, tok = minilm
    lo, hi, min_tokens, limit, points = 0.2, 0.8, 300, 48, 25
    got = saliency_profile(
        small,
        model,
        tok,
        max_examples=3,
        relpos_range=(lo, hi),
        min_tokens=min_tokens,
        max_length=limit,
        points=points,
    )

    picked = []
    for i in range(len(small)):
        (start, end), n_chars = small.spans[i], small.doc_char_lengths[i]
        relpos = min(max((start + end) / 2 / max(n_chars, 1), 0.0), 1.0)
        if lo <= relpos <= hi and small.doc_token_lengths[i] >= min_tokens and len(picked) < 3:
            picked.append(i)
    assert len(picked) >= 2  # the SD is over several examples

    graphdef, state = nnx.split(model)

    @jax.jit
    def gradient(state, ids, q):
        m = nnx.merge(graphdef, state)

        def cos(e):
            h = m.from_word_embeddings(e[None])[0].mean(0)
            return jnp.dot(h / jnp.linalg.norm(h), q / jnp.linalg.norm(q))

        return jax.grad(cos)(m.word_embeddings(ids[None])[0])

    curves = []
    for i in picked:
        rel = small.qrels[small.query_ids[i]]
        doc_id = max(rel, key=lambda d: rel[d])
        doc = small.corpus_texts[small.corpus_ids.index(doc_id)]
        ids = tok.hf(doc, verbose=False)["input_ids"]
        ids = ids[: limit - 1] + ids[-1:]  # [CLS] and the first tokens, then [SEP]
        q_ids = tok.hf(small.query_texts[i])["input_ids"]
        q = np.asarray(model.embed(jnp.asarray([q_ids])))[0]
        g = np.asarray(gradient(state, jnp.asarray(ids), jnp.asarray(q)), np.float64)
        sal = [math.sqrt(sum(x * x for x in row)) for row in g[1:-1]]
        top = _percentile_by_hand(sal, 99)
        clipped = [min(x, top) / top for x in sal]
        curves.append(_resample_by_hand(clipped, points))
    mean = [statistics.fmean(c[j] for c in curves) for j in range(points)]
    sd = [statistics.pstdev(c[j] for c in curves) for j in range(points)]

    assert got["num_examples"] == len(picked)
    np.testing.assert_allclose(got["positions"], [j / (points - 1) for j in range(points)])
    np.testing.assert_allclose(got["mean"], mean, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(got["std"], sd, rtol=1e-4, atol=1e-6)


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
