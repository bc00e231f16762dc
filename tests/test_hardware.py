"""The step-time model (grouter.hardware): hand-computed toys, profiles, `place --hardware`, real bytes.

The model: docs/steptime.md and the docstring of src/grouter/hardware.py.
"""

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from grouter.cli import main
from grouter.errors import GrouterError
from grouter.formats import store as routing_store
from grouter.formats.plan import Plan
from grouter.hardware import (PROFILES, HardwareProfile, StepTraffic, ep_phase_bytes, link_copies, load_profile,
                              predict, step_times)
from grouter.place import Options as PlaceOptions, plan_placement, step_traffic, traffic
from grouter.routers import Routing
from grouter.testing import synthetic_routing

# Toy: 2 ranks of 1 node, 4 experts (rank 0 holds 0 and 1), 2 sequences of 2 tokens, top-2.
TOY = np.array([[[0, 1], [0, 2]],  # sequence 0: one token all local to rank 0, one on both ranks
                [[2, 3], [1, 3]]])  # sequence 1: the mirror image, local to rank 1
TOY_PROFILE = HardwareProfile(name="toy", ranks_per_node=2, flops=1e12, nvlink_bandwidth=1e3, rdma_bandwidth=5e2,
                              nvlink_latency=1e-6, rdma_latency=2e-6, hidden=4, ffn=8, moe_layers=2,
                              dispatch_bytes=1, combine_bytes=2, dense_flops_per_token=100)


def toy_traffic(seq_rank, ranks_per_node=None) -> StepTraffic:
    """One global batch of the toy's two sequences, sequence s on rank ``seq_rank[s]``."""
    tr = traffic(TOY, np.array([0, 0, 1, 1]), 2, ranks_per_node)
    samples = [[np.flatnonzero(np.asarray(seq_rank) == r)] for r in range(2)]
    return step_traffic(tr, samples, seq_len=2)


def test_toy_by_hand():
    plan, swapped = toy_traffic([0, 1]), toy_traffic([1, 0])
    assert plan.tokens[0].tolist() == [[2, 1], [1, 2]]  # rank r's tokens with an expert on rank d
    assert plan.slots[0].tolist() == [[3, 1], [1, 3]]
    assert swapped.tokens[0].tolist() == [[1, 2], [2, 1]]
    assert plan.compute_slots()[0].tolist() == swapped.compute_slots()[0].tolist() == [4, 4]
    assert plan.received()[0].tolist() == [1, 1] and swapped.received()[0].tolist() == [2, 2]
    p = TOY_PROFILE
    compute = 4 * (2 * 3 * 4 * 8) * 3 / 1e12  # slots x SwiGLU FLOPs per slot x (forward + backward) / FLOP/s
    copy_bytes = 4 * (1 + 3 * 2)  # hidden x (FP8-like dispatch + BF16 combine and both gradients)
    dense = 2 * 100 / 1e12  # the rank's 2 tokens x dense FLOPs per token
    for st, copies, slots in ((plan, 1, 1), (swapped, 2, 3)):
        comm = 4 * 1e-6 + copy_bytes * copies / 1e3  # 4 phases x latency + bytes over NVLink
        t = step_times(st, p, "deepep")
        assert t["step"][0] == pytest.approx(2 * (compute + comm) + dense, rel=1e-12)
        assert t["step_overlapped"][0] == pytest.approx(2 * max(compute, comm) + dense, rel=1e-12)
        assert t["all_to_all"][0] == pytest.approx(2 * comm, rel=1e-12)
        assert t["expert_compute"][0] == pytest.approx(2 * compute, rel=1e-12)
        megatron = step_times(st, p, "megatron")  # one copy per (token, expert) on the other rank
        assert megatron["all_to_all"][0] == pytest.approx(2 * (4e-6 + copy_bytes * slots / 1e3), rel=1e-12)
    out = predict(plan, swapped, p)
    d = out["dispatchers"]["deepep"]
    assert d["speedup"] == pytest.approx(d["random_ms"]["step"] / d["plan_ms"]["step"]) and d["speedup"] > 1.9
    assert out["assumptions"] and out["profile"]["name"] == "toy"
    # Two nodes of one GPU: the same copies go over RDMA, at its bandwidth and latency
    two_nodes = replace(p, ranks_per_node=1)
    nvl, rdma = link_copies(toy_traffic([0, 1], ranks_per_node=1), 1, "deepep")
    assert nvl.tolist() == [[0, 0]] and rdma.tolist() == [[1, 1]]
    t = step_times(toy_traffic([0, 1], ranks_per_node=1), two_nodes, "deepep")
    assert t["all_to_all"][0] == pytest.approx(2 * (4 * 2e-6 + copy_bytes * 1 / 5e2), rel=1e-12)


def test_deepep_forwards_over_nvlink_across_nodes():
    """2 nodes of 2 ranks: a token of rank 0 with experts on ranks 2 and 3 crosses RDMA once, to rank 2
    (rank 0's local index on node 1), which forwards it to rank 3 over NVLink; Megatron sends it twice."""
    A = np.zeros((1, 4, 4), dtype=np.int64)
    A[0, 0, 0], A[0, 0, 2], A[0, 0, 3] = 1, 1, 1  # one token on rank 0: ranks 0, 2 and 3
    node = np.zeros((1, 4, 2), dtype=np.int64)
    node[0, 0] = [1, 1]
    st = StepTraffic(tokens=A, slots=A.copy(), node_tokens=node, seq_tokens=np.ones((1, 4), np.int64))
    nvl, rdma = link_copies(st, 2, "deepep")
    assert nvl.tolist() == [[0, 0, 1, 1]] and rdma.tolist() == [[1, 0, 1, 0]]
    nvl, rdma = link_copies(st, 2, "megatron")
    assert nvl.tolist() == [[0, 0, 0, 0]] and rdma.tolist() == [[2, 0, 1, 1]]


# -- profiles ------------------------------------------------------------------------------------
def test_profiles_validate():
    assert {"h100x8", "h100x16", "h100x32", "h800x8", "h800x16", "h800x32"} <= set(PROFILES)
    assert load_profile("h100x16").layout(16, None) == 8
    with pytest.raises(GrouterError, match=r"'h100x16' has 2 node\(s\) of 8 GPUs: use --ranks 16"):
        load_profile("h100x16").layout(8, None)
    with pytest.raises(GrouterError, match="contradicts"):
        load_profile("h100x8").layout(8, 4)
    good = {k: v for k, v in vars(TOY_PROFILE).items() if k != "name"}
    assert HardwareProfile.from_dict(good, "mine").flops == 1e12
    for bad, message in (({**good, "flops": float("inf")}, "'flops' must be a finite number > 0"),
                         ({**good, "hidden": 2.5}, "'hidden' must be a positive integer"),
                         ({**good, "rdma_latency": -1}, "'rdma_latency' must be a finite number > 0"),
                         ({**good, "nvlink_gbps": 1}, "unknown field 'nvlink_gbps'"),
                         ({k: v for k, v in good.items() if k != "moe_layers"}, "'moe_layers' is missing; add it")):
        with pytest.raises(GrouterError, match=message):
            HardwareProfile.from_dict(bad, "mine")
    with pytest.raises(GrouterError, match="unknown hardware profile 'tpu'"):
        load_profile("tpu")


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
    ids, _ = synthetic_routing(512, 16, 16, 2, clusters=4, seed=0, noise=0.1, decay=0.6)
    routing = Routing(torch.from_numpy(ids), torch.zeros(ids.shape))
    return routing_store.write_store(tmp_path_factory.mktemp("hw") / "store", {"train": routing}, 16)


def test_place_hardware_cli(store_dir, tmp_path, capsys):
    out = tmp_path / "plan"
    code = main(["place", "--routing", str(store_dir), "--ranks", "16", "--hardware", "h100x16", "--global-batch",
                 "64", "--out", str(out), "--json"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["level"] == "node" and summary["ranks_per_node"] == 8
    assert summary["step_time"]["profile"] == "h100x16" and summary["step_time"]["deepep"]["speedup"] > 0
    report = Plan.load(out).report
    assert report["step_time"]["nodes"] == 2 and "Predicted step time: h100x16" in (out / "report.md").read_text()
    (tmp_path / "incomplete.json").write_text(json.dumps({"ranks_per_node": 8, "flops": 5e14}))
    code = main(["place", "--routing", str(store_dir), "--ranks", "16", "--hardware",
                 str(tmp_path / "incomplete.json"), "--out", str(tmp_path / "other")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "hardware profile 'incomplete': 'nvlink_bandwidth' is missing; add it" in err
    assert not (tmp_path / "other").exists()


# -- the bytes of real runs ------------------------------------------------------------------------
@pytest.mark.parametrize("G", [None, 4])
def test_link_totals_are_the_cost_models(store_dir, G):
    """Summed over ranks, the DeepEP copies received are the plan's deepep volume, and its RDMA
    copies sent are the node volume."""
    store = routing_store.RoutingStore.open(store_dir, verify=False)
    plan = plan_placement(store, PlaceOptions(ranks=8, ranks_per_node=G, global_batch=32, clusters=8, refine=2))
    tr = traffic(np.asarray(store.ids("train")), plan.rank_of_expert, 8, G)
    st = step_traffic(tr, plan.samples, 16)
    assert st.received().sum() == st.sent().sum() == plan.report["cost_models"]["deepep"]["plan"]
    assert st.compute_slots().sum() == plan.report["tokens_placed"] * 2
    if G:
        rdma_sent = (st.node_tokens * (np.arange(8)[:, None] // G != np.arange(2)[None, :])).sum()
        assert rdma_sent == plan.report["cost_models"]["node"]["plan"]


def test_ep_bytes_of_a_real_run(tiny_data, tmp_path):
    """grouter ep on 2 gloo ranks: every rank's bytes per phase and step equal ep_phase_bytes."""
    from grouter.device import spawn
    from grouter.ep import Options as EPOptions
    from grouter.ep import rank_batches, train_many
    from grouter.loop import TrainConfig
    from grouter.model import MoEConfig
    from grouter.testing import synthetic_store

    E, K, R, layers, d = 8, 2, 2, 2, 16
    synthetic_store(tiny_data, tmp_path / "store", E, K, 4, seed=0, noise=0.1, decay=0.7)
    store = routing_store.RoutingStore.open(tmp_path / "store", data=tiny_data)
    plan = plan_placement(store, PlaceOptions(ranks=R, global_batch=8, clusters=8, seed=0))
    plan.save(tmp_path / "plan.json")
    cfg = MoEConfig(vocab_size=tiny_data.vocab_size, d_model=d, n_layers=layers, n_heads=2, d_expert=16,
                    n_experts=E, top_k=K, max_seq_len=tiny_data.seq_len, router="external", seed=0)
    schedule = TrainConfig(steps=2, lr=1e-3, warmup_steps=1, seed=0, device="cpu")
    runs = [dict(data=tiny_data.path, routing=tmp_path / "store", out=tmp_path / f"run-{p}-{x}",
                 plan=tmp_path / "plan.json", model_cfg=cfg,
                 options=EPOptions(placement=p, exchange=x, schedule=schedule))
            for p, x in (("plan", "dedup"), ("random", "slot"))]
    spawn(R, train_many, (runs,))
    ids = np.asarray(store.ids("train"))
    for run in runs:
        placement, exchange = run["options"].placement, run["options"].exchange
        rank_of_expert = plan.rank_of_expert if placement == "plan" else np.arange(E) // (E // R)
        batches = rank_batches(plan, placement, R, seed=0)
        st = step_traffic(traffic(ids, rank_of_expert, R), [[b[r] for b in batches] for r in range(R)],
                          tiny_data.seq_len)
        predicted = ep_phase_bytes(st, exchange, row_bytes=d * 4, layers=layers, k=K, n_experts=E)
        records = [json.loads(line) for line in (Path(run["out"]) / "metrics.jsonl").read_text().splitlines()]
        for rec in records:
            b = (rec["step"] - 1) % len(batches)
            for phase, measured in rec["bytes_per_rank"].items():
                if phase != "total":
                    assert measured == predicted[phase][b].tolist(), (exchange, phase, rec["step"])
