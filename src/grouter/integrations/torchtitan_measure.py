"""Measuring torchtitan's expert-parallel all-to-alls with Grouter routing, against the planner.

A subclass of torchtitan's ``AllToAllTokenDispatcher`` (:class:`CountingDispatcher`, swapped into the
model config) records the rows (token copies) every dispatch all-to-all sends to each rank; its
dispatcher sends one row per (token, expert) pair, so the copies to other ranks are grouter's
``megatron`` cost model, which :func:`measured_and_predicted` computes from the stored routing of
the same sequences (:func:`grouter.place.remote_volume`). :func:`run_ep` is the worker (for
:func:`grouter.device.spawn`) that runs torchtitan's Qwen3-MoE under its own expert parallelism
(``ParallelDims(dp_shard=R, ep=R)``, experts ``Shard(0)`` over the EP mesh) on the CPU with gloo:
``torchtitan.tools.utils.device_type`` falls back to "cuda" without an accelerator, so the mesh is
pointed at "cpu", and the SPMD backend is ``partial_dtensor`` (the default ``spmd_types`` reads a
mesh torchtitan's Trainer sets up, which a bare forward does not have). Used by
benchmarks/torchtitan_bytes.py and the tests.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torchtitan.models.common.token_dispatcher import AllToAllTokenDispatcher


class CountingDispatcher(AllToAllTokenDispatcher):
    """torchtitan's all-to-all dispatcher, recording the rows each dispatch sends to each rank."""

    @dataclass(kw_only=True, slots=True)
    class Config(AllToAllTokenDispatcher.Config):
        pass

    def __init__(self, config: Config):
        super().__init__(config)
        self.sent: list[tuple[list[int], int]] = []  # (rows to each rank, bytes per row) per dispatch

    def _dispatch_token_exchange(self, routed_input_ND, pg, output_splits, input_splits):
        self.sent.append((list(input_splits), routed_input_ND.shape[1] * routed_input_ND.element_size()))
        return super()._dispatch_token_exchange(routed_input_ND, pg, output_splits, input_splits)


def model_config(run: dict, vocab_size: int, seq_len: int):
    """Tiny Qwen3-MoE with Grouter routers (checked against the store) and counting dispatchers."""
    from grouter.formats.store import RoutingStore
    from grouter.integrations import torchtitan as gt

    store = RoutingStore.open(run["routing"], verify=False)
    cfg = gt.qwen3_moe_config(vocab_size=vocab_size, dim=run["dim"], n_layers=run["layers"], n_heads=4,
                              n_kv_heads=2, head_dim=run["dim"] // 4, moe_hidden_dim=run["dim"],
                              n_experts=store.n_experts, top_k=store.k, max_seq_len=seq_len)
    cfg = gt.GrouterRouterConverter.Config(routing=str(run["routing"])).build().convert(cfg)
    for layer in cfg.layers:
        layer.moe.routed_experts.token_dispatcher = CountingDispatcher.Config(num_experts=store.n_experts,
                                                                              top_k=store.k)
    return cfg


def ep_model(cfg, world: int):
    """``cfg`` built and parallelised with torchtitan's expert parallelism over ``world`` gloo ranks."""
    import torchtitan.distributed.parallel_dims as parallel_dims
    from torchtitan.distributed import utils as dist_utils
    from torchtitan.models.qwen3.sharding import set_qwen3_sharding_config

    parallel_dims.device_type = "cpu"  # torchtitan's fallback without an accelerator is "cuda"
    dist_utils.set_spmd_backend("partial_dtensor")
    dims = parallel_dims.ParallelDims(dp_replicate=1, dp_shard=world, cp=1, tp=1, pp=1, ep=world,
                                      world_size=world, spmd_backend="partial_dtensor")
    dims.build_mesh()
    set_qwen3_sharding_config(cfg, enable_sp=False, enable_ep=True)
    model = built(cfg)
    model.parallelize(dims)
    return model


def built(cfg):
    """The model of ``cfg``, initialised from seed 0 (the same weights on every rank)."""
    torch.manual_seed(0)
    model = cfg.build()
    model.init_states()
    return model


def run_ep(rank: int, world: int, run: dict) -> None:
    """Worker for ``grouter.device.spawn``: ``run["steps"]`` EP forward/backward passes; writes
    ``run["out"]/rank{rank}.json`` with each step's loss and the rows each MoE layer sent (and with
    ``run["reference"]``, the loss of the same model without EP on the same batch)."""
    from grouter.formats.dataset import PackedDataset
    from grouter.integrations import torchtitan as gt

    data = PackedDataset.open(run["data"])
    cfg = model_config(run, data.vocab_size, data.seq_len)
    reference = built(cfg) if run.get("reference") else None  # before ep_model adds EP sharding to cfg
    model = ep_model(cfg, world)
    for m in (model, reference):
        if m is not None:
            gt.attach(m)
    loader = gt.GrouterDataLoader.Config(data=str(run["data"]), routing=str(run["routing"]), plan=str(run["plan"]))
    loader = loader.build(dp_world_size=world, dp_rank=rank, seq_len=data.seq_len, local_batch_size=run["batch"])
    dispatchers = [layer.moe.routed_experts.token_dispatcher for layer in model.layers.values()]
    records = []
    order = iter(loader.sequence_batches)  # the same deterministic sequence order the loader serves
    for step, (inputs, labels) in zip(range(run["steps"]), loader):
        rec = {"step": step, "sequences": next(order).tolist()}
        if reference is not None:
            rec["reference_loss"] = gt.lm_loss(reference, inputs, labels).item()
        loss = gt.lm_loss(model, inputs, labels)
        loss.backward()
        rec["loss"], rec["sent"] = loss.item(), [d.sent.pop() for d in dispatchers]
        records.append(rec)
    Path(run["out"]).mkdir(parents=True, exist_ok=True)
    (Path(run["out"]) / f"rank{rank}.json").write_text(json.dumps(records))


def random_plan(plan, out: Path, seed: int = 0) -> Path:
    """The random baseline as a plan: identity permutation, the plan's batches dealt at random."""
    from grouter.ep import rank_batches

    dealt = rank_batches(plan, "random", plan.ranks, seed=seed)
    samples = [[dealt[b][r] for b in range(plan.n_batches)] for r in range(plan.ranks)]
    out.mkdir(parents=True, exist_ok=True)
    dataclasses.replace(plan, permutation=np.arange(plan.n_experts), samples=samples, report={}).save(out)
    return out


def measured_and_predicted(out: Path, store, plan, world: int) -> dict:
    """Rows sent to other ranks per rank, step and layer, measured and from ``remote_volume``."""
    from grouter.place import remote_volume

    measured, predicted, row_bytes = [], [], set()
    for rank in range(world):
        for rec in json.loads((out / f"rank{rank}.json").read_text()):
            for splits, nbytes in rec["sent"]:
                measured.append(sum(n for r, n in enumerate(splits) if r != rank))
                row_bytes.add(nbytes)
            ids = store.ids("train")[np.asarray(rec["sequences"])]
            predicted.append(remote_volume(ids, plan.rank_of_expert, np.full(len(ids), rank))["megatron"])
    layers = len(measured) // len(predicted)
    return {"rows": float(np.mean(measured)), "predicted_rows": float(np.mean(predicted)),
            "exact": measured == [p for p in predicted for _ in range(layers)], "row_bytes": row_bytes.pop()}
