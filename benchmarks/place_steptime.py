"""Predicted EP step time of grouter's placement plans on GPU clusters: the figures of docs/steptime.md.

Four parts, one per run (each a few minutes at most on 2 cores, `spread` on the demo's routings longer):

``--part calibrate``: DeepEP's published normal-kernel bandwidths (H800 with a CX7 400 Gb/s NIC per
GPU; github.com/deepseek-ai/DeepEP docs/legacy.md) against the step-time model of
``grouter.hardware`` on DeepEP's own benchmark routing (its tests/legacy/test_internode.py: 4,096
tokens per rank, hidden 7,168, 256 experts, top-8 within the top min(nodes, 4) nodes, FP8 dispatch):
the physical per-GPU link bandwidths that reproduce the published figures, and what the built-in
profiles predict for them.

``--part plans``: plans for a real routing store (``--store``, e.g. the demo's), or for a
demo-like synthetic routing (9,028 sequences x 128 tokens, 16 experts top-4, strongly clustered)
or a larger synthetic routing (128 experts top-8), batch and epoch scope, one per
layout of the built-in profiles (8 GPUs per node: 1, 2, 4 nodes; a layout needs ranks dividing
the experts), each with ``global_batch`` = ``--tokens-per-rank`` tokens per rank per step. Reported:
DeepEP volume vs random, vs the capacity-free and the balanced-LP bound, compute load (overall and
per global batch), copies received per rank, and per built-in profile the predicted step time,
all-to-all time and speedup, plan vs random (grouter.hardware.predict).

``--part spread``: what the step-time objective buys and how much it varies: on the demo's routings
made with several seeds (``--demos``, benchmarks/demo_routings.py) or a synthetic routing drawn with
``--seeds``, per built-in profile whose ranks divide the experts (batch scope, DeepEP), the predicted
speedup over random placement of the bytes objective's plan and of the step-time objective's, the
learned routers' routings (aux, StableMoE) placed the engines' default way against both, and the
what-if of one redundant expert per rank; on the demo's routing also ``grouter place --ranks R``'s
plan / random ratios (2 and 4 ranks, greedy, node level). Every figure: mean [min, max] over the runs.

``--part gloo``: ``grouter ep`` on 4 gloo processes of this machine, plan vs random, both
exchanges: the measured bytes per rank, phase and step equal the model's
(grouter.hardware.ep_phase_bytes) exactly; the measured all-to-all seconds are printed as a sanity
check of the ranking only (4 processes on 2 shared cores).

    OMP_NUM_THREADS=1 python benchmarks/place_steptime.py --part calibrate
    OMP_NUM_THREADS=1 python benchmarks/place_steptime.py --part plans --store demo/routing --json demo.json
    OMP_NUM_THREADS=1 python benchmarks/place_steptime.py --part plans --routing demo-like --json demo-like.json
    OMP_NUM_THREADS=1 python benchmarks/place_steptime.py --part plans --routing large --json large.json
    OMP_NUM_THREADS=1 python benchmarks/place_steptime.py --part spread --demos /tmp/demos --json spread.json
    OMP_NUM_THREADS=1 python benchmarks/place_steptime.py --part spread --routing demo-like --seeds 0 1 2
    python benchmarks/place_steptime.py --part spread --merge seed0.json seed1.json seed2.json
    OMP_NUM_THREADS=1 python benchmarks/place_steptime.py --part gloo
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

# DeepEP V1 normal kernels, H800 + CX7 (docs/legacy.md): EP size -> (dispatch, combine) GB/s, "bottleneck" link.
DEEPEP_PUBLISHED = {8: (153, 158, "NVLink"), 16: (43, 43, "RDMA"), 32: (58, 57, "RDMA"), 64: (51, 50, "RDMA")}
DEEPEP_TOKENS, DEEPEP_HIDDEN, DEEPEP_EXPERTS, DEEPEP_TOPK, FP8_BYTES = 4096, 7168, 256, 8, 1 + 4 / 128
# Synthetic routings: (sequences, tokens, experts, k, clusters, noise, decay).
ROUTINGS = {"demo-like": (9028, 128, 16, 4, 8, 0.05, 0.9), "large": (65536, 64, 128, 8, 32, 0.2, 0.7)}


# -- calibration against DeepEP's published bandwidths --------------------------------------------------
def deepep_routing(ranks: int, seed: int = 0):
    """StepTraffic of DeepEP's benchmark routing: every rank's 4,096 tokens, |N(0,1)| + 1 scores, top-8
    experts within the top min(nodes, 4) nodes (by their best score)."""
    from grouter.hardware import StepTraffic

    rng = np.random.default_rng(seed)
    G = 8
    nodes = max(1, ranks // G)
    per_rank, per_node = DEEPEP_EXPERTS // ranks, DEEPEP_EXPERTS // nodes
    A = np.zeros((ranks, ranks), dtype=np.int64)
    Nn = np.zeros((ranks, nodes), dtype=np.int64)
    for r in range(ranks):
        scores = np.abs(rng.standard_normal((DEEPEP_TOKENS, DEEPEP_EXPERTS))) + 1
        groups = scores.reshape(DEEPEP_TOKENS, nodes, per_node).max(-1)
        keep = np.argsort(-groups, axis=1)[:, :min(nodes, 4)]
        masked = np.full_like(scores, -np.inf).reshape(DEEPEP_TOKENS, nodes, per_node)
        rows = np.arange(DEEPEP_TOKENS)[:, None]
        masked[rows, keep] = scores.reshape(DEEPEP_TOKENS, nodes, per_node)[rows, keep]
        top = np.argsort(-masked.reshape(DEEPEP_TOKENS, -1), axis=1)[:, :DEEPEP_TOPK]
        A[r] = _present(top // per_rank, ranks).sum(0)
        Nn[r] = _present(top // per_node, nodes).sum(0)
    return StepTraffic(tokens=A[None], slots=A[None], node_tokens=Nn[None] if nodes > 1 else None,
                       seq_tokens=np.full((1, ranks), DEEPEP_TOKENS))


def _present(holder: np.ndarray, n: int) -> np.ndarray:
    out = np.zeros((len(holder), n), dtype=np.int64)
    out[np.arange(len(holder))[:, None], holder] = 1
    return out


def calibrate() -> dict:
    """Per EP size: DeepEP's logical copies (its test's definition), the model's physical copies per link,
    the physical bandwidth the published figure implies, and the built-in H800 profile's prediction."""
    from grouter.hardware import H800_NVLINK, PROFILES, link_copies

    rows = []
    for ep, (dispatch, combine, link) in DEEPEP_PUBLISHED.items():
        st = deepep_routing(ep)
        nvl, rdma = (x[0] for x in link_copies(st, min(8, ep), "deepep"))
        if ep == 8:  # DeepEP counts the rows rank 0 receives, its own included
            logical = int(st.tokens[0, :, 0].sum())
        else:  # DeepEP counts rank 0's (token, node) pairs, its own node included
            logical = int(st.node_tokens[0, 0].sum())
        published_s = logical * DEEPEP_HIDDEN * FP8_BYTES / (dispatch * 1e9)  # the kernel time DeepEP measured
        profile = PROFILES[f"h800x{ep}"] if f"h800x{ep}" in PROFILES else PROFILES["h800x32"]
        model_s = max(nvl.max() / profile.nvlink_bandwidth, rdma.max() / profile.rdma_bandwidth) * \
            DEEPEP_HIDDEN * FP8_BYTES
        rows.append({"ep": ep, "published_dispatch_GBps": dispatch, "published_combine_GBps": combine,
                     "bottleneck": link, "logical_copies_rank0": logical, "nvlink_copies_max": int(nvl.max()),
                     "rdma_copies_max": int(rdma.max()),
                     "implied_nvlink_GBps": nvl.max() * DEEPEP_HIDDEN * FP8_BYTES / published_s / 1e9,
                     "implied_rdma_GBps": rdma.max() * DEEPEP_HIDDEN * FP8_BYTES / published_s / 1e9,
                     "model_logical_GBps": logical * DEEPEP_HIDDEN * FP8_BYTES / model_s / 1e9,
                     "model_over_published": published_s / model_s})
    print("| EP | published dispatch (GB/s, logical) | bottleneck | DeepEP's logical copies (rank 0) | model: max "
          "NVLink / RDMA copies per rank | implied NVLink / RDMA (GB/s, physical) | model with the h800 profile "
          "(GB/s, logical) |")
    print("|---:|---:|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['ep']} | {r['published_dispatch_GBps']} | {r['bottleneck']} | {r['logical_copies_rank0']:,} | "
              f"{r['nvlink_copies_max']:,} / {r['rdma_copies_max']:,} | {r['implied_nvlink_GBps']:.0f} / "
              f"{r['implied_rdma_GBps']:.0f} | {r['model_logical_GBps']:.0f} |")
    print(f"\n(profile: NVLink {H800_NVLINK / 1e9:.0f} GB/s, RDMA {PROFILES['h800x16'].rdma_bandwidth / 1e9:.0f} GB/s "
          "per GPU and direction, latency left out here)")
    return {"rows": rows}


# -- plans and predicted step times ----------------------------------------------------------------------
class _Store:
    """The minimal store plan_placement reads: ids of the train split, experts and k."""

    def __init__(self, ids: np.ndarray, n_experts: int, k: int, path: str):
        self._ids, self.n_experts, self.k, self.path = ids, n_experts, k, path

    def ids(self, split: str) -> np.ndarray:
        return self._ids


def open_routing(name: str, store_dir: str | None, sequences: int | None, seed: int = 0):
    """A real routing store (``store_dir``), else the synthetic routing ``name`` drawn with ``seed``; and a label."""
    from grouter.formats.store import RoutingStore
    from grouter.testing import synthetic_routing

    if store_dir:
        return RoutingStore.open(store_dir), f"routing store {store_dir}"
    n, L, E, k, clusters, noise, decay = ROUTINGS[name]
    n = sequences or n
    ids, _ = synthetic_routing(n, L, E, k, clusters, seed=seed, noise=noise, decay=decay)
    label = (f"synthetic ({n:,} sequences x {L} tokens, {E} experts top-{k}, {clusters} clusters, noise {noise}, "
             f"decay {decay}, seed {seed})")
    return _Store(ids, E, k, label), label


def plan_rows(store, layouts, tokens_per_rank: int, scopes) -> list[dict]:
    """One row per (layout, scope): the plan's figures and its predicted step times on each fitting profile."""
    from grouter.hardware import PROFILES, predict
    from grouter.place import Options as PlaceOptions, plan_placement

    seq_len = store.ids("train").shape[1]
    rows = []
    for R in layouts:
        G = 8 if R > 8 else None
        for scope in scopes:
            t, cpu = time.perf_counter(), time.process_time()
            plan = plan_placement(store, PlaceOptions(ranks=R, ranks_per_node=G, global_batch=max(1, tokens_per_rank // seq_len) * R, scope=scope, lp_bound=True))
            rep = plan.report
            row = {"ranks": R, "nodes": max(1, R // 8), "scope": scope, "global_batch": rep["global_batch"],
                   "plan_seconds": round(time.perf_counter() - t, 1), "plan_cpu_seconds": round(time.process_time() - cpu, 1),
                   "deepep_over_random": rep["cost_models"]["deepep"]["plan_over_random"],
                   "node_over_random": rep["cost_models"].get("node", {}).get("plan_over_random"),
                   "bound": rep["balanced_bound"], "refinement": rep["refinement"],
                   "load": {w: {k: rep["load"][w][k] for k in (
                       "expert_load_max_over_mean", "received_tokens_max_over_mean")} for w in ("plan", "random")},
                   "profiles": {}}
            for name, profile in PROFILES.items():
                if (profile.nodes or 1) * profile.ranks_per_node == R:
                    p = predict(plan.step_traffic["plan"], plan.step_traffic["random"], profile)
                    row["profiles"][name] = p["dispatchers"]
            rows.append(row)
            print(f"  {R} ranks, scope {scope}: {row['plan_seconds']} s ({row['plan_cpu_seconds']} s CPU)", file=sys.stderr)
    return rows


def print_plans(rows: list[dict], label: str) -> None:
    f = lambda x, d=3: "n/a" if x is None else f"{x:.{d}f}"  # noqa: E731
    print(f"\n{label}\n")
    print("| ranks | scope | DeepEP plan / random | plan / capacity-free bound | plan / balanced-LP bound | "
          "rank load max/mean (overall) | compute load per batch: plan mean, worst (random) | copies received per "
          "batch, worst: plan (random) |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        b, lp, lr = r["bound"], r["load"]["plan"], r["load"]["random"]
        c, cr = lp["expert_load_max_over_mean"], lr["expert_load_max_over_mean"]
        print(f"| {r['ranks']} | {r['scope']} | {f(r['deepep_over_random'])} | "
              f"{f(b['plan_over_capacity_free_bound'], 4)} | {f(b['plan_over_balanced_bound'], 4)} | "
              f"{f(c['overall'])} | {f(c['per_batch_mean'])}, {f(c['per_batch_worst'])} ({f(cr['per_batch_mean'])}, "
              f"{f(cr['per_batch_worst'])}) | {f(lp['received_tokens_max_over_mean']['per_batch_worst'])} "
              f"({f(lr['received_tokens_max_over_mean']['per_batch_worst'])}) |")
    print("\n| profile | scope | dispatcher | step plan / random (ms) | speedup | overlapped speedup | "
          "all-to-all plan / random (ms) | all-to-all speedup |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        for name, ds in r["profiles"].items():
            for d, v in ds.items():
                a, b = v["plan_ms"], v["random_ms"]
                print(f"| {name} | {r['scope']} | {d} | {a['step']:.2f} / {b['step']:.2f} | {v['speedup']:.3f} | "
                      f"{v['speedup_overlapped']:.3f} | {a['all_to_all']:.2f} / {b['all_to_all']:.2f} | "
                      f"{v['all_to_all_speedup']:.3f} |")


# -- the objectives, and their spread over routings ---------------------------------------------------------
LEARNED = ("aux", "stablemoe")  # the learned routers whose routing benchmarks/demo_routings.py records
PAPER = {1: "+33.5 %", 2: "+19.3 %", 4: "+15.5 %"}  # the paper's DeepEP throughput gains by nodes


def objective_row(store, profile: str, tokens_per_rank: int, compare: dict, redundant: bool) -> dict:
    """One step-time plan (DeepEP, batch scope) of ``store`` on a built-in profile: each candidate's predicted
    speedup over random placement (``bytes`` is the bytes objective's plan), the chosen one's, and with
    ``compare`` each learned router's routing placed the engines' default way: its speedup over random
    placement of the Grouter's routing, and the step-time and bytes plans' speedups over it."""
    from grouter.hardware import PROFILES
    from grouter.place import Options as PlaceOptions, plan_placement

    p = PROFILES[profile]
    R = p.nodes * p.ranks_per_node
    seq_len = store.ids("train").shape[1]
    t, cpu = time.perf_counter(), time.process_time()
    plan = plan_placement(store, PlaceOptions(ranks=R, global_batch=max(1, tokens_per_rank // seq_len) * R,
                                              hardware=profile, redundant_experts=R if redundant else 0),
                          compare=compare or None)
    rep = plan.report
    ms = {c["name"]: c["step_ms"] for c in rep["objective"]["candidates"]}
    d = rep["step_time"]["dispatchers"]["deepep"]
    row = {"profile": profile, "ranks": R, "nodes": p.nodes, "chosen": rep["objective"]["chosen"],
           "speedup": {name: ms["random"] / x for name, x in ms.items()},
           "copies_over_random": {c["name"]: c["deepep_copies"] / rep["objective"]["candidates"][-1]["deepep_copies"]
                                  for c in rep["objective"]["candidates"]},
           "plan_ms": d["plan_ms"]["step"], "random_ms": d["random_ms"]["step"],
           "all_to_all_share_random": d["random_ms"]["all_to_all"] / d["random_ms"]["step"],
           "seconds": round(time.perf_counter() - t, 1), "cpu_seconds": round(time.process_time() - cpu, 1)}
    for who, v in d["versus"].items():
        row[who] = {"over_random": ms["random"] / v["ms"]["step"], "plan_over_it": v["speedup"],
                    "bytes_over_it": v["ms"]["step"] / ms["bytes"]}
    if redundant:
        row["redundant"] = {who: rep["redundant_experts"][who]["speedup_over_random"] for who in ("plan", "random")}
    print(f"  {profile}: {row['seconds']} s ({row['cpu_seconds']} s CPU), chosen {row['chosen']}", file=sys.stderr)
    return row


def bytes_row(store, ranks: int, algorithm: str, ranks_per_node: int | None, per_rank: int) -> dict:
    """``grouter place --ranks R`` (the bytes objective) with ``per_rank`` sequences per rank per global
    batch: plan / random over the whole split under each cost model (docs/RESULTS.md's placement table:
    16 per rank, the default; benchmarks/megatron_bytes.py's plans: 8)."""
    from grouter.place import Options as PlaceOptions, plan_placement

    plan = plan_placement(store, PlaceOptions(ranks=ranks, algorithm=algorithm, ranks_per_node=ranks_per_node,
                                              global_batch=per_rank * ranks))
    return {"ranks": ranks, "algorithm": algorithm, "ranks_per_node": ranks_per_node, "global_batch": per_rank * ranks,
            **{m: v["plan_over_random"] for m, v in plan.report["cost_models"].items()}}


BYTES_LAYOUTS = ((2, "balanced", None, 16), (4, "balanced", None, 16), (4, "greedy", None, 16), (4, "balanced", 2, 16),
                 (2, "balanced", None, 8), (4, "balanced", None, 8))


def demo_runs(demos: Path, tokens_per_rank: int, redundant: bool) -> list[dict]:
    """Every ``seed*`` directory of ``demos`` (benchmarks/demo_routings.py): the objective rows of its
    Grouter routing (per-layer heads, ``routing-layers-all``, the demo's; and one head, ``routing``, where
    made) against its learned routers' routings, and the bytes objective's plan / random ratios."""
    from grouter.formats.store import RoutingStore
    from grouter.hardware import PROFILES

    runs = []
    for seed_dir in sorted(demos.glob("seed*")):
        compare = {who: RoutingStore.open(seed_dir / f"routing-{who}") for who in LEARNED
                   if (seed_dir / f"routing-{who}" / "manifest.json").is_file()}
        run = {"seed_dir": str(seed_dir), "learned": sorted(compare), "routings": {}}
        for name in ("routing-layers-all", "routing"):
            if not (seed_dir / name / "manifest.json").is_file():
                continue
            print(f"{seed_dir / name}", file=sys.stderr)
            store = RoutingStore.open(seed_dir / name)
            run["routings"][name] = {"profiles": [objective_row(store, p, tokens_per_rank, compare, redundant)
                                                  for p, prof in PROFILES.items()
                                                  if store.n_experts % (prof.nodes * prof.ranks_per_node) == 0]}
            run["routings"][name]["bytes"] = [bytes_row(store, *x) for x in BYTES_LAYOUTS]
        runs.append(run)
    if not runs:
        raise SystemExit(f"error: no seed*/routing-layers-all under {demos}; make them with benchmarks/demo_routings.py")
    return runs


def synthetic_runs(name: str, seeds: list[int], sequences: int | None, tokens_per_rank: int, redundant: bool) -> list[dict]:
    """The synthetic routing ``name`` drawn with each seed: its objective rows (no learned router)."""
    from grouter.hardware import PROFILES

    runs = []
    for seed in seeds:
        store, label = open_routing(name, None, sequences, seed)
        print(label, file=sys.stderr)
        rows = [objective_row(store, p, tokens_per_rank, {}, redundant) for p, prof in PROFILES.items()
                if store.n_experts % (prof.nodes * prof.ranks_per_node) == 0]
        runs.append({"seed": seed, "label": label, "routings": {"routing": {"profiles": rows}}})
    return runs


def spread(xs: list, pct: bool = True) -> str:
    """Mean [min–max] of ``xs`` (speedups as % gains with ``pct``); one value as itself."""
    xs = [x for x in xs if x is not None]
    if not xs:
        return "–"
    f = (lambda x: f"{(x - 1) * 100:+.1f} %") if pct else (lambda x: f"{x:.3f}")  # noqa: E731
    mean = f(float(np.mean(xs)))
    return mean if len(xs) == 1 else f"{mean} [{f(min(xs))}, {f(max(xs))}]"


def runs_note(n: int, of: int) -> str:
    return "" if n == of else f" ({n} of {of} runs)"


def print_spread(runs: list[dict], label: str) -> None:
    """The tables of docs/steptime.md: per profile, mean [min, max] over the runs."""
    print(f"\n{label}: mean [min, max] over {len(runs)} run(s); DeepEP, not overlapped, batch scope\n")
    for routing in ("routing-layers-all", "routing"):
        per = [r["routings"][routing] for r in runs if routing in r["routings"]]
        if not per:
            continue
        learned = [w for w in LEARNED if any(w in p["profiles"][0] for p in per)]
        print(f"`{routing}`" + (" (per-layer heads)" if routing != "routing" else " (one shared head)") + "\n")
        head = ["profile", "DeepEP copies, bytes plan / random", "bytes objective vs random",
                "step-time objective vs random", "chosen"]
        head += [f"{w} (default placement) vs random" for w in learned]
        head += [f"step-time plan vs {w}" for w in learned] + [f"bytes plan vs {w}" for w in learned]
        redundant = "redundant" in per[0]["profiles"][0]
        head += ["+ R redundant experts: plan, random vs random"] if redundant else []
        head += ["paper (DeepEP, vs a learned router)"]
        print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
        for i, first in enumerate(per[0]["profiles"]):
            rows = [p["profiles"][i] for p in per]
            chosen = sorted({r["chosen"] for r in rows})
            cells = [f"{first['profile']} ({first['ranks']} ranks)",
                     spread([r["copies_over_random"]["bytes"] for r in rows], False),
                     spread([r["speedup"]["bytes"] for r in rows]),
                     spread([r["speedup"][r["chosen"]] for r in rows]),
                     ", ".join(f"{c} x{sum(r['chosen'] == c for r in rows)}" for c in chosen)]
            for key in ("over_random", "plan_over_it", "bytes_over_it"):  # over the runs that recorded w
                cells += [spread([r[w][key] for r in rows if w in r]) + runs_note(sum(w in r for r in rows), len(rows))
                          for w in learned]
            if redundant:
                cells.append(f"{spread([r['redundant']['plan'] for r in rows])}; "
                             f"{spread([r['redundant']['random'] for r in rows])}")
            cells.append(PAPER.get(first["nodes"], ""))
            print("| " + " | ".join(cells) + " |")
        print()
        print_bytes(routing, [r["routings"][routing]["bytes"] for r in runs if "bytes" in r["routings"].get(routing, {})])


def print_bytes(routing: str, byte_runs: list[list[dict]]) -> None:
    if byte_runs:
        print(f"`grouter place --ranks R` (bytes objective) on `{routing}`, plan / random over the whole split\n")
        print("| ranks | plan | global batch | DeepEP | Megatron | node |\n|---:|---|---:|---:|---:|---:|")
        for i, first in enumerate(byte_runs[0]):
            rows = [b[i] for b in byte_runs]
            kind = first["algorithm"] + (f", node level (G = {first['ranks_per_node']})" if first["ranks_per_node"] else "")
            print(f"| {first['ranks']} | {kind} | {first['global_batch']} | {spread([r['deepep'] for r in rows], False)} | "
                  f"{spread([r['megatron'] for r in rows], False)} | {spread([r.get('node') for r in rows], False)} |")


# -- gloo: real bytes, and the ranking of the measured all-to-all time ------------------------------------
def gloo(work: Path, ranks: int, steps: int) -> dict:
    """grouter ep on ``ranks`` gloo processes: bytes == the model's; measured all-to-all seconds, plan vs random."""
    sys.path.insert(0, str(Path(__file__).parent))
    from ep_bytes import small_dataset

    from grouter.device import spawn
    from grouter.ep import Options as EPOptions
    from grouter.ep import rank_batches, train_many
    from grouter.formats.store import RoutingStore
    from grouter.hardware import ep_phase_bytes
    from grouter.loop import TrainConfig
    from grouter.model import MoEConfig
    from grouter.place import Options as PlaceOptions, plan_placement, step_traffic, traffic
    from grouter.testing import synthetic_store

    E, K, d, layers = 16, 2, 64, 2
    data = small_dataset(work / "data", 64)
    synthetic_store(data, work / "store", E, K, 8, seed=0, noise=0.1, decay=0.7)
    store = RoutingStore.open(work / "store", data=data)
    plan = plan_placement(store, PlaceOptions(ranks=ranks, global_batch=8 * ranks, clusters=32, seed=0))
    plan.save(work / "plan.json")
    cfg = MoEConfig(vocab_size=data.vocab_size, d_model=d, n_layers=layers, n_heads=4, d_expert=d, n_experts=E,
                    top_k=K, max_seq_len=data.seq_len, router="external", seed=0)
    schedule = TrainConfig(steps=steps, lr=3e-3, warmup_steps=2, seed=0, device="cpu")
    runs = [dict(data=data.path, routing=work / "store", out=work / f"{p}-{x}", plan=work / "plan.json", placement=p,
                 exchange=x, model_cfg=cfg, overwrite=True, options=EPOptions(placement=p, exchange=x, schedule=schedule))
            for p in ("plan", "random") for x in ("dedup", "slot")]
    spawn(ranks, train_many, (runs,))
    ids, out, copies = np.asarray(store.ids("train")), {}, {}
    for run in runs:
        rank_of_expert = plan.rank_of_expert if run["placement"] == "plan" else np.arange(E) // (E // ranks)
        batches = rank_batches(plan, run["placement"], ranks, seed=0)
        st = step_traffic(traffic(ids, rank_of_expert, ranks), [[b[r] for b in batches] for r in range(ranks)],
                          data.seq_len)
        predicted = ep_phase_bytes(st, run["exchange"], d * 4, layers, K, E)
        copies[f"{run['placement']}-{run['exchange']}"] = (st.tokens if run["exchange"] == "dedup" else st.slots)
        recs = [json.loads(x) for x in (run["out"] / "metrics.jsonl").read_text().splitlines()]
        exact = all(rec["bytes_per_rank"][ph] == predicted[ph][(rec["step"] - 1) % len(batches)].tolist()
                    for rec in recs for ph in predicted)
        out[f"{run['placement']}-{run['exchange']}"] = {
            "bytes_equal_model": exact, "a2a_seconds_median": float(np.median([max(r["a2a_seconds_per_rank"])
                                                                              for r in recs[1:]])),
            "step_seconds_median": float(np.median([r["step_seconds"] for r in recs[1:]])),
            "bytes_per_step_max_rank": float(np.mean([max(r["bytes_per_rank"]["total"]) for r in recs]))}
    print("| run | bytes == model | all-to-all bytes / step (max rank) | all-to-all s (median, max rank) | step s |")
    print("|---|---|---:|---:|---:|")
    for k, v in out.items():
        print(f"| {k} | {v['bytes_equal_model']} | {v['bytes_per_step_max_rank']:,.0f} | {v['a2a_seconds_median']:.4f} "
              f"| {v['step_seconds_median']:.3f} |")
    return {"runs": out, "all_to_all_only": time_all_to_all(work, ranks, copies)}


def time_all_to_all(work: Path, ranks: int, copies: dict, hidden: int = 1024, reps: int = 5) -> dict:
    """The all-to-alls alone: every batch's copies (rows of ``hidden`` float32, self-sends left out), plan
    and random interleaved, ``reps`` times, on ``ranks`` gloo processes; the slowest rank's seconds next to
    the model's flat-link prediction, sum over batches of max over ranks of max(sent, received)."""
    from grouter.device import spawn

    matrices = {k: [np.where(np.eye(ranks, dtype=bool), 0, m) for m in v] for k, v in copies.items()}
    spawn(ranks, _time_worker, (matrices, hidden, reps, str(work / "a2a.json")))
    measured = json.loads((work / "a2a.json").read_text())
    out = {}
    for k, ms in matrices.items():
        model = sum(int(max(m.sum(1).max(), m.sum(0).max())) for m in ms)
        out[k] = {"seconds": measured[k], "model_copies": model}
    print("\n| all-to-all alone | measured s (slowest rank) | model: slowest rank's copies | plan / random measured "
          "| plan / random model |\n|---|---:|---:|---:|---:|")
    for k, v in out.items():
        base = out[k.replace("plan", "random")]
        print(f"| {k} | {v['seconds']:.4f} | {v['model_copies']:,} | {v['seconds'] / base['seconds']:.3f} | "
              f"{v['model_copies'] / base['model_copies']:.3f} |")
    return out


def _time_worker(rank: int, world: int, matrices: dict, hidden: int, reps: int, path: str) -> None:
    import torch
    import torch.distributed as dist

    total = dict.fromkeys(matrices, 0.0)
    batches = len(next(iter(matrices.values())))
    for _ in range(reps):
        for b in range(batches):
            for k, ms in matrices.items():
                send, recv = ms[b][rank].tolist(), ms[b][:, rank].tolist()
                x, y = torch.ones(sum(send), hidden), torch.empty(sum(recv), hidden)
                dist.barrier()
                t = time.perf_counter()
                dist.all_to_all_single(y, x, recv, send)
                total[k] += time.perf_counter() - t
    slowest = [None] * world
    dist.all_gather_object(slowest, total)
    if rank == 0:
        Path(path).write_text(json.dumps({k: max(s[k] for s in slowest) for k in total}))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["calibrate", "plans", "spread", "gloo"], required=True)
    ap.add_argument("--demos", type=Path, default=None,
                    help="spread: the seed* directories of benchmarks/demo_routings.py (else --routing, --seeds)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="spread: synthetic routing seeds")
    ap.add_argument("--no-redundant", action="store_true", help="spread: leave out the redundant-experts what-if")
    ap.add_argument("--merge", nargs="+", type=Path, default=None,
                    help="spread: print the tables of earlier --json outputs together (e.g. one per demo seed)")
    ap.add_argument("--routing", choices=sorted(ROUTINGS), default="demo-like", help="a synthetic routing")
    ap.add_argument("--store", default=None, help="plan a real routing store instead (e.g. demo/routing)")
    ap.add_argument("--sequences", type=int, default=None, help="synthetic routing: sequences (default per routing)")
    ap.add_argument("--layouts", type=int, nargs="+", default=None, help="ranks (default: 8 16 [32])")
    ap.add_argument("--scopes", nargs="+", default=["batch", "epoch"])
    ap.add_argument("--tokens-per-rank", type=int, default=4096, help="tokens per rank per step (sets global_batch)")
    ap.add_argument("--ranks", type=int, default=4, help="gloo: processes")
    ap.add_argument("--steps", type=int, default=6, help="gloo: steps per run")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    t, cpu = time.perf_counter(), time.process_time()
    if args.part == "calibrate":
        result = calibrate()
    elif args.part == "plans":
        store, label = open_routing(args.routing, args.store, args.sequences)
        layouts = args.layouts or [R for R in (8, 16, 32) if store.n_experts % R == 0]
        result = {"routing": label, "rows": plan_rows(store, layouts, args.tokens_per_rank, args.scopes)}
        print_plans(result["rows"], label)
    elif args.part == "spread":
        redundant = not args.no_redundant
        if args.merge:
            saved = [json.loads(x.read_text()) for x in args.merge]
            runs, label = [r for x in saved for r in x["runs"]], " + ".join(x["label"] for x in saved)
        elif args.demos:
            runs, label = demo_runs(args.demos, args.tokens_per_rank, redundant), f"the demo's routings ({args.demos})"
        else:
            runs = synthetic_runs(args.routing, args.seeds, args.sequences, args.tokens_per_rank, redundant)
            label = f"synthetic routing {args.routing!r}, seeds {', '.join(map(str, args.seeds))}"
        result = {"label": label, "runs": runs}
        print_spread(runs, label)
    else:
        work = Path(tempfile.mkdtemp(prefix="steptime_gloo_"))
        try:
            result = gloo(work, args.ranks, args.steps)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    wall, cpu = time.perf_counter() - t, time.process_time() - cpu
    print(f"\n({wall:.0f} s wall, {cpu:.0f} s CPU of this process; a shared 2-core machine)")
    if args.json:
        Path(args.json).write_text(json.dumps({**result, "wall_seconds": wall, "cpu_seconds": cpu}, indent=2,
                                              default=float) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
