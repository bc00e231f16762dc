"""Sharding a resumable pass over the sequences of a dataset across the processes of a launch.

Capture and pre-dispatch both run a frozen model once over every sequence and write one row per
sequence into preallocated files; both shard the same way, so this is the one place for it:

- rank ``r`` takes a contiguous, ``batch_size``-aligned range of each split (:func:`batch_ranges`),
  so every batch is the one a single process would run and the files are byte-identical to a
  single-process run's (batch composition can change floating point results on some backends);
- rank 0 owns the resumable work directory (:meth:`grouter.runner.Output.resumable`) and sizes the
  files; every rank writes straight into its own slice of them (merging copies nothing);
- progress is recorded per rank (``{split}/rank{r}``) at batch steps common to all ranks, after a
  barrier, so a sharded run resumes too (with the same number of processes and batch size).

All ranks must see the same file system. The process group is :class:`grouter.device.ProcessGroup`.
"""

from __future__ import annotations

import math
import sys
from typing import Callable, Iterator

from .artifacts import read_json
from .device import ProcessGroup
from .runner import Output


def batch_ranges(n: int, batch_size: int, world: int) -> list[tuple[int, int]]:
    """Sequence range [lo, hi) of each rank: contiguous runs of whole batches of the split."""
    n_batches = math.ceil(n / batch_size)
    return [(min(r * n_batches // world * batch_size, n), min((r + 1) * n_batches // world * batch_size, n))
            for r in range(world)]


class ShardedJob:
    """Where each rank's shard of each split got to: ``done[f"{split}/rank{r}"]`` sequences.

    Rank 0 owns the resumable directory (``more``: what else resuming depends on) and records
    progress; the other ranks read it once (:meth:`read`, after rank 0 has sized the files).
    """

    def __init__(self, out: Output, more: dict, group: ProcessGroup, what: str):
        self.group, self.dir = group, None
        if group.rank == 0:
            self.dir = out.resumable({**more, "world_size": group.world})
            if self.dir.resumed:
                print(f"resuming {what} in {self.dir.work}", file=sys.stderr)
        self.work = out.path.parent / f".{out.path.name}.partial"
        self.done: dict[str, int] = {}

    def forget(self, split: str) -> None:
        """Progress without its data is no progress (the files were missing or resized)."""
        for r in range(self.group.world):
            if self.dir.done(f"{split}/rank{r}"):
                self.dir.set_done(f"{split}/rank{r}", 0)

    def read(self) -> dict[str, int]:
        """Every rank's recorded progress (call on every rank once the files are sized)."""
        self.group.barrier()
        if self.dir is not None:
            self.done = self.dir.progress()
        else:
            self.done = {key: int(v) for key, v in read_json(self.work / "progress.json", "job progress")["done"].items()}
        return self.done

    def _record(self, split: str, ranges: list[tuple[int, int]], sequences_per_rank: int) -> None:
        if self.dir is not None:  # any subset of these records is a safe resume point
            for r, (lo, hi) in enumerate(ranges):
                self.dir.set_done(f"{split}/rank{r}", min(sequences_per_rank, hi - lo))

    def shard(self, split: str, n: int, batch_size: int) -> tuple[int, int, int]:
        """This rank's range ``[lo, hi)`` of the ``n`` sequences of ``split`` and the first of them not
        yet done."""
        lo, hi = batch_ranges(n, batch_size, self.group.world)[self.group.rank]
        return lo, hi, min(lo + self._start_step(split, n, batch_size) * batch_size, hi)

    def _start_step(self, split: str, n: int, batch_size: int) -> int:
        # All ranks record progress at the same steps, so they agree on where to resume.
        return max(math.ceil(self.done.get(f"{split}/rank{r}", 0) / batch_size) for r in range(self.group.world))

    def batches(self, split: str, n: int, batch_size: int, flush: Callable[[], None],
                every: int) -> Iterator[tuple[int, int]]:
        """This rank's batches ``[a, b)`` of ``split`` from where the job stopped; every ``every``
        steps (and at the end) ``flush`` the files and record every rank's progress."""
        ranges = batch_ranges(n, batch_size, self.group.world)
        steps = max(math.ceil((hi - lo) / batch_size) for lo, hi in ranges)
        lo, hi = ranges[self.group.rank]
        for step in range(self._start_step(split, n, batch_size), steps):
            a = lo + step * batch_size
            if a < hi:
                yield a, min(a + batch_size, hi)
            if (step + 1) % every == 0 or step == steps - 1:
                flush()
                self.group.barrier()  # every rank's data up to this step is on disk
                self._record(split, ranges, (step + 1) * batch_size)

    def finish(self) -> None:
        """Rank 0 renames the work directory into place once every rank is done; all ranks wait."""
        self.group.barrier()
        if self.dir is not None:
            self.dir.finish()
        self.group.barrier()
