"""Expert parallelism (grouter.ep) on CPU gloo: equal to one process, and the bytes it sends.

One spawn of 2 processes trains 5 runs ({plan, random} placement x {dedup, slot} exchange, and one
on a store with per-layer heads; 3 steps each, in one process group); one torchrun of 4 processes runs the command line. Every run is
compared with a single-process MoELM trained on the union of the ranks' batches, and the bytes
each rank measured with the analytic count from the routing (grouter.place.remote_volume).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from grouter.device import free_port, spawn
from grouter.ep import EPContext, EPExperts, analytic_copies, rank_batches, to_expert_parallel, train_many
from grouter.ep import Options as EPOptions
from grouter.errors import GrouterError
from grouter.formats.plan import Plan
from grouter.formats.store import RoutingStore
from grouter.loop import TrainConfig, build_optimizer, lr_at
from grouter.model import MoEConfig, MoELM
from grouter.place import Options as PlaceOptions, plan_placement, remote_volume
from grouter.routers import Heads
from grouter.testing import synthetic_store

SRC = str(Path(__file__).resolve().parents[1] / "src")
E, K, CLUSTERS, GLOBAL_BATCH, STEPS = 8, 2, 4, 8, 3
D_MODEL, LAYERS = 32, 2
# Losses agree to ~1e-7 relative. Parameters after AdamW steps: Adam divides each gradient element by
# its own running RMS, so float reassociation (sums over ranks / over a token's experts in another
# order) of a near-cancelling gradient element becomes an absolute error of up to ~lr x its relative
# error: measured max 2.3e-6 at lr 1e-2 with AdamW(fused=False) (one embedding entry), 4.7e-7 with
# fused=True (grouter.loop.build_optimizer decides; both sides use it).
RTOL, ATOL = 1e-4, 1e-5


def model_cfg(data) -> MoEConfig:
    return MoEConfig(vocab_size=data.vocab_size, d_model=D_MODEL, n_layers=LAYERS, n_heads=2, d_expert=32,
                     n_experts=E, top_k=K, max_seq_len=data.seq_len, router="external", seed=0)


def train_cfg(steps: int = STEPS) -> TrainConfig:
    return TrainConfig(steps=steps, lr=1e-2, warmup_steps=1, seed=0, device="cpu")


@pytest.fixture(scope="module")
def setup(tiny_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("ep")
    synthetic_store(tiny_data, root / "store", E, K, CLUSTERS, seed=0, noise=0.1, decay=0.7)
    store = RoutingStore.open(root / "store", data=tiny_data)
    for R in (2, 4):
        plan = plan_placement(store, PlaceOptions(ranks=R, global_batch=GLOBAL_BATCH, clusters=16, seed=0))
        (root / f"plan{R}").mkdir()
        plan.save(root / f"plan{R}")
    synthetic_store(tiny_data, root / "store-heads", E, K, CLUSTERS, seed=0, noise=0.1, decay=0.7,
                    heads=Heads((0, 1), LAYERS))  # per-layer routing: layer l takes head l
    heads = RoutingStore.open(root / "store-heads", data=tiny_data)
    (root / "plan2-heads").mkdir()
    plan_placement(heads, PlaceOptions(ranks=2, global_batch=GLOBAL_BATCH, clusters=16, seed=0, target_layers=LAYERS)).save(
        root / "plan2-heads")
    return root


RUNS = [(p, x) for p in ("plan", "random") for x in ("dedup", "slot")]


@pytest.fixture(scope="module")
def runs2(setup, tiny_data):
    runs = [dict(data=tiny_data.path, routing=setup / "store", out=setup / f"r2-{p}-{x}", plan=setup / "plan2",
                 model_cfg=model_cfg(tiny_data),
                 options=EPOptions(placement=p, exchange=x, schedule=train_cfg(), save_model=True))
            for p, x in RUNS]
    runs.append(dict(runs[0], routing=setup / "store-heads", out=setup / "r2-heads", plan=setup / "plan2-heads"))
    spawn(2, train_many, (runs,))
    return setup


def reference(data, store, batches, steps):
    """Single-process MoELM training on the union of the ranks' batches (grouter.train's step)."""
    torch.manual_seed(0)
    model = MoELM(model_cfg(data))
    tcfg = train_cfg(steps)
    opt = build_optimizer(model, tcfg)
    split, losses = data.split("train"), []
    for step in range(steps):
        idx = np.concatenate(batches[step % len(batches)])
        batch = split.batch(idx)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, tcfg)
        out = model(batch["input_ids"], labels=batch["labels"], routing=store.routing("train", idx))
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip)
        opt.step()
        losses.append(out.lm_loss.item())
    return losses, model.state_dict()


def read_run(out: Path):
    from grouter.artifacts import load_safetensors

    records = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, len(records) + 1))
    return records, load_safetensors(out / "model" / "model.safetensors", "model")


def copies_to(ids, rank_of_expert, R, dedup):
    """``[R]`` copies a rank holding sequences ``ids`` (logical) sends to each rank, per layer."""
    rk = np.asarray(rank_of_expert)[np.asarray(ids, dtype=np.int64)].reshape(-1, K)
    if not dedup:
        return np.bincount(rk.ravel(), minlength=R)
    present = np.zeros((len(rk), R), dtype=bool)
    present[np.arange(len(rk))[:, None], rk] = True
    return present.sum(0)


def check_bytes(records, store, plan, placement, exchange):
    """Measured bytes per rank, phase and step == the count from the (logical) routing."""
    R = plan.ranks
    batches = rank_batches(plan, placement, R, seed=0)
    rank_of_expert = plan.rank_of_expert if placement == "plan" else np.arange(E) // (E // R)
    ids = store.ids("train")
    row = D_MODEL * 4  # float32 hidden states
    for rec in records:
        parts = batches[(rec["step"] - 1) % len(batches)]
        m = np.stack([copies_to(ids[np.sort(parts[s])], rank_of_expert, R, exchange == "dedup") for s in range(R)])
        np.fill_diagonal(m, 0)  # m[s, r]: copies s sends to r != s (self-sends are not sent)
        by = rec["bytes_per_rank"]
        for r in range(R):
            vol = remote_volume(ids[np.sort(parts[r])], rank_of_expert, np.full(len(parts[r]), r))
            sent, returned = m[r].sum(), m[:, r].sum()  # r's tokens out; results of others' tokens back
            assert sent == vol["deepep" if exchange == "dedup" else "megatron"]
            assert rec["remote_copies_per_rank"][r] == LAYERS * sent
            assert by["dispatch"][r] == by["combine_backward"][r] == LAYERS * sent * row, (r, rec["step"])
            assert by["combine"][r] == by["dispatch_backward"][r] == LAYERS * returned * row, (r, rec["step"])
            meta = (R - 1) * 8 + sent * 2 * K * 4 if exchange == "dedup" else (E - E // R) * 8
            assert by["meta"][r] == LAYERS * meta
            assert rec["analytic_copies_per_rank"]["dedup"][r] == LAYERS * vol["deepep"]
            assert rec["analytic_copies_per_rank"]["slot"][r] == LAYERS * vol["megatron"]
            assert rec["analytic_dispatch_bytes_per_rank"][exchange][r] == by["dispatch"][r] // LAYERS * LAYERS


@pytest.mark.parametrize("placement,exchange", RUNS)
def test_ep_equals_single_process(runs2, tiny_data, placement, exchange):
    store = RoutingStore.open(runs2 / "store", data=tiny_data)
    plan = Plan.load(runs2 / "plan2")
    records, state = read_run(runs2 / f"r2-{placement}-{exchange}")
    ref_losses, ref_state = reference(tiny_data, store, rank_batches(plan, placement, 2, seed=0), STEPS)
    np.testing.assert_allclose([r["loss"] for r in records], ref_losses, rtol=RTOL)
    assert ref_state.keys() == state.keys()
    moved = 0.0
    init = MoELM(model_cfg(tiny_data)).state_dict()
    for name, t in ref_state.items():
        torch.testing.assert_close(state[name], t, rtol=RTOL, atol=ATOL, msg=name)
        moved = max(moved, float((t - init[name]).abs().max()))
    assert moved > 1e-3  # the optimizer steps changed the parameters
    assert records[0]["sequences_per_rank"] == [GLOBAL_BATCH // 2] * 2


@pytest.mark.parametrize("placement,exchange", RUNS)
def test_bytes_match_routing(runs2, tiny_data, placement, exchange):
    store = RoutingStore.open(runs2 / "store", data=tiny_data)
    records, _ = read_run(runs2 / f"r2-{placement}-{exchange}")
    check_bytes(records, store, Plan.load(runs2 / "plan2"), placement, exchange)


def test_plan_sends_fewer_bytes_than_random(runs2):
    total = {}
    for p, x in RUNS:
        records, _ = read_run(runs2 / f"r2-{p}-{x}")
        total[p, x] = sum(sum(r["bytes_per_rank"]["dispatch"]) for r in records)
    for x in ("dedup", "slot"):
        assert total["plan", x] < 0.85 * total["random", x], total  # the plan predicts ~0.65
    assert total["plan", "dedup"] <= total["plan", "slot"] and total["random", "dedup"] <= total["random", "slot"]


@pytest.mark.slow
def test_cli_torchrun_4_ranks(setup, tiny_data):
    """torchrun -m grouter.ep with 4 gloo processes: same losses and parameters as one process."""
    out = setup / "cli4"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "4", "--master_port",
           str(free_port()), "-m", "grouter.cli", "ep",
           "--data", str(tiny_data.path), "--routing", str(setup / "store"), "--plan", str(setup / "plan4"),
           "--steps", "2", "--out", str(out), "--d-model", str(D_MODEL), "--layers", str(LAYERS), "--heads", "2",
           "--d-expert", "32", "--lr", "1e-2", "--warmup-steps", "1", "--save-model", "--json"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[:4000]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["ranks"] == 4 and summary["exchange"] == "dedup" and summary["placement"] == "plan"
    store = RoutingStore.open(setup / "store", data=tiny_data)
    plan = Plan.load(setup / "plan4")
    records, state = read_run(out)
    ref_losses, ref_state = reference(tiny_data, store, rank_batches(plan, "plan", 4), 2)
    np.testing.assert_allclose([r["loss"] for r in records], ref_losses, rtol=RTOL)
    for name, t in ref_state.items():
        torch.testing.assert_close(state[name], t, rtol=RTOL, atol=ATOL, msg=name)
    check_bytes(records, store, plan, "plan", "dedup")
    assert json.loads((out / "run.json").read_text())["summary"] == {k: v for k, v in summary.items() if k != "out"}


def test_analytic_copies():
    ids = np.array([[0, 1], [0, 5], [4, 6], [2, 7]])  # E 8, R 2: rank 0 holds 0..3
    assert analytic_copies(ids, 8, 2, 0) == {"dedup": 3, "slot": 4}
    assert analytic_copies(ids, 8, 2, 1) == {"dedup": 3, "slot": 4}


def test_refusals(tiny_data):
    with pytest.raises(GrouterError, match="divides 8"):
        EPContext(rank=0, world=3, n_experts=8)
    with pytest.raises(GrouterError, match="unknown exchange"):
        EPContext(rank=0, world=2, n_experts=8, exchange="ring")
    cfg = model_cfg(tiny_data)
    with pytest.raises(GrouterError, match="must be 'external'"):
        to_expert_parallel(MoELM(MoEConfig(**{**cfg.__dict__, "router": "aux"})), EPContext(0, 2, 8))
    model = to_expert_parallel(MoELM(cfg), EPContext(1, 2, 8), permutation=[7, 6, 5, 4, 3, 2, 1, 0])
    ex = model.blocks[0].moe.experts
    assert isinstance(ex, EPExperts) and ex.w_in.shape == (4, D_MODEL, 64)
    ref = MoELM(cfg).blocks[0].moe.experts.w_in.data  # physical 4..7 are logical 3..0
    torch.testing.assert_close(ex.w_in.data, ref[[3, 2, 1, 0]], rtol=0, atol=0)
    with pytest.raises(GrouterError, match="needs a placement plan"):
        rank_batches(None, "plan", 2)


def test_per_layer_heads_route_each_layer_by_its_head(runs2, tiny_data):
    """A per-layer store (layer l takes head l): EP equals one process, and each rank sends, per step,
    the sum over layers of the copies its head's routing implies."""
    store = RoutingStore.open(runs2 / "store-heads", data=tiny_data)
    plan = Plan.load(runs2 / "plan2-heads")
    records, state = read_run(runs2 / "r2-heads")
    batches = rank_batches(plan, "plan", 2, seed=0)
    ref_losses, ref_state = reference(tiny_data, store, batches, STEPS)
    np.testing.assert_allclose([r["loss"] for r in records], ref_losses, rtol=RTOL)
    for name, t in ref_state.items():
        torch.testing.assert_close(state[name], t, rtol=RTOL, atol=ATOL, msg=name)
    ids, layer_heads = store.ids("train"), store.heads.for_target(LAYERS)
    assert layer_heads == (0, 1) and ids.shape[1:] == (tiny_data.seq_len, 2, K)
    for rec in records:
        parts = batches[(rec["step"] - 1) % len(batches)]
        for r in range(2):
            per_layer = [copies_to(ids[np.sort(parts[r])][:, :, h], plan.rank_of_expert, 2, True)[1 - r]
                         for h in layer_heads]
            assert per_layer[0] != per_layer[1]  # the heads differ, so a one-routing count would not match
            assert rec["remote_copies_per_rank"][r] == rec["analytic_copies_per_rank"]["dedup"][r] == sum(per_layer)
            assert rec["bytes_per_rank"]["dispatch"][r] == sum(per_layer) * D_MODEL * 4
