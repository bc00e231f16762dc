"""Compact targets and head groups on the demo: quality, speedup and bytes per token of each.

Around the demo (a head per layer, ``grouter demo``'s default), each variant changes
one thing and runs the rest of the demo's pipeline (distill, fold, tune, dispatch, a target run):

  full   every score of every layer, a head per layer (the demo's own Grouter)
  m2k, m4k, m8k   compact targets, ``grouter capture --top-m M`` with M = 2k, 4k, 8k (those below
         the source's experts; docs/method.md#compact-targets)
  g1, g2 ``grouter distill --head-groups G``: one head for all layers, two heads (G = L is ``full``)

For each: the distilled Grouter's validation top-k recall against the source (mean over layers;
compact targets keep the teacher's top-k exactly, so it compares across variants), the targets'
and the routing store's bytes per token, and per seed the target run's tokens-to-loss speedup over
the best of the demo's baselines at equal tokens and data order (``grouter.report.speedups``).

Resumable: every stage writes its own directory under ``--out`` (the demo's, by default ``demo``)
and is reused or resumed when rerun, so the same command continues where it stopped, and stages
the demo already ran (data, source, every-layer targets, the full variant, seed 0's baselines) are
reused. Seeds beyond 0 train the variants and the baselines again with that seed (``-sSEED``).

    grouter demo --out demo                                      # optional: shares its stages
    python benchmarks/scale_variants.py --out demo --seeds 0 1 2 --json scale_variants.json
    python benchmarks/scale_variants.py --out /tmp/s --smoke     # every stage at toy sizes, minutes
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import torch

from grouter.experiments.demo import demo_config
from grouter.experiments.pipeline import Pipeline, load_config
from grouter.formats.store import RoutingStore, bytes_per_token
from grouter.report import RunRecord, speedups

TOP_M_TIMES_K = (2, 4, 8)
SMOKE = {key: load_config("reproduce")["scales"]["smoke"][key] for key in (
    "max_mb_per_domain", "vocab_size", "seq_len", "source_steps", "distill_steps", "target_experts", "tune_tokens",
    "target_steps", "batch_size", "eval_every", "source", "grouter")}


def variants(cfg) -> list[dict]:
    """``{"name", "top_m", "head_groups"}`` of each variant the demo's source allows."""
    k, E, L = cfg.source["top_k"], cfg.source["n_experts"], cfg.source["n_layers"]
    return ([{"name": "full", "top_m": 0, "head_groups": None}]
            + [{"name": f"m{m}k", "top_m": m * k, "head_groups": None} for m in TOP_M_TIMES_K if m * k < E]
            + [{"name": f"g{g}", "top_m": 0, "head_groups": g} for g in (1, 2) if g < L])


def run(out: Path, seeds: list[int], smoke: bool) -> dict:
    cfg = replace(demo_config(**(SMOKE if smoke else {})), per_layer_heads=True)
    pipe = Pipeline(out, cfg, "scale")
    data = pipe.data()
    results = []
    for v in variants(cfg):
        targets = pipe.source_targets(data, True, v["top_m"])
        distilled, summary = pipe.distilled(targets, head_groups=v["head_groups"])
        routing = pipe.routing(pipe.tuned(pipe.folded(distilled, data), data), data)
        store = RoutingStore.open(routing)
        results.append({**v, "routing": routing, "val_topk_recall": summary["val_topk_recall"],
                        "targets_bytes_per_token": targets.bytes_per_token,
                        "store_bytes_per_token": bytes_per_token(store.k, store.n_experts,
                                                                 len(store.heads) if store.heads else 1),
                        "speedup": {}})
    for seed in seeds:
        stages = Pipeline(out, replace(cfg, seed=seed), f"scale, seed {seed}")
        suffix = f"-s{seed}" if seed else ""  # seed 0's runs are the demo's own
        runs = stages.train_targets(data, {f"grouter{r['routing'].name.removeprefix('routing')}{suffix}": r["routing"]
                                           for r in results}, ())
        runs += [stages.train_target(data, f"{b}{suffix}", router=b) for b in cfg.baselines]
        s = speedups([RunRecord.load(r) for r in runs])
        for r, path in zip(results, runs):
            r["speedup"][seed] = s["runs"][path.name]["speedup"]
            r.setdefault("best_baseline", {})[seed] = s["best_baseline"]
    return {"out": str(out), "smoke": smoke, "threads": torch.get_num_threads(),
            "variants": [{k: v for k, v in r.items() if k != "routing"} for r in results]}


def markdown(result: dict) -> str:
    lines = ["| variant | top-k recall | targets bytes/token | store bytes/token | speedup per seed |",
             "|---|---|---|---|---|"]
    for r in result["variants"]:
        speed = ", ".join("not reached" if x is None else f"{x:.2f}×" for x in r["speedup"].values())
        lines.append(f"| {r['name']} | {r['val_topk_recall']:.3f} | {r['targets_bytes_per_token']} | "
                     f"{r['store_bytes_per_token']} | {speed} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("demo"), help="the demo's --out (stages are shared)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="target-run seeds (default: 0)")
    parser.add_argument("--smoke", action="store_true", help="reproduce's smoke sizes instead of the demo's")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--json", type=Path, default=None, help="also write the result here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run(args.out, args.seeds, args.smoke)
    print(markdown(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
