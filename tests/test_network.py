import json
import warnings

import pytest
import torch

from grouter import Grouter, GrouterConfig
from grouter.errors import GrouterError

CFG = dict(vocab_size=200, n_experts=16, top_k=4, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_seq_len=64)


def make(**kw) -> Grouter:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        g = Grouter(GrouterConfig(**{**CFG, **kw}))
    torch.nn.init.normal_(g.head.weight, std=1.0)  # sharpen logits so differences are visible
    return g.eval()


@pytest.mark.parametrize("t", [0, 7, 30])
def test_causal_grouter_does_not_see_the_future(t):
    g = make()
    x = torch.randint(0, 200, (3, 32))
    y = x.clone()
    y[:, t + 1:] = torch.randint(0, 200, (3, 31 - t))
    with torch.no_grad():
        a, b = g(x), g(y)
    assert (a[:, : t + 1] - b[:, : t + 1]).abs().max().item() <= 1e-6
    if t < 31:
        assert not torch.allclose(a[:, t + 1:], b[:, t + 1:])


def test_bidirectional_option_leaks_and_says_so():
    with pytest.warns(UserWarning, match="leaks the future"):
        Grouter(GrouterConfig(**CFG, causal=False))
    g = make(causal=False)
    x = torch.randint(0, 200, (3, 32))
    y = x.clone()
    y[:, 20:] = (y[:, 20:] + 1) % 200
    with torch.no_grad():
        a, b = g(x), g(y)
    assert (a[:, :20] - b[:, :20]).abs().max().item() > 1e-4, "bidirectional routes depend on later tokens"


def test_causal_is_the_default():
    assert GrouterConfig(vocab_size=10, n_experts=4, top_k=1).causal is True


def test_route_shapes_and_weights():
    g = make()
    x = torch.randint(0, 200, (2, 10))
    r = g.route(x)
    assert r.ids.shape == (2, 10, 4) and r.ids.dtype == torch.long
    assert r.weights.shape == (2, 10, 4) and r.weights.dtype == torch.float32
    torch.testing.assert_close(r.weights.sum(-1), torch.ones(2, 10))
    assert not r.weights.requires_grad
    assert g.route(x, k=2).ids.shape == (2, 10, 2)
    top = g(x).topk(4, -1).indices
    assert torch.equal(r.ids, top)


def test_scaling_and_sigmoid_options():
    x = torch.randint(0, 200, (2, 10))
    scaled = make(scale=2.5).route(x)
    torch.testing.assert_close(scaled.weights.sum(-1), torch.full((2, 10), 2.5))
    sig = make(score="sigmoid")
    s = sig(x).sigmoid().gather(-1, sig.route(x).ids)
    torch.testing.assert_close(sig.route(x).weights, s / s.sum(-1, keepdim=True))


def test_selection_bias_changes_choice_not_gate_formula():
    g = make()
    x = torch.randint(0, 200, (2, 10))
    g.selection_bias[3] = 100.0
    r = g.route(x)
    assert (r.ids == 3).any(-1).all()
    chosen = g(x).gather(-1, r.ids)
    torch.testing.assert_close(r.weights, chosen.softmax(-1))


def test_save_load_round_trip_and_fingerprint(tmp_path):
    g = make()
    g.save_pretrained(tmp_path / "g")
    loaded = Grouter.from_pretrained(tmp_path / "g")
    x = torch.randint(0, 200, (2, 10))
    assert torch.equal(g(x), loaded(x))
    assert loaded.fingerprint() == g.fingerprint()
    with torch.no_grad():
        loaded.head.weight[0, 0] += 1e-3
    assert loaded.fingerprint() != g.fingerprint()
    assert {p.name for p in (tmp_path / "g").iterdir()} == {"model.safetensors", "config.json"}


def test_bad_grouter_inputs(tmp_path):
    with pytest.raises(GrouterError, match="top-k 17"):
        GrouterConfig(vocab_size=10, n_experts=16, top_k=17).validate()
    with pytest.raises(GrouterError, match="max_seq_len"):
        make()(torch.zeros(1, 65, dtype=torch.long))
    (tmp_path / "config.json").write_text('{"format": "grouter-moe-lm", "version": 1, "config": {}}')
    with pytest.raises(GrouterError, match="not a Grouter"):
        Grouter.from_pretrained(tmp_path)


def test_per_layer_heads_share_the_trunk_and_route_per_head(tmp_path):
    g = make(head_layers=[1, 3], source_layers=4)
    x = torch.randint(0, 200, (2, 10))
    with torch.no_grad():
        logits, hidden = g(x), g.encode(x)
    assert logits.shape == (2, 10, 2, 16) and g.head.weight.shape == (32, 32)
    for h in range(2):  # head h is rows h*E..(h+1)*E of the stacked weight, on the one trunk
        torch.testing.assert_close(logits[:, :, h], hidden @ g.head.weight[h * 16:(h + 1) * 16].T)
    assert torch.equal(g.head_logits(x), logits)
    r = g.route(x)
    assert r.ids.shape == (2, 10, 2, 4) and r.heads.layers == (1, 3) and r.heads.source_layers == 4
    assert torch.equal(r.ids, logits.topk(4, -1).indices)
    g.selection_bias[1, 5] = 100.0  # a bias of its own per head
    biased = g.route(x).ids
    assert (biased[:, :, 1] == 5).any(-1).all() and torch.equal(biased[:, :, 0], r.ids[:, :, 0])
    g.save_pretrained(tmp_path / "g")
    loaded = Grouter.from_pretrained(tmp_path / "g")
    assert loaded.cfg.head_layers == [1, 3] and loaded.fingerprint() == g.fingerprint()
    assert torch.equal(loaded.route(x).ids, biased)
    meta = json.loads((tmp_path / "g" / "config.json").read_text())
    assert meta["version"] == 3 and meta["config"]["head_layers"] == [1, 3]


def test_one_head_keeps_its_config_and_fingerprint(tmp_path):
    """A shared-head Grouter is saved as before per-layer heads existed: version 2, no head fields."""
    g = make()
    assert "head_layers" not in g.cfg.to_dict() and g.head_logits(torch.zeros(1, 3, dtype=torch.long)).shape == (1, 3, 1, 16)
    g.save_pretrained(tmp_path / "g")
    meta = json.loads((tmp_path / "g" / "config.json").read_text())
    assert meta["version"] == 2 and "head_layers" not in meta["config"] and "source_layers" not in meta["config"]
    assert "document_eos" not in meta["config"]  # without document starts: saved as before they existed
    assert g.route(torch.zeros(1, 3, dtype=torch.long)).heads is None


@pytest.mark.parametrize("layers", [[2], [3, 1], [1, 1], [1, 4]])
def test_bad_head_layers(layers):
    with pytest.raises(GrouterError, match="source layers"):
        GrouterConfig(**CFG, head_layers=layers, source_layers=4).validate()


EOS = 3


@pytest.mark.parametrize("heads", [{}, {"head_layers": [0, 2], "source_layers": 3}])
def test_document_starts_route_each_document_of_a_packed_sequence_as_if_alone(heads):
    """With document starts, the routing of a packed sequence of several documents (each ended by the eos, the
    last one cut) is, token by token, that of each document routed alone from its start; without, it is not."""
    docs = [torch.tensor(d) for d in ([5, 6, 7, 8, 9, EOS], [EOS], [10, 11, 12, EOS], [13, 14, 15, 16, 17, 18, EOS])]
    docs += [torch.randint(4, 200, (n,)) for n in (20, 17)]
    docs[-2][-1] = EOS
    packed = torch.cat(docs)
    batch = torch.stack([packed, packed.roll(7)])  # a batch whose rows cut documents at other places
    for eos, equal in ((EOS, True), (None, False)):
        g = make(document_eos=eos, **heads)
        routing = g.route(batch)
        alone = [g.route(d[None]) for d in docs]
        assert torch.equal(routing.ids[0], torch.cat([r.ids[0] for r in alone])) == equal
        if equal:
            assert torch.allclose(routing.weights[0], torch.cat([r.weights[0] for r in alone]), atol=1e-6)
            first = int(torch.nonzero(batch[1] == EOS)[0]) + 1  # row 1: the documents after its first eos
            tail = g.route(batch[1:, first:])
            assert torch.equal(routing.ids[1, first:], tail.ids[0])
            positions, mask = g.documents(packed[None])
            assert positions[0, :8].tolist() == [0, 1, 2, 3, 4, 5, 0, 0] and mask.shape == (1, 1, 55, 55)


def test_document_starts_are_recorded_with_the_grouter(tmp_path):
    g = make(document_eos=EOS)
    g.save_pretrained(tmp_path / "g")
    loaded = Grouter.from_pretrained(tmp_path / "g")
    assert loaded.cfg.document_eos == EOS and loaded.fingerprint() == g.fingerprint() != make().fingerprint()
    with pytest.raises(GrouterError, match="end-of-document id 200 is outside"):
        make(document_eos=200)
