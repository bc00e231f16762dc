"""Bytes Megatron-core's own ``alltoall`` token dispatcher sends with Grouter routing: plan vs random placement.

For each number of ranks R (``--ranks``, default 2 4), one ``grouter.device.spawn`` of R processes
(gloo on the CPU) sets up Megatron's parallel state with ``expert_model_parallel_size=R`` (data-parallel
ranks = expert-parallel ranks, no TP/PP/CP), and per placement builds a Megatron ``GPTModel`` whose MoE
layers route with :class:`grouter.integrations.megatron.GrouterRouter` and exchange tokens with
``MoEAlltoAllTokenDispatcher``. ``plan``: the plan's expert permutation (``RoutingFeed.from_store(store,
plan)``) and its sample placement; ``random``: the same global batches dealt at random
(``grouter.ep.rank_batches``), expert e on rank ``e // (E/R)``. Each of ``--steps`` steps runs one
forward and backward of every rank's share of a global batch.

How the bytes are counted: while the model runs, ``torch.distributed.all_to_all_single`` (which
Megatron's ``tensor_parallel.all_to_all`` calls) is wrapped; each call adds the rows it sends to *other*
ranks (its ``input_split_sizes`` without the caller's own entry) times the bytes of one row (elements
per row x element size). Each dispatcher's ``token_dispatch`` and ``token_combine`` are wrapped to
label the calls they make: ``dispatch`` (hidden states out), ``dispatch_probs`` (the 1-D gate weights
that travel with them), ``combine`` (expert outputs back); calls outside both are autograd's
``backward``. Predicted: ``grouter.place.remote_volume(ids, rank_of_expert, rank)["megatron"]`` (the
plan report's ``megatron`` cost model: one copy per (token, expert) pair whose expert is on another
rank) for the rank's sequences, summed over the MoE layers (with per-layer heads each layer counts its own
head's routing, the head Megatron's router of that layer serves), times hidden size x element size. The
script stops with an error unless measured ``dispatch`` bytes equal the prediction for every rank and step.

    OMP_NUM_THREADS=1 python benchmarks/megatron_bytes.py --demo DEMO_DIR --markdown table.md
    OMP_NUM_THREADS=1 python benchmarks/megatron_bytes.py --data D --routing S --plan 4=P4 --ranks 4

``--demo DIR``: a ``grouter demo`` output directory (``DIR/data`` and ``DIR/routing-layers-all``, its
default Grouter's store, or ``DIR/routing`` from ``grouter demo --shared-head``); plans are made
here unless given (``--plan R=DIR``). Without inputs: a synthetic clustered store on a small
standard-library dataset (benchmarks/ep_bytes.py). On a CPU machine, megatron-core's hard-coded CUDA
calls are replaced by ``grouter.integrations.megatron.cpu.cpu_stubs``; with CUDA, NCCL
and one GPU per rank are used and nothing is stubbed.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from grouter.integrations.megatron.measure import measure_rank, spawn_nccl



def inputs(args, work: Path) -> tuple[Path, Path]:
    """The dataset and routing store to measure: --demo, --data/--routing, or a synthetic clustered store."""
    if args.demo:  # the demo's routing: a head per layer by default, one shared head with --shared-head
        from grouter.experiments.demo import demo_kind

        return Path(args.demo) / "data", Path(args.demo) / f"routing{demo_kind(args.demo)}"
    if args.routing:
        return Path(args.data), Path(args.routing)
    from grouter.testing import synthetic_store

    sys.path.insert(0, str(Path(__file__).parent))
    from ep_bytes import small_dataset

    data = Path(args.data) if args.data else small_dataset(work / "data", args.seq_len).path
    synthetic_store(data, work / "store", args.experts, args.top_k, args.clusters, seed=0, noise=0.1, decay=0.7)
    return data, work / "store"


def plan_for(R: int, args, store):
    """The plan given for R ranks (``--plan R=DIR``), else one made here."""
    from grouter.formats.plan import Plan
    from grouter.place import Options as PlaceOptions, plan_placement

    given = dict(s.split("=", 1) for s in args.plan)
    if str(R) in given:
        return Plan.load(given[str(R)])
    return plan_placement(store, PlaceOptions(ranks=R, global_batch=args.per_rank_batch * R, seed=0))


def measure(R: int, args, data_dir: Path, store_dir: Path, plan, work: Path) -> list[dict]:
    """All ranks' records for R ranks; refuses a run whose measured dispatch bytes are not the prediction."""
    from grouter.device import spawn

    cuda = torch.cuda.is_available() and torch.cuda.device_count() >= R
    out = work / f"r{R}"
    out.mkdir(exist_ok=True)
    job = dict(data=str(data_dir), routing=str(store_dir), plan=plan, out=str(out), steps=args.steps,
               layers=args.layers, hidden=args.hidden, cuda=cuda)
    (spawn_nccl if cuda else spawn)(R, measure_rank, (job,))
    records = [r for rank in range(R) for r in json.loads((out / f"rank{rank}.json").read_text())]
    wrong = [r for r in records if r["measured"]["dispatch"] != r["predicted_dispatch"]]
    if wrong:
        raise SystemExit(f"measured dispatch bytes differ from the megatron cost model: {wrong[:3]}")
    return records


def table(rows: list[dict]) -> str:
    """The Markdown table: forward-dispatch bytes (hidden states to other ranks), summed over ranks and steps."""
    lines = ["| ranks | placement | sequences | remote copies / layer | measured dispatch bytes | predicted (megatron "
             "model) | plan / random | plan report, whole split | all all-to-all bytes |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        base = next(x for x in rows if x["ranks"] == r["ranks"] and x["placement"] == "random")
        whole = f"{r['report']:.3f}" if r["placement"] == "plan" and r["report"] is not None else ""
        lines.append(f"| {r['ranks']} | {r['placement']} | {r['sequences']} | {r['copies']:,} | {r['measured']:,} | "
                     f"{r['predicted']:,} | {r['measured'] / base['measured']:.3f} | {whole} | {r['all']:,} |")
    return "\n".join(lines)


def summarise(R: int, records: list[dict], plan) -> list[dict]:
    """Per placement: totals over ranks and steps, and what the plan's report predicts for the whole split."""
    rows = []
    report = plan.report.get("cost_models", {}).get("megatron", {}).get("plan_over_random")
    for placement in ("plan", "random"):
        mine = [r for r in records if r["placement"] == placement]
        measured = sum(r["measured"]["dispatch"] for r in mine)
        rows.append({"ranks": R, "placement": placement, "sequences": sum(r["sequences"] for r in mine),
                     "copies": sum(r["measured"]["dispatch"] // r["row_bytes"] for r in mine), "measured": measured,
                     "report": report,
                     "predicted": sum(r["predicted_dispatch"] for r in mine),
                     "all": sum(sum(r["measured"].values()) for r in mine)})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--demo", help="a `grouter demo` directory (its data/ and routing/)")
    p.add_argument("--data")
    p.add_argument("--routing")
    p.add_argument("--plan", action="append", default=[], metavar="R=DIR", help="plan for R ranks (repeatable)")
    p.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--per-rank-batch", type=int, default=8, help="sequences per rank per step (plans made here)")
    p.add_argument("--layers", type=int, default=2, help="MoE layers of the GPTModel")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--experts", type=int, default=16, help="synthetic store: experts")
    p.add_argument("--top-k", type=int, default=2, help="synthetic store: k")
    p.add_argument("--clusters", type=int, default=8, help="synthetic store: sequence clusters")
    p.add_argument("--seq-len", type=int, default=64, help="synthetic dataset: tokens per sequence")
    p.add_argument("--json", help="write every record here")
    p.add_argument("--markdown", help="write the table here")
    args = p.parse_args(argv)

    from grouter.formats.dataset import PackedDataset
    from grouter.formats.store import RoutingStore

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="megatron_bytes_") as tmp:
        work = Path(tmp)
        data_dir, store_dir = inputs(args, work)
        store = RoutingStore.open(store_dir, data=PackedDataset.open(data_dir))
        records, rows = [], []
        for R in args.ranks:
            plan = plan_for(R, args, store)
            found = measure(R, args, data_dir, store_dir, plan, work)
            records += found
            rows += summarise(R, found, plan)
    md = table(rows)
    print(f"{store.n_experts} experts top-{store.k}, {args.layers} MoE layers, hidden {args.hidden} (float32), "
          f"{args.steps} steps; every rank's dispatch bytes == prediction; {time.perf_counter() - t0:.0f} s\n\n{md}")
    if args.markdown:
        Path(args.markdown).write_text(md + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "records": records, "args": vars(args)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
