"""Expert folding: group sizes, every expert used once, folded logits = summed source logits."""

import json

import numpy as np
import pytest
import torch

from grouter.errors import GrouterError
from grouter.fold import (STRATEGIES, affinity_groups, balance_groups, coactivation, fold, fold_grouter,
                          group_sizes, make_groups, mapping_matrix)
from grouter.formats.grouter import GrouterConfig
from grouter.network import Grouter


def make_grouter(data, n_experts, top_k=2, path=None) -> Grouter:
    g = Grouter(GrouterConfig(vocab_size=data.vocab_size, n_experts=n_experts, top_k=top_k, d_model=32, n_layers=1,
                              n_heads=2, d_ff=64, max_seq_len=data.seq_len, seed=n_experts))
    torch.nn.init.normal_(g.head.weight, std=0.5)
    if path is not None:
        g.save_pretrained(path)
    return g.eval()


@pytest.mark.parametrize("n_source, n_target", [(16, 6), (64, 24), (16, 8), (12, 5)])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_groups_partition_experts_with_specified_sizes(n_source, n_target, strategy):
    rng = np.random.default_rng(0)
    affinity = rng.random((n_source, n_source))
    affinity = (affinity + affinity.T) / 2
    np.fill_diagonal(affinity, 0)
    load = rng.random(n_source)
    groups = make_groups(strategy, affinity, load, group_sizes(n_source, n_target), seed=1)
    sizes = sorted(len(g) for g in groups)
    extra = n_source % n_target
    assert sizes == sorted([n_source // n_target + 1] * extra + [n_source // n_target] * (n_target - extra))
    assert sorted(e for g in groups for e in g) == list(range(n_source)), "each source expert exactly once"


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("n_source, n_target", [(16, 6), (64, 24)])
def test_folded_logits_equal_summed_source_logits(tiny_data, strategy, n_source, n_target):
    g = make_grouter(tiny_data, n_source)
    affinity, load, _ = coactivation(g, tiny_data.split("train"), max_sequences=64)
    groups = make_groups(strategy, affinity, load, group_sizes(n_source, n_target), seed=0)
    folded = fold_grouter(g, groups, strategy)
    x = tiny_data.split("val").batch(np.arange(4))["input_ids"]
    with torch.no_grad():
        src, out = g(x), folded(x)
    expected = torch.stack([src[..., members].sum(-1) for members in groups], dim=-1)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert folded.cfg.provenance["fold"] == {"strategy": strategy, "source_experts": n_source, "groups": groups}


def test_affinity_grouping_keeps_co_firing_experts_together():
    # two obvious cliques {0,1,2} and {3,4,5}
    a = np.zeros((6, 6))
    for clique in ([0, 1, 2], [3, 4, 5]):
        for i in clique:
            for j in clique:
                if i != j:
                    a[i, j] = 1.0
    a[2, 3] = a[3, 2] = 0.1
    assert sorted(affinity_groups(a, [3, 3])) == [[0, 1, 2], [3, 4, 5]]


def test_balance_grouping_pairs_heavy_with_light():
    groups = balance_groups(np.array([10.0, 9.0, 1.0, 2.0]), [2, 2])
    assert sorted(groups) == [[0, 2], [1, 3]]


def test_coactivation_matrix_is_symmetric_and_normalised(tiny_data):
    g = make_grouter(tiny_data, 8, top_k=3)
    p, load, tokens = coactivation(g, tiny_data.split("train"), max_sequences=20)
    assert np.allclose(p, p.T) and np.all(np.diag(p) == 0)
    assert load.sum() == tokens * 3
    # each token contributes k*(k-1) ordered pairs
    assert p.sum() == pytest.approx(3 * 2)


def test_mapping_matrix():
    m = mapping_matrix([[0, 2], [1]], 3)
    assert m.tolist() == [[1, 0], [0, 1], [1, 0]]


def test_fold_command_writes_a_loadable_grouter_and_plot(tmp_path, tiny_data):
    make_grouter(tiny_data, 16, path=tmp_path / "g")
    summary = fold(tmp_path / "f", grouter=tmp_path / "g", data=tiny_data, experts=6, max_sequences=50, progress=False)
    folded = Grouter.from_pretrained(tmp_path / "f")
    assert folded.cfg.n_experts == 6 and summary["group_sizes"] == [3, 3, 3, 3, 2, 2]
    assert (tmp_path / "f" / "affinity.png").stat().st_size > 1000
    report = json.loads((tmp_path / "f" / "fold_report.json").read_text())
    assert report["strategy"] == "affinity" and report["groups"] == folded.cfg.provenance["fold"]["groups"]
    # the share of co-activation mass inside the groups, from the saved affinity matrix
    affinity = np.load(tmp_path / "f" / "affinity.npy")
    inside = sum(affinity[np.ix_(g, g)].sum() for g in report["groups"]) / affinity.sum()
    assert report["within_group_affinity"] == pytest.approx(inside) == summary["within_group_affinity"]
    assert report["tokens_measured"] == 50 * tiny_data.seq_len


@pytest.mark.parametrize("experts, message", [(16, "between 1 and 15"), (0, "--experts must be a number at least 1"),
                                             (2, "top-k 2")])
def test_bad_target_expert_counts(tmp_path, tiny_data, experts, message):
    make_grouter(tiny_data, 16, path=tmp_path / "g")
    with pytest.raises(GrouterError, match=message):
        fold(tmp_path / "f", grouter=tmp_path / "g", data=tiny_data, experts=experts, progress=False)
    assert not (tmp_path / "f").exists()


def test_data_with_another_vocabulary_is_refused(tmp_path, tiny_data):
    g = Grouter(GrouterConfig(vocab_size=tiny_data.vocab_size + 1, n_experts=8, top_k=2, d_model=32, n_layers=1,
                              n_heads=2, d_ff=64))
    g.save_pretrained(tmp_path / "g")
    with pytest.raises(GrouterError, match="another tokenizer"):
        fold(tmp_path / "f", grouter=tmp_path / "g", data=tiny_data, experts=4, progress=False)


def test_per_layer_heads_fold_each_head_by_its_own_grouping(tmp_path, tiny_data):
    """Each head: its own co-activation and grouping, and folded logits = summed source logits of that head."""
    g = Grouter(GrouterConfig(vocab_size=tiny_data.vocab_size, n_experts=16, top_k=2, d_model=32, n_layers=1, n_heads=2,
                              d_ff=64, max_seq_len=tiny_data.seq_len, head_layers=[0, 2], source_layers=3))
    torch.nn.init.normal_(g.head.weight, std=0.5)
    g.eval().save_pretrained(tmp_path / "g")
    affinity, load, tokens = coactivation(g, tiny_data.split("train"), max_sequences=50)
    assert affinity.shape == (2, 16, 16) and load.shape == (2, 16) and (load.sum(1) == tokens * 2).all()
    for h in range(2):  # head h's matrix is what a one-head Grouter with head h's weight measures
        one = Grouter(GrouterConfig(**{**g.cfg.to_dict(), "head_layers": [], "source_layers": 0}))
        one.load_state_dict({**g.state_dict(), "head.weight": g.head.weight[h * 16:(h + 1) * 16],
                             "selection_bias": torch.zeros(16)})
        a, x, _ = coactivation(one.eval(), tiny_data.split("train"), max_sequences=50)
        assert np.array_equal(a, affinity[h]) and np.array_equal(x, load[h])
    summary = fold(tmp_path / "f", grouter=tmp_path / "g", data=tiny_data, experts=6, max_sequences=50, progress=False)
    folded = Grouter.from_pretrained(tmp_path / "f")
    report = json.loads((tmp_path / "f" / "fold_report.json").read_text())
    groups = report["groups"]
    assert len(groups) == 2 and groups[0] != groups[1] and folded.cfg.provenance["fold"]["groups"] == groups
    assert groups == [make_groups("affinity", affinity[h], load[h], group_sizes(16, 6), h) for h in range(2)]
    x = tiny_data.split("val").batch(np.arange(4))["input_ids"]
    with torch.no_grad():
        src, out = g(x), folded(x)
    assert out.shape == (4, tiny_data.seq_len, 2, 6) and folded.cfg.head_layers == [0, 2]
    for h in range(2):
        expected = torch.stack([src[..., h, members].sum(-1) for members in groups[h]], dim=-1)
        torch.testing.assert_close(out[..., h, :], expected, rtol=1e-5, atol=1e-5)
    inside = report["within_group_affinity_per_head"]
    assert summary["within_group_affinity"] == pytest.approx(np.mean(inside)) and report["head_layers"] == [0, 2]
    assert np.load(tmp_path / "f" / "affinity.npy").shape == (2, 16, 16)
    assert {p.name for p in (tmp_path / "f").glob("*.png")} == {"affinity_layer0.png", "affinity_layer2.png"}


def test_folding_keeps_document_starts(tiny_data):
    """A folded Grouter keeps its source's document starts: its logits are the summed source logits of the same
    per-document contexts."""
    across = make_grouter(tiny_data, 16)
    g = Grouter(GrouterConfig(**{**across.cfg.to_dict(), "document_eos": tiny_data.eos_id}))
    g.load_state_dict(across.state_dict())
    groups = [[2 * i, 2 * i + 1] for i in range(8)]
    folded = fold_grouter(g.eval(), groups, "random")
    x = tiny_data.split("val").batch(np.arange(4))["input_ids"]
    x[:, [5, 17]] = tiny_data.eos_id
    with torch.no_grad():
        src, out, other = g(x), folded(x), across(x)
    assert folded.cfg.document_eos == tiny_data.eos_id
    torch.testing.assert_close(out, torch.stack([src[..., m].sum(-1) for m in groups], dim=-1), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(src, other)  # the same weights without document starts: other logits
