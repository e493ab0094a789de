"""PosIR evaluation: embed, retrieve exactly by cosine, score, analyse by position; saliency.

Documents longer than the encoder's limit are handled by a named strategy, itself a position-bias
variable worth reporting:

* ``truncate``: keep the first ``max_length`` tokens (evidence past them is invisible);
* ``chunk_max``: encode consecutive windows of ``max_length − 2`` tokens (each with [CLS]/[SEP]);
  a document scores as its best window (MaxP);
* ``chunk_mean``: the mean of those window embeddings, L2-normalised (one vector per document).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlab.models.bert import BertEncoder, pool
from jaxlab.models.encode import encode, encode_ids, encode_limit
from jaxlab.registry import Registry
from jaxlab.retrieval.builder import token_ids
from jaxlab.retrieval.data import PosIRData, PosIRError
from jaxlab.retrieval.metrics import BUCKET_NAMES, ndcg_at_k, position_analysis, recall_at_k
from jaxlab.retrieval.trec import trec_order

__all__ = [
    "STRATEGIES",
    "DocumentEmbeddings",
    "embed_documents",
    "retrieve",
    "evaluate_posir",
    "saliency_profile",
    "token_saliency",
    "plot_report",
    "report_figure",
]

# Long-document strategies: fn(model, tokenizer, texts, *, limit, batch_size, progress)
# -> DocumentEmbeddings
STRATEGIES: Registry = Registry("long-document strategy")


@dataclasses.dataclass
class DocumentEmbeddings:
    """Unit-norm embeddings of documents: one row per document, or per chunk with ``owner`` giving
    each row's document (ascending) when a document is scored by its best chunk (MaxP)."""

    vectors: np.ndarray  # [N or C, E]
    owner: np.ndarray | None = None  # [C] document index of each chunk

    def scores(self, queries: np.ndarray) -> np.ndarray:
        """``[Q, N]`` cosine scores (the best chunk's for multi-vector documents)."""
        s = queries @ self.vectors.T
        if self.owner is None:
            return s
        starts = np.flatnonzero(np.r_[True, self.owner[1:] != self.owner[:-1]])
        return np.maximum.reduceat(s, starts, axis=1)


def _chunks(model, tokenizer, texts, limit, batch_size, progress):
    """Embeddings of consecutive windows of limit − specials tokens, each framed by the specials."""
    hf = tokenizer.hf
    # the special tokens framing one window: what the tokenizer puts around an empty text
    frame = list(hf("", add_special_tokens=True)["input_ids"])
    head = frame[:1] if frame and frame[0] in (hf.cls_token_id, hf.bos_token_id) else []
    tail = frame[len(head) :]
    width = limit - len(head) - len(tail)
    rows, owner = [], []
    for i, ids in enumerate(token_ids(tokenizer, texts)):
        for s in range(0, max(len(ids), 1), width):
            rows.append(head + list(ids[s : s + width]) + tail)
            owner.append(i)
    emb = encode_ids(model, tokenizer, rows, batch_size=batch_size, limit=limit, progress=progress)
    return emb, np.asarray(owner)


def embed_documents(
    model: BertEncoder,
    tokenizer,
    texts,
    *,
    strategy: str = "chunk_max",
    max_length: int | None = None,
    batch_size: int = 32,
    progress: bool = False,
) -> DocumentEmbeddings:
    """Document embeddings under a long-document strategy: ``truncate`` (first window only),
    ``chunk_max`` (every window kept; a document scores as its best window, MaxP) or ``chunk_mean``
    (the mean of the window embeddings, renormalised)."""
    fn = STRATEGIES.get(strategy)
    limit = encode_limit(model, tokenizer, max_length)
    return fn(model, tokenizer, texts, limit=limit, batch_size=batch_size, progress=progress)


@STRATEGIES.register("truncate")
def _truncate(model, tokenizer, texts, *, limit, batch_size, progress) -> DocumentEmbeddings:
    """The first window only: evidence past it is invisible."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return DocumentEmbeddings(
            encode(
                model,
                tokenizer,
                list(texts),
                batch_size=batch_size,
                max_length=limit,
                progress=progress,
                prompt="",  # documents as the chunk strategies see them: no prompt
            )
        )


@STRATEGIES.register("chunk_max")
def _chunk_max(model, tokenizer, texts, *, limit, batch_size, progress) -> DocumentEmbeddings:
    """Every window kept; a document scores as its best window (MaxP)."""
    emb, owner = _chunks(model, tokenizer, texts, limit, batch_size, progress)
    return DocumentEmbeddings(emb, owner)


@STRATEGIES.register("chunk_mean")
def _chunk_mean(model, tokenizer, texts, *, limit, batch_size, progress) -> DocumentEmbeddings:
    """The mean of the window embeddings, L2-normalised: one vector per document."""
    emb, owner = _chunks(model, tokenizer, texts, limit, batch_size, progress)
    out = np.zeros((len(texts), emb.shape[1]), np.float32)
    np.add.at(out, owner, emb)
    return DocumentEmbeddings(out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12))


def retrieve(queries: np.ndarray, docs, k: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k: ``(indices [Q, k], scores [Q, k])`` best first. ``docs`` is a unit-norm
    ``[N, E]`` array (cosine) or :class:`DocumentEmbeddings`."""
    scores = docs.scores(queries) if isinstance(docs, DocumentEmbeddings) else queries @ docs.T
    k = min(k, scores.shape[1])
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    top = np.take_along_axis(scores, part, axis=1)
    order = np.argsort(-top, axis=1, kind="stable")
    return np.take_along_axis(part, order, axis=1), np.take_along_axis(top, order, axis=1)


def evaluate_posir(
    data: PosIRData,
    model: BertEncoder,
    tokenizer,
    *,
    strategy: str = "chunk_max",
    max_length: int | None = None,
    batch_size: int = 32,
    query_prefix: str = "",
    progress: bool = False,
    depth: int = 100,
    return_run: bool = False,
) -> dict | tuple[dict, dict[str, dict[str, float]]]:
    """Retrieval over the whole corpus and PosIR's analysis; a JSON-ready report, and with
    ``return_run`` also the run ``{query id: {document id: cosine}}`` of each query's top ``depth``
    documents (what :func:`jaxlab.retrieval.trec.write_trec_run` writes)."""
    if depth < 100:
        raise ValueError(f"depth must be >= 100 (recall@100 is reported), got {depth}")
    if len(data) == 0 or not data.corpus_ids:  # every metric would be a mean over nothing
        raise PosIRError("the dataset holds no queries or no documents; nothing to evaluate")
    # queries take the model's "query" prompt when it has one (sentence-transformers' prompts)
    q_prompt = "query" if "query" in dict(model.config.prompts) else None
    q_emb = encode(
        model,
        tokenizer,
        [query_prefix + t for t in data.query_texts],
        batch_size=batch_size,
        progress=progress,
        prompt_name=q_prompt,
        prompt=None if q_prompt else "",
    )
    d_emb = embed_documents(
        model,
        tokenizer,
        data.corpus_texts,
        strategy=strategy,
        max_length=max_length,
        batch_size=batch_size,
        progress=progress,
    )
    top, top_scores = retrieve(q_emb, d_emb, k=depth)
    run = {
        q: {data.corpus_ids[j]: float(s) for j, s in zip(row, srow, strict=True)}
        for q, row, srow in zip(data.query_ids, top, top_scores, strict=True)
    }
    # ranked as trec_eval ranks a run file (ties by id, descending): the metrics below equal
    # trec_eval's on the run that `write_trec_run` writes
    ranked = [trec_order(run[q]) for q in data.query_ids]
    rels = [data.qrels[q] for q in data.query_ids]
    ndcg = ndcg_at_k(ranked, rels, 10)
    analysis = position_analysis(ndcg, data.relative_positions, data.doc_token_lengths)
    report = {
        "strategy": strategy,
        "max_length": encode_limit(model, tokenizer, max_length),
        "num_queries": len(data),
        "num_documents": len(data.corpus_ids),
        "ndcg@10": analysis["ndcg@10"],
        "recall@10": float(recall_at_k(ranked, rels, 10).mean()),
        "recall@100": float(recall_at_k(ranked, rels, 100).mean()),
        "psi": analysis["psi"],
        "analysis": analysis,
        "per_query": {
            "ndcg@10": ndcg.tolist(),
            "relpos": data.relative_positions.tolist(),
            "token_length": data.doc_token_lengths.tolist(),
        },
    }
    return (report, run) if return_run else report


@functools.lru_cache(maxsize=4)
def _saliency_fn(graphdef):
    @jax.jit
    def run(state, ids, q):
        m = nnx.merge(graphdef, state)

        def cos(e):
            hidden = m.from_word_embeddings(e)
            d = pool(hidden, jnp.ones(ids[None].shape, bool), m.config.pooling, normalize=True)[0]
            return jnp.dot(d, q / jnp.linalg.norm(q))

        return jnp.linalg.norm(jax.grad(cos)(m.word_embeddings(ids[None]))[0], axis=-1)

    return run


def token_saliency(model: BertEncoder, ids, query_embedding) -> np.ndarray:
    """``[T]``: ‖∂ cos(query, doc) / ∂e_t‖₂ for each document token embedding e_t (mean pooling
    over the whole row, as the model pools)."""
    graphdef, state = nnx.split(model)
    return np.asarray(_saliency_fn(graphdef)(state, jnp.asarray(ids), jnp.asarray(query_embedding)))


def saliency_profile(
    data: PosIRData,
    model: BertEncoder,
    tokenizer,
    *,
    max_examples: int = 16,
    relpos_range: tuple[float, float] = (0.4, 0.6),
    min_tokens: int = 0,
    max_length: int | None = None,
    points: int = 100,
) -> dict:
    """Mean ± SD over examples of the gradient saliency of cos(query, document) along the document.

    Per token: ‖∂cos / ∂e_t‖₂ with e_t the token embedding; [CLS]/[SEP] dropped; clipped at the 99th
    percentile and divided by it; resampled to ``points`` positions. Examples: queries whose evidence
    midpoint lies in ``relpos_range`` and whose document has at least ``min_tokens`` tokens; documents
    are truncated to the model's limit.
    """
    lo, hi = relpos_range
    pick = np.flatnonzero(
        (data.relative_positions >= lo)
        & (data.relative_positions <= hi)
        & (data.doc_token_lengths >= min_tokens)
    )[:max_examples]
    if pick.size == 0:
        raise ValueError(
            f"saliency: no query with relpos in {relpos_range} and ≥ {min_tokens} tokens"
        )
    limit = encode_limit(model, tokenizer, max_length)
    q_emb = encode(model, tokenizer, [data.query_texts[i] for i in pick])
    index = {c: j for j, c in enumerate(data.corpus_ids)}
    docs = [data.corpus_texts[index[data.positive(int(i))]] for i in pick]
    rows, _ = tokenizer.encode_truncated(docs, limit)
    grid = np.linspace(0.0, 1.0, points)
    curves = []
    for row, q in zip(rows, q_emb, strict=True):
        sal = token_saliency(model, row, q)[1:-1]
        sal = np.minimum(sal, np.percentile(sal, 99)) / max(np.percentile(sal, 99), 1e-12)
        curves.append(np.interp(grid, np.linspace(0.0, 1.0, len(sal)), sal))
    curves = np.asarray(curves)
    return {
        "positions": grid.tolist(),
        "mean": curves.mean(0).tolist(),
        "std": curves.std(0).tolist(),
        "num_examples": int(len(curves)),
    }


def plot_report(report: dict, path: str | Path, saliency: dict | None = None) -> Path:
    """nDCG@10 by evidence position per length bucket (and the saliency curve when given)."""
    import matplotlib.pyplot as plt

    fig = report_figure(report, saliency)
    path = Path(path)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def report_figure(report: dict, saliency: dict | None = None):
    """The figure of :func:`plot_report`; the legend sits below the axes, clear of the data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    analysis = report["analysis"]
    n = analysis["num_bins"]
    centres = (np.arange(n) + 0.5) / n
    fig, axes = plt.subplots(
        1, 2 if saliency else 1, figsize=(11 if saliency else 6.5, 5), squeeze=False
    )
    ax = axes[0, 0]
    for name in BUCKET_NAMES:
        b = analysis["buckets"].get(name)
        if b is None:
            continue
        ys = [np.nan if m is None else m for m in b["bin_means"]]
        ax.plot(
            centres,
            ys,
            "o-",
            ms=3,
            label=f"{name} (n={b['n']}, nDCG {b['ndcg@10']:.3f}, PSI {b['psi']:.2f})",
        )
    ax.set_xlabel("relative position of the evidence")
    ax.set_ylabel("nDCG@10")
    ax.set_ylim(0, 1.05)
    ax.set_title(
        f"{report.get('model', 'encoder')} ({report['strategy']}): nDCG@10 "
        f"{report['ndcg@10']:.3f}, PSI {report['psi']:.2f}",
        fontsize=9,
    )
    sparse = analysis.get("sparse_buckets") or []
    if sparse:  # the reader sees at once which curves are noise
        ax.set_title(
            f"{ax.get_title()}\nbins of {', '.join(sparse)} hold < 5 queries: their curves are noise",
            fontsize=9,
        )
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, frameon=False)
    if saliency:
        ax = axes[0, 1]
        x, m, s = (np.asarray(saliency[k]) for k in ("positions", "mean", "std"))
        ax.plot(x, m)
        ax.fill_between(x, m - s, m + s, alpha=0.25)
        ax.set_xlabel("relative position in the document")
        ax.set_ylabel("normalised saliency")
        ax.set_title(f"gradient saliency (n={saliency['num_examples']})", fontsize=9)
    fig.tight_layout()
    return fig


def write_report(report: dict, path: str | Path) -> Path:
    path = Path(path)
    path.write_text(json.dumps(report, indent=1))
    return path
