"""The demo's routings, several times over: what docs/steptime.md's spreads are measured on.

One demo run's routing is one draw: its source, its Grouter's distillation and tuning are seeded,
and another seed gives another routing, hence another plan. This script makes, for each seed
``s`` of ``--seeds``, under ``--out/seed{s}``, the routings `grouter demo` makes, and those of the
learned routers the paper's throughput was measured against:

- ``routing-layers-all``: the Grouter's (a head per source layer), as ``grouter demo``; with
  ``--shared-head`` also ``routing``: one shared head, as ``grouter demo --shared-head``;
- ``runs/aux`` and ``runs/stablemoe``: the demo's baseline targets, trained (seed ``s``), and
  ``routing-aux``, ``routing-stablemoe``: the routing every layer of each chose on the training
  split (:func:`grouter.integrations.routed_experts.record_routed_experts`), a per-layer store.

Seed 0 is the demo's own configuration (``grouter demo`` makes the same routing: ``--out/seed0`` may
be a demo's ``--out``, whose stages are then reused); seed s > 0
sets the config's ``seed`` (target runs) and ``routing_seed`` (source, distillation, tuning) to s.
The dataset is prepared once (``--out/seed{first}/data``, or ``--data``: one prepared before) and
shared. Stages are reused when rerun, so an interrupted run resumes, and seeds can run as separate
processes side by side. About 8 minutes per seed on the idle 2-core machine (more with
``--shared-head``).

    python benchmarks/demo_routings.py --out /tmp/demos --seeds 0 1 2
    python benchmarks/place_steptime.py --part spread --demos /tmp/demos   # the figures, with their spread
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def make(out: Path, seed: int, data_dir: Path | None, shared_head: bool) -> dict:
    """One seed's routings and learned-router stores under ``out``; returns their paths."""
    from dataclasses import replace

    from grouter.experiments.demo import demo_config
    from grouter.experiments.pipeline import Pipeline
    from grouter.integrations.routed_experts import import_routed_experts, record_routed_experts

    cfg = replace(demo_config(), seed=seed, routing_seed=seed)
    pipe = Pipeline(out, cfg, f"demo-seed{seed}")
    data = pipe.data(data_dir)
    paths = {}
    for per_layer in (True, False)[:1 + shared_head]:
        targets = pipe.source_targets(data, per_layer)
        distilled, _ = pipe.distilled(targets)
        routing = pipe.routing(pipe.tuned(pipe.folded(distilled, data), data), data)
        paths[routing.name] = routing
    for router in ("aux", "stablemoe"):
        run = pipe.train_target(data, router, router=router)
        store = out / f"routing-{router}"
        if not (store / "manifest.json").is_file():
            pipe.say(f"recording the routing of {run}")
            ids = record_routed_experts(run, data, "train")
            import_routed_experts(store, {"train": ids}, cfg.target_experts, data=data)
        paths[store.name] = store
    return {k: str(v) for k, v in paths.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--data", type=Path, default=None, help="a prepared dataset of the demo's config to share")
    ap.add_argument("--shared-head", action="store_true", help="also the Grouter with one shared head")
    args = ap.parse_args(argv)
    data = args.data
    for seed in args.seeds:
        t = time.perf_counter()
        paths = make(args.out / f"seed{seed}", seed, data, args.shared_head)
        data = data or args.out / f"seed{seed}" / "data"
        print(f"seed {seed}: {time.perf_counter() - t:.0f} s; {paths}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
