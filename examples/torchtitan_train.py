"""Train torchtitan's Qwen3-MoE on a grouter dataset with stored Grouter routing: a few steps on the CPU.

    python examples/torchtitan_train.py --data DATA [--routing STORE] [--steps 20]

DATA comes from ``grouter data prepare --out DATA`` (or ``grouter data tokenize``); STORE from
``grouter dispatch --grouter G --data DATA --out STORE``. Without ``--routing`` a synthetic
clustered store (``grouter.testing.synthetic_store``, 8 experts, top-2) is written to a temporary
directory, so the example runs with a dataset alone. The recipe, step by step (see
``grouter.integrations.torchtitan`` for why each step is there):

1. a Qwen3-MoE config from torchtitan's own builders, sized to the dataset's vocabulary and the
   store's experts and k (``qwen3_moe_config``; expert bias and route_norm off; SDPA attention,
   since FlexAttention has no backward on the CPU);
2. ``GrouterRouterConverter``: every router becomes a parameter-free ``GrouterRouter``, after the
   config is checked against the store;
3. ``attach(model)``: a forward pre-hook takes ``routing_ids`` / ``routing_weights`` out of the
   forward's keyword arguments, exactly as torchtitan's Trainer passes the batch;
4. ``GrouterDataLoader``: grouter's packed sequences with their stored routing, in the sampler's order.

With torchtitan's Trainer (``torchtitan.train``; CUDA, and a torch that has
``torch.distributed.set_timeout``, see docs/torchtitan.md), from the repository root so that
``examples`` is importable. The demo's data, routing store and plan, on a small Qwen3-MoE sized
from them (``grouter_qwen3_moe_small``: the store's experts and k, the dataset's vocabulary and
sequence length; the dataset's own tokenizer as ``hf_assets_path``)::

    GROUTER_DATA=demo/data GROUTER_ROUTING=demo/routing-layers-all GROUTER_PLAN=demo/plan-layers-all \
    torchrun --nproc_per_node 4 -m torchtitan.train \
        --module examples.torchtitan_train --config grouter_qwen3_moe_small \
        --parallelism.data_parallel_shard_degree 4 --parallelism.expert_parallel_degree 4

and Qwen3-30B-A3B (``grouter_qwen3_30b_a3b``: torchtitan's ``qwen3_30b_a3b``; 128 experts, top-8,
so a store from a Grouter folded to 128 experts and dispatched with k=8, on a dataset tokenized with
the Qwen3 tokenizer; ``--hf_assets_path`` names that tokenizer's folder)::

    GROUTER_DATA=data/ GROUTER_ROUTING=store128/ GROUTER_PLAN=plan8/ \
    torchrun --nproc_per_node 8 -m torchtitan.train \
        --module examples.torchtitan_train --config grouter_qwen3_30b_a3b \
        --parallelism.data_parallel_shard_degree 8 --parallelism.expert_parallel_degree 8

Both configs come from ``grouter.integrations.torchtitan_trainer``: routers converted and checked
against the store, ``GrouterDataLoader`` serving the plan's sequences, ``training.seq_len`` the
dataset's, the global batch the plan's, CUDA graphs off. The plan must be for as many ranks as data
parallelism has, expert parallelism over the same ranks, and the local batch size must divide the
plan's per-rank share (gradient accumulation makes up the rest). Pipeline parallelism
(``--parallelism.pipeline_parallel_degree``) and context parallelism work with stored routing;
tensor parallelism is refused.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from grouter.errors import GrouterError
from grouter.formats.dataset import PackedDataset
from grouter.formats.store import RoutingStore
from grouter.integrations import torchtitan as gt


def _paths() -> tuple[str, str, str]:
    return tuple(os.environ.get(k, "") for k in ("GROUTER_DATA", "GROUTER_ROUTING", "GROUTER_PLAN"))


def grouter_qwen3_moe_small():
    """torchtitan Trainer config: a small Qwen3-MoE (dim 128, 4 MoE layers) sized for GROUTER_DATA
    and GROUTER_ROUTING (the store's experts and k), optionally GROUTER_PLAN; the dataset's
    tokenizer as ``hf_assets_path`` (torchtitan calls this function without arguments, before its
    command line is parsed, so the paths come from the environment)."""
    from grouter.integrations.torchtitan_trainer import small_trainer_config

    return small_trainer_config(*_paths())


def grouter_qwen3_30b_a3b():
    """torchtitan Trainer config: Qwen3-30B-A3B (128 experts, top-8) on GROUTER_DATA with the stored
    routing GROUTER_ROUTING and optionally the plan GROUTER_PLAN; ``hf_assets_path`` stays
    torchtitan's ``./assets/hf/Qwen3-30B-A3B`` (``--hf_assets_path`` to change it)."""
    from torchtitan.models.qwen3.config_registry import qwen3_30b_a3b

    from grouter.integrations.torchtitan_trainer import with_grouter_routing

    return with_grouter_routing(qwen3_30b_a3b(), *_paths())


def build_model(data: PackedDataset, store_dir: str, dim: int, layers: int):
    store = RoutingStore.open(store_dir, data=data)
    config = gt.qwen3_moe_config(vocab_size=data.vocab_size, dim=dim, n_layers=layers, n_heads=4, n_kv_heads=2,
                                 head_dim=dim // 4, moe_hidden_dim=dim, n_experts=store.n_experts, top_k=store.k,
                                 max_seq_len=data.seq_len)
    config = gt.GrouterRouterConverter.Config(routing=store_dir).build().convert(config)
    torch.manual_seed(0)
    model = config.build()
    model.init_states()
    gt.attach(model, heads=store.heads)  # per-layer routing: each decoder layer takes its head
    return model


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="grouter dataset directory")
    p.add_argument("--routing", help="its routing store (default: a synthetic one, 8 experts top-2)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=8, help="sequences per step")
    p.add_argument("--dim", type=int, default=64, help="model width (a multiple of 8)")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--lr", type=float, default=3e-3)
    args = p.parse_args(argv)
    data = PackedDataset.open(args.data)
    with tempfile.TemporaryDirectory() as tmp:
        store_dir = args.routing
        if store_dir is None:
            from grouter.testing import synthetic_store

            store_dir = str(synthetic_store(data, Path(tmp) / "store", n_experts=8, k=2, clusters=8))
        model = build_model(data, store_dir, args.dim, args.layers)
        loader = gt.GrouterDataLoader.Config(data=args.data, routing=store_dir).build(
            dp_world_size=1, dp_rank=0, seq_len=data.seq_len, local_batch_size=args.batch)
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
        start = time.perf_counter()
        for step, (inputs, labels) in zip(range(1, args.steps + 1), loader):
            loss = gt.lm_loss(model, inputs, labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if step == 1 or step % 5 == 0 or step == args.steps:
                print(f"step {step:4d}  loss {loss.item():.4f}  {time.perf_counter() - start:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except GrouterError as e:
        sys.exit(f"error: {e}")
