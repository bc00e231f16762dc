"""grouter: preemptive routing for Mixture-of-Experts training.

A small router network is distilled from a trained MoE, frozen, and used as the fixed router of
a new model, so routing can be computed before training, stored with the data, and used to plan
expert parallelism. README.md shows the pipeline; docs/method.md explains the method.

The names below are imported on first use, so ``import grouter`` stays instant (PyTorch and the
rest load only when a name that needs them is touched).
"""

from __future__ import annotations

import _signal  # the C module: `import signal` loads enum first, long enough to be interrupted
import os
import sys


def _interrupted_while_starting(signum, frame) -> None:
    os.write(2, b"\nerror: interrupted\n")
    os._exit(130)


def _started_as_the_command() -> bool:
    """The ``grouter`` console script, or ``python -m grouter`` / ``python -m grouter.cli``."""
    if os.path.basename(sys.argv[0]) == "grouter":
        return True
    argv = getattr(sys, "orig_argv", [])
    return "-m" in argv and argv[argv.index("-m") + 1:][:1] in (["grouter"], ["grouter.cli"])


# Started as the command: a Ctrl-C while it loads (seconds of imports) ends it with one line, not a
# traceback from inside an import; grouter.cli.main puts back the usual KeyboardInterrupt once the
# command's own handling is in place.
if _started_as_the_command():
    _signal.signal(_signal.SIGINT, _interrupted_while_starting)

import importlib  # noqa: E402  (after the handler: it is the first thing the command does)

__version__ = "0.1.0"

_EXPORTS = {  # name -> the module that defines it
    "Grouter": "network", "GrouterConfig": "formats.grouter",
    "GrouterError": "errors",
    "MoEConfig": "model", "MoELM": "model", "MoEOutput": "model",
    "PackedDataset": "formats.dataset",
    "Plan": "formats.plan", "PlanSampler": "formats.plan",
    "Routing": "routers", "topk_gating": "routers",
    "RoutingStore": "formats.store",
    "Targets": "formats.targets",
    "TrainConfig": "loop",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'grouter' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
