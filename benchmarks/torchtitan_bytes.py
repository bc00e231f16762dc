"""torchtitan expert parallelism with Grouter routing: the bytes its all-to-alls send, plan vs random placement.

For each placement, one ``grouter.device.spawn`` of R CPU processes (gloo, one thread each) runs
torchtitan's Qwen3-MoE (``grouter.integrations.torchtitan.qwen3_moe_config``, routers converted to
``GrouterRouter``, stored routing from ``GrouterDataLoader``) under torchtitan's own expert
parallelism: ``ParallelDims(dp_shard=R, ep=R)``, ``set_qwen3_sharding_config(enable_ep=True)``,
``model.parallelize``: the experts sharded ``Shard(0)`` over the EP mesh (rank r holds experts
``[r*E/R, (r+1)*E/R)``) and ``AllToAllTokenDispatcher`` exchanging the tokens. ``--steps`` forward
and backward passes (no optimizer step: the routing, and so the traffic, does not depend on the
weights), each on the rank's next local batch.

Counted (``grouter.integrations.torchtitan_measure``): a subclass of ``AllToAllTokenDispatcher`` (``CountingDispatcher``, swapped into the
model config) records the input splits of every dispatch all-to-all, i.e. the rows (token
copies) torchtitan sends to each rank. Its dispatcher sends one row per (token, expert) pair,
``x_TD[argsort(expert ids) // k]``, so the copies to other ranks are grouter's ``megatron`` cost
model, predicted by ``grouter.place.remote_volume`` from the stored routing of the same sequences
(logical ids, ``plan.rank_of_expert``). The combine all-to-all returns as many rows, and the
backward passes of both send as many again (4x the dispatch in all).

Placements: ``plan``, the plan's expert permutation (the dataloader relabels the routing) and its
sample placement; ``random``, the identity permutation (expert e on rank ``e // (E/R)``) and the
plan's global batches dealt to ranks at random (``grouter.ep.rank_batches``).

    OMP_NUM_THREADS=1 python benchmarks/torchtitan_bytes.py
    OMP_NUM_THREADS=1 python benchmarks/torchtitan_bytes.py --data D --routing S --plan P --ranks 2

Running torchtitan's EP on the CPU takes two settings and no change to torchtitan:
``torchtitan.tools.utils.device_type`` falls back to "cuda" on a machine without an accelerator,
so ``ParallelDims.build_mesh`` is pointed at "cpu" (gloo) instead; and ``spmd_backend`` is
``partial_dtensor``, since the default ``spmd_types`` dispatcher reads the SPMD mesh that
torchtitan's Trainer sets up (``current_spmd_mesh()``), which a bare forward does not have.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from grouter.integrations.torchtitan_measure import measured_and_predicted, random_plan, run_ep


def setup(args, work: Path):
    """Dataset, routing store and plan: given, or small ones made here (synthetic clustered routing)."""
    from ep_bytes import small_dataset

    from grouter.formats.dataset import PackedDataset
    from grouter.formats.store import RoutingStore
    from grouter.place import Options as PlaceOptions, plan_placement
    from grouter.testing import synthetic_store

    data = PackedDataset.open(args.data) if args.data else small_dataset(work / "data", args.seq_len)
    store_dir = Path(args.routing) if args.routing else work / "store"
    if not args.routing:
        synthetic_store(data, store_dir, args.experts, args.top_k, args.clusters, seed=0, noise=0.1, decay=0.7)
    store = RoutingStore.open(store_dir, data=data)
    plan_dir = Path(args.plan) if args.plan else work / "plan"
    if not args.plan:
        made = plan_placement(store, PlaceOptions(ranks=args.ranks, global_batch=args.batch * args.ranks, clusters=32, seed=0))
        plan_dir.mkdir()
        made.save(plan_dir)
        (plan_dir / "report.json").write_text(json.dumps(made.report))
    return data, store, store_dir, plan_dir


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data")
    p.add_argument("--routing")
    p.add_argument("--plan", help="a plan for --ranks ranks (made here otherwise)")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch", type=int, default=8, help="sequences per rank per step")
    p.add_argument("--experts", type=int, default=16, help="synthetic store: experts")
    p.add_argument("--top-k", type=int, default=2, help="synthetic store: k")
    p.add_argument("--clusters", type=int, default=8, help="synthetic store: sequence clusters")
    p.add_argument("--seq-len", type=int, default=64, help="small dataset: tokens per sequence")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)

    from grouter.device import spawn
    from grouter.formats.plan import Plan

    work = Path(tempfile.mkdtemp(prefix="torchtitan_bytes_"))
    t0 = time.perf_counter()
    try:
        data, store, store_dir, plan_dir = setup(args, work)
        plan = Plan.load(plan_dir)
        plan_dirs = {"plan": plan_dir, "random": random_plan(plan, work / "random")}
        rows = {}
        for name, path in plan_dirs.items():
            run = dict(data=str(data.path), routing=str(store_dir), plan=str(path), steps=args.steps,
                       batch=args.batch, dim=args.dim, layers=args.layers, out=str(work / name))
            spawn(args.ranks, run_ep, (run,))
            rows[name] = measured_and_predicted(work / name, store, Plan.load(path), args.ranks)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report_ratio = plan.report.get("cost_models", {}).get("megatron", {}).get("plan_over_random")
    print_table(args, store, rows, report_ratio, time.perf_counter() - t0)
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "args": vars(args)}, indent=2) + "\n")
    return 0


def print_table(args, store, rows: dict, report_ratio: float | None, seconds: float) -> None:
    print(f"\ntorchtitan EP (AllToAllTokenDispatcher), {args.ranks} gloo ranks: {store.n_experts} experts "
          f"top-{store.k}, dim {args.dim}, {args.layers} MoE layers, {args.batch} sequences x {store.seq_len} "
          f"tokens per rank, {args.steps} steps\n")
    print("| placement | rows sent / rank / step / layer | bytes | remote_volume megatron | measured == predicted "
          "| vs random |")
    print("|---|---:|---:|---:|---|---:|")
    for name, r in rows.items():
        print(f"| {name} | {r['rows']:,.1f} | {r['rows'] * r['row_bytes']:,.0f} | {r['predicted_rows']:,.1f} | "
              f"{r['exact']} | {r['rows'] / rows['random']['rows']:.3f} |")
    print(f"\n(dispatch only, hidden states of {rows['plan']['row_bytes']} bytes per row; the plan's report predicts "
          f"plan/random {report_ratio if report_ratio is None else f'{report_ratio:.3f}'} (megatron) over the whole "
          f"split; {seconds:.0f} s)")


if __name__ == "__main__":
    sys.exit(main())
