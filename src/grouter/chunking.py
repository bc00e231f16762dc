"""Walking large arrays in pieces: hot paths stream memory-mapped files chunk by chunk, so memory
stays bounded whatever the corpus or store size, and each chunk is one vectorised operation."""

from __future__ import annotations

from typing import Iterator

import numpy as np

CHUNK_IDS = 1 << 22  # values handled per step when streaming rows of expert ids


def batches_of(idx, batch_size: int, start: int = 0) -> Iterator[np.ndarray]:
    """Consecutive batches of ``batch_size`` of the sequence indices ``idx`` (an int: ``range(idx)``),
    from position ``start``; the last batch may be shorter."""
    idx = np.arange(idx) if isinstance(idx, (int, np.integer)) else np.asarray(idx, dtype=np.int64)
    for lo in range(start, len(idx), batch_size):
        yield idx[lo:lo + batch_size]


def row_chunks(n: int, per_seq: int, target: int = CHUNK_IDS) -> Iterator[tuple[int, int]]:
    """Ranges ``[a, b)`` of ``n`` rows of ``per_seq`` values each, about ``target`` values at a time."""
    step = max(1, target // max(per_seq, 1))
    for a in range(0, n, step):
        yield a, min(n, a + step)
