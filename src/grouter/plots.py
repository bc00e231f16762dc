"""Plots for people, drawn off-screen: the helpers every stage's figures share.

matplotlib's object API (no pyplot state), so importing grouter never changes the backend of a
notebook or application.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle


def figure(figsize: tuple[float, float], rows: int = 1, cols: int = 1, **kw):
    """A figure and its axes, drawn off-screen: matplotlib's object API, so importing grouter never
    changes the backend of a notebook or application (no pyplot state)."""
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(rows, cols, **kw)


def per_head_paths(path: Path, heads) -> list[Path]:
    """One plot per head: ``path`` itself for a shared head (``heads`` None), else ``NAME_layer{l}.EXT``
    per source layer (``NAME_layers{a}-{b}.EXT`` per group of layers; :class:`grouter.routers.Heads`)."""
    if heads is None:
        return [path]
    return [path.with_name(f"{path.stem}_{label}{path.suffix}") for label in heads.labels]


def plot_affinity(affinity: np.ndarray, groups: list[list[int]], path: Path, title: str) -> None:
    """Co-activation heatmap with experts reordered by group and each group boxed."""
    order = [e for g in groups for e in g]
    fig, ax = figure((6.5, 5.5))
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


def plot_loads(loads: dict[str, np.ndarray], path: Path, title: str) -> None:
    """Share of token-slots per expert for several routings (e.g. before/after tuning)."""
    fig, ax = figure((8, 3.8))
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
