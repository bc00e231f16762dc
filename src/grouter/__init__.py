"""grouter: preemptive routing for Mixture-of-Experts training.

A small router network is distilled from a trained MoE, frozen, and used as the fixed router of
a new model, so routing can be computed before training, stored with the data, and used to plan
expert parallelism. README.md shows the pipeline; docs/method.md explains the method.

The names below are imported on first use, so ``import grouter`` stays instant (PyTorch and the
rest load only when a name that needs them is touched).
"""

from __future__ import annotations

import importlib

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
