"""One way to run a stage into its ``--out``, for the command line and for pipelines alike.

A stage is a function ``run(inputs, options, out)`` with an inputs and an options dataclass
(:mod:`grouter.options`); :class:`Stage` names it and says how it writes. :func:`execute` owns
everything around it:

- the checks of ``--out``: never equal to, inside or around one of the command's inputs (``--overwrite``
  would delete it), and an existing one is kept unless ``--overwrite`` (then replaced only once the new
  one is complete);
- the lock: a second writer of the same ``--out`` is refused while the first runs;
- the "already done" record: ``--out`` keeps the identity of the command that made it (its options and
  the content of its inputs) and its result, so the same command again is a no-op that prints the same
  result, and another command is refused (a run stopped early on purpose, whose result says
  ``stopped_at``, gets no record: the same command resumes it);
- how the stage writes, through :class:`Output`: ``atomic`` (a scratch directory renamed into place
  when complete), ``resumable`` (a work directory beside ``--out`` that survives a kill, resumed by the
  same command), ``run`` (a training run directory, resumed from its last checkpoint).

Under a torchrun launch every rank runs the stage; rank 0 owns ``--out`` (lock and record).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from dataclasses import dataclass, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterator

from .artifacts import ResumableDir, atomic_dir, output_lock, read_json, refuse_existing, write_json
from .errors import GrouterError
from .formats.run import Run
from .formats.stream import is_prefix, prefix_state
from .formats.verify import verify_artifact
from .integrity import file_sha256, fingerprint_of
from .options import as_path, build, check, identity, input_paths, merged

WRITES = ("atomic", "resumable", "run", "pipeline", None)
DONE_RECORD = ".grouter-command.json"  # in --out: the command that made it, its inputs' state, its result


@dataclass(frozen=True)
class Stage:
    """A pipeline stage as a command: ``run(inputs, options, out: Output) -> result``.

    ``writes``: how ``run`` writes its ``--out`` (see the module docstring; ``pipeline``: a whole
    experiment whose stages check their own outputs; None: it writes nothing). ``hidden``: options
    that are not flags of this command (fixed by its inputs)."""

    name: str
    run: Callable[[Any, Any, "Output"], dict | None]
    inputs: type
    options: type
    writes: str | None = "atomic"
    hidden: tuple[str, ...] = ()

    def __call__(self, out: str | Path | None = None, *, overwrite: bool = False, progress: bool = True,
                 **values) -> dict | None:
        """The Python API: ``fold(out, grouter=..., data=..., experts=16)``; inputs and options by name
        (a nested group as its dataclass, or as a dict of the fields to change)."""
        return self.outcome(out, overwrite=overwrite, progress=progress, **values).result

    def outcome(self, out: str | Path | None = None, *, overwrite: bool = False, progress: bool = True,
                **values) -> "Outcome":
        """:meth:`__call__`, saying also whether ``out`` already held the result."""
        names = {f.name for f in fields(self.inputs)}
        inputs = self.inputs(**{k: v for k, v in values.items() if k in names})
        given = {k: _fields_of(v) for k, v in values.items() if k not in names}
        return execute(self, inputs, build(self.options, merged(self.options, given)), out, overwrite=overwrite,
                       progress=progress)


@dataclass
class Output:
    """Where and how a stage writes: ``path`` is the ``--out`` it makes."""

    path: Path | None
    identity: dict
    overwrite: bool = False
    progress: bool = True
    command: str = "train"  # the stage's name, as a run directory records it

    def atomic(self) -> ContextManager[Path]:
        """A scratch directory that becomes ``path`` when the block finishes without error."""
        return atomic_dir(self.path, overwrite=self.overwrite)

    def resumable(self, more: dict | None = None) -> ResumableDir:
        """The work directory of a long job, resumed when the same command (and ``more``: what else
        resuming depends on, e.g. the number of processes) runs again."""
        return ResumableDir(self.path, {**self.identity, **(more or {})}, overwrite=self.overwrite)

    def run(self, identity: dict) -> Run:
        """A training run directory; resumed when it holds a run of this ``identity``."""
        return Run(self.path, identity, overwrite=self.overwrite, command=self.command)


@dataclass
class Outcome:
    result: dict | None
    reused: bool  # the --out already held this command's result


def rank_zero() -> bool:
    """Rank 0 of a torchrun launch (or a plain process): the one that owns --out."""
    return int(os.environ.get("RANK", "0") or 0) == 0


def execute(stage: Stage, inputs, options, out: str | Path | None, *, overwrite: bool = False,
            progress: bool = True) -> Outcome:
    """Run ``stage`` into ``out`` with every check, the lock and the record (module docstring)."""
    inputs = replace(inputs, **{f.name: _paths(getattr(inputs, f.name)) for f in fields(inputs)})
    check(options)
    _check_required(stage, inputs)
    out = None if out is None else Path(out)
    paths = input_paths(inputs, options)
    command = command_identity(stage, options, paths)
    output = Output(out, command, overwrite, progress, stage.name)
    if out is None or stage.writes in ("pipeline", None):
        return Outcome(stage.run(inputs, options, output), False)
    refuse_out_among_inputs(out, paths)
    if not overwrite and (done := already_done(out, command)) is not None:
        return Outcome(done, True)
    if stage.writes != "run":
        refuse_existing(out, overwrite)  # before any slow work
    with _locked(out):
        _remove_scratch(out)
        result = stage.run(inputs, options, output)
        if result is not None and "stopped_at" not in result and out.is_dir() and rank_zero():
            write_json(out / DONE_RECORD, {"identity": command, "result": result})
    return Outcome(result, False)


def _fields_of(value):
    """A nested group given as its dataclass, as the dict of its fields (merged with the defaults)."""
    return {f.name: getattr(value, f.name) for f in fields(value)} if is_dataclass(value) else value


def _paths(value):
    return [as_path(v) for v in value] if isinstance(value, (list, tuple)) else as_path(value)


def _check_required(stage: Stage, inputs) -> None:
    for f in fields(inputs):
        if f.metadata.get("required") and not f.metadata.get("exclusive") and getattr(inputs, f.name) in (None, []):
            raise GrouterError(f"{stage.name} needs --{f.name.replace('_', '-')}")


def state_of(path: Path) -> str:
    """What an input is now: its JSON manifests' content for a directory (they carry the checksums of
    everything else), its content's SHA-256 for a file, its two files' for a Megatron dataset prefix."""
    if not path.exists() and is_prefix(path):
        return prefix_state(path)
    if path.is_dir():
        return fingerprint_of({p.name: file_sha256(p) for p in sorted(path.glob("*.json"))})
    return file_sha256(path) if path.is_file() else "missing"


def command_identity(stage: Stage, options, paths: list[tuple[str, Path]]) -> dict:
    """What a command makes: its options and its inputs' content (not where they are: a copied
    directory is the same input)."""
    return {"command": stage.name, "options": identity(options),
            "inputs": [[name, state_of(path)] for name, path in paths]}


def already_done(out: Path, command: dict) -> dict | None:
    """The result of this very command if ``out`` holds it finished, and intact: every byte of it is
    verified before the command is called done (grouter.formats.verify)."""
    record = out / DONE_RECORD
    if not record.is_file():
        return None
    done = read_json(record, "command record")
    if done.get("identity") != command:
        return None
    try:
        verify_artifact(out)
    except GrouterError as e:
        raise GrouterError(f"{out} holds this command's result, but damaged: {e}; rerun with --overwrite to make it "
                           "again") from None
    return done.get("result")


def _remove_scratch(out: Path) -> None:
    """What a killed command left beside ``out`` (``.OUT.partial-*`` scratch directories, ``.OUT.old-*``
    replaced outputs): with the lock held, no other writer owns them. A resumable work directory
    (``.OUT.partial``) is kept: the same command resumes from it."""
    for leftover in [*out.parent.glob(f".{out.name}.partial-*"), *out.parent.glob(f".{out.name}.old-*")]:
        shutil.rmtree(leftover, ignore_errors=True)


def refuse_out_among_inputs(out: Path, paths: list[tuple[str, Path]]) -> None:
    """``out`` may not be an input, hold one, or lie inside one: ``--overwrite`` would delete it, and
    writing inside an input would change it."""
    target = out.resolve()
    for name, path in paths:
        p = path.resolve()
        if target == p or target in p.parents or p in target.parents:
            raise GrouterError(f"--out {out} is also an input of this command, or holds or lies inside one "
                               f"(--{name.replace('_', '-')} {path}); --overwrite would delete it: choose an --out "
                               "outside every input")


@contextlib.contextmanager
def _locked(out: Path) -> Iterator[None]:
    """Only rank 0 of a launch locks: the other ranks share its --out."""
    if not rank_zero():
        yield
        return
    with output_lock(out):
        yield
