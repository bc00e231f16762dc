"""Megatron's GPTModel with Grouter routing: GrouterRouters, or Megatron's own routers replaying ids."""

from __future__ import annotations

from functools import partial

from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import (get_gpt_decoder_block_spec, get_gpt_decoder_layer_specs,
                                                      get_gpt_mtp_block_spec)
from megatron.core.transformer.moe.moe_layer import BaseMoELayer
from megatron.core.transformer.transformer_config import TransformerConfig

from .compat import SUPPORTED, megatron_version
from ...errors import GrouterError
from .replay import drive_router_replay
from .router import GrouterRouter, RoutingFeed, with_grouter_router


def grouter_gpt_model(config: TransformerConfig, feed: RoutingFeed, vocab_size: int, max_sequence_length: int,
                      transformer_engine: bool = False, vp_stage: int | None = None, normalization: str | None = None,
                      qk_l2_norm: bool = False, replay: bool = False, **gpt_kwargs) -> GPTModel:
    """Megatron's GPTModel (decoder block spec, MTP block when ``config.mtp_num_layers``) with Grouter routing.

    ``transformer_engine``: TE layer specs (GPU) instead of Megatron's local ones; ``normalization`` and
    ``qk_l2_norm`` go to Megatron's spec functions, ``gpt_kwargs`` to GPTModel (``pre_process``,
    ``post_process``, ``position_embedding_type``, ``pg_collection``, ...). ``replay``: ids only,
    Megatron's own routers replaying the feed's ids (:func:`~.replay.drive_router_replay`; sets
    ``config.moe_enable_routing_replay``). Refuses a model in which Megatron built any MoE layer with
    another router than the one asked for (a spec layout this adapter does not know).
    """
    config.moe_enable_routing_replay = config.moe_enable_routing_replay or replay
    ours = (lambda spec: spec) if replay else partial(with_grouter_router, config=config, feed=feed, allow_no_moe=True)
    specs = dict(normalization=normalization, qk_l2_norm=qk_l2_norm, vp_stage=vp_stage)
    block = ours(get_gpt_decoder_block_spec(config, transformer_engine, **specs))
    mtp = None
    if config.mtp_num_layers:  # MTP layers copy the last decoder layer's spec, as Megatron's gpt_builder does
        last = get_gpt_decoder_layer_specs(config, transformer_engine, **specs)[-1]
        mtp = ours(get_gpt_mtp_block_spec(config, last, transformer_engine, vp_stage=vp_stage))
    model = GPTModel(config=config, transformer_layer_spec=block, vocab_size=vocab_size,
                     max_sequence_length=max_sequence_length, mtp_block_spec=mtp, vp_stage=vp_stage, **gpt_kwargs)
    if replay:
        if any(isinstance(m, BaseMoELayer) for m in model.modules()):  # a dense pipeline stage has no router
            drive_router_replay(model, feed)
        return model
    others = sorted({type(m.router).__name__ for m in model.modules()
                     if isinstance(m, BaseMoELayer) and not isinstance(m.router, GrouterRouter)})
    if others:
        raise GrouterError(f"megatron-core {megatron_version()} built MoE layers with {', '.join(others)}, not "
                           "GrouterRouter: its spec layout is not one this adapter knows; use a supported release "
                           f"({SUPPORTED})")
    return model
