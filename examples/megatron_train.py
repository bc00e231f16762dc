"""Train a Megatron-core GPT MoE for a few steps with Grouter routing, in a loop of your own.

To train with Megatron's own trainer (its schedules, pipeline parallelism, optimizer, LR schedule,
checkpointing and resume) use the entry point instead, as ``pretrain_gpt.py`` (docs/megatron.md):
``torchrun ... -m grouter.integrations.megatron.pretrain --grouter-data D --grouter-routing S <Megatron's args>``.
This example shows the pieces underneath, for a training loop that is not Megatron's.

Megatron's own pieces do the training: GPTModel (decoder and, with --mtp, MTP blocks), the alltoall
token dispatcher, DistributedDataParallel with ``finalize_model_grads``, the Megatron optimizer (GPUs)
and a ``forward_step(data_iterator, model)`` that plugs into Megatron's schedules. grouter supplies the
router (:class:`GrouterRouter`, no parameters), the per-micro-batch routing (:class:`RoutingFeed`,
pushed in ``forward_step``), the dataset (:class:`GrouterGPTDataset`, GPTDataset-style items plus
routing) and, with ``--plan``, the sample placement (:func:`plan_data_loader`) and expert permutation
of an EP placement plan. Prints one JSON line per step (rank 0's loss and tokens, seconds) and checks
that every pushed routing was used.

CPU (gloo; megatron-core's hard-coded CUDA calls are replaced by the stand-ins of
``grouter.integrations.megatron.cpu``):

    python examples/megatron_train.py --data demo/data --routing demo/routing-layers-all --steps 5
    grouter place --routing demo/routing-layers-all --ranks 2 --out demo/plan2
    torchrun --nproc_per_node 2 examples/megatron_train.py --data demo/data --routing demo/routing-layers-all \\
        --plan demo/plan2 --ep 2 --steps 5

GPUs (NCCL, Transformer Engine layers, bf16; one process per GPU). One node of 8 GPUs, expert parallel
over all of them (EP 8 = DP 8), a plan for 8 ranks with 16 sequences per rank per global batch
(micro batch 4: 4 micro-batches per step):

    grouter place --routing demo/routing-layers-all --ranks 8 --global-batch 128 --out demo/plan8
    torchrun --nproc_per_node 8 examples/megatron_train.py --data demo/data --routing demo/routing-layers-all \
        --plan demo/plan8 --ep 8 --device cuda --transformer-engine --bf16 --micro-batch-size 4 --steps 100

    Two nodes of 8: `grouter place --ranks 16 --ranks-per-node 8 --global-batch 256 ...` and
    `torchrun --nnodes 2 --nproc_per_node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 ... --ep 16`.
    Tensor parallelism 2 with sequence parallelism on 8 GPUs: DP = EP = 4, expert TP = TP (Megatron's
    default), a plan for 4 ranks: `--tp 2 --sequence-parallel --ep 4 --plan demo/plan4`; the plan stays
    exact (each SP shard dispatches within its EP group, whose rank r is DP replica r).
    Online routing instead of a store: `--grouter DIR`. Activation recompute: `--recompute full|moe`.
    Context parallelism: `--cp 2` (TE attention only; the plan is then approximate).

Pipeline parallelism is not wired in this example: the entry point above runs Megatron's pipeline
schedules (every stage reads its data iterator and pushes; docs/megatron.md).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from functools import partial

import torch

warnings.filterwarnings("ignore", module="megatron")

def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="a packed dataset (grouter data prepare / tokenize)")
    p.add_argument("--routing", help="its routing store (grouter dispatch)")
    p.add_argument("--grouter", help="route online with this Grouter instead of a store")
    p.add_argument("--plan", help="an EP placement plan (grouter place --ranks <DP>)")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--micro-batch-size", type=int, default=2)
    p.add_argument("--global-batch", type=int, help="sequences per step over all DP ranks (default: the plan's)")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--cp", type=int, default=1)
    p.add_argument("--ep", type=int, default=1)
    p.add_argument("--sequence-parallel", action="store_true")
    p.add_argument("--recompute", choices=["full", "moe"])
    p.add_argument("--mtp", type=int, default=0, help="multi-token prediction layers")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--transformer-engine", action="store_true", help="TE layer specs (GPU)")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--seed", type=int, default=0, help="model initialisation and data order")
    return p.parse_args(argv)


def start(args) -> None:
    """Process group (torchrun's, or one process), Megatron's parallel state, and the RNG tracker."""
    from megatron.core import parallel_state, tensor_parallel

    from grouter.device import ProcessGroup

    pg = ProcessGroup(args.device, always=True)
    if pg.device.type == "cuda":
        torch.cuda.set_device(pg.device)
    else:
        from grouter.integrations.megatron.cpu import cpu_stubs

        cpu_stubs(setattr)
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=args.tp, context_parallel_size=args.cp,
                                             expert_model_parallel_size=args.ep)
    torch.manual_seed(args.seed)  # the model's initial weights: the same every run
    if pg.device.type == "cuda":
        tensor_parallel.model_parallel_cuda_manual_seed(args.seed)


def transformer_config(args, n_experts: int, k: int):
    from megatron.core.transformer.transformer_config import TransformerConfig

    recompute = {"full": dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),
                 "moe": dict(recompute_granularity="selective", recompute_modules=["moe"]), None: {}}[args.recompute]
    return TransformerConfig(
        num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=args.heads,
        ffn_hidden_size=4 * args.hidden, moe_ffn_hidden_size=args.hidden, num_moe_experts=n_experts,
        moe_router_topk=k, moe_aux_loss_coeff=0.0, moe_token_dispatcher_type="alltoall",
        moe_grouped_gemm=args.transformer_engine, mtp_num_layers=args.mtp or None,
        tensor_model_parallel_size=args.tp, context_parallel_size=args.cp, expert_model_parallel_size=args.ep,
        sequence_parallel=args.sequence_parallel, bf16=args.bf16, params_dtype=torch.bfloat16 if args.bf16 else
        torch.float32, hidden_dropout=0.0, attention_dropout=0.0, add_bias_linear=False,
        use_cpu_initialization=args.device == "cpu", **recompute)


def inputs(args):
    """Dataset, routing store (None online), plan, feed and the DP rank's micro-batch loader."""
    from megatron.core import parallel_state
    from torch.utils.data import DataLoader, DistributedSampler

    from grouter import Grouter, PackedDataset, Plan, RoutingStore
    from grouter.integrations.megatron import GrouterGPTDataset, RoutingFeed, plan_data_loader

    data = PackedDataset.open(args.data)
    store = RoutingStore.open(args.routing, data=data) if args.routing else None
    plan = Plan.load(args.plan) if args.plan else None
    device = torch.device("cuda", torch.cuda.current_device()) if args.device == "cuda" else None
    feed = (RoutingFeed.from_store(store, plan, device=device) if store is not None else
            RoutingFeed.online(Grouter.from_pretrained(args.grouter).to(device or "cpu"), plan=plan, device=device))
    dataset = GrouterGPTDataset(data, store, create_attention_mask=not args.transformer_engine)
    dp, rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    if plan is not None:
        loader = plan_data_loader(dataset, plan, rank, dp, args.micro_batch_size)
        global_batch = plan.global_batch
    else:
        sampler = DistributedSampler(dataset, dp, rank, shuffle=True, seed=args.seed, drop_last=True)
        loader = DataLoader(dataset, batch_size=args.micro_batch_size, sampler=sampler, drop_last=True)
        global_batch = args.global_batch or args.micro_batch_size * dp
    if args.global_batch not in (None, global_batch) or global_batch % (args.micro_batch_size * dp):
        raise SystemExit(f"the global batch ({global_batch}, the plan's when given) must be a multiple of "
                         f"micro batch x DP = {args.micro_batch_size * dp}")
    return data, feed, loader, global_batch // (args.micro_batch_size * dp)


def forward_step(data_iterator, model, device):
    """Megatron's forward_step: this micro-batch's routing to the feed, Megatron's CP split, the model."""
    from megatron.core.utils import get_batch_on_this_cp_rank

    from grouter.integrations.megatron import RoutingFeed

    batch = {key: t.to(device, non_blocking=True) for key, t in next(data_iterator).items()}
    RoutingFeed.of(model).push(batch)  # full sequences; the router cuts this rank's share
    batch = get_batch_on_this_cp_rank(batch)
    output = model(batch["tokens"], batch["position_ids"], batch.get("attention_mask"), labels=batch["labels"])
    return output, partial(loss_func, batch["loss_mask"])


def loss_func(loss_mask, output):
    """Sum of the masked per-token losses and their count (Megatron averages over the global batch)."""
    losses = output.float().view(-1) * loss_mask.view(-1)
    tokens = loss_mask.sum().to(torch.int)
    return losses.sum(), tokens, {"lm loss": torch.stack([losses.sum().detach(), tokens.float()])}


def optimizer_step(args, model):
    """Megatron's optimizer on GPUs; on the CPU (its FP32Optimizer allocates a CUDA loss scale,
    optimizer/optimizer.py:907) torch's AdamW on the gradients Megatron's DDP reduced into ``main_grad``."""
    if args.device == "cuda":
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

        opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=args.lr, bf16=args.bf16, clip_grad=1.0),
                                     [model])
        return lambda: opt.step()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)

    def step():
        for p in params:
            p.grad = p.main_grad.to(p.dtype)
        torch.nn.utils.clip_grad_norm_(params, 1.0)  # per rank: enough for a CPU demonstration
        opt.step()
    return step


def run_step(model, batches, n_micro: int, device) -> tuple[float, int]:
    """One global step's forwards and backwards, as Megatron's forward_backward_no_pipelining runs them (its
    schedule allocates on CUDA, pipeline_parallel/schedules.py:596, so the loop is spelled out here), then
    Megatron's gradient all-reduce over data- and expert-data-parallel ranks, divided by the token count."""
    from megatron.core.distributed import finalize_model_grads

    model.zero_grad_buffer()
    loss, tokens = torch.zeros((), device=device), torch.zeros((), dtype=torch.int, device=device)
    for _ in range(n_micro):
        output, reduce = forward_step(batches, model, device)
        micro_loss, micro_tokens, _ = reduce(output)
        micro_loss.backward()
        loss, tokens = loss + micro_loss.detach(), tokens + micro_tokens
    finalize_model_grads([model], num_tokens=tokens.clone())  # all-reduces (and so changes) the count it gets
    return float(loss / tokens), int(tokens)


def train(args) -> None:
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from grouter.integrations.megatron import RoutingFeed, grouter_gpt_model

    data, feed, loader, n_micro = inputs(args)
    config = transformer_config(args, feed.n_experts, feed.k)
    config.calculate_per_token_loss = True
    device = torch.device("cuda", torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")
    model = grouter_gpt_model(config, feed, data.vocab_size, data.seq_len,
                              transformer_engine=args.transformer_engine).to(device)
    model = DistributedDataParallel(config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), model)
    step_optimizer, batches = optimizer_step(args, model), iter(loader)
    for step in range(args.steps):
        t0 = time.perf_counter()
        loss, tokens = run_step(model, batches, n_micro, device)
        RoutingFeed.of(model).check_drained()
        step_optimizer()
        if torch.distributed.get_rank() == 0:
            print(json.dumps({"step": step + 1, "loss_rank0": round(loss, 4), "tokens_rank0": tokens,
                              "seconds": round(time.perf_counter() - t0, 3)}), flush=True)


def main(argv=None) -> int:
    args = parse(argv)
    if not (args.routing or args.grouter):
        raise SystemExit("give --routing (a routing store) or --grouter (online routing)")
    start(args)
    train(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
