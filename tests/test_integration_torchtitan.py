"""grouter.integrations.torchtitan on the CPU: torchtitan's own MoE, Qwen3 model, dataloader base,
context-parallel sharding and expert parallelism (gloo), driven by stored or online Grouter routing.

Tiny models throughout (dim 64, 2 layers, 8 experts top-2, SDPA attention: FlexAttention has no
backward on the CPU). One spawn of 2 gloo processes checks context-parallel sharding against
torchtitan's ``cp_shard`` and runs torchtitan's expert parallelism with the plan
(benchmarks/torchtitan_measure.py's worker). GPU-only paths (FlexAttention / varlen backward, the
Trainer with FSDP and NCCL, DeepEP dispatchers) are not exercised here.
"""

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchtitan.models.common.moe import TokenChoiceTopKRouter
from torchtitan.protocols.model_spec import ModelSpec

from grouter.device import spawn
from grouter.errors import GrouterError
from grouter.formats.dataset import PackedDataset
from grouter.formats.grouter import GrouterConfig
from grouter.formats.plan import Plan, relabel
from grouter.formats.store import RoutingStore
from grouter.integrations import torchtitan as gt
from grouter.integrations import torchtitan_measure
from grouter.network import Grouter
from grouter.routers import Heads, Routing
from grouter.testing import store_and_plan, synthetic_store


E, K, DIM, SEQ, VOCAB = 8, 2, 64, 32, 512


def tiny(n_experts=E, top_k=K):
    return gt.qwen3_moe_config(vocab_size=VOCAB, dim=DIM, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
                               moe_hidden_dim=DIM, n_experts=n_experts, top_k=top_k, max_seq_len=SEQ)


def convert(cfg, store_dir):
    return gt.GrouterRouterConverter.Config(routing=str(store_dir)).build().convert(cfg)


@pytest.fixture(scope="module")
def setup(tiny_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("torchtitan")
    store = store_and_plan(tiny_data, root / "store", root / "plan", E, K, ranks=2, global_batch=8)
    return SimpleNamespace(root=root, data=tiny_data, store=store, store_dir=root / "store", plan_dir=root / "plan")


def one_line_error(fn, match: str) -> None:
    with pytest.raises(GrouterError, match=match) as e:
        fn()
    assert "\n" not in str(e.value)


# -- the router and the MoE module -----------------------------------------------------------------
def test_converted_routers_have_no_parameters(setup):
    cfg = convert(tiny(), setup.store_dir)
    assert all(type(layer.moe.router) is gt.GrouterRouter.Config for layer in cfg.layers)
    model = cfg.build()
    routers = [layer.moe.router for layer in model.layers.values()]
    assert all(isinstance(r, gt.GrouterRouter) and isinstance(r, TokenChoiceTopKRouter) for r in routers)
    assert not [n for n, _ in model.named_parameters() if "router" in n]
    original = tiny().build()
    gates = sum(p.numel() for n, p in original.named_parameters() if "router.gate" in n)
    assert gates == 2 * E * DIM
    assert sum(p.numel() for p in original.parameters()) - gates == sum(p.numel() for p in model.parameters())


def manual_moe(moe, x: torch.Tensor, routing: Routing) -> torch.Tensor:
    """Per token, the sum over its k experts of weight * expert(x), from the module's own expert
    weights at the precision torchtitan's GroupedExperts computes in (bf16 inputs and weights)."""
    experts = moe.routed_experts.inner_experts
    w1, w2, w3 = (p.bfloat16().float() for p in (experts.w1_EFD, experts.w2_EDF, experts.w3_EFD))
    xb = x.bfloat16().float()
    out = torch.zeros_like(x)
    for j in range(routing.ids.shape[-1]):
        e = routing.ids[..., j]
        h = F.silu(torch.einsum("bld,blfd->blf", xb, w1[e])) * torch.einsum("bld,blfd->blf", xb, w3[e])
        out = out + routing.weights[..., j, None] * torch.einsum("blf,bldf->bld", h, w2[e])
    return out


def test_moe_output_and_input_gradient_equal_the_manual_computation(setup):
    moe = convert(tiny(), setup.store_dir).layers[0].moe.build()
    moe.init_states()
    handle = gt.attach(moe)  # the hook works on any module called with [B, L, ...] inputs
    routing = setup.store.routing("train", [5, 9])
    x = torch.randn(2, SEQ, DIM, requires_grad=True)
    grad_out = torch.randn(2, SEQ, DIM)
    out = moe(x, routing_ids=routing.ids, routing_weights=routing.weights)
    (gx,) = torch.autograd.grad(out, x, grad_out)
    x_ref = x.detach().requires_grad_()
    ref = manual_moe(moe, x_ref, routing)
    (gx_ref,) = torch.autograd.grad(ref, x_ref, grad_out)
    tol = 0.02 * ref.abs().max().item()  # bf16 rounding of the grouped matmuls' outputs
    assert (out - ref).abs().max().item() < tol
    assert (gx - gx_ref).abs().max().item() < 0.02 * gx_ref.abs().max().item()
    swapped = manual_moe(moe, x.detach(), Routing(routing.ids, routing.weights.flip(-1)))
    assert (out - swapped).abs().max().item() > 5 * tol  # the tolerance tells the weights apart
    weights, ids, scores = moe.router(x)
    assert torch.equal(ids, routing.ids) and not weights.requires_grad and not scores.requires_grad
    assert torch.equal(scores.gather(-1, ids), weights) and torch.allclose(scores.sum(-1), weights.sum(-1))
    assert not list(moe.router.parameters())
    assert torch.equal(moe.tokens_per_expert_E, torch.bincount(routing.ids.flatten(), minlength=E).float())
    handle.remove()


def test_online_grouter_routing_equals_the_same_routing_stored(setup, tmp_path):
    grouter = Grouter(GrouterConfig(vocab_size=VOCAB, n_experts=E, top_k=K, d_model=32, n_layers=1, n_heads=2,
                                    d_ff=64, max_seq_len=SEQ))
    grouter.save_pretrained(tmp_path / "g")
    cfg = gt.GrouterRouterConverter.Config(grouter=str(tmp_path / "g")).build().convert(tiny())
    model = torchtitan_measure.built(cfg)
    tokens = setup.data.split("train").batch([1, 2, 3])["input_ids"]
    online = gt.attach(model, grouter)
    logits = model(tokens)
    assert online.mode == "online"
    logits.float().pow(2).mean().backward()
    assert all(p.grad is None for p in grouter.parameters())
    assert model.layers["0"].moe.routed_experts.inner_experts.w1_EFD.grad is not None
    online.remove()
    stored = gt.attach(model)
    r = grouter.route(tokens, k=K)
    with torch.no_grad():
        again = model(tokens, routing_ids=r.ids, routing_weights=r.weights)
    assert torch.equal(logits.detach(), again)
    one_line_error(lambda: model(tokens), "no routing for this forward")
    stored.remove()


# -- the whole model and the dataloader -------------------------------------------------------------
def test_qwen3_moe_trains_with_stored_routing(setup):
    model = torchtitan_measure.built(convert(tiny(), setup.store_dir))
    gt.attach(model)
    loader = gt.GrouterDataLoader.Config(data=str(setup.data.path), routing=str(setup.store_dir), seed=1)
    loader = loader.build(dp_world_size=1, dp_rank=0, seq_len=SEQ, local_batch_size=8)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for step, (inputs, labels) in zip(range(12), loader):
        loss = gt.lm_loss(model, inputs, labels)
        if step == 0:  # every MoE layer was driven by exactly the batch's stored routing
            counts = torch.bincount(inputs[gt.ROUTING_IDS].flatten(), minlength=E).float()
            assert all(torch.equal(layer.moe.tokens_per_expert_E, counts) for layer in model.layers.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.mean(losses[-3:]) < losses[0] - 0.3, losses


def expected_indices(setup, plan, rank: int, world: int, batch: int, n: int, seed: int) -> list[np.ndarray]:
    """The sequences rank ``rank`` must train in its first ``n`` local batches."""
    if plan is not None:  # each global batch cut into local batches, a remainder dropped
        order = [g[a:a + batch] for g in plan.samples[rank] for a in range(0, len(g) - batch + 1, batch)]
        return order[:n]
    split = setup.data.split("train")
    return [split.batch_indices(i, batch * world, seed)[rank * batch:(rank + 1) * batch] for i in range(n)]


@pytest.mark.parametrize("with_plan", [True, False], ids=["plan", "shuffle"])
def test_served_routing_is_the_stores_for_exactly_those_sequences(setup, with_plan):
    plan = Plan.load(setup.plan_dir) if with_plan else None
    split = setup.data.split("train")
    cfg = gt.GrouterDataLoader.Config(data=str(setup.data.path), routing=str(setup.store_dir), seed=3,
                                      plan=str(setup.plan_dir) if with_plan else "")
    for rank in range(2):
        loader = cfg.build(dp_world_size=2, dp_rank=rank, seq_len=SEQ, local_batch_size=2)
        want = expected_indices(setup, plan, rank, 2, 2, 6, seed=3)
        it = iter(loader)
        for i, idx in enumerate(want):
            if i == 3:  # resume from a checkpoint of the loader's state
                state = loader.state_dict()
                loader = cfg.build(dp_world_size=2, dp_rank=rank, seq_len=SEQ, local_batch_size=2)
                loader.load_state_dict(state)
                it = iter(loader)
            inputs, labels = next(it)
            batch, stored = split.batch(idx), setup.store.routing("train", idx)
            ids = relabel(stored.ids, plan.permutation) if with_plan else stored.ids
            assert torch.equal(inputs["input"], batch["input_ids"]) and torch.equal(labels, batch["labels"])
            assert torch.equal(inputs[gt.ROUTING_IDS], ids) and torch.equal(inputs[gt.ROUTING_WEIGHTS], stored.weights)
            assert torch.equal(inputs["positions"], torch.arange(SEQ).repeat(2, 1))


# -- refusals -------------------------------------------------------------------------------------
def _set(cfg, **router_fields):
    for layer in cfg.layers:
        for name, value in router_fields.items():
            target = layer.moe if name == "load_balance_coeff" else layer.moe.router
            setattr(target, name, value)
    return cfg


@pytest.mark.parametrize("make, match", [
    (lambda: tiny(n_experts=16), r"16 experts.*has 8 experts, k=2"),
    (lambda: tiny(top_k=4), r"top_k \[4\].*k=2"),
    (lambda: _set(tiny(), load_balance_coeff=1e-3), "expert-bias load balancing is on"),
    (lambda: _set(tiny(), route_norm=True), "route_norm would change"),
    (lambda: _set(tiny(), route_scale=2.5), "route_scale would change"),
    (lambda: _set(tiny(), num_expert_groups=2, num_limited_groups=1), "group-limited routing"),
], ids=["experts", "top_k", "expert_bias", "route_norm", "route_scale", "groups"])
def test_a_model_config_that_disagrees_with_the_store_is_refused(setup, make, match):
    one_line_error(lambda: convert(make(), setup.store_dir), match)


def test_other_refusals(setup):
    from torchtitan.models.qwen3 import model_registry, qwen3_configs

    one_line_error(lambda: convert(qwen3_configs["debugmodel"]("flex"), setup.store_dir), "no MoE layer")
    one_line_error(lambda: model_registry("debugmodel_moe", converters=[
        gt.GrouterRouterConverter.Config(routing=str(setup.store_dir))]), "64 experts")  # torchtitan runs it
    one_line_error(lambda: gt.GrouterRouterConverter.Config().build(), "exactly one of routing=")
    cfg = convert(tiny(), setup.store_dir)
    cfg.layers[0].moe.router._debug_force_load_balance = True  # as Decoder.update_from_config may set it
    one_line_error(cfg.build, "forced load balancing")
    data = dict(data=str(setup.data.path), routing=str(setup.store_dir))
    def build(c, **kw):
        return c.build(**{"dp_world_size": 1, "dp_rank": 0, "seq_len": SEQ, "local_batch_size": 4, **kw})

    one_line_error(lambda: build(gt.GrouterDataLoader.Config(**data), seq_len=64), "training.seq_len=32")
    planned = gt.GrouterDataLoader.Config(**data, plan=str(setup.plan_dir))
    one_line_error(lambda: build(planned), "plan is for 2 data-parallel ranks")
    one_line_error(lambda: build(planned, dp_world_size=2, local_batch_size=3), "does not divide")
    online = gt.GrouterDataLoader.Config(data=str(setup.data.path), plan=str(setup.plan_dir))
    one_line_error(lambda: build(online, dp_world_size=2), "a plan needs stored routing")


def test_bad_routing_at_forward_is_refused(setup):
    model = torchtitan_measure.built(convert(tiny(), setup.store_dir))
    handle = gt.attach(model)
    tokens = setup.data.split("train").batch([0, 1])["input_ids"]
    r = setup.store.routing("train", [0, 1])
    handle.set(r)  # custom loops may set the routing instead of passing it
    assert torch.equal(model(tokens), model(tokens, routing_ids=r.ids, routing_weights=r.weights))
    call = lambda ids, w: lambda: model(tokens, routing_ids=ids, routing_weights=w)  # noqa: E731
    one_line_error(call(r.ids[..., :1], r.weights[..., :1]), r"\[batch, seq, k=2\]")
    one_line_error(call(r.ids + E, r.weights), r"in \[0, 8\)")
    one_line_error(call(r.ids[..., [0, 0]], r.weights), "same expert twice")
    one_line_error(call(r.ids[:1], r.weights[:1]), "covers")
    one_line_error(lambda: gt.attach(model), "already attached")


def test_model_spec_attaches_after_parallelize_and_refuses_tp(setup):
    spec = ModelSpec(name="qwen3", flavor="tiny", model=tiny(), parallelize_fn=lambda model, **kw: model,
                     pipelining_fn=None, post_optimizer_build_fn=None, state_dict_adapter=None)
    spec = gt.grouter_model_spec(spec, routing=str(setup.store_dir))
    dims = SimpleNamespace(pp_enabled=False, tp_enabled=False)
    model = spec.parallelize_fn(spec.model.build(), parallel_dims=dims, training=None)
    assert all(layer.moe.router.routing is not None for layer in model.layers.values())
    one_line_error(lambda: spec.parallelize_fn(model, parallel_dims=SimpleNamespace(pp_enabled=False, tp_enabled=True)),
                   "tensor parallelism is not supported")


# -- context and expert parallelism: 2 gloo processes ---------------------------------------------
def two_ranks(rank: int, world: int, run: dict) -> None:
    """CP: our sharding of routing vs torchtitan's of the same tensors; EP: torchtitan_measure.run_ep."""
    from torch.distributed.device_mesh import DeviceMesh
    from torch.nn.attention.flex_attention import create_block_mask
    from torchtitan.distributed.context_parallel.api import cp_shard, prepare_context_parallel_input

    mesh = DeviceMesh("cpu", list(range(world)), mesh_dim_names=("cp",))
    B, L = 2, 256  # PTRR shards the mask in blocks of 128 per rank
    ids = torch.stack([torch.randperm(E, generator=torch.Generator().manual_seed(i))[:K] for i in range(B * L)])
    routing = Routing(ids.view(B, L, K), torch.rand(B, L, K, generator=torch.Generator().manual_seed(1)))
    tokens, positions = torch.randint(0, VOCAB, (B, L), generator=torch.Generator().manual_seed(2)), \
        torch.arange(L).repeat(B, 1)
    out = {}
    for balancer in ("headtail", None, "ptrr"):
        masks = create_block_mask(lambda b, h, q, kv: q >= kv, B, None, L, L, device="cpu") if balancer else None
        kw = {"positions": positions.clone(), **({"attention_masks": masks} if masks is not None else {})}
        _, _, sharded = prepare_context_parallel_input(tokens, tokens, kw, mesh, torch.device("cpu"), balancer)
        ours = gt.shard_like_tokens(routing, sharded["positions"])
        (t_ids, t_w), _ = cp_shard(mesh, (routing.ids, routing.weights), masks, balancer)
        out[str(balancer)] = torch.equal(ours.ids, t_ids) and torch.equal(ours.weights, t_w)
    out["model"] = model_follows_cp_shard(mesh, run)
    Path(run["out"]).mkdir(parents=True, exist_ok=True)
    (Path(run["out"]) / f"cp{rank}.json").write_text(json.dumps(out))
    torchtitan_measure.run_ep(rank, world, run)


def model_follows_cp_shard(mesh, run: dict) -> bool:
    """A forward on head-tail-sharded tokens and positions uses the routing of exactly those tokens."""
    from torchtitan.distributed.context_parallel.api import cp_shard, prepare_context_parallel_input

    store = RoutingStore.open(run["routing"], verify=False)
    model = torchtitan_measure.built(convert(tiny(), run["routing"]))
    handle = gt.attach(model)
    split = PackedDataset.open(run["data"]).split("train")
    inputs, _ = gt.RoutedSequences(split, store, None)[np.array([3, 4])]
    tokens, _, kw = prepare_context_parallel_input(inputs["input"], inputs["input"], {"positions": inputs["positions"]},
                                                   mesh, torch.device("cpu"), "headtail")
    with torch.no_grad():
        model(tokens, positions=kw["positions"], routing_ids=inputs[gt.ROUTING_IDS],
              routing_weights=inputs[gt.ROUTING_WEIGHTS])
    weights, ids = handle.current(torch.empty(*tokens.shape, DIM))  # the routing a [B, L', D] MoE input gets
    (want_ids, want_w), _ = cp_shard(mesh, (inputs[gt.ROUTING_IDS], inputs[gt.ROUTING_WEIGHTS]), None, "headtail")
    counts = torch.bincount(want_ids.flatten(), minlength=store.n_experts).float()
    return (torch.equal(ids, want_ids) and torch.equal(weights, want_w)
            and torch.equal(model.layers["0"].moe.tokens_per_expert_E, counts))


@pytest.fixture(scope="module")
def ranks2(setup):
    run = dict(data=str(setup.data.path), routing=str(setup.store_dir), plan=str(setup.plan_dir), steps=2, batch=4,
               dim=DIM, layers=2, out=str(setup.root / "ranks2"), reference=True)
    spawn(2, two_ranks, (run,))
    return Path(run["out"])


@pytest.mark.slow
def test_context_parallel_routing_is_sharded_like_torchtitan_shards_the_tokens(ranks2):
    for rank in range(2):
        assert json.loads((ranks2 / f"cp{rank}.json").read_text()) == {"headtail": True, "None": True, "ptrr": True,
                                                                       "model": True}


@pytest.mark.slow
def test_torchtitan_expert_parallelism_sends_what_the_planner_predicts(ranks2, setup):
    plan = Plan.load(setup.plan_dir)
    counted = torchtitan_measure.measured_and_predicted(ranks2, setup.store, plan, 2)
    assert counted["exact"] and counted["rows"] > 0 and counted["row_bytes"] == DIM * 4
    for rank in range(2):
        for rec in json.loads((ranks2 / f"rank{rank}.json").read_text()):
            assert rec["loss"] == pytest.approx(rec["reference_loss"], rel=1e-5)  # EP == one process


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU in this session: FlexAttention backward, "
                    "NCCL expert parallelism and torchtitan's Trainer need CUDA")
def test_flex_attention_model_trains_on_gpu(setup):
    cfg = gt.qwen3_moe_config(vocab_size=VOCAB, dim=DIM, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
                              moe_hidden_dim=DIM, n_experts=E, top_k=K, max_seq_len=SEQ, attention="flex")
    model = torchtitan_measure.built(convert(cfg, setup.store_dir)).cuda()
    gt.attach(model)
    loader = gt.GrouterDataLoader.Config(data=str(setup.data.path), routing=str(setup.store_dir)).build(
        dp_world_size=1, dp_rank=0, seq_len=SEQ, local_batch_size=8)
    inputs, labels = next(iter(loader))
    inputs = {k: v.cuda() for k, v in inputs.items()}
    inputs["attention_masks"] = model.get_attention_masks(positions=inputs["positions"])
    gt.lm_loss(model, inputs, labels.cuda()).backward()


def test_per_layer_routing_drives_each_layer_by_its_head(setup, tmp_path):
    """A per-layer store (2 heads, from source layers 0 and 1 of 2): decoder layer i's MoE takes head i
    (relative depth), its output is the manual computation with that head's routing, the dataloader
    serves [B, L, H, k], and a Grouter with per-layer heads routes online the same."""
    heads = Heads((0, 1), 2)
    synthetic_store(setup.data, tmp_path / "heads", E, K, 4, heads=heads)
    store = RoutingStore.open(tmp_path / "heads", data=setup.data)
    model = torchtitan_measure.built(convert(tiny(), tmp_path / "heads"))
    handle = gt.attach(model, heads=store.heads)
    seen = {}
    for i, layer in model.layers.items():
        layer.moe.register_forward_hook(lambda m, args, out, i=i: seen.__setitem__(i, (args[0].detach(), out)))
    r = store.routing("train", [1, 2, 3])
    assert not torch.equal(r.ids[:, :, 0], r.ids[:, :, 1])  # the heads differ, so the test can tell them apart
    tokens = setup.data.split("train").batch([1, 2, 3])["input_ids"]
    with torch.no_grad():
        model(tokens, routing_ids=r.ids, routing_weights=r.weights)
    for i, h in zip(model.layers, heads.for_target(2)):
        x, out = seen[i]
        ref = manual_moe(model.layers[i].moe, x, Routing(r.ids[:, :, h], r.weights[:, :, h]))
        assert (out - ref).abs().max().item() < 0.02 * ref.abs().max().item(), f"layer {i}, head {h}"
    one_line_error(lambda: model(tokens, routing_ids=r.ids[:, :, 0], routing_weights=r.weights[:, :, 0]),
                   r"must both be \[batch, seq, H=2, k=2\].*heads of the store")
    handle.remove()

    loader = gt.GrouterDataLoader.Config(data=str(setup.data.path), routing=str(tmp_path / "heads")).build(
        dp_world_size=1, dp_rank=0, seq_len=SEQ, local_batch_size=4)
    inputs, _ = next(iter(loader))
    assert inputs["routing_ids"].shape == (4, SEQ, 2, K)
    cp = gt.shard_like_tokens(Routing(r.ids, r.weights, heads=heads), torch.tensor([[3, 0, 7]]).expand(3, -1))
    assert torch.equal(cp.ids, r.ids[:, [3, 0, 7]]) and torch.equal(cp.weights, r.weights[:, [3, 0, 7]])

    g = Grouter(GrouterConfig(vocab_size=VOCAB, n_experts=E, top_k=K, d_model=32, n_layers=1, n_heads=2, d_ff=64,
                              max_seq_len=SEQ, head_layers=[0, 1], source_layers=2))
    g.save_pretrained(tmp_path / "g")
    online_model = torchtitan_measure.built(gt.GrouterRouterConverter.Config(grouter=str(tmp_path / "g")).build()
                                          .convert(tiny()))  # the same weights as model's (seed 0)
    online = gt.attach(online_model, g)
    routed = g.route(tokens, k=K)
    assert routed.ids.shape == (3, SEQ, 2, K)
    stored = gt.attach(model, heads=heads)
    with torch.no_grad():
        assert torch.equal(online_model(tokens), model(tokens, routing_ids=routed.ids, routing_weights=routed.weights))
    online.remove()
    stored.remove()
    one_line_error(lambda: gt.attach(model.layers["0"].moe, heads=heads), "not inside model.layers")


# -- torchtitan main's router contract: folded batches, router input [T, D] (pytorch/torchtitan#4121) --------
class FoldedChunk(torch.nn.Module):
    """Called as torchtitan main calls a decoder, ``chunk(tokens [T], positions=[T], **batch keys)``, with
    two MoE routers fed ``[T, D]`` as main's ``MoE.forward`` feeds them (its layers cannot be imported here:
    CI has torchtitan 0.3.0 alone)."""

    def __init__(self, n_layers: int = 2):
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, DIM)
        router = gt.GrouterRouter.Config(num_experts=E, top_k=K, gate=tiny().layers[0].moe.router.gate)
        self.layers = torch.nn.ModuleDict({str(i): torch.nn.ModuleDict({"router": router.build()})
                                           for i in range(n_layers)})

    def forward(self, tokens, positions=None):
        x_TD = self.embed(tokens)
        assert x_TD.ndim == 2
        return [layer["router"](x_TD) for layer in self.layers.values()]


def test_router_serves_both_contracts(setup):
    """0.3.0 passes the router [B, L, D] and reads [B, L, K]; main passes [T, D] and reads [T, K]: the same
    routing either way, whether the batch brings it as [B, L, k] or folded as [T, k]."""
    r = setup.store.routing("train", [4, 7, 9])
    tokens = setup.data.split("train").batch([4, 7, 9])["input_ids"]
    B, L = tokens.shape
    router = convert(tiny(), setup.store_dir).layers[0].moe.router.build()
    handle = gt.GrouterRouting(E, K)
    router.routing = handle
    handle._active = handle._checked(r)
    w, ids, scores = router(torch.randn(B, L, DIM))  # 0.3.0's contract
    assert torch.equal(ids, r.ids) and torch.equal(w, r.weights) and scores.shape == (B, L, E)
    w, ids, scores = router(torch.randn(B * L, DIM))  # main's, from [B, L] routing
    assert torch.equal(ids, r.ids.flatten(0, 1)) and torch.equal(w, r.weights.flatten(0, 1))
    assert scores.shape == (B * L, E) and torch.equal(scores.gather(-1, ids), w)
    # main's MoE counts tokens per expert from the [T, E] routing map it scatters from ids
    counts = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, ids, True).sum(dim=0)
    assert torch.equal(counts, torch.bincount(r.ids.flatten(), minlength=E))

    chunk = FoldedChunk()
    gt.attach(chunk)
    folded = dict(positions=torch.arange(L).repeat(B), routing_ids=r.ids.flatten(0, 1),
                  routing_weights=r.weights.flatten(0, 1))
    for w, ids, _ in chunk(tokens.flatten(), **folded):  # a folded batch: tokens, positions [T], routing [T, k]
        assert torch.equal(ids, r.ids.flatten(0, 1)) and torch.equal(w, r.weights.flatten(0, 1))
    for w, ids, _ in chunk(tokens.flatten(), routing_ids=r.ids, routing_weights=r.weights):  # [B, L, k] too
        assert torch.equal(ids, r.ids.flatten(0, 1))
    one_line_error(lambda: chunk(tokens.flatten()[:40], **folded), r"routing covers 96 tokens.*holds 40; context par")
    one_line_error(lambda: chunk(tokens.flatten(), routing_ids=r.ids[:1].flatten(0, 1),
                                 routing_weights=r.weights[:1].flatten(0, 1)), r"covers 32 tokens.*holds 96; pass the routing")
    one_line_error(lambda: chunk(tokens.flatten(), routing_ids=r.ids[..., :1].flatten(0, 1),
                                 routing_weights=r.weights[..., :1].flatten(0, 1)), r"\[tokens, k=2\]")


def test_folded_batches_per_layer_and_online(setup, tmp_path):
    """Main's contract with per-layer heads ([T, H, k]: layer i takes its head) and with online routing
    (the Grouter routes the folded tokens sequence by sequence, found from where positions restart)."""
    heads = Heads((0, 1), 2)
    synthetic_store(setup.data, tmp_path / "heads", E, K, 4, heads=heads)
    r = RoutingStore.open(tmp_path / "heads", data=setup.data).routing("train", [1, 2])
    tokens = setup.data.split("train").batch([1, 2])["input_ids"]
    chunk = FoldedChunk()
    handle = gt.attach(chunk, heads=heads)
    positions = torch.arange(SEQ).repeat(2)
    out = chunk(tokens.flatten(), positions=positions, routing_ids=r.ids.flatten(0, 1),
                routing_weights=r.weights.flatten(0, 1))
    for (w, ids, _), h in zip(out, heads.for_target(2)):
        assert torch.equal(ids, r.ids[:, :, h].flatten(0, 1)) and torch.equal(w, r.weights[:, :, h].flatten(0, 1))
    handle.remove()

    g = Grouter(GrouterConfig(vocab_size=VOCAB, n_experts=E, top_k=K, d_model=32, n_layers=1, n_heads=2, d_ff=64,
                              max_seq_len=SEQ))
    online = gt.attach(chunk, g)
    routed = g.route(tokens, k=K)
    for w, ids, _ in chunk(tokens.flatten(), positions=positions):
        assert torch.equal(ids, routed.ids.flatten(0, 1)) and torch.equal(w, routed.weights.flatten(0, 1))
    one_line_error(lambda: chunk(tokens.flatten()), "positions that restart at 0")
    one_line_error(lambda: chunk(tokens.flatten()[:50], positions=positions[:50]), "positions that restart at 0")
    online.remove()


def test_activation_checkpoint_recompute_takes_its_own_forwards_routing(setup):
    """Two forwards, then their backwards (a pipeline stage's order under 1F1B): with torchtitan's full
    activation checkpointing each backward's recompute runs with its own forward's routing, so the
    gradients equal those of each micro-batch alone without checkpointing."""
    from torchtitan.distributed.activation_checkpoint import FullAC

    cfg = convert(tiny(), setup.store_dir)
    plain, checkpointed = torchtitan_measure.built(cfg), torchtitan_measure.built(cfg)  # the same weights
    FullAC(FullAC.Config()).apply(checkpointed)
    gt.attach(plain)
    handle = gt.attach(checkpointed)
    loader = gt.GrouterDataLoader.Config(data=str(setup.data.path), routing=str(setup.store_dir), seed=2).build(
        dp_world_size=1, dp_rank=0, seq_len=SEQ, local_batch_size=2)
    mbs = [b for b, _ in zip(loader, range(2))]
    assert not torch.equal(mbs[0][0][gt.ROUTING_IDS], mbs[1][0][gt.ROUTING_IDS])
    losses = [gt.lm_loss(checkpointed, inputs, labels) for inputs, labels in mbs]  # forward 0, forward 1
    for (inputs, labels), loss in zip(mbs, losses):  # backward 0 (recomputing 0 after forward 1), backward 1
        loss.backward()
        got = {n.replace("._checkpoint_wrapped_module", ""): p.grad.clone() for n, p in checkpointed.named_parameters()}
        gt.lm_loss(plain, inputs, labels).backward()
        for n, p in plain.named_parameters():
            assert torch.allclose(got[n], p.grad, rtol=1e-4, atol=1e-6), n
        checkpointed.zero_grad()
        plain.zero_grad()
    handle.remove()
    assert not handle._hooks and all(r.block_routing is None for r in handle.routers)


def test_a_pipeline_stage_takes_the_heads_of_its_layers_depth_in_the_whole_model(setup):
    """A stage holding decoder layer 1 of 2 (torchtitan's split keeps the layer's name) takes the head of
    depth 1 of 2, not of its own single layer; grouter_model_spec passes the whole model's layer count."""
    heads = Heads((0, 1), 2)
    stage = torchtitan_measure.built(convert(tiny(), setup.store_dir))
    del stage.layers["0"]  # what pipeline_llm's split leaves on the second stage
    handle = gt.attach(stage, heads=heads, n_layers=2)
    assert [r.head for r in handle.routers] == [heads.for_target(2)[1]] == [1]
    handle.remove()
