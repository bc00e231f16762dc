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

Multi-GPU, with torchtitan's Trainer (a full torchtitan install, with its training dependencies
such as tensorboard, and CUDA; run from the repository root so ``examples`` is importable)::

    GROUTER_DATA=data/ GROUTER_ROUTING=store128/ GROUTER_PLAN=plan8/ \\
    torchrun --nproc_per_node 8 -m torchtitan.train \\
        --module examples.torchtitan_train --config grouter_qwen3_30b_a3b \\
        --parallelism.data_parallel_shard_degree 8 --parallelism.expert_parallel_degree 8

``grouter_qwen3_30b_a3b`` (below) is torchtitan's ``qwen3_30b_a3b`` Trainer config with the model
spec from ``grouter_model_spec`` (routers converted; ``parallelize_fn`` attaches the routing) and
``GrouterDataLoader`` (and CUDA graphs off, which torchtitan requires for expert parallelism
with its all-to-all dispatcher). Qwen3-30B-A3B has 128 experts, top-8: the store must come from a Grouter
folded to 128 experts, dispatched with k=8, on a dataset tokenized with the Qwen3 tokenizer
(``grouter data tokenize --tokenizer Qwen/Qwen3-30B-A3B``); the config refuses anything else.
With ``GROUTER_PLAN`` (``grouter place --routing STORE --ranks 8``) the plan must be for as many
ranks as data parallelism has, with expert parallelism over the same ranks (EP = DP = 8 above);
the global batch is the plan's, and the local batch size must divide the plan's per-rank share
(gradient accumulation makes up the rest). ``training.seq_len`` is set to the dataset's. Tensor
and pipeline parallelism are refused; context parallelism (``--parallelism.context_parallel_degree``)
shards the routing like the tokens. Online routing instead of a store: ``grouter_model_spec(spec,
grouter=G)`` and a ``GrouterDataLoader`` without ``routing`` (nor a plan, nor context
parallelism).
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


def grouter_qwen3_30b_a3b():
    """torchtitan Trainer config: Qwen3-30B-A3B on a grouter dataset with stored routing.

    Paths from the environment (torchtitan calls this function without arguments, before its
    command line is parsed): GROUTER_DATA, GROUTER_ROUTING and optionally GROUTER_PLAN.
    """
    from torchtitan.models.qwen3.config_registry import qwen3_30b_a3b

    from grouter.formats.plan import Plan

    data, routing, plan = (os.environ.get(k, "") for k in ("GROUTER_DATA", "GROUTER_ROUTING", "GROUTER_PLAN"))
    config = qwen3_30b_a3b()
    dataset = PackedDataset.open(data)
    if dataset.vocab_size > config.model_spec.model.vocab_size:
        raise GrouterError(f"the dataset's vocabulary ({dataset.vocab_size}) exceeds the model's; tokenize it "
                           "with the model's tokenizer (`grouter data tokenize --tokenizer ...`)")
    gt.turn_off_balancing(config.model_spec.model)
    config.model_spec = gt.grouter_model_spec(config.model_spec, routing=routing)
    config.dataloader = gt.GrouterDataLoader.Config(data=data, routing=routing, plan=plan)
    config.training.seq_len = dataset.seq_len
    # torchtitan refuses CUDA graphs with the all-to-all dispatcher (it syncs with the host) under EP.
    config.training.disable_cuda_graphs = True
    if plan:
        config.training.global_batch_size = Plan.load(plan).global_batch
    return config


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
