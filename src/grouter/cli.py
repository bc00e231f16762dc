"""The ``grouter`` command line.

Every command accepts ``--json`` (one JSON object with its results as the last stdout line)
and ``--debug`` (show tracebacks). User errors print one ``error: ...`` line and exit 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from dataclasses import fields
from pathlib import Path

from .errors import GrouterError


class Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one ``error:`` line like every other bad input."""

    def error(self, message: str):
        print(f"error: {message} (see `{self.prog} --help`)", file=sys.stderr)
        sys.exit(2)


def _common(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--json", action="store_true", help="print the results as one JSON object on the last stdout line")
    parser.add_argument("--debug", action="store_true", help="show a traceback on error")
    return parser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


# -- argument groups shared by the training commands ------------------------------------------
MODEL_FLAGS = {  # flag -> MoEConfig field
    "--d-model": "d_model", "--layers": "n_layers", "--heads": "n_heads", "--d-expert": "d_expert",
    "--experts": "n_experts", "--top-k": "top_k", "--shared-experts": "n_shared_experts",
}
TRAIN_FLAGS = {  # flag -> TrainConfig field
    "--steps": "steps", "--batch-size": "batch_size", "--lr": "lr", "--warmup-steps": "warmup_steps",
    "--eval-every": "eval_every", "--eval-sequences": "eval_sequences",
    "--checkpoint-every": "checkpoint_every", "--seed": "seed", "--device": "device",
}


def _add_training_args(p: argparse.ArgumentParser, default_preset: str, default_steps: int) -> None:
    from .model import MODEL_PRESETS
    from .train import TrainConfig

    g = p.add_argument_group("model")
    g.add_argument("--preset", choices=sorted(MODEL_PRESETS), default=default_preset, help="model size (default %(default)s)")
    for flag, field in MODEL_FLAGS.items():
        g.add_argument(flag, dest=field, type=int, default=None, help=f"override the preset's {field}")
    t = p.add_argument_group("training")
    types = {f.name: f.type for f in fields(TrainConfig)}
    defaults = TrainConfig()
    for flag, field in TRAIN_FLAGS.items():
        kind = {"int": int, "float": float, "str": str}[types[field]]
        default = default_steps if field == "steps" else getattr(defaults, field)
        t.add_argument(flag, dest=field, type=kind, default=default, help=f"(default {default})")
    t.add_argument("--overwrite", action="store_true", help="discard an existing run in --out and start over")


def _configs(args, data, router: str):
    from .model import MODEL_PRESETS, MoEConfig
    from .train import TrainConfig

    model_kw = dict(MODEL_PRESETS[args.preset])
    model_kw.update({f: getattr(args, f) for f in MODEL_FLAGS.values() if getattr(args, f) is not None})
    model_cfg = MoEConfig(vocab_size=data.vocab_size, max_seq_len=data.seq_len, router=router,
                          seed=args.seed, **model_kw).validate()
    train_cfg = TrainConfig(**{f: getattr(args, f) for f in TRAIN_FLAGS.values()}).validate()
    return model_cfg, train_cfg


# -- commands -------------------------------------------------------------------------------
def cmd_data_prepare(args) -> dict:
    from .data import prepare_default

    ds = prepare_default(args.out, vocab_size=args.vocab_size, seq_len=args.seq_len,
                         max_bytes_per_domain=int(args.max_mb_per_domain * 1e6), overwrite=args.overwrite)
    return _dataset_summary(ds)


def cmd_data_tokenize(args) -> dict:
    from .data import tokenize_corpus

    ds = tokenize_corpus(args.input, args.tokenizer, args.out, seq_len=args.seq_len, domain=args.domain,
                         text_field=args.text_field, val_fraction=args.val_fraction, overwrite=args.overwrite)
    return _dataset_summary(ds)


def cmd_data_subset(args) -> dict:
    from .data import PackedDataset, subset_domains

    domains = [d.strip() for d in args.domains.split(",") if d.strip()]
    return _dataset_summary(subset_domains(PackedDataset.open(args.data), domains, args.out, overwrite=args.overwrite))


def _dataset_summary(ds) -> dict:
    splits = ds.meta["splits"]
    return {"data": str(ds.path), "vocab_size": ds.vocab_size, "seq_len": ds.seq_len, "domains": ds.domains,
            "train_sequences": splits["train"]["n_sequences"], "val_sequences": splits["val"]["n_sequences"],
            "train_tokens": splits["train"]["n_tokens"], "fingerprint": ds.fingerprint}


def cmd_source_train(args) -> dict:
    from .data import PackedDataset
    from .train import train

    data = PackedDataset.open(args.data)
    model_cfg, train_cfg = _configs(args, data, args.router)
    return train(data, args.out, model_cfg, train_cfg, overwrite=args.overwrite)


def cmd_train(args) -> dict:
    """Baseline router, stored routing (--routing) or online Grouter routing (--grouter)."""
    from .data import PackedDataset
    from .train import external_routing, train

    data = PackedDataset.open(args.data)
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


def cmd_dispatch(args) -> dict:
    from .data import PackedDataset
    from .dispatch import dispatch

    return dispatch(args.grouter, PackedDataset.open(args.data), args.out, k=args.k, batch_size=args.batch_size,
                    device=args.device, weights_dtype=args.weights_dtype, overwrite=args.overwrite)


def cmd_capture(args) -> dict:
    from .capture import capture
    from .data import PackedDataset

    data = PackedDataset.open(args.data)
    return capture(args.source, data, args.out, layer=args.layer, batch_size=args.batch_size,
                   device=args.device, overwrite=args.overwrite)


def cmd_distill(args) -> dict:
    import warnings

    from .capture import Targets
    from .distill import DistillConfig, distill
    from .network import LEAK_WARNING, GrouterConfig

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
        warnings.simplefilter("ignore")
        return distill(targets, args.out, gcfg, cfg, overwrite=args.overwrite)


def cmd_fold(args) -> dict:
    from .data import PackedDataset
    from .fold import fold

    return fold(args.grouter, PackedDataset.open(args.data), args.out, args.experts, strategy=args.strategy,
                top_k=args.top_k, max_sequences=args.max_sequences, seed=args.seed, device=args.device,
                overwrite=args.overwrite)


def cmd_tune(args) -> dict:
    from .data import PackedDataset
    from .tune import TuneConfig, tune

    cfg = TuneConfig(tokens=args.tokens, batch_size=args.batch_size, lr=args.lr, method=args.method,
                     bias_gamma=args.bias_gamma, domain=args.domain, eval_sequences=args.eval_sequences,
                     seed=args.seed, device=args.device)
    return tune(args.grouter, PackedDataset.open(args.data), args.out, cfg, overwrite=args.overwrite)


def cmd_place(args) -> dict:
    from .place import place

    return place(args.routing, args.out, args.ranks, ranks_per_node=args.ranks_per_node, algorithm=args.algorithm,
                 global_batch=args.global_batch, seed=args.seed, overwrite=args.overwrite, level=args.level,
                 scope=args.scope, exact=args.exact)


def cmd_report(args) -> dict:
    from .report import report

    result = report(args.runs, args.out, overwrite=args.overwrite)
    if not args.json:
        print(result.pop("table"))
    return result


def cmd_demo(args) -> dict:
    from .demo import run_demo

    return run_demo(Path(args.out))


def cmd_reproduce(args) -> dict:
    from .reproduce import run_reproduce, scaled

    overrides = {k: v for k, v in (("held_out_domain", args.held_out_domain), ("target_steps", args.target_steps),
                                   ("data", args.data and str(args.data))) if v is not None}
    return run_reproduce(Path(args.out), scaled(args.scale, **overrides))


def build_parser() -> argparse.ArgumentParser:
    from .routers import ROUTER_KINDS

    baseline_routers = [r for r in ROUTER_KINDS if r != "external"]
    parser = _common(Parser(prog="grouter", description=__doc__.splitlines()[0]))
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)

    data = sub.add_parser("data", help="prepare or tokenize a corpus into the packed format")
    data_sub = data.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND", parser_class=Parser)
    p = _common(data_sub.add_parser("prepare", help="build the embedded default corpus (prose, speeches, code)"))
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--vocab-size", type=_positive_int, default=8192)
    p.add_argument("--seq-len", type=_positive_int, default=256)
    from .data import DEFAULT_MAX_BYTES_PER_DOMAIN

    p.add_argument("--max-mb-per-domain", type=float, default=DEFAULT_MAX_BYTES_PER_DOMAIN / 1e6,
                   help="cap on raw text per domain, MB (default %(default)s)")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_data_prepare)

    p = _common(data_sub.add_parser("tokenize", help="tokenize a user corpus (txt, jsonl, parquet) with a HF tokenizer"))
    p.add_argument("--input", required=True, nargs="+", type=Path)
    p.add_argument("--tokenizer", required=True, help="a tokenizer.json file or a Hugging Face model directory")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--seq-len", type=_positive_int, default=256)
    p.add_argument("--domain", help="domain label for all inputs (default: each file's name)")
    p.add_argument("--text-field", default="text", help="jsonl field / parquet column holding the text")
    p.add_argument("--val-fraction", type=float, default=0.05)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_data_tokenize)

    p = _common(data_sub.add_parser("subset", help="the same dataset restricted to some domains (e.g. to hold one out)"))
    p.add_argument("--data", required=True, type=Path)
    p.add_argument("--domains", required=True, help="comma-separated domains to keep")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_data_subset)

    source = sub.add_parser("source", help="the built-in source MoE model")
    source_sub = source.add_subparsers(dest="source_command", required=True, metavar="SUBCOMMAND", parser_class=Parser)
    p = _common(source_sub.add_parser("train", help="train the built-in MoE LM that serves as a source"))
    p.add_argument("--data", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--router", choices=baseline_routers, default="aux", help="the source's router (default aux)")
    _add_training_args(p, default_preset="small", default_steps=300)
    p.set_defaults(func=cmd_source_train)

    p = _common(sub.add_parser("train", help="train a target MoE with stored Grouter routing or a baseline router"))
    p.add_argument("--data", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--routing", type=Path, help="a routing store from `grouter dispatch` (no router compute)")
    which.add_argument("--grouter", type=Path, help="a Grouter, routing computed online every step")
    which.add_argument("--router", choices=baseline_routers,
                       help="aux: learned + load-balancing loss; zloss: + z-loss; auxfree: bias balancing; "
                            "hash: balanced token-id table; random: frozen random; none: learned, no balancing")
    _add_training_args(p, default_preset="small", default_steps=300)
    p.set_defaults(func=cmd_train)

    p = _common(sub.add_parser("capture", help="record a source MoE's router logits (one layer) for a dataset"))
    p.add_argument("--source", required=True, type=Path,
                   help="a `grouter source train` output or a Hugging Face MoE directory (Qwen2/3-MoE, OLMoE, Mixtral)")
    p.add_argument("--data", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--layer", type=int, default=None, help="MoE layer to capture (default: the first MoE layer)")
    p.add_argument("--batch-size", type=_positive_int, default=16)
    p.add_argument("--device", default="auto")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_capture)

    p = _common(sub.add_parser("distill", help="train a Grouter on captured router logits"))
    p.add_argument("--targets", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path)
    from .distill import DistillConfig

    d = DistillConfig()
    p.add_argument("--d-model", type=_positive_int, default=256)
    p.add_argument("--layers", type=_positive_int, default=3)
    p.add_argument("--heads", type=_positive_int, default=4)
    p.add_argument("--d-ff", type=_positive_int, default=512)
    p.add_argument("--no-rope", action="store_true", help="no positional information")
    p.add_argument("--bidirectional-leaks-future", action="store_true",
                   help="bidirectional attention, as the authors' code: routes see later tokens (a leak)")
    p.add_argument("--steps", type=_positive_int, default=d.steps)
    p.add_argument("--batch-size", type=_positive_int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--temperature", type=float, default=d.temperature, help="KL temperature (default 1: no temperature)")
    p.add_argument("--eval-every", type=_positive_int, default=d.eval_every)
    p.add_argument("--checkpoint-every", type=_positive_int, default=d.checkpoint_every)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_distill)

    from .fold import STRATEGIES

    p = _common(sub.add_parser("fold", help="fold a Grouter to fewer experts by co-activation affinity"))
    p.add_argument("--grouter", required=True, type=Path)
    p.add_argument("--experts", required=True, type=int, help="target expert count (fewer than the Grouter's)")
    p.add_argument("--data", required=True, type=Path, help="data to measure co-activation on")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--strategy", choices=STRATEGIES, default="affinity")
    p.add_argument("--top-k", type=_positive_int, default=None, help="the target's top-k (default: the Grouter's)")
    p.add_argument("--max-sequences", type=_positive_int, default=2000, help="sequences to measure affinity on")
    p.add_argument("--seed", type=int, default=0, help="for the random strategy")
    p.add_argument("--device", default="auto")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_fold)

    from .tune import METHODS, TuneConfig

    t = TuneConfig()
    p = _common(sub.add_parser("tune", help="re-balance a Grouter on target data (last layer only, balancing loss)"))
    p.add_argument("--grouter", required=True, type=Path)
    p.add_argument("--data", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--tokens", type=_positive_int, default=t.tokens, help="target tokens to tune on (default %(default)s)")
    p.add_argument("--method", choices=METHODS, default=t.method,
                   help="gradient: train the head with the load-balancing loss; bias: selection bias by the sign rule")
    p.add_argument("--lr", type=float, default=t.lr)
    p.add_argument("--bias-gamma", type=float, default=t.bias_gamma)
    p.add_argument("--batch-size", type=_positive_int, default=t.batch_size)
    p.add_argument("--domain", default=None, help="tune and evaluate on one domain of the data only")
    p.add_argument("--eval-sequences", type=_positive_int, default=t.eval_sequences)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_tune)

    p = _common(sub.add_parser("dispatch", help="route the dataset once with a frozen Grouter: the routing store",
                               description="Sharded: torchrun --nproc_per_node N -m grouter.cli dispatch ..."))
    p.add_argument("--grouter", required=True, type=Path)
    p.add_argument("--data", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--k", type=_positive_int, default=None, help="experts per token (default: the Grouter's top-k)")
    p.add_argument("--batch-size", type=_positive_int, default=16,
                   help="sequences per Grouter forward: 16 measured fastest on CPU (16: 167k, 64: 132k, "
                        "256: 94k tokens/s); use more on a GPU. Resuming needs the same value")
    p.add_argument("--weights-dtype", choices=("bfloat16", "float16"), default="bfloat16")
    p.add_argument("--device", default="auto")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_dispatch)

    p = _common(sub.add_parser("place", help="expert-parallel placement plan from a routing store"))
    p.add_argument("--routing", required=True, type=Path)
    p.add_argument("--ranks", required=True, type=_positive_int, help="expert-parallel ranks (must divide the experts)")
    p.add_argument("--ranks-per-node", type=_positive_int, default=None, help="GPUs per node, for node-level cost")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--algorithm", choices=("balanced", "greedy"), default="balanced",
                   help="balanced: equal sequences per rank per global batch; greedy: the paper's Algorithm 1 "
                        "(no capacity constraint: ranks get unequal work)")
    p.add_argument("--level", choices=("rank", "node"), default=None,
                   help="optimise rank-level (DeepEP) or node-level traffic (default: node when 1 < G < R)")
    p.add_argument("--global-batch", type=_positive_int, default=None, help="sequences per global batch (default 16×R)")
    p.add_argument("--scope", choices=("batch", "epoch"), default="batch", help="where the equal-share constraint holds")
    p.add_argument("--exact", action="store_true", help="optimal per-batch assignment (slower) instead of the greedy")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_place)

    p = _common(sub.add_parser("report", help="tables and plots comparing finished training runs"))
    p.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_report)

    p = _common(sub.add_parser("demo", help="the whole pipeline, small, on the embedded corpus"))
    p.add_argument("--out", type=Path, default=Path("demo"))
    p.set_defaults(func=cmd_demo)

    from .reproduce import SCALES

    p = _common(sub.add_parser("reproduce", help="the paper's comparison: Grouter vs every baseline, with ablations"))
    p.add_argument("--out", type=Path, default=Path("reproduce"))
    p.add_argument("--scale", choices=list(SCALES), default="cpu",
                   help="model and data sizes: smoke (minutes), cpu (about an hour on 2 cores), gpu (one GPU)")
    p.add_argument("--data", type=Path, default=None,
                   help="a dataset from `grouter data prepare/tokenize` (default: the embedded corpus, prepared in --out)")
    p.add_argument("--held-out-domain", default=None, help="the domain the source never sees (default: code)")
    p.add_argument("--target-steps", type=_positive_int, default=None, help="override the scale's target steps")
    p.set_defaults(func=cmd_reproduce)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result = args.func(args)
    except GrouterError as e:
        if args.debug:
            traceback.print_exc()
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except Exception as e:  # a bug, not bad input: still one line unless --debug
        if args.debug:
            traceback.print_exc()
        else:
            print(f"error: unexpected {type(e).__name__}: {e} (rerun with --debug for a traceback)", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result, default=str))
    else:
        for key, value in result.items():
            if not isinstance(value, (dict, list)):
                print(f"{key}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
