"""Plots and tables for people: what each stage did, readable at a glance."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402


def plot_affinity(affinity: np.ndarray, groups: list[list[int]], path: Path, title: str) -> None:
    """Co-activation heatmap with experts reordered by group and each group boxed."""
    order = [e for g in groups for e in g]
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    im = ax.imshow(affinity[np.ix_(order, order)], cmap="viridis")
    start = 0
    for g in groups:
        ax.add_patch(Rectangle((start - 0.5, start - 0.5), len(g), len(g), fill=False, edgecolor="red", lw=1.2))
        start += len(g)
    ax.set_title(title)
    ax.set_xlabel("source expert (grouped)")
    ax.set_ylabel("source expert (grouped)")
    fig.colorbar(im, ax=ax, label="P(i and j both in top-k)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_loads(loads: dict[str, np.ndarray], path: Path, title: str) -> None:
    """Share of token-slots per expert for several routings (e.g. before/after tuning)."""
    fig, ax = plt.subplots(figsize=(8, 3.8))
    width = 0.8 / len(loads)
    for i, (label, load) in enumerate(loads.items()):
        share = np.asarray(load, dtype=float) / max(np.sum(load), 1)
        ax.bar(np.arange(len(share)) + i * width, share, width=width, label=label)
    ax.axhline(1 / len(next(iter(loads.values()))), color="black", ls="--", lw=1, label="perfect balance")
    ax.set_xlabel("expert")
    ax.set_ylabel("share of token-slots")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
