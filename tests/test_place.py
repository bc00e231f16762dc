"""EP placement planning: volumes, balance, the realised plan, artifacts and user errors.

The method: docs/method.md#expert-parallel-placement.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from grouter.errors import GrouterError
from grouter.formats import store as routing_store
from grouter.formats.plan import Plan, PlanSampler, relabel
from grouter.formats.store import RoutingStore
from grouter.place import (Options as PlaceOptions, affinity_counts, balanced_assignment, balanced_bound, entropy_bits,
                           group_experts, place, plan_placement, refine_grouping, remote_volume, traffic)
from grouter.routers import Routing
from grouter.testing import synthetic_routing

E, K, L, R = 16, 2, 16, 4
GB = 64  # global batch: 16 sequences per rank


def write_store(out: Path, ids: np.ndarray, n_experts: int) -> Path:
    """A synthetic routing store (train split only, zero weights), written by the one store writer."""
    routing = Routing(torch.from_numpy(ids), torch.zeros(ids.shape))
    return routing_store.write_store(out, {"train": routing}, n_experts)


@pytest.fixture(scope="module")
def clustered(tmp_path_factory):
    """2000 sequences from 4 clusters, each preferring its own experts."""
    ids, _ = synthetic_routing(2000, L, E, K, clusters=4, seed=0, noise=0.1, decay=0.6)
    return write_store(tmp_path_factory.mktemp("place") / "clustered", ids, E), ids


@pytest.fixture(scope="module")
def skewed(tmp_path_factory):
    """Most sequences from one cluster: capacity-free placement piles them on one rank."""
    ids, cluster = synthetic_routing(2000, L, E, K, clusters=4, seed=1, noise=0.1, decay=0.6, skew=1.5)
    assert np.bincount(cluster)[0] > 0.7 * len(cluster)
    return write_store(tmp_path_factory.mktemp("place") / "skewed", ids, E), ids


def check_plan(plan: Plan, n: int, per_rank: int | None) -> None:
    """Every sequence placed once (but the < R dropped); with ``per_rank``, that many per rank per batch."""
    seen = np.concatenate([b for batches in plan.samples for b in batches] + [plan.dropped])
    assert np.array_equal(np.sort(seen), np.arange(n))
    assert len(plan.dropped) < plan.ranks
    if per_rank is not None:
        for b in range(plan.n_batches):
            sizes = {len(plan.samples[r][b]) for r in range(plan.ranks)}
            last = b == plan.n_batches - 1
            assert sizes == {per_rank} or (last and len(sizes) == 1)


# -- building blocks -----------------------------------------------------------------------------
def test_affinity_counts_and_entropy():
    rng = np.random.default_rng(0)
    ids = np.stack([rng.permutation(E)[:K] for _ in range(5 * 7)]).reshape(5, 7, K).astype(np.uint8)
    counts = affinity_counts(ids, E)
    naive = np.zeros((5, E), dtype=np.int64)
    for s in range(5):
        for t in range(7):
            for e in ids[s, t]:
                naive[s, e] += 1
    assert np.array_equal(counts, naive) and np.all(counts.sum(1) == 7 * K)
    p = naive / naive.sum(1, keepdims=True)
    direct = -np.where(p > 0, p * np.log2(np.where(p > 0, p, 1)), 0).sum(1)
    assert np.allclose(entropy_bits(counts), direct)
    assert np.allclose(entropy_bits(np.ones((1, E), dtype=np.uint16)), np.log2(E))
    assert np.allclose(entropy_bits(np.eye(E, dtype=np.uint16)[:2] * 5), 0)


@pytest.mark.parametrize("G", [None, 2])
def test_traffic_matches_direct_count(G):
    rng = np.random.default_rng(1)
    n = 300
    ids = np.argsort(rng.random((n, L, E)), axis=-1)[..., :K].astype(np.uint8)
    rank_of_expert = rng.permutation(np.arange(E) // (E // R))
    sample_rank = rng.integers(-1, R, n)  # -1: not placed
    tr = traffic(ids, rank_of_expert, R, G)
    tr_counts = traffic(ids, rank_of_expert, R, G, counts=affinity_counts(ids, E))
    assert np.array_equal(tr.slots, tr_counts.slots) and np.array_equal(tr.tokens, tr_counts.tokens)
    direct = remote_volume(ids, rank_of_expert, sample_rank, G)
    rows = np.flatnonzero(sample_rank >= 0)
    for model in tr.models():
        assert int(tr.at(model, sample_rank[rows], rows).sum()) == direct[model]
        assert np.array_equal(tr.cost(model)[rows, sample_rank[rows]], tr.at(model, sample_rank[rows], rows))
        assert tr.bound(model, rows) == int(tr.cost(model)[rows].min(1).sum())  # the placed sequences only
        assert tr.bound(model) == int(tr.cost(model).min(1).sum())
    assert set(direct) == ({"megatron", "deepep", "node"} if G else {"megatron", "deepep"})


def test_balanced_assignment_respects_capacity_and_is_near_optimal():
    rng = np.random.default_rng(2)
    P, cap, groups = 4, 8, 20
    m = P * cap * groups
    cost = rng.integers(0, 50, (m, P)).astype(float)
    cost[np.arange(m), rng.integers(0, P, m)] -= 40  # a preferred partition, often over-subscribed
    group = np.repeat(np.arange(groups), P * cap)
    rng.shuffle(group)
    capacity = np.full(groups, cap)
    greedy = balanced_assignment(cost, group, capacity)
    exact = balanced_assignment(cost, group, capacity, exact=True)
    for part in (greedy, exact):
        counts = np.zeros((groups, P), dtype=int)
        np.add.at(counts, (group, part), 1)
        assert np.all(counts == cap)
    g_cost, x_cost = cost[np.arange(m), greedy].sum(), cost[np.arange(m), exact].sum()
    free = cost.min(1).sum()
    assert free <= x_cost <= g_cost <= x_cost + 0.05 * abs(x_cost)


def test_group_experts_load_cap():
    rng = np.random.default_rng(4)
    P, n = 4, 16
    weight = rng.random((P, n)) ** 3
    load = rng.gamma(4.0, 1.0, n)
    free = group_experts(weight)
    cap = 1.05 * load.sum() / P
    capped = group_experts(weight, load=load, cap=cap)  # scipy.optimize.milp
    for part in (free, capped):
        assert np.all(np.bincount(part, minlength=P) == n // P)
    assert np.bincount(capped, load, P).max() <= cap  # the per-rank budget, exactly
    gain = lambda part: weight[part, np.arange(n)].sum()  # noqa: E731
    assert gain(capped) <= gain(free)
    least = group_experts(np.zeros((P, n)), load=load, cap=0.5 * load.sum() / P)  # infeasible: the least max
    tight = group_experts(weight, load=load, cap=0.9 * load.sum() / P)  # infeasible: grouped under the least max
    for part in (least, tight):
        assert np.all(np.bincount(part, minlength=P) == n // P)
    assert np.bincount(tight, load, P).max() <= np.bincount(least, load, P).max() * (1 + 1e-6)
    assert np.bincount(least, load, P).max() < np.bincount(free, load, P).max()


def test_refine_grouping_never_increases_cost_nor_breaks_balance():
    ids, _ = synthetic_routing(640, L, E, K, clusters=4, seed=5, noise=0.1, decay=0.6)
    groups, capacity = np.repeat(np.arange(10), 64), np.full(10, 64 // R)
    load = affinity_counts(ids, E).sum(0).astype(float)
    cap = 1.15 * load.sum() / R
    rng = np.random.default_rng(5)
    start = group_experts(rng.random((R, E)), load=load, cap=cap)  # a poor grouping within the cap
    part, rows, trace = refine_grouping(ids, start, R, groups, capacity, 10, n_experts=E, load=load, cap=cap)
    assert len(trace) > 2 and trace == sorted(trace, reverse=True) and trace[-1] < 0.9 * trace[0]
    assert np.all(np.bincount(groups * R + rows, minlength=10 * R) == 64 // R)  # every batch, every rank: 16
    assert np.all(np.bincount(part, minlength=R) == E // R) and np.bincount(part, load, R).max() <= cap
    assert trace[-1] == traffic(ids, part, R).at("deepep", rows).sum()  # the cost it reports is the DeepEP cost
    over = rng.permutation(np.arange(E) // (E // R))  # above the cap: the first step brings it under
    assert np.bincount(over, load, R).max() > cap
    part, _, trace = refine_grouping(ids, over, R, groups, capacity, 10, n_experts=E, load=load, cap=cap)
    assert np.bincount(part, load, R).max() <= cap and trace[1:] == sorted(trace[1:], reverse=True)


def test_balanced_bound():
    rng = np.random.default_rng(6)
    cost = rng.integers(0, 60, (1200, 4)).astype(float)
    one, cap = np.zeros(1200, np.int64), np.array([300])
    exact = cost[np.arange(1200), balanced_assignment(cost, one, cap, exact=True)].sum()
    bound, method = balanced_bound(cost, one, cap)  # one group of 1200: the Lagrangian dual
    assert "Lagrangian" in method and cost.min(1).sum() <= bound <= exact <= 1.001 * bound
    greedy = cost[np.arange(1200), balanced_assignment(cost, one, cap)].sum()
    assert exact <= greedy <= 1.005 * exact  # the greedy with prices
    groups = np.repeat(np.arange(10), 120)  # small groups: exact per group
    small, method = balanced_bound(cost, groups, np.full(10, 30))
    assert "exact" in method and small == cost[np.arange(1200), balanced_assignment(cost, groups, np.full(10, 30),
                                                                                        exact=True)].sum()


# -- plans on synthetic clustered routing --------------------------------------------------------
def test_balanced_plan_beats_random_and_realises(clustered, tmp_path):
    store_dir, ids = clustered
    store = RoutingStore.open(store_dir)
    plan = plan_placement(store, PlaceOptions(ranks=R, global_batch=GB, clusters=20))
    n = len(ids)
    check_plan(plan, n, GB // R)
    rep = plan.report
    assert rep["level"] == "rank" and rep["optimises"] == "deepep" and rep["algorithm"] == "balanced"
    assert rep["load"]["plan"]["sequences_max_over_mean"]["per_batch_worst"] == 1.0
    cm = rep["cost_models"]
    assert set(cm) == {"megatron", "deepep"}
    assert cm["deepep"]["plan_over_random"] < 0.7, cm["deepep"]  # 0.52 without the load cap: see below
    for c in cm.values():
        assert c["floor_any_placement"] <= c["lower_bound"] <= c["plan"] < c["random"]
    bound = rep["balanced_bound"]  # exact per batch: the greedy is within 1 % of the best balanced placement
    assert bound["capacity_free_bound"] <= bound["balanced_bound"] <= bound["plan"] <= 1.01 * bound["balanced_bound"]
    # expert permutation: a permutation, E/R experts per rank
    perm = plan.permutation
    assert np.array_equal(np.sort(perm), np.arange(E))
    assert np.all(np.bincount(plan.rank_of_expert, minlength=R) == E // R)
    # realising the plan: relabelled ids + contiguous EP blocks + the sampler's sequences
    physical = relabel(np.asarray(store.ids("train")), perm)
    assert physical.dtype == np.uint8
    assert np.array_equal(physical // (E // R), plan.rank_of_expert[ids])
    seq_rank = np.full(n, -1)
    for r in range(R):
        sampler = PlanSampler(plan, r, R)
        got = list(sampler)
        assert got == [int(i) for b in plan.samples[r] for i in b] and len(sampler) == len(got)
        seq_rank[got] = r
    realised = remote_volume(physical, np.arange(E) // (E // R), seq_rank)
    assert realised == {m: c["plan"] for m, c in cm.items()}


def test_load_cap_trades_volume_for_compute_balance(clustered):
    store = RoutingStore.open(clustered[0], verify=False)
    capped = plan_placement(store, PlaceOptions(ranks=R, global_batch=GB, clusters=20)).report  # load tolerance 0.05 by default
    free = plan_placement(store, PlaceOptions(ranks=R, global_batch=GB, clusters=20, load_cap=False)).report
    load = lambda r, who="plan": r["load"][who]["expert_load_max_over_mean"]["overall"]  # noqa: E731
    assert load(capped) < 1.15 < load(capped, "random") < load(free)  # this routing's experts are unequally popular
    assert free["cost_models"]["deepep"]["plan"] < capped["cost_models"]["deepep"]["plan"]  # the price


def test_greedy_unbalanced_on_skewed_data_and_attains_bound(skewed):
    store_dir, ids = skewed
    store = RoutingStore.open(store_dir)
    greedy = plan_placement(store, PlaceOptions(ranks=R, algorithm="greedy", global_batch=GB, clusters=20))
    balanced = plan_placement(store, PlaceOptions(ranks=R, global_batch=GB, clusters=20, refine=0))  # the paper's expert grouping
    check_plan(greedy, len(ids), None)
    check_plan(balanced, len(ids), GB // R)
    g, b = greedy.report, balanced.report
    assert g["load"]["plan"]["sequences_max_over_mean"]["per_batch_mean"] > 1.5
    assert g["load"]["plan"]["sequences_max_over_mean"]["overall"] > 1.5
    assert b["load"]["plan"]["sequences_max_over_mean"]["per_batch_worst"] == 1.0
    assert np.array_equal(greedy.permutation, balanced.permutation)  # same experts, only samples differ
    gd, bd = g["cost_models"]["deepep"], b["cost_models"]["deepep"]
    assert gd["plan"] == gd["lower_bound"] <= bd["plan"] < bd["random"]  # Algorithm 1 = the bound
    lens = [len(PlanSampler(greedy, r, R)) for r in range(R)]
    assert max(lens) > 1.5 * np.mean(lens)


def test_node_level_plan(clustered):
    store_dir, ids = clustered
    store = RoutingStore.open(store_dir, verify=False)
    plan = plan_placement(store, PlaceOptions(ranks=R, ranks_per_node=2, global_batch=GB, clusters=20))
    check_plan(plan, len(ids), GB // R)
    rep = plan.report
    assert rep["level"] == "node" and rep["partitions"] == 2 and rep["optimises"] == "node"
    cm = rep["cost_models"]
    assert set(cm) == {"megatron", "deepep", "node"}
    for c in cm.values():
        assert c["floor_any_placement"] <= c["lower_bound"] <= c["plan"] <= c["random"]
    assert cm["node"]["plan_over_random"] < 0.7
    assert rep["clustering"]["node_inner_split"]["refined"] == 2
    trace, inner = rep["refinement"]["cost_per_token"], rep["refinement"]["inner_cost_per_token"]
    assert trace == sorted(trace, reverse=True) and inner[1] <= inner[0]
    paper = plan_placement(store, PlaceOptions(ranks=R, ranks_per_node=2, global_batch=GB, clusters=20, refine=0)).report
    assert paper["refinement"] is None
    assert cm["node"]["plan"] <= paper["cost_models"]["node"]["plan"]
    rank_level = plan_placement(store, PlaceOptions(ranks=R, ranks_per_node=2, level="rank", global_batch=GB, clusters=20))
    assert rank_level.report["optimises"] == "deepep" and "node" in rank_level.report["cost_models"]


def test_epoch_scope_and_max_sequences(clustered):
    store_dir, ids = clustered
    store = RoutingStore.open(store_dir, verify=False)
    plan = plan_placement(store, PlaceOptions(ranks=R, global_batch=GB, clusters=20, scope="epoch", max_sequences=1001))
    assert plan.n_sequences == 1001
    check_plan(plan, 1001, GB // R)
    assert len(plan.dropped) == 1001 % R
    assert plan.report["cost_models"]["deepep"]["plan_over_random"] < 0.7
    load = plan.report["load"]  # batches dealt by load: each batch's expert load near the mean
    assert load["plan"]["expert_load_max_over_mean"]["per_batch_worst"] <= 1.2
    assert load["plan"]["expert_load_max_over_mean"]["per_batch_worst"] < load["random"]["expert_load_max_over_mean"][
        "per_batch_worst"]
    again = plan_placement(store, PlaceOptions(ranks=R, global_batch=GB, clusters=20, scope="epoch", max_sequences=1001))
    assert np.array_equal(again.permutation, plan.permutation)  # deterministic for a seed
    assert all(np.array_equal(a, b) for ra, rb in zip(again.samples, plan.samples) for a, b in zip(ra, rb))


@pytest.mark.parametrize("scope", ["batch", "epoch"])
def test_the_refinement_sample_is_bounded_in_token_slots(clustered, monkeypatch, scope):
    """Long sequences or many heads: the refinement samples fewer sequences (whole global batches, at
    least one), so its memory stays bounded; the plan is still complete and balanced."""
    import grouter.place as place_module

    store_dir, ids = clustered
    store = RoutingStore.open(store_dir, verify=False)
    options = PlaceOptions(ranks=R, global_batch=GB, clusters=20, scope=scope)
    assert plan_placement(store, options).report["refinement"]["sample"] == 2000  # 2000 sequences: all of them
    for limit in (3 * GB, 1):
        monkeypatch.setattr(place_module, "REFINE_SLOTS", limit * L * K + L * K - 1)
        plan = plan_placement(store, options)
        sample = plan.report["refinement"]["sample"]
        if scope == "epoch":  # random sequences, a multiple of the ranks (at least R)
            assert sample == max(limit // R, 1) * R
        else:  # whole batches (64 sequences, the last 16), added while they fit: at least one
            assert sample % R == 0 and (limit - GB < sample <= limit if limit > GB else 0 < sample <= GB)
        check_plan(plan, len(ids), GB // R)


def test_relabel_torch_and_numpy():
    perm = np.random.default_rng(3).permutation(E)
    ids = torch.randint(0, E, (3, 5, K), dtype=torch.int64)
    for t in (ids, ids.to(torch.uint8), ids.to(torch.int32)):
        out = relabel(t, perm)
        assert out.dtype == t.dtype and torch.equal(out.long(), torch.as_tensor(perm)[ids])
    assert np.array_equal(relabel(ids.numpy().astype(np.uint16), perm), perm[ids.numpy()])
    with pytest.raises(GrouterError, match="permutation"):
        relabel(ids, np.zeros(E, dtype=int))


# -- artifacts -----------------------------------------------------------------------------------
def test_place_writes_plan_and_reports(clustered, tmp_path):
    store_dir, ids = clustered
    out = tmp_path / "plan"
    summary = place(out, routing=store_dir, ranks=R, ranks_per_node=2, global_batch=GB, clusters=20)
    for name in ("plan.json", "report.json", "report.md", "report.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0
    assert summary["plan"] == str(out / "plan.json") and summary["level"] == "node"
    assert summary["plan_over_random"]["node"] < 0.7 and summary["sequences_max_over_mean"] == 1.0
    md = (out / "report.md").read_text()
    assert "| deepep |" in md and "| node |" in md and "lower bound" in md
    d = json.loads((out / "plan.json").read_text())
    assert d["ranks"] == R and d["ranks_per_node"] == 2 and d["level"] == "node" and len(d["samples"]) == R
    assert all(len(block) == E // R for block in d["rank_experts"])
    loaded = Plan.load(out)
    assert np.array_equal(loaded.permutation, d["permutation"]) and loaded.report["level"] == "node"
    assert [list(PlanSampler(out, r, R)) for r in range(R)] == [list(PlanSampler(loaded, r, R)) for r in range(R)]
    with pytest.raises(GrouterError, match="already exists"):
        place(out, routing=store_dir, ranks=R)
    with pytest.raises(GrouterError, match="world_size"):
        PlanSampler(loaded, 0, 2 * R)
    (tmp_path / "bad.json").write_text('{"format": "other"}')
    with pytest.raises(GrouterError, match="not a grouter placement plan"):
        Plan.load(tmp_path / "bad.json")


def test_plan_load_checks_the_header(tmp_path):
    """Plan.load reads a plan directory or the plan file (any name) and refuses what is not a plan."""
    plan = Plan(n_experts=E, k=K, ranks=R, ranks_per_node=None, level="rank", algorithm="balanced",
                scope="batch", global_batch=8, seed=0, split="train", n_sequences=8,
                permutation=np.random.default_rng(0).permutation(E), samples=[[np.array([r, r + R])] for r in range(R)],
                dropped=np.zeros(0, dtype=np.int64))
    (tmp_path / "dir").mkdir()
    saved = (plan.save(tmp_path / "dir").parent, tmp_path / "dir" / "plan.json", plan.save(tmp_path / "other.json"))
    for where in saved:
        loaded = Plan.load(where)
        assert loaded.to_json() == plan.to_json() and loaded.report == {}
    d = plan.to_json()
    for name, content, message in (("version.json", {**d, "version": 2}, "format version 2 but .* reads version 1"),
                                   ("format.json", {**d, "format": "other"}, "not a grouter placement plan"),
                                   ("corrupt.json", {**d, "ranks": 3}, "corrupt"),
                                   ("notjson.json", "{", "corrupt")):
        (tmp_path / name).write_text(content if isinstance(content, str) else json.dumps(content))
        with pytest.raises(GrouterError, match=message):
            Plan.load(tmp_path / name)
    with pytest.raises(GrouterError, match="placement plan .*absent not found; create it with `grouter place`"):
        Plan.load(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(GrouterError, match=r"not a grouter placement plan \(no plan.json\)"):
        Plan.load(tmp_path / "empty")


def test_plan_on_dispatched_store(tiny_data, tmp_path):
    """End to end on the routing a (random) Grouter writes with `grouter dispatch`."""
    from grouter.dispatch import dispatch
    from grouter.formats.grouter import GrouterConfig
    from grouter.network import Grouter

    g = Grouter(GrouterConfig(vocab_size=tiny_data.vocab_size, n_experts=E, top_k=K, d_model=32, n_layers=1,
                              n_heads=2, d_ff=64, max_seq_len=tiny_data.seq_len))
    with torch.no_grad():
        g.head.weight.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(1))
    g.save_pretrained(tmp_path / "g")
    dispatch(tmp_path / "routing", grouter=tmp_path / "g", data=tiny_data, batch_size=256, progress=False)
    n = len(tiny_data.split("train"))
    summary = place(tmp_path / "plan", routing=tmp_path / "routing", ranks=R, global_batch=2 * R, clusters=10)
    plan = Plan.load(tmp_path / "plan")
    check_plan(plan, n, 2)
    assert summary["sequences_placed"] == n - n % R
    assert summary["plan_over_random"]["deepep"] <= 1.0


# -- user errors ---------------------------------------------------------------------------------
def test_errors(clustered, tmp_path):
    store_dir, ids = clustered
    store = RoutingStore.open(store_dir, verify=False)
    with pytest.raises(GrouterError, match="divides 16"):
        plan_placement(store, PlaceOptions(ranks=3))
    with pytest.raises(GrouterError, match="only 8 sequences for 16 ranks"):
        plan_placement(store, PlaceOptions(ranks=16, max_sequences=8))
    with pytest.raises(GrouterError, match="--algorithm must be one of balanced, greedy, got 'fast'"):
        plan_placement(store, PlaceOptions(ranks=R, algorithm="fast"))
    with pytest.raises(GrouterError, match="multiple of the 4 ranks"):
        plan_placement(store, PlaceOptions(ranks=R, global_batch=30))
    with pytest.raises(GrouterError, match="ranks-per-node 3"):
        plan_placement(store, PlaceOptions(ranks=R, ranks_per_node=3))
    with pytest.raises(GrouterError, match="node-level placement needs"):
        plan_placement(store, PlaceOptions(ranks=R, level="node"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(GrouterError, match="no manifest.json"):
        place(tmp_path / "out", routing=tmp_path / "empty", ranks=R)
    assert not (tmp_path / "out").exists()


# -- per-layer routing: the union of the layers -------------------------------------------------
def _sample_ranks(plan: Plan, n: int) -> np.ndarray:
    out = np.full(n, -1, dtype=np.int64)
    for r, batches in enumerate(plan.samples):
        for b in batches:
            out[b] = r
    return out


@pytest.fixture(scope="module")
def per_layer(tiny_data, tmp_path_factory):
    """Per-layer routing (heads of source layers 0, 1 of 2) and the one-head store equal to its head 0."""
    from grouter.routers import Heads
    from grouter.testing import synthetic_store

    root = tmp_path_factory.mktemp("place-layers")
    synthetic_store(tiny_data, root / "heads", E, K, clusters=4, seed=3, noise=0.1, decay=0.6, heads=Heads((0, 1), 2))
    synthetic_store(tiny_data, root / "one", E, K, clusters=4, seed=3, noise=0.1, decay=0.6)
    return RoutingStore.open(root / "heads"), RoutingStore.open(root / "one")


def test_a_union_of_one_head_plans_as_that_heads_store(per_layer):
    """Target layers that all route by head 0: the same plan, byte for byte, as the one-head store of head 0."""
    heads, one = per_layer
    assert np.array_equal(heads.ids("train")[:, :, 0], one.ids("train"))
    a = plan_placement(heads, PlaceOptions(ranks=R, global_batch=GB, target_layers=1, seed=1))  # one layer: depth 1/2, a tie -> head 0
    b = plan_placement(one, PlaceOptions(ranks=R, global_batch=GB, seed=1))
    assert a.source["layer_heads"] == [0] and "layer_heads" not in b.source
    assert np.array_equal(a.permutation, b.permutation)
    assert all(np.array_equal(x, y) for xs, ys in zip(a.samples, b.samples) for x, y in zip(xs, ys))
    assert a.report["cost_models"] == b.report["cost_models"] and a.report["load"] == b.report["load"]


@pytest.mark.parametrize("target_layers, weights", [(None, [1, 1]), (3, [2, 1]), (4, [2, 2])])
def test_the_plan_costs_the_sum_over_the_target_layers(per_layer, target_layers, weights):
    """The optimised and reported volumes are the sum over the target's layers of each layer's own
    volume (counted token by token), each head weighted by the layers that route by it."""
    heads, _ = per_layer
    plan = plan_placement(heads, PlaceOptions(ranks=R, global_batch=GB, target_layers=target_layers, seed=1))
    ids = heads.ids("train")
    rank = _sample_ranks(plan, len(ids))
    per_head = [remote_volume(ids[:, :, h], plan.rank_of_expert, rank) for h in range(2)]
    for model in ("megatron", "deepep"):
        assert plan.report["cost_models"][model]["plan"] == sum(w * v[model] for w, v in zip(weights, per_head))
    assert plan.report["per_layer_routing"]["layer_heads"] == ([0, 1] if target_layers is None else
                                                               list(heads.heads.for_target(target_layers)))
    assert plan.report["seq_len"] == heads.seq_len and plan.report["cost_models"]["deepep"]["plan_over_random"] < 1


def test_planning_over_the_union_beats_planning_for_one_layer(per_layer):
    """Each head prefers other experts: a plan for head 0 alone costs the union more than the union's plan."""
    heads, one = per_layer
    union = plan_placement(heads, PlaceOptions(ranks=R, global_batch=GB, seed=1))
    first = plan_placement(one, PlaceOptions(ranks=R, global_batch=GB, seed=1))
    ids = heads.ids("train")
    cost = lambda plan: sum(remote_volume(ids[:, :, h], plan.rank_of_expert, _sample_ranks(plan, len(ids)))["deepep"]
                            for h in range(2))  # noqa: E731
    assert cost(union) < cost(first)


def test_per_layer_options_are_checked(per_layer, clustered):
    heads, _ = per_layer
    from dataclasses import replace

    from grouter.hardware import PROFILES
    any_nodes = replace(PROFILES["h100x8"], nodes=None)  # 4 ranks on one node of 8
    timed = plan_placement(heads, PlaceOptions(ranks=R, global_batch=GB, hardware=any_nodes))
    assert len(timed.step_traffic["plan_layers"].layers) == 2  # each head its own all-to-all (tests/test_steptime.py)
    with pytest.raises(GrouterError, match="--target-layers must be a number at least 1"):
        plan_placement(heads, PlaceOptions(ranks=R, global_batch=GB, target_layers=0))
    one_head = RoutingStore.open(clustered[0])  # one routing for every layer: the target's depth changes nothing
    a = plan_placement(one_head, PlaceOptions(ranks=R, global_batch=GB))
    b = plan_placement(one_head, PlaceOptions(ranks=R, global_batch=GB, target_layers=6))
    assert a.report["cost_models"] == b.report["cost_models"] and "per_layer_routing" not in b.report
