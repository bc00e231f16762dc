"""Expert-parallel placement planning from known routing (paper §3.4.2, App. J, Algorithm 1).

The method and its deviations from the paper: docs/method.md#expert-parallel-placement; measured
volumes and planner timings: docs/RESULTS.md#expert-parallel-placement and docs/BENCHMARKS.md.

With the routing of every training sequence known before training (a routing store written by
``grouter dispatch``), the expert-parallel (EP) all-to-all can be shrunk offline: put experts that
the same sequences use on the same rank, and send each sequence to the data-parallel rank that
holds most of its experts. The plan needs no engine patch: expert ids are relabelled so that rank
``r``'s experts are the contiguous block ``[r*E/R, (r+1)*E/R)`` that Megatron / torch EP assign to
``r`` (:func:`relabel`), and a sampler serves data-parallel rank ``r`` its sequences
(:class:`PlanSampler`).

Pipeline (:func:`plan_placement`):

1. **Affinity** ``φ(X)_i = (1/|X|) Σ_t 1[i ∈ topk(x_t)]`` of every sequence of the store's ``train``
   split (sums to k), streamed over the memory-mapped ids in chunks with one ``np.bincount`` per
   chunk over sequence-offset expert ids: a single vectorised count, where ``np.add.at`` (an
   unbuffered scatter) is many times slower.
2. **Entropy filter**: Shannon entropy (bits) of ``φ/k``; sequences above
   ``entropy_fraction * log2(E)`` have no expert preference and are left out of the clustering
   (they are still placed). The default fraction ``6.85 / 7`` reproduces the paper's 6.85 bits at
   E = 128. With short sequences the empirical entropy of even uniformly random routing is far
   below ``log2(E)`` and the filter keeps everything; the report gives that reference entropy.
3. **Clustering**: k-means++ on the kept ``φ/k`` to ``max(clusters, N_p)`` clusters (exact
   ``KMeans`` up to 20 000 sequences, ``MiniBatchKMeans`` above), then Ward agglomerative
   clustering of the centroids down to ``N_p`` partitions: ``N_p = R`` ranks at ``rank`` level,
   ``R / G`` nodes at ``node`` level. A partition's centroid is the size-weighted mean of its
   k-means centroids.
4. **Expert grouping**: Hungarian assignment (``linear_sum_assignment``) of the E experts to the
   ``N_p`` partitions, each repeated ``E / N_p`` times, maximising the summed centroid affinity.
   At node level a node's experts are split over its G ranks the same way, using the node's
   k-means centroids merged to G sub-partitions (contiguously by id when the node has fewer than
   G k-means clusters, or when refinement follows; the paper splits them randomly).
4b. **Refinement** (``balanced`` only, ``refine`` rounds, default 10; our addition): the paper's
   grouping assumes every sequence may go to its favourite partition, but the agglomerative
   partitions have unequal sizes and a balanced placement must overflow the big ones. On a sample of
   up to 100 000 sequences we alternate a balanced placement (m/P sequences per partition,
   maximising (token, expert) pairs kept local) with a Hungarian regrouping of the experts on the
   partitions' summed counts, keeping the best grouping (node level: nodes, then each node's G
   ranks). The first round scores the paper's grouping, so on the sample the kept grouping keeps
   at least as many pairs local under a balanced placement; ``refine=0`` keeps the paper's grouping.
5. **Sample placement** per global batch (``global_batch`` sequences, a multiple of R; batch
   membership is a seeded shuffle, exactly what a shuffling loader would give, so the plan never
   changes which sequences train together):

   - ``balanced`` (default): every data-parallel rank gets exactly ``global_batch / R`` sequences
     of every batch, chosen to minimise the optimised cost model: a capacity-constrained greedy,
     vectorised over all batches at once (rounds in which every unplaced sequence proposes to its
     cheapest partition that still has room and each partition keeps the proposers with the
     largest regret, i.e. the most to lose by going to their next choice). ``exact=True`` solves
     each batch optimally with ``linear_sum_assignment`` on the cost matrix with each partition's
     column repeated ``capacity`` times (O(batch³) per batch). The greedy is the default: its
     volume comes close to the exact one and to the lower bound, and being vectorised over all
     batches it takes a fraction of the exact solver's time (figures: docs/RESULTS.md,
     docs/BENCHMARKS.md). (``linear_sum_assignment`` over a whole split at once is out of reach.)
     At node level, sequences are placed on nodes first (node cost), then on the node's G ranks
     (DeepEP cost), both balanced. ``scope="epoch"`` applies the capacity over the whole split
     instead (each rank n/R sequences; batches then take ``global_batch / R`` from each rank's
     queue, so they are stratified by group rather than random).
   - ``greedy``: the paper's Algorithm 1, each sequence to the partition keeping most of its
     traffic local, no capacity: the plan it gives can starve or overload ranks, which the report
     shows as sequence imbalance.

**Cost models** (remote token copies; all three are reported, the plan optimises ``deepep`` at
rank level and ``node`` (then ``deepep`` inside the node) at node level):

- ``megatron``: one copy per (token, expert) pair whose expert is on another rank (Megatron's
  all-to-all dispatcher);
- ``deepep``: one copy per (token, destination rank ≠ its own rank) (DeepEP);
- ``node``: one copy per (token, destination node ≠ its own node) (inter-node traffic).

Each is reported for the plan, for the **random baseline** (the same global batches dealt to ranks
at random, expert ``e`` on rank ``e // (E/R)``), for the plan's experts with the baseline's random
sample placement, and against a **lower bound**: ``Σ_sequences min_rank cost`` with the plan's
experts, i.e. every sequence on its own best rank with no capacity limit (no sample placement with
these experts sends less; Algorithm 1 attains it for the cost model it optimises). A looser floor
valid for any expert placement (a token's k distinct experts span at least ``ceil(k / (E/R))``
ranks) is reported too. Load: token-slots arriving at each rank's experts per global batch
(max / mean) and sequences per data-parallel rank per global batch (max / mean).

Output of :func:`place` (atomic): ``plan.json``, ``report.json``, ``report.md``, ``report.png``.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from scipy.optimize import linear_sum_assignment
from sklearn.cluster import AgglomerativeClustering, KMeans, MiniBatchKMeans
from torch.utils.data import Sampler

from .artifacts import atomic_dir, atomic_write_bytes, read_json, read_manifest, write_json
from .errors import GrouterError
from .store import RoutingStore

PLAN_FORMAT, PLAN_VERSION = "grouter-placement-plan", 1
ALGORITHMS = ("balanced", "greedy")
LEVELS = ("rank", "node")
SCOPES = ("batch", "epoch")
COST_MODELS = {
    "megatron": "one copy per (token, expert) pair with the expert on another rank (Megatron all-to-all)",
    "deepep": "one copy per (token, destination rank other than its own) (DeepEP)",
    "node": "one copy per (token, destination node other than its own) (inter-node)",
}
# The paper filters at 6.85 bits with 128 experts (log2 128 = 7 bits): the same fraction of log2(E).
DEFAULT_ENTROPY_FRACTION = 6.85 / 7
# Above this many kept sequences k-means uses MiniBatchKMeans.
MINIBATCH_ABOVE = 20_000
# Ids per chunk when streaming the store (bounds the temporaries to a few tens of MB).
CHUNK_IDS = 1 << 22
# refine_grouping uses a random sample of at most this many sequences.
REFINE_SAMPLE = 100_000
# balanced_assignment works on this many sequences at a time (whole groups).
ASSIGN_CHUNK = 1 << 17


# -- affinity and entropy ----------------------------------------------------------------------
def row_chunks(n: int, per_seq: int, target: int = CHUNK_IDS) -> Iterator[tuple[int, int]]:
    """Ranges ``[a, b)`` of ``n`` rows of ``per_seq`` values each, about ``target`` values at a time."""
    step = max(1, target // max(per_seq, 1))
    for a in range(0, n, step):
        yield a, min(n, a + step)


def _count_dtype(limit: int) -> np.dtype:
    return np.dtype(np.uint16) if limit <= np.iinfo(np.uint16).max else np.dtype(np.uint32)


def _bincount_rows(x: np.ndarray, m: int) -> np.ndarray:
    """``[c, m]`` counts of each value 0..m-1 in each row of ``x`` ``[c, w]``: one ``np.bincount`` of
    the values offset by ``row * m``."""
    c = len(x)
    flat = x.astype(np.intp)
    flat += (np.arange(c, dtype=np.intp) * m)[:, None]
    return np.bincount(flat.ravel(), minlength=c * m).reshape(c, m)


def affinity_counts(ids: np.ndarray, n_experts: int) -> np.ndarray:
    """``[n, E]`` counts of each expert among a sequence's token-slots: ``L * φ(X)`` (rows sum to L*k).

    ``ids`` is ``[n, L, k]`` (any integer dtype, a memmap is streamed in chunks).
    """
    n, L, k = ids.shape
    out = np.empty((n, n_experts), dtype=_count_dtype(L * k))
    for a, b in row_chunks(n, L * k):
        out[a:b] = _bincount_rows(np.asarray(ids[a:b]).reshape(b - a, L * k), n_experts)
    return out


def entropy_bits(counts: np.ndarray) -> np.ndarray:
    """Shannon entropy (bits) of each row of ``counts`` normalised to a distribution (``φ/k``).

    ``H = log2 S - (1/S) Σ_i c_i log2 c_i`` with S the row sum, ``c log2 c`` from a lookup table.
    """
    counts = np.asarray(counts)
    out = np.empty(len(counts), dtype=np.float64)
    top = int(counts.max()) if counts.size else 0
    clogc = np.zeros(top + 1)
    clogc[1:] = np.arange(1, top + 1) * np.log2(np.arange(1, top + 1))
    for a, b in row_chunks(len(counts), counts.shape[1]):
        c = counts[a:b]
        S = c.sum(1, dtype=np.int64).astype(np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            out[a:b] = np.where(S > 0, np.log2(np.maximum(S, 1)) - clogc[c].sum(1) / np.maximum(S, 1), 0.0)
    return out


def uniform_entropy_reference(seq_len: int, k: int, n_experts: int, samples: int = 256, seed: int = 0) -> float:
    """Mean affinity entropy (bits) of sequences of ``seq_len`` tokens routed uniformly at random.

    The entropy filter only has an effect when its threshold is below this.
    """
    rng = np.random.default_rng(seed)
    draws = seq_len * n_experts  # random numbers per sequence; long sequences: fewer sample sequences
    m = samples if samples * draws <= 1 << 24 else max(1, (1 << 24) // draws)
    ids = np.argsort(rng.random((m, seq_len, n_experts), dtype=np.float32), axis=-1)[..., :k]
    return float(entropy_bits(affinity_counts(ids, n_experts)).mean())


# -- clustering and expert grouping ------------------------------------------------------------
def _weighted_centroids(centers: np.ndarray, weights: np.ndarray, labels: np.ndarray, n: int) -> np.ndarray:
    out = np.zeros((n, centers.shape[1]))
    for p in range(n):
        m = labels == p
        w = weights[m].astype(np.float64)
        out[p] = (w @ centers[m]) / w.sum() if w.sum() > 0 else centers[m].mean(0)
    return out


def _merge(centers: np.ndarray, n: int) -> np.ndarray:
    """Labels merging ``centers`` into ``n`` groups (Ward agglomerative; identity when equal)."""
    if len(centers) == n:
        return np.arange(n)
    return AgglomerativeClustering(n_clusters=n, linkage="ward").fit_predict(centers)


def cluster_affinity(phi: np.ndarray, n_partitions: int, clusters: int = 100, seed: int = 0) -> dict:
    """k-means++ of the rows of ``phi`` to ``max(clusters, n_partitions)`` clusters, merged to ``n_partitions``.

    Returns ``{"centers" [K, E], "sizes" [K], "partition_of_cluster" [K], "centroids" [P, E],
    "method"}``; ``phi`` needs at least ``n_partitions`` rows.
    """
    n = len(phi)
    K = min(max(clusters, n_partitions), n)
    X = np.ascontiguousarray(phi, dtype=np.float32)
    with warnings.catch_warnings():  # duplicate rows: fewer distinct clusters than asked is fine
        warnings.simplefilter("ignore")
        if n > MINIBATCH_ABOVE:
            km = MiniBatchKMeans(n_clusters=K, init="k-means++", n_init=1, batch_size=16384, random_state=seed).fit(X)
            method = "MiniBatchKMeans"
        else:
            km = KMeans(n_clusters=K, init="k-means++", n_init=1, random_state=seed).fit(X)
            method = "KMeans"
    centers = km.cluster_centers_.astype(np.float64)
    sizes = np.bincount(km.labels_, minlength=K)
    part = _merge(centers, n_partitions)
    return {"centers": centers, "sizes": sizes, "partition_of_cluster": part,
            "centroids": _weighted_centroids(centers, sizes, part, n_partitions), "method": method}


def group_experts(centroids: np.ndarray, experts: np.ndarray | None = None) -> np.ndarray:
    """Hungarian assignment of experts to partitions, each partition taking ``len(experts) / P`` of them.

    ``centroids`` ``[P, E]``: each partition's mean affinity per expert. ``experts``: the expert ids
    to place (default all E). Returns the partition of each of ``experts``, maximising
    ``Σ_e centroids[partition(e), e]``.
    """
    P = len(centroids)
    experts = np.arange(centroids.shape[1]) if experts is None else np.asarray(experts)
    per = len(experts) // P
    slots = np.repeat(np.arange(P), per)  # column j is a seat of partition slots[j]
    weight = centroids[slots][:, experts].T  # [experts, seats]
    rows, cols = linear_sum_assignment(weight, maximize=True)
    out = np.empty(len(experts), dtype=np.int64)
    out[rows] = slots[cols]
    return out


def refine_grouping(counts: np.ndarray, part: np.ndarray, n_partitions: int,
                    iterations: int = 10) -> tuple[np.ndarray, np.ndarray, list[float]]:
    """Fit the expert grouping to a *balanced* sample placement (alternating, like balanced k-means).

    ``counts`` ``[m, E']``: (token, expert) pairs of m sequences over the experts being grouped;
    ``part`` ``[E']``: their partition (E'/P each). Each round places the sequences on the P
    partitions, m/P each (:func:`balanced_assignment`), maximising their pairs on the partition's
    experts, then regroups the experts by Hungarian assignment on each partition's summed counts,
    until the grouping stops changing. Returns (grouping, partition of each of the first
    ``m - m % P`` rows, local share of pairs after each round); the best grouping seen is kept.
    """
    P, Ep = n_partitions, counts.shape[1]
    X = np.asarray(counts[: len(counts) - len(counts) % P], dtype=np.float64)
    if len(X) < P:
        return part, np.zeros(0, dtype=np.int64), []
    total = max(X.sum(), 1.0)
    best, best_share, best_rows, trace = part, -1.0, None, []
    for _ in range(max(iterations, 1)):
        onehot = np.zeros((Ep, P))
        onehot[np.arange(Ep), part] = 1
        local = X @ onehot  # [m, P] pairs each sequence keeps local on each partition
        rows = balanced_assignment(-local, np.zeros(len(X), np.int64), np.array([len(X) // P]))
        share = float(local[np.arange(len(X)), rows].sum() / total)
        trace.append(round(share, 6))
        if share > best_share:
            best, best_share, best_rows = part, share, rows
        order = np.argsort(rows, kind="stable")  # W[p]: summed counts of partition p's sequences
        W = np.add.reduceat(X[order], np.searchsorted(rows[order], np.arange(P)), axis=0)
        new = group_experts(W)
        if np.array_equal(new, part):
            break
        part = new
    return best, best_rows, trace


def _permutation_from_ranks(rank_of_expert: np.ndarray, ranks: int) -> np.ndarray:
    """``logical -> physical`` with rank r's experts (in logical order) at ``[r*E/R, (r+1)*E/R)``."""
    E = len(rank_of_expert)
    order = np.lexsort((np.arange(E), rank_of_expert))  # experts sorted by rank, then id
    perm = np.empty(E, dtype=np.int64)
    perm[order] = np.arange(E)
    if not np.array_equal(perm // (E // ranks), rank_of_expert):
        raise AssertionError("every rank must hold exactly E/R experts")
    return perm


def expert_ranks(permutation: np.ndarray, ranks: int) -> np.ndarray:
    """Rank holding each logical expert under ``permutation`` (contiguous physical blocks)."""
    permutation = np.asarray(permutation, dtype=np.int64)
    return permutation // (len(permutation) // ranks)


# -- traffic and cost models -------------------------------------------------------------------
@dataclass
class Traffic:
    """Per-sequence traffic for one expert placement: what each sequence would send from each rank.

    ``slots[s, r]``: the sequence's (token, expert) pairs with the expert on rank r;
    ``tokens[s, r]``: its tokens with at least one expert on rank r; ``node_tokens[s, n]``: its
    tokens with at least one expert on node n (None without ``ranks_per_node``).
    """

    ranks: int
    ranks_per_node: int | None
    seq_slots: int  # L * k
    slots: np.ndarray
    tokens: np.ndarray
    node_tokens: np.ndarray | None

    def models(self) -> list[str]:
        return ["megatron", "deepep"] + (["node"] if self.node_tokens is not None else [])

    def at(self, model: str, rank: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
        """Remote copies of sequences ``rows`` (default all) if each sits on ``rank`` (int64 vector)."""
        rows = np.arange(len(self.slots)) if rows is None else np.asarray(rows)
        rank = np.asarray(rank, dtype=np.int64)
        if model == "megatron":
            return self.seq_slots - self.slots[rows, rank].astype(np.int64)
        if model == "deepep":
            t = self.tokens[rows]
            return t.sum(1, dtype=np.int64) - t[np.arange(len(rows)), rank]
        if model == "node":
            if self.node_tokens is None:
                raise GrouterError("the node cost model needs --ranks-per-node")
            t = self.node_tokens[rows]
            return t.sum(1, dtype=np.int64) - t[np.arange(len(rows)), rank // self.ranks_per_node]
        raise GrouterError(f"unknown cost model {model!r}; use one of {', '.join(COST_MODELS)}")

    def cost(self, model: str, rows: np.ndarray | None = None) -> np.ndarray:
        """``[len(rows), R]`` remote copies of each sequence on each rank (node model: per rank of the node)."""
        rows = slice(None) if rows is None else np.asarray(rows)
        if model == "megatron":
            return self.seq_slots - self.slots[rows].astype(np.int32)
        if model == "deepep":
            return _remote_copies(self.tokens[rows])
        if model == "node":
            return np.repeat(self.node_cost(rows), self.ranks_per_node, axis=1)
        raise GrouterError(f"unknown cost model {model!r}; use one of {', '.join(COST_MODELS)}")

    def node_cost(self, rows=slice(None)) -> np.ndarray:
        """``[n, N]`` remote node copies of each sequence on each node."""
        if self.node_tokens is None:
            raise GrouterError("the node cost model needs --ranks-per-node")
        return _remote_copies(self.node_tokens[rows])

    def bound(self, model: str, rows: np.ndarray | None = None) -> int:
        """``Σ_s min_r cost`` over sequences ``rows`` (default all): no sample placement with these
        experts sends less."""
        rows = np.arange(len(self.slots)) if rows is None else np.asarray(rows)
        total = 0
        for a, b in row_chunks(len(rows), self.ranks, 1 << 24):
            total += int(self.cost(model, rows[a:b]).min(1).sum())
        return total


def _remote_copies(present: np.ndarray) -> np.ndarray:
    """``[n, H]`` from ``present[s, h]`` (tokens of s with an expert on holder h): the copies s sends
    to other holders when it sits on each holder."""
    t = present.astype(np.int32)
    return t.sum(1, keepdims=True) - t


def traffic(ids: np.ndarray, rank_of_expert: np.ndarray, ranks: int, ranks_per_node: int | None = None,
            counts: np.ndarray | None = None) -> Traffic:
    """Stream ``ids`` ``[n, L, k]`` once and count :class:`Traffic` for ``rank_of_expert`` (logical id -> rank).

    Vectorised per chunk: a boolean presence matrix [tokens, R] (and [tokens, nodes]) scattered from
    the k ids of each token, which deduplicates experts on the same rank, summed over the sequence.
    (token, expert) pairs per rank come from ``counts`` (:func:`affinity_counts` of ``ids``, summed
    over each rank's experts) when given, else from one bincount per chunk.
    """
    n, L, k = ids.shape
    R, G = ranks, ranks_per_node
    small = np.uint8 if R <= 256 else np.uint16
    lut = np.asarray(rank_of_expert, dtype=np.int64).astype(small)
    slots = np.empty((n, R), dtype=_count_dtype(L * k))
    tokens = np.empty((n, R), dtype=_count_dtype(L))
    node_tokens = np.empty((n, R // G), dtype=_count_dtype(L)) if G else None
    if counts is not None:
        order = np.argsort(lut, kind="stable")  # experts grouped by rank, E/R each
        for a, b in row_chunks(n, counts.shape[1]):
            slots[a:b] = counts[a:b][:, order].reshape(b - a, R, -1).sum(2, dtype=slots.dtype)
    for a, b in row_chunks(n, L * max(R, k)):
        c = b - a
        rk = lut[np.asarray(ids[a:b])].reshape(c * L, k)  # rank of each token-slot
        if counts is None:
            slots[a:b] = _bincount_rows(rk.reshape(c, L * k), R)
        tok = np.arange(c * L, dtype=np.int64)[:, None]
        pres = np.zeros(c * L * R, dtype=np.uint8)
        pres[tok * R + rk] = 1
        tokens[a:b] = pres.reshape(c, L, R).sum(1, dtype=tokens.dtype)
        if G:
            N = R // G
            pres = np.zeros(c * L * N, dtype=np.uint8)
            pres[tok * N + rk // small(G)] = 1
            node_tokens[a:b] = pres.reshape(c, L, N).sum(1, dtype=node_tokens.dtype)
    return Traffic(R, G, L * k, slots, tokens, node_tokens)


def remote_volume(ids: np.ndarray, rank_of_expert: np.ndarray, sample_rank: np.ndarray,
                  ranks_per_node: int | None = None) -> dict[str, int]:
    """Remote copies under each cost model when sequence s sits on ``sample_rank[s]`` (-1: not placed).

    A direct token-level count (independent of :func:`traffic`), for any ids array ``[n, L, k]``.
    """
    n, L, k = ids.shape
    lut = np.asarray(rank_of_expert, dtype=np.int64)
    sample_rank = np.asarray(sample_rank, dtype=np.int64)
    out = {"megatron": 0, "deepep": 0}
    if ranks_per_node:
        out["node"] = 0
    for a, b in row_chunks(n, L * k):
        placed = sample_rank[a:b] >= 0
        rk = np.sort(lut[np.asarray(ids[a:b])[placed]], axis=-1)  # [c, L, k]
        own = sample_rank[a:b][placed][:, None, None]
        out["megatron"] += int((rk != own).sum())
        out["deepep"] += _distinct_remote(rk, own)
        if ranks_per_node:
            out["node"] += _distinct_remote(rk // ranks_per_node, own // ranks_per_node)
    return out


def _distinct_remote(holders: np.ndarray, own: np.ndarray) -> int:
    """Distinct holders other than ``own`` among each token's ``holders`` (sorted on the last axis), summed."""
    first = np.ones(holders.shape, dtype=bool)
    first[..., 1:] = holders[..., 1:] != holders[..., :-1]
    return int((first & (holders != own)).sum())


def _floor_any_placement(n_tokens: int, k: int, E: int, R: int, G: int | None) -> dict[str, int]:
    """Copies no expert or sample placement can avoid: a token's k distinct experts span >= ceil(k/per) holders."""
    per_rank = E // R
    out = {"megatron": n_tokens * max(0, k - per_rank), "deepep": n_tokens * (math.ceil(k / per_rank) - 1)}
    if G:
        out["node"] = n_tokens * (math.ceil(k / (per_rank * G)) - 1)
    return out


# -- sample placement --------------------------------------------------------------------------
def balanced_assignment(cost: np.ndarray, groups: np.ndarray, capacity: np.ndarray, exact: bool = False) -> np.ndarray:
    """Place each row of ``cost`` ``[m, P]`` on a partition so that every partition takes exactly
    ``capacity[g]`` rows of each group g (so group g must have ``P * capacity[g]`` rows), minimising
    the summed cost.

    ``exact``: per group, ``linear_sum_assignment`` on the cost with each column repeated
    ``capacity[g]`` times (optimal, O(group size³)). Otherwise a vectorised regret greedy over all
    groups at once: in each round every unplaced row proposes to its cheapest partition with room
    left; a partition keeps the proposers with the largest regret (cost of their next-best
    partition minus this one) up to its room. At most P + 1 rounds.
    """
    cost = np.asarray(cost)
    groups = np.asarray(groups, dtype=np.int64)
    capacity = np.asarray(capacity, dtype=np.int64)
    m, P = cost.shape
    if m == 0:
        return np.zeros(0, dtype=np.int64)
    sizes = np.bincount(groups, minlength=len(capacity))
    if not np.array_equal(sizes, capacity * P):
        raise ValueError("every group needs exactly P * capacity rows")
    order = np.argsort(groups, kind="stable")
    bounds = np.r_[0, np.cumsum(sizes)]  # group g: rows order[bounds[g]:bounds[g + 1]]
    if exact:
        return _exact_per_group(cost, order, bounds, capacity)
    out = np.full(m, -1, dtype=np.int64)
    g0 = 0
    while g0 < len(capacity):  # whole groups, about ASSIGN_CHUNK rows at a time
        g1 = int(np.searchsorted(bounds, bounds[g0] + ASSIGN_CHUNK, side="right")) - 1
        g1 = max(g1, g0 + 1)
        rows = order[bounds[g0]:bounds[g1]]
        out[rows] = _regret_greedy(cost[rows].astype(np.float64), groups[rows] - g0, capacity[g0:g1])
        g0 = g1
    return out


def _exact_per_group(cost: np.ndarray, order: np.ndarray, bounds: np.ndarray, capacity: np.ndarray) -> np.ndarray:
    """:func:`balanced_assignment` with ``exact``: ``linear_sum_assignment`` per group."""
    out = np.full(len(cost), -1, dtype=np.int64)
    for g in range(len(capacity)):
        rows = order[bounds[g]:bounds[g + 1]]
        if len(rows) == 0:
            continue
        _, cols = linear_sum_assignment(np.repeat(cost[rows], capacity[g], axis=1))
        out[rows] = cols // capacity[g]
    return out


def _regret_greedy(cost: np.ndarray, groups: np.ndarray, capacity: np.ndarray) -> np.ndarray:
    m, P = cost.shape
    room = np.repeat(capacity[:, None], P, axis=1).ravel()  # [(group, partition)]
    out = np.full(m, -1, dtype=np.int64)
    active = np.arange(m)
    while active.size:
        c = cost[active]
        c[room.reshape(-1, P)[groups[active]] == 0] = np.inf
        best = c.argmin(1)
        ar = np.arange(len(active))
        best_cost = c[ar, best]
        c[ar, best] = np.inf
        regret = c.min(1) - best_cost  # inf when this is the last partition with room
        key = groups[active] * P + best
        o = np.lexsort((active, -regret, key))
        ks = key[o]
        starts = np.r_[0, np.flatnonzero(ks[1:] != ks[:-1]) + 1]
        rank_in_key = np.arange(len(ks)) - np.repeat(starts, np.diff(np.r_[starts, len(ks)]))
        accept = rank_in_key < room[ks]
        out[active[o[accept]]] = best[o[accept]]
        room -= np.bincount(ks[accept], minlength=len(room))
        active = np.sort(active[o[~accept]])
    return out


# -- the plan ----------------------------------------------------------------------------------
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
        atomic_write_bytes(file, (json.dumps(self.to_json(), separators=(",", ":")) + "\n").encode())
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


# -- planning: the pipeline --------------------------------------------------------------------
def plan_placement(store, ranks: int, ranks_per_node: int | None = None, algorithm: str = "balanced",
                   global_batch: int | None = None, clusters: int = 100,
                   entropy_fraction: float = DEFAULT_ENTROPY_FRACTION, seed: int = 0,
                   max_sequences: int | None = None, *, level: str | None = None, scope: str = "batch",
                   exact: bool = False, refine: int | None = None, split: str = "train") -> Plan:
    """Plan expert and sample placement for ``ranks`` EP ranks from the routing in ``store``.

    ``store``: a :class:`~grouter.store.RoutingStore` (or any object with ``ids(split)``,
    ``n_experts`` and ``k``). ``ranks_per_node`` G: nodes of G ranks; ``level`` ("rank" or "node",
    default node when 1 < G < ranks): what the partitions are, and so what the plan optimises
    (``deepep`` at rank level, ``node`` then ``deepep`` at node level). ``global_batch``: sequences
    per global batch (multiple of ``ranks``; default 16 per rank). ``max_sequences``: plan only the
    first this many sequences of the split. ``scope``: "batch" (default; batches are a seeded random
    shuffle and the plan only decides which rank trains which sequence of each batch) or "epoch"
    (the capacity holds over the whole split: each rank gets n/R sequences, then batches take
    ``global_batch / R`` from every rank's queue, so batches are stratified by group rather than
    random). ``exact``: optimal per-batch assignment (``linear_sum_assignment``) instead of the
    vectorised greedy; batch scope only. ``refine``: rounds of :func:`refine_grouping` on up to
    ``REFINE_SAMPLE`` sequences (default 10 for ``balanced``, 0 for ``greedy``, which is then the
    paper's pipeline exactly).
    """
    timer = _Timer()
    ids, s = _setup(store, split, max_sequences, ranks, ranks_per_node, algorithm, level, scope, global_batch,
                    exact, seed)
    rng = np.random.default_rng(seed)
    counts = affinity_counts(ids, s.E)  # 1. affinity (as counts: L * φ)
    timer.tick("affinity")
    kept = _EntropyFilter.apply(counts, entropy_fraction, s)  # 2. entropy filter
    timer.tick("entropy")
    cl = _cluster(counts, kept.rows, s, clusters)  # 3. clustering
    timer.tick("clustering")
    refine = (10 if algorithm == "balanced" else 0) if refine is None else int(refine)
    rank_of_expert, refinement, inner_split = _expert_placement(counts, cl, s, refine)  # 4. grouping, 4b.
    perm = _permutation_from_ranks(rank_of_expert, s.R)
    timer.tick("expert_grouping")
    tr = traffic(ids, rank_of_expert, s.R, s.G, counts)  # the plan's experts
    base = traffic(ids, np.arange(s.E) // (s.E // s.R), s.R, s.G, counts)  # the contiguous baseline
    timer.tick("traffic")
    batches, dropped = _batches(s.n, s.gb, s.R, rng)  # 5. sample placement
    rank, samples = _place_samples(tr, batches, s)
    timer.tick("sample_placement")
    placed = _members(batches)
    base_rank, base_samples = _random_baseline(batches, s)
    cost_models = _cost_models(tr, base, rank, base_rank, placed, s)
    timer.tick("report")
    timings = timer.total()
    report = {**_report_header(s, len(batches), placed, dropped), "cost_models": cost_models,
              "load": {"plan": _loads(tr, samples), "random": _loads(base, base_samples)},
              "entropy_filter": kept.report(s), "refinement": refinement,
              "clustering": _clustering_report(cl, s, kept.rows, inner_split), "timings_s": timings}
    return Plan(n_experts=s.E, k=s.k, ranks=s.R, ranks_per_node=s.G, level=s.level, algorithm=algorithm,
                scope=scope, global_batch=s.gb, seed=seed, split=split, n_sequences=s.n, permutation=perm,
                samples=samples, dropped=dropped, source=_source(store), report=report)


@dataclass(frozen=True)
class _Setup:
    """The checked sizes and options of one planning run."""

    n: int  # sequences planned
    L: int  # tokens per sequence
    k: int
    E: int  # experts
    R: int  # ranks
    G: int | None  # ranks per node
    level: str
    N: int  # partitions: R at rank level, R / G at node level
    algorithm: str
    scope: str
    exact: bool
    gb: int  # sequences per global batch
    seed: int


def _setup(store, split: str, max_sequences: int | None, R: int, G: int | None, algorithm: str,
           level: str | None, scope: str, global_batch: int | None, exact: bool,
           seed: int) -> tuple[np.ndarray, _Setup]:
    """The ids ``[n, L, k]`` of the split's first ``max_sequences`` sequences, and the checked options."""
    ids = store.ids(split)
    E, k = int(store.n_experts), int(store.k)
    if ids.ndim != 3 or ids.shape[2] != k:
        raise GrouterError(f"routing ids of split {split!r} have shape {ids.shape}, expected [n, seq_len, {k}]")
    n = ids.shape[0] if max_sequences is None else min(ids.shape[0], int(max_sequences))
    level, gb = _check(n, E, R, G, algorithm, level, scope, global_batch)
    if exact and scope == "epoch":
        raise GrouterError("an exact assignment is only available per global batch (scope batch)")
    N = R // G if level == "node" else R
    return ids[:n], _Setup(n, ids.shape[1], k, E, R, G, level, N, algorithm, scope, exact, gb, seed)


def _check(n: int, E: int, R: int, G: int | None, algorithm: str, level: str | None, scope: str,
           global_batch: int | None) -> tuple[str, int]:
    if algorithm not in ALGORITHMS:
        raise GrouterError(f"unknown placement algorithm {algorithm!r}; use one of {', '.join(ALGORITHMS)}")
    if scope not in SCOPES:
        raise GrouterError(f"unknown placement scope {scope!r}; use one of {', '.join(SCOPES)}")
    if not isinstance(R, (int, np.integer)) or R < 1:
        raise GrouterError(f"the number of ranks must be a positive integer, got {R!r}")
    if E % R:
        divisors = [d for d in range(1, E + 1) if E % d == 0]
        raise GrouterError(f"{R} ranks cannot each hold the same number of the {E} experts; use a number of "
                           f"ranks that divides {E} ({', '.join(map(str, divisors))})")
    if G is not None and (not isinstance(G, (int, np.integer)) or G < 1 or R % G):
        raise GrouterError(f"--ranks-per-node {G} must be a positive divisor of the {R} ranks")
    if level is None:
        level = "node" if G is not None and 1 < G < R else "rank"
    if level not in LEVELS:
        raise GrouterError(f"unknown placement level {level!r}; use rank or node")
    if level == "node" and (G is None or R // G < 2):
        raise GrouterError("node-level placement needs --ranks-per-node G with at least two nodes (G < ranks); "
                           "use rank level otherwise")
    if n < R:
        raise GrouterError(f"only {n} sequences for {R} ranks: every rank needs at least one; "
                           "use fewer ranks or route more data")
    gb = 16 * R if global_batch is None else global_batch
    if not isinstance(gb, (int, np.integer)) or gb < R or gb % R:
        raise GrouterError(f"the global batch ({global_batch!r} sequences) must be a positive multiple of the "
                           f"{R} ranks")
    return level, int(gb)


class _Timer:
    """Seconds spent in each step since the previous one (``timings``), and in all (``total``)."""

    def __init__(self):
        self.start = self.last = time.perf_counter()
        self.timings: dict[str, float] = {}

    def tick(self, step: str) -> None:
        now = time.perf_counter()
        self.timings[step] = round(now - self.last, 3)
        self.last = now

    def total(self) -> dict[str, float]:
        self.timings["total"] = round(time.perf_counter() - self.start, 3)
        return self.timings


# -- planning, step 2: entropy filter ----------------------------------------------------------
@dataclass
class _EntropyFilter:
    """Which sequences are clustered: those whose affinity entropy is at most the threshold."""

    bits: np.ndarray  # affinity entropy of every sequence
    fraction: float  # the threshold as a fraction of log2(E)
    threshold: float
    rows: np.ndarray  # the sequences clustered
    relaxed: bool  # fewer than N under the threshold: the N most peaked instead

    @classmethod
    def apply(cls, counts: np.ndarray, fraction: float, s: _Setup) -> "_EntropyFilter":
        H = entropy_bits(counts)
        threshold = float(fraction * math.log2(s.E))
        rows = np.flatnonzero(H <= threshold)
        relaxed = len(rows) < s.N
        if relaxed:  # too few sequences with a preference: cluster the N most peaked ones
            rows = np.sort(np.argsort(H, kind="stable")[:s.N])
        return cls(H, fraction, threshold, rows, relaxed)

    def report(self, s: _Setup) -> dict:
        H, threshold = self.bits, self.threshold
        qs = np.quantile(H, [0.0, 0.1, 0.5, 0.9, 1.0]) if s.n else np.zeros(5)
        return {"fraction": self.fraction, "threshold_bits": threshold, "max_bits": math.log2(s.E),
                "kept": int((H <= threshold).sum()), "filtered": int((H > threshold).sum()),
                "relaxed_to_most_peaked": bool(self.relaxed),
                "quantiles_bits": dict(zip(["min", "p10", "median", "p90", "max"], map(float, qs))),
                "uniform_routing_reference_bits": uniform_entropy_reference(s.L, s.k, s.E, seed=s.seed)}


# -- planning, steps 3-4b: clustering and expert placement -------------------------------------
def _cluster(counts: np.ndarray, rows: np.ndarray, s: _Setup, clusters: int) -> dict:
    """:func:`cluster_affinity` of the affinities ``φ/k`` of sequences ``rows``."""
    return cluster_affinity(counts[rows].astype(np.float32) / (s.L * s.k), s.N, clusters, s.seed)


def _expert_placement(counts: np.ndarray, cl: dict, s: _Setup,
                      refine: int) -> tuple[np.ndarray, dict | None, dict | None]:
    """Rank of each logical expert, the refinement's record (None without refinement) and, at node
    level, how many nodes split their experts over their ranks each way (None at rank level)."""
    part = group_experts(cl["centroids"])  # partition of each logical expert
    refinement = sample = sample_part = None
    if refine:  # fit the grouping to a balanced placement of a sample of the sequences
        part, sample, sample_part, refinement = _refine(counts, part, s, refine)
    if s.level != "node":
        return part, refinement, None
    rank_of_expert, inner_split, inner_shares = _split_nodes(cl, part, s, refine, sample, sample_part)
    if inner_shares:
        refinement["inner_local_share_mean"] = float(np.mean(inner_shares))
    return rank_of_expert, refinement, inner_split


def _refine(counts: np.ndarray, part: np.ndarray, s: _Setup,
            refine: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """:func:`refine_grouping` on a seeded sample of at most ``REFINE_SAMPLE`` sequences.

    Returns (the grouping, the sample's counts, the partition of the sample's placed rows, the record).
    """
    rng = np.random.default_rng([s.seed, 1])
    rows = np.sort(rng.choice(s.n, REFINE_SAMPLE, replace=False)) if s.n > REFINE_SAMPLE else np.arange(s.n)
    sample = counts[rows]
    part, sample_part, trace = refine_grouping(sample, part, s.N, refine)
    return part, sample, sample_part, {"iterations": len(trace), "sample": int(len(rows)), "local_share": trace}


def _split_nodes(cl: dict, part: np.ndarray, s: _Setup, refine: int, sample: np.ndarray | None,
                 sample_part: np.ndarray | None) -> tuple[np.ndarray, dict, list[float]]:
    """Node level: each node's experts over its G ranks, refined on the node's sample sequences.

    Returns (rank of each logical expert, how many nodes split each way, each refined node's final
    local share).
    """
    G = s.G
    rank_of_expert = np.empty(s.E, dtype=np.int64)
    how, shares = [], []
    for node in range(s.N):
        experts = np.flatnonzero(part == node)
        inner, method = _initial_node_split(cl, node, experts, G, s.E // s.R, refine)
        if refine:  # the node's sample sequences over its G ranks
            mine = sample[: len(sample_part)][sample_part == node][:, experts]
            if len(mine) >= G:
                inner, _, trace = refine_grouping(mine, inner, G, refine)
                method = "refined"
                shares.append(trace[-1])
        how.append(method)
        rank_of_expert[experts] = node * G + inner
    return rank_of_expert, {m: how.count(m) for m in ("hungarian", "contiguous", "refined")}, shares


def _initial_node_split(cl: dict, node: int, experts: np.ndarray, G: int, per_rank: int,
                        refine: int) -> tuple[np.ndarray, str]:
    """Rank within the node of each of its ``experts``: Hungarian on the node's k-means centroids
    merged to G, or contiguous by id when it has fewer than G clusters or refinement follows."""
    members = np.flatnonzero(cl["partition_of_cluster"] == node)
    if refine or len(members) < G:
        return np.arange(len(experts)) // per_rank, "contiguous"
    centers = cl["centers"][members]
    sub = _merge(centers, G)
    return group_experts(_weighted_centroids(centers, cl["sizes"][members], sub, G), experts), "hungarian"


# -- planning, step 5: sample placement --------------------------------------------------------
def _batches(n: int, gb: int, R: int, rng: np.random.Generator) -> tuple[list[np.ndarray], np.ndarray]:
    """Seeded shuffle cut into global batches; the last one shrunk to a multiple of R (< R dropped)."""
    order = rng.permutation(n)
    full = n // gb
    last = (n - full * gb) // R * R
    batches = [order[i * gb:(i + 1) * gb] for i in range(full)]
    if last:
        batches.append(order[full * gb:full * gb + last])
    return batches, np.sort(order[full * gb + last:])


def _members(batches: list[np.ndarray]) -> np.ndarray:
    """The sequences of all batches, in batch order."""
    return np.concatenate(batches) if batches else np.zeros(0, np.int64)


def _place_samples(tr: Traffic, batches: list[np.ndarray], s: _Setup) -> tuple[np.ndarray, list[list[np.ndarray]]]:
    """Rank of each sequence (-1: dropped) and ``samples[r][b]``, balanced per batch or over the epoch."""
    rank = np.full(s.n, -1, dtype=np.int64)
    placed = _members(batches)
    balanced = s.algorithm != "greedy"
    if s.scope == "batch":
        groups = np.repeat(np.arange(len(batches)), [len(b) for b in batches])
        cap = np.array([len(b) // s.R for b in batches], dtype=np.int64)  # sequences per rank per batch
        rank[placed] = _place(tr, placed, groups, cap if balanced else None, s.level, s.exact)
        return rank, _by_rank(batches, rank, s.R)
    m = len(placed)
    rank[placed] = _place(tr, placed, np.zeros(m, np.int64), np.array([m // s.R]) if balanced else None,
                          s.level, False)
    return rank, _deal_queues(placed, rank, s)


def _deal_queues(placed: np.ndarray, rank: np.ndarray, s: _Setup) -> list[list[np.ndarray]]:
    """Epoch scope: each rank's queue in shuffled order, dealt ``global_batch / R`` per batch (ranks
    with shorter queues get empty batches at the end)."""
    per = s.gb // s.R
    pos = np.empty(s.n, dtype=np.int64)
    pos[placed] = np.arange(len(placed))
    samples = []
    for r in range(s.R):
        q = placed[rank[placed] == r]
        q = q[np.argsort(pos[q], kind="stable")]
        samples.append([q[i:i + per] for i in range(0, len(q), per)])
    nb = max(len(queue) for queue in samples)
    return [queue + [np.zeros(0, np.int64)] * (nb - len(queue)) for queue in samples]


def _place(tr: Traffic, seqs: np.ndarray, groups: np.ndarray, capacity: np.ndarray | None, level: str,
           exact: bool) -> np.ndarray:
    """Rank of each of ``seqs``; ``capacity[g]``: sequences per rank of group g (None: no limit, Algorithm 1).

    Node level: balanced over nodes by the node cost, then over the node's ranks by the DeepEP cost.
    """
    if level == "rank":
        return _assign(tr.cost("deepep", seqs), groups, capacity, exact)
    G = tr.ranks_per_node
    N = tr.ranks // G
    node = _assign(tr.node_cost(seqs), groups, None if capacity is None else capacity * G, exact)
    inner = tr.cost("deepep", seqs).reshape(len(seqs), N, G)[np.arange(len(seqs)), node]  # [m, G] its ranks
    sub = groups * N + node  # each (group, node) splits evenly over the node's G ranks
    return node * G + _assign(inner, sub, None if capacity is None else np.repeat(capacity, N), exact)


def _assign(cost: np.ndarray, groups: np.ndarray, capacity: np.ndarray | None, exact: bool) -> np.ndarray:
    """Each row's cheapest column (``capacity`` None) or :func:`balanced_assignment`."""
    if capacity is None:
        return cost.argmin(1)
    return balanced_assignment(cost, groups, capacity, exact)


def _by_rank(batches: list[np.ndarray], rank: np.ndarray, R: int) -> list[list[np.ndarray]]:
    """samples[r][b]: the members of batch b on rank r, in batch order. ``rank`` is per sequence id."""
    out = [[] for _ in range(R)]
    for b in batches:
        rb = rank[b]
        o = np.argsort(rb, kind="stable")
        cuts = np.searchsorted(rb[o], np.arange(R + 1))
        for r in range(R):
            out[r].append(b[o[cuts[r]:cuts[r + 1]]])
    return out


def _random_baseline(batches: list[np.ndarray], s: _Setup) -> tuple[np.ndarray, list[list[np.ndarray]]]:
    """The same batches dealt to ranks in their (random) order: rank of each sequence and ``samples[r][b]``."""
    rank = np.full(s.n, -1, dtype=np.int64)
    for b in batches:
        rank[b] = np.arange(len(b)) // (len(b) // s.R)
    return rank, _by_rank(batches, rank, s.R)


# -- planning: the report ----------------------------------------------------------------------
def _cost_models(tr: Traffic, base: Traffic, rank: np.ndarray, base_rank: np.ndarray, seqs: np.ndarray,
                 s: _Setup) -> dict:
    """Remote copies of the placed ``seqs`` under each cost model: plan, random baseline, the plan's
    experts with the baseline's samples, the lower bound and the floor of any placement."""
    tokens = len(seqs) * s.L
    floor = _floor_any_placement(tokens, s.k, s.E, s.R, s.G)
    out = {}
    for m in tr.models():
        plan_v = int(tr.at(m, rank[seqs], seqs).sum())
        rand_v = int(base.at(m, base_rank[seqs], seqs).sum())
        mixed_v = int(tr.at(m, base_rank[seqs], seqs).sum())
        bound = tr.bound(m, seqs)
        out[m] = {
            "description": COST_MODELS[m], "random": rand_v, "plan_experts_random_samples": mixed_v,
            "plan": plan_v, "lower_bound": bound, "floor_any_placement": floor[m],
            "plan_over_random": plan_v / rand_v if rand_v else None,
            "bound_over_random": bound / rand_v if rand_v else None,
            "per_token": {"random": rand_v / max(tokens, 1), "plan": plan_v / max(tokens, 1),
                          "lower_bound": bound / max(tokens, 1)}}
    return out


def _loads(tr: Traffic, samples: list[list[np.ndarray]]) -> dict:
    """Expert load (token-slots at each rank's experts) and data-parallel sequences per rank, per global batch."""
    R, B = len(samples), len(samples[0])
    seqs = np.array([[len(samples[r][b]) for r in range(R)] for b in range(B)], dtype=np.float64).reshape(B, R)
    members = [np.concatenate([samples[r][b] for r in range(R)]) for b in range(B)]
    sizes = np.array([len(m) for m in members])
    slots = np.zeros((B, R))
    nonempty = sizes > 0
    if nonempty.any():
        flat = np.concatenate(members)
        starts = np.r_[0, np.cumsum(sizes)[:-1]][nonempty]
        slots[nonempty] = np.add.reduceat(tr.slots[flat], starts, axis=0, dtype=np.int64)
    return {"expert_load_max_over_mean": _imbalance(slots), "sequences_max_over_mean": _imbalance(seqs),
            "expert_slots_per_rank": slots.sum(0).astype(np.int64).tolist(),
            "sequences_per_rank": seqs.sum(0).astype(np.int64).tolist()}


def _imbalance(load: np.ndarray) -> dict[str, float]:
    """Max / mean over ranks of ``load`` ``[batches, R]``: summed over batches, and per batch (mean, worst)."""
    ratio = lambda x: x.max(-1) / np.maximum(x.mean(-1), 1e-12)  # noqa: E731
    per_batch = ratio(load)
    return {"overall": float(ratio(load.sum(0))), "per_batch_mean": float(per_batch.mean()),
            "per_batch_worst": float(per_batch.max())}


def _report_header(s: _Setup, n_batches: int, placed: np.ndarray, dropped: np.ndarray) -> dict:
    """The report's sizes and options."""
    return {"n_experts": s.E, "k": s.k, "ranks": s.R, "ranks_per_node": s.G,
            "nodes": s.R // s.G if s.G else None, "level": s.level, "partitions": s.N,
            "algorithm": s.algorithm, "scope": s.scope, "exact": bool(s.exact),
            "optimises": "node" if s.level == "node" else "deepep", "global_batch": s.gb,
            "n_batches": n_batches, "seq_len": s.L, "sequences": s.n, "sequences_placed": int(len(placed)),
            "sequences_dropped": int(len(dropped)), "tokens_placed": int(len(placed) * s.L)}


def _clustering_report(cl: dict, s: _Setup, clustered: np.ndarray, inner_split: dict | None) -> dict:
    return {"method": cl["method"], "clusters": int(len(cl["centers"])), "partitions": s.N,
            "sequences_clustered": int(len(clustered)), "node_inner_split": inner_split,
            "partition_sizes": np.bincount(cl["partition_of_cluster"], weights=cl["sizes"],
                                           minlength=s.N).astype(np.int64).tolist()}


def _source(store) -> dict:
    """Where the routing came from: the store's path and its dataset and Grouter fingerprints."""
    source = {}
    if hasattr(store, "path"):
        source["routing"] = str(Path(store.path).resolve())
    manifest = getattr(store, "manifest", None) or {}
    for key in ("dataset_fingerprint", "grouter_fingerprint"):
        if key in manifest:
            source[key] = manifest[key]
    return source


# -- artifacts ---------------------------------------------------------------------------------
def report_markdown(report: dict) -> str:
    """``report.md``: the plan's options, the remote volumes, the loads and how the steps went."""
    lines = _md_summary(report) + _md_volumes(report) + _md_loads(report) + _md_steps(report)
    return "\n".join(lines) + "\n"


def _md_summary(r: dict) -> list[str]:
    G = r["ranks_per_node"]
    return [f"# EP placement plan: {r['n_experts']} experts (top-{r['k']}) on {r['ranks']} ranks"
            + (f", {r['nodes']} nodes of {G}" if G else ""), "",
            f"- level: **{r['level']}** ({r['partitions']} partitions); algorithm: **{r['algorithm']}** "
            f"(scope {r['scope']}{', exact per batch' if r['exact'] else ''}); "
            f"the plan optimises the **{r['optimises']}** cost model"
            + (" (then deepep inside each node)" if r["level"] == "node" else ""),
            f"- {r['sequences_placed']} of {r['sequences']} sequences placed ({r['sequences_dropped']} dropped so "
            f"every rank gets the same count), {r['n_batches']} global batches of {r['global_batch']}",
            "- random baseline: the same global batches dealt to ranks at random, expert e on rank e // (E/R)",
            "- lower bound: every sequence on its own cheapest rank with the plan's experts (no capacity); "
            "floor: what no expert or sample placement avoids", ""]


def _md_volumes(r: dict) -> list[str]:
    fmt = lambda x: "n/a" if x is None else f"{x:.3f}"  # noqa: E731
    lines = ["| cost model | random | plan experts, random samples | plan | lower bound | floor | plan / random "
             "| bound / random |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, c in r["cost_models"].items():
        lines.append(f"| {name} | {c['random']:,} | {c['plan_experts_random_samples']:,} | {c['plan']:,} | "
                     f"{c['lower_bound']:,} | {c['floor_any_placement']:,} | {fmt(c['plan_over_random'])} | "
                     f"{fmt(c['bound_over_random'])} |")
    return lines + ["", "Units: remote token copies over all placed tokens. " + "; ".join(
        f"{k}: {v['description']}" for k, v in r["cost_models"].items()) + "."]


def _md_loads(r: dict) -> list[str]:
    lines = ["", "| load (max / mean over ranks) | plan overall | plan per batch (mean, worst) | random overall | "
             "random per batch (mean, worst) |", "|---|---:|---:|---:|---:|"]
    for key, label in (("expert_load_max_over_mean", "token-slots at each rank's experts"),
                       ("sequences_max_over_mean", "sequences per data-parallel rank")):
        p, q = r["load"]["plan"][key], r["load"]["random"][key]
        lines.append(f"| {label} | {p['overall']:.3f} | {p['per_batch_mean']:.3f}, {p['per_batch_worst']:.3f} | "
                     f"{q['overall']:.3f} | {q['per_batch_mean']:.3f}, {q['per_batch_worst']:.3f} |")
    return lines


def _md_steps(r: dict) -> list[str]:
    ef, cl, rf = r["entropy_filter"], r["clustering"], r["refinement"]
    return ["", f"Entropy filter: threshold {ef['threshold_bits']:.3f} bits = {ef['fraction']:.5f} x log2(E) "
            f"({ef['max_bits']:.0f} bits); kept {ef['kept']}, filtered {ef['filtered']}"
            + (" (too few kept: clustered the most peaked instead)" if ef["relaxed_to_most_peaked"] else "")
            + f"; entropy median {ef['quantiles_bits']['median']:.3f} bits (uniformly random routing of this "
            f"length: {ef['uniform_routing_reference_bits']:.3f} bits).",
            f"Clustering: {cl['method']} to {cl['clusters']} clusters of {cl['sequences_clustered']} sequences, "
            f"agglomerative to {cl['partitions']} partitions (sizes {cl['partition_sizes']})"
            + (f"; node-internal split: {cl['node_inner_split']}" if cl["node_inner_split"] else "") + ".",
            ("Refinement: none (the paper's grouping)." if not rf else
             f"Refinement of the grouping to a balanced placement of {rf['sample']} sequences: "
             f"{rf['iterations']} rounds, local share of (token, expert) pairs "
             f"{rf['local_share'][0]:.4f} -> {max(rf['local_share']):.4f}."),
            "", "Timings (s): " + ", ".join(f"{k} {v}" for k, v in r["timings_s"].items()) + "."]


def plot_report(report: dict, path: Path) -> None:
    """Remote volume per cost model (random / plan / bound) and per-rank loads."""
    cm = report["cost_models"]
    fig = Figure(figsize=(15, 4))
    axes = fig.subplots(1, 3)
    ax = axes[0]
    names = list(cm)
    bars = [("random", "random"), ("plan_experts_random_samples", "plan experts only"), ("plan", "plan"),
            ("lower_bound", "lower bound")]
    width = 0.8 / len(bars)
    tokens = max(report["tokens_placed"], 1)
    for i, (key, label) in enumerate(bars):
        ax.bar(np.arange(len(names)) + i * width, [cm[m][key] / tokens for m in names], width=width, label=label)
    ax.set_xticks(np.arange(len(names)) + width * (len(bars) - 1) / 2, names)
    ax.set_ylabel("remote copies per token")
    ax.set_title(f"remote volume ({report['algorithm']}, optimises {report['optimises']})")
    ax.legend(fontsize=8)
    R = report["ranks"]
    for ax, key, label in ((axes[1], "expert_slots_per_rank", "token-slots at the rank's experts"),
                           (axes[2], "sequences_per_rank", "sequences trained by the rank")):
        for i, who in enumerate(("random", "plan")):
            v = np.asarray(report["load"][who][key], dtype=float)
            ax.bar(np.arange(R) + (i - 0.5) * 0.4, v / max(v.mean(), 1e-12), width=0.4, label=who)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.axhline(1, color="black", ls="--", lw=1)
        ax.set_xlabel("rank")
        ax.set_ylabel("share / mean")
        ax.set_title(label)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def place(routing_dir: str | Path, out: str | Path, ranks: int, ranks_per_node: int | None = None,
          algorithm: str = "balanced", global_batch: int | None = None, seed: int = 0, overwrite: bool = False,
          *, level: str | None = None, scope: str = "batch", exact: bool = False, clusters: int = 100,
          entropy_fraction: float = DEFAULT_ENTROPY_FRACTION, max_sequences: int | None = None,
          refine: int | None = None, verify: bool = True) -> dict:
    """Plan placement from the routing store ``routing_dir`` and write ``out`` (plan.json, report.*).

    Returns a summary: paths, level, algorithm, the optimised cost model, each model's plan / random
    ratio, load imbalance and seconds. ``verify``: check the store's checksums (reads it once more).
    """
    t0 = time.perf_counter()
    out = Path(out)
    if out.exists() and not overwrite:
        raise GrouterError(f"{out} already exists; choose another --out, or pass --overwrite")
    store = RoutingStore.open(routing_dir, verify=verify)
    plan = plan_placement(store, ranks, ranks_per_node, algorithm, global_batch, clusters, entropy_fraction, seed,
                          max_sequences, level=level, scope=scope, exact=exact, refine=refine)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        plan.save(tmp)
        write_json(tmp / "report.json", plan.report)
        (tmp / "report.md").write_text(report_markdown(plan.report))
        plot_report(plan.report, tmp / "report.png")
    r = plan.report
    return {"plan": str(out / "plan.json"), "report": str(out / "report.md"), "out": str(out),
            "level": r["level"], "algorithm": r["algorithm"], "optimises": r["optimises"],
            "ranks": r["ranks"], "ranks_per_node": r["ranks_per_node"], "global_batch": r["global_batch"],
            "sequences_placed": r["sequences_placed"], "sequences_dropped": r["sequences_dropped"],
            "plan_over_random": {m: c["plan_over_random"] for m, c in r["cost_models"].items()},
            "bound_over_random": {m: c["bound_over_random"] for m, c in r["cost_models"].items()},
            "expert_load_max_over_mean": r["load"]["plan"]["expert_load_max_over_mean"]["per_batch_worst"],
            "sequences_max_over_mean": r["load"]["plan"]["sequences_max_over_mean"]["per_batch_worst"],
            "seconds": round(time.perf_counter() - t0, 3)}
