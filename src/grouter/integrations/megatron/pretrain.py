"""Megatron's own trainer with Grouter routing: ``pretrain_gpt.py`` with grouter's router, data and plan.

    torchrun --nproc_per_node 8 -m grouter.integrations.megatron.pretrain \\
        --grouter-data DATA --grouter-routing STORE [--grouter-plan PLAN] <Megatron's arguments>
    torchrun ... -m grouter.integrations.megatron.pretrain --data-path [W1] PREFIX1 [W2 PREFIX2 ...] \\
        --grouter-routing STREAM1 [STREAM2 ...] <Megatron's arguments>

Megatron parses every argument (its parser plus the ``grouter`` group below) and runs ``pretrain()``:
its initialisation, schedules (no pipelining, 1F1B, interleaved), optimizer, LR schedule, logging,
evaluation and distributed checkpointing, unchanged. grouter supplies the three providers:

* the model: Megatron's GPTModel from its decoder-block spec (MTP block included), every MoE router
  a :class:`~.router.GrouterRouter` reading the chunk's :class:`~.router.RoutingFeed`;
* the datasets: :class:`~.data.GrouterGPTDataset` items (tokens and their routing) in the order of
  the plan (:func:`~.data.plan_order`) or a seeded shuffle, read through Megatron's own data loader
  and sampler, so ``consumed_train_samples`` from a checkpoint resumes at the same sequences; or, with
  Megatron's ``--data-path`` (a prefix or a blend, ``--split``), Megatron's own GPTDatasets built by its
  BlendedMegatronDatasetBuilder, each sample's routing sliced from its prefix's routing stream
  (:mod:`~.indexed`);
* ``forward_step``: this micro-batch's routing to the chunk's feed (every pipeline stage reads its
  own data iterator), Megatron's context-parallel split, the model, the masked token loss.

Defaults taken from the data: ``--tokenizer-type NullTokenizer``, ``--vocab-size``,
``--seq-length`` and ``--max-position-embeddings``. What is refused, in one line each, and why:
docs/megatron.md.
"""

from __future__ import annotations

import json
import sys
import zlib
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch

from .arguments import add_grouter_args, check_args, check_sources, data_defaults, megatron_data, refuse_early
from .compat import cp_split, prebuilt_dataset_helpers, run_pretrain, trainer_import_hint, typing_override_on_python311
from ...errors import GrouterError, one_line

typing_override_on_python311()
try:
    from megatron.core import parallel_state
    from megatron.core.utils import get_attr_wrapped_model
    from megatron.training import get_args
    from megatron.training.arguments import core_transformer_config_from_args
except ImportError as e:  # pragma: no cover - depends on the installed release
    raise GrouterError(f"{trainer_import_hint()} ({e})") from None


@dataclass(eq=False)
class GrouterInputs:
    """What the providers share: the dataset (None with Megatron's data), the routing source (a store, or the
    routing stream of each prefix), the plan, one feed per model chunk."""

    data: object
    store: object | None
    grouter: torch.nn.Module | None
    plan: object | None
    trace: Path | None
    streams: dict | None = None  # Megatron's data: prefix -> RoutingStream
    feeds: dict = field(default_factory=dict)  # vp_stage (None without virtual pipeline) -> RoutingFeed

    @classmethod
    def from_args(cls, args) -> "GrouterInputs":
        from ...formats.dataset import PackedDataset
        from ...formats.plan import Plan
        from ...formats.store import RoutingStore
        from ...network import Grouter

        check_sources(args)
        data = store = grouter = streams = None
        if megatron_data(args):
            from megatron.training.utils import get_blend_and_blend_per_split

            from .indexed import prefixes_of, streams_for

            streams = streams_for(prefixes_of(*get_blend_and_blend_per_split(args)), args.grouter_routing)
            store = next(iter(streams.values()))  # what the feed needs (E, k, heads) is the same for all
        else:
            data = PackedDataset.open(args.grouter_data)
            store = RoutingStore.open(args.grouter_routing[0], data=data) if args.grouter_routing else None
        if args.grouter_online:
            grouter = Grouter.from_pretrained(args.grouter_online).to(torch.cuda.current_device())
        plan = Plan.load(args.grouter_plan) if args.grouter_plan else None
        trace = Path(args.grouter_trace) if args.grouter_trace else None
        if trace is not None:
            trace.mkdir(parents=True, exist_ok=True)
        return cls(data, store, grouter, plan, trace, streams)

    def new_feed(self, vp_stage: int | None):
        """The feed of the model chunk ``vp_stage`` (built once per chunk by the model provider)."""
        from .router import RoutingFeed

        feed = (RoutingFeed.from_store(self.store, self.plan) if self.store is not None
                else RoutingFeed.online(self.grouter, plan=self.plan))
        self.feeds[vp_stage] = feed
        return feed


_INPUTS: GrouterInputs | None = None


def inputs() -> GrouterInputs:
    """The run's inputs, opened and checked against Megatron's arguments on first use."""
    global _INPUTS
    if _INPUTS is None:
        args = get_args()
        _INPUTS = GrouterInputs.from_args(args)
        check_args(args, _INPUTS, parallel_state.get_data_parallel_world_size())
    return _INPUTS


def model_provider(pre_process: bool = True, post_process: bool = True, vp_stage: int | None = None, config=None,
                   pg_collection=None):
    """Megatron's GPTModel for this pipeline stage (and virtual stage) with a GrouterRouter in every MoE layer."""
    from .model import grouter_gpt_model

    args, run = get_args(), inputs()
    config = config if config is not None else core_transformer_config_from_args(args)
    extra = {"pg_collection": pg_collection} if pg_collection is not None else {}
    return grouter_gpt_model(
        config, run.new_feed(vp_stage), args.padded_vocab_size, args.max_position_embeddings,
        transformer_engine=args.transformer_impl == "transformer_engine", vp_stage=vp_stage, replay=args.grouter_replay,
        normalization=args.normalization, qk_l2_norm=args.qk_l2_norm, pre_process=pre_process,
        post_process=post_process, fp16_lm_cross_entropy=args.fp16_lm_cross_entropy, parallel_output=True,
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        position_embedding_type=args.position_embedding_type, rotary_percent=args.rotary_percent,
        rotary_base=args.rotary_base, rope_scaling=args.use_rope_scaling, **extra)


def train_order(run: GrouterInputs, args) -> np.ndarray:
    """Training samples in Megatron's dealing order: the plan's, or the split shuffled with ``--seed``."""
    from .data import plan_order

    if run.plan is not None:
        return plan_order(run.plan, args.micro_batch_size, parallel_state.get_data_parallel_world_size())
    return np.random.default_rng(args.seed).permutation(len(run.data.split("train")))


def datasets_provider(train_val_test_num_samples, vp_stage: int | None = None):
    """Train and validation datasets for Megatron's data loader: grouter's ``train`` and ``val`` splits, or
    Megatron's own GPTDatasets of ``--data-path`` with their routing (:mod:`.indexed`)."""
    from .data import GrouterGPTDataset, OrderedSamples, check_plan_data

    args, run = get_args(), inputs()
    if run.streams is not None:
        return megatron_datasets(args, run, train_val_test_num_samples)
    n_train, n_valid, _ = (int(n) for n in train_val_test_num_samples)
    made = {}
    for split, n in (("train", n_train), ("val", n_valid)):
        dataset = GrouterGPTDataset(run.data, run.store, split,
                                    create_attention_mask=args.create_attention_mask_in_dataloader,
                                    eod_mask_loss=args.eod_mask_loss)
        if split == "train" and run.plan is not None:
            check_plan_data(run.plan, dataset)
        order = train_order(run, args) if split == "train" else np.arange(len(dataset))
        made[split] = OrderedSamples(dataset, order, n) if n > 0 else None
    return made["train"], made["val"], None


def megatron_datasets(args, run: GrouterInputs, num_samples):
    """Megatron's datasets as ``pretrain_gpt.py`` builds them (BlendedMegatronDatasetBuilder over the blend, in
    Megatron's own shuffled order), every sample with the routing sliced from its prefix's stream; built on
    every rank, since every pipeline stage and TP rank pushes routing."""
    from megatron.training import get_tokenizer
    from megatron.training.utils import get_blend_and_blend_per_split

    from .indexed import Numbered, build_routed_datasets, dataset_config

    blend, blend_per_split = get_blend_and_blend_per_split(args)
    config = dataset_config(args, get_tokenizer(), blend, blend_per_split, run.streams)
    sizes = [None if n is None else int(n) for n in num_samples]  # None: a full epoch (--full-validation)
    built = build_routed_datasets(config, sizes)
    # a split asked for no samples (--eval-iters 0) gets no loader: an empty one would fail Megatron's sampler
    return tuple(Numbered(d) if d is not None and n != 0 else None for d, n in zip(built, sizes))


datasets_provider.is_distributed = True  # every rank (each TP rank, each pipeline stage) reads its own data


def forward_step(data_iterator, model, return_schedule_plan: bool = False):
    """One micro-batch on this model chunk: its routing to the chunk's feed, Megatron's CP split, the model."""
    run = inputs()
    batch = {key: t.cuda(non_blocking=True) for key, t in next(data_iterator).items()}
    sequences = batch.pop("sequence")
    served = routing_digests(batch) if run.trace is not None else None
    feed = run.feeds[get_attr_wrapped_model(model, "vp_stage")]
    if feed.routers:  # a pipeline stage of dense layers only has nothing to route
        feed.push(batch)
    batch = cp_split(batch, parallel_state.get_context_parallel_group())
    output = model(batch["tokens"], batch["position_ids"], batch.get("attention_mask"), labels=batch["labels"],
                   loss_mask=batch["loss_mask"])
    return output, partial(loss_func, batch["loss_mask"], sequences, model.training, served)


def routing_digests(batch: dict) -> list[int] | None:
    """CRC-32 of each sequence's routing ids as pushed to the routers (int64 bytes), for ``--grouter-trace``."""
    if "routing_ids" not in batch:
        return None
    return [zlib.crc32(r.cpu().numpy().astype(np.int64).tobytes()) for r in batch["routing_ids"]]


def loss_func(loss_mask: torch.Tensor, sequences: torch.Tensor, training: bool, served: list[int] | None,
              output: torch.Tensor):
    """Sum of the masked token losses, their count, and Megatron's ``lm loss`` report (averaged per token)."""
    mask = loss_mask.float()
    per_sequence, tokens = (output.float() * mask).sum(1), mask.sum(1)
    loss, count = per_sequence.sum(), tokens.sum().to(torch.int)
    run = inputs()
    if run.trace is not None:
        record = {"iteration": get_args().curr_iteration, "training": training,
                  "dp_rank": parallel_state.get_data_parallel_rank(),
                  "cp_rank": parallel_state.get_context_parallel_rank(),
                  "sequences": sequences.tolist(), "loss": per_sequence.tolist(), "tokens": tokens.tolist(),
                  "routing_crc32": served}
        with open(run.trace / f"rank{torch.distributed.get_rank()}.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
    return loss, count, {"lm loss": torch.cat([loss.detach().view(1), count.float().view(1)])}


def main(argv: list[str] | None = None) -> int:
    """Run Megatron's ``pretrain()`` with grouter's providers; ``argv``: the command line without the program."""
    global _INPUTS
    _INPUTS = None  # opened again from this run's arguments
    argv = sys.argv[1:] if argv is None else list(argv)
    refuse_early(argv)
    sys.argv = [sys.argv[0], *argv]  # Megatron's parser reads sys.argv
    prebuilt_dataset_helpers()
    run_pretrain(datasets_provider, model_provider, forward_step, add_grouter_args, data_defaults(argv))
    return 0


def cli(argv: list[str] | None = None) -> int:
    """:func:`main` for a command line: a refusal is one line on stderr and exit status 2, not a traceback (also
    one a data-loader worker raised: a sample whose tokens changed since dispatch)."""
    try:
        return main(argv)
    except GrouterError as e:
        print(f"grouter: error: {one_line(e)}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(cli())
