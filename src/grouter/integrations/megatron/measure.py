"""Measuring Megatron's expert-parallel all-to-alls with Grouter routing, against the planner.

:class:`AllToAllMeter` counts the bytes ``all_to_all_single`` sends to other ranks while a
Megatron-core GPT model with ``GrouterRouter`` runs its ``alltoall`` token dispatcher, by phase;
:func:`run_placement` runs one rank's steps under a placement (the plan's, or random) and records
the measured bytes beside what the planner predicts from the stored routing of the same sequences
(:func:`grouter.place.remote_volume`'s ``megatron`` count). :func:`measure_rank` is the worker for
:func:`grouter.device.spawn` (gloo, with the CPU stand-ins) or :func:`spawn_nccl` (one GPU a rank).
Used by benchmarks/megatron_bytes.py and the tests.
"""

from __future__ import annotations

import json
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

PHASES = ("dispatch", "dispatch_probs", "combine", "backward", "backward_probs")


class AllToAllMeter:
    """Bytes that ``all_to_all_single`` sends to other ranks while active (``with meter:``), by phase."""

    def __init__(self, model: torch.nn.Module):
        from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

        self.bytes: Counter = Counter()
        self.phase = "backward"
        dispatchers = [getattr(m, "token_dispatcher", None) for m in model.modules()]  # MoELayers hold one
        for d in dispatchers:
            if isinstance(d, MoEAlltoAllTokenDispatcher):
                d.token_dispatch = self._labelled(d.token_dispatch, "dispatch")
                d.token_combine = self._labelled(d.token_combine, "combine")

    def _labelled(self, fn, phase: str):
        def run(*args, **kwargs):
            self.phase = phase
            try:
                return fn(*args, **kwargs)
            finally:
                self.phase = "backward"
        return run

    def _count(self, output, input, output_split_sizes=None, input_split_sizes=None, group=None, async_op=False):
        me, n = dist.get_rank(group), dist.get_world_size(group)
        rows = [int(s) for s in input_split_sizes] if input_split_sizes is not None else [len(input) // n] * n
        row_bytes = input[0].numel() * input.element_size() if len(input) else 0
        self.bytes[self.phase + ("_probs" if input.dim() == 1 else "")] += (sum(rows) - rows[me]) * row_bytes
        return self._original(output, input, output_split_sizes, input_split_sizes, group=group, async_op=async_op)

    def __enter__(self) -> "AllToAllMeter":
        self._original = dist.all_to_all_single
        dist.all_to_all_single = self._count
        return self

    def __exit__(self, *exc) -> None:
        dist.all_to_all_single = self._original

    def take(self) -> dict[str, int]:
        out = {p: int(self.bytes[p]) for p in PHASES}
        self.bytes.clear()
        return out


def model_config(job: dict, store):
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(num_layers=job["layers"], hidden_size=job["hidden"], num_attention_heads=4,
                             ffn_hidden_size=2 * job["hidden"], moe_ffn_hidden_size=job["hidden"],
                             num_moe_experts=store.n_experts, moe_router_topk=store.k, moe_aux_loss_coeff=0.0,
                             moe_token_dispatcher_type="alltoall", expert_model_parallel_size=job["world"],
                             hidden_dropout=0.0, attention_dropout=0.0, add_bias_linear=False,
                             use_cpu_initialization=True)


def setup_rank(world: int, cuda: bool) -> None:
    """Megatron's parallel state for this process: EP over all ranks (and the RNG tracker on GPUs)."""
    from megatron.core import parallel_state, tensor_parallel

    if cuda:
        torch.cuda.set_device(dist.get_rank() % torch.cuda.device_count())
    else:
        from grouter.integrations.megatron.cpu import cpu_stubs

        cpu_stubs(setattr)
    parallel_state.initialize_model_parallel(expert_model_parallel_size=world)
    if cuda:
        tensor_parallel.model_parallel_cuda_manual_seed(0)


def run_placement(rank: int, job: dict, placement: str, data, store, plan) -> list[dict]:
    """``job["steps"]`` forward + backward steps of this rank under ``placement``; measured and predicted bytes."""
    from torch.utils.data import default_collate

    from grouter.ep import rank_batches
    from grouter.integrations.megatron import GrouterGPTDataset, RoutingFeed, grouter_gpt_model
    from grouter.place import remote_volume

    device = torch.device("cuda", torch.cuda.current_device()) if job["cuda"] else torch.device("cpu")
    config = model_config(job, store)
    feed = RoutingFeed.from_store(store, plan if placement == "plan" else None, device=device)
    torch.manual_seed(0)
    model = grouter_gpt_model(config, feed, data.vocab_size, data.seq_len).to(device)
    meter, dataset = AllToAllMeter(model), GrouterGPTDataset(data, store, create_attention_mask=True)
    batches = rank_batches(plan, placement, job["world"])
    rank_of_expert = plan.rank_of_expert if placement == "plan" else np.arange(store.n_experts) // (
        store.n_experts // job["world"])
    layer_bytes = config.hidden_size * torch.tensor([], dtype=config.params_dtype).element_size()
    heads = store.heads.for_target(config.num_layers) if store.heads else (None,) * config.num_layers
    records = []
    for step in range(job["steps"]):
        idx = np.sort(batches[step % len(batches)][rank])
        batch = {key: t.to(device) for key, t in default_collate([dataset[i] for i in idx]).items()}
        feed.push(batch)
        with meter:
            loss = model(batch["tokens"], batch["position_ids"], batch["attention_mask"], labels=batch["labels"])
            loss.float().mean().backward()
        ids = store.ids("train")[idx]  # each layer dispatches by its own head's routing (per-layer heads)
        copies = sum(remote_volume(ids if h is None else ids[:, :, h], rank_of_expert, np.full(len(idx), rank))[
            "megatron"] for h in heads)
        records.append({"rank": rank, "step": step, "placement": placement, "sequences": len(idx),
                        "measured": meter.take(), "predicted_dispatch": copies * layer_bytes,
                        "row_bytes": layer_bytes * config.num_layers})
    feed.check_drained()
    return records


def measure_rank(rank: int, world: int, job: dict) -> None:
    """One rank of the spawn: both placements, records written to ``job["out"]/rank{rank}.json``."""
    from megatron.core import parallel_state

    from grouter.formats.dataset import PackedDataset
    from grouter.formats.store import RoutingStore

    warnings.filterwarnings("ignore", module="megatron")
    setup_rank(world, job["cuda"])
    data = PackedDataset.open(job["data"])
    store, plan = RoutingStore.open(job["routing"], data=data, verify=False), job["plan"]
    records = [r for p in ("plan", "random") for r in run_placement(rank, {**job, "world": world}, p, data, store,
                                                                     plan)]
    Path(job["out"], f"rank{rank}.json").write_text(json.dumps(records))
    parallel_state.destroy_model_parallel()


def _nccl_worker(rank: int, world: int, port: int, fn, args: tuple) -> None:  # pragma: no cover - needs GPUs
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def spawn_nccl(world: int, fn, args: tuple) -> None:
    """``grouter.device.spawn`` with NCCL: one process per GPU."""
    import torch.multiprocessing as mp

    from grouter.device import free_port

    mp.spawn(_nccl_worker, args=(world, free_port(), fn, args), nprocs=world, join=True)
