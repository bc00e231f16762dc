"""The ``grouter`` command line, made from the stages.

Every command is a :class:`grouter.runner.Stage`: its flags come from the stage's inputs and options
dataclasses (:mod:`grouter.options`: each default, range and help line lives there, once), and it runs
through :func:`grouter.runner.execute`, which owns ``--out``. This module only lists the commands and
turns parsed arguments into inputs and options. Every command accepts ``--json`` (one JSON object
with its results as the last stdout line) and ``--debug`` (show tracebacks); user errors print one
``error: ...`` line and exit 2.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
import traceback
import warnings
from dataclasses import MISSING, dataclass, fields
from pathlib import Path

import torch
from tqdm import tqdm

import grouter

from .artifacts import is_disk_full
from .data import data_megatron, data_prepare, data_subset, data_tokenize
from .device import exit_now
from .capture import capture
from .dispatch import dispatch
from .distill import distill
from .ep import ep
from .errors import GrouterError
from .experiments.demo import demo
from .experiments.reproduce import reproduce
from .fold import fold
from .options import build, defaults, flag_of, memory_flags, merged, nested, types_of
from .estimate import estimate_stage
from .place import place
from .report import report
from .runner import Stage, execute, rank_zero
from .train import source_train, train
from .tune import tune
from .verify import verify


@dataclass(frozen=True)
class Command:
    stage: Stage
    help: str
    description: str | None = None


COMMANDS = (
    Command(data_prepare, "build the embedded default corpus (prose, speeches, code)"),
    Command(data_tokenize, "tokenize a user corpus (txt, jsonl, parquet) with a HF tokenizer"),
    Command(data_subset, "the same dataset restricted to some domains (e.g. to hold one out)"),
    Command(data_megatron, "pack Megatron indexed datasets (.bin/.idx) as they are, no re-tokenization"),
    Command(source_train, "train the built-in MoE LM that serves as a source"),
    Command(train, "train a target MoE with stored Grouter routing or a baseline router"),
    Command(capture, "record a source MoE's router scores (one layer, or several) for a dataset"),
    Command(distill, "train a Grouter on captured router scores"),
    Command(fold, "fold a Grouter to fewer experts by co-activation affinity"),
    Command(tune, "re-balance a Grouter on target data (last layer only, balancing loss)"),
    Command(dispatch, "route the dataset once with a frozen Grouter: the routing store",
            "Sharded: torchrun --nproc_per_node N -m grouter.cli dispatch ..."),
    Command(place, "expert-parallel placement plan from a routing store"),
    Command(ep, "expert-parallel training of the built-in MoE LM on stored routing with a plan",
            "Launch with torchrun --nproc_per_node R -m grouter.cli ep ... (one process: world 1). A reference "
            "engine with exact per-phase byte counts; see docs/method.md."),
    Command(estimate_stage, "bytes, FLOPs and GPU-hours of each stage at a scale (the paper's, or a small one)",
            "Bytes from the formats' own layouts; --artifacts checks them against a pipeline directory (docs/scale.md)."),
    Command(verify, "check every byte of an artifact against its checksums",
            "Readers check what they read as they read it; this checks everything now."),
    Command(report, "tables and plots comparing finished training runs"),
    Command(demo, "the whole pipeline, small, on the embedded corpus"),
    Command(reproduce, "the paper's comparison: Grouter vs every baseline, with ablations"),
)
GROUPS = {"data": "prepare, tokenize or subset a corpus in the packed format", "source": "the built-in source MoE model"}


class UsageError(Exception):
    """A mistake on the command line itself (unknown option, bad value)."""


class Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is reported like every other bad input (see :func:`main`)."""

    def error(self, message: str):
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def _common(p: argparse.ArgumentParser, top: bool = False) -> argparse.ArgumentParser:
    """``--json`` and ``--debug``, accepted before the command and after it (a subcommand's default
    must not undo ``grouter --json CMD``)."""
    default = False if top else argparse.SUPPRESS
    p.add_argument("--json", action="store_true", default=default,
                   help="print the results (or the error) as one JSON object on the last stdout line")
    p.add_argument("--debug", action="store_true", default=default, help="show a traceback on error")
    return p


def _type(meta: dict, kind):
    """An argparse type from a field's range or parser: bad text is one ``error:`` line."""
    parse = meta.get("parse") or (meta["range"].parse if meta.get("range") else kind)

    def typed(text: str):
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    typed.__name__ = getattr(kind, "__name__", "value")  # what argparse names in "invalid ... value"
    return typed


def _kind(annotation) -> type:
    """The scalar type of an annotation such as ``int | None``."""
    args = [a for a in getattr(annotation, "__args__", (annotation,)) if a is not type(None)]
    return args[0] if len(args) == 1 and isinstance(args[0], type) else str


class _Flags:
    """Adds one command's flags from its stage's dataclasses, with mutually exclusive groups."""

    def __init__(self, parser: argparse.ArgumentParser, stage: Stage):
        self.parser, self.stage, self.groups, self.added = parser, stage, {}, set()
        # alternatives of which one must be given: a required input among them
        self.required = {f.metadata.get("exclusive") for f in fields(stage.inputs) if f.metadata.get("required")}

    def target(self, meta: dict):
        key = meta.get("exclusive")
        if key is None:
            return self.parser
        if key not in self.groups:
            self.groups[key] = self.parser.add_mutually_exclusive_group(required=key in self.required)
        return self.groups[key]

    def inputs(self) -> None:
        for f in fields(self.stage.inputs):
            meta = f.metadata
            kw = dict(type=Path, help=_literal(meta["help"]), metavar=meta.get("metavar"),
                      nargs="+" if meta["many"] else None)
            if meta["positional"]:
                self.parser.add_argument(f.name, **kw)
            else:
                required = meta["required"] and not meta.get("exclusive")
                self.target(meta).add_argument(flag_of(f), dest=f.name, required=required, **kw)

    def options(self, cls, values: dict, prefix: str = "", grouped: bool = False) -> None:
        """Flags for the fields of ``cls`` with these defaults (:func:`grouter.options.defaults`);
        ``grouped``: only the alternatives of a group the inputs started (argparse shows a group as
        one only when its flags are added one after the other)."""
        for f in fields(cls):
            sub = nested(cls, f)
            if sub is not None:
                self.options(sub, values[f.name], f"{prefix}{f.name}.", grouped)
            elif (f.metadata.get("cli", True) and f.name not in self.stage.hidden and prefix + f.name not in self.added
                  and (not grouped or f.metadata.get("exclusive") in self.groups)):
                self.added.add(prefix + f.name)
                self.option(f, types_of(cls)[f.name], values.get(f.name, f.default), prefix)

    def option(self, f, annotation, default, prefix: str) -> None:
        meta, dest = f.metadata, prefix + f.name
        help_text = meta.get("help", "")
        if isinstance(default, bool):
            action = "store_false" if default else "store_true"
            self.target(meta).add_argument(flag_of(f), dest=dest, action=action, help=_literal(help_text))
            return
        required = default is MISSING
        if not required and default is not None:
            help_text += f" (default {default})"
        self.target(meta).add_argument(flag_of(f), dest=dest, required=required, default=None if required else default,
                                       type=_type(meta, _kind(annotation)), choices=meta.get("choices"),
                                       metavar=meta.get("metavar") or (None if meta.get("choices") else f.name.upper()),
                                       help=_literal(help_text.strip()) or None)


def _literal(help_text: str) -> str:
    """Help text as argparse prints it: it %-formats help strings, so a "55 % of" would crash --help."""
    return help_text.replace("%", "%%")


def _add(sub, name: str, command: Command) -> None:
    stage = command.stage
    p = sub.add_parser(name, help=_literal(command.help), description=command.description)
    _common(p)
    p.set_defaults(command=command)
    flags = _Flags(p, stage)
    flags.inputs()
    flags.options(stage.options, defaults(stage.options), grouped=True)
    if stage.writes == "pipeline":
        p.add_argument("--out", type=Path, default=None, help="where every stage writes (rerun to resume)")
    elif stage.writes is not None:
        p.add_argument("--out", required=True, type=Path,
                       help="run directory (resumed when it holds this same run)" if stage.writes == "run"
                       else "output directory")
        p.add_argument("--overwrite", action="store_true", help="replace an existing --out (only once the new one is done)")
    flags.options(stage.options, defaults(stage.options))


def build_parser() -> argparse.ArgumentParser:
    parser = _common(Parser(prog="grouter", description=__doc__.splitlines()[0]), top=True)
    sub = parser.add_subparsers(dest="command_name", required=True, metavar="COMMAND", parser_class=Parser)
    groups = {}
    for command in COMMANDS:
        group, _, name = command.stage.name.rpartition(" ")
        if group and group not in groups:
            groups[group] = sub.add_parser(group, help=GROUPS[group]).add_subparsers(
                dest=f"{group}_command", required=True, metavar="SUBCOMMAND", parser_class=Parser)
        _add(groups[group] if group else sub, name, command)
    return parser


def _values(cls, args, prefix: str = "") -> dict:
    """The parsed values of a dataclass's fields, nested groups as dicts (absent flags keep defaults)."""
    out = {}
    for f in fields(cls):
        sub = nested(cls, f)
        if sub is not None:
            out[f.name] = _values(sub, args, f"{prefix}{f.name}.")
        elif hasattr(args, prefix + f.name):
            out[f.name] = getattr(args, prefix + f.name)
    return out


def _failure(args, message: str, code: int, everywhere: bool = False) -> int:
    """One ``error:`` line on a line of its own (progress bars closed first), printed by rank 0 of a
    launch only, unless ``everywhere`` (a bug may hit one rank alone)."""
    for bar in list(getattr(tqdm, "_instances", [])):
        bar.close()
    if rank_zero() or everywhere:
        print(f"error: {message}", file=sys.stderr, flush=True)
        if getattr(args, "json", False):
            print(json.dumps({"error": message}))
    return code


def _system_failure(e: BaseException, options) -> str | None:
    """A failure the user's machine or paths cause (memory, a full disk, permissions, a file in the
    way), stated with its fix; None for anything else (a bug)."""
    if isinstance(e, (MemoryError, torch.OutOfMemoryError)) or any(
            s in str(e).lower() for s in ("out of memory", "can't allocate memory", "cannot allocate memory")):
        sizes = ", ".join(memory_flags(options)) if options is not None else ""
        return ("out of memory: lower what this command's memory grows with" + (f" ({sizes})" if sizes else "")
                + ", or run it on a machine with more memory")
    where = getattr(e, "filename", None)
    if is_disk_full(e):
        return f"no space left on the device of {where or '--out'}: free space, or choose an --out on another disk"
    if isinstance(e, PermissionError):
        return f"permission denied on {where}: choose paths you can read and an --out you can write"
    if isinstance(e, (NotADirectoryError, FileExistsError)):
        return f"{where}: a file is in the way of a directory grouter needs; choose another --out"
    if isinstance(e, OSError):
        return f"{type(e).__name__} on {where or 'a file'}: {e.strerror or e} (rerun with --debug for details)"
    return None


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"warning: {message}", file=sys.stderr)


def run_command(args) -> int:
    """Run the parsed command; print its result; the exit status."""
    stage, options = args.command.stage, None
    try:
        inputs = stage.inputs(**_values(stage.inputs, args))
        options = build(stage.options, merged(stage.options, _values(stage.options, args)))
        with warnings.catch_warnings():
            warnings.simplefilter("once")
            warnings.showwarning = _show_warning
            outcome = execute(stage, inputs, options, getattr(args, "out", None),
                              overwrite=getattr(args, "overwrite", False))
        if outcome.reused:
            print(f"{args.out} already holds the result of this command; nothing to do (--overwrite redoes it)",
                  file=sys.stderr)
        result = outcome.result
    except GrouterError as e:
        if args.debug:
            traceback.print_exc()
        return _failure(args, str(e), 2)
    except KeyboardInterrupt:
        return _failure(args, "interrupted; rerun the same command to resume", 130)
    except Exception as e:  # the machine's limits (memory, disk, paths), else a bug: one line unless --debug
        if args.debug:
            traceback.print_exc()
        if (message := _system_failure(e, options)) is not None:
            return _failure(args, message, 2)
        return _failure(args, f"unexpected {type(e).__name__}: {e} (rerun with --debug for a traceback)", 1,
                        everywhere=True)
    try:
        _print(args, result)
        sys.stdout.flush()
    except BrokenPipeError:  # `grouter ... | head`: the reader took what it wanted; nothing is lost
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # and the exit's flush stays quiet
    return 0


def _print(args, result: dict | None) -> None:
    if result is None:
        return
    if args.json:
        print(json.dumps(result, default=str))
        return
    if "table" in result:
        print(result.pop("table"))
    for key, value in result.items():
        if not isinstance(value, (dict, list)):
            print(f"{key}: {value}")


NUMBER = re.compile(r"-(inf(inity)?|nan|[0-9.]+(e[+-]?[0-9]+)?)", re.IGNORECASE)


def _negative_values(argv: list[str]) -> list[str]:
    """``--lr -inf`` as ``--lr=-inf``: argparse would take a value that starts with '-' (but for plain
    negative numbers) for a flag and say "expected one argument"; this way the range check answers."""
    out: list[str] = []
    for token in argv:
        if out and out[-1].startswith("--") and "=" not in out[-1] and NUMBER.fullmatch(token):
            out[-1] = f"{out[-1]}={token}"
        else:
            out.append(token)
    return out


def main(argv: list[str] | None = None) -> int:
    if signal.getsignal(signal.SIGINT) is grouter._interrupted_while_starting:  # loaded: interrupts are ours now
        signal.signal(signal.SIGINT, signal.default_int_handler)
    argv = _negative_values(sys.argv[1:] if argv is None else list(argv))
    try:
        args = build_parser().parse_args(argv)
    except UsageError as e:
        return _failure(argparse.Namespace(json="--json" in argv), str(e), 2)
    code = run_command(args)
    if args.command.stage.name == "ep" and "WORLD_SIZE" in os.environ:
        # A rank of a launch that ran gloo collectives leaves without interpreter teardown: gloo's
        # worker threads may still hold tensors, and tearing down under them aborts the process.
        exit_now(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
