"""The step-time objective of `grouter place` (grouter.steptime): never slower than random, per-layer
routing in its own all-to-all, a learned router's routing beside the plan, redundant experts.

The model: docs/steptime.md and src/grouter/hardware.py; the candidates: grouter.place._StepTime.
"""

from dataclasses import replace

import numpy as np
import pytest
import torch

from grouter.errors import GrouterError
from grouter.formats import store as routing_store
from grouter.hardware import PROFILES, HardwareProfile, LayerTraffic, StepTraffic, step_times
from grouter.place import Options, plan_placement, step_traffic, traffic
from grouter.routers import Heads, Routing
from grouter.steptime import ReplicatedIds, replicate_experts
from grouter.testing import synthetic_routing

# A compute-bound toy cluster: 2 GPUs on one node, slow matmuls (0.576 s per token-slot), fast links.
TOY = HardwareProfile(name="toy", ranks_per_node=2, flops=1e3, nvlink_bandwidth=1e3, rdma_bandwidth=5e2,
                      nvlink_latency=1e-6, rdma_latency=2e-6, hidden=4, ffn=8, moe_layers=2, dispatch_bytes=1,
                      combine_bytes=2, dense_flops_per_token=100)
SLOT = 2 * 3 * 4 * 8 * 3 / 1e3  # seconds per token-slot: SwiGLU FLOPs x (forward + backward) / FLOP/s
COPY = 4 * (1 + 3 * 2) / 1e3  # seconds per copy and layer: hidden x (dispatch + combine + both gradients) / B/s


class Store:
    """What plan_placement reads: ids of the train split, experts, k (and per-layer heads)."""

    def __init__(self, ids, n_experts, heads=None):
        self._ids, self.n_experts, self.k, self.heads = ids, n_experts, ids.shape[-1], heads

    def ids(self, split):
        return self._ids


def test_hand_computed_toy_picks_the_faster_grouping():
    """3 sequences use experts {0, 2}, one uses {1, 3} (2 tokens each, top-2). The bytes plan without a
    load cap groups {0, 2} and {1, 3}: 2 copies, but one rank computes 12 token-slots and the other 4.
    The engines' default grouping {0, 1}, {2, 3} splits every token (8 copies) and balances compute
    (8 and 8): on a compute-bound cluster it is faster, and the step-time objective keeps it."""
    ids = np.array([[[0, 2], [0, 2]]] * 3 + [[[1, 3], [1, 3]]], dtype=np.uint8)
    o = Options(ranks=2, global_batch=4, clusters=4, load_cap=False, hardware=TOY)
    bytes_plan = plan_placement(Store(ids, 4), replace(o, objective="bytes"))
    plan = plan_placement(Store(ids, 4), o)
    dense = 4 * 100 / 1e3  # a rank's 4 tokens x dense FLOPs
    grouped = 2 * (12 * SLOT + (4 * 1e-6 + 2 * COPY)) + dense  # 2 layers x the slowest rank
    default = 2 * (8 * SLOT + (4 * 1e-6 + 4 * COPY)) + dense
    assert set(map(tuple, (np.flatnonzero(bytes_plan.rank_of_expert == r) for r in range(2)))) == {(0, 2), (1, 3)}
    assert bytes_plan.report["objective"]["chosen"] == "bytes"
    assert bytes_plan.report["step_time"]["dispatchers"]["deepep"]["plan_ms"]["step"] == pytest.approx(grouped * 1e3)
    assert plan.report["objective"]["chosen"] == "steptime, default experts"
    assert plan.report["step_time"]["dispatchers"]["deepep"]["plan_ms"]["step"] == pytest.approx(default * 1e3)
    assert plan.report["step_time"]["dispatchers"]["deepep"]["speedup"] == pytest.approx(1.0)
    assert bytes_plan.report["step_time"]["dispatchers"]["deepep"]["speedup"] == pytest.approx(default / grouped)
    assert np.array_equal(plan.rank_of_expert, [0, 0, 1, 1])


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_the_toy_by_hand_on_every_profile(name):
    """The toy above on each built-in profile's GPUs, links and model (2 ranks: on one node, or for
    the multi-node profiles on two nodes of one GPU): the grouped experts' time and the default
    grouping's (random placement's: each token has one expert on each rank, so every token sends one
    copy whoever trains it), counted by hand; the plan takes the faster, never slower than random."""
    p = PROFILES[name]
    p = replace(p, nodes=None) if p.nodes == 1 else replace(p, ranks_per_node=1, nodes=2)
    ids = np.array([[[0, 2], [0, 2]]] * 3 + [[[1, 3], [1, 3]]], dtype=np.uint8)
    plan = plan_placement(Store(ids, 4), Options(ranks=2, global_batch=4, clusters=4, load_cap=False, hardware=p))
    slot = 2 * 3 * p.hidden * p.ffn * 3 / p.flops
    bandwidth, latency = (p.nvlink_bandwidth, p.nvlink_latency) if p.nodes is None else (p.rdma_bandwidth, p.rdma_latency)
    copy = p.hidden * (p.dispatch_bytes + 3 * p.combine_bytes) / bandwidth
    dense = 4 * p.dense_flops_per_token / p.flops  # a rank's 2 sequences of 2 tokens
    grouped = p.moe_layers * (12 * slot + 4 * latency + 2 * copy) + dense  # the busy rank: 3 x 2 x 2 slots
    default = p.moe_layers * (8 * slot + 4 * latency + 4 * copy) + dense
    st = plan.report["step_time"]["dispatchers"]["deepep"]
    times = {c["name"]: c["step_ms"] for c in plan.report["objective"]["candidates"]}
    assert times["bytes"] == pytest.approx(grouped * 1e3, rel=1e-9)
    assert st["random_ms"]["step"] == pytest.approx(default * 1e3, rel=1e-9)
    assert st["plan_ms"]["step"] == pytest.approx(min(grouped, default) * 1e3, rel=1e-9)
    assert st["speedup"] >= 1 - 1e-12


def synthetic(seed: int, E: int, R: int, clustered: bool):
    n = 8 * 4 * R  # 8 global batches of 4 sequences per rank
    noise, decay = (0.05, 0.9) if clustered else (0.4, 0.5)
    ids, _ = synthetic_routing(n, 16, E, 4, clusters=8, seed=seed, noise=noise, decay=decay)
    return Store(ids, E)


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_never_predicted_slower_than_random_on_any_profile(name):
    """Seeded synthetic routings, strongly and weakly clustered, batch and epoch scope: the plan's
    predicted step time is at most random placement's, and is the least of the candidates."""
    profile = PROFILES[name]
    R = profile.nodes * profile.ranks_per_node
    for seed, clustered, scope in ((0, True, "batch"), (1, False, "epoch")):
        plan = plan_placement(synthetic(seed, 32, R, clustered), Options(ranks=R, global_batch=4 * R, hardware=name,
                                                                          scope=scope, clusters=16, refine=2))
        ob, st = plan.report["objective"], plan.report["step_time"]["dispatchers"]["deepep"]
        assert st["speedup"] >= 1 - 1e-12, (name, clustered, ob)
        times = {c["name"]: c["step_ms"] for c in ob["candidates"]}
        assert times[ob["chosen"]] == min(times.values()) == pytest.approx(st["plan_ms"]["step"])
        assert times["random"] == pytest.approx(st["random_ms"]["step"])
        for c in ob["candidates"]:  # the stage never makes a batch slower: its mean never rises
            trace = c.get("rounds_step_ms", [])
            assert all(b <= a + 1e-9 for a, b in zip(trace, trace[1:]))


def test_the_stage_buys_step_time_where_the_bytes_plan_loses_it():
    """Demo-like routing on two H800 nodes (NVLink forwarding binds): the stage takes the bytes plan's
    predicted gain over random from 1.05x to 1.07x, with more copies than the bytes plan."""
    ids, _ = synthetic_routing(4096, 32, 16, 4, 8, seed=0, noise=0.05, decay=0.9)
    plan = plan_placement(Store(ids, 16), Options(ranks=16, global_batch=256, hardware="h800x16"))
    c = {x["name"]: x for x in plan.report["objective"]["candidates"]}
    assert c["steptime"]["speedup_over_random"] > c["bytes"]["speedup_over_random"] + 0.01
    assert c["steptime"]["deepep_copies"] > c["bytes"]["deepep_copies"]
    # the stage keeps each batch's traffic from the round whose placement it keeps: equal to a recount
    assert plan.report["objective"]["chosen"] == "steptime"
    kept = plan.step_traffic["plan_layers"].layers[0]
    recount = step_traffic(traffic(ids, plan.rank_of_expert, 16, 8), plan.samples, 32)
    for field in ("tokens", "slots", "node_tokens", "seq_tokens"):
        np.testing.assert_array_equal(getattr(kept, field), getattr(recount, field), err_msg=field)
    megatron = plan_placement(Store(ids, 16), Options(ranks=16, global_batch=256, hardware="h800x16",
                                                      dispatcher="megatron"))
    assert megatron.report["objective"]["dispatcher"] == "megatron"
    assert megatron.report["step_time"]["dispatchers"]["megatron"]["speedup"] >= 1


# -- per-layer routing: each layer its own all-to-all ----------------------------------------------------
def test_per_layer_step_time_is_the_sum_of_each_layers_hand_count():
    """Two layer routings of the toy's 2 sequences on 2 ranks (rank 0 holds experts 0, 1): layer 0 keeps
    each sequence local but one token, layer 1 sends everything across. A step is each layer's own
    slowest rank, summed (the profile's 2 MoE layers: one each), not the time of their summed traffic."""
    def st(ids) -> StepTraffic:
        return step_traffic(traffic(np.array(ids), np.array([0, 0, 1, 1]), 2), [[np.array([0])], [np.array([1])]], 2)

    local = st([[[0, 1], [0, 2]], [[2, 3], [1, 3]]])  # rank 0: 4 slots, 1 copy out, 1 in
    remote = st([[[2, 3], [2, 3]], [[0, 1], [0, 1]]])  # rank 0: 4 slots, 2 out, 2 in
    p = replace(TOY, flops=1e12)
    compute = 4 * SLOT * 1e3 / 1e12
    layer = lambda copies: compute + 4 * 1e-6 + copies * COPY  # noqa: E731
    dense = 2 * 100 / 1e12
    both = LayerTraffic([local, remote], np.array([0.5, 0.5]))
    assert step_times(both, p, "deepep")["step"][0] == pytest.approx(layer(1) + layer(2) + dense, rel=1e-12)
    assert step_times(both, p, "deepep")["all_to_all"][0] == pytest.approx(2 * 4e-6 + 3 * COPY, rel=1e-12)
    assert step_times(local, p, "deepep")["step"][0] == pytest.approx(2 * layer(1) + dense, rel=1e-12)


@pytest.fixture(scope="module")
def per_layer_store(tmp_path_factory):
    ids = np.stack([synthetic_routing(512, 16, 16, 2, clusters=4, seed=s, noise=0.1, decay=0.6)[0] for s in (0, 1)], 2)
    routing = Routing(torch.from_numpy(ids), torch.zeros(ids.shape), heads=Heads((0, 1), 2))
    return routing_store.RoutingStore.open(routing_store.write_store(tmp_path_factory.mktemp("st") / "s",
                                                                     {"train": routing}, 16))


@pytest.mark.parametrize("target_layers", [None, 3])
def test_a_per_layer_plan_predicts_each_heads_own_all_to_all(per_layer_store, target_layers):
    """With per-layer heads the step time is, per batch, the sum over heads of each head's own
    step time (its share of the profile's MoE layers), counted here from each head's traffic."""
    plan = plan_placement(per_layer_store, Options(ranks=8, global_batch=32, hardware="h100x8",
                                                   target_layers=target_layers, clusters=8, refine=2))
    p = PROFILES["h100x8"]
    ids = per_layer_store.ids("train")
    shares = [0.5, 0.5] if target_layers is None else [2 / 3, 1 / 3]
    dense = None
    total = 0
    for h, share in enumerate(shares):
        t = step_times(step_traffic(traffic(ids[:, :, h], plan.rank_of_expert, 8), plan.samples, 16), p, "deepep")
        dense = t["dense"]
        total = total + share * (t["step"] - dense)
    assert plan.report["step_time"]["dispatchers"]["deepep"]["plan_ms"]["step"] == pytest.approx(
        float((total + dense).mean() * 1e3), rel=1e-9)
    assert plan.report["step_time"]["dispatchers"]["deepep"]["speedup"] >= 1 - 1e-12


def test_a_learned_routers_routing_beside_the_plan(per_layer_store):
    """--compare-routing: a learned router's per-layer routing of the same sequences placed the engines'
    default way (contiguous experts, each batch dealt in order), its step time next to the plan's."""
    ids, _ = synthetic_routing(512, 16, 16, 2, clusters=4, seed=2, noise=0.1, decay=0.6)
    plan = plan_placement(Store(ids, 16), Options(ranks=8, global_batch=32, hardware="h100x8", clusters=8),
                          compare=per_layer_store)
    d = plan.report["step_time"]["dispatchers"]["deepep"]
    learned = plan.step_traffic["compare_layers"]
    assert len(learned.layers) == 2 and d["versus"]["compare"]["ms"]["step"] == pytest.approx(
        float(step_times(learned, PROFILES["h100x8"], "deepep")["step"].mean() * 1e3))
    assert d["versus"]["compare"]["speedup"] == pytest.approx(d["versus"]["compare"]["ms"]["step"] / d["plan_ms"]["step"])
    for st in learned.layers:  # every batch dealt in equal shares, each token's k slots counted once per layer
        assert np.all(st.seq_tokens == 4 * 16) and np.all(st.compute_slots().sum(1) == 32 * 16 * 2)
    with pytest.raises(GrouterError, match="compare a routing of the same model"):
        plan_placement(Store(ids, 16), Options(ranks=8, global_batch=32, hardware="h100x8"),
                       compare=Store(ids % 8, 8))


# -- redundant experts: the what-if ----------------------------------------------------------------------
def test_replicas_go_to_the_hottest_experts_and_the_least_loaded_ranks():
    load = np.array([40, 12, 10, 10, 10, 10, 5, 5], dtype=float)  # expert 0 is hot
    rep = replicate_experts(load, np.arange(8) // 2, 4, 4)
    assert rep["copies"].tolist() == [4, 2, 1, 1, 1, 1, 1, 1]  # 40/4 = 10 < 12: the fourth goes to expert 1
    assert len(rep["rank_of_physical"]) == 12 and np.all(np.bincount(rep["rank_of_physical"], minlength=4) == 3)
    ranks_of_0 = rep["rank_of_physical"][rep["physical"][0][:4]]
    assert len(set(ranks_of_0.tolist())) == 4  # no rank holds two copies of an expert
    ids = np.zeros((64, 8, 1), dtype=np.uint8)  # every token-slot on expert 0: spread evenly over its copies
    phys = np.asarray(ReplicatedIds(ids, rep))
    assert np.array_equal(np.asarray(ReplicatedIds(ids, rep)[10:20]), phys[10:20])
    counts = np.bincount(phys.ravel(), minlength=12)[rep["physical"][0]]
    assert counts.sum() == 512 and counts.min() > 0.8 * 128
    with pytest.raises(GrouterError, match="multiple of the 4 ranks"):
        replicate_experts(load, np.arange(8) // 2, 4, 3)


def test_redundant_experts_what_if_balances_a_hot_expert():
    """One expert takes most token-slots: no grouping balances it, a few replicas do."""
    rng = np.random.default_rng(0)
    ids = np.stack([np.where(rng.random((512, 16)) < 0.6, 0, rng.integers(1, 16, (512, 16))),
                    rng.integers(0, 16, (512, 16))], -1)
    ids[:, :, 1] = np.where(ids[:, :, 1] == ids[:, :, 0], (ids[:, :, 0] + 1) % 16, ids[:, :, 1])
    plan = plan_placement(Store(ids.astype(np.uint8), 16), Options(ranks=8, global_batch=64, hardware="h100x8",
                                                                 clusters=8, redundant_experts=8))
    x = plan.report["redundant_experts"]
    assert x["extra"] == 8 and x["plan"]["copies"][0] >= 5
    assert x["random"]["speedup_over_random"] > 1.2 and x["plan"]["speedup_over_random"] > 1.2


def test_options_that_need_a_profile():
    ids, _ = synthetic_routing(64, 8, 16, 2, clusters=4, seed=0)
    for o, match in ((Options(ranks=4, objective="steptime"), "--objective steptime predicts step times"),
                     (Options(ranks=4, redundant_experts=4), "--redundant-experts predicts step times"),
                     (Options(ranks=8, algorithm="greedy", hardware="h100x8", objective="steptime"),
                      "use --algorithm balanced")):
        with pytest.raises(GrouterError, match=match):
            plan_placement(Store(ids, 16), o)
    greedy = plan_placement(Store(ids, 16), Options(ranks=8, algorithm="greedy", hardware="h100x8", global_batch=8))
    assert greedy.report["objective"]["objective"] == "bytes"  # unequal shares: predicted, not re-placed


def test_place_cli_reports_both_comparisons(per_layer_store, tmp_path, capsys):
    """`grouter place --hardware --compare-routing --redundant-experts`: the plan against random placement
    and against the learned router's routing, every candidate, and the what-if, in report.md and --json."""
    import json

    from grouter.cli import main

    ids, _ = synthetic_routing(512, 16, 16, 2, clusters=4, seed=2, noise=0.1, decay=0.6)
    store = routing_store.write_store(tmp_path / "one", {"train": Routing(torch.from_numpy(ids), torch.zeros(ids.shape))}, 16)
    code = main(["place", "--routing", str(store), "--compare-routing", str(per_layer_store.path), "--ranks", "8",
                 "--hardware", "h800x8", "--global-batch", "32", "--redundant-experts", "8", "--out",
                 str(tmp_path / "plan"), "--json"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    st = summary["step_time"]["deepep"]
    assert st["speedup"] >= 1 and st["speedup_over_compare"] > 0 and summary["objective"]["objective"] == "steptime"
    assert set(summary["redundant_experts"]) == {"plan", "random"}
    md = (tmp_path / "plan" / "report.md").read_text()
    assert "step compare, default placement (ms)" in md and "| random |" in md and "redundant experts" in md
    code = main(["place", "--routing", str(store), "--compare-routing", str(per_layer_store.path), "--ranks", "8",
                 "--out", str(tmp_path / "other")])
    assert code == 2 and "--compare-routing predicts step times: add --hardware" in capsys.readouterr().err
