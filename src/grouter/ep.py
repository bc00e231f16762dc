"""Expert parallelism (EP) for the built-in MoE LM, with stored routing and a placement plan.

R processes (``torch.distributed``: gloo on CPU, NCCL on GPU). Every rank is a data-parallel
replica of the dense parts (embeddings, attention, norms, lm head: gradients all-reduced) and the
owner of E/R experts: rank r holds the *physical* experts ``[r*E/R, (r+1)*E/R)`` as its shard of
each layer's ``w_in`` / ``w_out``. Routing comes with the batch (``router="external"``): the routing
store's expert ids relabelled with the plan's permutation (:func:`grouter.formats.plan.relabel`), so the
plan's expert grouping is realised by the contiguous blocks and the plan's sample placement by
which sequences each rank reads.

The same model code runs: :func:`to_expert_parallel` takes a :class:`~grouter.model.MoELM` and
replaces each layer's :class:`~grouter.model.Experts` with an :class:`EPExperts` holding the
rank's shard (physical expert p = the model's logical expert ``inverse(permutation)[p]``, so the EP
model computes exactly the function of the original one on un-relabelled routing).

Exchange per MoE layer (forward), for the tokens of this rank with their physical ids / weights:

- ``dedup`` (default, DeepEP-style): one copy of a token's hidden state per *destination rank*
  holding at least one of its experts. Counts per destination rank are exchanged
  (``all_to_all_single``), then the rows (``all_to_all_single`` with variable split sizes) and, as
  routing metadata, per row the k local expert ids (-1: not on that rank) and gate weights (int32 +
  float32 bits). The owner runs all of the token's experts it holds, grouped by expert (the loop of
  :class:`~grouter.model.Experts`), sums them with the gate weights, and returns *one* combined row
  per (token, rank) with the reverse all-to-all; the sender adds the rows of its token.
  This is the cost model the plan optimises (``deepep``).
- ``slot`` (Megatron-style): one copy per (token, expert) slot, sorted by expert. Counts per
  destination *expert* are exchanged (so no per-row metadata: the owner knows each row's expert
  from the counts), the owner runs its experts and returns one row per slot, the sender applies
  the gate weights and sums (cost model ``megatron``).

Backward runs through the all-to-alls: :class:`_AllToAll` is an autograd function whose backward
is the reverse all-to-all (split sizes swapped). Every rank always takes part in the backward
collectives (a rank that receives no rows still keeps its empty result in the graph). Gate weights
are data (external routing): they get no gradient, and a routing whose weights require grad is
refused.

Bytes are counted where they are sent: every all-to-all adds the rows it sends to *other* ranks
(self-sends excluded) times the row size to :class:`CommStats`, per phase: ``dispatch`` (hidden
states to the experts' owners), ``combine`` (results back), ``dispatch_backward`` /
``combine_backward`` (their gradients), ``meta`` (counts and routing metadata).
:func:`analytic_copies` gives the same from the routing alone (:func:`layer_copies` over a model's
layers: with per-layer heads each layer sends what its head's routing implies).

Training: :func:`train_ep` runs the shared loop of :mod:`grouter.loop` (AdamW, its learning-rate
schedule) with EP's collectives: global-norm clipping over dense + all expert shards, each rank
backpropagating its mean loss weighted by its share of the global batch's tokens, so that summing
the dense gradients over ranks gives exactly the gradient of the mean loss over the global batch
(a single process on the union of the ranks' batches). Launch::

    torchrun --nproc_per_node R -m grouter.cli ep --data D --routing S --plan P --steps N --out O \\
        [--placement plan|random] [--exchange dedup|slot]

``--placement random`` is the baseline: the plan's global batches dealt to the ranks by a seeded
shuffle, identity permutation (expert e on rank e // (E/R)). Rank 0 writes the run directory ``O``:
``metrics.jsonl`` (per step: loss, lr, grad norm, step time, per-rank bytes per phase and remote
copies, the analytic copies under both cost models) and ``run.json`` (its summary); ``--save-model``
writes the gathered model (logical expert order) as an :class:`~grouter.model.MoELM` checkpoint in
``O/model``.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from .device import ProcessGroup, resolve_device, settle
from .errors import GrouterError
from .formats.dataset import PackedDataset
from .formats.plan import Plan, relabel
from .formats.run import Run
from .formats.store import RoutingStore
from .loop import Hooks, Step, TrainConfig, build_optimizer, fit
from .model import Experts, ModelOptions, MoEConfig, MoELM
from .options import POSITIVE_INT, check, option, path_input
from .routers import Routing
from .runner import Output, Stage

EXCHANGES = {
    "dedup": "one copy per (token, destination rank) (DeepEP-style; the plan's deepep cost)",
    "slot": "one copy per (token, expert) slot (Megatron-style; the megatron cost)",
}
PLACEMENTS = ("plan", "random")
PHASES = ("dispatch", "combine", "dispatch_backward", "combine_backward", "meta")


# -- communication ------------------------------------------------------------------------------
@dataclass
class CommStats:
    """Bytes and rows this rank sent to *other* ranks, per phase, since the last :meth:`reset`."""

    bytes: dict = field(default_factory=lambda: dict.fromkeys(PHASES, 0))
    rows: dict = field(default_factory=lambda: dict.fromkeys(PHASES, 0))
    seconds: float = 0.0  # wall time inside the collectives (includes waiting for the peers)

    def add(self, phase: str, rows: int, nbytes: int, seconds: float) -> None:
        self.rows[phase] += rows
        self.bytes[phase] += nbytes
        self.seconds += seconds

    def reset(self) -> None:
        self.bytes = dict.fromkeys(PHASES, 0)
        self.rows = dict.fromkeys(PHASES, 0)
        self.seconds = 0.0

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes.values())


@dataclass
class EPContext:
    """Where this rank sits in the expert-parallel group and how it exchanges tokens."""

    rank: int
    world: int
    n_experts: int
    exchange: str = "dedup"
    group: object = None  # a torch.distributed process group; None: the default (world) group
    stats: CommStats = field(default_factory=CommStats)

    def __post_init__(self):
        if self.exchange not in EXCHANGES:
            raise GrouterError(f"unknown exchange {self.exchange!r}; use one of {', '.join(EXCHANGES)}")
        if self.world < 1 or not 0 <= self.rank < self.world:
            raise GrouterError(f"rank {self.rank} is outside 0..{self.world - 1}")
        if self.n_experts % self.world:
            divisors = [d for d in range(1, self.n_experts + 1) if self.n_experts % d == 0]
            raise GrouterError(f"{self.world} ranks cannot each hold the same number of the {self.n_experts} "
                               f"experts; use a number of ranks that divides {self.n_experts} "
                               f"({', '.join(map(str, divisors))})")

    @classmethod
    def current(cls, n_experts: int, exchange: str = "dedup", group=None) -> "EPContext":
        """The context of this process in the initialised process group ``group`` (default: world)."""
        if not (dist.is_available() and dist.is_initialized()):
            raise GrouterError("expert parallelism needs an initialised torch.distributed process group; "
                               "launch with torchrun (or grouter.ep.spawn)")
        return cls(dist.get_rank(group), dist.get_world_size(group), n_experts, exchange, group)

    @property
    def experts_per_rank(self) -> int:
        return self.n_experts // self.world

    @property
    def experts(self) -> range:
        """Physical expert ids this rank holds."""
        per = self.experts_per_rank
        return range(self.rank * per, (self.rank + 1) * per)


def _all_to_all(x: torch.Tensor, send: list[int], recv: list[int], ep: EPContext, phase: str) -> torch.Tensor:
    """Rows ``x`` split by ``send`` to the ranks; returns the rows received, split by ``recv``, in rank order."""
    x = x.contiguous()
    out = x.new_empty((sum(recv), *x.shape[1:]))
    t0 = time.perf_counter()
    if ep.world > 1:
        dist.all_to_all_single(out, x, recv, send, group=ep.group)
    else:
        out.copy_(x)
    remote = sum(send) - send[ep.rank]
    row_bytes = x.shape[1:].numel() * x.element_size()
    ep.stats.add(phase, remote, remote * row_bytes, time.perf_counter() - t0)
    return out


def _exchange_counts(counts: torch.Tensor, ep: EPContext) -> torch.Tensor:
    """Equal-split all-to-all of a count vector (R blocks): block s of the result is what rank s sent us."""
    n = counts.numel() // ep.world
    return _all_to_all(counts, [n] * ep.world, [n] * ep.world, ep, "meta")


class _AllToAll(torch.autograd.Function):
    """Differentiable variable-split all-to-all: the backward is the reverse all-to-all.

    (``torch.distributed.nn.functional.all_to_all_single`` does the same but is deprecated in
    torch 2.13 and counts nothing; this one records the bytes of both directions.)
    """

    @staticmethod
    def forward(ctx, x, send, recv, ep, phase, backward_phase):
        ctx.send, ctx.recv, ctx.ep, ctx.backward_phase = send, recv, ep, backward_phase
        return _all_to_all(x, send, recv, ep, phase)

    @staticmethod
    def backward(ctx, grad):
        return _all_to_all(grad, ctx.recv, ctx.send, ctx.ep, ctx.backward_phase), None, None, None, None, None


# -- the expert-parallel experts ----------------------------------------------------------------
class EPExperts(Experts):
    """This rank's E/R experts (physical ids ``ep.experts``) behind an all-to-all exchange.

    A drop-in for :class:`~grouter.model.Experts` in :class:`~grouter.model.MoELayer`: ``forward(x,
    routing)`` takes this rank's tokens ``x [T, d]`` with *physical* expert ids and gate weights
    ``[T, k]`` and returns ``(y [T, d], counts [E])`` (counts: this rank's token-slots per physical
    expert). ``w_in`` / ``w_out`` are the shard ``[E/R, d, 2f]`` / ``[E/R, f, d]``; the local experts
    run grouped by :meth:`Experts.forward` itself.
    """

    def __init__(self, w_in: torch.Tensor, w_out: torch.Tensor, ep: EPContext):
        nn.Module.__init__(self)
        if w_in.shape[0] != ep.experts_per_rank or w_out.shape[0] != ep.experts_per_rank:
            raise GrouterError(f"an expert shard of rank {ep.rank} must hold {ep.experts_per_rank} experts, "
                               f"got {w_in.shape[0]}")
        self.w_in = nn.Parameter(w_in.detach().clone())
        self.w_out = nn.Parameter(w_out.detach().clone())
        self.n_experts = ep.experts_per_rank  # what Experts.forward groups over: the local experts
        self.ep = ep

    def extra_repr(self) -> str:
        return (f"rank={self.ep.rank}, experts=[{self.ep.experts.start}, {self.ep.experts.stop}) of "
                f"{self.ep.n_experts}, exchange={self.ep.exchange}")

    def forward(self, x: torch.Tensor, routing: Routing) -> tuple[torch.Tensor, torch.Tensor]:
        T, _ = x.shape
        ids = routing.ids.reshape(T, -1).long()
        weights = routing.weights.reshape(T, ids.shape[1])
        if weights.requires_grad:
            raise GrouterError("expert parallelism takes the gate weights as data (router 'external'); "
                               "a learned router's weights would get no gradient")
        counts = torch.bincount(ids.reshape(-1), minlength=self.ep.n_experts)
        if self.ep.exchange == "dedup":
            return self._dedup(x, ids, weights), counts
        return self._slot(x, ids, weights), counts

    def _local(self, rows: torch.Tensor, local_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Per-row outputs ``weight * expert(row)`` of this rank's experts, grouped by expert."""
        if rows.shape[0] == 0:
            return rows * 0  # keeps the (empty) received rows in the graph: backward collectives run
        y, _ = Experts.forward(self, rows, Routing(local_ids[:, None], weights[:, None]))
        return y

    def _dedup(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        ep, per = self.ep, self.ep.experts_per_rank
        T, k = ids.shape
        dest = ids // per  # [T, k] destination rank of each slot
        present = torch.zeros(T, ep.world, dtype=torch.bool, device=x.device)
        present.scatter_(1, dest, True)
        rank_of_row, token_of_row = present.t().nonzero(as_tuple=True)  # sorted by rank, then token
        send = present.sum(0)
        recv = _exchange_counts(send, ep)
        send_l, recv_l = send.tolist(), recv.tolist()
        here = dest[token_of_row] == rank_of_row[:, None]  # [N, k] slots of the row on its destination
        local_ids = torch.where(here, ids[token_of_row] - rank_of_row[:, None] * per, -1).to(torch.int32)
        gate = torch.where(here, weights[token_of_row].float(), 0.0)
        meta = _all_to_all(torch.cat([local_ids, gate.view(torch.int32)], 1), send_l, recv_l, ep, "meta")
        x_recv = _AllToAll.apply(x[token_of_row], send_l, recv_l, ep, "dispatch", "dispatch_backward")
        # the owner: every slot of every received row that is on this rank, grouped by expert
        r_ids, r_gate = meta[:, :k], meta[:, k:].contiguous().view(torch.float32)
        row, j = (r_ids >= 0).nonzero(as_tuple=True)
        y_slots = self._local(x_recv[row], r_ids[row, j].long(), r_gate[row, j])
        y_recv = torch.zeros_like(x_recv).index_add(0, row, y_slots) if row.numel() else y_slots
        y_back = _AllToAll.apply(y_recv, recv_l, send_l, ep, "combine", "combine_backward")
        return torch.zeros_like(x).index_add(0, token_of_row, y_back)

    def _slot(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        ep, per = self.ep, self.ep.experts_per_rank
        T, k = ids.shape
        flat = ids.reshape(-1)
        order = flat.argsort(stable=True)  # slots by expert, so by destination rank
        token_of_slot = order // k
        per_expert = torch.bincount(flat, minlength=ep.n_experts)
        recv_per_expert = _exchange_counts(per_expert, ep)  # block s: slots rank s sends to each of our experts
        send_l = per_expert.view(ep.world, per).sum(1).tolist()
        recv_l = recv_per_expert.view(ep.world, per).sum(1).tolist()
        x_recv = _AllToAll.apply(x.index_select(0, token_of_slot), send_l, recv_l, ep, "dispatch", "dispatch_backward")
        local_ids = torch.arange(per, device=x.device).repeat(ep.world).repeat_interleave(recv_per_expert)
        y_recv = self._local(x_recv, local_ids, torch.ones(len(local_ids), device=x.device))
        y_back = _AllToAll.apply(y_recv, recv_l, send_l, ep, "combine", "combine_backward")
        gate = weights.reshape(-1)[order, None].to(x.dtype)
        return torch.zeros_like(x).index_add(0, token_of_slot, y_back * gate)


def _inverse(permutation: np.ndarray) -> np.ndarray:
    inv = np.empty_like(permutation)
    inv[permutation] = np.arange(len(permutation))
    return inv


def to_expert_parallel(model: MoELM, ep: EPContext, permutation=None) -> MoELM:
    """Turn ``model`` (router ``external``) into this rank's EP replica, in place; returns it.

    Each layer's experts become an :class:`EPExperts` holding physical experts ``ep.experts``,
    physical p being logical expert ``inverse(permutation)[p]`` of ``model`` (``permutation``:
    logical -> physical, default identity). Feed the model routing relabelled with the same
    permutation. All ranks must start from the same ``model`` (same config and seed).
    """
    cfg = model.cfg
    if cfg.router != "external":
        raise GrouterError(f"expert parallelism runs on stored routing: the model's router must be 'external', "
                           f"not {cfg.router!r}")
    if cfg.n_experts != ep.n_experts:
        raise GrouterError(f"the model has {cfg.n_experts} experts but the EP context {ep.n_experts}")
    perm = np.arange(cfg.n_experts) if permutation is None else np.asarray(permutation, dtype=np.int64)
    if not np.array_equal(np.sort(perm), np.arange(cfg.n_experts)):
        raise GrouterError(f"the expert permutation is not a permutation of 0..{cfg.n_experts - 1}")
    logical = torch.as_tensor(_inverse(perm)[list(ep.experts)])
    for block in model.blocks:
        old = block.moe.experts
        if isinstance(old, EPExperts):
            raise GrouterError("the model is already expert-parallel")
        block.moe.experts = EPExperts(old.w_in.data[logical], old.w_out.data[logical], ep)
    model.ep_context = ep
    model.ep_permutation = perm
    return model


def expert_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The rank's expert shards (owned by this rank alone: no data-parallel all-reduce)."""
    return [p for m in model.modules() if isinstance(m, EPExperts) for p in m.parameters()]


def dense_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters every rank replicates (all-reduced)."""
    experts = {id(p) for p in expert_parameters(model)}
    return [p for p in model.parameters() if id(p) not in experts and p.requires_grad]


def _flat_collective(tensors: list[torch.Tensor], fn) -> None:
    if not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    fn(flat)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


def broadcast_dense(model: nn.Module, ep: EPContext, src: int = 0) -> None:
    """Make every rank's dense parameters equal to rank ``src``'s (one flat broadcast)."""
    if ep.world > 1:
        with torch.no_grad():
            _flat_collective([p.data for p in dense_parameters(model)],
                             lambda t: dist.broadcast(t, dist.get_global_rank(ep.group, src) if ep.group else src,
                                                      group=ep.group))


def all_reduce_dense_grads(model: nn.Module, ep: EPContext) -> None:
    """Sum the dense gradients over the ranks (one flat all-reduce); missing gradients count as 0."""
    params = dense_parameters(model)
    for p in params + expert_parameters(model):
        if p.grad is None:  # e.g. a shard no token reached: it still decays, as in one process
            p.grad = torch.zeros_like(p)
    if ep.world > 1:
        _flat_collective([p.grad for p in params], lambda t: dist.all_reduce(t, group=ep.group))


def clip_grad_norm_ep(model: nn.Module, max_norm: float, ep: EPContext) -> float:
    """Global gradient norm (dense once + every rank's expert shards), clipped like ``clip_grad_norm_``."""
    dense = [p.grad for p in dense_parameters(model) if p.grad is not None]
    experts = [p.grad for p in expert_parameters(model) if p.grad is not None]
    ref = (dense or experts)[0]
    sq_dense = torch.stack([g.float().pow(2).sum() for g in dense]).sum() if dense else ref.new_zeros(())
    sq_experts = torch.stack([g.float().pow(2).sum() for g in experts]).sum() if experts else ref.new_zeros(())
    if ep.world > 1:
        dist.all_reduce(sq_experts, group=ep.group)
    total = (sq_dense + sq_experts).sqrt()
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for g in dense + experts:
        g.mul_(coef.to(g.dtype))
    return float(total)


def gather_state_dict(model: MoELM) -> dict[str, torch.Tensor]:
    """The full :class:`MoELM` state dict (every rank gets it; experts in the model's logical order)."""
    ep, perm = model.ep_context, model.ep_permutation
    state = {}
    for name, t in model.state_dict().items():
        if name.endswith(("experts.w_in", "experts.w_out")):
            parts = [torch.empty_like(t) for _ in range(ep.world)]
            if ep.world > 1:
                dist.all_gather(parts, t.contiguous(), group=ep.group)
            else:
                parts = [t]
            physical = torch.cat(parts)
            t = physical[torch.as_tensor(perm, device=physical.device)]  # logical l sits at physical perm[l]
        state[name] = t.detach().cpu().clone()
    return state


# -- analytic traffic -----------------------------------------------------------------------------
def analytic_copies(ids, n_experts: int, ranks: int, rank: int) -> dict[str, int]:
    """Remote copies a rank sends per MoE layer for tokens with *physical* ids ``[..., k]``.

    ``dedup``: (token, destination rank != rank) pairs; ``slot``: (token, expert) slots on other ranks.
    Multiply by ``d_model * element size`` for bytes.
    """
    ids = np.asarray(ids.cpu() if isinstance(ids, torch.Tensor) else ids).astype(np.int64)
    k = ids.shape[-1]
    dest = np.sort(ids.reshape(-1, k) // (n_experts // ranks), axis=1)
    first = np.ones(dest.shape, dtype=bool)
    first[:, 1:] = dest[:, 1:] != dest[:, :-1]
    return {"dedup": int((first & (dest != rank)).sum()), "slot": int((dest != rank).sum())}


def layer_copies(routing: Routing, n_layers: int, n_experts: int, ranks: int, rank: int) -> dict[str, int]:
    """:func:`analytic_copies` summed over a model's ``n_layers`` MoE layers, each routed by its head
    (per-layer routing) or all by the one routing; computed once per head."""
    heads = [None] * n_layers if routing.heads is None else list(routing.heads.for_target(n_layers))
    per_head = {h: analytic_copies(routing.ids if h is None else routing.ids[..., h, :], n_experts, ranks, rank)
                for h in set(heads)}
    return {x: sum(per_head[h][x] for h in heads) for x in ("dedup", "slot")}


# -- data: which sequences each rank trains --------------------------------------------------------
def rank_batches(plan, placement: str, world: int, seed: int = 0, split_size: int | None = None,
                 global_batch: int | None = None, steps: int = 0) -> list[list[np.ndarray]]:
    """``out[b][r]``: sequences rank r trains in global batch b.

    ``plan`` placement: ``plan.samples[r][b]``. ``random``: the same global batches (the union over
    the plan's ranks) dealt by a shuffle seeded with ``(seed, b)`` in equal parts; without a plan,
    ``steps`` global batches of ``global_batch`` from a seeded epoch permutation of ``split_size``.
    """
    if placement not in PLACEMENTS:
        raise GrouterError(f"unknown placement {placement!r}; use plan or random")
    if plan is not None:
        if plan.ranks != world:
            raise GrouterError(f"the plan is for {plan.ranks} ranks but {world} processes run; make a plan with "
                               f"--ranks {world} or launch {plan.ranks} processes")
        if placement == "plan":
            out = [[plan.samples[r][b] for r in range(world)] for b in range(plan.n_batches)]
        else:
            out = []
            for b in range(plan.n_batches):
                members = np.concatenate([plan.samples[r][b] for r in range(world)])
                members = np.random.default_rng([seed, b]).permutation(members)
                if len(members) % world:
                    raise GrouterError(f"global batch {b} of the plan ({len(members)} sequences) does not split "
                                       f"evenly over {world} ranks")
                out.append(np.split(members, world))
    else:
        if placement == "plan":
            raise GrouterError("plan placement needs a placement plan (--plan)")
        if not global_batch or global_batch % world:
            raise GrouterError(f"without a plan, give a global batch (--global-batch) that is a multiple of {world}")
        if split_size is None or global_batch > split_size:
            raise GrouterError(f"a global batch of {global_batch} does not fit the {split_size} training sequences")
        per_epoch = split_size // global_batch
        out = []
        for b in range(max(steps, 1)):
            epoch, pos = divmod(b, per_epoch)
            order = np.random.default_rng([seed, epoch]).permutation(split_size)
            out.append(np.split(order[pos * global_batch:(pos + 1) * global_batch], world))
    for b, parts in enumerate(out):
        empty = [r for r, p in enumerate(parts) if len(p) == 0]
        if empty:
            raise GrouterError(f"global batch {b} gives rank(s) {empty} no sequences; synchronous expert "
                               "parallelism needs every rank to train (use a balanced plan)")
    return out


# -- training -------------------------------------------------------------------------------------
@dataclass
class StepStats:
    """One rank's measurements of one step; :meth:`gather` collects every rank's."""

    bytes: dict[str, int]  # sent to other ranks, per phase
    remote_copies: int  # hidden-state rows dispatched to other ranks
    analytic_copies: dict[str, int]  # the same predicted from the routing, per exchange
    seconds: float
    a2a_seconds: float
    sequences: int

    @staticmethod
    def gather(mine: "StepStats", ep: EPContext) -> list["StepStats"]:
        everyone: list = [None] * ep.world
        dist.all_gather_object(everyone, mine, group=ep.group)
        return everyone


def step_record(stats: list[StepStats], row_bytes: int) -> dict:
    """The per-rank lists of a step's log record (rank r at position r)."""
    each = lambda f: [f(s) for s in stats]  # noqa: E731
    by_phase = {p: each(lambda s, p=p: s.bytes[p]) for p in PHASES}
    return {"sequences_per_rank": each(lambda s: s.sequences), "step_seconds": max(each(lambda s: s.seconds)),
            "a2a_seconds_per_rank": each(lambda s: round(s.a2a_seconds, 6)),
            "bytes_per_rank": {**by_phase, "total": each(lambda s: sum(s.bytes.values()))},
            "remote_copies_per_rank": each(lambda s: s.remote_copies),
            "analytic_copies_per_rank": {x: each(lambda s, x=x: s.analytic_copies[x]) for x in EXCHANGES},
            "analytic_dispatch_bytes_per_rank": {x: each(lambda s, x=x: s.analytic_copies[x] * row_bytes)
                                                 for x in EXCHANGES}}


def summarize(records: list[dict], ep: EPContext, placement: str, model_cfg: MoEConfig, seconds: float) -> dict:
    """Means per rank and step of what the records hold; the first step (warm-up) is left out of times."""
    timed = records[1:] or records
    mean_rank = lambda key, sub: float(np.mean([np.mean(r[key][sub]) for r in records]))  # noqa: E731
    return {
        "ranks": ep.world, "placement": placement, "exchange": ep.exchange,
        "exchange_description": EXCHANGES[ep.exchange], "steps": len(records), "n_experts": model_cfg.n_experts,
        "k": model_cfg.top_k, "model": asdict(model_cfg), "final_loss": records[-1]["loss"],
        "dispatch_bytes_per_rank_step": mean_rank("bytes_per_rank", "dispatch"),
        "total_bytes_per_rank_step": mean_rank("bytes_per_rank", "total"),
        "remote_copies_per_rank_step": float(np.mean([np.mean(r["remote_copies_per_rank"]) for r in records])),
        "analytic_dispatch_bytes_per_rank_step": {x: mean_rank("analytic_dispatch_bytes_per_rank", x)
                                                  for x in EXCHANGES},
        "step_seconds_median": float(np.median([r["step_seconds"] for r in timed])),
        "a2a_seconds_median": float(np.median([max(r["a2a_seconds_per_rank"]) for r in timed])),
        "seconds": round(seconds, 3),
    }


@dataclass
class Inputs:
    data: Path = path_input("packed dataset")
    routing: Path = path_input("routing store of the dataset (grouter dispatch)")
    plan: Path | None = path_input("placement plan (grouter place) for R ranks; needed for --placement plan",
                                   required=False)


@dataclass
class Options:
    placement: str = option("plan", "plan: the plan's experts and samples; random: identity experts, batches dealt "
                            "at random", choices=PLACEMENTS)
    exchange: str = option("dedup", "dedup: one copy per (token, rank) (DeepEP); slot: one per (token, expert) "
                           "(Megatron)", choices=tuple(sorted(EXCHANGES)))
    model: ModelOptions = field(default_factory=lambda: ModelOptions(preset="tiny"))
    schedule: TrainConfig = field(default_factory=lambda: TrainConfig(steps=100))
    global_batch: int | None = option(None, "sequences per step without a plan (random placement)", range=POSITIVE_INT)
    save_model: bool = option(False, "write the gathered model to OUT/model")


# Not flags of grouter ep: the experts and top-k are the store's, and a step is the plan's global batch.
HIDDEN = ("n_experts", "top_k", "n_shared_experts", "batch_size", "eval_every", "eval_sequences", "checkpoint_every")


def model_config(data: PackedDataset, store: RoutingStore, o: Options) -> MoEConfig:
    """The options' MoE LM with the store's experts and top-k and external routing."""
    return replace(o.model, n_experts=store.n_experts, top_k=store.k).config(data.vocab_size, data.seq_len,
                                                                           "external", o.schedule.seed)


def run(inputs: Inputs, o: Options, out: Output) -> dict | None:
    """``grouter ep``: every rank of the launch runs this; only rank 0 reports (the others: None)."""
    with ProcessGroup(o.schedule.device, always=True) as group:
        data = PackedDataset.open(inputs.data)
        store = RoutingStore.open(inputs.routing, data=data)
        plan = None if inputs.plan is None else Plan.load(inputs.plan)
        summary = train_ep(data, store, plan, o, out, progress=out.progress)
        return {"out": str(out.path), **summary} if group.rank == 0 else None


ep = Stage("ep", run, Inputs, Options, writes="run", hidden=HIDDEN)


def _check_inputs(data: PackedDataset, store: RoutingStore, plan: Plan | None, model_cfg: MoEConfig) -> str:
    """Refuse a model, store or plan that do not go together; returns the split to train on."""
    E, k = store.n_experts, store.k
    model_cfg.validate()
    if model_cfg.router != "external" or (model_cfg.n_experts, model_cfg.top_k) != (E, k):
        raise GrouterError(f"the EP model must use router 'external' with the store's {E} experts, top-{k}")
    if model_cfg.vocab_size != data.vocab_size or model_cfg.max_seq_len < data.seq_len:
        raise GrouterError("the model's vocabulary / max_seq_len do not fit the dataset")
    split = plan.split if plan is not None else "train"
    if store.seq_len != data.seq_len or store.n_sequences(split) != len(data.split(split)):
        raise GrouterError(f"routing store {store.path} does not match the dataset's {split} split")
    if plan is not None:
        if (plan.n_experts, plan.k) != (E, k):
            raise GrouterError(f"the plan is for {plan.n_experts} experts top-{plan.k}, the store has {E} top-{k}")
        for key in ("dataset_fingerprint", "grouter_fingerprint"):
            if plan.source.get(key) != store.manifest[key]:
                raise GrouterError(f"the plan was made from another routing store ({key.split('_')[0]} "
                                   f"{str(plan.source.get(key))[:12]}, this store's {store.manifest[key][:12]}); "
                                   f"make a plan for this store with `grouter place --routing {store.path}`")
    return split


def _device_for(ep: EPContext, name: str) -> torch.device:
    """This rank's device, which must go with the process group's backend (gloo: CPU, NCCL: CUDA)."""
    backend = dist.get_backend(ep.group)
    if name == "auto":
        name = "cuda" if backend == "nccl" else "cpu"
    device = resolve_device(name, local_rank=int(os.environ.get("LOCAL_RANK", "0") or 0))
    if (device.type == "cuda") != (backend == "nccl"):
        raise GrouterError(f"device {device.type} does not go with the {backend} process group: use --device cpu "
                           "with gloo, cuda with NCCL")
    return device


def _start_run(out: Output, identity: dict, ep: EPContext) -> Run | None:
    """Rank 0's run directory (other ranks get None); a refusal reaches every rank. EP runs keep no
    checkpoint, so an unfinished one is started over only with --overwrite."""
    run, error = None, None
    if ep.rank == 0:
        try:
            if (out.path / "run.json").exists() and not out.overwrite:
                raise GrouterError(f"{out.path} holds an EP run that did not finish (EP runs do not resume); pass "
                                   "--overwrite to start it over, or choose another --out")
            run = out.run(identity)
            run.start()
        except GrouterError as e:
            error = str(e)
    message = [error]
    dist.broadcast_object_list(message, src=dist.get_global_rank(ep.group, 0) if ep.group else 0, group=ep.group)
    if message[0]:
        raise GrouterError(message[0])
    return run


def train_ep(data: PackedDataset, store: RoutingStore, plan: Plan | None, o: Options, out: Output,
             model_cfg: MoEConfig | None = None, group=None, progress: bool = False) -> dict:
    """Train the EP model in the current process group; every rank calls it and gets the summary.

    ``plan``: for this many ranks; ``o.placement``: ``plan`` (its permutation and samples) or
    ``random`` (identity permutation, the plan's global batches dealt at random; without a plan,
    ``o.global_batch`` sequences per step). ``model_cfg``: default :func:`model_config`. Rank 0 writes
    the run directory ``out`` (``run.json`` with the summary, ``metrics.jsonl``: one record per step
    with every rank's bytes per phase); ``o.save_model`` adds the gathered model (logical expert
    order) as a :class:`~grouter.model.MoELM` checkpoint in ``out/model``.
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise GrouterError("train_ep runs in a torch.distributed process group; launch it with torchrun "
                           "(grouter ep) or grouter.device.spawn")
    train_cfg = check(o.schedule)
    model_cfg = model_cfg or model_config(data, store, o)
    split = data.split(_check_inputs(data, store, plan, model_cfg))
    ep = EPContext.current(store.n_experts, o.exchange, group)
    device = _device_for(ep, train_cfg.device)
    batches = rank_batches(plan, o.placement, ep.world, train_cfg.seed, len(split), o.global_batch, train_cfg.steps)
    perm = plan.permutation if (plan is not None and o.placement == "plan") else np.arange(store.n_experts)
    identity = {"placement": o.placement, "exchange": o.exchange, "ranks": ep.world, "model": asdict(model_cfg),
                "train": asdict(train_cfg), "routing": store.manifest["grouter_fingerprint"],
                "plan": plan.source if plan is not None else None}
    run = _start_run(out, identity, ep)

    torch.manual_seed(train_cfg.seed)
    model = to_expert_parallel(MoELM(model_cfg), ep, perm).to(device).train()
    broadcast_dense(model, ep)
    opt = build_optimizer(model, train_cfg)
    t0 = time.perf_counter()
    records = _fit_ep(run, model, opt, train_cfg, store, split, batches, perm, device, progress)
    summary = summarize(records, ep, o.placement, model_cfg, time.perf_counter() - t0)
    state = gather_state_dict(model) if o.save_model else None
    if run is not None:
        if state is not None:  # the gathered model is a plain MoELM
            _save_gathered(model_cfg, state, out.path / "model")
        run.finish(summary)
    settle(ep.group)
    return summary


def _save_gathered(model_cfg: MoEConfig, state: dict, path: Path) -> None:
    model = MoELM(model_cfg)
    model.load_state_dict(state)
    model.save_pretrained(path)


def _fit_ep(run: Run | None, model: MoELM, opt, cfg: TrainConfig, store: RoutingStore, split, batches, perm,
            device: torch.device, progress: bool) -> list[dict]:
    """The shared training loop with EP's collectives: the global loss, the dense all-reduce and
    the global clip, and every rank's step statistics in each record."""
    ep, L, E = model.ep_context, model.cfg.n_layers, model.cfg.n_experts
    row_bytes = model.cfg.d_model * torch.finfo(torch.float32).bits // 8
    records, now = [], {}

    def forward(idx: np.ndarray) -> Step:
        now.update(t0=time.perf_counter(), n=len(idx))
        ep.stats.reset()
        batch, r = split.batch(idx), store.routing(split.name, idx)
        r = Routing(relabel(r.ids, perm), r.weights, heads=r.heads)
        now["copies"] = layer_copies(r, L, E, ep.world, ep.rank)
        labels = batch["labels"].to(device)
        out = model(batch["input_ids"].to(device), labels=labels, routing=r.to(device))
        totals = torch.tensor([float(labels.numel()), float(out.lm_loss.detach()) * labels.numel()],
                              dtype=torch.float64, device=device)
        dist.all_reduce(totals, group=ep.group)
        # each rank's share of the global batch: the summed dense gradients are the global mean's
        return Step(out.loss * (labels.numel() / float(totals[0])),
                    {"loss": float(totals[1] / totals[0]), "tokens": int(totals[0])})

    def clip() -> float:
        all_reduce_dense_grads(model, ep)
        return clip_grad_norm_ep(model, cfg.grad_clip, ep)

    def after_step(record: dict) -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        s = ep.stats
        mine = StepStats(dict(s.bytes), s.rows["dispatch"], now["copies"], time.perf_counter() - now["t0"],
                         s.seconds, now["n"])
        record.update(step_record(StepStats.gather(mine, ep), row_bytes))
        records.append(record)

    steps = ((step, batches[step % len(batches)][ep.rank]) for step in range(cfg.steps))
    fit(run, model, opt, cfg, 0, steps, Hooks(forward, clip=clip, after_step=after_step, checkpoints=False),
        desc="ep", progress=progress and ep.rank == 0)
    return records


def train_many(rank: int, world: int, runs: list[dict]) -> None:
    """Worker for :func:`grouter.device.spawn`: for each run (``data``, ``routing``, ``plan`` paths, ``out``,
    ``options``: :class:`Options`, optionally ``model_cfg`` and ``overwrite``), :func:`train_ep` in one
    process group."""
    for r in runs:
        data = PackedDataset.open(r["data"])
        store = RoutingStore.open(r["routing"], data=data)
        plan = None if r.get("plan") is None else Plan.load(r["plan"])
        out = Output(Path(r["out"]), {}, overwrite=r.get("overwrite", False))
        train_ep(data, store, plan, r["options"], out, model_cfg=r.get("model_cfg"))
