"""Figures people would rather look at than read: PR curves, mAP over epochs, weight histograms."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from scbch_dist.io import atomic_save_with  # noqa: E402


def _save(fig, path: Path) -> None:
    atomic_save_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))
    plt.close(fig)


def plot_pr(runs: dict[str, dict], path: Path, title: str = "") -> None:
    """Precision-recall curves; ``runs`` maps a label (a method) to ``evaluate.curves`` output.
    Top row: over Hamming radius; bottom row: over the first k retrieved. Columns: I2T, T2I."""
    fig, axes = plt.subplots(2, 2, figsize=(10, 8), squeeze=False)
    for col, direction in enumerate(("i2t", "t2i")):
        for row, (kind, what) in enumerate((("pr_radius", "Hamming radius"), ("pr_topk", "top-k"))):
            ax = axes[row][col]
            for label, c in runs.items():
                curve = c[direction][kind]
                prec = [np.nan if p is None else p for p in curve["precision"]]
                ax.plot(curve["recall"], prec, marker="o", markersize=3, label=label)
            ax.set(xlabel="recall", ylabel="precision", title=f"{direction.upper()}: over {what}",
                   xlim=(0, 1), ylim=(0, 1))
            ax.grid(alpha=0.3)
            if len(runs) > 1:
                ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    _save(fig, path)


def plot_map_history(history: list[dict], path: Path, chance: float | None = None) -> None:
    """mAP (index ties and tie-aware) per evaluated epoch, both directions."""
    fig, ax = plt.subplots(figsize=(6, 4))
    epochs = [h["epoch"] for h in history]
    for direction in ("i2t", "t2i"):
        ax.plot(epochs, [h[direction]["map"] for h in history], marker="o", label=f"{direction.upper()} mAP")
        ax.plot(epochs, [h[direction]["map_tie_aware"] for h in history], ls="--", label=f"{direction.upper()} tie-aware")
    if chance is not None:
        ax.axhline(chance, color="gray", ls=":", label="chance")
    ax.set(xlabel="epoch", ylabel="mAP@all")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)


def plot_weight_histograms(panels: list[tuple[str, np.ndarray, np.ndarray | None]], path: Path, *,
                           xlabel: str = "sample weight", names: tuple[str, str] = ("clean", "corrupted")) -> None:
    """Histograms of a per-sample (or per-label) score split into two groups: the CSCC weights of
    clean and corrupted rows (the paper's Fig. 6), NACD's confidences of true and false candidate
    labels, RSHNL's self-paced weights. One panel per (title, scores, mask of the second group or None)."""
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
    for ax, (title, w, second) in zip(axes[0], panels):
        bins = np.linspace(min(float(w.min()), 0.5), max(float(w.max()), 1.0), 41)
        if second is None:
            ax.hist(w, bins=bins, color="tab:blue", alpha=0.8, label="all")
        else:
            ax.hist(w[~second], bins=bins, color="tab:green", alpha=0.6, label=names[0])
            ax.hist(w[second], bins=bins, color="tab:red", alpha=0.6, label=names[1])
        ax.set(title=title, xlabel=xlabel, ylabel="count")
        ax.legend()
    _save(fig, path)
