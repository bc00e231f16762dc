"""Train a Megatron-core MoE model with Grouter routing: stored (a routing store) or online (a frozen Grouter).

Megatron-core builds every MoE layer's router from ``MoESubmodules.router``; this module puts a
:class:`GrouterRouter` there. It has no parameters and computes nothing: it serves the routing of
the micro-batch being run, which the data side hands to a :class:`RoutingFeed` once per micro-batch.
Experts, dispatchers (``alltoall``, ``allgather``, ``flex``), attention and the rest are Megatron's
own, unchanged. Megatron's own trainer runs it all through :mod:`.pretrain`; a loop of your own
(``examples/megatron_train.py`` runs one; docs/megatron.md explains it)::

    store = RoutingStore.open("routing/", data=data)          # written by `grouter dispatch`
    plan = Plan.load("plan/")                                 # optional: `grouter place --ranks <EP>`
    feed = RoutingFeed.from_store(store, plan)                # or RoutingFeed.online(grouter, plan=plan)
    config = TransformerConfig(..., num_moe_experts=store.n_experts, moe_router_topk=store.k,
                               moe_aux_loss_coeff=0.0, moe_token_dispatcher_type="alltoall")
    model = grouter_gpt_model(config, feed, data.vocab_size, data.seq_len)   # or with_grouter_router(spec, ...)
    loader = plan_data_loader(GrouterGPTDataset(data, store), plan, dp_rank, dp_size, micro_batch_size)

    def forward_step(data_iterator, model):                   # on EVERY pipeline stage
        batch = next(data_iterator)
        RoutingFeed.of(model).push(batch)                     # this micro-batch's routing, full sequences
        batch = get_batch_on_this_cp_rank(batch)              # Megatron's CP split (routing keys too: fine)
        ...

What the router returns. ``forward(hidden [s, b, h], padding_mask)`` returns ``probs [T, E]``
float32 (the stored gate weights at the chosen experts, 0 elsewhere; with a plan, expert ids are
relabelled by its permutation, :func:`grouter.formats.plan.relabel`, so rank r's experts are Megatron's
contiguous block r) and ``routing_map [T, E]`` bool, with exactly ``k`` experts per token. Tokens
are those of the layer's input, in Megatron's order: sequence-major (``[s, b]`` flattened), local to
the rank: under context parallelism (CP) the rank's two chunks of the ``2·cp`` sequence chunks
(Megatron's ``get_batch_on_this_cp_rank``; the feed may be given full or CP-split sequences), under
sequence parallelism the tensor-parallel rank's contiguous ``s/tp`` share
(``scatter_to_sequence_parallel_region``). ``padding_mask`` is ignored: every position has stored
routing, and Megatron's router uses the mask only for load-balancing statistics, which we do not have.

Why not Megatron's RouterReplay. ``moe_enable_routing_replay`` (``transformer/moe/router_replay.py``)
replays top-k expert *indices* only: ``get_replay_topk`` returns ``scores.gather(1, indices)`` from
the live router's scores, and ``topk_routing_with_score_function`` then applies the softmax or
sigmoid normalisation (and scaling) to them. The gate weights therefore come from the live, trainable
router (its parameters, its compute, its gradient), so replay cannot carry stored weights.

The feed is Megatron's replay scheme, made automatic. Like ``RouterReplay`` (``set_target_indices``
appends each micro-batch to a ``replay_backward_list`` that ``REPLAY_BACKWARD`` pops first-in
first-out during activation recompute), each router keeps two FIFOs: ``pending`` (pushed, not yet
run by this layer) and ``replay`` (run under checkpointing, waiting for the recompute). Megatron's
replay needs its caller to switch actions around backward; here the phase is read from autograd
state, the signal Megatron's own router uses to skip z-loss and expert-bias counting under
checkpointing: a training-mode forward with gradients disabled is a checkpointed forward
(``tensor_parallel.checkpoint`` and TE's reentrant checkpoint run it under ``no_grad``), so its routing goes
to ``replay``; a forward with gradients enabled while ``replay`` is not empty is the recompute in
backward, which takes the oldest entry. Every Megatron schedule (no pipelining, 1F1B, interleaved per
model chunk) runs backwards in the order of their forwards, so FIFO order is right. Consequences:
one feed per model chunk (virtual pipeline stages each get their own), pushed once per micro-batch on
every pipeline stage (each stage reads the data iterator; routing is not sent between stages), and
forward-only passes (evaluation, log-probs) run in ``model.eval()`` as Megatron's ``evaluate`` does.
:meth:`RoutingFeed.check_drained` after each step catches a push without a forward and the reverse.

Per-layer heads. From a store (or Grouter) with per-layer heads the routing is ``[b, L, H, k]``;
the router of decoder layer ``l`` (Megatron's global, 1-based ``layer_number``, pipeline offsets
included) takes the head nearest in relative depth among ``config.num_layers``
(:meth:`grouter.routers.Heads.for_target`), as the built-in model and the Hugging Face integration do.

MTP. :func:`with_grouter_router` replaces routers anywhere in a spec, multi-token-prediction blocks
included (``get_gpt_mtp_block_spec`` copies the decoder's layer spec). An MTP layer's MoE gets the
routing of its position ``t``, like the decoder's layers (its input mixes ``h_t`` with the embedding
of token ``t + depth``); with per-layer heads it takes the last decoder layer's head.

Data (:mod:`.data`): :class:`GrouterGPTDataset` yields Megatron ``GPTDataset``-style items plus their
routing; :func:`plan_data_loader` and :func:`plan_order` give each data-parallel rank the plan's sequences.

Limits: the plan's expert placement is exact when every sequence sits on one expert-parallel rank and
each EP group runs whole plan batches: EP = DP, or EP < DP with plan batches dealt to the groups
(:func:`plan_order`); with tensor parallelism, expert TP = TP (Megatron's default; each SP shard then
dispatches within its own EP group). Context parallelism, or EP folded over TP ranks, would make it
approximate: the entry point refuses them with a plan. CUDA graphs are refused (:func:`check_config`).
"""

from __future__ import annotations

import dataclasses
from collections import deque
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import torch
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.moe.moe_layer import MoESubmodules
from megatron.core.transformer.moe.moe_utils import get_default_pg_collection
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import get_pg_rank, get_pg_size

from ...errors import GrouterError
from ...formats.plan import Plan, relabel
from ...formats.store import RoutingStore
from ...routers import Heads, Routing, token_shape


# -- the TransformerConfig -------------------------------------------------------------------------
def _coeffs(value) -> list[float]:
    return [float(v) for v in (value if isinstance(value, (list, tuple)) else [value or 0.0])]


# (field, accepted, why): settings that would train or alter a router we do not have.
_CONFIG_RULES = [
    ("moe_aux_loss_coeff", lambda v: not any(_coeffs(v)), "a load-balancing loss has no router to train; set 0"),
    ("moe_z_loss_coeff", lambda v: not v, "the z-loss has no router logits to act on; set None"),
    ("moe_router_enable_expert_bias", lambda v: not v, "expert bias (score correction) would re-route; set False"),
    ("moe_expert_capacity_factor", lambda v: v is None, "capacity dropping would drop stored routes; set None"),
    ("moe_input_jitter_eps", lambda v: v is None, "input jitter belongs to a learned router; set None"),
    ("moe_router_force_load_balancing", lambda v: not v, "random routing would replace the stored routes; set False"),
    ("moe_router_topk_scaling_factor", lambda v: v in (None, 1.0), "gate weights are served as stored; set None"),
    ("moe_router_group_topk", lambda v: v is None, "group-limited routing does not apply to stored routes; set None"),
    ("moe_enable_routing_replay", lambda v: not v, "replay drives Megatron's own TopKRouter, not this one; set False "
     "(or use the ids-only ReplayFeed, docs/megatron.md)"),
    ("cuda_graph_impl", lambda v: v in (None, "none"), "a captured graph would replay one micro-batch's routing for "
     "every later one; set cuda_graph_impl='none' (--cuda-graph-impl none)"),
    ("enable_cuda_graph", lambda v: not v, "a captured graph would replay one micro-batch's routing; set False"),
    ("external_cuda_graph", lambda v: not v, "a captured graph would replay one micro-batch's routing; set False"),
]


def check_config(config: TransformerConfig, n_experts: int, k: int) -> None:
    """Refuse a TransformerConfig that does not fit the routing (E, k) or would train a router."""
    if config.num_moe_experts != n_experts:
        raise GrouterError(f"TransformerConfig.num_moe_experts is {config.num_moe_experts} but the routing has "
                           f"{n_experts} experts; set num_moe_experts={n_experts}")
    if config.moe_router_topk != k:
        raise GrouterError(f"TransformerConfig.moe_router_topk is {config.moe_router_topk} but the routing has "
                           f"k={k}; set moe_router_topk={k}")
    for name, accepted, why in _CONFIG_RULES:
        value = getattr(config, name, None)
        if not accepted(value):
            raise GrouterError(f"TransformerConfig.{name}={value!r} does not go with Grouter routing: {why}")


# -- which tokens a rank holds ------------------------------------------------------------------------
def context_parallel_chunk(x: torch.Tensor, cp_size: int, cp_rank: int, seq_dim: int = 1) -> torch.Tensor:
    """A context-parallel rank's share of sequences: chunks ``cp_rank`` and ``2·cp_size-1-cp_rank`` of
    ``2·cp_size`` along ``seq_dim`` (Megatron's load-balanced causal split, get_batch_on_this_cp_rank)."""
    if cp_size == 1:
        return x
    if x.shape[seq_dim] % (2 * cp_size):
        raise GrouterError(f"sequence length {x.shape[seq_dim]} is not divisible by 2 x context parallel size "
                           f"{cp_size}; use a sequence length that is")
    chunks = x.chunk(2 * cp_size, dim=seq_dim)
    return torch.cat([chunks[cp_rank], chunks[2 * cp_size - 1 - cp_rank]], dim=seq_dim)


def sequence_parallel_chunk(x: torch.Tensor, tp_size: int, tp_rank: int) -> torch.Tensor:
    """A tensor-parallel rank's contiguous share along dim 0 (``s`` of ``[s, b, ...]``), as
    Megatron's scatter_to_sequence_parallel_region cuts hidden states under sequence parallelism."""
    if x.shape[0] % tp_size:
        raise GrouterError(f"sequence length {x.shape[0]} is not divisible by the tensor parallel size {tp_size}")
    n = x.shape[0] // tp_size
    return x[tp_rank * n:(tp_rank + 1) * n]


@dataclass(frozen=True)
class RankLayout:
    """How a rank's MoE input relates to full sequences: its CP and TP place and sequence parallelism."""

    tp_size: int = 1
    tp_rank: int = 0
    cp_size: int = 1
    cp_rank: int = 0
    sequence_parallel: bool = False

    @property
    def sp_size(self) -> int:
        return self.tp_size if self.sequence_parallel else 1

    def local_tokens(self, x: torch.Tensor, cp_split: bool = False) -> torch.Tensor:
        """``x [b, L, ...]`` (full sequences, or already CP-split when ``cp_split``) -> this rank's tokens
        ``[s_local·b, ...]`` in Megatron's sequence-major order."""
        if not cp_split:
            x = context_parallel_chunk(x, self.cp_size, self.cp_rank)
        x = x.transpose(0, 1)  # [s, b, ...]: the layout of Megatron's hidden states
        if self.sequence_parallel:
            x = sequence_parallel_chunk(x, self.tp_size, self.tp_rank)
        return x.reshape(-1, *x.shape[2:])


# -- the feed: per-micro-batch routing, first in first out ----------------------------------------------
@dataclass(eq=False)
class _Entry:
    """One micro-batch's routing ``[b, L, k]`` (per-layer: ``[b, L, H, k]``; physical expert ids), and
    this rank's share of it."""

    ids: torch.Tensor
    weights: torch.Tensor
    full: bool  # True: L is the full sequence length for certain (online routing of whole sequences)
    local: dict = field(default_factory=dict)

    def probs_and_map(self, layout: RankLayout, s_local: int, b: int, n_experts: int, device,
                      head: int | None = None) -> tuple:
        """``probs [T, E]`` float32 and ``routing_map [T, E]`` of this rank's tokens (per-layer routing:
        ``head``'s). The slice is cut once per micro-batch; the dense tensors are new for every layer
        (Megatron may pad the map in place)."""
        ids, weights = self.local_routing(layout, s_local, b, device, head)
        probs = torch.zeros(len(ids), n_experts, dtype=torch.float32, device=device).scatter_(1, ids, weights)
        routing_map = torch.zeros(len(ids), n_experts, dtype=torch.bool, device=device).scatter_(1, ids, True)
        return probs, routing_map

    def local_routing(self, layout: RankLayout, s_local: int, b: int, device,
                      head: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's ids and weights ``[T, k]`` (per-layer routing: ``head``'s), cut once per micro-batch."""
        key = (layout, s_local, b, str(device))
        if key not in self.local:
            self.local[key] = tuple(t.to(device, non_blocking=True) for t in self._local(layout, s_local, b))
        ids, weights = self.local[key]
        return (ids, weights) if head is None else (ids[:, head], weights[:, head])

    def _local(self, layout: RankLayout, s_local: int, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        batch, length = self.ids.shape[:2]
        full_length = s_local * layout.sp_size * layout.cp_size
        cp_split = layout.cp_size > 1 and not self.full and length == s_local * layout.sp_size
        if batch != b or (length != full_length and not cp_split):
            raise GrouterError(f"the routing pushed for this micro-batch is [{batch}, {length}] (sequences, "
                               f"positions) but the MoE layer runs {b} sequences of {full_length} positions; push "
                               "the micro-batch that runs next, with its full sequences")
        return layout.local_tokens(self.ids, cp_split), layout.local_tokens(self.weights, cp_split)


@dataclass(eq=False)
class RoutingFeed:
    """Per-micro-batch routing for the :class:`GrouterRouter` s of one model chunk.

    ``permutation`` (a plan's ``logical -> physical`` expert map) relabels pushed expert ids;
    ``grouter`` makes the feed online: :meth:`push` routes the batch's ``tokens`` with it.
    ``device``: where pushed routing is moved (None: the layers' device, on first use). ``heads``:
    per-layer routing ``[b, L, H, k]``, of which the router of decoder layer ``l`` (Megatron's
    global ``layer_number``) takes the head nearest in relative depth.
    """

    n_experts: int
    k: int
    permutation: np.ndarray | None = None
    grouter: torch.nn.Module | None = field(default=None, repr=False)
    device: torch.device | str | None = None
    routers: list["GrouterRouter"] = field(default_factory=list, repr=False)
    heads: Heads | None = None

    @classmethod
    def from_store(cls, store: RoutingStore, plan: Plan | None = None, **kw) -> "RoutingFeed":
        """Serves stored routing (pushed batches carry ``routing_ids`` / ``routing_weights``)."""
        return cls(store.n_experts, store.k, _permutation(plan, store.n_experts, store.k), heads=store.heads, **kw)

    @classmethod
    def online(cls, grouter, k: int | None = None, plan: Plan | None = None, **kw) -> "RoutingFeed":
        """Routes each pushed batch's ``tokens`` (full sequences) with the frozen ``grouter``, once per micro-batch."""
        k = k or grouter.cfg.top_k
        grouter.eval().requires_grad_(False)
        return cls(grouter.cfg.n_experts, k, _permutation(plan, grouter.cfg.n_experts, k), grouter=grouter,
                   heads=grouter.cfg.heads, **kw)

    @staticmethod
    def of(model: torch.nn.Module) -> "RoutingFeed":
        """The feed the GrouterRouters of ``model`` (one model chunk, wrapped or not) read from."""
        feeds = {id(m.feed): m.feed for m in model.modules() if isinstance(m, GrouterRouter)}
        if len(feeds) != 1:
            raise GrouterError(f"the model has GrouterRouters of {len(feeds)} feeds; build each model chunk with "
                               "one RoutingFeed (with_grouter_router / grouter_gpt_model)")
        return next(iter(feeds.values()))

    def push(self, batch: dict | Routing) -> None:
        """Queue one micro-batch's routing for every MoE layer of the chunk; call it once per micro-batch,
        before the model runs it: a batch of :class:`GrouterGPTDataset` (``[b, L, k]`` routing, or
        ``[b, L, H, k]`` per-layer; full or CP-split sequences) or a :class:`~grouter.routers.Routing`;
        online, a batch with ``tokens [b, L]``."""
        routing, full = self._routing(batch)
        entry = _Entry(*self._checked(routing), full=full)
        for router in self.routers:
            router.pending.append(entry)

    def _routing(self, batch: dict | Routing) -> tuple[Routing, bool]:
        if isinstance(batch, Routing):
            return batch, False
        if self.grouter is not None:
            tokens = batch["tokens"].to(next(self.grouter.parameters()).device)
            return self.grouter.route(tokens, self.k), True
        if "routing_ids" not in batch or "routing_weights" not in batch:
            raise GrouterError("the batch has no routing_ids / routing_weights: build GrouterGPTDataset with a "
                               "routing store, or use RoutingFeed.online(grouter)")
        return Routing(batch["routing_ids"], batch["routing_weights"]), False

    def _checked(self, routing: Routing) -> tuple[torch.Tensor, torch.Tensor]:
        ids, weights = routing.ids, routing.weights
        heads = "" if self.heads is None else f"H={len(self.heads)}, "  # per-layer: a routing per head
        if ids.dim() < 3 or tuple(ids.shape[2:]) != token_shape(self.heads, self.k) or weights.shape != ids.shape:
            raise GrouterError(f"routing must be ids and weights [b, L, {heads}k={self.k}], got {tuple(ids.shape)} "
                               f"and {tuple(weights.shape)}; build the feed from the store the routing comes from")
        ids = ids.long()
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.n_experts):
            raise GrouterError(f"routing holds expert ids outside 0..{self.n_experts - 1}; it belongs to another "
                               "model or store")
        if self.k > 1 and bool((ids.sort(-1).values.diff(dim=-1) == 0).any()):
            raise GrouterError("routing names an expert twice for one token; re-create the routing store")
        if self.permutation is not None:
            ids = relabel(ids, self.permutation)
        device = self.device if self.device is not None else ids.device
        return ids.to(device, non_blocking=True), weights.float().to(device, non_blocking=True)

    def check_drained(self) -> None:
        """Raise when routing is left over (after a step's forwards and backwards, all should be used)."""
        left = [(r.layer_number, len(r.pending), len(r.replay)) for r in self.routers if r.pending or r.replay]
        if left:
            raise GrouterError(f"routing left unused after the step (layer, pending, awaiting recompute): {left}; "
                               "push exactly once per micro-batch run, and run forward-only passes in eval mode")

    def clear(self) -> None:
        """Drop all queued routing (e.g. after an interrupted step)."""
        for router in self.routers:
            router.pending.clear()
            router.replay.clear()


def next_entry(layer, training: bool) -> _Entry:
    """The routing of the micro-batch ``layer`` (a router with ``pending`` and ``replay`` queues) runs now:
    the next pushed one, kept for the recompute when this is a checkpointed forward (training, gradients
    off), or for the recompute itself (gradients on, something kept) the oldest kept one."""
    if torch.is_grad_enabled() and layer.replay:
        return layer.replay.popleft()
    if not layer.pending:
        raise GrouterError(f"no routing for this micro-batch at MoE layer {layer.layer_number}: call RoutingFeed."
                           "push(batch) before the model runs each micro-batch, on every pipeline stage")
    entry = layer.pending.popleft()
    if training and not torch.is_grad_enabled():
        layer.replay.append(entry)
    return entry


def layer_head(heads: Heads | None, num_layers: int, layer_number: int, is_mtp_layer: bool) -> int | None:
    """Per-layer routing: the head of decoder layer ``layer_number`` (1-based, of ``num_layers``); an MTP
    layer, past the last, takes the last layer's (0.17+ numbers MTP layers from 1 and flags them)."""
    if heads is None:
        return None
    return heads.for_target(num_layers)[num_layers - 1 if is_mtp_layer else min(layer_number, num_layers) - 1]


def _permutation(plan: Plan | None, n_experts: int, k: int) -> np.ndarray | None:
    if plan is None:
        return None
    if (plan.n_experts, plan.k) != (n_experts, k):
        raise GrouterError(f"the plan is for {plan.n_experts} experts top-{plan.k} but the routing has {n_experts} "
                           f"top-{k}; make the plan from this routing store")
    return plan.permutation


# -- the router -----------------------------------------------------------------------------------------
class GrouterRouter(MegatronModule):
    """A Megatron MoE router that serves the routing its :class:`RoutingFeed` was given; no parameters.

    Megatron builds one per MoE layer through ``MoESubmodules.router`` (:func:`with_grouter_router` puts
    ``partial(GrouterRouter, feed=feed)`` there).
    """

    def __init__(self, config: TransformerConfig, pg_collection=None, is_mtp_layer: bool = False, *,
                 feed: RoutingFeed):
        super().__init__(config)
        self.is_mtp_layer = is_mtp_layer  # passed by megatron-core 0.17+ (compat.ROUTER_IS_MTP_LAYER)
        check_config(config, feed.n_experts, feed.k)
        pg = pg_collection if pg_collection is not None else get_default_pg_collection()
        self.layout = RankLayout(get_pg_size(pg.tp), get_pg_rank(pg.tp), get_pg_size(pg.cp), get_pg_rank(pg.cp),
                                 bool(config.sequence_parallel))
        self.feed, self.layer_number = feed, None
        self.pending: deque[_Entry] = deque()  # pushed, not yet run by this layer
        self.replay: deque[_Entry] = deque()  # run under activation checkpointing, recompute to come
        feed.routers.append(self)

    def set_layer_number(self, layer_number: int) -> None:
        self.layer_number = layer_number

    @property
    def head(self) -> int | None:
        """Per-layer routing: the head of this decoder layer (1-based global ``layer_number`` of
        ``config.num_layers``); an MTP layer, past the last, takes the last layer's."""
        return layer_head(self.feed.heads, self.config.num_layers, self.layer_number, self.is_mtp_layer)

    def _take(self) -> _Entry:
        """The routing of the micro-batch now running: the next pushed one, or for a recompute the oldest
        checkpointed one (see the module docstring)."""
        return next_entry(self, self.training)

    def forward(self, input: torch.Tensor, padding_mask: torch.Tensor | None = None):
        """``input [s, b, h]`` -> ``probs [s·b, E]`` float32 and ``routing_map [s·b, E]`` bool."""
        entry = self._take()
        s_local, b = input.shape[0], input.shape[1]
        return entry.probs_and_map(self.layout, s_local, b, self.feed.n_experts, input.device, self.head)

    def extra_repr(self) -> str:
        return f"experts={self.feed.n_experts}, k={self.feed.k}, {'online' if self.feed.grouter else 'stored'}"


# -- specs and models -----------------------------------------------------------------------------------
def _with_router(node, builder, found: list):
    """A copy of spec ``node`` with every MoESubmodules.router replaced by ``builder``."""
    if isinstance(node, MoESubmodules):
        found.append(node)
        return dataclasses.replace(node, router=builder)
    if isinstance(node, (list, tuple)):
        return type(node)(_with_router(n, builder, found) for n in node)
    if isinstance(node, partial):  # megatron-core 0.18+ specs: partial(MoELayer, submodules=MoESubmodules(...))
        return partial(node.func, *(_with_router(a, builder, found) for a in node.args),
                       **{k: _with_router(v, builder, found) for k, v in node.keywords.items()})
    if dataclasses.is_dataclass(node) and not isinstance(node, type):
        return dataclasses.replace(node, **{f.name: _with_router(getattr(node, f.name), builder, found)
                                            for f in dataclasses.fields(node) if f.init})
    return node


def with_grouter_router(spec, config: TransformerConfig, feed: RoutingFeed, allow_no_moe: bool = False):
    """A copy of a Megatron spec (layer, decoder block or MTP block) whose MoE layers use a
    :class:`GrouterRouter` reading ``feed``; refuses a ``config`` that does not fit the routing, and a
    spec without MoE layers unless ``allow_no_moe`` (a pipeline stage holding only dense layers)."""
    check_config(config, feed.n_experts, feed.k)
    found: list = []
    spec = _with_router(spec, partial(GrouterRouter, feed=feed), found)
    if not found and not allow_no_moe:
        raise GrouterError("the spec has no MoE layer; build it with num_experts (num_moe_experts) set")
    return spec
