"""``grouter verify DIR``: check every byte of an artifact against its recorded checksums, now
(:mod:`grouter.formats.verify`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .formats.verify import verify_artifact
from .options import path_input
from .runner import Output, Stage


@dataclass
class Inputs:
    artifact: Path = path_input("a dataset, targets, routing store or stream, Grouter, model, run or placement-plan "
                                "directory",
                                positional=True, metavar="DIR")


@dataclass
class Options:
    """grouter verify has no options: it checks everything."""


def run(inputs: Inputs, o: Options, out: Output) -> dict:
    return verify_artifact(inputs.artifact)


verify = Stage("verify", run, Inputs, Options, writes=None)
