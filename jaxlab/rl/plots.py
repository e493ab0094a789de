"""The rollout timeline plot shared by the RL trainer and the scheduling simulator."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

__all__ = ["plot_occupancy"]


def plot_occupancy(
    steps: Sequence[tuple[float, float, float]],
    updates: Sequence[tuple[float, float]],
    path: str | Path,
    title: str,
    *,
    xlabel: str = "seconds",
) -> None:
    """Slot occupancy over time with the policy updates shaded, as a PNG.

    Args:
      steps: ``(start, end, occupancy)`` of each decode step, occupancy in [0, 1].
      updates: ``(start, end)`` of each policy update (an instant one is drawn as a line).
      path: the PNG to write.
      title: the figure's title.
      xlabel: the unit of the times (seconds for the trainer, decode steps for the simulator).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 3))
    if steps:
        ax.step(
            [s for s, _, _ in steps],
            [o for _, _, o in steps],
            where="post",
            lw=0.8,
            label="slot occupancy",
        )
    for k, (s, e) in enumerate(updates):
        label = "policy update" if k == 0 else None
        if e > s:
            ax.axvspan(s, e, color="tab:red", alpha=0.25, label=label)
        else:
            ax.axvline(s, color="tab:red", alpha=0.4, lw=0.6, label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("slot occupancy")
    ax.set_ylim(0, 1.05)
    ax.set_title(title)
    if steps or updates:
        ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
