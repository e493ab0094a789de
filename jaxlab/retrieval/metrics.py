"""Retrieval metrics and PosIR's position-bias analysis (pure numpy / scipy).

* nDCG@k with trec_eval's linear gain (rel / log2(rank + 1)) and recall@k, per query;
* length buckets on the positive document's token length: Q1 (0, 512], Q2 (512, 1024],
  Q3 (1024, 1536], Q4 (1536, ∞);
* 20 equal-width position bins of the evidence's relative position on [0, 1];
* per bucket: mean nDCG@10 per bin, the bucket score (unweighted mean of the bin means), the position
  sensitivity index PSI = 1 − min / max of the bin means, a least-squares line (slope < 0: primacy) and
  Pearson / Spearman / Kendall correlations of bin mean against bin centre.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
from scipy import stats

__all__ = [
    "BUCKET_EDGES",
    "BUCKET_NAMES",
    "ndcg_at_k",
    "recall_at_k",
    "length_buckets",
    "position_bins",
    "position_analysis",
    "SparseBinsWarning",
]

BUCKET_EDGES = (0, 512, 1024, 1536)
BUCKET_NAMES = ("Q1", "Q2", "Q3", "Q4")


def ndcg_at_k(ranked: Sequence[Sequence[str]], qrels: Sequence[dict[str, int]], k: int = 10):
    """Per-query nDCG@k: ``ranked[i]`` the retrieved ids best first, ``qrels[i]`` id → relevance."""
    out = np.zeros(len(ranked))
    discounts = 1.0 / np.log2(np.arange(2, k + 2))
    for i, (run, rel) in enumerate(zip(ranked, qrels, strict=True)):
        gains = np.array([rel.get(doc, 0) for doc in list(run)[:k]], float)
        dcg = float((gains * discounts[: len(gains)]).sum())
        ideal = np.sort(np.array([g for g in rel.values() if g > 0], float))[::-1][:k]
        idcg = float((ideal * discounts[: len(ideal)]).sum())
        out[i] = dcg / idcg if idcg > 0 else 0.0
    return out


def recall_at_k(ranked: Sequence[Sequence[str]], qrels: Sequence[dict[str, int]], k: int = 10):
    """Per-query share of the relevant documents found in the top k."""
    out = np.zeros(len(ranked))
    for i, (run, rel) in enumerate(zip(ranked, qrels, strict=True)):
        relevant = {d for d, g in rel.items() if g > 0}
        out[i] = len(relevant & set(list(run)[:k])) / max(len(relevant), 1)
    return out


def length_buckets(token_lengths) -> np.ndarray:
    """Bucket index 0..3 (Q1..Q4) of each positive-document token length."""
    t = np.asarray(token_lengths)
    return np.searchsorted(np.asarray(BUCKET_EDGES[1:]), t, side="left").astype(np.int64)


def position_bins(relpos, num_bins: int = 20) -> np.ndarray:
    """Equal-width bin index 0..num_bins−1 of relative positions in [0, 1] (1.0 in the last bin)."""
    return np.clip(np.floor(np.asarray(relpos) * num_bins), 0, num_bins - 1).astype(np.int64)


def _trend(centres, means):
    out = {"slope": math.nan, "intercept": math.nan, "r2": math.nan}
    for name in ("pearson", "spearman", "kendall"):
        out[name], out[f"{name}_p"] = math.nan, math.nan
    if len(means) < 3 or np.ptp(means) == 0:
        return out
    fit = stats.linregress(centres, means)
    out.update(slope=float(fit.slope), intercept=float(fit.intercept), r2=float(fit.rvalue**2))
    for name, fn in (
        ("pearson", stats.pearsonr),
        ("spearman", stats.spearmanr),
        ("kendall", stats.kendalltau),
    ):
        res = fn(centres, means)
        out[name], out[f"{name}_p"] = float(res[0]), float(res[1])
    return out


def _bins_summary(ndcg, relpos, num_bins):
    idx = position_bins(relpos, num_bins)
    centres = (np.arange(num_bins) + 0.5) / num_bins
    means = [float(ndcg[idx == b].mean()) if np.any(idx == b) else None for b in range(num_bins)]
    counts = [int(np.sum(idx == b)) for b in range(num_bins)]
    seen = np.array([m for m in means if m is not None])
    cen = np.array([c for c, m in zip(centres, means, strict=True) if m is not None])
    summary = {
        "n": int(len(ndcg)),
        "bin_means": means,
        "bin_counts": counts,
        "ndcg@10": float(seen.mean()) if seen.size else math.nan,
        "psi": float(1.0 - seen.min() / seen.max()) if seen.size and seen.max() > 0 else math.nan,
    }
    summary.update(_trend(cen, seen))
    return summary


class SparseBinsWarning(UserWarning):
    """Position bins with too few queries: their means, PSI and trend are noise."""


def position_analysis(
    ndcg, relpos, token_lengths, *, num_bins: int = 20, min_bin_queries: int = 5
) -> dict:
    """PosIR's analysis: overall nDCG@10 (mean over queries) and PSI, and per length bucket the bin
    means, bucket score, PSI and trend statistics. Empty buckets are omitted.

    A bucket whose non-empty bins hold fewer than ``min_bin_queries`` queries each (PSI over 7-12
    queries is noise) is listed in ``report["sparse_buckets"]`` with a :class:`SparseBinsWarning`."""
    ndcg, relpos = np.asarray(ndcg, float), np.asarray(relpos, float)
    buckets = length_buckets(token_lengths)
    overall = _bins_summary(ndcg, relpos, num_bins)
    report = {
        "ndcg@10": float(ndcg.mean()) if ndcg.size else math.nan,
        "psi": overall["psi"],
        "overall": overall,
        "buckets": {},
        "num_bins": num_bins,
    }
    for b, name in enumerate(BUCKET_NAMES):
        sel = buckets == b
        if sel.any():
            report["buckets"][name] = _bins_summary(ndcg[sel], relpos[sel], num_bins)
    sparse = {
        name: min(c for c in b["bin_counts"] if c > 0)
        for name, b in report["buckets"].items()
        if any(0 < c < min_bin_queries for c in b["bin_counts"])
    }
    report["sparse_buckets"] = sorted(sparse)
    if sparse:
        detail = ", ".join(
            f"{name} (n={report['buckets'][name]['n']}, smallest bin {c})"
            for name, c in sparse.items()
        )
        warnings.warn(
            f"position bins with fewer than {min_bin_queries} queries in {detail}: their bin "
            f"means, PSI and slope are noise; build at least {min_bin_queries * num_bins} "
            "queries per bucket",
            SparseBinsWarning,
            stacklevel=2,
        )
    return report
