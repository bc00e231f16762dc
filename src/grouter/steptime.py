"""The step-time objective of ``grouter place``: pieces for planning by predicted step time, not bytes.

A plan that sends fewer copies in all can still make a step slower: a step is as slow as its slowest
rank (expert compute plus all-to-all, :mod:`grouter.hardware`), and grouping co-used experts
concentrates a batch's copies on fewer ranks. :func:`grouter.place.plan_placement` with
``objective="steptime"`` therefore prices every copy by how much the ranks and links it loads count
in the step (:func:`placement_costs`, the gradient of a softmax-weighted sum of the ranks' times),
re-places each batch's sequences under those prices, keeps per batch the placement of least
predicted time, and finally keeps, of whole candidates (the bytes plan, its step-time re-placement,
the same stage from the engine's default expert placement, and random placement itself), the one
of least predicted mean step time: never slower than random by construction (docs/steptime.md).

Here: a placement of every batch's members (:class:`Placement`), the per-(batch, rank) traffic it
gives for each layer's routing (:func:`layer_traffic`), the priced costs, and the what-if of
redundant experts (:func:`replicate_experts`, :class:`ReplicatedIds`): replicas of the hottest
experts, EPLB-style, each token-slot of a replicated expert spread over its copies.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import GrouterError
from .hardware import LayerTraffic, StepTraffic, copy_prices, rank_times

# The stage's rounds: softmax sharpness of the ranks' prices (in units of the batch's mean
# all-to-all time) doubles each round; earlier prices are averaged in (fictitious play).
FIRST_SHARPNESS = 2.0
# Every link direction is priced at least this share of the mean rank weight (copies still count).
PRICE_FLOOR = 0.05


@dataclass
class Placement:
    """Which rank trains each member of each global batch: ``members`` (sequence ids, batch after
    batch), ``groups`` (the batch of each), ``rank`` (of each), ``batches`` B and ``ranks`` R."""

    members: np.ndarray
    groups: np.ndarray
    rank: np.ndarray
    batches: int
    ranks: int

    @classmethod
    def of(cls, samples: list[list[np.ndarray]]) -> "Placement":
        """From ``samples[r][b]``."""
        R, B = len(samples), len(samples[0])
        parts = [(samples[r][b], b, r) for b in range(B) for r in range(R)]
        members = np.concatenate([p[0] for p in parts]).astype(np.int64)
        sizes = [len(p[0]) for p in parts]
        groups = np.repeat([p[1] for p in parts], sizes).astype(np.int64)
        rank = np.repeat([p[2] for p in parts], sizes).astype(np.int64)
        return cls(members, groups, rank, B, R)

    def with_rank(self, rank: np.ndarray) -> "Placement":
        return Placement(self.members, self.groups, np.asarray(rank, dtype=np.int64), self.batches, self.ranks)

    def capacity(self) -> np.ndarray:
        """Members per rank of each batch (equal shares)."""
        return np.bincount(self.groups, minlength=self.batches) // self.ranks

    def samples(self) -> list[list[np.ndarray]]:
        """``samples[r][b]``, each in member order."""
        key = self.groups * self.ranks + self.rank
        order = np.argsort(key, kind="stable")
        cuts = np.searchsorted(key[order], np.arange(1, self.batches * self.ranks))
        parts = np.split(self.members[order], cuts)
        return [[parts[b * self.ranks + r] for b in range(self.batches)] for r in range(self.ranks)]

    def seq_rank(self, n: int) -> np.ndarray:
        """Rank of each of ``n`` sequences (-1: in no batch)."""
        out = np.full(n, -1, dtype=np.int64)
        out[self.members] = self.rank
        return out


@dataclass
class _Cells:
    """A placement's members sorted by (batch, rank) cell: ``rows`` (sequence ids), ``starts`` of the
    non-empty cells (``filled``) and the members per cell ``counts`` ``[B, R]``; shared by every sum."""

    rows: np.ndarray
    starts: np.ndarray
    filled: np.ndarray
    counts: np.ndarray

    @classmethod
    def of(cls, pl: Placement) -> "_Cells":
        key = pl.groups * pl.ranks + pl.rank
        order = np.argsort(key, kind="stable")
        counts = np.bincount(key, minlength=pl.batches * pl.ranks)
        return cls(pl.members[order], np.r_[0, np.cumsum(counts)[:-1]][counts > 0], counts > 0,
                   counts.reshape(pl.batches, pl.ranks))

    def sums(self, x: np.ndarray) -> np.ndarray:
        """``[B, R, C]``: the rows ``x[s]`` (per sequence) summed over each cell's members. Cells of one
        size (every full batch, equal shares) sum as a reshape, much faster than ``reduceat``'s int64
        loop (docs/steptime.md#planner-scale)."""
        B, R = self.counts.shape
        size = int(self.counts.flat[0]) if self.counts.size else 0
        if size and np.all(self.counts == size):
            return x[self.rows].reshape(B, R, size, -1).sum(2, dtype=np.int64)
        out = np.zeros((B * R, x.shape[1]), dtype=np.int64)
        if len(self.rows):
            out[self.filled] = np.add.reduceat(x[self.rows], self.starts, axis=0, dtype=np.int64)
        return out.reshape(B, R, -1)


def step_traffic_of(tr, pl: Placement, seq_len: int, cells: _Cells | None = None) -> StepTraffic:
    """What each rank's members of each batch send (``tr``: a :class:`grouter.place.Traffic`)."""
    c = _Cells.of(pl) if cells is None else cells
    nodes = tr.node_tokens if tr.node_tokens is not None and tr.node_tokens.shape[1] > 1 else None
    return StepTraffic(c.sums(tr.tokens), c.sums(tr.slots), None if nodes is None else c.sums(nodes),
                       c.counts * seq_len)


def layer_traffic(layers: list, shares: np.ndarray, pl: Placement, seq_len: int) -> LayerTraffic:
    """:class:`~grouter.hardware.LayerTraffic` of a placement: one :class:`StepTraffic` per layer routing."""
    cells = _Cells.of(pl)
    return LayerTraffic([step_traffic_of(tr, pl, seq_len, cells) for tr in layers], np.asarray(shares, dtype=np.float64))


def rank_weights(st: StepTraffic, profile, dispatcher: str, sharpness: float) -> np.ndarray:
    """``[B, R]``: a softmax over each batch's ranks of their layer times (compute + all-to-all), in
    units of the batch's mean all-to-all time times ``1 / sharpness``: the slowest ranks weigh most."""
    t = rank_times(st, profile, dispatcher)
    total = t["compute"] + t["comm"]
    scale = np.maximum(t["comm"].mean(1, keepdims=True), 1e-12)
    w = np.exp(sharpness * (total - total.max(1, keepdims=True)) / scale)
    return w / w.sum(1, keepdims=True)


def placement_costs(layers: list, lt: LayerTraffic, weights: list[np.ndarray], pl: Placement, profile,
                    dispatcher: str) -> np.ndarray:
    """``[m, R]`` (m: the placement's members; float32): the priced seconds a member adds if trained on each rank,
    summed over the layer routings (each by its share), with ``weights[l]`` ``[B, R]`` the ranks'
    weights in layer routing l (:func:`rank_weights`) at the current placement ``lt``."""
    cost = np.zeros((len(pl.members), pl.ranks), dtype=np.float32)  # float32: 256 MB at 1M sequences x 64 ranks
    bounds = np.r_[0, np.cumsum(np.bincount(pl.groups, minlength=pl.batches))]
    if np.any(np.diff(pl.groups) < 0):
        raise GrouterError("a placement's members must be listed batch after batch")
    for tr, st, share, w in zip(layers, lt.layers, lt.shares, weights):
        M1, M2 = copy_prices(st, profile, dispatcher, w * share, PRICE_FLOOR)
        x = (tr.slots if dispatcher == "megatron" else tr.tokens)
        nodes = tr.node_tokens if M2 is not None else None
        for b in range(pl.batches):
            rows = pl.members[bounds[b]:bounds[b + 1]]
            part = x[rows].astype(np.float32) @ M1[b].T.astype(np.float32)
            if nodes is not None:
                part += nodes[rows].astype(np.float32) @ M2[b].T.astype(np.float32)
            cost[bounds[b]:bounds[b + 1]] += part
    return cost


# -- redundant experts: the what-if --------------------------------------------------------------------
def replicate_experts(load: np.ndarray, rank_of_expert: np.ndarray, ranks: int, extra: int) -> dict:
    """EPLB-style replicas of the hottest experts: ``extra`` more expert slots (``extra / ranks`` per
    rank) each go to the expert of the highest load per copy; the replicas, heaviest per copy first,
    to the rank of least expected load (each copy taking ``load / copies``) that has a free slot and
    no copy of that expert yet. Returns ``{"copies" [E], "physical" [E, max copies] (-1: none),
    "rank_of_physical" [E + extra], "logical_of_physical" [E + extra]}``; physical id e < E is the
    original of expert e, where the plan put it."""
    load = np.asarray(load, dtype=np.float64)
    E = len(load)
    if extra % ranks:
        raise GrouterError(f"--redundant-experts {extra} must be a multiple of the {ranks} ranks (each rank holds "
                           "as many replicas)")
    copies = np.ones(E, dtype=np.int64)
    for _ in range(extra):
        copies[int(np.argmax(load / copies))] += 1
    rank_of = list(np.asarray(rank_of_expert, dtype=np.int64))
    logical = list(range(E))
    expected = np.bincount(rank_of_expert, load / copies, ranks)
    free = np.full(ranks, extra // ranks)
    for e in sorted(np.repeat(np.arange(E), copies - 1), key=lambda e: -load[e] / copies[e]):
        holds = np.bincount([r for r, x in zip(rank_of, logical) if x == e], minlength=ranks) > 0
        open_ranks = np.flatnonzero((free > 0) & ~holds)
        if len(open_ranks) == 0:
            open_ranks = np.flatnonzero(free > 0)
        r = int(open_ranks[np.argmin(expected[open_ranks])])
        rank_of.append(r)
        logical.append(int(e))
        expected[r] += load[e] / copies[e]
        free[r] -= 1
    logical = np.asarray(logical)
    physical = np.full((E, int(copies.max())), -1, dtype=np.int64)
    for e in range(E):
        ph = np.flatnonzero(logical == e)
        physical[e, :len(ph)] = ph
    return {"copies": copies, "physical": physical, "rank_of_physical": np.asarray(rank_of), "logical_of_physical": logical}


class ReplicatedIds:
    """Routing ids ``[n, L, k]`` read as physical expert ids under :func:`replicate_experts`: a token-slot of
    an expert with c copies goes to copy ``hash(sequence, token, slot) mod c`` (the copies share its
    load evenly, as EPLB assumes). Reads in rows like the ids it wraps (a slice stays lazy)."""

    def __init__(self, ids, replicas: dict, start: int = 0):
        self.ids, self.replicas, self.start = ids, replicas, start
        self.shape, self.ndim = ids.shape, 3
        self.dtype = np.dtype(np.uint16)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows):
        if not isinstance(rows, slice) or rows.step not in (None, 1):
            raise TypeError("ReplicatedIds reads contiguous rows only")
        a, b, _ = rows.indices(self.shape[0])
        return self._read(np.asarray(self.ids[a:b]), self.start + a)

    def __array__(self, dtype=None, copy=None):
        out = self._read(np.asarray(self.ids[:]), self.start)
        return out if dtype is None else out.astype(dtype)

    def _read(self, ids: np.ndarray, first: int) -> np.ndarray:
        n, L, k = ids.shape
        e = ids.astype(np.int64)
        where = (np.arange(first, first + n, dtype=np.uint64)[:, None, None] * np.uint64(L * k)
                 + np.arange(L, dtype=np.uint64)[None, :, None] * np.uint64(k) + np.arange(k, dtype=np.uint64))
        with np.errstate(over="ignore"):
            mixed = (where * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(33)  # Fibonacci hashing
        pick = (mixed % self.replicas["copies"][e].astype(np.uint64)).astype(np.int64)
        return self.replicas["physical"][e, pick].astype(np.uint16)
