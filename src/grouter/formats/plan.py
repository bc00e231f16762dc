"""The placement plan format, and what engines use of it at run time.

``plan.json`` (written by ``grouter place`` beside its ``report.json``): where every expert lives
and which data-parallel rank trains which sequence of every global batch. Expert ids are relabelled
so that rank ``r``'s experts are the contiguous block ``[r*E/R, (r+1)*E/R)`` that Megatron and torch
expert parallelism assign to ``r`` (:func:`relabel`), and :class:`PlanSampler` serves data-parallel
rank ``r`` its sequences: no engine patch. How plans are made is :mod:`grouter.place`'s
(docs/method.md#expert-parallel-placement).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import Sampler

from ..artifacts import atomic_write_bytes, encode_json, read_json, read_manifest
from ..errors import GrouterError

PLAN_FORMAT, PLAN_VERSION = "grouter-placement-plan", 1


def expert_ranks(permutation: np.ndarray, ranks: int) -> np.ndarray:
    """Rank holding each logical expert under ``permutation`` (contiguous physical blocks)."""
    permutation = np.asarray(permutation, dtype=np.int64)
    return permutation // (len(permutation) // ranks)


@dataclass
class Plan:
    """An EP placement plan: where experts live and which data-parallel rank trains which sequence.

    ``permutation[logical] = physical`` expert id; rank r holds physical ids ``[r*E/R, (r+1)*E/R)``.
    ``samples[r][b]``: sequence indices (of the store's split) data-parallel rank r trains in global
    batch b, in order. ``dropped``: the < R sequences left out so every rank gets the same count.
    """

    n_experts: int
    k: int
    ranks: int
    ranks_per_node: int | None
    level: str
    algorithm: str
    scope: str
    global_batch: int
    seed: int
    split: str
    n_sequences: int
    permutation: np.ndarray
    samples: list[list[np.ndarray]]
    dropped: np.ndarray
    source: dict = field(default_factory=dict)
    report: dict = field(default_factory=dict)
    # What each rank sends per global batch, {"plan": ..., "random": ...} (grouter.hardware.StepTraffic), from
    # plan_placement: for grouter.hardware.predict on other clusters. In memory only, not saved.
    step_traffic: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def experts_per_rank(self) -> int:
        return self.n_experts // self.ranks

    @property
    def rank_of_expert(self) -> np.ndarray:
        """Rank holding each logical expert."""
        return expert_ranks(self.permutation, self.ranks)

    @property
    def n_batches(self) -> int:
        return len(self.samples[0]) if self.samples else 0

    @property
    def optimises(self) -> str:
        return "node" if self.level == "node" else "deepep"

    def to_json(self) -> dict:
        return {"format": PLAN_FORMAT, "version": PLAN_VERSION, "n_experts": self.n_experts, "k": self.k,
                "ranks": self.ranks, "ranks_per_node": self.ranks_per_node, "level": self.level,
                "algorithm": self.algorithm, "scope": self.scope, "optimises": self.optimises,
                "global_batch": self.global_batch, "seed": self.seed, "split": self.split,
                "n_sequences": self.n_sequences, "n_batches": self.n_batches, "source": self.source,
                "experts_per_rank": self.experts_per_rank,
                "permutation": self.permutation.tolist(),
                "rank_experts": [np.flatnonzero(self.rank_of_expert == r).tolist() for r in range(self.ranks)],
                "samples": [[b.tolist() for b in batches] for batches in self.samples],
                "dropped": self.dropped.tolist()}

    def save(self, path: str | Path) -> Path:
        """Write ``plan.json`` (compact: it lists every sequence) into directory ``path`` (or to file ``path``)."""
        path = Path(path)
        file = path if path.suffix == ".json" else path / "plan.json"
        atomic_write_bytes(file, encode_json(self.to_json(), compact=True))
        return file

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        """Read a plan from ``plan.json`` (or a file of another name) or the directory holding it,
        with the ``report.json`` beside it when there is one."""
        path = Path(path)
        file = path / "plan.json" if path.is_dir() else path
        d = read_manifest(path, "plan.json", PLAN_FORMAT, PLAN_VERSION, "placement plan", "grouter place",
                          accept_file=True)
        try:
            plan = cls._from_json(d)
        except (KeyError, TypeError, ValueError) as e:
            raise GrouterError(f"placement plan {file} is corrupt ({e}); re-create it with `grouter place`") from None
        report = file.parent / "report.json"
        if report.is_file():
            plan.report = read_json(report, "placement report")
        return plan

    @classmethod
    def _from_json(cls, d: dict) -> "Plan":
        """The plan :meth:`to_json` wrote; KeyError, TypeError or ValueError when it does not hold one."""
        perm = np.asarray(d["permutation"], dtype=np.int64)
        plan = cls(n_experts=int(d["n_experts"]), k=int(d["k"]), ranks=int(d["ranks"]),
                   ranks_per_node=d["ranks_per_node"], level=d["level"], algorithm=d["algorithm"],
                   scope=d.get("scope", "batch"), global_batch=int(d["global_batch"]), seed=int(d["seed"]),
                   split=d["split"], n_sequences=int(d["n_sequences"]), permutation=perm,
                   samples=[[np.asarray(b, dtype=np.int64) for b in batches] for batches in d["samples"]],
                   dropped=np.asarray(d["dropped"], dtype=np.int64), source=d.get("source", {}))
        if (len(perm) != plan.n_experts or not np.array_equal(np.sort(perm), np.arange(plan.n_experts))
                or len(plan.samples) != plan.ranks or plan.n_experts % plan.ranks):
            raise ValueError("inconsistent")
        return plan


def relabel(ids, permutation):
    """Physical expert ids: ``permutation[ids]`` (numpy array or torch tensor, dtype kept).

    After relabelling, rank r's experts are the contiguous block ``[r*E/R, (r+1)*E/R)`` that
    Megatron / torch expert parallelism assign to rank r, so an unmodified engine realises the plan.
    """
    perm = np.asarray(permutation, dtype=np.int64)
    if not np.array_equal(np.sort(perm), np.arange(len(perm))):
        raise GrouterError("the expert permutation is not a permutation of 0..E-1; re-create the plan")
    if isinstance(ids, torch.Tensor):
        lut = torch.as_tensor(perm, dtype=torch.long, device=ids.device)
        return lut[ids.long()].to(ids.dtype)
    ids = np.asarray(ids)
    return perm.astype(ids.dtype)[ids] if ids.dtype.kind in "iu" else perm[ids.astype(np.int64)]


class PlanSampler(Sampler):
    """Serves data-parallel rank ``rank`` the sequences of its group, global batch after global batch.

    Indices are into the split the plan was made for. With the ``balanced`` algorithm every rank
    yields the same number of indices (``global_batch / R`` per batch); a ``greedy`` plan gives
    ranks unequal counts, which synchronous data parallelism cannot run as it is.
    """

    def __init__(self, plan: Plan | str | Path, rank: int, world_size: int):
        if not isinstance(plan, Plan):
            plan = Plan.load(plan)
        if world_size != plan.ranks:
            raise GrouterError(f"the plan is for {plan.ranks} data-parallel ranks but world_size is {world_size}; "
                               f"make a plan with --ranks {world_size}")
        if not 0 <= rank < world_size:
            raise GrouterError(f"rank {rank} is outside 0..{world_size - 1}")
        self.plan, self.rank, self.world_size = plan, rank, world_size
        self._indices = (np.concatenate(plan.samples[rank]) if plan.samples[rank] else np.zeros(0, np.int64))

    def batches(self) -> list[np.ndarray]:
        """This rank's sequences of each global batch."""
        return self.plan.samples[self.rank]

    def __iter__(self) -> Iterator[int]:
        return iter(self._indices.tolist())

    def __len__(self) -> int:
        return len(self._indices)
