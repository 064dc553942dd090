"""Figures people would rather look at than read: PR curves, mAP over epochs, weight histograms."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from scbch_dist.atomic import atomic_save_with  # noqa: E402


def _save(fig: Figure, path: Path) -> None:
    atomic_save_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))
    plt.close(fig)


def pr_figure(runs: dict[str, dict], title: str = "") -> Figure:
    """Precision-recall curves; ``runs`` maps a label (a method) to ``evaluate.curves`` output.
    Top row: over Hamming radius; bottom row: over the first k retrieved. GlobalBatch: I2T, T2I.
    Every panel has a legend, also with one curve: the figure names what it shows."""
    # constrained layout makes room for each panel's x label above the next row's title
    fig, axes = plt.subplots(2, 2, figsize=(10, 8), squeeze=False, layout="constrained")
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
            if runs:
                ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return fig


def plot_pr(runs: dict[str, dict], path: Path, title: str = "") -> None:
    """``pr_figure`` saved as a PNG at ``path``."""
    _save(pr_figure(runs, title), path)


def map_history_figure(history: list[dict], chance: float | None = None, title: str = "") -> Figure:
    """mAP (index ties and tie-aware) per evaluated epoch, both directions; ``history`` holds one
    entry per evaluation: ``epoch`` (1-based), ``i2t``/``t2i`` = ``{map, map_tie_aware}``, ``avg_map``.
    The best evaluation by ``avg_map`` (the summary's ``best``, the first one on a tie) is marked:
    a dotted vertical line at its epoch and a star at its average of I2T and T2I mAP."""
    fig, ax = plt.subplots(figsize=(6, 4), layout="constrained")
    epochs = [h["epoch"] for h in history]
    for direction in ("i2t", "t2i"):
        ax.plot(epochs, [h[direction]["map"] for h in history], marker="o", label=f"{direction.upper()} mAP")
        ax.plot(epochs, [h[direction]["map_tie_aware"] for h in history], ls="--", label=f"{direction.upper()} tie-aware")
    if chance is not None:
        ax.axhline(chance, color="gray", ls=":", label="chance")
    scored = [h for h in history if "avg_map" in h]
    if scored:
        best = max(scored, key=lambda h: h["avg_map"])  # as write_summary picks it
        ax.axvline(best["epoch"], color="black", ls=":", lw=1)
        ax.plot([best["epoch"]], [best["avg_map"]], marker="*", markersize=14, color="gold", markeredgecolor="black",
                ls="none", label=f"best (epoch {best['epoch']}): avg mAP {best['avg_map']:.3f}")
    ax.set(xlabel="epoch", ylabel="mAP@all")
    if title:
        ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def plot_map_history(history: list[dict], path: Path, chance: float | None = None, *, title: str = "") -> None:
    """``map_history_figure`` saved as a PNG at ``path``; ``title`` names the run (folder, bits, noise)."""
    _save(map_history_figure(history, chance, title), path)


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
