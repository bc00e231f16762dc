"""Seed noise of a finished reproduction: rerun some of its target runs with other seeds
(initialisation and data order) and print each run's final validation losses per seed.

    python benchmarks/reproduce_seeds.py --reproduce /tmp/repro --seeds 1 --runs grouter,aux,random

Differences between runs smaller than the spread across seeds are noise, not results.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

from grouter.experiments.pipeline import Pipeline, PipelineConfig
from grouter.formats.dataset import PackedDataset


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reproduce", type=Path, required=True, help="a finished `grouter reproduce --out` directory")
    p.add_argument("--seeds", default="1", help="comma-separated seeds to add (the reproduction used 0)")
    p.add_argument("--runs", default="grouter,aux,random", help="runs to repeat: grouter, grouter-raw or baselines")
    args = p.parse_args()
    done = json.loads((args.reproduce / "reproduce.json").read_text())
    cfg = PipelineConfig.from_dict({**done["config"], "baselines": (), "fold_ablation": ()})
    data = PackedDataset.open(cfg.data or args.reproduce / "data")
    names = args.runs.split(",")
    kind = "-layers-all" if done["config"].get("per_layer_heads") else ""  # reproduce's heads: per layer, or shared
    stores = {"grouter": args.reproduce / f"routing{kind}", "grouter-raw": args.reproduce / f"routing-folded{kind}"}
    table = {name: {0: json.loads((args.reproduce / "runs" / name / "run.json").read_text())["summary"]}
             for name in names}
    for seed in map(int, args.seeds.split(",")):
        stages = Pipeline(args.reproduce / f"seed{seed}", replace(cfg, seed=seed), f"seed {seed}")
        routed = {n: stores[n] for n in names if n in stores}
        for run in stages.train_targets(data, routed, tuple(n for n in names if n not in stores)):
            table[run.name][seed] = json.loads((run / "run.json").read_text())["summary"]
    domains = sorted(next(iter(table[names[0]].values()))["val_loss_by_domain"])
    print("| run | seed | val loss | " + " | ".join(f"val {d}" for d in domains) + " |")
    print("|---|---|---|" + "---|" * len(domains))
    for name, by_seed in table.items():
        for seed, s in sorted(by_seed.items()):
            print(f"| {name} | {seed} | {s['final_val_loss']:.3f} | "
                  + " | ".join(f"{s['val_loss_by_domain'][d]:.3f}" for d in domains) + " |")


if __name__ == "__main__":
    main()
