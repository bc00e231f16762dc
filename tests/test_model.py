import pytest
import torch
import torch.nn.functional as F

from grouter.artifacts import read_json, write_json
from grouter.errors import GrouterError
from grouter.integrity import file_sha256
from grouter.losses import load_balancing_loss, z_loss
from grouter.model import Experts, MoEConfig, MoELM
from grouter.routers import ROUTER_KINDS, Routing, topk_gating

TINY = dict(vocab_size=100, d_model=32, n_layers=2, n_heads=4, d_expert=16, n_experts=8, top_k=2, max_seq_len=16)


def tiny_model(**kw) -> MoELM:
    return MoELM(MoEConfig(**{**TINY, **kw}))


def random_routing(b, l, k=2, e=8, seed=0) -> Routing:
    g = torch.Generator().manual_seed(seed)
    ids = torch.rand(b, l, e, generator=g).argsort(-1)[..., :k]
    return Routing(ids, torch.rand(b, l, k, generator=g).softmax(-1))


@pytest.mark.parametrize("router", [r for r in ROUTER_KINDS if r != "external"])
def test_every_router_runs_forward_and_backward(router):
    model = tiny_model(router=router, stablemoe_stage1_steps=1)
    x = torch.randint(0, 100, (3, 16))
    router_inputs = []
    for block in model.blocks:
        block.moe.router.register_forward_hook(lambda mod, args, _: router_inputs.append(args[0].detach()))
    out = model(x, labels=x)
    assert out.logits.shape == (3, 16, 100)
    assert torch.isfinite(out.loss)
    assert out.expert_counts.shape == (2, 8)
    assert out.expert_counts.sum(1).tolist() == [3 * 16 * 2] * 2
    # the auxiliary loss, recomputed from each layer's router input: only aux, zloss and stablemoe
    # (in its first stage: balance + distillation) have one
    expected = 0.0
    for block, h in zip(model.blocks, router_inputs):
        if router in ("aux", "zloss", "stablemoe"):
            logits = h.float() @ block.moe.router.gate.weight.detach().float().T
            ids = logits.topk(2, dim=-1).indices
            expected += model.cfg.aux_loss_coef * load_balancing_loss(logits, ids, 8).item()
            if router == "zloss":
                expected += model.cfg.z_loss_coef * z_loss(logits).item()
            if router == "stablemoe":
                r = block.moe.router
                distilled = r.head(r.embed(x.reshape(-1))).detach().float()
                expected += F.kl_div(distilled.log_softmax(-1), logits.log_softmax(-1), log_target=True,
                                     reduction="batchmean").item()
    assert len(router_inputs) == 2 and out.aux_loss.item() == pytest.approx(expected, rel=1e-5, abs=1e-12)
    assert out.loss.item() == pytest.approx(out.lm_loss.item() + out.aux_loss.item(), rel=1e-6)
    out.loss.backward()
    assert model.blocks[0].moe.experts.w_in.grad.abs().sum() > 0
    if router in ("aux", "zloss", "stablemoe"):
        assert model.blocks[0].moe.router.gate.weight.grad.abs().sum() > 0


def random_experts(tokens: int, n_experts: int, d_model: int, d_expert: int, k: int):
    """Experts with unit-normal weights, ``tokens`` random inputs and their top-k routing."""
    torch.manual_seed(0)
    experts = Experts(n_experts=n_experts, d_model=d_model, d_expert=d_expert)
    torch.nn.init.normal_(experts.w_in)
    torch.nn.init.normal_(experts.w_out)
    return experts, torch.randn(tokens, d_model), topk_gating(torch.randn(tokens, n_experts), k)


def test_grouped_experts_equal_per_token_reference():
    experts, x, routing = random_experts(20, n_experts=6, d_model=8, d_expert=5, k=3)
    y, counts = experts(x, routing)
    reference = torch.zeros_like(x)
    for t in range(20):
        for j in range(3):
            e = routing.ids[t, j]
            gate, up = (x[t] @ experts.w_in[e]).chunk(2)
            reference[t] += routing.weights[t, j] * ((F.silu(gate) * up) @ experts.w_out[e])
    torch.testing.assert_close(y, reference, rtol=1e-5, atol=1e-5)
    assert counts.tolist() == torch.bincount(routing.ids.flatten(), minlength=6).tolist()


def test_experts_backward_is_bitwise_repeatable_with_threads():
    """The same step twice gives the same gradients: the tokens' gather into expert order must not
    accumulate its backward with atomic adds across threads (CPU advanced indexing does), which made
    two identical runs drift apart from their first steps (docs/RESULTS.md)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        experts, x, routing = random_experts(2048, n_experts=16, d_model=64, d_expert=32, k=4)
        grads = []
        for _ in range(4):
            xi = x.clone().requires_grad_()
            experts(xi, routing)[0].square().sum().backward()
            grads.append(xi.grad)
        assert all(torch.equal(g, grads[0]) for g in grads[1:])
    finally:
        torch.set_num_threads(threads)


def test_model_is_causal():
    model = tiny_model(router="aux").eval()
    x = torch.randint(0, 100, (2, 16))
    y = x.clone()
    y[:, 9:] = torch.randint(0, 100, (2, 7))
    with torch.no_grad():
        a, b = model(x).logits, model(y).logits
    torch.testing.assert_close(a[:, :9], b[:, :9], rtol=0, atol=1e-6)
    assert not torch.allclose(a[:, 9:], b[:, 9:])


def test_external_routing_drives_the_experts_and_has_no_router():
    model = tiny_model(router="external")
    assert model.routers() == []
    assert not any("router" in n for n, _ in model.named_parameters())
    x = torch.randint(0, 100, (2, 16))
    r1, r2 = random_routing(2, 16, seed=1), random_routing(2, 16, seed=2)
    out1 = model(x, labels=x, routing=r1)
    assert not torch.allclose(out1.logits, model(x, routing=r2).logits)
    assert out1.expert_counts[0].tolist() == torch.bincount(r1.ids.flatten(), minlength=8).tolist()
    with pytest.raises(GrouterError, match="external routing"):
        model(x)


def test_per_layer_routing_drives_each_layer_by_its_head():
    """Per-layer routing: layer l of 4 takes the head of source layer 0 or 3 (of 4) nearest in depth."""
    from grouter.routers import Heads

    model = tiny_model(router="external", n_layers=4).eval()
    x = torch.randint(0, 100, (2, 16))
    r0, r1 = random_routing(2, 16, seed=1), random_routing(2, 16, seed=2)
    per_layer = Routing(torch.stack([r0.ids, r1.ids], 2), torch.stack([r0.weights, r1.weights], 2),
                        heads=Heads((0, 3), 4))
    mapping = [0, 0, 1, 1]  # target depths 1/8, 3/8, 5/8, 7/8; head depths 1/8, 7/8
    assert list(per_layer.heads.for_target(4)) == mapping
    with torch.no_grad():
        out = model(x, routing=per_layer)
        grouped = model(x, routing=per_layer.grouped(8))
        # reference: each block called with its head's routing by hand
        h = model.embed(x)
        for block, head in zip(model.blocks, mapping):
            h = block(h, model.rope_cos[:16], model.rope_sin[:16], x, (r0, r1)[head])[0]
        reference = model.lm_head(model.norm(h))
    for layer, head in enumerate(mapping):
        assert torch.equal(out.routing_ids[layer], (r0, r1)[head].ids)
        assert out.expert_counts[layer].tolist() == torch.bincount((r0, r1)[head].ids.flatten(), minlength=8).tolist()
    assert torch.equal(out.logits, reference) and torch.equal(grouped.logits, reference)
    assert not torch.allclose(out.logits, model(x, routing=r0).logits)


def test_shared_expert_adds_parameters():
    assert tiny_model(n_shared_experts=1).num_parameters() > tiny_model().num_parameters()
    m = tiny_model()
    assert m.num_parameters(active_only=True) < m.num_parameters()


@pytest.mark.parametrize("bad, message", [
    (dict(top_k=9), "top-k 9"),
    (dict(router="learned"), "unknown router"),
    (dict(n_heads=5), "heads"),
])
def test_bad_config_is_a_clear_error(bad, message):
    with pytest.raises(GrouterError, match=message):
        tiny_model(**bad)


def test_too_long_input_is_refused():
    with pytest.raises(GrouterError, match="max_seq_len"):
        tiny_model()(torch.zeros(1, 17, dtype=torch.long))


def test_save_and_load_round_trip(tmp_path):
    model = tiny_model(router="hash")
    model.set_token_counts(torch.arange(100).float().numpy())
    model.save_pretrained(tmp_path)
    loaded = MoELM.from_pretrained(tmp_path)
    x = torch.randint(0, 100, (2, 16))
    torch.testing.assert_close(model(x).logits, loaded(x).logits, rtol=0, atol=0)
    assert not list(tmp_path.glob("*.pt")) and not list(tmp_path.glob("*.bin"))


def test_truncated_or_missing_checkpoint_is_a_clear_error(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(GrouterError, match="does not match its checksum"):
        MoELM.from_pretrained(tmp_path)
    weights.unlink()
    with pytest.raises(GrouterError, match="missing"):
        MoELM.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(GrouterError, match="not valid JSON"):
        MoELM.from_pretrained(tmp_path)


def test_checkpoint_of_another_shape_is_refused(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    other = tmp_path / "other"
    tiny_model(n_experts=4).save_pretrained(other)
    (tmp_path / "model.safetensors").write_bytes((other / "model.safetensors").read_bytes())
    with pytest.raises(GrouterError, match="does not match its checksum"):
        MoELM.from_pretrained(tmp_path)
    config = read_json(tmp_path / "config.json", "config")  # even with a matching checksum: the shapes
    write_json(tmp_path / "config.json", {**config, "weights_sha256": file_sha256(tmp_path / "model.safetensors")})
    with pytest.raises(GrouterError, match="do not match its config"):
        MoELM.from_pretrained(tmp_path)


def test_precomputed_expert_grouping_gives_identical_results():
    """Routing grouped in the data loader (order + counts) == grouping inside every layer."""
    model = tiny_model(router="external")
    x = torch.randint(0, 100, (2, 16))
    r = random_routing(2, 16)
    plain = model(x, labels=x, routing=r)
    grouped = model(x, labels=x, routing=r.grouped(8))
    assert torch.equal(plain.logits, grouped.logits)
    assert torch.equal(plain.expert_counts, grouped.expert_counts)
