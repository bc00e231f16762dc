"""What a placement plan is worth in step time: hardware profiles and a step-time model of expert parallelism.

Bytes are not what users buy: an expert-parallel (EP) training step is as slow as its slowest rank,
in expert compute and in the all-to-alls, on the links of the cluster it runs on. Given, for every
global batch of a plan, what each rank's sequences send to each other rank (:class:`StepTraffic`,
built by :func:`grouter.place.step_traffic`), :func:`predict` gives the predicted step time and
all-to-all time of the plan and of the random baseline on a cluster described by a
:class:`HardwareProfile`, for each dispatcher, and the predicted speedup. :func:`ep_phase_bytes`
gives the bytes ``grouter ep`` (a flat all-to-all, :mod:`grouter.ep`) sends per rank and phase,
which real runs match exactly (tests/test_hardware.py). Figures: docs/steptime.md.

The model's assumptions (:data:`ASSUMPTIONS`, written next to every prediction):

1. Every MoE layer routes like the stored routing (grouter writes one routing into every layer), so
   a step is ``moe_layers`` identical layers. Each layer's all-to-alls synchronise the ranks, so a
   layer takes the maximum over ranks; one plan batch (``global_batch`` sequences) is one step.
2. Expert compute of rank r: the token-slots at r's experts x ``2 * 3 * hidden * ffn`` FLOPs
   (SwiGLU: three hidden x ffn matmuls, 2 FLOPs per multiply-add) x 3 (forward and backward),
   at ``flops`` sustained FLOP/s.
3. Four all-to-alls per layer: dispatch and combine forward, and their gradients backward. A copy
   costs ``hidden * dispatch_bytes`` in the forward dispatch and ``hidden * combine_bytes`` in the
   three others (gradients travel in BF16).
4. An all-to-all phase of rank r takes ``latency + bytes per copy * max(NVLink copies /
   nvlink_bandwidth, RDMA copies / rdma_bandwidth)``, where a link's copies are the larger of what
   r sends and receives on it (links are full duplex; NVLink and RDMA run in parallel). The
   latency is ``nvlink_latency`` on one node, ``rdma_latency`` across nodes.
5. ``deepep`` (DeepEP's normal kernels): one copy per (token, destination rank) inside a node;
   across nodes one copy per (token, destination node) over RDMA to the rank of the same local
   index, which forwards it over NVLink to the destination ranks. ``megatron`` (Megatron's
   all-to-all dispatcher): one copy per (token, expert) slot, sent directly (NVLink inside the
   node, RDMA across), at the same link bandwidths (optimistic for NCCL's all-to-all).
6. Not overlapped: a layer takes ``max_r (compute_r + comm_r)``; overlapped (a bound): ``max_r
   max(compute_r, comm_r)``. Dense (non-expert) compute, ``dense_flops_per_token`` per token, is
   the same on every rank (equal sequences per rank) and adds to every step, not overlapped.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np

from .artifacts import read_json
from .errors import GrouterError

DISPATCHERS = ("deepep", "megatron")
PHASES_PER_LAYER = 4  # dispatch, combine, and their gradients
FLOPS_PER_SLOT_FORWARD = 2 * 3  # x hidden x ffn: SwiGLU's three matmuls, 2 FLOPs per multiply-add
FORWARD_AND_BACKWARD = 3
ASSUMPTIONS = [
    "one plan batch (global_batch sequences) is one training step; every MoE layer routes like the stored "
    "routing, so a step is moe_layers identical layers, each as slow as its slowest rank",
    "expert compute: token-slots at the rank's experts x 2*3*hidden*ffn FLOPs (SwiGLU) x 3 (forward + backward) "
    "/ flops",
    "4 all-to-alls per layer (dispatch, combine, and their gradients); a copy is hidden x dispatch_bytes in the "
    "forward dispatch and hidden x combine_bytes in the three others",
    "an all-to-all phase of a rank: latency + bytes per copy x max(NVLink copies / nvlink_bandwidth, RDMA copies / "
    "rdma_bandwidth), copies on a link = max(sent, received) (full duplex, NVLink and RDMA in parallel)",
    "deepep: one copy per (token, rank) in the node; across nodes one per (token, node) over RDMA to the rank "
    "of the same local index, forwarded over NVLink; megatron: one copy per (token, expert), sent directly, "
    "same link bandwidths (optimistic for NCCL)",
    "not overlapped: layer = max over ranks of compute + all-to-all; overlapped (a bound): max of the two; dense "
    "compute (dense_flops_per_token) is equal on every rank and is added to every step",
]


# -- hardware profiles -----------------------------------------------------------------------------
@dataclass(frozen=True)
class HardwareProfile:
    """A GPU cluster and the MoE model run on it: what the step-time model needs.

    Bandwidths are what a dispatcher achieves per GPU and direction (bytes/s), not the links'
    nominal rates; ``flops`` is the sustained rate of the expert matmuls. ``nodes``: the cluster's
    node count (None: any, the plan's ``--ranks`` decide).
    """

    name: str
    ranks_per_node: int  # GPUs per node
    flops: float  # sustained FLOP/s per GPU on the expert matmuls
    nvlink_bandwidth: float  # bytes/s per GPU and direction inside a node
    rdma_bandwidth: float  # bytes/s per GPU and direction across nodes
    nvlink_latency: float  # seconds per all-to-all phase on one node
    rdma_latency: float  # seconds per all-to-all phase across nodes
    hidden: int  # model hidden size
    ffn: int  # expert intermediate size
    moe_layers: int
    nodes: int | None = None
    dispatch_bytes: float = 2.0  # bytes per hidden element in the forward dispatch (2: BF16; 1 + 4/128: FP8)
    combine_bytes: float = 2.0  # in the combine and in both gradients
    dense_flops_per_token: float = 0.0  # non-expert FLOPs per token and step (forward + backward, all layers)
    source: str = ""  # where the figures come from

    def __post_init__(self):
        for f in fields(self):
            if f.name not in ("name", "source"):
                _check_field(self.name, f.name, getattr(self, f.name))
                if f.name in _INTEGER_FIELDS and getattr(self, f.name) is not None:
                    object.__setattr__(self, f.name, int(getattr(self, f.name)))  # 8.0 -> 8

    @classmethod
    def from_dict(cls, d: dict, name: str = "custom") -> "HardwareProfile":
        """A profile from a JSON object; a one-line :class:`GrouterError` names a missing, unknown or bad field."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise GrouterError(f"hardware profile {name!r}: unknown field {unknown[0]!r}; the fields are "
                               f"{', '.join(sorted(known - {'name'}))}")
        for key in REQUIRED:
            if d.get(key) is None:
                raise GrouterError(f"hardware profile {name!r}: {key!r} is missing; add it: {FIELD_HELP[key]}")
        return cls(**{**d, "name": str(d.get("name", name))})

    def layout(self, ranks: int, ranks_per_node: int | None) -> int:
        """The ranks per node a plan for ``ranks`` ranks uses on this cluster (checked)."""
        G = self.ranks_per_node
        if ranks_per_node is not None and ranks_per_node != G:
            raise GrouterError(f"--ranks-per-node {ranks_per_node} contradicts hardware profile {self.name!r} "
                               f"({G} GPUs per node); drop --ranks-per-node")
        if self.nodes is not None and ranks != self.nodes * G:
            raise GrouterError(f"hardware profile {self.name!r} has {self.nodes} node(s) of {G} GPUs: use "
                               f"--ranks {self.nodes * G}")
        if ranks % G and ranks > G:
            raise GrouterError(f"{ranks} ranks do not fill nodes of {G} GPUs (profile {self.name!r}); use a "
                               f"multiple of {G}")
        return min(G, ranks)


FIELD_HELP = {
    "ranks_per_node": "GPUs per node, e.g. 8",
    "flops": "sustained FLOP/s per GPU on the expert matmuls, e.g. 5.5e14",
    "nvlink_bandwidth": "bytes/s per GPU and direction inside a node, e.g. 1.36e11",
    "rdma_bandwidth": "bytes/s per GPU and direction across nodes, e.g. 4.4e10",
    "nvlink_latency": "seconds per all-to-all phase inside a node, e.g. 2e-5",
    "rdma_latency": "seconds per all-to-all phase across nodes, e.g. 4e-5",
    "hidden": "the model's hidden size, e.g. 2048",
    "ffn": "the experts' intermediate size, e.g. 768",
    "moe_layers": "the number of MoE layers, e.g. 48",
    "nodes": "the number of nodes (null: any)",
    "dispatch_bytes": "bytes per element in the forward dispatch: 2 (BF16) or 1.03125 (FP8 with scales)",
    "combine_bytes": "bytes per element in the combine and the gradients, e.g. 2",
    "dense_flops_per_token": "non-expert FLOPs per token and step, forward + backward, e.g. 7.3e9 (0: none)",
}
REQUIRED = ("ranks_per_node", "flops", "nvlink_bandwidth", "rdma_bandwidth", "nvlink_latency", "rdma_latency",
            "hidden", "ffn", "moe_layers")
_INTEGER_FIELDS = ("ranks_per_node", "hidden", "ffn", "moe_layers", "nodes")


def _check_field(profile: str, key: str, value) -> None:
    """A field must be a finite number, positive (``dense_flops_per_token``: >= 0), an integer where it counts things."""
    if key == "nodes" and value is None:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value >= 0 if key == "dense_flops_per_token" else value > 0)
    if ok and key in _INTEGER_FIELDS:
        ok = float(value).is_integer()
    if not ok:
        kind = "a positive integer" if key in _INTEGER_FIELDS else "a finite number > 0" + (
            " (or 0)" if key == "dense_flops_per_token" else "")
        raise GrouterError(f"hardware profile {profile!r}: {key!r} must be {kind}, got {value!r}; "
                           f"{FIELD_HELP[key]}")


# DeepEP's published normal-kernel bandwidths (H800, CX7 400 Gb/s InfiniBand; github.com/deepseek-ai/DeepEP,
# docs/legacy.md "Normal kernels with NVLink and RDMA forwarding"): 153 / 158 GB/s over NVLink on one node (EP 8),
# 43, 58 and 51 GB/s over RDMA on 2, 4 and 8 nodes. Those are DeepEP's "logical" bandwidths (its test counts the
# copies to the rank's own rank and node too); the physical per-GPU bandwidths below reproduce them with this
# model on DeepEP's own benchmark routing (benchmarks/place_steptime.py --calibrate; docs/steptime.md).
H800_NVLINK, CX7_RDMA = 136e9, 44e9
# H100 / H20 NVLink 4 (450 GB/s per direction): DeepEP intranode measured 337 GB/s logical on H20 (DeepEP issue
# #16), i.e. about 295 GB/s physical at DeepEP's benchmark routing (7/8 of the copies leave the rank).
H100_NVLINK = 295e9
# Model sizes: Qwen3-30B-A3B (hidden 2048, 128 experts of FFN 768, top-8, 48 layers); dense FLOPs per token:
# 6 x the non-expert matmul parameters (attention projections 18.9M x 48 layers + LM head 2048 x 151,936),
# attention scores left out.
_MODEL = {"hidden": 2048, "ffn": 768, "moe_layers": 48, "dense_flops_per_token": 6 * (18.9e6 * 48 + 2048 * 151_936)}
# Sustained expert-matmul rate: an assumption (not measured here), 55 % of the 989 TFLOP/s dense BF16 peak.
_H_FLOPS = 5.5e14
_LATENCY = {"nvlink_latency": 20e-6, "rdma_latency": 40e-6}  # assumptions, per all-to-all phase


def _builtin(name: str, nodes: int, nvlink: float, source: str) -> HardwareProfile:
    return HardwareProfile(name=name, ranks_per_node=8, nodes=nodes, flops=_H_FLOPS, nvlink_bandwidth=nvlink,
                           rdma_bandwidth=CX7_RDMA, source=source, **_LATENCY, **_MODEL)


PROFILES = {p.name: p for p in [
    *(_builtin(f"h100x{8 * n}", n, H100_NVLINK, "H100 SXM nodes of 8 (NVLink 4), CX7 400 Gb/s RDMA per GPU")
      for n in (1, 2, 4)),
    *(_builtin(f"h800x{8 * n}", n, H800_NVLINK, "H800 nodes of 8, CX7 400 Gb/s RDMA per GPU (DeepEP's test bed)")
      for n in (1, 2, 4)),
]}


def load_profile(spec: str | Path | HardwareProfile) -> HardwareProfile:
    """A built-in profile by name (:data:`PROFILES`) or a JSON file holding one (fields: :class:`HardwareProfile`)."""
    if isinstance(spec, HardwareProfile):
        return spec
    if str(spec) in PROFILES:
        return PROFILES[str(spec)]
    path = Path(spec)
    if not path.is_file():
        raise GrouterError(f"unknown hardware profile {str(spec)!r}: use one of {', '.join(PROFILES)} or a JSON file "
                           f"with the fields {', '.join(REQUIRED)}")
    return HardwareProfile.from_dict(read_json(path, "hardware profile"), name=path.stem)


# -- the traffic of each step ----------------------------------------------------------------------
@dataclass
class StepTraffic:
    """What the sequences of each global batch send, by the rank that trains them.

    ``tokens[b, r, d]``: tokens of rank r's sequences in batch b with at least one expert on rank d
    (DeepEP's copies; ``d == r`` stays local); ``slots[b, r, d]``: their (token, expert) pairs with
    the expert on d; ``node_tokens[b, r, n]``: tokens with an expert on node n (None on one node);
    ``seq_tokens[b, r]``: the tokens rank r trains in batch b.
    """

    tokens: np.ndarray
    slots: np.ndarray
    node_tokens: np.ndarray | None
    seq_tokens: np.ndarray

    @property
    def ranks(self) -> int:
        return self.tokens.shape[1]

    def compute_slots(self) -> np.ndarray:
        """``[B, R]`` token-slots each rank's experts compute."""
        return self.slots.sum(1)

    def received(self) -> np.ndarray:
        """``[B, R]`` DeepEP copies (one per token and rank) each rank receives from the other ranks."""
        return _off_diagonal(self.tokens).sum(1)

    def sent(self) -> np.ndarray:
        """``[B, R]`` DeepEP copies each rank sends to the other ranks."""
        return _off_diagonal(self.tokens).sum(2)


def _off_diagonal(m: np.ndarray) -> np.ndarray:
    return m * ~np.eye(m.shape[-1], dtype=bool)


# -- copies per link ---------------------------------------------------------------------------------
LINKS = ("nvlink_sent", "nvlink_received", "rdma_sent", "rdma_received")


def link_loads(st: StepTraffic, ranks_per_node: int, dispatcher: str) -> dict[str, np.ndarray]:
    """``[B, R]`` copies each rank sends and receives over NVLink and over RDMA (:data:`LINKS`)."""
    if dispatcher == "deepep":
        return _deepep_links(st, ranks_per_node)
    if dispatcher == "megatron":
        return _direct_links(st.slots, ranks_per_node)
    raise GrouterError(f"unknown dispatcher {dispatcher!r}; use one of {', '.join(DISPATCHERS)}")


def link_copies(st: StepTraffic, ranks_per_node: int, dispatcher: str) -> tuple[np.ndarray, np.ndarray]:
    """``[B, R]`` copies each rank moves over NVLink and over RDMA (the larger of sent and received)."""
    x = link_loads(st, ranks_per_node, dispatcher)
    return np.maximum(x["nvlink_sent"], x["nvlink_received"]), np.maximum(x["rdma_sent"], x["rdma_received"])


def _topology(R: int, G: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Node and local index of each rank, and ``same[r, d]``: r and d share a node."""
    node, local = np.arange(R) // G, np.arange(R) % G
    return node, local, node[:, None] == node[None, :]


def _direct_links(m: np.ndarray, G: int) -> dict[str, np.ndarray]:
    """Copies ``m[b, r, d]`` sent straight from r to d: NVLink inside a node, RDMA across."""
    _, _, same = _topology(m.shape[1], G)
    nvl = _off_diagonal(m * same)
    rdma = m * ~same
    return dict(zip(LINKS, (nvl.sum(2), nvl.sum(1), rdma.sum(2), rdma.sum(1))))


def _deepep_links(st: StepTraffic, G: int) -> dict[str, np.ndarray]:
    """DeepEP's normal kernels: RDMA once per (token, remote node) to the rank of the sender's local
    index there, which forwards over NVLink; one NVLink copy per (token, rank) inside the node."""
    A = st.tokens.astype(np.int64)
    B, R, _ = A.shape
    if R <= G:  # one node
        return _direct_links(A, R)
    if st.node_tokens is None or st.node_tokens.shape[2] != R // G:
        raise GrouterError(f"the traffic has no per-node counts for nodes of {G} ranks: make the plan with "
                           f"--ranks-per-node {G} (or --hardware)")
    node, local, same = _topology(R, G)
    N = R // G
    inside = _off_diagonal(A * same)
    forwarded = A * (~same & (local[:, None] != local[None, :]))  # r -> d through rank node(d)*G + local(r)
    # rank q = (node n, local j) forwards what ranks of local index j send to the ranks of node n
    fwd_sent = forwarded.reshape(B, N, G, N, G).sum((1, 4)).transpose(0, 2, 1).reshape(B, R)
    Nn = st.node_tokens.astype(np.int64)  # [B, R, N]
    remote = node[:, None] != np.arange(N)[None, :]
    peer = (local[:, None] == local[None, :]) & ~same  # r sends over RDMA to q: same local index, other node
    return {"nvlink_sent": inside.sum(2) + fwd_sent, "nvlink_received": inside.sum(1) + forwarded.sum(1),
            "rdma_sent": (Nn * remote).sum(2), "rdma_received": np.einsum("brq,rq->bq", Nn[:, :, node], peer)}


# -- step times -----------------------------------------------------------------------------------------
@dataclass
class LayerTraffic:
    """Per-layer routing: each routing's :class:`StepTraffic` and the share of the model's MoE layers
    that route by it (the shares sum to 1). Each layer dispatches its own tokens in its own all-to-all,
    so a step is the sum over layers of each layer's slowest rank (:func:`step_times`)."""

    layers: list[StepTraffic]
    shares: np.ndarray

    @property
    def ranks(self) -> int:
        return self.layers[0].ranks

    def __len__(self) -> int:
        return len(self.layers[0].tokens)

    def where(self, take: np.ndarray, other: "LayerTraffic") -> "LayerTraffic":
        """Batch b from ``other`` where ``take[b]``, else from this one."""
        def pick(a, b):
            return None if a is None else np.where(take.reshape(-1, *[1] * (a.ndim - 1)), b, a)
        return LayerTraffic([StepTraffic(*(pick(getattr(a, f), getattr(b, f)) for f in (
            "tokens", "slots", "node_tokens", "seq_tokens"))) for a, b in zip(self.layers, other.layers)], self.shares)


def _as_layers(t: StepTraffic | LayerTraffic) -> LayerTraffic:
    return t if isinstance(t, LayerTraffic) else LayerTraffic([t], np.ones(1))


def rank_times(st: StepTraffic, profile: HardwareProfile, dispatcher: str) -> dict[str, np.ndarray]:
    """``[B, R]`` seconds of one MoE layer on each rank: ``compute`` (its experts) and ``comm`` (its four
    all-to-all phases)."""
    p = profile
    R = st.ranks
    G = min(p.ranks_per_node, R)
    nvl, rdma = link_copies(st, G, dispatcher)
    latency = p.nvlink_latency if R <= G else p.rdma_latency
    comm = PHASES_PER_LAYER * latency + copy_bytes(p) * np.maximum(nvl / p.nvlink_bandwidth, rdma / p.rdma_bandwidth)
    compute = st.compute_slots() * FLOPS_PER_SLOT_FORWARD * p.hidden * p.ffn * FORWARD_AND_BACKWARD / p.flops
    return {"compute": compute, "comm": comm}


def copy_bytes(p: HardwareProfile) -> float:
    """Bytes one copy moves in one layer: the forward dispatch, the combine and both gradients."""
    return p.hidden * (p.dispatch_bytes + (PHASES_PER_LAYER - 1) * p.combine_bytes)


def step_times(traffic: StepTraffic | LayerTraffic, profile: HardwareProfile, dispatcher: str) -> dict[str, np.ndarray]:
    """Per batch (seconds): ``step`` (not overlapped), ``step_overlapped``, ``all_to_all`` (the slowest
    rank's, all layers), ``expert_compute`` (the slowest rank's) and ``dense``. Per-layer routing
    (:class:`LayerTraffic`): each layer as slow as its own slowest rank, summed over the layers."""
    lt = _as_layers(traffic)
    L = profile.moe_layers
    first = lt.layers[0]
    dense = first.seq_tokens.max(1) * profile.dense_flops_per_token / profile.flops
    out = {key: np.zeros(len(first.tokens)) for key in ("step", "step_overlapped", "all_to_all", "expert_compute")}
    for st, share in zip(lt.layers, lt.shares):
        t = rank_times(st, profile, dispatcher)
        compute, comm = t["compute"], t["comm"]
        out["step"] += L * share * (compute + comm).max(1)
        out["step_overlapped"] += L * share * np.maximum(compute, comm).max(1)
        out["all_to_all"] += L * share * comm.max(1)
        out["expert_compute"] += L * share * compute.max(1)
    out["step"] += dense
    out["step_overlapped"] += dense
    return {**out, "dense": dense}


def predict(plan: StepTraffic | LayerTraffic, random: StepTraffic | LayerTraffic, profile: HardwareProfile,
            others: dict | None = None) -> dict:
    """Predicted mean step and all-to-all times (ms) of the plan and the random baseline per
    dispatcher, the predicted speedups (random time / plan time) and the assumptions; ``others``
    (name -> traffic, e.g. a learned router's routing placed the engine's default way): each one's
    times and the plan's speedup over it."""
    out = {"profile": asdict(profile), "assumptions": ASSUMPTIONS, "batches": int(len(_as_layers(plan))),
           "ranks": plan.ranks, "nodes": max(1, plan.ranks // profile.ranks_per_node), "dispatchers": {}}
    for d in DISPATCHERS:
        t = {who: {k: float(v.mean() * 1e3) for k, v in step_times(st, profile, d).items()}
             for who, st in (("plan", plan), ("random", random), *(others or {}).items())}
        ratio = lambda who, key: t[who][key] / t["plan"][key] if t["plan"][key] > 0 else None  # noqa: E731
        out["dispatchers"][d] = {"plan_ms": t["plan"], "random_ms": t["random"], "speedup": ratio("random", "step"),
                                 "speedup_overlapped": ratio("random", "step_overlapped"),
                                 "all_to_all_speedup": ratio("random", "all_to_all"),
                                 "versus": {who: {"ms": t[who], "speedup": ratio(who, "step"),
                                                  "speedup_overlapped": ratio(who, "step_overlapped")}
                                            for who in (others or {})}}
    return out


# -- the step time, linearised: what each copy costs the ranks it loads -----------------------------------
def copy_prices(st: StepTraffic, profile: HardwareProfile, dispatcher: str, weight: np.ndarray,
                floor: float) -> tuple[np.ndarray, np.ndarray | None]:
    """``(M1 [B, R, R], M2 [B, R, N] or None)``: the seconds a copy costs, priced by how much each rank's
    time counts (``weight [B, R]``: e.g. a softmax of the ranks' times, high on the slowest), so that a
    sequence of batch b placed on rank r costs ``tokens_s @ M1[b, r] + node_tokens_s @ M2[b, r]``
    (``slots_s`` for ``megatron``), the gradient of ``Σ_r weight[b, r] x time_r`` for that placement.
    A copy is charged on the link direction that binds each rank it uses (sent or received, NVLink or
    RDMA, by the model's paths: DeepEP's forwarding included); ``floor`` (a share of the mean weight)
    prices every link a little, so that copies the bottleneck does not see are still avoided."""
    p = profile
    B, R, _ = st.tokens.shape
    G = min(p.ranks_per_node, R)
    loads = link_loads(st, G, dispatcher)
    seconds = {k: copy_bytes(p) / (p.nvlink_bandwidth if k.startswith("nvlink") else p.rdma_bandwidth)
               for k in LINKS}
    busy = np.stack([loads[k] * seconds[k] for k in LINKS])  # [4, B, R] seconds on each link direction
    binds = np.exp(10 * (busy / np.maximum(busy.max(0, keepdims=True), 1e-30) - 1))  # ~1 where it binds
    price = {k: seconds[k] * (weight * binds[i] + floor * weight.mean(1, keepdims=True)) for i, k in enumerate(LINKS)}
    node, local, same = _topology(R, G)
    send_n, recv_n = price["nvlink_sent"][:, :, None], price["nvlink_received"][:, None, :]
    if dispatcher == "megatron" or R <= G:
        direct = np.where(same, send_n + recv_n, price["rdma_sent"][:, :, None] + price["rdma_received"][:, None, :])
        return _off_diagonal(direct), None
    # inside the node: r -> d over NVLink; across: r -> peer q = (node(d), local(r)) over RDMA, q -> d over NVLink
    peer_rank = node[None, :] * G + local[:, None]  # [r, d]: the rank that forwards r's copies to d
    forwarded = price["nvlink_sent"][:, peer_rank] + recv_n
    M1 = np.where(same, send_n + recv_n, np.where(local[:, None] != local[None, :], forwarded, 0.0))
    peers = np.arange(R // G)[None, :] * G + local[:, None]  # [r, n]: r's RDMA peer on node n
    M2 = np.where(node[:, None] != np.arange(R // G)[None, :],
                  price["rdma_sent"][:, :, None] + price["rdma_received"][:, peers], 0.0)
    return _off_diagonal(M1), M2


# -- grouter ep's bytes ----------------------------------------------------------------------------------
def ep_phase_bytes(st: StepTraffic, exchange: str, row_bytes: int, layers: int, k: int,
                   n_experts: int) -> dict[str, np.ndarray]:
    """``[B, R]`` bytes each rank sends to the other ranks per phase in ``grouter ep`` (one step per batch).

    ``dedup`` sends one row per (token, rank), ``slot`` one per (token, expert); the combine and the
    dispatch's gradient send back what was received; ``meta``: the counts (int64: one per rank for
    ``dedup``, one per expert for ``slot``) and, for ``dedup``, 2k int32 of routing per row.
    """
    m = st.tokens if exchange == "dedup" else st.slots
    off = _off_diagonal(m.astype(np.int64))
    sent, received = off.sum(2), off.sum(1)
    R = st.ranks
    counts = (R - 1) * 8 * (1 if exchange == "dedup" else n_experts // R)
    meta = counts + (sent * 2 * k * 4 if exchange == "dedup" else 0 * sent)
    return {"dispatch": sent * row_bytes * layers, "combine": received * row_bytes * layers,
            "dispatch_backward": received * row_bytes * layers, "combine_backward": sent * row_bytes * layers,
            "meta": meta * layers}
