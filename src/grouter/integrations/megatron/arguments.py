"""The entry point's arguments: grouter's flags on Megatron's parser, defaults from the data, refusals.

Kept apart from :mod:`.pretrain` (which imports ``megatron.training``) so that the checks run and are
tested with megatron-core alone.
"""

from __future__ import annotations

import argparse

from ...errors import GrouterError


def add_grouter_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """grouter's few flags, added to Megatron's parser (pretrain's ``extra_args_provider``)."""
    group = parser.add_argument_group(title="grouter")
    group.add_argument("--grouter-data", help="grouter dataset (grouter data prepare / tokenize): tokens to train")
    group.add_argument("--grouter-routing", help="its routing store (grouter dispatch): stored routing")
    group.add_argument("--grouter-online", help="a Grouter directory: route each micro-batch online instead")
    group.add_argument("--grouter-plan", help="an EP placement plan (grouter place --ranks <EP size>): sample order "
                                              "and expert permutation")
    group.add_argument("--grouter-replay", action="store_true",
                       help="ids only: Megatron's own routers replay the stored expert ids (RouterReplay), their gates "
                            "computing the weights (RL routing replay); needs --grouter-routing")
    group.add_argument("--grouter-trace", help="a directory: each rank writes the sequences and per-sequence losses "
                                               "of every micro-batch it computes a loss for (rank<N>.jsonl)")
    return parser


# Megatron arguments that choose a model or data path this entry point does not build, and why.
_REFUSED_ARGS = [
    ("use_legacy_models", "Megatron's legacy models have no MoESubmodules.router"),
    ("spec", "a custom spec: build the model with grouter.integrations.megatron.with_grouter_router instead"),
    ("experimental_attention_variant", "experimental attention specs are not wired; drop it"),
    ("heterogeneous_layers_config_path", "heterogeneous layer specs are not wired; drop it"),
    ("data_path", "Megatron indexed datasets are not read yet: give the tokens as --grouter-data"),
    ("train_data_path", "Megatron indexed datasets are not read yet: give the tokens as --grouter-data"),
    ("mock_data", "the tokens come from --grouter-data"),
    ("sft", "packed SFT sequences have no stored routing; pretraining only"),
    ("fim_data", "FIM rewrites sequences, which the stored routing would no longer match"),
    ("overlap_moe_expert_parallel_comm", "its schedule plan builds layers outside forward_step's feed"),
    ("perform_rl_step", "Megatron's RL loop builds a second model, whose routers no feed serves; use "
                        "--grouter-replay in a pretraining run, or drive_router_replay in your RL code"),
]


def check_sources(args) -> None:
    """The data and exactly one routing source: a store, or a Grouter to route online."""
    if not args.grouter_data or bool(args.grouter_routing) == bool(args.grouter_online):
        raise GrouterError("give --grouter-data DIR and one of --grouter-routing STORE (stored routing) or "
                           "--grouter-online GROUTER_DIR (online routing)")
    if getattr(args, "grouter_replay", False) and not args.grouter_routing:
        raise GrouterError("--grouter-replay replays stored expert ids: give --grouter-routing STORE")


def check_args(args, run, dp: int) -> None:
    """Refuse, in one line each, Megatron arguments that do not go with grouter's data, routing or plan
    (``run``: the opened inputs, with ``data`` and ``plan``; ``dp``: the data-parallel size)."""
    for name, why in _REFUSED_ARGS:
        if getattr(args, name, None):
            raise GrouterError(f"--{name.replace('_', '-')} is not supported with Grouter routing: {why}")
    if not args.num_experts:
        raise GrouterError("the model has no MoE layer: pass --num-experts (and --moe-router-topk) of the routing")
    if args.seq_length != run.data.seq_len:
        raise GrouterError(f"--seq-length {args.seq_length} differs from the dataset's {run.data.seq_len}-token "
                           "sequences, whose routing is stored per position; drop --seq-length or re-pack the data")
    if run.data.vocab_size > args.padded_vocab_size:
        raise GrouterError(f"the dataset's vocabulary ({run.data.vocab_size}) exceeds the model's "
                           f"({args.padded_vocab_size}); drop --vocab-size (it defaults to the dataset's)")
    if run.plan is not None:
        check_plan_args(args, run.plan, dp)


def check_plan_args(args, plan, dp: int) -> None:
    """A plan is exact when each sequence sits on one expert-parallel rank and groups take whole plan batches."""
    from .data import check_plan_layout

    ep = args.expert_model_parallel_size
    if plan.ranks != ep:
        raise GrouterError(f"the plan is for {plan.ranks} expert-parallel ranks but --expert-model-parallel-size is "
                           f"{ep}; make it with grouter place --ranks {ep}")
    if args.context_parallel_size > 1 or args.expert_tensor_parallel_size != args.tensor_model_parallel_size:
        raise GrouterError("context parallelism, or an expert tensor-parallel size other than the tensor-parallel "
                           "size, spreads a sequence's tokens over several EP ranks, so the plan would be approximate; "
                           "drop --grouter-plan or those settings")
    groups = check_plan_layout(plan, args.micro_batch_size, dp)
    if args.global_batch_size != plan.global_batch * groups or args.rampup_batch_size:
        raise GrouterError(f"--global-batch-size must be the plan's {plan.global_batch} x {groups} expert-parallel "
                           f"group(s) = {plan.global_batch * groups}, without batch-size ramp-up")
    if args.dataloader_type != "single":
        raise GrouterError(f"--dataloader-type {args.dataloader_type} would reorder the plan's samples; use single")


def data_defaults(argv: list[str]) -> dict:
    """Megatron argument defaults read from ``--grouter-data``: tokenizer, vocabulary and sequence length."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--grouter-data")
    known, _ = pre.parse_known_args(argv)
    if not known.grouter_data:
        return {"tokenizer_type": "NullTokenizer"}
    from ...formats.dataset import PackedDataset

    data = PackedDataset.open(known.grouter_data)
    return {"tokenizer_type": "NullTokenizer", "vocab_size": data.vocab_size, "seq_length": data.seq_len,
            "max_position_embeddings": data.seq_len}


def refuse_early(argv: list[str]) -> None:
    """Refusals that must come before Megatron's own initialisation, which acts on these flags first."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--cuda-graph-impl", default="none")
    pre.add_argument("--enable-cuda-graph", action="store_true")
    pre.add_argument("--external-cuda-graph", action="store_true")
    known, _ = pre.parse_known_args(argv)
    if known.cuda_graph_impl != "none" or known.enable_cuda_graph or known.external_cuda_graph:
        raise GrouterError("CUDA graphs are not supported with Grouter routing: a captured graph would replay one "
                           "micro-batch's routing for every later one; drop --cuda-graph-impl / --enable-cuda-graph")
