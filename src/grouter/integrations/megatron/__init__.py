"""Megatron with Grouter routing: megatron-core's MoE layer, Megatron's trainer, routing replay.

* :mod:`.router`: :class:`GrouterRouter` (Megatron's ``MoESubmodules.router``, no parameters) and the
  :class:`RoutingFeed` that serves it each micro-batch's stored or online routing; the spec helpers.
* :mod:`.model`: Megatron's GPTModel with those routers (or, ids only, its own routers replaying ids).
* :mod:`.data`: GPTDataset-style items with routing, and an EP placement plan's sample order for
  Megatron's data loader (resumable at its consumed samples).
* :mod:`.pretrain`: the entry point, Megatron's own ``pretrain()`` with grouter's providers
  (``python -m grouter.integrations.megatron.pretrain``, as ``pretrain_gpt.py``).
* :mod:`.replay`: ids only: Megatron's own router replaying stored expert ids (``RouterReplay``), and
  its recorded ids as ``routed_experts`` (:mod:`grouter.integrations.routed_experts`).
* :mod:`.compat`: what differs between the megatron-core releases the adapter supports.

docs/megatron.md explains it all; ``pip install grouter[megatron]``.
"""

from .data import GrouterGPTDataset, OrderedSamples, check_plan_layout, plan_data_loader, plan_order
from .model import grouter_gpt_model
from .replay import drive_router_replay, record_router_replay, recorded_routed_experts
from .router import (GrouterRouter, RankLayout, RoutingFeed, check_config, context_parallel_chunk,
                     sequence_parallel_chunk, with_grouter_router)

__all__ = ["GrouterGPTDataset", "GrouterRouter", "OrderedSamples", "RankLayout", "RoutingFeed", "check_config",
           "check_plan_layout", "context_parallel_chunk", "drive_router_replay", "grouter_gpt_model",
           "plan_data_loader", "plan_order", "record_router_replay", "recorded_routed_experts",
           "sequence_parallel_chunk", "with_grouter_router"]
