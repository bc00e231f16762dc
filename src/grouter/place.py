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
4. **Expert grouping**: the E experts to the ``N_p`` partitions, ``E / N_p`` each, maximising the
   summed centroid affinity: Hungarian assignment (``linear_sum_assignment``) without a load cap;
   with one (``load_tolerance``, default 0.05; our addition) also every partition's experts take at
   most ``1 + load_tolerance`` times the mean token-slots of the split, an integer program
   (``scipy.optimize.milp``; when the cap cannot be met, the least reachable cap instead). Without
   it a plan may put popular, co-used experts together and give one rank far more expert compute
   than another, which costs more step time than the all-to-all saves. At node level a node's
   experts are split over its G ranks the same way (capped per rank), using the node's k-means
   centroids merged to G sub-partitions (the paper splits them randomly).
4b. **Refinement** (``balanced`` only, ``refine`` rounds, default 10; our addition): the paper's
   grouping assumes every sequence may go to its favourite partition, but the partitions have
   unequal sizes and a balanced placement must overflow the big ones. On a sample of up to 100 000
   sequences (whole global batches in batch scope) :func:`refine_grouping` alternates the balanced
   sample placement with a regrouping of the experts (under the load cap) on the partitions'
   summed counts, keeping a step only if it lowers the cost the plan optimises (DeepEP copies at
   rank level, node copies at node level, DeepEP copies inside each node for the node's ranks):
   no step increases the cost or breaks a capacity. ``refine=0`` keeps the first grouping.
5. **Sample placement** per global batch (``global_batch`` sequences, a multiple of R; batch
   membership is a seeded shuffle, exactly what a shuffling loader would give, so the plan never
   changes which sequences train together):

   - ``balanced`` (default): every data-parallel rank gets exactly ``global_batch / R`` sequences
     of every batch, chosen to minimise the optimised cost model (:func:`balanced_assignment`): a
     capacity-constrained regret greedy, vectorised over all batches at once (rounds in which every
     unplaced sequence proposes to its cheapest partition that still has room and each partition
     keeps the proposers with the largest regret), run on the cost and on the cost plus partition
     prices (Lagrange multipliers of the capacities from a few subgradient steps), the cheaper per
     batch. ``exact=True`` solves each batch optimally with ``linear_sum_assignment`` (O(batch³)
     per batch). The report gives the plan against the **balanced-LP bound** (:func:`balanced_bound`:
     the least cost of any balanced placement with the plan's experts, exact per batch, or a
     Lagrangian lower bound for one big group). At node level, sequences are placed on nodes first
     (node cost), then on the node's G ranks (DeepEP cost), both balanced. ``scope="epoch"``
     applies the capacity over the whole split instead (each rank n/R sequences), and each batch
     takes ``global_batch / R`` sequences from every rank's queue, dealt so that every batch gets
     a like share of each rank's heavy and light sequences (:func:`_deal_queues`): batches are then
     stratified by group rather than random, and their expert load per rank is close to the mean.
     In batch scope the expert compute of a rank in a batch is fixed by the batch's members and the
     expert grouping, whatever the sample placement: only the load cap (overall) and the epoch
     scope (per batch) balance it.
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
ranks) is reported too. Load, per global batch, max / mean over ranks (plan and random): token-slots
at each rank's experts (its expert compute), DeepEP copies each rank receives and sends, and
sequences per data-parallel rank.

**Step time** (``hardware``, :mod:`grouter.hardware`): the predicted step and all-to-all times of the
plan and of the random baseline on a cluster profile, per dispatcher, and the speedup
(docs/steptime.md).

**Per-layer routing** (a store with per-layer heads): the target's MoE layers route differently and
each dispatches its tokens on its own, so the plan's cost is the sum over the layers. One expert
placement and one sample placement serve every layer; they are planned over the **union of the
layers**: a sequence's ids of every layer side by side (:class:`LayerUnion`, ``[n, L·T, k]``), so
affinity, clustering, expert grouping, refinement, sample placement and the cost models all sum
over the layers. ``target_layers`` T weights each head by the target layers that route by it
(:meth:`grouter.routers.Heads.for_target`); without it every head of the store counts once.
Volumes are then per (token, layer) where they are per token; the loads sum over the layers; the
step-time model (one routing in every layer) is refused.

Output of :func:`place` (atomic): ``plan.json``, ``report.json``, ``report.md``, ``report.png``.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from matplotlib.ticker import MaxNLocator
from scipy import sparse
from scipy.optimize import Bounds, LinearConstraint, linear_sum_assignment, milp

from .artifacts import write_json
from .chunking import row_chunks
from .errors import GrouterError
from .formats.plan import Plan
from .formats.store import RoutingStore
from .formats.stream import RoutingStream, StreamPlanning
from .hardware import DISPATCHERS, PROFILES, HardwareProfile, LayerTraffic, StepTraffic, load_profile, predict, step_times
from .options import COUNT, LAYERS, NON_NEGATIVE, POSITIVE, POSITIVE_INT, SEED, check, option, path_input
from .plots import figure
from .runner import Output, Stage
from .steptime import (FIRST_SHARPNESS, Placement, ReplicatedIds, layer_traffic, placement_costs, rank_weights,
                       replicate_experts, step_traffic_of)

ALGORITHMS = ("balanced", "greedy")
OBJECTIVES = ("steptime", "bytes")
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
# refine_grouping uses a random sample of at most this many sequences and token-slots (whole global
# batches, at least one): its memory and its rounds' time then stay bounded however long the sequences
# and however many heads the union holds (docs/scale.md#what-the-planner-needs).
REFINE_SAMPLE, REFINE_SLOTS = 100_000, 1 << 28
# balanced_assignment works on this many sequences at a time (whole groups).
ASSIGN_CHUNK = 1 << 17
# Compute balance: by default every rank's experts take at most this factor of the mean token-slots.
DEFAULT_LOAD_TOLERANCE = 0.05
# Time limit (s) of one load-capped expert grouping (scipy.optimize.milp).
MILP_SECONDS = 3.0
# balanced_bound: exact per group (linear_sum_assignment) up to this many rows per group.
BOUND_GROUP_ROWS = 1024
# balanced_assignment's price steps: at most PRICE_STEPS, and at most PRICE_WORK (rows x partitions x steps).
PRICE_STEPS, PRICE_WORK = 200, 400_000_000
# The step-time stage (docs/steptime.md): stop at the first round (STAGE_PATIENCE rounds) that takes
# the mean predicted step time down by less than this share.
STAGE_PATIENCE, STAGE_GAIN = 1, 1e-3


# -- affinity and entropy ----------------------------------------------------------------------
class LayerUnion:
    """The routing of every layer of a target side by side: ``[n, L·T, k]`` from a store's ``[n, L, H, k]``,
    layer t taking head ``layer_heads[t]`` (a head may repeat). Reads like the store's memory map, in rows:
    a slice stays lazy, an index array or ``np.asarray`` reads those rows (and nothing else)."""

    def __init__(self, ids: np.ndarray, layer_heads):
        self.ids, self.layer_heads = ids, np.asarray(layer_heads, dtype=np.int64)
        n, L, H, k = ids.shape
        self.shape, self.ndim, self.dtype = (n, L * len(self.layer_heads), k), 3, ids.dtype
        self._every_head_once = np.array_equal(self.layer_heads, np.arange(H))

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows):
        if isinstance(rows, slice):
            return LayerUnion(self.ids[rows], self.layer_heads)
        return self._read(self.ids[rows])

    def __array__(self, dtype=None, copy=None):
        out = self._read(self.ids)
        return out if dtype is None else out.astype(dtype)

    def _read(self, ids) -> np.ndarray:
        ids = np.asarray(ids)
        picked = ids if self._every_head_once else ids[:, :, self.layer_heads]
        return picked.reshape(len(ids), -1, ids.shape[-1])


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
    from sklearn.cluster import (
        AgglomerativeClustering,  # scikit-learn takes a second to import: on use
    )

    return AgglomerativeClustering(n_clusters=n, linkage="ward").fit_predict(centers)


def cluster_affinity(phi: np.ndarray, n_partitions: int, clusters: int = 100, seed: int = 0) -> dict:
    """k-means++ of the rows of ``phi`` to ``max(clusters, n_partitions)`` clusters, merged to ``n_partitions``.

    Returns ``{"centers" [K, E], "sizes" [K], "partition_of_cluster" [K], "centroids" [P, E],
    "method"}``; ``phi`` needs at least ``n_partitions`` rows.
    """
    from sklearn.cluster import (  # scikit-learn takes a second to import: on use
        KMeans,
        MiniBatchKMeans,
    )

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


def group_experts(centroids: np.ndarray, experts: np.ndarray | None = None, load: np.ndarray | None = None,
                  cap: float | None = None) -> np.ndarray:
    """Experts to partitions, each partition taking ``len(experts) / P`` of them, maximising
    ``Σ_e centroids[partition(e), e]``.

    ``centroids`` ``[P, E]``: each partition's affinity (or summed counts) per expert. ``experts``:
    the expert ids to place (default all E). Without ``load``: Hungarian assignment
    (``linear_sum_assignment``). With ``load`` (per expert id, e.g. its token-slots) and ``cap``:
    also ``Σ_{e in p} load[e] <= cap`` for every partition (the compute balance), an integer
    program solved by ``scipy.optimize.milp`` (HiGHS, 1 % gap, a few seconds at most); when it finds
    no solution (``cap`` infeasible, or out of time) the Hungarian grouping is repaired by swaps
    that lower the heaviest partition's load (:func:`_repair_load`), as close to ``cap`` as swaps get.
    """
    P = len(centroids)
    experts = np.arange(centroids.shape[1]) if experts is None else np.asarray(experts)
    weight = np.asarray(centroids, dtype=np.float64)[:, experts]  # [P, E']
    if (load is None) != (cap is None):
        raise ValueError("a load cap needs both load and cap")
    if load is not None:
        part = _milp_grouping(weight, np.asarray(load, dtype=np.float64)[experts], float(cap))
        if part is not None:
            return part
    per = len(experts) // P
    slots = np.repeat(np.arange(P), per)  # column j is a seat of partition slots[j]
    rows, cols = linear_sum_assignment(weight[slots].T, maximize=True)
    part = np.empty(len(experts), dtype=np.int64)
    part[rows] = slots[cols]
    if load is not None:
        part = _repair_load(part, weight, np.asarray(load, dtype=np.float64)[experts], float(cap))
    return part


def _milp_grouping(weight: np.ndarray, load: np.ndarray, cap: float) -> np.ndarray | None:
    """:func:`group_experts` with a load cap as an integer program; None when it finds no solution.

    When the cap cannot be met, the least reachable cap is found first (the same program minimising
    the heaviest partition's load) and the grouping is solved under it."""
    P, n = weight.shape
    if n % P or n == 0:
        return None
    one_each = sparse.kron(sparse.eye(n), np.ones((1, P)))  # x[e, p] at e * P + p; z (the heaviest load) last
    seats = sparse.kron(np.ones((1, n)), sparse.eye(P))
    loads = sparse.kron(load[None, :] / max(float(load.mean()), 1e-12), sparse.eye(P))  # in units of the mean
    cap = cap / max(float(load.mean()), 1e-12)
    rows = [sparse.hstack([one_each, np.zeros((n, 1))]), sparse.hstack([seats, np.zeros((P, 1))]),
            sparse.hstack([loads, -np.ones((P, 1))])]

    def solve(objective: np.ndarray, z_max: float, gap: float = 1e-2):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return milp(objective, integrality=np.r_[np.ones(n * P), 0], bounds=Bounds(0, np.r_[np.ones(n * P), z_max]),
                        constraints=[LinearConstraint(rows[0], 1, 1), LinearConstraint(rows[1], n // P, n // P),
                                     LinearConstraint(rows[2], -np.inf, 0)],
                        options={"time_limit": MILP_SECONDS, "mip_rel_gap": gap})

    gain = np.r_[-weight.T.ravel() / max(float(np.abs(weight).max()), 1e-12), 0]
    res = solve(gain, cap)
    if res.status == 2:  # the cap cannot be met: the least cap that can, then the grouping under it
        least = solve(np.r_[np.zeros(n * P), 1], np.inf, gap=0.0)  # exact: the same least cap every time
        if least.x is None:
            return None
        cap = float(least.x[-1]) * (1 + 1e-9)
        res = solve(gain, cap)
    if res.x is None:
        return None
    part = res.x[:-1].reshape(n, P).argmax(1)
    heaviest = np.bincount(part, load, P).max() / max(float(load.mean()), 1e-12)
    return part if np.all(np.bincount(part, minlength=P) == n // P) and heaviest <= cap * (1 + 1e-6) else None


def _repair_load(part: np.ndarray, weight: np.ndarray, load: np.ndarray, cap: float) -> np.ndarray:
    """Swap experts out of the heaviest partition while it is above ``cap``: each time the swap
    (e in it, f elsewhere) that lowers its load without making the other partition as heavy, and
    loses the least weight. Stops at ``cap`` or when no swap helps."""
    part = part.copy()
    P = weight.shape[0]
    for _ in range(4 * len(part)):
        loads = np.bincount(part, load, P)
        p = int(loads.argmax())
        if loads[p] <= cap:
            break
        e, f = np.flatnonzero(part == p), np.flatnonzero(part != p)
        q = part[f]
        delta = load[e][:, None] - load[f][None, :]  # load moved from p to q
        ok = (delta > 0) & (loads[q][None, :] + delta < loads[p])
        if not ok.any():
            break
        loss = (weight[p, e][:, None] + weight[q, f][None, :] - weight[p, f][None, :] - weight[q[None, :], e[:, None]])
        i, j = np.unravel_index(np.where(ok, loss, np.inf).argmin(), ok.shape)
        part[e[i]], part[f[j]] = q[j], p
    return part


def holder_presence(ids: np.ndarray, lut: np.ndarray, holders: int) -> np.ndarray:
    """``[n, holders]`` tokens of each sequence of ``ids`` ``[n, L, k]`` with at least one expert on each
    holder; ``lut[e]``: the holder of expert e (``holders`` or more: ignored)."""
    n, L, k = ids.shape
    small = np.uint8 if holders < 255 else np.uint16
    lut = np.minimum(np.asarray(lut, dtype=np.int64), holders).astype(small)
    out = np.empty((n, holders), dtype=_count_dtype(L))
    for a, b in row_chunks(n, L * max(holders + 1, k)):
        out[a:b] = _presence(lut[np.asarray(ids[a:b])].reshape((b - a) * L, k), b - a, L, holders, out.dtype)
    return out


def _presence(holder: np.ndarray, c: int, L: int, H: int, dtype) -> np.ndarray:
    """``[c, H]`` tokens of each of c sequences with a slot on each holder, from the holder of each
    token-slot ``holder`` ``[c * L, k]`` (H: ignored): a boolean scatter deduplicates a token's slots."""
    tok = np.arange(c * L, dtype=np.int64)[:, None]
    pres = np.zeros(c * L * (H + 1), dtype=np.uint8)
    pres[tok * (H + 1) + holder] = 1
    return pres.reshape(c, L, H + 1).sum(1, dtype=dtype)[:, :H]


def refine_grouping(ids: np.ndarray, part: np.ndarray, n_partitions: int, groups: np.ndarray, capacity: np.ndarray,
                    iterations: int = 10, *, experts: np.ndarray | None = None, n_experts: int | None = None,
                    load: np.ndarray | None = None, cap: float | None = None,
                    exact: bool = False) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Alternate expert grouping and balanced sample placement on a sample; no step increases the cost.

    ``ids`` ``[m, L, k]``: the sample's routing; ``part``: the partition of each of ``experts``
    (default all ``n_experts``; other experts are ignored, as inside a node). The cost J of a
    sequence on partition p: the distinct other partitions its tokens reach, summed over tokens
    (DeepEP copies when the partitions are ranks, node copies when they are nodes). The placement
    keeps every partition at ``capacity[g]`` sequences of each group g (a global batch):
    :func:`balanced_assignment`. Each round regroups the experts on the partitions' summed
    (token, expert) counts (:func:`group_experts`, under ``cap`` when ``load``, per expert id, is
    given) and keeps the new grouping only if J falls without raising the heaviest load above
    ``cap``, then re-places the sequences and keeps that only if J falls. So from a start within
    the cap J never increases; from a start above it the first step may trade J for the cap.
    Returns (grouping, partition of each sample sequence, J after the start and each kept step).
    """
    P = n_partitions
    E = int(n_experts if n_experts is not None else np.asarray(ids).max() + 1)
    experts = np.arange(E) if experts is None else np.asarray(experts)
    counts = affinity_counts(ids, E)[:, experts].astype(np.float64)
    ar = np.arange(len(ids))

    def cost_of(grouping: np.ndarray) -> np.ndarray:
        lut = np.full(E, P, dtype=np.int64)
        lut[experts] = grouping
        return _remote_copies(holder_presence(ids, lut, P))

    over = lambda g: 0.0 if load is None else max(0.0, float(np.bincount(g, load[experts], P).max()) - cap)  # noqa: E731
    cost = cost_of(part)
    rows = balanced_assignment(cost, groups, capacity, exact)
    trace = [int(cost[ar, rows].sum())]
    for _ in range(iterations):
        W = sparse.csr_matrix((np.ones(len(rows)), (rows, ar)), shape=(P, len(rows))) @ counts  # [P, E']
        new = group_experts(W, load=None if load is None else load[experts], cap=cap)
        new_cost = cost_of(new) if not np.array_equal(new, part) else cost
        fewer = over(new) < over(part) - 1e-9  # a start above the cap: the first step may buy the cap with copies
        if not fewer and (over(new) > over(part) + 1e-9 or int(new_cost[ar, rows].sum()) >= trace[-1]):
            break
        part, cost = new, new_cost
        trace.append(int(cost[ar, rows].sum()))
        placed = balanced_assignment(cost, groups, capacity, exact)
        if int(cost[ar, placed].sum()) < trace[-1]:
            rows = placed
            trace.append(int(cost[ar, rows].sum()))
    return part, rows, trace


def _permutation_from_ranks(rank_of_expert: np.ndarray, ranks: int) -> np.ndarray:
    """``logical -> physical`` with rank r's experts (in logical order) at ``[r*E/R, (r+1)*E/R)``."""
    E = len(rank_of_expert)
    order = np.lexsort((np.arange(E), rank_of_expert))  # experts sorted by rank, then id
    perm = np.empty(E, dtype=np.int64)
    perm[order] = np.arange(E)
    if not np.array_equal(perm // (E // ranks), rank_of_expert):
        raise AssertionError("every rank must hold exactly E/R experts")
    return perm


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
        tokens[a:b] = _presence(rk, c, L, R, tokens.dtype)
        if G:
            node_tokens[a:b] = _presence(rk // small(G), c, L, R // G, node_tokens.dtype)
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
def balanced_assignment(cost: np.ndarray, groups: np.ndarray, capacity: np.ndarray, exact: bool = False,
                        price_steps: int | None = None) -> np.ndarray:
    """Place each row of ``cost`` ``[m, P]`` on a partition so that every partition takes exactly
    ``capacity[g]`` rows of each group g (so group g must have ``P * capacity[g]`` rows), minimising
    the summed cost.

    ``exact``: per group, ``linear_sum_assignment`` on the cost with each column repeated
    ``capacity[g]`` times (optimal, O(group size³)). Otherwise a vectorised regret greedy over all
    groups at once: in each round every unplaced row proposes to its cheapest partition with room
    left; a partition keeps the proposers with the largest regret (cost of their next-best
    partition minus this one) up to its room. At most P + 1 rounds. The greedy runs twice: on the
    cost, and on the cost plus per-group partition prices (the Lagrange multipliers of the
    capacities, from subgradient steps of :func:`_dual_prices`, which make the over-wanted
    partitions dearer so the greedy overflows them by the cheapest rows); each group keeps the
    cheaper of the two placements. ``price_steps``: at most this many subgradient steps (0: the
    greedy on the cost alone; default: ``PRICE_STEPS``, fewer on large inputs).
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
    iterations = int(min(PRICE_STEPS if price_steps is None else price_steps, PRICE_WORK // (m * P)))
    g0 = 0
    while g0 < len(capacity):  # whole groups, about ASSIGN_CHUNK rows at a time
        g1 = int(np.searchsorted(bounds, bounds[g0] + ASSIGN_CHUNK, side="right")) - 1
        g1 = max(g1, g0 + 1)
        rows = order[bounds[g0]:bounds[g1]]
        out[rows] = _priced_greedy(cost[rows].astype(np.float64), groups[rows] - g0, capacity[g0:g1], iterations)
        g0 = g1
    return out


def _priced_greedy(cost: np.ndarray, groups: np.ndarray, capacity: np.ndarray, iterations: int) -> np.ndarray:
    """:func:`_regret_greedy` on the cost and on the cost plus :func:`_dual_prices`; the cheaper per group."""
    plain = _regret_greedy(cost, groups, capacity)
    if iterations <= 0:
        return plain
    ar, G = np.arange(len(cost)), len(capacity)
    plain_cost = np.bincount(groups, cost[ar, plain], G)
    lam, _ = _dual_prices(cost, groups, capacity, plain_cost, iterations)
    priced = _regret_greedy(cost + lam[groups], groups, capacity)
    better = np.bincount(groups, cost[ar, priced], G) < plain_cost
    return np.where(better[groups], priced, plain)


def _dual_prices(cost: np.ndarray, groups: np.ndarray, capacity: np.ndarray, target: np.ndarray,
                 iterations: int) -> tuple[np.ndarray, np.ndarray]:
    """Prices λ ``[G, P]`` of the partitions per group and the dual value they reach ``[G]``: the
    Lagrangian dual of the capacities, ``Σ_s min_p (cost[s, p] + λ[g(s), p]) - Σ_p capacity[g] λ[g, p]``,
    a lower bound on the balanced optimum for any λ, maximised by subgradient ascent with Polyak
    steps towards ``target`` (a feasible cost per group), halved after 10 steps without progress; the
    best λ of each group is kept."""
    m, P = cost.shape
    G = len(capacity)
    lam, best_lam, best = np.zeros((G, P)), np.zeros((G, P)), np.full(G, -np.inf)
    ar, alpha, stall = np.arange(m), 1.0, 0
    for _ in range(iterations):
        v = cost + lam[groups]
        pick = v.argmin(1)
        value = np.bincount(groups, v[ar, pick], G) - capacity * lam.sum(1)
        improved = value > best + 1e-9
        best_lam[improved], best[improved] = lam[improved], value[improved]
        stall = 0 if improved.any() else stall + 1
        if stall >= 10:
            alpha, stall = alpha / 2, 0
        step = np.bincount(groups * P + pick, minlength=G * P).reshape(G, P) - capacity[:, None]
        norm = (step ** 2).sum(1)
        lam += alpha * np.where(norm > 0, np.maximum(target - value, 0) / np.maximum(norm, 1), 0)[:, None] * step
    return best_lam, best


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


def balanced_bound(cost: np.ndarray, groups: np.ndarray, capacity: np.ndarray) -> tuple[int | None, str]:
    """A lower bound on the summed ``cost`` of any placement giving every partition ``capacity[g]``
    rows of each group g (no balanced sample placement with these experts sends less), and how it
    was found.

    It is a transportation problem, so its LP relaxation has an integral optimum. Groups of at most
    ``BOUND_GROUP_ROWS`` rows: solved exactly, group by group, by ``linear_sum_assignment`` (columns
    repeated ``capacity`` times). Larger groups (epoch scope: one group of the whole split): the
    Lagrangian dual of the capacities, ``max_λ Σ_s min_p (cost[s, p] + λ[g(s), p]) - Σ_p capacity[g]
    λ[g, p]``, whose optimum is the LP's, by subgradient ascent (:func:`_dual_prices`) towards the
    greedy placement's cost; any λ gives a valid bound, and on a 1,200 x 4 test it comes within
    0.1 % of the exact optimum. (HiGHS's ``linprog`` took 90 s on a 9,000 x 4 instance.)
    """
    cost = np.asarray(cost)
    groups = np.asarray(groups, dtype=np.int64)
    capacity = np.asarray(capacity, dtype=np.int64)
    m, P = cost.shape
    sizes = np.bincount(groups, minlength=len(capacity))
    if m == 0:
        return 0, "empty"
    if sizes.max() <= BOUND_GROUP_ROWS:
        rows = balanced_assignment(cost, groups, capacity, exact=True)
        return int(cost[np.arange(m), rows].sum()), "linear_sum_assignment per global batch (exact)"
    iterations = int(min(500, max(20, 2e9 // (m * P))))
    cost = cost.astype(np.float64)
    target = np.bincount(groups, cost[np.arange(m), balanced_assignment(cost, groups, capacity)], len(capacity))
    _, best = _dual_prices(cost, groups, capacity, target, iterations)
    return int(math.ceil(best.sum() - 1e-6)), f"Lagrangian dual, {iterations} subgradient steps (a valid lower bound)"


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


# -- planning: the pipeline --------------------------------------------------------------------
@dataclass
class Options:
    """What to plan for, and how (see the module docstring; the fields without a flag are for Python)."""

    ranks: int = option(help="expert-parallel ranks (must divide the experts)", range=POSITIVE_INT)
    ranks_per_node: int | None = option(None, "GPUs per node, for node-level cost", range=POSITIVE_INT)
    algorithm: str = option("balanced", "balanced: equal sequences per rank per global batch; greedy: the paper's "
                            "Algorithm 1 (no capacity constraint: ranks get unequal work)", choices=ALGORITHMS)
    level: str | None = option(None, "optimise rank-level (DeepEP) or node-level traffic (default: node when "
                               "1 < G < R)", choices=LEVELS)
    global_batch: int | None = option(None, "sequences per global batch (default 16×R)", range=POSITIVE_INT)
    scope: str = option("batch", "where the equal-share constraint holds", choices=SCOPES)
    exact: bool = option(False, "optimal per-batch assignment (slower) instead of the greedy")
    load_tolerance: float = option(DEFAULT_LOAD_TOLERANCE, "every rank's experts take at most 1 + this times the "
                                   "mean token-slots", range=NON_NEGATIVE)
    load_cap: bool = option(True, "group experts without the load cap (the paper's way)", flag="--no-load-cap")
    lp_bound: bool = option(False, "compute the balanced-LP bound even when it is costly")
    hardware: str | None = option(None, f"predict step times on a cluster: {', '.join(PROFILES)} or a JSON file "
                                  "(docs/steptime.md)", metavar="PROFILE", file=True)
    target_layers: int | None = option(None, "per-layer routing: the target's MoE layers, each head weighted by the "
                                       "layers that route by it (default: every head of the store once)",
                                       range=LAYERS, metavar="T")
    objective: str | None = option(None, "what the plan minimises: steptime, the predicted step time on --hardware "
                                   "(the default with it), or bytes, the all-to-all copies (the default without)",
                                   choices=OBJECTIVES)
    dispatcher: str = option("deepep", "the dispatcher whose step time the steptime objective minimises",
                             choices=DISPATCHERS)
    redundant_experts: int = option(0, "what-if with --hardware: this many replicas of the hottest experts (EPLB-style, "
                                    "a multiple of the ranks), their predicted step time beside the plan's", range=COUNT)
    seed: int = option(0, "batch membership and the random baseline (a routing stream: also the document order)",
                       range=SEED)
    seq_len: int | None = option(None, "a routing stream: the tokens per sample Megatron trains with (--seq-length)",
                                 range=POSITIVE_INT)
    clusters: int = option(100, range=POSITIVE_INT, cli=False)
    entropy_fraction: float = option(DEFAULT_ENTROPY_FRACTION, range=POSITIVE, cli=False)
    max_sequences: int | None = option(None, "plan only the first this many sequences", range=POSITIVE_INT, cli=False)
    refine: int | None = option(None, "refinement rounds (default 10 for balanced, 0 for greedy)", range=COUNT,
                                cli=False)
    split: str = option("train", choices=("train", "val"), cli=False)
    steptime_rounds: int = option(6, "rounds of the step-time stage", range=COUNT, cli=False)
    verify: bool = option(True, "check the store's checksums as it is read", cli=False, how=True)


def plan_placement(store, o: Options, compare=None) -> Plan:
    """Plan expert and sample placement for ``o.ranks`` EP ranks from the routing in ``store``.

    ``store``: a :class:`~grouter.formats.store.RoutingStore` (or any object with ``ids(split)``,
    ``n_experts`` and ``k``). ``o.ranks_per_node`` G: nodes of G ranks; ``o.level`` ("rank" or
    "node", default node when 1 < G < ranks): what the partitions are, and so what the plan
    optimises (``deepep`` at rank level, ``node`` then ``deepep`` at node level). ``global_batch``:
    sequences per global batch (multiple of ``ranks``; default 16 per rank). ``max_sequences``: plan
    only the first this many sequences of the split. ``scope``: "batch" (default; batches are a seeded
    random shuffle and the plan only decides which rank trains which sequence of each batch) or
    "epoch" (the capacity holds over the whole split: each rank gets n/R sequences, then every batch
    takes ``global_batch / R`` from every rank's queue, dealt so that batches get like loads: batches
    are stratified by group rather than random). ``exact``: optimal per-batch assignment
    (``linear_sum_assignment``) instead of the vectorised greedy; batch scope only. ``refine``: rounds
    of :func:`refine_grouping` on a sample (:func:`refine_limit` sequences). ``load_tolerance``: every
    rank's (and node's) experts take at most ``1 + load_tolerance`` times the mean token-slots of the split
    (``load_cap`` False: no cap, the paper's grouping). ``hardware``: a built-in profile's name or a
    JSON file; it sets the ranks per node and adds the predicted step times (``report["step_time"]``).
    ``lp_bound``: compute the balanced-LP bound even when it is costly (else: when it is cheap).
    ``target_layers``: with per-layer routing, the target's MoE layers (each head weighted by the
    layers that route by it; None: every head once); see the module docstring. ``objective``
    (with ``hardware``; default "steptime" then): the candidate of least predicted step time
    (:class:`_StepTime`); ``compare``: another routing store of the same data (a learned router's), or
    a dict of them by name, whose step time under the engine's default placement the report sets
    beside the plan's.
    """
    check(o)
    timer = _Timer()
    profile = _check_objective(o, compare)
    ranks_per_node = o.ranks_per_node
    if profile is not None:
        G = profile.layout(o.ranks, ranks_per_node)
        ranks_per_node = G if G < o.ranks else None  # one node: no node cost model
    ids, s = _setup(store, o, ranks_per_node)
    counts = affinity_counts(ids, s.E)  # 1. affinity (as counts: L * φ)
    timer.tick("affinity")
    kept = _EntropyFilter.apply(counts, o.entropy_fraction, s)  # 2. entropy filter
    timer.tick("entropy")
    cl = _cluster(counts, kept.rows, s, o.clusters)  # 3. clustering
    timer.tick("clustering")
    batches, dropped = _batches(s.n, s.gb, s.R, np.random.default_rng(o.seed))  # membership of the global batches
    refine = (10 if o.algorithm == "balanced" else 0) if o.refine is None else o.refine
    rank_of_expert, refinement, inner_split = _expert_placement(ids, counts, cl, s, refine, batches)  # 4., 4b.
    timer.tick("expert_grouping")
    tr = traffic(ids, rank_of_expert, s.R, s.G, counts)  # the plan's experts
    base = traffic(ids, np.arange(s.E) // (s.E // s.R), s.R, s.G, counts)  # the contiguous baseline
    timer.tick("traffic")
    rank, samples = _place_samples(tr, batches, s)  # 5. sample placement
    timer.tick("sample_placement")
    base_rank, base_samples = _random_baseline(batches, s)
    timing = None
    if profile is not None:  # 6. the step-time objective: the candidate of least predicted step time
        timing = _StepTime(ids, s, o, profile)
        rank_of_expert, tr, chosen = timing.choose(rank_of_expert, tr, samples, base, base_samples)
        samples, rank = chosen.samples(), chosen.seq_rank(s.n)
        timer.tick("step_time")
    placed = _members(batches)
    report = {**_report_header(s, len(batches), placed, dropped),
              "cost_models": _cost_models(tr, base, rank, base_rank, placed, s)}
    timer.tick("cost_models")
    report["balanced_bound"] = _bound_report(tr, rank, batches, s, o.lp_bound or None, report["cost_models"])
    timer.tick("balanced_bound")
    step = {"plan": step_traffic(tr, samples, s.seq_len), "random": step_traffic(base, base_samples, s.seq_len)}
    report.update(_loads_report(step, s), entropy_filter=kept.report(s), refinement=refinement,
                  clustering=_clustering_report(cl, s, kept.rows, inner_split))
    if timing is not None:
        report.update(timing.report(counts, compare))
        step.update(timing.traffic)
    timer.tick("report")
    report["timings_s"], report["cpu_s"] = timer.total(), timer.cpu
    return Plan(n_experts=s.E, k=s.k, ranks=s.R, ranks_per_node=s.G, level=s.level, algorithm=o.algorithm,
                scope=o.scope, global_batch=s.gb, seed=o.seed, split=o.split, n_sequences=s.n,
                permutation=_permutation_from_ranks(rank_of_expert, s.R), samples=samples, dropped=dropped,
                source={**_source(store), **s.layers}, report=report, step_traffic=step)


def _check_objective(o: Options, compare) -> HardwareProfile | None:
    """The hardware profile (None without ``--hardware``), after checking what needs one."""
    if o.hardware is None:
        needs = ("--objective steptime" if o.objective == "steptime" else "--redundant-experts" if o.redundant_experts
                 else "--compare-routing" if compare is not None else None)
        if needs:
            raise GrouterError(f"{needs} predicts step times: add --hardware PROFILE (e.g. h100x8)")
        return None
    if o.algorithm == "greedy" and o.objective == "steptime":
        raise GrouterError("the step-time objective re-places each batch with equal shares per rank: use "
                           "--algorithm balanced (or --objective bytes)")
    return load_profile(o.hardware)


@dataclass(frozen=True)
class _Setup:
    """The checked sizes and options of one planning run."""

    n: int  # sequences planned
    L: int  # token-layers per sequence: its tokens, times the layers of per-layer routing (the union)
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
    tol: float | None  # load tolerance: each partition's experts take <= (1 + tol) x the mean token-slots
    seq_len: int  # tokens per sequence
    layers: dict  # per-layer routing: the heads' source layers and the head of each planned layer (else empty)

    def load_cap(self, load: np.ndarray, partitions: int) -> float | None:
        """The most token-slots (of ``load``, per expert) one of ``partitions`` may take (None: no cap)."""
        return None if self.tol is None else (1 + self.tol) * float(load.sum()) / partitions


def _setup(store, o: Options, G: int | None) -> tuple[np.ndarray, _Setup]:
    """The ids ``[n, L, k]`` of the split's first ``max_sequences`` sequences (of every layer, side by
    side, with per-layer routing: :class:`LayerUnion`), and the checked options."""
    ids, seq_len, layers = _layer_union(store, o.split, o.target_layers)
    E, k, R = int(store.n_experts), int(store.k), o.ranks
    if ids.ndim != 3 or ids.shape[2] != k:
        raise GrouterError(f"routing ids of split {o.split!r} have shape {ids.shape}, expected [n, seq_len, {k}]")
    n = ids.shape[0] if o.max_sequences is None else min(ids.shape[0], o.max_sequences)
    level, gb = _check(n, E, R, G, o.level, o.global_batch)
    if o.exact and o.scope == "epoch":
        raise GrouterError("an exact assignment is only available per global batch (scope batch)")
    tol = o.load_tolerance if o.load_cap else None
    N = R // G if level == "node" else R
    return ids[:n], _Setup(n, ids.shape[1], k, E, R, G, level, N, o.algorithm, o.scope, o.exact, gb, o.seed, tol,
                           seq_len, layers)


def _layer_union(store, split: str, target_layers: int | None) -> tuple[np.ndarray, int, dict]:
    """The ids to plan on, the tokens per sequence, and (per-layer routing) which heads make the union."""
    ids, heads = store.ids(split), getattr(store, "heads", None)
    if heads is None:
        return ids, ids.shape[1], {}
    layer_heads = list(heads.for_target(target_layers)) if target_layers else list(range(len(heads)))
    layers = {"head_layers": list(heads.layers), "target_layers": target_layers, "layer_heads": layer_heads}
    return LayerUnion(ids, layer_heads), ids.shape[1], layers


def _check(n: int, E: int, R: int, G: int | None, level: str | None, global_batch: int | None) -> tuple[str, int]:
    if E % R:
        divisors = [d for d in range(1, E + 1) if E % d == 0]
        raise GrouterError(f"{R} ranks cannot each hold the same number of the {E} experts; use a number of "
                           f"ranks that divides {E} ({', '.join(map(str, divisors))})")
    if G is not None and R % G:
        raise GrouterError(f"--ranks-per-node {G} must be a positive divisor of the {R} ranks")
    if level is None:
        level = "node" if G is not None and 1 < G < R else "rank"
    if level == "node" and (G is None or R // G < 2):
        raise GrouterError("node-level placement needs --ranks-per-node G with at least two nodes (G < ranks); "
                           "use rank level otherwise")
    if n < R:
        raise GrouterError(f"only {n} sequences for {R} ranks: every rank needs at least one; "
                           "use fewer ranks or route more data")
    gb = 16 * R if global_batch is None else global_batch
    if gb > n and global_batch is not None:
        raise GrouterError(f"the global batch ({gb} sequences) is larger than the {n} sequences to plan; choose a "
                           f"smaller --global-batch (a multiple of the {R} ranks)")
    if gb < R or gb % R:
        raise GrouterError(f"the global batch ({global_batch!r} sequences) must be a positive multiple of the "
                           f"{R} ranks")
    return level, int(gb)


class _Timer:
    """Wall seconds spent in each step since the previous one (``timings``), and in all (``total``);
    ``cpu``: the same in CPU seconds of this process (``time.process_time``), for shared machines."""

    def __init__(self):
        self.start = self.last = (time.perf_counter(), time.process_time())
        self.timings: dict[str, float] = {}
        self.cpu: dict[str, float] = {}

    def tick(self, step: str) -> None:
        now = (time.perf_counter(), time.process_time())
        self.timings[step], self.cpu[step] = (round(now[i] - self.last[i], 3) for i in (0, 1))
        self.last = now

    def total(self) -> dict[str, float]:
        self.tick("total")
        self.timings["total"], self.cpu["total"] = (round(self.last[i] - self.start[i], 3) for i in (0, 1))
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


def _expert_placement(ids: np.ndarray, counts: np.ndarray, cl: dict, s: _Setup, refine: int,
                      batches: list[np.ndarray]) -> tuple[np.ndarray, dict | None, dict | None]:
    """Rank of each logical expert, the refinement's record (None without refinement) and, at node
    level, how many nodes split their experts over their ranks each way (None at rank level).

    Under a load tolerance every partition's experts take at most ``1 + tol`` times the mean
    token-slots of the split (:func:`group_experts` with a cap), in the first grouping and in every
    regrouping of the refinement.
    """
    load = counts.sum(0, dtype=np.int64).astype(np.float64)  # token-slots per expert over the split
    capped = s.tol is not None
    part = group_experts(cl["centroids"], load=load if capped else None, cap=s.load_cap(load, s.N))
    refinement = sample = None
    if refine:  # fit the grouping to a balanced placement of a sample of the sequences
        part, sample, refinement = _refine(ids, part, s, refine, batches, load)
    if s.level != "node":
        return part, refinement, None
    rank_of_expert, inner_split, inner_traces = _split_nodes(ids, cl, part, s, refine, sample, load)
    if inner_traces:  # DeepEP copies per token inside the nodes, mean over nodes: first and last step
        refinement["inner_cost_per_token"] = [round(float(np.mean([t[i] for t in inner_traces])), 6) for i in (0, -1)]
    return rank_of_expert, refinement, inner_split


@dataclass
class _Sample:
    """The sequences the refinement works on: ``seqs`` (sorted), their ``groups`` (global batches in
    batch scope, one group in epoch scope) and, after the refinement, the partition of each."""

    seqs: np.ndarray
    groups: np.ndarray
    ids: np.ndarray
    rows: np.ndarray | None = None

    @classmethod
    def draw(cls, ids: np.ndarray, s: _Setup, batches: list[np.ndarray]) -> "_Sample":
        """Whole global batches drawn at random (batch scope) or random sequences (epoch scope), at
        most :func:`refine_limit` sequences (at least one batch, or the ranks' count)."""
        rng = np.random.default_rng([s.seed, 1])
        limit = refine_limit(s.L * s.k)
        if s.scope == "batch":
            chosen, total = [], 0
            for i in rng.permutation(len(batches)):
                if chosen and total + len(batches[i]) > limit:
                    break
                chosen.append(i)
                total += len(batches[i])
            seqs = np.concatenate([batches[i] for i in chosen])
            groups = np.repeat(np.arange(len(chosen)), [len(batches[i]) for i in chosen])
        else:
            m = max(min(s.n, limit) // s.R, 1) * s.R
            seqs, groups = rng.choice(s.n, m, replace=False), np.zeros(m, dtype=np.int64)
        o = np.argsort(seqs, kind="stable")
        return cls(seqs[o], groups[o], np.asarray(ids[seqs[o]]))

    def capacity(self, partitions: int, rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(groups, capacity) of the sequences ``rows`` (default all): each partition's share of each group."""
        groups = self.groups if rows is None else self.groups[rows]
        return groups, np.bincount(groups, minlength=int(self.groups.max()) + 1) // partitions


def refine_limit(slots_per_sequence: int) -> int:
    """The most sequences the refinement samples: ``REFINE_SAMPLE``, fewer where they would hold more
    than ``REFINE_SLOTS`` token-slots (long sequences, many heads)."""
    return max(1, min(REFINE_SAMPLE, REFINE_SLOTS // max(slots_per_sequence, 1)))


def _refine(ids: np.ndarray, part: np.ndarray, s: _Setup, refine: int, batches: list[np.ndarray],
            load: np.ndarray) -> tuple[np.ndarray, _Sample, dict]:
    """:func:`refine_grouping` of the partitions on a :class:`_Sample`; returns the grouping, the
    sample (with the partition of each sequence) and the record."""
    sample = _Sample.draw(ids, s, batches)
    groups, capacity = sample.capacity(s.N)
    part, sample.rows, trace = refine_grouping(sample.ids, part, s.N, groups, capacity, refine, n_experts=s.E,
                                               load=load if s.tol is not None else None,
                                               cap=s.load_cap(load, s.N))
    tokens = len(sample.seqs) * s.L
    return part, sample, {"objective": "node" if s.level == "node" else "deepep", "sample": int(len(sample.seqs)),
                          "groups": int(groups.max()) + 1, "steps": len(trace),
                          "cost_per_token": [round(t / tokens, 6) for t in trace]}


def _split_nodes(ids: np.ndarray, cl: dict, part: np.ndarray, s: _Setup, refine: int, sample: _Sample | None,
                 load: np.ndarray) -> tuple[np.ndarray, dict, list[list[float]]]:
    """Node level: each node's experts over its G ranks (load-capped per rank), refined on the node's
    sample sequences (DeepEP copies inside the node). Returns (rank of each logical expert, how many
    nodes split each way, each refined node's cost per token after each kept step)."""
    G = s.G
    rank_of_expert = np.empty(s.E, dtype=np.int64)
    how, traces = [], []
    cap = s.load_cap(load, s.R)
    for node in range(s.N):
        experts = np.flatnonzero(part == node)
        inner, method = _initial_node_split(cl, node, experts, G, load if s.tol is not None else None, cap)
        mine = None if sample is None else np.flatnonzero(sample.rows == node)
        if refine and mine is not None and len(mine) >= G:  # the node's sample sequences over its G ranks
            groups, capacity = sample.capacity(G, mine)
            inner, _, trace = refine_grouping(sample.ids[mine], inner, G, groups, capacity, refine, experts=experts,
                                              n_experts=s.E, load=load if s.tol is not None else None, cap=cap)
            method = "refined"
            traces.append([t / (len(mine) * s.L) for t in trace])
        how.append(method)
        rank_of_expert[experts] = node * G + inner
    return rank_of_expert, {m: how.count(m) for m in ("hungarian", "balanced", "refined")}, traces


def _initial_node_split(cl: dict, node: int, experts: np.ndarray, G: int, load: np.ndarray | None,
                        cap: float | None) -> tuple[np.ndarray, str]:
    """Rank within the node of each of its ``experts``: :func:`group_experts` on the node's k-means
    centroids merged to G ("hungarian"), or on load alone when it has fewer than G clusters ("balanced")."""
    members = np.flatnonzero(cl["partition_of_cluster"] == node)
    if len(members) < G:
        return group_experts(np.zeros((G, cl["centers"].shape[1])), experts, load, cap), "balanced"
    centers = cl["centers"][members]
    centroids = _weighted_centroids(centers, cl["sizes"][members], _merge(centers, G), G)
    return group_experts(centroids, experts, load, cap), "hungarian"


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
    return rank, _deal_queues(placed, rank, s, tr)


def _deal_queues(placed: np.ndarray, rank: np.ndarray, s: _Setup, tr: Traffic) -> list[list[np.ndarray]]:
    """Epoch scope: each rank's queue dealt ``global_batch / R`` per batch so that every batch gets
    the rank's sequences of every kind alike: the queue, sorted by the rank that most of a
    sequence's other token-slots go to, then by the token-slots it brings to the rank's own experts
    (ties in shuffled order), is cut into blocks of one sequence per batch, and each block is dealt
    to the batches in a seeded random order. Every batch so takes one sequence of each stratum of
    each rank: its expert load per rank is close to the mean (figures: docs/steptime.md). Ranks with
    shorter queues (``greedy``) get empty batches at the end."""
    per = s.gb // s.R
    rng = np.random.default_rng([s.seed, 2])
    pos = np.empty(s.n, dtype=np.int64)
    pos[placed] = np.arange(len(placed))
    queues = [placed[rank[placed] == r] for r in range(s.R)]  # in shuffled order
    nb = max(-(-len(q) // per) for q in queues)
    samples = []
    for r, q in enumerate(queues):
        x = tr.slots[q].astype(np.int64)
        own = x[:, r].copy()
        x[:, r] = -1
        q = q[np.lexsort((-own, x.argmax(1)))]  # by the rank most of the spill goes to, then by own load
        sizes = np.full(-(-len(q) // per), per)
        if len(q):
            sizes[-1] = len(q) - per * (len(sizes) - 1)
        batch_of = np.concatenate([rng.permutation(np.flatnonzero(sizes > j)) for j in range(per)])
        o = np.lexsort((pos[q], batch_of))  # by batch, then shuffled order
        cuts = np.cumsum(sizes)[:-1]
        samples.append(np.split(q[o], cuts) + [np.zeros(0, np.int64)] * (nb - len(sizes)))
    return samples


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


# -- planning, step 6: the step-time objective --------------------------------------------------
@dataclass
class _Candidate:
    """A whole placement: the experts (their traffic over the union of the layers, and per layer
    routing), each batch's ranks, and the predicted step time per batch (seconds)."""

    name: str
    rank_of_expert: np.ndarray
    tr: Traffic
    layers: list
    placement: Placement
    lt: LayerTraffic  # what each rank sends per batch and layer routing
    step: np.ndarray  # predicted seconds per batch
    trace: list | None = None  # the step-time stage: mean step (s) after the start and each round


def _layer_shares(ids) -> tuple[list[int], np.ndarray]:
    """The distinct heads the planned layers route by and the share of the model's MoE layers each
    takes (the profile's ``moe_layers`` spread evenly over the planned layers); one routing: ``[0], [1]``."""
    if not isinstance(ids, LayerUnion):
        return [0], np.ones(1)
    heads, counts = np.unique(ids.layer_heads, return_counts=True)
    return heads.tolist(), counts / counts.sum()


class _StepTime:
    """Step 6, with a hardware profile: candidates for the whole placement, each predicted under
    :mod:`grouter.hardware` (per layer routing, the chosen dispatcher, not overlapped):

    - ``bytes``: the plan of steps 1-5 (the least copies);
    - ``steptime``: its batches re-placed by :meth:`stage`, which trades copies for the balance of
      what each rank computes, sends and receives;
    - ``steptime, default experts``: the same stage from random placement (expert e on rank
      e // (E/R), the engines' default), for routings whose expert grouping costs more than it saves;
    - ``random``: random placement itself.

    The ``steptime`` objective keeps the one of least mean step time (``bytes``: the bytes plan), so
    the plan is never predicted slower than random placement; the report lists every candidate."""

    def __init__(self, ids, s: _Setup, o: Options, profile: HardwareProfile):
        self.ids, self.s, self.o, self.profile, self.dispatcher = ids, s, o, profile, o.dispatcher
        self.objective = o.objective or ("steptime" if o.algorithm == "balanced" else "bytes")
        self.heads, self.shares = _layer_shares(ids)
        self.traffic: dict = {}

    def layers(self, rank_of_expert: np.ndarray, union: Traffic | None, ids=None) -> list:
        """The traffic of each layer routing for an expert placement (one routing: the union's own)."""
        ids = self.ids if ids is None else ids
        if not isinstance(ids, LayerUnion):
            return [union if union is not None else traffic(ids, rank_of_expert, self.s.R, self.s.G)]
        heads, _ = _layer_shares(ids)
        return [traffic(ids.ids[:, :, h], rank_of_expert, self.s.R, self.s.G) for h in heads]

    def lt(self, layers: list, pl: Placement, shares: np.ndarray | None = None) -> LayerTraffic:
        return layer_traffic(layers, self.shares if shares is None else shares, pl, self.s.seq_len)

    def times(self, lt: LayerTraffic) -> np.ndarray:
        return step_times(lt, self.profile, self.dispatcher)["step"]

    def candidate(self, name: str, rank_of_expert: np.ndarray, union: Traffic, layers: list, pl: Placement) -> _Candidate:
        lt = self.lt(layers, pl)
        return _Candidate(name, rank_of_expert, union, layers, pl, lt, self.times(lt))

    def choose(self, rank_of_expert: np.ndarray, tr: Traffic, samples, base: Traffic, base_samples):
        """The chosen candidate's (rank of each expert, union traffic, placement)."""
        contiguous = np.arange(self.s.E) // (self.s.E // self.s.R)
        cands = []
        for name, experts, union, smp in (("bytes", rank_of_expert, tr, samples),
                                          ("random", contiguous, base, base_samples)):
            cands.append(self.candidate(name, experts, union, self.layers(experts, union), Placement.of(smp)))
        if self.objective == "steptime":
            cands[1:1] = [self.stage(cands[0], "steptime"), self.stage(cands[1], "steptime, default experts")]
        self.candidates, self.random = cands, cands[-1]
        self.chosen = cands[0] if self.objective == "bytes" else min(cands, key=lambda c: c.step.mean())
        c = self.chosen
        return c.rank_of_expert, c.tr, c.placement

    def stage(self, start: _Candidate, name: str) -> _Candidate:
        """Re-place every batch's members (equal shares per rank) under copy prices from the ranks'
        predicted times (:func:`grouter.steptime.placement_costs`), up to ``steptime_rounds`` times
        with ever sharper prices averaged over the rounds; each batch keeps the placement of least
        predicted time seen (the start's included), so no batch gets slower. The prices are linear
        estimates, so each round places by the plain regret greedy (with dual prices the stage took
        10x the CPU for predicted step times within 0.3 % either way on synthetic routings,
        docs/steptime.md); the rounds stop early after
        ``STAGE_PATIENCE`` round(s) that take the mean step time down by less than ``STAGE_GAIN``."""
        p, d = self.profile, self.dispatcher
        best, best_lt, best_t, cur, lt, acc = start.placement, start.lt, start.step, start.placement, start.lt, None
        trace, idle = [float(best_t.mean())], 0
        for i in range(self.o.steptime_rounds):
            w = [rank_weights(st, p, d, FIRST_SHARPNESS * 2 ** i) for st in lt.layers]
            acc = w if acc is None else [a + x for a, x in zip(acc, w)]
            cost = placement_costs(start.layers, lt, [a / (i + 1) for a in acc], cur, p, d)
            cur = cur.with_rank(balanced_assignment(cost, cur.groups, cur.capacity(), price_steps=0))
            lt = self.lt(start.layers, cur)
            t = self.times(lt)
            better = t < best_t
            best, best_lt = best.with_rank(np.where(better[cur.groups], cur.rank, best.rank)), best_lt.where(better, lt)
            best_t = np.minimum(best_t, t)
            trace.append(float(best_t.mean()))
            idle = idle + 1 if trace[-1] > trace[-2] * (1 - STAGE_GAIN) else 0
            if idle >= STAGE_PATIENCE:
                break
        return _Candidate(name, start.rank_of_expert, start.tr, start.layers, best, best_lt, best_t, trace)

    def report(self, counts: np.ndarray, compare) -> dict:
        """``step_time`` (plan, random and, with ``compare``, a learned router's routing placed the
        engine's default way), ``objective`` (every candidate) and ``redundant_experts`` (the what-if)."""
        plan, random = self.chosen.lt, self.random.lt
        self.traffic = {"plan_layers": plan, "random_layers": random}
        stores = {} if compare is None else compare if isinstance(compare, dict) else {"compare": compare}
        others = {name: self.default_placement(store) for name, store in stores.items()}
        self.traffic.update({f"{name}_layers": lt for name, lt in others.items()})
        out = {"step_time": predict(plan, random, self.profile, others), "objective": self.record()}
        out["step_time"]["routings"] = {name: {"routing": str(getattr(store, "path", name)), "heads": None if getattr(
            store, "heads", None) is None else list(store.heads.layers)} for name, store in stores.items()}
        if self.o.redundant_experts:
            out["redundant_experts"] = self.replicas(counts)
        return out

    def record(self) -> dict:
        rand = self.random.step.mean()
        rows = [{"name": c.name, "step_ms": float(c.step.mean() * 1e3), "speedup_over_random": float(rand / c.step.mean()),
                 "worst_batch_ms": float(c.step.max() * 1e3),
                 "deepep_copies": int(c.tr.at("deepep", c.placement.rank, c.placement.members).sum()),
                 **({"rounds_step_ms": [round(x * 1e3, 4) for x in c.trace]} if c.trace else {})}
                for c in self.candidates]
        return {"objective": self.objective, "dispatcher": self.dispatcher, "chosen": self.chosen.name,
                "candidates": rows}

    def default_placement(self, store) -> LayerTraffic:
        """Another routing of the same data (a learned router's) placed the engine's default way: expert e
        on rank e // (E/R), each global batch (the same seeded shuffle) dealt to the ranks in order."""
        s = self.s
        if int(store.n_experts) != s.E:
            raise GrouterError(f"--compare-routing has {store.n_experts} experts and the plan {s.E}: compare a "
                               "routing of the same model")
        ids, seq_len, _ = _layer_union(store, self.o.split, None)
        n = min(len(ids), s.n)
        if n < s.R:
            raise GrouterError(f"--compare-routing has only {n} sequences for {s.R} ranks; route the same data")
        batches, _ = _batches(n, s.gb, s.R, np.random.default_rng(self.o.seed))
        pl = Placement.of(_random_baseline(batches, replace(s, n=n))[1])
        layers = self.layers(np.arange(s.E) // (s.E // s.R), None, ids[:n])
        return layer_traffic(layers, _layer_shares(ids)[1], pl, seq_len)

    def replicas(self, counts: np.ndarray) -> dict:
        """The what-if of ``redundant_experts`` replicas (:func:`grouter.steptime.replicate_experts`) on the
        chosen plan and on random placement, each with its own samples."""
        o, s = self.o, self.s
        load = counts.sum(0, dtype=np.int64)
        raw = [self.ids] if not isinstance(self.ids, LayerUnion) else [self.ids.ids[:, :, h] for h in self.heads]
        rand = self.random.step.mean()
        out = {"extra": o.redundant_experts, "per_rank": o.redundant_experts // s.R}
        for who, c in (("plan", self.chosen), ("random", self.random)):
            rep = replicate_experts(load, c.rank_of_expert, s.R, o.redundant_experts)
            layers = [traffic(ReplicatedIds(x, rep), rep["rank_of_physical"], s.R, s.G) for x in raw]
            t = self.times(self.lt(layers, c.placement))
            out[who] = {"copies": rep["copies"].tolist(), "step_ms": float(t.mean() * 1e3),
                        "speedup_over_random": float(rand / t.mean()),
                        "rank_of_physical": rep["rank_of_physical"].tolist()}
        return out


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


def step_traffic(tr: Traffic, samples: list[list[np.ndarray]], seq_len: int) -> StepTraffic:
    """What each rank's sequences of each global batch send (:class:`~grouter.hardware.StepTraffic`):
    ``tr``'s per-sequence counts summed over ``samples[r][b]``."""
    return step_traffic_of(tr, Placement.of(samples), seq_len)


def _loads(st: StepTraffic, seq_len: int) -> dict:
    """Per global batch: token-slots each rank's experts compute, DeepEP copies each rank receives and
    sends, and sequences each data-parallel rank trains (max / mean over ranks; per batch over the
    full batches, the short last one left out); totals per rank."""
    full = st.seq_tokens.sum(1) == st.seq_tokens.sum(1).max()
    return {"expert_load_max_over_mean": _imbalance(st.compute_slots(), full),
            "received_tokens_max_over_mean": _imbalance(st.received(), full),
            "sent_tokens_max_over_mean": _imbalance(st.sent(), full),
            "sequences_max_over_mean": _imbalance(st.seq_tokens, full),
            "expert_slots_per_rank": st.compute_slots().sum(0).tolist(),
            "received_tokens_per_rank": st.received().sum(0).tolist(),
            "sequences_per_rank": (st.seq_tokens.sum(0) // seq_len).tolist()}


def _loads_report(step: dict[str, StepTraffic], s: _Setup) -> dict:
    """The report's ``load`` (plan and random)."""
    return {"load": {who: _loads(st, s.seq_len) for who, st in step.items()}}


def _bound_report(tr: Traffic, rank: np.ndarray, batches: list[np.ndarray], s: _Setup, lp_bound: bool | None,
                  cost_models: dict) -> dict:
    """The balanced-LP bound of the optimised cost model (:func:`balanced_bound`) next to the plan and
    the capacity-free bound; ``lp_bound`` None: only when cheap (exact per batch: sum of batch sizes^3 <=
    2e10; Lagrangian: at most 1e8 sequence-partition pairs)."""
    model = "node" if s.level == "node" else "deepep"
    placed = _members(batches)
    P = s.N
    if s.scope == "batch":
        groups = np.repeat(np.arange(len(batches)), [len(b) for b in batches])
        capacity = np.array([len(b) // P for b in batches], dtype=np.int64)
    else:
        groups, capacity = np.zeros(len(placed), np.int64), np.array([len(placed) // P])
    sizes = np.bincount(groups)
    cheap = (sizes ** 3).sum() <= 2e10 if sizes.max() <= BOUND_GROUP_ROWS else len(placed) * P <= 1e8
    c = cost_models[model]
    out = {"model": model, "plan": c["plan"], "capacity_free_bound": c["lower_bound"], "balanced_bound": None,
           "method": "not computed (lp_bound=False, or too costly: pass lp_bound=True)"}
    if lp_bound or (lp_bound is None and cheap):
        cost = tr.node_cost(placed) if model == "node" else tr.cost("deepep", placed)
        out["balanced_bound"], out["method"] = balanced_bound(cost, groups, capacity)
    free, bal = out["capacity_free_bound"], out["balanced_bound"]
    out["plan_over_capacity_free_bound"] = c["plan"] / free if free else None
    out["plan_over_balanced_bound"] = c["plan"] / bal if bal else None
    return out


def _imbalance(load: np.ndarray, batches: np.ndarray) -> dict[str, float]:
    """Max / mean over ranks of ``load`` ``[batches, R]``: summed over all batches, and per batch (mean,
    worst) over ``batches`` (a mask)."""
    ratio = lambda x: x.max(-1) / np.maximum(x.mean(-1), 1e-12)  # noqa: E731
    per_batch = ratio(load[batches])
    return {"overall": float(ratio(load.sum(0))), "per_batch_mean": float(per_batch.mean()),
            "per_batch_worst": float(per_batch.max())}


def _report_header(s: _Setup, n_batches: int, placed: np.ndarray, dropped: np.ndarray) -> dict:
    """The report's sizes and options."""
    return {"n_experts": s.E, "k": s.k, "ranks": s.R, "ranks_per_node": s.G,
            "nodes": s.R // s.G if s.G else None, "level": s.level, "partitions": s.N,
            "algorithm": s.algorithm, "scope": s.scope, "exact": bool(s.exact),
            "optimises": "node" if s.level == "node" else "deepep", "global_batch": s.gb,
            "n_batches": n_batches, "seq_len": s.seq_len, "sequences": s.n, "sequences_placed": int(len(placed)),
            "sequences_dropped": int(len(dropped)), "tokens_placed": int(len(placed) * s.seq_len),
            "load_tolerance": s.tol, **({"per_layer_routing": s.layers} if s.layers else {})}


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
    if getattr(store, "kind", None) == "stream":  # docs/method.md#routing-streams-for-megatron-indexed-datasets
        source.update(kind="stream", seq_len=store.seq_len, samples="documents shuffled with the seed, concatenated "
                      "and cut every seq_len tokens, as GPTDataset makes samples; Megatron's own samples differ, so "
                      "only the expert placement applies to them")
    return source


# -- artifacts ---------------------------------------------------------------------------------
def report_markdown(report: dict) -> str:
    """``report.md``: the plan's options, the remote volumes, the loads and how the steps went."""
    lines = (_md_summary(report) + _md_volumes(report) + _md_bound(report) + _md_loads(report)
             + _md_step_time(report) + _md_steps(report))
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
            "floor: what no expert or sample placement avoids", *_md_layers(r.get("per_layer_routing")), ""]


def _md_layers(layers: dict | None) -> list[str]:
    if not layers:
        return []
    which = (f"the {layers['target_layers']} target layers (heads {layers['layer_heads']})" if layers["target_layers"]
             else "every head once")
    return [f"- per-layer routing (heads of source layers {layers['head_layers']}): planned over the union of "
            f"{which}; volumes per (token, layer), loads summed over the layers"]


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


def _md_bound(r: dict) -> list[str]:
    b = r["balanced_bound"]
    fmt = lambda x: "n/a" if x is None else f"{x:.4f}"  # noqa: E731
    return ["", f"Optimised model **{b['model']}**: plan {b['plan']:,} = {fmt(b['plan_over_capacity_free_bound'])} x "
                f"the capacity-free bound ({b['capacity_free_bound']:,}) and {fmt(b['plan_over_balanced_bound'])} x "
                f"the balanced-LP bound ({'n/a' if b['balanced_bound'] is None else format(b['balanced_bound'], ',')}: "
                f"no placement with these experts and equal sequences per rank sends less; {b['method']})."]


def _md_loads(r: dict) -> list[str]:
    lines = ["", "| load (max / mean over ranks) | plan overall | plan per batch (mean, worst) | random overall | "
             "random per batch (mean, worst) |", "|---|---:|---:|---:|---:|"]
    for key, label in (("expert_load_max_over_mean", "token-slots at each rank's experts (compute)"),
                       ("received_tokens_max_over_mean", "DeepEP copies each rank receives"),
                       ("sent_tokens_max_over_mean", "DeepEP copies each rank sends"),
                       ("sequences_max_over_mean", "sequences per data-parallel rank")):
        p, q = r["load"]["plan"][key], r["load"]["random"][key]
        lines.append(f"| {label} | {p['overall']:.3f} | {p['per_batch_mean']:.3f}, {p['per_batch_worst']:.3f} | "
                     f"{q['overall']:.3f} | {q['per_batch_mean']:.3f}, {q['per_batch_worst']:.3f} |")
    return lines + ["", "Per batch: over the full global batches (a short last batch is left out)."
                    + (f" Load tolerance: every rank's experts take at most {1 + r['load_tolerance']:.2f} x the mean "
                       "token-slots of the split." if r.get("load_tolerance") is not None else "")]


def _md_step_time(r: dict) -> list[str]:
    if "step_time" not in r:
        return []
    t = r["step_time"]
    p = t["profile"]
    versus = list(t.get("routings", {}))
    lines = ["", f"## Predicted step time: {p['name']} ({t['ranks']} ranks, {t['nodes']} node(s) of "
                 f"{p['ranks_per_node']}; hidden {p['hidden']}, expert FFN {p['ffn']}, {p['moe_layers']} MoE layers)", "",
             "| dispatcher | step plan (ms) | step random (ms) | speedup | overlapped speedup | all-to-all plan (ms) | "
             "all-to-all random (ms) | all-to-all speedup | expert compute plan / random (ms) |"
             + "".join(f" step {who}, default placement (ms) | speedup over it |" for who in versus),
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|" + "---:|---:|" * len(versus)]
    for d, v in t["dispatchers"].items():
        a, b = v["plan_ms"], v["random_ms"]
        extra = "".join(f" {v['versus'][who]['ms']['step']:.3f} | {v['versus'][who]['speedup']:.3f} |" for who in versus)
        lines.append(f"| {d} | {a['step']:.3f} | {b['step']:.3f} | {v['speedup']:.3f} | {v['speedup_overlapped']:.3f} | "
                     f"{a['all_to_all']:.3f} | {b['all_to_all']:.3f} | {v['all_to_all_speedup']:.3f} | "
                     f"{a['expert_compute']:.3f} / {b['expert_compute']:.3f} |" + extra)
    lines += ["", "Mean per step (one global batch). Assumptions: " + "; ".join(t["assumptions"]) + "."]
    for who in versus:
        lines += ["", f"`{who}`: the routing store {t['routings'][who]['routing']} (a learned router's, each layer its "
                      "own routing), placed the engines' default way (expert e on rank e // (E/R), each batch dealt "
                      "in order): the baseline of the paper's throughput gains."]
    return lines + _md_objective(r) + _md_replicas(r)


def _md_objective(r: dict) -> list[str]:
    ob = r["objective"]
    lines = ["", f"Objective **{ob['objective']}** ({ob['dispatcher']}, not overlapped): candidates, the chosen one "
                 f"(**{ob['chosen']}**) has the least predicted mean step time"
                 + (" (random placement is one of them: the plan is never predicted slower)."
                    if ob["objective"] == "steptime" else "."), "",
             "| candidate | mean step (ms) | worst batch (ms) | speedup over random | DeepEP copies |", "|---|---:|---:|---:|---:|"]
    for c in ob["candidates"]:
        mark = "**" if c["name"] == ob["chosen"] else ""
        lines.append(f"| {mark}{c['name']}{mark} | {c['step_ms']:.4f} | {c['worst_batch_ms']:.4f} | "
                     f"{c['speedup_over_random']:.4f} | {c['deepep_copies']:,} |")
    return lines


def _md_replicas(r: dict) -> list[str]:
    if "redundant_experts" not in r:
        return []
    x = r["redundant_experts"]
    return ["", f"What-if, {x['extra']} redundant experts ({x['per_rank']} per rank; replicas of the hottest experts, "
                "EPLB-style, each copy taking an equal share of its expert's token-slots): predicted speedup over "
                f"random placement without replicas: plan {x['plan']['speedup_over_random']:.3f}, random placement "
                f"{x['random']['speedup_over_random']:.3f} ({r['objective']['dispatcher']}). "
                "No training engine grouter adapts replicates experts; see docs/steptime.md."]


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
             f"Refinement of the grouping to a balanced placement of {rf['sample']} sequences ({rf['groups']} "
             f"group(s)): {rf['steps']} kept steps, {rf['objective']} copies per token "
             f"{rf['cost_per_token'][0]:.4f} -> {rf['cost_per_token'][-1]:.4f}"
             + (" (inside the nodes: {:.4f} -> {:.4f})".format(*rf["inner_cost_per_token"])
                if "inner_cost_per_token" in rf else "") + "."),
            "", "Timings (s): " + ", ".join(f"{k} {v}" for k, v in r["timings_s"].items()) + "."]


def plot_report(report: dict, path: Path) -> None:
    """Remote volume per cost model (random / plan / bound) and per-rank loads."""
    cm = report["cost_models"]
    fig, axes = figure((15, 4), 1, 3)
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


@dataclass
class Inputs:
    routing: Path = path_input("a routing store (grouter dispatch), or a routing stream (dispatch --megatron-data)")
    compare_routing: Path | None = path_input("with --hardware: a learned router's routing store of the same data "
                                              "(docs/steptime.md), whose step time under the engine's default "
                                              "placement the report sets beside the plan's", required=False)


def open_routing(path: Path, o: Options):
    """A routing store, or a routing stream read as GPTDataset-like samples of ``--seq-len`` tokens."""
    if (Path(path) / "stream.json").is_file():
        if o.seq_len is None:
            raise GrouterError("a routing stream is planned on samples of Megatron's --seq-length: pass --seq-len")
        return StreamPlanning(RoutingStream.open(path), o.seq_len, o.seed)
    if o.seq_len is not None:
        raise GrouterError("--seq-len is for routing streams: a routing store's sequences have their length")
    return RoutingStore.open(path, verify=o.verify)


def run(inputs: Inputs, o: Options, out: Output) -> dict:
    """Plan placement from the routing store and write ``out`` (plan.json, report.json, .md, .png).

    Returns a summary: paths, level, algorithm, the optimised cost model, each model's plan / random
    ratio, the bounds, load imbalance, with ``hardware`` the predicted step times and speedups, and
    seconds.
    """
    t0 = time.perf_counter()
    store = open_routing(inputs.routing, o)  # the manifest only: a bad profile is refused next
    compare = None if inputs.compare_routing is None else RoutingStore.open(inputs.compare_routing, verify=o.verify)
    plan = plan_placement(store, o, compare)
    if o.verify and isinstance(store, RoutingStore):  # bound to the whole store: the splits it did not read too
        for split in set(store.manifest["splits"]) - {o.split}:
            store.verify(split)
    with out.atomic() as tmp:
        plan.save(tmp)
        write_json(tmp / "report.json", plan.report)
        (tmp / "report.md").write_text(report_markdown(plan.report))
        plot_report(plan.report, tmp / "report.png")
    return {"plan": str(out.path / "plan.json"), "report": str(out.path / "report.md"), "out": str(out.path),
            **summarize(plan.report), "seconds": round(time.perf_counter() - t0, 3)}


place = Stage("place", run, Inputs, Options)


def summarize(r: dict) -> dict:
    """The figures of a placement report that :func:`place` returns (and ``grouter place --json`` prints)."""
    load, bound = r["load"]["plan"], r["balanced_bound"]
    out = {"level": r["level"], "algorithm": r["algorithm"], "scope": r["scope"], "optimises": r["optimises"],
           "ranks": r["ranks"], "ranks_per_node": r["ranks_per_node"], "global_batch": r["global_batch"],
           "sequences_placed": r["sequences_placed"], "sequences_dropped": r["sequences_dropped"],
           "plan_over_random": {m: c["plan_over_random"] for m, c in r["cost_models"].items()},
           "bound_over_random": {m: c["bound_over_random"] for m, c in r["cost_models"].items()},
           "plan_over_capacity_free_bound": bound["plan_over_capacity_free_bound"],
           "plan_over_balanced_bound": bound["plan_over_balanced_bound"],
           "rank_load_max_over_mean": load["expert_load_max_over_mean"]["overall"],
           "expert_load_max_over_mean": load["expert_load_max_over_mean"]["per_batch_worst"],
           "received_tokens_max_over_mean": load["received_tokens_max_over_mean"]["per_batch_worst"],
           "sequences_max_over_mean": load["sequences_max_over_mean"]["per_batch_worst"],
           **({"per_layer_routing": r["per_layer_routing"]} if "per_layer_routing" in r else {})}
    if "step_time" in r:
        out["step_time"] = {"profile": r["step_time"]["profile"]["name"], **{
            d: {**{k: v[k] for k in ("speedup", "speedup_overlapped", "all_to_all_speedup")},
                **{f"speedup_over_{who}": x["speedup"] for who, x in v["versus"].items()}}
            for d, v in r["step_time"]["dispatchers"].items()}}
        out["objective"] = {k: r["objective"][k] for k in ("objective", "dispatcher", "chosen")}
    if "redundant_experts" in r:
        out["redundant_experts"] = {who: r["redundant_experts"][who]["speedup_over_random"] for who in ("plan", "random")}
    return out
