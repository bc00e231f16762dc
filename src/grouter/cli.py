"""The ``grouter`` command line.

Every command accepts ``--json`` (one JSON object with its results as the last stdout line)
and ``--debug`` (show tracebacks). User errors print one ``error: ...`` line and exit 2.
Each command has its parser (``add_*``) next to its handler (``cmd_*``); :func:`build_parser`
only lists them.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import math
import os
import sys
import traceback
import warnings
from pathlib import Path
from typing import Iterator

import torch

from .capture import Targets, capture
from .artifacts import output_lock, read_json, write_json
from .data import DEFAULT_MAX_BYTES_PER_DOMAIN, PackedDataset, prepare_default, subset_domains, tokenize_corpus
from .demo import DemoConfig, run_demo
from .device import ProcessGroup, exit_now
from .dispatch import dispatch
from .distill import DistillConfig, distill
from .ep import EXCHANGES, PLACEMENTS, default_model_config, train_ep
from .errors import GrouterError
from .fold import STRATEGIES, fold
from .integrity import file_sha256, fingerprint_of
from .loop import TrainConfig
from .model import MODEL_PRESETS, MoEConfig
from .network import LEAK_WARNING, GrouterConfig
from .hardware import PROFILES, load_profile
from .place import ALGORITHMS, DEFAULT_LOAD_TOLERANCE, LEVELS, SCOPES, place
from .report import report
from .reproduce import SCALES, run_reproduce, scaled
from .study import FACTORS, run_study, study_scaled
from .routers import ROUTER_KINDS
from .store import WEIGHTS_DTYPES, RoutingStore
from .train import external_routing, train
from .tune import METHODS, TuneConfig, tune
from .verify import verify

BASELINE_ROUTERS = [r for r in ROUTER_KINDS if r != "external"]


class UsageError(Exception):
    """A mistake on the command line itself (unknown option, bad value)."""


class Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is reported like every other bad input (see :func:`main`)."""

    def error(self, message: str):
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def _command(sub, name: str, help: str, func, **kw) -> argparse.ArgumentParser:
    """A subcommand with the options every command has (``--json``, ``--debug``)."""
    p = sub.add_parser(name, help=help, **kw)
    _common(p)
    p.set_defaults(func=func)
    return p


def _common(p: argparse.ArgumentParser, top: bool = False) -> argparse.ArgumentParser:
    """``--json`` and ``--debug``, accepted before the command and after it (a subcommand's default
    must not undo ``grouter --json CMD``)."""
    default = False if top else argparse.SUPPRESS
    p.add_argument("--json", action="store_true", default=default,
                   help="print the results (or the error) as one JSON object on the last stdout line")
    p.add_argument("--debug", action="store_true", default=default, help="show a traceback on error")
    return p


def _output(p: argparse.ArgumentParser, required: bool = True, default: Path | None = None,
            what: str = "output directory") -> None:
    p.add_argument("--out", required=required, type=Path, default=default, help=what)
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out (only once the new one is done)")


def _device(p: argparse.ArgumentParser, default: str = "auto") -> None:
    p.add_argument("--device", default=default, help="auto (CUDA when available), cpu, cuda or cuda:N")


def _number(kind, low: float, low_ok: bool, high: float | None = None):
    """An argparse type: a finite number of ``kind`` in the range, or one ``error:`` line saying which."""
    bound = f"{'at least' if low_ok else 'greater than'} {low:g}" + (f" and below {high:g}" if high is not None else "")

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        if not math.isfinite(value) or value < low or (value == low and not low_ok) or (
                high is not None and value >= high):
            raise argparse.ArgumentTypeError(f"expected a number {bound}, got {text}")
        return value

    parse.__name__ = kind.__name__  # what argparse names in "invalid ... value"
    return parse


_positive_int = _number(int, 1, True)
_count = _number(int, 0, True)  # seeds, warm-up steps, layer indices
_positive = _number(float, 0, False)  # learning rates, temperatures, sizes
_fraction = _number(float, 0, True, 1)


def _data(args) -> PackedDataset:
    return PackedDataset.open(args.data)


# -- data -----------------------------------------------------------------------------------------
def _dataset_summary(ds: PackedDataset) -> dict:
    splits = ds.meta["splits"]
    return {"data": str(ds.path), "vocab_size": ds.vocab_size, "seq_len": ds.seq_len, "domains": ds.domains,
            "train_sequences": splits["train"]["n_sequences"], "val_sequences": splits["val"]["n_sequences"],
            "train_tokens": splits["train"]["n_tokens"], "fingerprint": ds.fingerprint}


def cmd_data_prepare(args) -> dict:
    return _dataset_summary(prepare_default(args.out, vocab_size=args.vocab_size, seq_len=args.seq_len,
                                            max_bytes_per_domain=int(args.max_mb_per_domain * 1e6),
                                            overwrite=args.overwrite))


def cmd_data_tokenize(args) -> dict:
    return _dataset_summary(tokenize_corpus(args.input, args.tokenizer, args.out, seq_len=args.seq_len,
                                            domain=args.domain, text_field=args.text_field,
                                            val_fraction=args.val_fraction, overwrite=args.overwrite))


def cmd_data_subset(args) -> dict:
    domains = [d.strip() for d in args.domains.split(",") if d.strip()]
    return _dataset_summary(subset_domains(_data(args), domains, args.out, overwrite=args.overwrite))


def add_data(sub) -> None:
    data = sub.add_parser("data", help="prepare, tokenize or subset a corpus in the packed format")
    data_sub = data.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND", parser_class=Parser)
    p = _command(data_sub, "prepare", "build the embedded default corpus (prose, speeches, code)", cmd_data_prepare)
    _output(p)
    p.add_argument("--vocab-size", type=_positive_int, default=8192)
    p.add_argument("--seq-len", type=_positive_int, default=256)
    p.add_argument("--max-mb-per-domain", type=_positive, default=DEFAULT_MAX_BYTES_PER_DOMAIN / 1e6,
                   help="cap on raw text per domain, MB (default %(default)s)")

    p = _command(data_sub, "tokenize", "tokenize a user corpus (txt, jsonl, parquet) with a HF tokenizer",
                 cmd_data_tokenize)
    p.add_argument("--input", required=True, nargs="+", type=Path)
    p.add_argument("--tokenizer", required=True, help="a tokenizer.json file or a Hugging Face model directory")
    _output(p)
    p.add_argument("--seq-len", type=_positive_int, default=256)
    p.add_argument("--domain", help="domain label for all inputs (default: each file's name)")
    p.add_argument("--text-field", default="text", help="jsonl field / parquet column holding the text")
    p.add_argument("--val-fraction", type=_fraction, default=0.05)

    p = _command(data_sub, "subset", "the same dataset restricted to some domains (e.g. to hold one out)",
                 cmd_data_subset)
    p.add_argument("--data", required=True, type=Path)
    p.add_argument("--domains", required=True, help="comma-separated domains to keep")
    _output(p)


# -- training the built-in MoE LM (source and targets) ---------------------------------------------
MODEL_FLAGS = {  # flag -> MoEConfig field
    "--d-model": "d_model", "--layers": "n_layers", "--heads": "n_heads", "--d-expert": "d_expert",
    "--experts": "n_experts", "--top-k": "top_k", "--shared-experts": "n_shared_experts",
}
TRAIN_FLAGS = {  # flag -> TrainConfig field
    "--steps": "steps", "--batch-size": "batch_size", "--lr": "lr", "--warmup-steps": "warmup_steps",
    "--eval-every": "eval_every", "--eval-sequences": "eval_sequences",
    "--checkpoint-every": "checkpoint_every", "--seed": "seed", "--device": "device",
}
TRAIN_FLAG_TYPES = {"lr": _positive, "warmup_steps": _count, "seed": _count, "device": str}  # others: positive ints


def _training_args(p: argparse.ArgumentParser, default_steps: int) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--preset", choices=sorted(MODEL_PRESETS), default="small", help="model size (default %(default)s)")
    for flag, field in MODEL_FLAGS.items():
        kind = _count if field == "n_shared_experts" else _positive_int
        g.add_argument(flag, dest=field, type=kind, default=None, help=f"override the preset's {field}")
    t = p.add_argument_group("training")
    for flag, field in TRAIN_FLAGS.items():
        default = default_steps if field == "steps" else getattr(TrainConfig(), field)
        t.add_argument(flag, dest=field, type=TRAIN_FLAG_TYPES.get(field, _positive_int), default=default,
                       help=f"(default {default})")


def _configs(args, data: PackedDataset, router: str) -> tuple[MoEConfig, TrainConfig]:
    model_kw = dict(MODEL_PRESETS[args.preset])
    model_kw.update({f: getattr(args, f) for f in MODEL_FLAGS.values() if getattr(args, f) is not None})
    model_cfg = MoEConfig(vocab_size=data.vocab_size, max_seq_len=data.seq_len, router=router,
                          seed=args.seed, **model_kw).validate()
    train_cfg = TrainConfig(**{f: getattr(args, f) for f in TRAIN_FLAGS.values()}).validate()
    return model_cfg, train_cfg


def cmd_source_train(args) -> dict:
    data = _data(args)
    model_cfg, train_cfg = _configs(args, data, args.router)
    return train(data, args.out, model_cfg, train_cfg, overwrite=args.overwrite)


def cmd_train(args) -> dict:
    """Baseline router, stored routing (--routing) or online Grouter routing (--grouter)."""
    data = _data(args)
    if args.router:
        model_cfg, train_cfg = _configs(args, data, args.router)
        return train(data, args.out, model_cfg, train_cfg, overwrite=args.overwrite)
    source, identity, n_experts, k = external_routing(data, routing_dir=args.routing, grouter_dir=args.grouter,
                                                      device=args.device)
    for flag, value, needed in (("--experts", args.n_experts, n_experts), ("--top-k", args.top_k, k)):
        if value is not None and value != needed:
            raise GrouterError(f"{flag} {value} contradicts the routing ({needed}); leave it out")
    args.n_experts, args.top_k = n_experts, k
    model_cfg, train_cfg = _configs(args, data, "external")
    return train(data, args.out, model_cfg, train_cfg, routing_source=source, routing_identity=identity,
                 overwrite=args.overwrite)


def add_training(sub) -> None:
    source = sub.add_parser("source", help="the built-in source MoE model")
    source_sub = source.add_subparsers(dest="source_command", required=True, metavar="SUBCOMMAND", parser_class=Parser)
    p = _command(source_sub, "train", "train the built-in MoE LM that serves as a source", cmd_source_train)
    p.add_argument("--data", required=True, type=Path)
    _output(p, what="run directory (resumed when it holds this same run)")
    p.add_argument("--router", choices=BASELINE_ROUTERS, default="aux", help="the source's router (default aux)")
    _training_args(p, default_steps=300)

    p = _command(sub, "train", "train a target MoE with stored Grouter routing or a baseline router", cmd_train)
    p.add_argument("--data", required=True, type=Path)
    _output(p, what="run directory (resumed when it holds this same run)")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--routing", type=Path, help="a routing store from `grouter dispatch` (no router compute)")
    which.add_argument("--grouter", type=Path, help="a Grouter, routing computed online every step")
    which.add_argument("--router", choices=BASELINE_ROUTERS,
                       help="aux: learned + load-balancing loss; zloss: + z-loss; auxfree: bias balancing; "
                            "hash: balanced token-id table; random: frozen random; none: learned, no balancing")
    _training_args(p, default_steps=300)


# -- capture, distill, fold, tune ------------------------------------------------------------------
def cmd_capture(args) -> dict:
    return capture(args.source, _data(args), args.out, layer=args.layer, layers=args.layers,
                   batch_size=args.batch_size, device=args.device, overwrite=args.overwrite)


def _layer_list(text: str) -> list[int] | str:
    """``--layers``: ``all``, or comma-separated layer indices."""
    if text.strip() == "all":
        return "all"
    return [_count(part.strip()) for part in text.split(",")]


def add_capture(sub) -> None:
    p = _command(sub, "capture", "record a source MoE's router scores (one layer, or several) for a dataset",
                 cmd_capture)
    p.add_argument("--source", required=True, type=Path,
                   help="a `grouter source train` output or a Hugging Face MoE directory (Qwen2/3-MoE, OLMoE, Mixtral)")
    p.add_argument("--data", required=True, type=Path)
    _output(p)
    which = p.add_mutually_exclusive_group()
    which.add_argument("--layer", type=_count, default=None, help="MoE layer to capture (default: the first MoE layer)")
    which.add_argument("--layers", type=_layer_list, default=None, metavar="L1,L2,...|all",
                       help="several MoE layers (or all of them): distill then gives one Grouter head per layer")
    p.add_argument("--batch-size", type=_positive_int, default=16)
    _device(p)


def cmd_distill(args) -> dict:
    targets = Targets.open(args.targets)
    gcfg = GrouterConfig(vocab_size=targets.data.vocab_size, n_experts=targets.n_experts, top_k=targets.top_k,
                         d_model=args.d_model, n_layers=args.layers, n_heads=args.heads, d_ff=args.d_ff,
                         causal=not args.bidirectional_leaks_future, rope=not args.no_rope,
                         max_seq_len=max(targets.data.seq_len, 4096), seed=args.seed)
    cfg = DistillConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, temperature=args.temperature,
                        eval_every=args.eval_every, checkpoint_every=args.checkpoint_every, seed=args.seed,
                        device=args.device)
    if not gcfg.causal:
        print(f"warning: {LEAK_WARNING}", file=sys.stderr)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the leak warning was printed once, above
        return distill(targets, args.out, gcfg, cfg, overwrite=args.overwrite)


def add_distill(sub) -> None:
    p = _command(sub, "distill", "train a Grouter on captured router scores", cmd_distill)
    p.add_argument("--targets", required=True, type=Path)
    _output(p, what="run directory (resumed when it holds this same run)")
    g, d = GrouterConfig(vocab_size=1, n_experts=1, top_k=1), DistillConfig()
    p.add_argument("--d-model", type=_positive_int, default=g.d_model)
    p.add_argument("--layers", type=_positive_int, default=g.n_layers)
    p.add_argument("--heads", type=_positive_int, default=g.n_heads)
    p.add_argument("--d-ff", type=_positive_int, default=g.d_ff)
    p.add_argument("--no-rope", action="store_true", help="no positional information")
    p.add_argument("--bidirectional-leaks-future", action="store_true",
                   help="bidirectional attention, as the authors' code: routes see later tokens (a leak)")
    p.add_argument("--steps", type=_positive_int, default=d.steps)
    p.add_argument("--batch-size", type=_positive_int, default=d.batch_size)
    p.add_argument("--lr", type=_positive, default=d.lr)
    p.add_argument("--temperature", type=_positive, default=d.temperature, help="KL temperature (default 1: no temperature)")
    p.add_argument("--eval-every", type=_positive_int, default=d.eval_every)
    p.add_argument("--checkpoint-every", type=_positive_int, default=d.checkpoint_every)
    p.add_argument("--seed", type=_count, default=d.seed)
    _device(p)


def cmd_fold(args) -> dict:
    return fold(args.grouter, _data(args), args.out, args.experts, strategy=args.strategy, top_k=args.top_k,
                max_sequences=args.max_sequences, seed=args.seed, device=args.device, overwrite=args.overwrite)


def add_fold(sub) -> None:
    p = _command(sub, "fold", "fold a Grouter to fewer experts by co-activation affinity", cmd_fold)
    p.add_argument("--grouter", required=True, type=Path)
    p.add_argument("--experts", required=True, type=_positive_int, help="target expert count (fewer than the Grouter's)")
    p.add_argument("--data", required=True, type=Path, help="data to measure co-activation on")
    _output(p)
    p.add_argument("--strategy", choices=STRATEGIES, default="affinity")
    p.add_argument("--top-k", type=_positive_int, default=None, help="the target's top-k (default: the Grouter's)")
    p.add_argument("--max-sequences", type=_positive_int, default=2000, help="sequences to measure affinity on")
    p.add_argument("--seed", type=_count, default=0, help="for the random strategy")
    _device(p)


def cmd_tune(args) -> dict:
    cfg = TuneConfig(tokens=args.tokens, batch_size=args.batch_size, lr=args.lr, method=args.method,
                     bias_gamma=args.bias_gamma, keep=args.keep, domain=args.domain,
                     eval_sequences=args.eval_sequences, seed=args.seed, device=args.device)
    return tune(args.grouter, _data(args), args.out, cfg, overwrite=args.overwrite)


def add_tune(sub) -> None:
    t = TuneConfig()
    p = _command(sub, "tune", "re-balance a Grouter on target data (last layer only, balancing loss)", cmd_tune)
    p.add_argument("--grouter", required=True, type=Path)
    p.add_argument("--data", required=True, type=Path)
    _output(p)
    p.add_argument("--tokens", type=_positive_int, default=t.tokens, help="target tokens to tune on (default %(default)s)")
    p.add_argument("--method", choices=METHODS, default=t.method,
                   help="gradient: train the head with the load-balancing loss; bias: selection bias by the sign rule")
    p.add_argument("--lr", type=_positive, default=t.lr)
    p.add_argument("--bias-gamma", type=_positive, default=t.bias_gamma)
    p.add_argument("--keep", type=_number(float, 0, True), default=t.keep, metavar="WEIGHT",
                   help="gradient method: add WEIGHT · KL(untuned || tuned) per token, keeping more of the untuned "
                        "routing for less balance (default %(default)s: balance only)")
    p.add_argument("--batch-size", type=_positive_int, default=t.batch_size)
    p.add_argument("--domain", default=None, help="tune and evaluate on one domain of the data only")
    p.add_argument("--eval-sequences", type=_positive_int, default=t.eval_sequences)
    p.add_argument("--seed", type=_count, default=t.seed)
    _device(p)


# -- dispatch, place, ep ---------------------------------------------------------------------------
def cmd_dispatch(args) -> dict | None:
    """Every rank of a launch runs this; only rank 0 reports."""
    result = dispatch(args.grouter, _data(args), args.out, k=args.k, batch_size=args.batch_size, device=args.device,
                      weights_dtype=args.weights_dtype, overwrite=args.overwrite)
    return result if _rank_zero() else None


def add_dispatch(sub) -> None:
    p = _command(sub, "dispatch", "route the dataset once with a frozen Grouter: the routing store", cmd_dispatch,
                 description="Sharded: torchrun --nproc_per_node N -m grouter.cli dispatch ...")
    p.add_argument("--grouter", required=True, type=Path)
    p.add_argument("--data", required=True, type=Path)
    _output(p)
    p.add_argument("--k", type=_positive_int, default=None, help="experts per token (default: the Grouter's top-k)")
    p.add_argument("--batch-size", type=_positive_int, default=16,
                   help="sequences per Grouter forward (default %(default)s: small batches suit a CPU, use more on "
                        "a GPU; docs/BENCHMARKS.md); resuming needs the same value")
    p.add_argument("--weights-dtype", choices=sorted(WEIGHTS_DTYPES), default="bfloat16")
    _device(p)


def cmd_place(args) -> dict:
    hardware = None if args.hardware is None else load_profile(args.hardware)  # refuse a bad profile first
    return place(args.routing, args.out, args.ranks, ranks_per_node=args.ranks_per_node, algorithm=args.algorithm,
                 global_batch=args.global_batch, seed=args.seed, overwrite=args.overwrite, level=args.level,
                 scope=args.scope, exact=args.exact, hardware=hardware, lp_bound=args.lp_bound or None,
                 load_tolerance=None if args.no_load_cap else args.load_tolerance, target_layers=args.target_layers)


def add_place(sub) -> None:
    p = _command(sub, "place", "expert-parallel placement plan from a routing store", cmd_place)
    p.add_argument("--routing", required=True, type=Path)
    p.add_argument("--ranks", required=True, type=_positive_int, help="expert-parallel ranks (must divide the experts)")
    p.add_argument("--ranks-per-node", type=_positive_int, default=None, help="GPUs per node, for node-level cost")
    _output(p)
    p.add_argument("--algorithm", choices=ALGORITHMS, default="balanced",
                   help="balanced: equal sequences per rank per global batch; greedy: the paper's Algorithm 1 "
                        "(no capacity constraint: ranks get unequal work)")
    p.add_argument("--level", choices=LEVELS, default=None,
                   help="optimise rank-level (DeepEP) or node-level traffic (default: node when 1 < G < R)")
    p.add_argument("--global-batch", type=_positive_int, default=None, help="sequences per global batch (default 16×R)")
    p.add_argument("--scope", choices=SCOPES, default="batch", help="where the equal-share constraint holds")
    p.add_argument("--exact", action="store_true", help="optimal per-batch assignment (slower) instead of the greedy")
    p.add_argument("--load-tolerance", type=_number(float, 0, True), default=DEFAULT_LOAD_TOLERANCE,
                   help="every rank's experts take at most 1 + this times the mean token-slots (default %(default)s)")
    p.add_argument("--no-load-cap", action="store_true", help="group experts without the load cap (the paper's way)")
    p.add_argument("--lp-bound", action="store_true", help="compute the balanced-LP bound even when it is costly")
    p.add_argument("--hardware", default=None, metavar="PROFILE",
                   help=f"predict step times on a cluster: {', '.join(PROFILES)} or a JSON file (docs/steptime.md)")
    p.add_argument("--target-layers", type=_positive_int, default=None, metavar="T",
                   help="per-layer routing: the target's MoE layers, each head weighted by the layers that route by "
                        "it (default: every head of the store once)")
    p.add_argument("--seed", type=int, default=0)


def cmd_ep(args) -> dict | None:
    """Every rank runs this; only rank 0 reports (the others return None: nothing printed)."""
    with ProcessGroup(args.device, always=True) as group:
        data = _data(args)
        store = RoutingStore.open(args.routing, data=data)
        sizes = {k: getattr(args, k) for k in ("d_model", "n_layers", "n_heads", "d_expert") if getattr(args, k)}
        model_cfg = default_model_config(data, store, args.seed, args.preset, **sizes)
        train_cfg = TrainConfig(steps=args.steps, lr=args.lr, warmup_steps=args.warmup_steps, seed=args.seed,
                                grad_clip=args.grad_clip, device=args.device)
        summary = train_ep(data, store, args.out, plan=args.plan, placement=args.placement, exchange=args.exchange,
                           model_cfg=model_cfg, train_cfg=train_cfg, global_batch=args.global_batch,
                           save_model=args.save_model, overwrite=args.overwrite, progress=not args.json)
        return {"out": str(args.out), **summary} if group.rank == 0 else None


def add_ep(sub) -> None:
    p = _command(sub, "ep", "expert-parallel training of the built-in MoE LM on stored routing with a plan", cmd_ep,
                 description="Launch with torchrun --nproc_per_node R -m grouter.cli ep ... (one process: world 1). "
                             "A reference engine with exact per-phase byte counts; see docs/method.md.")
    p.set_defaults(hard_exit=True)  # see main()
    p.add_argument("--data", required=True, type=Path, help="packed dataset directory")
    p.add_argument("--routing", required=True, type=Path, help="routing store of the dataset (grouter dispatch)")
    p.add_argument("--plan", type=Path, help="placement plan (grouter place) for R ranks; needed for --placement plan")
    p.add_argument("--placement", choices=PLACEMENTS, default="plan",
                   help="plan: the plan's experts and samples; random: identity experts, batches dealt at random")
    p.add_argument("--exchange", choices=sorted(EXCHANGES), default="dedup",
                   help="dedup: one copy per (token, rank) (DeepEP); slot: one per (token, expert) (Megatron)")
    _output(p, what="run directory (run.json, metrics.jsonl, model/)")
    p.add_argument("--steps", type=_positive_int, default=100)
    p.add_argument("--preset", choices=sorted(MODEL_PRESETS), default="tiny")
    for flag, name in (("--d-model", "d_model"), ("--layers", "n_layers"), ("--heads", "n_heads"),
                       ("--d-expert", "d_expert")):
        p.add_argument(flag, type=_positive_int, dest=name, help=f"override the preset's {name}")
    defaults = TrainConfig()
    p.add_argument("--lr", type=_positive, default=defaults.lr)
    p.add_argument("--warmup-steps", type=_count, default=defaults.warmup_steps)
    p.add_argument("--grad-clip", type=_positive, default=defaults.grad_clip)
    p.add_argument("--seed", type=_count, default=defaults.seed)
    p.add_argument("--global-batch", type=_positive_int, help="sequences per step without a plan (random placement)")
    _device(p)
    p.add_argument("--save-model", action="store_true", help="write the gathered model to OUT/model")


# -- verify ---------------------------------------------------------------------------------------
def cmd_verify(args) -> dict:
    return verify(args.artifact)


def add_verify(sub) -> None:
    p = _command(sub, "verify", "check every byte of an artifact against its checksums", cmd_verify,
                 description="Readers check what they read as they read it; this checks everything now.")
    p.add_argument("artifact", type=Path, metavar="DIR",
                   help="a dataset, targets, routing store, Grouter, model, run or placement-plan directory")


# -- report, demo, reproduce -----------------------------------------------------------------------
def cmd_report(args) -> dict:
    result = report(args.runs, args.out, overwrite=args.overwrite)
    if not args.json:
        print(result.pop("table"))
    return result


def cmd_demo(args) -> dict:
    return run_demo(Path(args.out), DemoConfig(layers="all" if args.per_layer_heads else None))


def cmd_reproduce(args) -> dict:
    overrides = {k: v for k, v in (("held_out_domain", args.held_out_domain), ("target_steps", args.target_steps),
                                   ("data", args.data and str(args.data))) if v is not None}
    if args.study:
        return run_study(args.out, args.study, study_scaled(args.scale, **overrides))
    return run_reproduce(args.out, scaled(args.scale, **overrides))


def add_reporting(sub) -> None:
    p = _command(sub, "report", "tables and plots comparing finished training runs", cmd_report)
    p.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR")
    _output(p)

    p = _command(sub, "demo", "the whole pipeline, small, on the embedded corpus", cmd_demo)
    p.add_argument("--out", type=Path, default=Path("demo"), help="where every stage writes (rerun to resume)")
    p.add_argument("--per-layer-heads", action="store_true",
                   help="a Grouter head per source MoE layer (capture --layers all), the study's best configuration; "
                        "its stages and run are named ...-layers-all, beside the shared head's in the same --out")

    p = _command(sub, "reproduce", "the paper's comparison: Grouter vs every baseline, with ablations", cmd_reproduce)
    p.add_argument("--out", type=Path, default=None,
                   help="where every stage writes (rerun to resume; default: reproduce, or study with --study)")
    p.set_defaults(default_out=lambda args: Path("study" if args.study else "reproduce"))
    p.add_argument("--scale", choices=list(SCALES), default="cpu",
                   help="model and data sizes: smoke (minutes), cpu (CPU-sized), gpu (one GPU, not for --study); "
                        "docs/RESULTS.md")
    p.add_argument("--study", default=None, metavar="NAME",
                   help=f"vary one factor at a time around a base cell instead: {', '.join(FACTORS)}, all of them "
                        "(about 3 h at --scale cpu), one cell (FACTOR/KEY) or several, comma-separated; docs/study.md")
    p.add_argument("--data", type=Path, default=None,
                   help="a dataset from `grouter data prepare/tokenize` (default: the embedded corpus, prepared in --out)")
    p.add_argument("--held-out-domain", default=None, help="the domain the source never sees (default: code)")
    p.add_argument("--target-steps", type=_positive_int, default=None, help="override the scale's target steps")


COMMANDS = (add_data, add_training, add_capture, add_distill, add_fold, add_tune, add_dispatch, add_place, add_ep,
            add_verify, add_reporting)


def build_parser() -> argparse.ArgumentParser:
    parser = _common(Parser(prog="grouter", description=__doc__.splitlines()[0]), top=True)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)
    for add in COMMANDS:
        add(sub)
    return parser


def _inputs(args) -> list[Path]:
    """Every path the command reads (any Path option other than --out)."""
    found = []
    for name, value in vars(args).items():
        values = value if isinstance(value, list) else [value]
        found += [v for v in values if isinstance(v, Path) and name != "out"]
    return found


DONE_RECORD = ".grouter-command.json"  # in --out: the command that made it, its inputs' state, its result
_NOT_IDENTITY = {"json", "debug", "overwrite", "func", "hard_exit", "device", "default_out"}  # how it ran, not what it made


def _state_of(path: Path) -> str:
    """What an input is now: its JSON manifests' content for an artifact directory (they carry the
    checksums of everything else), size and modification time for a plain file (a corpus)."""
    if path.is_dir():
        return fingerprint_of({p.name: file_sha256(p) for p in sorted(path.glob("*.json"))})
    stat = path.stat() if path.exists() else None
    return f"{stat.st_size}:{stat.st_mtime_ns}" if stat else "missing"


def _identity(args) -> dict:
    options = {k: (str(v) if isinstance(v, Path) else [str(x) for x in v] if isinstance(v, list) else v)
               for k, v in vars(args).items() if k not in _NOT_IDENTITY}
    return {"options": options, "inputs": {str(p): _state_of(p) for p in _inputs(args)}}


def _already_done(args) -> dict | None:
    """The result of this very command (same options, inputs unchanged) if --out holds it finished."""
    record = getattr(args, "out", None) and args.out / DONE_RECORD
    if not record or getattr(args, "overwrite", False) or not record.is_file():
        return None
    done = read_json(record, "command record")
    return done.get("result") if done.get("identity") == _identity(args) else None


@contextlib.contextmanager
def _writing(args) -> Iterator[None]:
    """Guard the command's --out: never one of its own inputs (``--overwrite`` would delete it), and
    locked against a second writer. Only rank 0 of a launch locks: the other ranks share its --out."""
    out = getattr(args, "out", None)
    if out is None:
        yield
        return
    target = out.resolve()
    for path in _inputs(args) if hasattr(args, "overwrite") else ():  # demo and reproduce never delete
        if target == path.resolve() or target in path.resolve().parents:
            raise GrouterError(f"--out {out} is also an input of this command ({path}); --overwrite would delete it: "
                               "choose another --out")
    if not _rank_zero():
        yield
        return
    with output_lock(out):
        yield


def _rank_zero() -> bool:
    """Rank 0 of a torchrun launch (or a plain process): the one that owns --out."""
    return int(os.environ.get("RANK", "0") or 0) == 0


def _failure(args, message: str, code: int) -> int:
    print(f"error: {message}", file=sys.stderr)
    if getattr(args, "json", False):
        print(json.dumps({"error": message}))
    return code


def _system_failure(e: BaseException) -> str:
    """A failure the user's machine or paths cause (permissions, a file in the way, a full disk,
    memory), stated with its fix."""
    where = getattr(e, "filename", None)
    if isinstance(e, PermissionError):
        return f"permission denied on {where}: choose paths you can read and an --out you can write"
    if isinstance(e, (NotADirectoryError, FileExistsError)):
        return f"{where}: a file is in the way of a directory grouter needs; choose another --out"
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        return f"no space left on the device of {where or '--out'}: free space or choose --out on another disk"
    if isinstance(e, MemoryError) or "out of memory" in str(e).lower():
        return "out of memory: choose a smaller model (--preset, --d-model, --layers, --experts) or --batch-size"
    return f"{type(e).__name__} on {where or 'a file'}: {getattr(e, 'strerror', None) or e} (rerun with --debug for details)"


def run_command(args) -> int:
    """Run the parsed command; print its result; the exit status."""
    try:
        if (result := _already_done(args)) is not None:
            print(f"{args.out} already holds the result of this command; nothing to do (--overwrite redoes it)",
                  file=sys.stderr)
        else:
            with _writing(args):
                result = args.func(args)
            if result is not None and getattr(args, "out", None) is not None and args.out.is_dir() and _rank_zero():
                write_json(args.out / DONE_RECORD, {"identity": _identity(args), "result": result})
    except GrouterError as e:
        if args.debug:
            traceback.print_exc()
        return _failure(args, str(e), 2)
    except KeyboardInterrupt:
        print(file=sys.stderr)  # end the line a progress bar may have left open
        return _failure(args, "interrupted; rerun the same command to resume", 130)
    except (OSError, MemoryError, torch.OutOfMemoryError) as e:  # the machine's limits, not grouter's: say which and what to do
        if args.debug:
            traceback.print_exc()
        return _failure(args, _system_failure(e), 2)
    except Exception as e:  # a bug, not bad input: still one line unless --debug
        if args.debug:
            traceback.print_exc()
        return _failure(args, f"unexpected {type(e).__name__}: {e} (rerun with --debug for a traceback)", 1)
    if result is None:
        return 0
    if args.json:
        print(json.dumps(result, default=str))
    else:
        for key, value in result.items():
            if not isinstance(value, (dict, list)):
                print(f"{key}: {value}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = build_parser().parse_args(argv)
    except UsageError as e:
        return _failure(argparse.Namespace(json="--json" in argv), str(e), 2)
    if getattr(args, "out", True) is None and hasattr(args, "default_out"):  # a default that depends on other options
        args.out = args.default_out(args)
    code = run_command(args)
    if getattr(args, "hard_exit", False) and "WORLD_SIZE" in os.environ:
        # A rank of a launch that ran gloo collectives leaves without interpreter teardown: gloo's
        # worker threads may still hold tensors, and tearing down under them aborts the process.
        exit_now(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
