"""Expert-parallel bytes and step time: plan vs random placement, 2 and 4 gloo processes on CPU.

For each number of ranks R (``--ranks``, default 2 4) one ``grouter.device.spawn`` of R CPU processes
(gloo, one thread each) trains the EP model (``grouter.ep.train_ep``) for ``--steps`` steps four
times: {plan, random} placement x {dedup (DeepEP-style, one copy per (token, rank)), slot
(Megatron-style, one copy per (token, expert))} exchange. Reported per run, from the run's
metrics.jsonl: hidden-state bytes each rank sends to other ranks per step (forward dispatch; mean
over ranks and steps), all all-to-all bytes per rank per step (dispatch + combine, their backward,
counts/metadata), remote copies, the plan / random ratio next to the one the plan's report
predicts for the whole split, and the median step time (first step excluded; max over ranks) and
time inside the all-to-alls.

Inputs: ``--data D --routing S`` (a dataset and its routing store) and optionally ``--plan R=P``
(a plan for R ranks; made on the fly with ``grouter.place.plan_placement`` otherwise). Without
``--routing`` a small dataset is packed from Python standard-library modules and given a synthetic
clustered routing store (``grouter.testing.synthetic_store``) in ``--work``.

    OMP_NUM_THREADS=1 python benchmarks/ep_bytes.py --json ep_bytes.json
    OMP_NUM_THREADS=1 python benchmarks/ep_bytes.py --data D --routing S --plan 4=P4 --ranks 4

Step times on a shared 2-core machine with 4 processes are dominated by CPU oversubscription; the
bytes are exact and machine-independent. Measured (2 shared cores, defaults: synthetic store, 16
experts top-2, 8 clusters, d_model 64, 2 layers, 8 x 64 tokens per rank, 10 steps; 23 s in all):

| ranks | exchange | plan bytes / rank / step | random | plan / random | plan report predicts |
|---:|---|---:|---:|---:|---:|
| 2 | dedup | 107,571 | 207,642 | 0.518 | 0.539 |
| 2 | slot | 132,173 | 267,187 | 0.495 | 0.510 |
| 4 | dedup | 209,638 | 357,850 | 0.586 | 0.576 |
| 4 | slot | 231,155 | 391,014 | 0.591 | 0.565 |

(dispatch only; all all-to-all bytes incl. results, gradients and metadata are ~4.06x (dedup) / ~4.0x
(slot) of it; step times 0.04-0.05 s at 2 ranks, 0.11-0.12 s at 4, no placement effect visible.)
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

MODULES = ["argparse", "json/decoder", "textwrap", "string", "fractions", "statistics", "csv", "calendar",
           "heapq", "bisect", "shlex", "difflib", "glob", "fnmatch", "queue", "sched", "pathlib", "tarfile"]


def small_dataset(out: Path, seq_len: int):
    """Code and docstring prose of a few stdlib modules, packed (seconds, no downloads)."""
    import ast
    import sysconfig

    from grouter.data import Document, PackConfig, pack_documents, train_tokenizer

    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for name in MODULES:
        path = root / f"{name}.py"
        if not path.is_file():
            path = root / name / "__init__.py"
        if not path.is_file():
            continue
        source = path.read_text()
        docs.append(Document("code", name, source[:40_000]))
        tree = ast.parse(source)
        nodes = [tree] + [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
        docs.append(Document("prose", name, "\n\n".join(d for n in nodes if (d := ast.get_docstring(n)))))
    tokenizer = train_tokenizer((d.text for d in docs), vocab_size=1024)
    return pack_documents(docs, tokenizer, out, PackConfig(seq_len=seq_len, val_fraction=0.05, seed=0))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data")
    p.add_argument("--routing")
    p.add_argument("--plan", action="append", default=[], metavar="R=DIR", help="plan for R ranks (repeatable)")
    p.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--per-rank-batch", type=int, default=8, help="sequences per rank per step (plans made here)")
    p.add_argument("--experts", type=int, default=16, help="synthetic store: experts")
    p.add_argument("--top-k", type=int, default=2, help="synthetic store: k")
    p.add_argument("--clusters", type=int, default=8, help="synthetic store: sequence clusters")
    p.add_argument("--seq-len", type=int, default=64, help="synthetic dataset: tokens per sequence")
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--work", help="scratch directory (default: a temporary one, removed)")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)

    from grouter.device import spawn
    from grouter.ep import Options as EPOptions
    from grouter.ep import train_many
    from grouter.formats.dataset import PackedDataset
    from grouter.formats.plan import Plan
    from grouter.formats.store import RoutingStore
    from grouter.loop import TrainConfig
    from grouter.model import MoEConfig
    from grouter.place import Options as PlaceOptions, plan_placement
    from grouter.testing import synthetic_store

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="ep_bytes_"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    try:
        if args.routing:
            if not args.data:
                p.error("--routing needs --data (the dataset it routes)")
            data = PackedDataset.open(args.data)
            store_dir = Path(args.routing)
        else:
            data = PackedDataset.open(args.data) if args.data else small_dataset(work / "data", args.seq_len)
            store_dir = work / "store"
            if store_dir.exists():
                shutil.rmtree(store_dir)
            synthetic_store(data, store_dir, args.experts, args.top_k, args.clusters, seed=0, noise=0.1, decay=0.7)
        store = RoutingStore.open(store_dir, data=data)
        given = {int(k): Path(v) for k, v in (s.split("=", 1) for s in args.plan)}
        cfg = MoEConfig(vocab_size=data.vocab_size, d_model=args.d_model, n_layers=args.layers, n_heads=4,
                        d_expert=args.d_model, n_experts=store.n_experts, top_k=store.k, max_seq_len=data.seq_len,
                        router="external", seed=0)
        tcfg = TrainConfig(steps=args.steps, lr=3e-3, warmup_steps=2, seed=0, device="cpu")
        rows = []
        for R in args.ranks:
            if R in given:
                plan_dir = given[R]
            else:
                plan_dir = work / f"plan{R}"
                plan_dir.mkdir(exist_ok=True)
                tp = time.perf_counter()
                made = plan_placement(store, PlaceOptions(ranks=R, global_batch=args.per_rank_batch * R, clusters=32, seed=0))
                made.save(plan_dir)
                (plan_dir / "report.json").write_text(json.dumps(made.report))  # Plan.load reads it back
                print(f"plan for {R} ranks: {time.perf_counter() - tp:.1f} s", file=sys.stderr)
            plan = Plan.load(plan_dir)
            predicted = {m: c["plan_over_random"] for m, c in plan.report.get("cost_models", {}).items()}
            runs = []
            for placement in ("plan", "random"):
                for exchange in ("dedup", "slot"):
                    out = work / f"r{R}-{placement}-{exchange}"
                    runs.append(dict(data=data.path, routing=store_dir, out=out, plan=plan_dir, placement=placement,
                                     exchange=exchange, model_cfg=cfg, overwrite=True,
                                     options=EPOptions(placement=placement, exchange=exchange, schedule=tcfg)))
            ts = time.perf_counter()
            spawn(R, train_many, (runs,))
            print(f"{R} ranks: 4 runs of {args.steps} steps in {time.perf_counter() - ts:.1f} s", file=sys.stderr)
            for run in runs:
                s = json.loads((run["out"] / "run.json").read_text())["summary"]
                recs = [json.loads(x) for x in (run["out"] / "metrics.jsonl").read_text().splitlines()]
                x = run["exchange"]
                rows.append({
                    "ranks": R, "placement": run["placement"], "exchange": x,
                    "dispatch_bytes_per_rank_step": s["dispatch_bytes_per_rank_step"],
                    "dispatch_bytes_max_rank_step": float(np.mean([max(r["bytes_per_rank"]["dispatch"])
                                                                   for r in recs])),
                    "all_a2a_bytes_per_rank_step": s["total_bytes_per_rank_step"],
                    "remote_copies_per_rank_step": s["remote_copies_per_rank_step"],
                    "analytic_dispatch_bytes_per_rank_step": s["analytic_dispatch_bytes_per_rank_step"][x],
                    "step_seconds_median": s["step_seconds_median"], "a2a_seconds_median": s["a2a_seconds_median"],
                    "final_loss": s["final_loss"],
                    "plan_report_plan_over_random": predicted.get("deepep" if x == "dedup" else "megatron"),
                })
        rows.sort(key=lambda r: (r["ranks"], r["exchange"], r["placement"]))
        for r in rows:
            base = next(x for x in rows if (x["ranks"], x["exchange"], x["placement"]) ==
                        (r["ranks"], r["exchange"], "random"))
            r["over_random"] = r["dispatch_bytes_per_rank_step"] / base["dispatch_bytes_per_rank_step"]
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)

    tokens = None if not rows else args.per_rank_batch * data.seq_len
    print(f"\nEP all-to-all bytes per rank per step: {store.n_experts} experts top-{store.k}, d_model {cfg.d_model} "
          f"(float32), {cfg.n_layers} MoE layers, {args.per_rank_batch} sequences x {data.seq_len} tokens per rank, "
          f"{args.steps} steps, gloo on CPU\n")
    print("| ranks | exchange | placement | dispatch bytes / rank / step | vs random | plan report predicts "
          "| all a2a bytes / rank / step | remote copies / rank / step | step s (median) | a2a s |")
    print("|---:|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        pred = r["plan_report_plan_over_random"]
        print(f"| {r['ranks']} | {r['exchange']} | {r['placement']} | {r['dispatch_bytes_per_rank_step']:,.0f} | "
              f"{r['over_random']:.3f} | {'' if r['placement'] == 'random' or pred is None else f'{pred:.3f}'} | "
              f"{r['all_a2a_bytes_per_rank_step']:,.0f} | {r['remote_copies_per_rank_step']:,.1f} | "
              f"{r['step_seconds_median']:.3f} | {r['a2a_seconds_median']:.3f} |")
    exact = all(r["dispatch_bytes_per_rank_step"] == r["analytic_dispatch_bytes_per_rank_step"] for r in rows)
    print(f"\n(tokens per rank per step: {tokens}; dispatch bytes = remote copies x d_model x 4; "
          f"measured == analytic in every run: {exact}; total {time.perf_counter() - t0:.0f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "args": vars(args), "machine": platform.platform(),
                                               "python": sys.version.split()[0]}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
