"""PosIR interchange: TREC run / qrels files and jaxlab's metrics against trec_eval (pytrec_eval and
ir_measures) ties included, mteb results, the sparse-bin warning, the plot legend, and no spurious
"longer than the maximum sequence length" warning where jaxlab truncates or chunks on purpose."""

import json
import math
import warnings

import ir_measures
import numpy as np
import pytest
import pytrec_eval
from ir_measures import R, nDCG

from jaxlab.models import encode, from_pretrained
from jaxlab.retrieval import (
    builtin_dataset,
    embed_documents,
    ndcg_at_k,
    position_analysis,
    recall_at_k,
    save_posir,
)
from jaxlab.retrieval.evaluate import report_figure
from jaxlab.retrieval.metrics import SparseBinsWarning
from jaxlab.retrieval.trec import (
    read_trec_qrels,
    read_trec_run,
    trec_order,
    write_trec_qrels,
    write_trec_run,
)


def _tied_run(seed=0, queries=25, docs=40):
    """A run whose scores take 4 values (many ties) and graded qrels, some relevant documents
    left out of the run (recall below 1)."""
    rng = np.random.default_rng(seed)
    ids = [f"d{i:02d}" for i in range(docs)] + ["D7", "a", "z9"]  # mixed case and widths
    run, qrels = {}, {}
    for q in range(queries):
        qid = f"q{q}"
        chosen = rng.choice(ids, size=30, replace=False)
        run[qid] = {d: float(rng.integers(0, 4)) / 4 for d in chosen}
        judged = rng.choice(ids, size=int(rng.integers(1, 8)), replace=False)
        qrels[qid] = {d: int(rng.integers(0, 3)) for d in judged}
        qrels[qid][str(judged[0])] = 2  # at least one relevant
    return run, qrels


def test_trec_files_round_trip_and_order(tmp_path):
    run, qrels = _tied_run()
    write_trec_run(tmp_path / "x.run", run)
    write_trec_qrels(tmp_path / "x.qrels", qrels)
    assert read_trec_run(tmp_path / "x.run") == run
    assert read_trec_qrels(tmp_path / "x.qrels") == qrels
    # the ranks written are 1.. in trec_eval's order: score descending, ties by id descending
    first = (tmp_path / "x.run").read_text().splitlines()[:30]
    docs = [line.split()[2] for line in first]
    assert [int(line.split()[3]) for line in first] == list(range(1, 31))
    want = sorted(run["q0"].items(), key=lambda kv: kv[0], reverse=True)
    want = [d for d, _ in sorted(want, key=lambda kv: -kv[1])]  # stable: ties keep id-desc order
    assert docs == want
    # ir_measures reads what was written
    parsed = {
        (r.query_id, r.doc_id): r.score for r in ir_measures.read_trec_run(str(tmp_path / "x.run"))
    }
    assert parsed == {(q, d): s for q, sc in run.items() for d, s in sc.items()}


def test_metrics_equal_trec_eval_with_ties(tmp_path):
    run, qrels = _tied_run(seed=1)
    ranked = [trec_order(run[q]) for q in run]
    rels = [qrels[q] for q in run]
    ours = {
        "ndcg_cut_10": ndcg_at_k(ranked, rels, 10),
        "recall_10": recall_at_k(ranked, rels, 10),
        "recall_20": recall_at_k(ranked, rels, 20),
    }
    # pytrec_eval (trec_eval's C code) on the in-memory run
    ev = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.10", "recall.10", "recall.20"})
    got = ev.evaluate(run)
    for name, vals in ours.items():
        np.testing.assert_allclose(vals, [got[q][name] for q in run], rtol=0, atol=1e-12)
    # ir_measures over the files jaxlab wrote
    write_trec_run(tmp_path / "t.run", run)
    write_trec_qrels(tmp_path / "t.qrels", qrels)
    per_q = {
        (str(m.measure), m.query_id): m.value
        for m in ir_measures.iter_calc(
            [nDCG @ 10, R @ 10],
            ir_measures.read_trec_qrels(str(tmp_path / "t.qrels")),
            ir_measures.read_trec_run(str(tmp_path / "t.run")),
        )
    }
    np.testing.assert_allclose(
        ours["ndcg_cut_10"], [per_q[("nDCG@10", q)] for q in run], rtol=0, atol=1e-12
    )
    np.testing.assert_allclose(ours["recall_10"], [per_q[("R@10", q)] for q in run], atol=1e-12)
    # the ties decide: ranking them the other way round changes the metric for some query
    ascending = [sorted(run[q], key=lambda d: (-run[q][d], d)) for q in run]
    assert np.abs(ndcg_at_k(ascending, rels, 10) - ours["ndcg_cut_10"]).max() > 1e-3


@pytest.fixture(scope="module")
def minilm():
    return from_pretrained("all-minilm-l6-v2")


def test_posir_eval_writes_trec_and_mteb_that_trec_eval_agrees_with(minilm, tmp_path, capsys):
    from jaxlab.cli import main

    data = builtin_dataset(24, minilm[1], seed=3, lengths=((128, 400),))
    save_posir(data, tmp_path / "d")
    args = ["posir", "eval", "--data", str(tmp_path / "d"), "--out", str(tmp_path / "r")]
    with pytest.warns(SparseBinsWarning, match="fewer than 5 queries in Q1"):
        assert main([*args, "--strategy", "chunk_max", "--trec", "--mteb", "--quiet"]) == 0
    out = tmp_path / "r"
    report = json.loads((out / "posir.json").read_text())
    qrels = read_trec_qrels(out / "posir.qrels")
    assert qrels == data.qrels
    run = read_trec_run(out / "posir.run")
    assert set(run) == set(data.query_ids) and all(len(v) == 24 for v in run.values())
    got = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.10", "recall.10"}).evaluate(run)
    np.testing.assert_allclose(
        report["per_query"]["ndcg@10"],
        [got[q]["ndcg_cut_10"] for q in data.query_ids],
        rtol=0,
        atol=1e-12,
    )
    assert report["recall@10"] == pytest.approx(
        np.mean([got[q]["recall_10"] for q in data.query_ids]), abs=1e-12
    )
    mteb = json.loads(
        (out / "mteb" / "all-minilm-l6-v2" / "no_revision_available" / "PosIR.json").read_text()
    )
    (entry,) = mteb["scores"]["test"]
    assert mteb["task_name"] == "PosIR" and entry["hf_subset"] == "default"
    assert entry["main_score"] == entry["ndcg_at_10"] == pytest.approx(report["ndcg@10"])
    assert entry["recall_at_100"] == pytest.approx(report["recall@100"])
    # 24 queries over 20 bins: the warning says the curve is noise, the report lists the bucket
    assert report["analysis"]["sparse_buckets"] == ["Q1"]
    assert "Q1: n=  24" in capsys.readouterr().out.replace("(sparse bins)", "")


def test_sparse_bins_warning():
    rng = np.random.default_rng(0)
    # Q1: 5 queries in each of the 20 bins; Q2: 12 queries (bins of 0-2)
    relpos = np.r_[(np.arange(100) // 5 + 0.5) / 20, rng.random(12)]
    tokens = np.r_[np.full(100, 300), np.full(12, 700)]
    with pytest.warns(SparseBinsWarning, match=r"Q2 \(n=12"):
        rep = position_analysis(rng.random(112), relpos, tokens)
    assert rep["sparse_buckets"] == ["Q2"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rep = position_analysis(rng.random(100), relpos[:100], tokens[:100])
    assert rep["sparse_buckets"] == []


def test_plot_legend_is_clear_of_the_data():
    rng = np.random.default_rng(0)
    n = 400
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SparseBinsWarning)
        analysis = position_analysis(rng.random(n), rng.random(n), rng.integers(10, 2500, n))
    report = {"analysis": analysis, "strategy": "truncate", "ndcg@10": 0.5, "psi": 0.3}
    fig = report_figure(report)
    fig.canvas.draw()
    ax = fig.axes[0]
    legend = ax.get_legend()
    assert len(legend.get_texts()) == 4
    r = fig.canvas.get_renderer()
    box, axes_box = legend.get_window_extent(r), ax.get_window_extent(r)
    assert not box.overlaps(axes_box), (box, axes_box)


def test_no_too_long_sequence_warning_when_truncating_or_chunking(minilm):
    model, tok = minilm
    key = "sequence-length-is-longer-than-the-specified-maximum"
    texts = ["word " * 700, "a short one"]
    tok.hf.deprecation_warnings.pop(key, None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # jaxlab's own "were truncated" notice
        emb = encode(model, tok, texts, max_length=32)
    for strategy in ("truncate", "chunk_max"):
        embed_documents(model, tok, texts, strategy=strategy, max_length=32)
    assert key not in tok.hf.deprecation_warnings  # transformers would have logged it once
    assert emb.shape == (2, 384) and math.isclose(float(np.linalg.norm(emb[0])), 1.0, rel_tol=1e-5)
