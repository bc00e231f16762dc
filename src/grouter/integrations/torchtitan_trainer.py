"""torchtitan ``Trainer.Config`` s with Grouter routing: torchtitan's own Trainer, unchanged.

:func:`with_grouter_routing` turns any Qwen3-MoE Trainer config (e.g. torchtitan's
``qwen3_30b_a3b``) into one trained from a grouter dataset with its routing store and placement
plan; :func:`small_trainer_config` is a small Qwen3-MoE sized for a dataset and its store (its
number of experts and k read from the store), for trying the launch on the demo's data. Both
are what ``examples/torchtitan_train.py`` hands to ``torchtitan.train``; docs/torchtitan.md has
the launch and the tokenizer question (``hf_assets_path``).
"""

from __future__ import annotations

import dataclasses

from . import torchtitan as gt
from ..errors import GrouterError
from ..formats.dataset import PackedDataset
from ..formats.plan import Plan
from ..formats.store import RoutingStore


def _check_torch() -> None:
    """torchtitan 0.3.0's Trainer needs a torch newer than 2.13 (docs/torchtitan.md#versions): refuse now,
    not after the first training step."""
    import torch.distributed

    if not hasattr(torch.distributed, "set_timeout"):
        raise GrouterError(f"torchtitan 0.3.0's Trainer calls torch.distributed.set_timeout after its first step, "
                           f"which torch {torch.__version__} does not have (pytorch#187387 made it public); install "
                           "a torch that has it (docs/torchtitan.md#versions)")


def _require(data: str, routing: str) -> None:
    if not data or not routing:
        raise GrouterError("set GROUTER_DATA (a grouter dataset) and GROUTER_ROUTING (its routing store) before "
                           "launching; GROUTER_PLAN (a placement plan) is optional")


def with_grouter_routing(config, data: str, routing: str, plan: str = ""):
    """``config`` (a torchtitan ``Trainer.Config`` of a Qwen3-MoE model) trained from ``data`` with
    the stored ``routing`` (and ``plan``): routers converted and checked against the store, the
    dataloader grouter's, ``training.seq_len`` the dataset's, the global batch the plan's."""
    _require(data, routing)
    dataset = PackedDataset.open(data)
    if dataset.vocab_size > config.model_spec.model.vocab_size:
        raise GrouterError(f"the dataset's vocabulary ({dataset.vocab_size}) exceeds the model's "
                           f"({config.model_spec.model.vocab_size}); tokenize it with the model's tokenizer "
                           "(`grouter data tokenize --tokenizer ...`)")
    gt.turn_off_balancing(config.model_spec.model)
    config.model_spec = gt.grouter_model_spec(config.model_spec, routing=routing)
    config.dataloader = gt.GrouterDataLoader.Config(data=data, routing=routing, plan=plan)
    config.training.seq_len = dataset.seq_len
    # The routing is checked on the host as it arrives (a sync), and torchtitan refuses CUDA graphs
    # with its all-to-all dispatcher under EP anyway.
    config.training.disable_cuda_graphs = True
    if plan:
        config.training.global_batch_size = Plan.load(plan).global_batch
    _check_torch()
    return config


def small_model_spec(data: str, routing: str, dim: int = 128, n_layers: int = 4, n_heads: int = 4):
    """torchtitan's Qwen3-MoE model spec (its parallelize and pipelining functions) with a small
    model: ``dim`` wide, ``n_layers`` MoE layers, the dataset's vocabulary and sequence length,
    the store's number of experts and k; SDPA attention (whole packed sequences, causal)."""
    from torchtitan.models.qwen3 import model_registry

    dataset, store = PackedDataset.open(data), RoutingStore.open(routing, verify=False)
    model = gt.qwen3_moe_config(vocab_size=dataset.vocab_size, dim=dim, n_layers=n_layers, n_heads=n_heads,
                                n_kv_heads=max(1, n_heads // 2), head_dim=dim // n_heads, moe_hidden_dim=dim,
                                n_experts=store.n_experts, top_k=store.k, max_seq_len=dataset.seq_len)
    base = model_registry("debugmodel_moe")  # Qwen3-MoE's functions; its model is replaced
    return dataclasses.replace(base, flavor=f"grouter-{dim}x{n_layers}", model=model, state_dict_adapter=None)


def small_trainer_config(data: str, routing: str, plan: str = "", steps: int = 20, local_batch_size: int = 8,
                         lr: float = 3e-3, dump_folder: str = "./outputs"):
    """A torchtitan ``Trainer.Config`` for :func:`small_model_spec` on ``data`` with its stored
    ``routing``: full activation checkpointing, a checkpoint every 10 steps when enabled
    (``--checkpoint.enable``), the dataset's own tokenizer as ``hf_assets_path`` (the one that
    produced its token ids)."""
    from torchtitan.components.checkpoint import CheckpointManager
    from torchtitan.components.loss import CrossEntropyLoss
    from torchtitan.components.metrics import MetricsProcessor
    from torchtitan.components.optimizer import LRSchedulersContainer, default_adamw
    from torchtitan.config import TrainingConfig
    from torchtitan.distributed.activation_checkpoint import FullAC
    from torchtitan.trainer import Trainer

    _require(data, routing)
    spec = small_model_spec(data, routing)
    config = Trainer.Config(
        loss=CrossEntropyLoss.Config(global_vocab_size=spec.model.vocab_size),
        hf_assets_path=data,
        dump_folder=dump_folder,
        metrics=MetricsProcessor.Config(log_freq=1),
        model_spec=spec,
        optimizer=default_adamw(lr=lr),
        lr_scheduler=LRSchedulersContainer.Config(warmup_steps=2),
        training=TrainingConfig(local_batch_size=local_batch_size, steps=steps),
        checkpoint=CheckpointManager.Config(interval=10, last_save_model_only=False),
        activation_checkpoint=FullAC.Config(),
    )
    return with_grouter_routing(config, data, routing, plan)


__all__ = ["small_model_spec", "small_trainer_config", "with_grouter_routing"]
