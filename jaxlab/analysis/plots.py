"""Plots of the analysis results (matplotlib, Agg backend, PNG)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = ["plot_information", "plot_sufficiency", "plot_mi", "plot_interventions"]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_information(traces: Sequence, path: str | Path, *, labels: Sequence[str] | None = None):
    """Cumulative self-information of each trace (:class:`TraceInformation`), its procedural part
    dashed, epistemic tokens marked with dots."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(9, 4))
    for i, tr in enumerate(traces):
        cum = tr.cumulative()
        x = np.arange(1, len(tr.info) + 1)
        label = labels[i] if labels else f"trace {i}"
        (line,) = ax.plot(x, cum["total"], lw=1.2, label=f"{label}: total")
        ax.plot(
            x,
            cum["procedural"],
            lw=1.0,
            ls="--",
            color=line.get_color(),
            label=f"{label}: procedural",
        )
        e = np.flatnonzero(tr.epistemic)
        if len(e):
            ax.scatter(x[e], cum["total"][e], s=12, color=line.get_color(), zorder=3)
    ax.set_xlabel("response token")
    ax.set_ylabel("cumulative self-information (nats)")
    ax.set_title("Self-information along traces (dots: epistemic-marker tokens)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_sufficiency(curves: Sequence, path: str | Path, *, labels: Sequence[str] | None = None):
    """H(Y | s_t) and -log p(y* | s_t) against the fraction of the trace kept."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for i, c in enumerate(curves):
        n = max(int(c.checkpoints[-1]), 1)
        x = np.asarray(c.checkpoints) / n
        label = labels[i] if labels else f"trace {i}"
        axes[0].plot(x, c.entropy, marker="o", ms=3, label=label)
        axes[1].plot(x, -np.asarray(c.logp_answer), marker="o", ms=3, label=label)
    axes[0].set_ylabel("H(Y | s_t) over sampled answers (nats)")
    axes[1].set_ylabel("-log p(y* | s_t) (nats)")
    for ax in axes:
        ax.set_xlabel("fraction of the trace kept")
        ax.legend(fontsize=7)
    fig.suptitle("Answer sufficiency along traces")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_mi(curves: Sequence[tuple[np.ndarray, np.ndarray]], path: str | Path, *, labels=None):
    """MI estimate per token; ``curves`` holds ``(MI [T], epistemic mask [T])`` pairs."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(9, 3.6))
    for i, (mi, epi) in enumerate(curves):
        x = np.arange(len(mi))
        (line,) = ax.plot(x, mi, lw=1.0, label=labels[i] if labels else f"trace {i}")
        e = np.flatnonzero(np.asarray(epi, bool))
        if len(e):
            ax.scatter(x[e], np.asarray(mi)[e], s=14, color=line.get_color(), zorder=3)
    ax.set_xlabel("trace token")
    ax.set_ylabel("HSIC nCCA MI(h_t; h_GT)")
    ax.set_title("MI with the ground truth's representation (dots: epistemic markers)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_interventions(results: dict[str, dict], path: str | Path, *, title: str = ""):
    """Accuracy and markers per response for each control ``{name: {"accuracy",
    "markers_per_response"[, "accuracy_ci": (lo, hi)]}}`` (intervals drawn as error bars)."""
    plt = _plt()
    names = list(results)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    acc = np.array([results[n]["accuracy"] for n in names])
    yerr = None
    if all("accuracy_ci" in results[n] for n in names):  # Wilson intervals as error bars
        ci = np.array([results[n]["accuracy_ci"] for n in names])
        yerr = np.stack([acc - ci[:, 0], ci[:, 1] - acc])
    axes[0].bar(names, acc, color="tab:blue", yerr=yerr, capsize=3)
    axes[0].set_ylabel("accuracy")
    axes[0].set_ylim(0, 1)
    axes[1].bar(names, [results[n]["markers_per_response"] for n in names], color="tab:orange")
    axes[1].set_ylabel("epistemic markers / response")
    for ax in axes:
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
        for label in ax.get_xticklabels():
            label.set_horizontalalignment("right")
    fig.suptitle(title or "Test-time controls")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
