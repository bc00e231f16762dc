"""Metrics of the paper (docs/method.md#metrics), as plain functions on arrays or tensors.

Loads are token-slot counts per expert (``L_i``); all functions accept NumPy arrays or torch
tensors and return NumPy values so they can go straight into JSON logs.
"""

from __future__ import annotations

import numpy as np
import torch


def _np(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def max_vio(loads) -> np.ndarray:
    """``(max_i L_i - mean(L)) / mean(L)`` over the last axis (experts).

    On one batch's loads it is the per-batch MaxVio; on loads summed over a whole run it is
    MaxVioGlobal (paper App. H). 0 means perfect balance; ``E - 1`` means one expert takes all.
    """
    loads = _np(loads).astype(np.float64)
    mean = loads.mean(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(mean > 0, (loads.max(axis=-1) - mean) / mean, 0.0)


def topk_set_agreement(ids_a, ids_b) -> float:
    """Fraction of tokens whose top-k expert *set* is identical in both routings (order ignored).

    Routing consistency between two checkpoints on the same input (paper Fig. 1a), and how far
    tuning moved a Grouter's routing.
    """
    a, b = np.sort(_np(ids_a), axis=-1), np.sort(_np(ids_b), axis=-1)
    if a.shape != b.shape:
        raise ValueError(f"routings have different shapes {a.shape} and {b.shape}")
    return float((a == b).all(axis=-1).mean())


def topk_recall(teacher_ids, student_ids) -> float:
    """Fraction of the teacher's top-k experts that appear in the student's top-k."""
    t, s = _np(teacher_ids), _np(student_ids)
    hits = (t[..., :, None] == s[..., None, :]).any(axis=-1)
    return float(hits.mean())


def score_cosine(scores_a, scores_b) -> float:
    """Mean per-token cosine similarity of two router score vectors ``[..., E]``."""
    a = _np(scores_a).astype(np.float64).reshape(-1, np.shape(scores_a)[-1])
    b = _np(scores_b).astype(np.float64).reshape(a.shape)
    num = (a * b).sum(-1)
    den = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    return float(np.mean(num / np.maximum(den, 1e-12)))


def grad_norm_cv(grad_norms, window: int) -> np.ndarray:
    """Coefficient of variation (std/mean) of the grad norm over a sliding window.

    Returns one value per full window (``len - window + 1`` values); empty if the series is
    shorter than the window.
    """
    g = _np(grad_norms).astype(np.float64)
    if len(g) < window:
        return np.empty(0)
    windows = np.lib.stride_tricks.sliding_window_view(g, window)
    return windows.std(axis=-1) / np.maximum(windows.mean(axis=-1), 1e-12)
