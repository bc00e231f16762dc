import json

import numpy as np
import pytest
import torch

from grouter.errors import GrouterError
from grouter.formats.run import read_metrics
from grouter.loop import TrainConfig, lr_at
from grouter.metrics import max_vio
from grouter.model import ModelOptions, MoEConfig, MoELM
from grouter.routers import ROUTER_KINDS, Routing
from grouter.testing import train_run
from grouter.train import train

BASELINES = [r for r in ROUTER_KINDS if r != "external"]


def model_cfg(data, **kw) -> MoEConfig:
    base = dict(vocab_size=data.vocab_size, max_seq_len=data.seq_len, d_model=32, n_layers=2, n_heads=2,
                d_expert=32, n_experts=8, top_k=2)
    return MoEConfig(**{**base, **kw})


def train_cfg(**kw) -> TrainConfig:
    base = dict(steps=40, batch_size=8, lr=1e-2, warmup_steps=4, eval_every=20, checkpoint_every=20,
                eval_sequences=8)
    return TrainConfig(**{**base, **kw})


@pytest.mark.parametrize("router", BASELINES)
def test_every_router_trains_and_logs_its_metrics(tiny_data, tmp_path, router):
    summary = train_run(tiny_data, tmp_path / router, model_cfg(tiny_data, router=router), train_cfg())
    records = read_metrics(tmp_path / router / "metrics.jsonl")
    steps = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in steps] == list(range(1, 41))
    assert np.mean([r["loss"] for r in steps[-5:]]) < steps[0]["loss"] - 0.5, "the loss should go down"
    assert all(len(r["expert_load"]) == 2 and len(r["expert_load"][0]) == 8 for r in steps)
    assert all(r["grad_norm"] > 0 for r in steps)
    # each step's MaxVio (mean over layers) is that of the loads it logged
    assert [r["max_vio"] for r in steps] == pytest.approx([max_vio(r["expert_load"]).mean() for r in steps])
    assert all(np.sum(r["expert_load"], axis=1).tolist() == [8 * 32 * 2] * 2 for r in steps)  # B·L·k a layer
    assert [e["step"] for e in evals] == [20, 40]
    assert set(evals[-1]["val_loss_by_domain"]) == set(tiny_data.domains)
    assert summary["final_val_loss"] == evals[-1]["val_loss"]
    # MaxVioGlobal: of the loads summed over the run; grad-norm CV over min(50, 40 steps) = all of them
    run_loads = np.sum([r["expert_load"] for r in steps], axis=0)
    assert summary["max_vio_global"] == pytest.approx(max_vio(run_loads).mean())
    assert summary["max_vio_global_per_layer"] == pytest.approx(max_vio(run_loads).tolist())
    g = np.array([r["grad_norm"] for r in steps])
    assert summary["grad_norm_cv50_mean"] == pytest.approx(g.std() / g.mean())


def test_balancing_routers_balance_better_than_none(tiny_data, tmp_path):
    cfg = train_cfg(steps=60)
    vio = {r: train_run(tiny_data, tmp_path / r, model_cfg(tiny_data, router=r), cfg)["max_vio_global"]
           for r in ("none", "aux", "hash")}
    assert vio["hash"] < vio["none"] and vio["aux"] < vio["none"]


@pytest.mark.parametrize("router", ["aux", "auxfree", "hash", "stablemoe"])
def test_resume_is_exact(tiny_data, tmp_path, router):
    """N steps, stop, resume for N more: bit-identical to 2N steps uninterrupted."""
    mcfg, tcfg = model_cfg(tiny_data, router=router), train_cfg(steps=20, checkpoint_every=10, eval_every=10)
    train_run(tiny_data, tmp_path / "full", mcfg, tcfg)
    stopped = train_run(tiny_data, tmp_path / "resumed", mcfg, tcfg, stop_after=10)
    assert stopped["stopped_at"] == 10
    train_run(tiny_data, tmp_path / "resumed", mcfg, tcfg)
    a = MoELM.from_pretrained(tmp_path / "full" / "checkpoint").state_dict()
    b = MoELM.from_pretrained(tmp_path / "resumed" / "checkpoint").state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    log_a = (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()
    log_b = (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()
    losses = lambda log: [json.loads(ln).get("loss") for ln in log]
    assert losses(log_a) == losses(log_b)


def test_rerunning_a_finished_run_is_a_no_op(tiny_data, tmp_path):
    model = ModelOptions(d_model=32, n_layers=2, n_heads=2, d_expert=32, n_experts=8, top_k=2)
    run = dict(data=tiny_data, router="aux", schedule=train_cfg(steps=4, eval_every=4, checkpoint_every=4))
    first = train(tmp_path / "run", model=model, **run)
    size = (tmp_path / "run" / "metrics.jsonl").stat().st_size
    assert train(tmp_path / "run", model=model, **run) == first
    assert (tmp_path / "run" / "metrics.jsonl").stat().st_size == size
    with pytest.raises(GrouterError, match="another configuration"):
        train(tmp_path / "run", model={**vars(model), "top_k": 3}, **run)
    with pytest.raises(GrouterError, match="another configuration"):  # the trainer refuses it too
        train_run(tiny_data, tmp_path / "run", model_cfg(tiny_data, top_k=3), run["schedule"])
    again = train(tmp_path / "run", model={**vars(model), "top_k": 3}, overwrite=True, **run)
    assert again["steps"] == 4


def test_corrupt_checkpoint_is_refused_on_resume(tiny_data, tmp_path):
    mcfg, tcfg = model_cfg(tiny_data), train_cfg(steps=8, checkpoint_every=4, eval_every=4)
    train_run(tiny_data, tmp_path / "run", mcfg, tcfg, stop_after=4)
    weights = tmp_path / "run" / "checkpoint" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(GrouterError, match="does not match its checksum"):
        train_run(tiny_data, tmp_path / "run", mcfg, tcfg)


def test_vocabulary_mismatch_is_refused(tiny_data, tmp_path):
    with pytest.raises(GrouterError, match="another tokenizer"):
        train_run(tiny_data, tmp_path / "run", model_cfg(tiny_data, vocab_size=1000), train_cfg())
    assert not (tmp_path / "run").exists()


def test_external_routing_source_trains_without_router_parameters(tiny_data, tmp_path):
    """Routing supplied with the batch (what stored Grouter routing will feed)."""
    n_experts, k = 8, 2

    def token_hash_routing(split: str, idx: np.ndarray) -> Routing:
        ids = torch.from_numpy(tiny_data.split(split).sequences(idx)[:, :-1])
        experts = torch.stack([(ids * 7 + j * 3) % n_experts for j in range(k)], dim=-1)
        return Routing(experts, torch.full(experts.shape, 1.0 / k))

    cfg = model_cfg(tiny_data, router="external")
    summary = train_run(tiny_data, tmp_path / "ext", cfg, train_cfg(), routing_source=token_hash_routing)
    first = read_metrics(tmp_path / "ext" / "metrics.jsonl")[0]
    assert first["loss"] == pytest.approx(np.log(tiny_data.vocab_size), abs=0.1)  # untrained: uniform over the vocab
    assert summary["final_val_loss"] < first["loss"] - 0.5, "it learned (measured: 6.25 -> 5.35)"
    with pytest.raises(GrouterError, match="routing source"):
        train_run(tiny_data, tmp_path / "ext2", cfg, train_cfg())


def test_lr_schedule_warms_up_then_decays():
    cfg = TrainConfig(steps=100, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    lrs = [lr_at(s, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[-1] == pytest.approx(0.1, abs=1e-3)


def test_training_from_the_store_equals_online_grouter_routing(tiny_data, tmp_path):
    """Stored routing (dispatch) gives the same losses as running the frozen Grouter every step."""
    from grouter.dispatch import dispatch
    from grouter.formats.grouter import GrouterConfig
    from grouter.network import Grouter
    from grouter.train import external_routing

    g = Grouter(GrouterConfig(vocab_size=tiny_data.vocab_size, n_experts=8, top_k=2, d_model=32, n_layers=1,
                              n_heads=2, d_ff=64, max_seq_len=tiny_data.seq_len))
    torch.nn.init.normal_(g.head.weight, std=0.5)
    g.save_pretrained(tmp_path / "g")
    dispatch(tmp_path / "store", grouter=tmp_path / "g", data=tiny_data)
    mcfg, tcfg = model_cfg(tiny_data, router="external"), train_cfg(steps=12, eval_every=6, checkpoint_every=6)

    stored, stored_id, e, k = external_routing(tiny_data, routing_dir=tmp_path / "store")
    online, online_id, _, _ = external_routing(tiny_data, grouter_dir=tmp_path / "g", device="cpu")
    assert (e, k) == (8, 2) and stored_id["grouter_fingerprint"] == online_id["grouter_fingerprint"]

    def online_bf16(split, idx):  # the store keeps bf16 weights: round the same way
        r = online(split, idx)
        return Routing(r.ids, r.weights.to(torch.bfloat16).float())

    a = train_run(tiny_data, tmp_path / "a", mcfg, tcfg, routing_source=stored, routing_identity=stored_id)
    b = train_run(tiny_data, tmp_path / "b", mcfg, tcfg, routing_source=online_bf16)
    train_run(tiny_data, tmp_path / "c", mcfg, tcfg, routing_source=online, routing_identity=online_id)
    loss = lambda run: [r["loss"] for r in read_metrics(tmp_path / run / "metrics.jsonl") if r["kind"] == "train"]
    assert loss("a") == loss("b"), "stored routing == online routing, bit for bit"
    assert np.allclose(loss("a"), loss("c"), atol=1e-3), "bf16 weights change losses only slightly"
    assert a["final_val_loss"] == b["final_val_loss"]
    model = MoELM.from_pretrained(tmp_path / "a" / "checkpoint")
    assert not any("router" in name for name, _ in model.named_parameters()), "no router parameters"


def test_per_layer_store_routes_each_layer_by_its_head(tiny_data, tmp_path):
    """A store with per-layer heads: layer l of the target trains on its head's routing (by relative
    depth), the same as the Grouter online, and the run records the mapping."""
    from grouter.dispatch import dispatch
    from grouter.formats.grouter import GrouterConfig
    from grouter.formats.store import RoutingStore
    from grouter.network import Grouter
    from grouter.train import external_routing

    g = Grouter(GrouterConfig(vocab_size=tiny_data.vocab_size, n_experts=8, top_k=2, d_model=32, n_layers=1, n_heads=2,
                              d_ff=64, max_seq_len=tiny_data.seq_len, head_layers=[0, 2], source_layers=3))
    torch.nn.init.normal_(g.head.weight, std=0.5)
    g.save_pretrained(tmp_path / "g")
    dispatch(tmp_path / "store", grouter=tmp_path / "g", data=tiny_data)
    mcfg, tcfg = model_cfg(tiny_data, router="external", n_layers=3), train_cfg(steps=6, eval_every=6, checkpoint_every=6)
    stored, stored_id, _, _ = external_routing(tiny_data, routing_dir=tmp_path / "store")
    online, online_id, _, _ = external_routing(tiny_data, grouter_dir=tmp_path / "g", device="cpu")
    assert stored_id["head_layers"] == online_id["head_layers"] == [0, 2]

    def online_bf16(split, idx):
        r = online(split, idx)
        return Routing(r.ids, r.weights.to(torch.bfloat16).float(), heads=r.heads)

    a = train_run(tiny_data, tmp_path / "a", mcfg, tcfg, routing_source=stored, routing_identity=stored_id)
    train_run(tiny_data, tmp_path / "b", mcfg, tcfg, routing_source=online_bf16)
    loss = lambda run: [r["loss"] for r in read_metrics(tmp_path / run / "metrics.jsonl") if r["kind"] == "train"]
    assert loss("a") == loss("b")
    mapping = [0, 0, 1]  # depths 1/6, 1/2, 5/6 of the target; the heads' 1/6 and 5/6 (a tie goes to the shallower)
    assert a["layer_heads"] == mapping
    probe = np.load(tmp_path / "a" / "probes" / "step_00000006.npy")  # [layers, 8 val sequences, L, k]
    ids = RoutingStore.open(tmp_path / "store").routing("val", np.arange(8)).ids
    for layer, head in enumerate(mapping):
        assert np.array_equal(probe[layer], ids[:, :, head].numpy()), layer
    assert not np.array_equal(probe[0], probe[2])


def test_stablemoe_switches_at_ten_percent_and_its_routing_then_stays(tiny_data, tmp_path):
    from grouter.report import RunRecord

    train_run(tiny_data, tmp_path / "s", model_cfg(tiny_data, router="stablemoe"), train_cfg(eval_every=10))
    run = json.loads((tmp_path / "s" / "run.json").read_text())
    assert run["identity"]["model"]["stablemoe_stage1_steps"] == 4  # 10 % of 40 steps
    consistency = RunRecord.load(tmp_path / "s").probe_consistency()
    assert [step for step, _ in consistency] == [20, 30, 40] and all(v == 1.0 for _, v in consistency)
