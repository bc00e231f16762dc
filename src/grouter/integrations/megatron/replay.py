"""Ids-only routing: Megatron's own router and its ``RouterReplay``, driven by stored expert ids.

With ``moe_enable_routing_replay`` Megatron's ``TopKRouter`` can replay given top-k expert ids: its
scores are computed by its own (trainable) gate and gathered at the replayed ids, then normalised as
usual. That is RL routing replay: the trainer uses the experts an inference engine chose, with weights
from the trainer's router. :func:`drive_router_replay` feeds it from a routing store (or imported
``routed_experts``, :mod:`grouter.integrations.routed_experts`): a :class:`~.router.RoutingFeed` is
pushed once per micro-batch as for :class:`~.router.GrouterRouter`, and before each router runs its
micro-batch's ids, cut to the rank's tokens and relabelled by a plan, become the replay target. The
phase logic is the feed's (a checkpointed forward keeps its ids for the recompute), so activation
recompute and pipeline schedules need no switching of replay actions.

The other way, :func:`record_router_replay` and :func:`recorded_routed_experts` turn what Megatron's
routers chose (``RECORD``) into ``routed_experts`` ``[b, seq, layers, k]``: a replay log that
:func:`~grouter.integrations.routed_experts.import_routed_experts` makes a store, for ``grouter place``.
"""

from __future__ import annotations

from collections import deque

import torch
from megatron.core.transformer.moe.router import TopKRouter
from megatron.core.transformer.moe.router_replay import RouterReplayAction
from megatron.core.utils import get_pg_rank, get_pg_size

from ...errors import GrouterError
from .router import RankLayout, RoutingFeed, layer_head, next_entry


class _ReplayDriver:
    """Sets one TopKRouter's replay target to its micro-batch's ids just before it runs (a forward pre-hook)."""

    def __init__(self, router: TopKRouter, feed: RoutingFeed):
        tp, cp = router.tp_group, router.cp_group
        self.layout = RankLayout(get_pg_size(tp), get_pg_rank(tp), get_pg_size(cp), get_pg_rank(cp),
                                 bool(router.config.sequence_parallel))
        self.router, self.feed = router, feed
        self.pending: deque = deque()  # pushed, not yet run by this layer
        self.replay: deque = deque()  # run under activation checkpointing, recompute to come
        feed.routers.append(self)
        router.register_forward_pre_hook(self._before)

    @property
    def layer_number(self) -> int | None:
        return self.router.layer_number

    def _before(self, module: TopKRouter, args) -> None:
        hidden = args[0]
        entry = next_entry(self, module.training)
        head = layer_head(self.feed.heads, module.config.num_layers, module.layer_number,
                          bool(getattr(module, "is_mtp_layer", False)))
        ids, _ = entry.local_routing(self.layout, hidden.shape[0], hidden.shape[1], hidden.device, head)
        module.router_replay.set_router_replay_action(RouterReplayAction.REPLAY_FORWARD)
        module.router_replay.target_topk_idx = ids  # what REPLAY_FORWARD gathers the router's scores at


def replay_routers(model: torch.nn.Module) -> list[TopKRouter]:
    """The TopKRouters of ``model`` (one model chunk) that have a RouterReplay, in module order."""
    routers = [m for m in model.modules() if isinstance(m, TopKRouter)]
    if not routers or any(r.router_replay is None for r in routers):
        raise GrouterError("the model has no Megatron TopKRouter with routing replay: build it with Megatron's own "
                           "router and TransformerConfig(moe_enable_routing_replay=True)")
    return routers


def drive_router_replay(model: torch.nn.Module, feed: RoutingFeed) -> RoutingFeed:
    """Make ``model``'s routers replay the ids ``feed`` is pushed (``feed.push(batch)`` once per micro-batch,
    before the model runs it); weights come from the routers themselves. Returns ``feed``."""
    routers = replay_routers(model)
    config = routers[0].config
    if (config.num_moe_experts, config.moe_router_topk) != (feed.n_experts, feed.k):
        raise GrouterError(f"the model routes top-{config.moe_router_topk} of {config.num_moe_experts} experts but "
                           f"the routing is top-{feed.k} of {feed.n_experts}; build the model for the routing")
    if feed.grouter is not None:
        raise GrouterError("routing replay takes stored ids; build the feed with RoutingFeed.from_store")
    if getattr(config, "cuda_graph_impl", "none") not in (None, "none"):
        raise GrouterError("a captured graph would replay one micro-batch's ids for every later one; set "
                           "cuda_graph_impl='none' (--cuda-graph-impl none)")
    for router in routers:
        _ReplayDriver(router, feed)
    return feed


def record_router_replay(model: torch.nn.Module) -> None:
    """Let ``model``'s routers route by themselves and record their top-k ids (RouterReplay's RECORD)."""
    for router in replay_routers(model):
        router.router_replay.set_router_replay_action(RouterReplayAction.RECORD)


def recorded_routed_experts(model: torch.nn.Module, batch_size: int, seq_len: int) -> torch.Tensor:
    """The ids the routers recorded for the last micro-batch, as ``routed_experts`` ``[b, seq, layers, k]``
    (layers in module order: decoder, then MTP). Needs full sequences on the rank (no CP or SP)."""
    out = []
    for router in replay_routers(model):
        if router.config.sequence_parallel or get_pg_size(router.cp_group) > 1:
            raise GrouterError("recorded ids are the rank's share under context or sequence parallelism; record "
                               "without them (full sequences on each rank)")
        ids = router.router_replay.get_recorded_indices()
        if ids is None or ids.shape[0] != batch_size * seq_len:
            raise GrouterError(f"MoE layer {router.layer_number} recorded no ids for a {batch_size} x {seq_len} "
                               "micro-batch; call record_router_replay(model) and run it first")
        out.append(ids.view(seq_len, batch_size, -1).transpose(0, 1))  # Megatron's [s, b] token order
    return torch.stack(out, dim=2)
