"""grouter.integrations.hf: HF MoE causal LMs trained with stored or online Grouter routing.

Tiny models built from configs (hidden 32, 2 layers, 8 experts, k=2, vocabulary 128); no hub.
"""

import warnings

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from grouter.dispatch import dispatch
from grouter.errors import GrouterError
from grouter.formats.grouter import GrouterConfig
from grouter.formats.store import RoutingStore
from grouter.integrations.hf import (
    GrouterGate,
    GrouterRoutedModel,
    get_grouter_routing,
    routing_collator,
    use_grouter_routing,
)
from grouter.network import Grouter
from grouter.routers import Routing

ARCHS = ["qwen2_moe", "qwen3_moe", "olmoe", "mixtral"]
V, E, K, H = 128, 8, 2, 32

_EXTRA = {
    "qwen2_moe": dict(num_experts=E, moe_intermediate_size=16, shared_expert_intermediate_size=24),
    "qwen3_moe": dict(num_experts=E, moe_intermediate_size=16, head_dim=8),
    "olmoe": dict(num_experts=E),
    "mixtral": dict(num_local_experts=E),
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine spinning OpenMP
    threads made these tests 10x slower; restored afterwards for the other test modules."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_model(model_type: str, seed: int = 0, **overrides):
    kwargs = dict(hidden_size=H, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=V,
                  intermediate_size=64, num_experts_per_tok=K, max_position_embeddings=64, initializer_range=0.1,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
    cfg = AutoConfig.for_model(model_type, **{**kwargs, **_EXTRA[model_type], **overrides})
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg)


def tiny_grouter(n_experts: int = E, seed: int = 0, vocab: int = V, top_k: int = K) -> Grouter:
    g = Grouter(GrouterConfig(vocab_size=vocab, n_experts=n_experts, top_k=top_k, d_model=32, n_layers=1,
                              n_heads=2, d_ff=64, max_seq_len=64, seed=seed))
    with torch.no_grad():  # spread the logits so routes differ between tokens
        g.head.weight.mul_(50)
    return g.eval()


def random_routing(b: int, l: int, k: int = K, seed: int = 0, n_experts: int = E) -> Routing:
    """Distinct expert ids per token; weights in (0.1, 1.6), rows not normalised."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(n_experts, generator=gen)[:k] for _ in range(b * l)]).reshape(b, l, k)
    weights = 0.1 + 1.5 * torch.rand(b, l, k, generator=gen)
    return Routing(ids, weights)


def tokens(b: int = 2, l: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, V, (b, l), generator=torch.Generator().manual_seed(seed))


def moe_blocks(model):
    return [m for m in model.modules() if isinstance(getattr(m, "gate", None), GrouterGate)]


def manual_moe(block, x: torch.Tensor, routing: Routing, model_type: str) -> torch.Tensor:
    """sum_j w_j * expert_{id_j}(x) (+ the gated shared expert for qwen2_moe), from the block's weights."""
    xf = x.reshape(-1, x.shape[-1])
    ids, w = routing.ids.reshape(-1, routing.ids.shape[-1]), routing.weights.reshape(-1, routing.ids.shape[-1])
    ex = block.experts
    gate_up = torch.einsum("th,tkih->tki", xf, ex.gate_up_proj[ids])
    g, u = gate_up.chunk(2, dim=-1)
    y = torch.einsum("tki,tkhi->tkh", ex.act_fn(g) * u, ex.down_proj[ids])
    out = (w[..., None] * y).sum(dim=1)
    if model_type == "qwen2_moe":
        out = out + torch.sigmoid(block.shared_expert_gate(xf)) * block.shared_expert(xf)
    return out.reshape(x.shape)


# --------------------------------------------------------------------------------------------
# equivalence
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", ARCHS)
def test_moe_layers_compute_the_routed_mixture(model_type):
    model = tiny_model(model_type).eval()
    handle = use_grouter_routing(model)
    assert handle.mode == "stored" and handle.k == K and handle.n_experts == E
    blocks = moe_blocks(model)
    assert len(blocks) == 2 and len(handle.moe_layers) == 2
    seen = []
    hooks = [b.register_forward_hook(lambda m, a, out: seen.append((m, a[0].detach(), out.detach()))) for b in blocks]
    x, r = tokens(), random_routing(2, 12)
    with torch.no_grad(), handle.routing(r):
        logits = model(input_ids=x).logits
    for h in hooks:
        h.remove()
    assert len(seen) == 2
    for block, inp, out in seen:
        torch.testing.assert_close(out, manual_moe(block, inp, r, model_type), rtol=1e-5, atol=1e-6)

    # another routing of the same tokens gives other logits; the same routing the same logits
    with torch.no_grad():
        handle.set(random_routing(2, 12, seed=1))
        other = model(input_ids=x).logits
        handle.set(r)
        again = model(input_ids=x).logits
    assert (other - logits).abs().max() > 1e-3
    torch.testing.assert_close(again, logits, rtol=0, atol=0)


def test_k_other_than_the_models():
    model = tiny_model("mixtral").eval()
    handle = use_grouter_routing(model, k=3)
    block = moe_blocks(model)[0]
    seen = []
    block.register_forward_hook(lambda m, a, out: seen.append((a[0].detach(), out.detach())))
    x, r = tokens(), random_routing(2, 12, k=3)
    with torch.no_grad():
        handle.set(r)
        model(input_ids=x)
    torch.testing.assert_close(seen[0][1], manual_moe(block, seen[0][0], r, "mixtral"), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("model_type", ARCHS)
def test_online_equals_stored(model_type):
    g = tiny_grouter()
    x = tokens(3, 10)
    routing = g.route(x)
    assert len(set(routing.ids[..., 0].reshape(-1).tolist())) > 1  # a routing, not a constant

    online = tiny_model(model_type).eval()
    stored = tiny_model(model_type).eval()
    h_online = use_grouter_routing(online, g)
    h_stored = use_grouter_routing(stored)
    assert h_online.mode == "online" and h_online.k == g.cfg.top_k
    assert not any(p.requires_grad for p in g.parameters()) and not g.training
    with torch.no_grad():
        a = online(input_ids=x).logits
        b = online(input_ids=x).logits  # online needs nothing set, forward after forward
        h_stored.set(routing)
        c = stored(input_ids=x).logits
    torch.testing.assert_close(a, c, rtol=0, atol=0)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(GrouterError, match="routes online"):
        h_online.set(routing)
    # the Grouter is not part of the model: not saved, not optimised
    assert not any(k.startswith("grouter") or ".embed.weight" in k for k in online.state_dict())


def per_layer_routing(b: int, l: int, heads) -> Routing:
    parts = [random_routing(b, l, seed=h) for h in range(len(heads))]
    return Routing(torch.stack([r.ids for r in parts], 2), torch.stack([r.weights for r in parts], 2), heads=heads)


@pytest.mark.parametrize("model_type", ARCHS)
def test_per_layer_routing_drives_each_layer_by_its_head(model_type):
    """4 decoder layers, heads of source layers 0 and 3 of 4: layers 0, 1 take head 0, layers 2, 3 head 1;
    each MoE layer computes the mixture of its own head's routing (stored, and wrapped for Trainer)."""
    from grouter.routers import Heads

    heads = Heads((0, 3), 4)
    model = tiny_model(model_type, num_hidden_layers=4).eval()
    handle = use_grouter_routing(model)
    blocks = moe_blocks(model)
    assert [b.gate.layer_index for b in blocks] == [0, 1, 2, 3]
    seen = []
    hooks = [b.register_forward_hook(lambda m, a, out: seen.append((m, a[0].detach(), out.detach()))) for b in blocks]
    x, r = tokens(), per_layer_routing(2, 12, heads)
    with torch.no_grad(), handle.routing(r):
        logits = model(input_ids=x).logits
    for h in hooks:
        h.remove()
    for (block, inp, out), head in zip(seen, [0, 0, 1, 1]):
        own = Routing(r.ids[:, :, head], r.weights[:, :, head])
        torch.testing.assert_close(out, manual_moe(block, inp, own, model_type), rtol=1e-5, atol=1e-6)
    wrapped = GrouterRoutedModel(tiny_model(model_type, num_hidden_layers=4).eval(), heads=heads)
    assert wrapped.config.grouter_routing["layer_heads"] == [0, 0, 1, 1]
    with torch.no_grad():
        torch.testing.assert_close(wrapped(input_ids=x, routing_ids=r.ids, routing_weights=r.weights).logits, logits,
                                   rtol=0, atol=0)
    handle.set(Routing(r.ids, r.weights))  # the head axis without the heads it stands for
    with pytest.raises(GrouterError, match=r"routing shape mismatch.*\[batch, seq, k\]"):
        model(input_ids=x)


def test_online_per_layer_grouter_equals_its_stored_routing():
    g = Grouter(GrouterConfig(vocab_size=V, n_experts=E, top_k=K, d_model=32, n_layers=1, n_heads=2, d_ff=64,
                              max_seq_len=64, head_layers=[1, 2], source_layers=3))
    with torch.no_grad():
        g.head.weight.mul_(50)
    x = tokens(3, 10)
    routing = g.eval().route(x)
    assert routing.ids.shape == (3, 10, 2, K) and not torch.equal(routing.ids[:, :, 0], routing.ids[:, :, 1])
    online, stored = tiny_model("qwen3_moe", num_hidden_layers=3).eval(), tiny_model("qwen3_moe", num_hidden_layers=3).eval()
    use_grouter_routing(online, g)
    h_stored = use_grouter_routing(stored)
    assert online.config.grouter_routing["layer_heads"] == [0, 0, 1]  # depths 1/6, 1/2, 5/6; the heads' 1/2, 5/6
    with torch.no_grad():
        a = online(input_ids=x).logits
        h_stored.set(routing)
        b = stored(input_ids=x).logits
    torch.testing.assert_close(a, b, rtol=0, atol=0)


# --------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------


def _gate_buffers(model):
    return [b.gate.weight for b in moe_blocks(model)]


@pytest.mark.parametrize("model_type", ARCHS)
def test_adamw_loop_trains_experts_never_gates(model_type):
    model = tiny_model(model_type)
    gates_before = [w.clone() for w in _gate_buffers(model)]
    handle = use_grouter_routing(model)
    model.train()
    assert not [n for n, _ in model.named_parameters() if ".mlp.gate." in n]  # gates hold no parameter
    assert all(not list(b.gate.parameters()) for b in moe_blocks(model))
    names = {n for n, _ in model.named_parameters()}
    assert any("experts.gate_up_proj" in n for n in names)
    if model_type == "qwen2_moe":  # the shared expert and its gate are model, not routing: they train
        assert any("shared_expert_gate" in n for n in names) and any("shared_expert." in n for n in names)

    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x, r = tokens(4, 16), random_routing(4, 16)
    losses = []
    for step in range(8):
        handle.set(r)
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        if step == 0:
            for b in moe_blocks(model):
                assert b.experts.gate_up_proj.grad is not None and b.experts.gate_up_proj.grad.abs().sum() > 0
                assert b.experts.down_proj.grad is not None and b.experts.down_proj.grad.abs().sum() > 0
                assert b.gate.weight.grad is None and not b.gate.weight.requires_grad
                if model_type == "qwen2_moe":
                    assert b.shared_expert_gate.weight.grad.abs().sum() > 0  # it trains: a non-zero gradient
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5, losses
    for before, after in zip(gates_before, _gate_buffers(model)):
        torch.testing.assert_close(after, before, rtol=0, atol=0)


def test_gradient_checkpointing_sees_the_same_routing():
    x, r = tokens(2, 12), random_routing(2, 12)
    grads = []
    for checkpointing in (False, True):
        model = tiny_model("qwen3_moe")
        handle = use_grouter_routing(model)
        model.train()
        if checkpointing:
            enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
            enable()
        with handle.routing(r):
            loss = model(input_ids=x, labels=x).loss
        loss.backward()  # recomputes the MoE blocks after the context has closed
        grads.append(torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("model_type", ["qwen2_moe", "mixtral"])
def test_low_precision_forward(model_type):
    model = tiny_model(model_type).to(torch.bfloat16)
    g = tiny_grouter()
    use_grouter_routing(model, g)
    x = tokens()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(input_ids=x, labels=x)
    assert torch.isfinite(out.logits.float()).all() and torch.isfinite(out.loss)
    assert next(g.parameters()).dtype == torch.float32  # routing stays float32


# --------------------------------------------------------------------------------------------
# aux loss, save, remove
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", ARCHS)
def test_router_logits_and_aux_loss_are_harmless(model_type):
    model = tiny_model(model_type).eval()
    x, r = tokens(), random_routing(2, 12)
    with torch.no_grad():  # transformers installs its recording hooks once, here on the native gates
        assert len(model(input_ids=x, output_router_logits=True).router_logits) == 2
    handle = use_grouter_routing(model)
    with torch.no_grad():
        handle.set(r)
        plain = model(input_ids=x, labels=x)
        handle.set(r)
        out = model(input_ids=x, labels=x, output_router_logits=True)
    assert plain.aux_loss is None
    torch.testing.assert_close(out.loss, plain.loss, rtol=0, atol=0)  # aux loss not added
    torch.testing.assert_close(out.logits, plain.logits, rtol=0, atol=0)
    assert torch.isfinite(out.aux_loss) and out.aux_loss.requires_grad is False
    assert len(out.router_logits) == 2
    probs = out.router_logits[0].softmax(-1)
    w = r.weights.reshape(-1, K)
    torch.testing.assert_close(probs.gather(1, r.ids.reshape(-1, K)), w / w.sum(-1, keepdim=True))
    assert set(probs.topk(K).indices.sort(-1).values.reshape(-1).tolist()) <= set(range(E))
    assert torch.equal(probs.topk(K).indices.sort(-1).values, r.ids.reshape(-1, K).sort(-1).values)


@pytest.mark.parametrize("model_type", ["qwen2_moe", "olmoe", "mixtral"])
def test_save_pretrained_loads_as_a_plain_hf_model(model_type, tmp_path):
    model = tiny_model(model_type)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    wrapped = GrouterRoutedModel(model)
    assert set(model.state_dict()) == set(original)  # same keys: the gate weights are kept as buffers
    opt = torch.optim.AdamW(wrapped.parameters(), lr=1e-2)
    x, r = tokens(), random_routing(2, 12)
    wrapped(input_ids=x, labels=x, routing_ids=r.ids, routing_weights=r.weights).loss.backward()
    opt.step()
    wrapped.save_pretrained(tmp_path / "ckpt")

    loaded, info = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert loaded.config.grouter_routing["mode"] == "stored"
    state = loaded.state_dict()
    for key, value in model.state_dict().items():
        torch.testing.assert_close(state[key], value, rtol=0, atol=0, msg=key)
    gate_key = next(k for k in original if k.endswith("mlp.gate.weight"))
    torch.testing.assert_close(state[gate_key], original[gate_key], rtol=0, atol=0)  # never trained

    handle = use_grouter_routing(loaded.eval())  # the trained model is the loaded one + Grouter routing
    model.eval()
    with torch.no_grad():
        handle.set(r)
        a = loaded(input_ids=x).logits
        get_grouter_routing(model).set(r)
        b = model(input_ids=x).logits
    torch.testing.assert_close(a, b)


def test_remove_restores_the_native_gates():
    model = tiny_model("olmoe").eval()
    x = tokens()
    with torch.no_grad():
        native = model(input_ids=x).logits
    coef = model.router_aux_loss_coef
    handle = use_grouter_routing(model, k=3)
    assert model.router_aux_loss_coef == 0.0 and model.num_experts_per_tok == 3
    handle.remove()
    assert get_grouter_routing(model) is None and not hasattr(model.config, "grouter_routing")
    assert model.router_aux_loss_coef == coef and model.num_experts_per_tok == K
    assert any(n.endswith("mlp.gate.weight") for n, _ in model.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=x).logits, native, rtol=0, atol=0)
    use_grouter_routing(model)  # can be patched again


def test_dropped_gate_weights():
    model = tiny_model("qwen3_moe")
    handle = use_grouter_routing(model, keep_gate_weights=False)
    assert not any(k.endswith("mlp.gate.weight") for k in model.state_dict())
    assert model.config.grouter_routing["gate_weights"] == "removed"
    with pytest.raises(GrouterError, match="dropped"):
        handle.remove()


# --------------------------------------------------------------------------------------------
# Trainer and the collator
# --------------------------------------------------------------------------------------------


class FakeStore:
    """RoutingStore's reading interface: routing(split, idx) -> Routing [B, L, k]."""

    def __init__(self, routing: Routing):
        self._r = routing

    def n_sequences(self, split: str) -> int:
        return self._r.ids.shape[0]

    def routing(self, split, idx):
        idx = torch.as_tensor(np.asarray(idx, dtype=np.int64))
        return Routing(self._r.ids[idx], self._r.weights[idx])


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def _examples(n: int = 8, l: int = 16):
    x = tokens(n, l, seed=3)
    return x, [{"input_ids": x[i], "labels": x[i], "index": i} for i in range(n)]


def test_routing_collator():
    x, items = _examples(4)
    r = random_routing(4, 16)
    batch = routing_collator(FakeStore(r), "train")([items[2], items[0]])
    assert set(batch) == {"input_ids", "labels", "routing_ids", "routing_weights"}
    assert torch.equal(batch["input_ids"], x[[2, 0]])
    assert torch.equal(batch["routing_ids"], r.ids[[2, 0]]) and batch["routing_ids"].dtype == torch.long
    assert torch.equal(batch["routing_weights"], r.weights[[2, 0]])
    online = routing_collator(None)([items[1]])
    assert set(online) == {"input_ids", "labels"}
    with pytest.raises(GrouterError, match="remove_unused_columns=False"):
        routing_collator(FakeStore(r))([{"input_ids": x[0]}])
    with pytest.raises(GrouterError, match="outside"):
        routing_collator(FakeStore(r))([{"input_ids": x[0], "index": 9}])
    with pytest.raises(GrouterError, match="input_ids"):
        routing_collator(FakeStore(random_routing(4, 15)))([items[0]])


def _trainer_args(tmp_path, steps: int):
    from transformers import TrainingArguments

    return TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=steps, per_device_train_batch_size=4,
                             learning_rate=1e-2, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                             remove_unused_columns=False, disable_tqdm=True, dataloader_num_workers=0, seed=0)




@pytest.mark.parametrize("model_type", ARCHS)
def test_trainer_with_stored_routing(model_type, tmp_path):
    from transformers import Trainer

    model = tiny_model(model_type)
    gates_before = [w.clone() for w in _gate_buffers(model)]
    wrapped = GrouterRoutedModel(model)
    experts_before = moe_blocks(model)[0].experts.gate_up_proj.detach().clone()
    x, items = _examples(8)
    store = FakeStore(random_routing(8, 16))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = Trainer(model=wrapped, args=_trainer_args(tmp_path, 6), train_dataset=ListDataset(items),
                          data_collator=routing_collator(store, "train"))
        result = trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 6 and np.isfinite(result.training_loss)
    assert losses[-1] < losses[0], losses
    assert not torch.equal(moe_blocks(model)[0].experts.gate_up_proj.detach(), experts_before)
    for before, after in zip(gates_before, _gate_buffers(model)):
        torch.testing.assert_close(after, before, rtol=0, atol=0)


def test_trainer_with_online_routing(tmp_path):
    from transformers import Trainer

    model = tiny_model("qwen2_moe")
    wrapped = GrouterRoutedModel(model, tiny_grouter())
    _, items = _examples(8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = Trainer(model=wrapped, args=_trainer_args(tmp_path, 4), train_dataset=ListDataset(items),
                          data_collator=routing_collator(None))
        result = trainer.train()
    assert np.isfinite(result.training_loss)


def dispatched_batch(g, data, tmp_path, n=4):
    """Dispatch `g` over `data` into a routing store, and collate the first n training sequences from it."""
    g.save_pretrained(tmp_path / "g")
    dispatch(tmp_path / "store", grouter=tmp_path / "g", data=data, batch_size=512, device="cpu", progress=False)
    store = RoutingStore.open(tmp_path / "store", data=data)
    b = data.split("train").batch(np.arange(n))
    items = [{"input_ids": b["input_ids"][i], "labels": b["input_ids"][i], "index": i} for i in range(n)]
    return store, routing_collator(store, "train")(items)


def test_with_a_real_routing_store(tiny_data, tmp_path):
    """dispatch -> RoutingStore -> routing_collator -> GrouterRoutedModel: the routes online mode takes."""
    g = tiny_grouter(vocab=tiny_data.vocab_size)
    _, batch = dispatched_batch(g, tiny_data, tmp_path)

    model = tiny_model("qwen3_moe", vocab_size=tiny_data.vocab_size)
    wrapped = GrouterRoutedModel(model)
    out = wrapped(**batch)
    out.loss.backward()
    online = g.route(batch["input_ids"])
    assert torch.equal(batch["routing_ids"], online.ids)
    torch.testing.assert_close(batch["routing_weights"], online.weights, rtol=1e-2, atol=1e-2)  # stored as bf16


def test_with_a_real_per_layer_routing_store(tiny_data, tmp_path):
    """A per-layer store through routing_collator: routing_ids [B, L, H, k], each layer its head's, as online."""
    g = Grouter(GrouterConfig(vocab_size=tiny_data.vocab_size, n_experts=E, top_k=K, d_model=32, n_layers=1, n_heads=2,
                              d_ff=64, max_seq_len=64, head_layers=[0, 1], source_layers=2))
    with torch.no_grad():
        g.head.weight.mul_(50)
    store, batch = dispatched_batch(g, tiny_data, tmp_path)
    assert batch["routing_ids"].shape == (4, tiny_data.seq_len, 2, K)
    model = tiny_model("qwen3_moe", vocab_size=tiny_data.vocab_size, num_hidden_layers=2).eval()
    online = tiny_model("qwen3_moe", vocab_size=tiny_data.vocab_size, num_hidden_layers=2).eval()
    use_grouter_routing(online, g.eval())
    with torch.no_grad():
        stored = GrouterRoutedModel(model, heads=store.heads)(**batch).logits
        torch.testing.assert_close(stored, online(input_ids=batch["input_ids"]).logits, rtol=2e-2, atol=2e-2)  # bf16


# --------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------


def test_mismatched_expert_counts():
    with pytest.raises(GrouterError, match="mismatched expert counts"):
        use_grouter_routing(tiny_model("qwen3_moe"), tiny_grouter(n_experts=4))


def test_routing_shape_mismatch():
    model = tiny_model("mixtral")
    handle = use_grouter_routing(model)
    x = tokens(2, 12)
    handle.set(random_routing(2, 13))
    with pytest.raises(GrouterError, match="routing shape mismatch"):
        model(input_ids=x)
    handle.set(random_routing(2, 12, k=3))
    with pytest.raises(GrouterError, match="routing shape mismatch"):
        model(input_ids=x)
    wrapped = GrouterRoutedModel(model)
    r = random_routing(1, 12)
    with pytest.raises(GrouterError, match="routing shape mismatch"):
        wrapped(input_ids=x, routing_ids=r.ids, routing_weights=r.weights)
    with pytest.raises(GrouterError, match="both"):
        wrapped(input_ids=x, routing_ids=r.ids)


def test_unsupported_model_type():
    from transformers import LlamaConfig, LlamaForCausalLM

    dense = LlamaForCausalLM(LlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                         num_key_value_heads=2, intermediate_size=64, vocab_size=V))
    with pytest.raises(GrouterError, match="unsupported model_type 'llama'"):
        use_grouter_routing(dense)
    with pytest.raises(GrouterError, match="transformers model"):
        use_grouter_routing(torch.nn.Linear(2, 2))


def test_other_errors():
    model = tiny_model("qwen2_moe")
    with pytest.raises(GrouterError, match="k must be"):
        use_grouter_routing(model, k=9)
    with pytest.raises(GrouterError, match="vocabulary"):
        use_grouter_routing(model, tiny_grouter(vocab=256))
    handle = use_grouter_routing(model)
    with pytest.raises(GrouterError, match="already"):
        use_grouter_routing(model)
    x = tokens()
    with pytest.raises(GrouterError, match="no routing for this forward"):
        model(input_ids=x)
    handle.set(random_routing(2, 12))
    model(input_ids=x)
    with pytest.raises(GrouterError, match="no routing for this forward"):  # a routing is used once
        model(input_ids=x)
    bad = random_routing(2, 12)
    bad.ids[0, 0, 0] = E
    handle.set(bad)
    with pytest.raises(GrouterError, match="out of range"):
        model(input_ids=x)
    with pytest.raises(GrouterError, match="integer"):
        handle.set(Routing(bad.weights, bad.weights))
    with handle.routing(random_routing(2, 12)):
        pass  # unused: dropped on exit
    with pytest.raises(GrouterError, match="no routing for this forward"):
        model(input_ids=x)

    online = tiny_model("olmoe")
    use_grouter_routing(online, tiny_grouter(vocab=64))
    with pytest.raises(GrouterError, match="outside the Grouter's vocabulary"):
        online(input_ids=torch.full((1, 4), 100))
    with pytest.raises(GrouterError, match="input_ids"):
        online(inputs_embeds=torch.zeros(1, 4, H))
