import numpy as np
import pytest
import torch

from grouter.errors import GrouterError
from grouter.losses import load_balancing_loss, z_loss
from grouter.routers import AuxFreeRouter, HashRouter, Routing, balanced_hash_table, expert_counts, topk_gating


def test_topk_softmax_equals_softmax_then_topk_renormalised():
    logits = torch.randn(5, 7, 16)
    r = topk_gating(logits, 4)
    probs = logits.softmax(-1)
    top, ids = probs.topk(4, dim=-1)
    assert torch.equal(r.ids, ids)
    torch.testing.assert_close(r.weights, top / top.sum(-1, keepdim=True))


def test_topk_sigmoid_and_scale():
    logits = torch.randn(10, 8)
    r = topk_gating(logits, 2, score="sigmoid", scale=2.5)
    s = logits.sigmoid().gather(-1, r.ids)
    torch.testing.assert_close(r.weights, 2.5 * s / s.sum(-1, keepdim=True))
    torch.testing.assert_close(r.weights.sum(-1), torch.full((10,), 2.5))


def test_topk_rejects_k_larger_than_experts():
    with pytest.raises(GrouterError, match="top-k of 9"):
        topk_gating(torch.randn(3, 8), 9)


def test_load_balancing_loss_is_one_at_perfect_balance_and_larger_when_skewed():
    n, e = 64, 8
    uniform = torch.zeros(n, e)
    balanced_ids = torch.arange(n).remainder(e).view(n, 1)
    assert load_balancing_loss(uniform, balanced_ids, e).item() == pytest.approx(1.0)
    skewed_logits = torch.zeros(n, e)
    skewed_logits[:, 0] = 5.0
    skewed_ids = torch.zeros(n, 1, dtype=torch.long)
    # every slot on expert 0 (f_0 = 1), which has softmax probability e^5 / (e^5 + 7): E * f_0 * P_0
    p0 = np.exp(5.0) / (np.exp(5.0) + e - 1)
    assert load_balancing_loss(skewed_logits, skewed_ids, e).item() == pytest.approx(e * p0)


def test_z_loss_grows_with_logit_scale():
    x = torch.randn(32, 8)
    assert z_loss(10 * x) > z_loss(x)


def test_expert_counts():
    ids = torch.tensor([[0, 1], [1, 3]])
    assert expert_counts(ids, 5).tolist() == [1, 2, 0, 1, 0]


def test_balanced_hash_table_is_distinct_and_balanced():
    rng = np.random.default_rng(0)
    freqs = rng.zipf(1.5, size=1000).astype(float)
    freqs[0] = 0
    table = balanced_hash_table(freqs, n_experts=16, k=2)
    assert table.shape == (1000, 2)
    assert (table[:, 0] != table[:, 1]).all()
    load = np.zeros(16)
    np.add.at(load, table.ravel(), np.repeat(freqs, 2))
    # greedy LPT: the spread is at most the largest single token's mass
    assert load.max() - load.min() <= freqs.max() + 1e-9


def test_hash_router_uses_table_and_learned_weights():
    r = HashRouter(d_model=8, n_experts=4, k=2, vocab_size=10)
    r.set_token_counts(np.arange(10, dtype=float))
    tokens = torch.tensor([3, 3, 7])
    routing, aux = r(torch.randn(3, 8), tokens)
    assert torch.equal(routing.ids, r.table[tokens])
    torch.testing.assert_close(routing.weights.sum(-1), torch.ones(3))
    assert aux.item() == 0.0


def test_auxfree_bias_sign_rule():
    r = AuxFreeRouter(d_model=4, n_experts=4, k=1, gamma=0.1)
    r.train()
    with torch.no_grad():
        r.gate.weight.zero_()
        r.gate.weight[0, 0] = 10.0  # everything goes to expert 0
    x = torch.zeros(6, 4)
    x[:, 0] = 1.0
    routing, _ = r(x, torch.zeros(6, dtype=torch.long))
    assert (routing.ids == 0).all()
    r.update_bias()
    assert r.bias.tolist() == pytest.approx([-0.1, 0.1, 0.1, 0.1])
    assert r.pending_counts.sum() == 0


def test_precomputed_grouping_keeps_counts_on_the_host():
    """The loader's per-expert counts stay on the CPU when the batch moves to the device, so the
    experts never read them back from the device (a sync per MoE layer on a GPU)."""
    ids = torch.tensor([[[0, 2], [2, 1]], [[1, 0], [3, 2]]])
    r = Routing(ids, torch.full(ids.shape, 0.5)).grouped(4).to("meta")
    assert r.ids.device.type == r.order.device.type == "meta"
    assert r.counts.device.type == "cpu" and r.counts.tolist() == [2, 2, 3, 1]


def test_stablemoe_learns_then_freezes_its_distilled_router():
    """Stage 1: the learned gate routes, trained by the balance loss, and the lightweight token-id
    router learns it by distillation. From the switch step on, the lightweight router alone routes,
    nothing of the router gets a gradient, and its weights no longer change."""
    from grouter.model import MoEConfig, MoELM
    from grouter.routers import StableMoERouter

    cfg = MoEConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, d_expert=16, n_experts=8, top_k=2,
                    max_seq_len=16, router="stablemoe", stablemoe_stage1_steps=3, stablemoe_dim=8)
    model = MoELM(cfg)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(1))
    router = model.blocks[0].moe.router
    assert isinstance(router, StableMoERouter) and not router.frozen
    for step in range(6):
        out = model(ids, labels=ids)
        opt.zero_grad()
        out.loss.backward()
        grads = {n: p.grad for n, p in router.named_parameters()}
        if step < 3:  # stage 1: the gate routes and every router part learns
            hidden = {}
            h = router.register_forward_pre_hook(lambda mod, args: hidden.update(x=args[0]))
            with torch.no_grad():
                routed = model(ids).routing_ids[0]
            h.remove()
            gate_ids = topk_gating(router.gate(hidden["x"]).float(), 2).ids.view(routed.shape)
            assert torch.equal(routed, gate_ids)
            assert all(g is not None and g.abs().sum() > 0 for g in grads.values()), step
            assert out.aux_loss > 0
        else:  # stage 2: the distilled router routes, frozen
            assert router.frozen and all(g is None for g in grads.values()), step
            distilled = topk_gating(router.head(router.embed(ids)), 2).ids
            with torch.no_grad():
                assert torch.equal(model(ids).routing_ids[0], distilled)
            assert float(out.aux_loss) == 0.0
            before = {n: p.detach().clone() for n, p in router.named_parameters()}
        opt.step()
        model.after_optimizer_step()
        if step >= 3:
            assert all(torch.equal(before[n], p) for n, p in router.named_parameters())
    assert int(router.steps) == 6


def test_stablemoe_needs_its_first_stage():
    from grouter.model import MoEConfig

    with pytest.raises(GrouterError, match="stablemoe_stage1_steps"):
        MoEConfig(router="stablemoe").validate()


def test_layer_heads_nearest_relative_depth_ties_to_the_shallower():
    from grouter.routers import layer_heads

    # heads from source layers 1, 2, 3 of 4; a 4-layer target: depths .125 .375 .625 .875
    assert layer_heads([1, 2, 3], 4, 4) == [0, 0, 1, 2]  # .375 is exactly head 0's depth
    assert layer_heads([0, 1, 2, 3], 4, 8) == [0, 0, 1, 1, 2, 2, 3, 3]
    assert layer_heads([0, 3], 4, 2) == [0, 1]
    assert layer_heads([0, 2], 4, 1) == [1]  # depth .5 is .375 from head 0 (.125) and .125 from head 1 (.625)
    assert layer_heads([0, 2], 4, 1) == [min(range(2), key=lambda h: abs(0.5 - ([0, 2][h] + 0.5) / 4))]
    assert layer_heads([1, 3], 4, 2) == [0, 1]
    assert layer_heads([0, 1], 2, 1) == [0]  # an exact tie (.25 each way): the shallower head
    with pytest.raises(GrouterError, match="at least one layer"):
        layer_heads([0, 1], 2, 0)


def test_heads_validate_and_map():
    from grouter.routers import Heads

    assert Heads.of([3], 4) is None and Heads.of([], 4) is None
    heads = Heads.of([1, 3], 4)
    assert (heads.layers, len(heads), heads.for_target(4)) == ((1, 3), 2, (0, 0, 0, 1))  # .625: a tie
    for bad in ([3, 1], [1, 1], [1, 4]):
        with pytest.raises(GrouterError, match="distinct source layers in increasing order"):
            Heads(tuple(bad), 4)


def test_per_layer_routing_groups_per_head_and_gives_each_layer_its_head():
    from grouter.routers import Heads

    heads = Heads((0, 5), 6)
    ids = torch.randint(0, 8, (2, 5, 2, 3))
    r = Routing(ids, torch.rand(2, 5, 2, 3), heads=heads).grouped(8)
    assert r.order.shape == (2, 30) and r.counts.shape == (2, 8)
    for layer, h in enumerate([0, 0, 1]):  # a 3-layer target: depths 1/6, 1/2, 5/6 -> heads 0, 0 (tie), 1
        one = r.for_layer(layer, 3)
        assert one.heads is None and torch.equal(one.ids, ids[:, :, h]) and torch.equal(one.weights, r.weights[:, :, h])
        plain = Routing(ids[:, :, h], r.weights[:, :, h]).grouped(8)
        assert torch.equal(one.order, plain.order) and torch.equal(one.counts, plain.counts)
    assert r.to("cpu").heads == heads
    single = Routing(ids[:, :, 0], r.weights[:, :, 0])
    assert single.for_layer(2, 3) is single


def test_head_groups_map_each_target_layer_to_its_groups_head():
    """Four captured layers of an 8-layer source in two groups: a target layer takes the head of the
    captured layer nearest in relative depth, whatever its depth."""
    from grouter.routers import Heads, even_groups, layer_heads

    heads = Heads((0, 2, 5, 7), 8, (0, 0, 1, 1))
    assert len(heads) == 2 and heads.of_layer == (0, 0, 1, 1) and heads.labels == ["layers0-2", "layers5-7"]
    for target in (1, 3, 8, 16):
        nearest = layer_heads([0, 2, 5, 7], 8, target)
        assert heads.for_target(target) == tuple((0, 0, 1, 1)[i] for i in nearest)
    assert heads.for_target(8) == (0, 0, 0, 0, 1, 1, 1, 1)
    assert Heads((0, 2, 5, 7), 8, (0, 1, 2, 3)) == Heads((0, 2, 5, 7), 8), "a group per layer is per-layer heads"
    assert Heads.of((0, 2, 5, 7), 8, (0, 0, 0, 0)) is None, "one group: one shared head"
    assert even_groups(5, 2) == (0, 0, 0, 1, 1) and even_groups(4, 4) == (0, 1, 2, 3) and even_groups(3, 1) == (0,) * 3
    for bad in [(0, 0, 2, 2), (1, 1, 2, 2), (0, 1, 0, 1), (0, 1)]:
        with pytest.raises(GrouterError, match="head groups"):
            Heads((0, 2, 5, 7), 8, bad)
    with pytest.raises(GrouterError, match="--head-groups 5"):
        even_groups(4, 5)
