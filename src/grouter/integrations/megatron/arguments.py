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
    group.add_argument("--grouter-data", help="grouter dataset (grouter data prepare / tokenize): tokens to train "
                                              "(or give Megatron's --data-path and the streams of its prefixes)")
    group.add_argument("--grouter-routing", nargs="+",
                       help="its routing store (grouter dispatch); with --data-path (one prefix or a blend), the "
                            "routing stream of each prefix (grouter dispatch --megatron-data PREFIX), in any order")
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
    ("mock_data", "the tokens come from --grouter-data or from --data-path with their routing streams"),
    ("dataloader_inter_document_masking", "its per-document attention needs packed-sequence parameters that this "
                                          "forward_step does not pass"),
    ("sft", "packed SFT sequences have no stored routing; pretraining only"),
    ("fim_data", "FIM rewrites sequences, which the stored routing would no longer match"),
    ("overlap_moe_expert_parallel_comm", "its schedule plan builds layers outside forward_step's feed"),
    ("perform_rl_step", "Megatron's RL loop builds a second model, whose routers no feed serves; use "
                        "--grouter-replay in a pretraining run, or drive_router_replay in your RL code"),
]


MEGATRON_DATA_ARGS = ("data_path", "train_data_path", "valid_data_path", "test_data_path", "data_args_path",
                      "per_split_data_args_path")


def megatron_data(args) -> bool:
    """Whether the tokens are Megatron's indexed datasets (``--data-path``, per-split paths or their files)."""
    return any(getattr(args, name, None) for name in MEGATRON_DATA_ARGS)


def check_sources(args) -> None:
    """The data and exactly one routing source: a store (or a stream per prefix of Megatron's data), or a
    Grouter to route online."""
    if megatron_data(args):
        if args.grouter_data or args.grouter_online or not args.grouter_routing:
            raise GrouterError("with Megatron's --data-path give --grouter-routing STREAM... (grouter dispatch "
                               "--megatron-data PREFIX, one per prefix) and neither --grouter-data nor --grouter-online: "
                               "online routing would start each token's context at its sample's start, not its "
                               "document's")
        return
    if not args.grouter_data or bool(args.grouter_routing) == bool(args.grouter_online):
        raise GrouterError("give --grouter-data DIR and one of --grouter-routing STORE (stored routing) or "
                           "--grouter-online GROUTER_DIR (online routing); or Megatron's --data-path with the "
                           "routing streams of its prefixes")
    if args.grouter_routing and len(args.grouter_routing) != 1:
        raise GrouterError("--grouter-data takes one routing store: give one --grouter-routing")
    if getattr(args, "grouter_replay", False) and not args.grouter_routing:
        raise GrouterError("--grouter-replay replays stored expert ids: give --grouter-routing STORE")


def check_args(args, run, dp: int) -> None:
    """Refuse, in one line each, Megatron arguments that do not go with grouter's data, routing or plan
    (``run``: the opened inputs, with ``data`` (None for Megatron's data), ``streams`` and ``plan``; ``dp``:
    the data-parallel size)."""
    for name, why in _REFUSED_ARGS:
        if getattr(args, name, None):
            raise GrouterError(f"--{name.replace('_', '-')} is not supported with Grouter routing: {why}")
    if not args.num_experts:
        raise GrouterError("the model has no MoE layer: pass --num-experts (and --moe-router-topk) of the routing")
    if run.data is None:
        top = max(s.manifest["prefix"]["max_token_id"] for s in run.streams.values())
        if top >= args.padded_vocab_size:
            raise GrouterError(f"the data holds token id {top}, beyond the model's vocabulary ({args.padded_vocab_size}); "
                               "give the tokenizer the data was made with")
    elif args.seq_length != run.data.seq_len:
        raise GrouterError(f"--seq-length {args.seq_length} differs from the dataset's {run.data.seq_len}-token "
                           "sequences, whose routing is stored per position; drop --seq-length or re-pack the data")
    elif run.data.vocab_size > args.padded_vocab_size:
        raise GrouterError(f"the dataset's vocabulary ({run.data.vocab_size}) exceeds the model's "
                           f"({args.padded_vocab_size}); drop --vocab-size (it defaults to the dataset's)")
    if run.plan is not None:
        check_plan_args(args, run.plan, dp, experts_only=run.data is None)


def check_plan_args(args, plan, dp: int, experts_only: bool = False) -> None:
    """A plan is exact when each sequence sits on one expert-parallel rank and groups take whole plan batches.
    ``experts_only``: Megatron's own samples, in its own order; only the plan's expert placement is used."""
    from .data import check_plan_layout

    ep = args.expert_model_parallel_size
    if plan.ranks != ep:
        raise GrouterError(f"the plan is for {plan.ranks} expert-parallel ranks but --expert-model-parallel-size is "
                           f"{ep}; make it with grouter place --ranks {ep}")
    if experts_only:
        if plan.source.get("kind") != "stream":
            raise GrouterError("with --data-path the plan must come from its routing streams (grouter place --routing "
                               "STREAM): a plan of a routing store places grouter's packed sequences")
        return
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
