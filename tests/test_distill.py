"""Distillation: learns the teacher for any expert count, T=1 by default, resumes exactly."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from grouter.capture import capture
from grouter.distill import Options, distill, distill_schedule
from grouter.errors import GrouterError
from grouter.formats.dataset import PackedDataset
from grouter.formats.grouter import Architecture
from grouter.formats.run import read_metrics
from grouter.formats.targets import Targets
from grouter.losses import kl_loss
from grouter.metrics import topk_recall
from grouter.model import MoEConfig, MoELM
from grouter.network import Grouter
from grouter.testing import (assert_nothing_written, assert_one_line_error, megatron_indexed_dataset, run_cli,
                             small_grouter, stdlib_documents)


def make_targets(tmp_path, data, n_experts, top_k=2, name="t") -> Targets:
    """A random-init source is a fixed function of the tokens: a teacher with real structure."""
    src = MoELM(MoEConfig(vocab_size=data.vocab_size, max_seq_len=data.seq_len, d_model=32, n_layers=1, n_heads=2,
                          d_expert=8, n_experts=n_experts, top_k=top_k, init_std=0.2))
    src.save_pretrained(tmp_path / f"src{n_experts}")
    capture(tmp_path / name, source=tmp_path / f"src{n_experts}", data=data, top_m=0, progress=False)
    return Targets.open(tmp_path / name)


ARCH = Architecture(d_model=32, n_layers=1, n_heads=2, d_ff=64)


def schedule(**kw):
    """Distillation's schedule with the test's changes."""
    return replace(distill_schedule(), **kw)


def test_kl_loss_is_zero_for_identical_and_positive_otherwise():
    t = torch.randn(2, 5, 8)
    assert kl_loss(t, t).item() == pytest.approx(0.0, abs=1e-6)
    assert kl_loss(t, t + 1.0).item() == pytest.approx(0.0, abs=1e-5), "softmax is shift invariant"
    def kl(p_logits, q_logits):  # mean over tokens of sum_e p (log p - log q)
        p, q = p_logits.log_softmax(-1), q_logits.log_softmax(-1)
        return (p.exp() * (p - q)).sum(-1).mean().item()

    assert kl(t, 2 * t) > 0.05  # the case below is not a trivial one
    assert kl_loss(t, 2 * t).item() == pytest.approx(kl(t, 2 * t), rel=1e-5), "T=1 penalises wrong magnitudes"
    assert kl_loss(t, 2 * t, temperature=2.0).item() == pytest.approx(4 * kl(t / 2, t), rel=1e-5)


@pytest.mark.parametrize("n_experts, top_k", [(8, 2), (64, 4), (128, 8)])
def test_distillation_learns_the_teacher_for_any_expert_count(tmp_path, tiny_data, n_experts, top_k):
    targets = make_targets(tmp_path, tiny_data, n_experts, top_k)
    cfg = schedule(steps=80, batch_size=16, lr=1e-2, warmup_steps=5, eval_every=40, eval_sequences=64,
                        checkpoint_every=40)
    summary = distill(tmp_path / "g", targets=targets, architecture=ARCH, schedule=cfg, progress=False)
    evals = [r for r in read_metrics(tmp_path / "g" / "metrics.jsonl") if r["kind"] == "eval"]
    assert evals[-1]["kl"] < evals[0]["kl"] or evals[-1]["topk_recall"] > evals[0]["topk_recall"]
    chance = top_k / n_experts
    assert summary["val_topk_recall"] > chance + 0.2, summary
    grouter = Grouter.from_pretrained(tmp_path / "g")
    assert grouter.cfg.n_experts == n_experts and grouter.cfg.causal
    assert grouter.cfg.provenance["source"]["n_experts"] == n_experts


def test_temperature_defaults_to_one_and_is_an_option(tmp_path, tiny_data):
    assert Options().temperature == 1.0
    targets = make_targets(tmp_path, tiny_data, 8)
    cfg = schedule(steps=3, batch_size=4, eval_every=3, eval_sequences=4, checkpoint_every=3)
    a = distill(tmp_path / "t1", targets=targets, architecture=ARCH, schedule=cfg, progress=False)
    b = distill(tmp_path / "t2", targets=targets, architecture=ARCH, schedule=cfg, temperature=2.0, progress=False)
    assert a["val_kl"] != b["val_kl"]
    assert Grouter.from_pretrained(tmp_path / "t2").cfg.provenance["temperature"] == 2.0


def test_distillation_resumes_exactly(tmp_path, tiny_data):
    targets = make_targets(tmp_path, tiny_data, 8)
    cfg = schedule(steps=12, batch_size=8, eval_every=6, eval_sequences=8, checkpoint_every=6)
    distill(tmp_path / "full", targets=targets, architecture=ARCH, schedule=cfg, progress=False)
    stopped = distill(tmp_path / "res", targets=targets, architecture=ARCH, schedule=cfg, stop_after=6, progress=False)
    assert stopped["stopped_at"] == 6
    distill(tmp_path / "res", targets=targets, architecture=ARCH, schedule=cfg, progress=False)
    a, b = Grouter.from_pretrained(tmp_path / "full"), Grouter.from_pretrained(tmp_path / "res")
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name


def test_a_batch_larger_than_the_data_is_refused(tmp_path, tiny_data):
    targets = make_targets(tmp_path, tiny_data, 8)
    with pytest.raises(GrouterError, match="batch size 100000 exceeds"):
        distill(tmp_path / "g", targets=targets, architecture=ARCH, schedule=schedule(steps=2, batch_size=100_000),
                progress=False)
    assert not (tmp_path / "g").exists()


def test_bidirectional_distillation_is_flagged(tmp_path, tiny_data):
    targets = make_targets(tmp_path, tiny_data, 8)
    cfg = schedule(steps=2, batch_size=4, eval_every=2, eval_sequences=4, checkpoint_every=2)
    with pytest.warns(UserWarning, match="leaks the future"):
        summary = distill(tmp_path / "g", targets=targets, architecture=replace(ARCH, causal=False), schedule=cfg,
                          progress=False)
    assert "leaks the future" in summary["warning"]


def test_kl_loss_of_heads_is_the_mean_of_each_heads():
    t, s = torch.randn(2, 5, 3, 8), torch.randn(2, 5, 3, 8)
    per_head = [kl_loss(t[:, :, h], s[:, :, h]).item() for h in range(3)]
    assert kl_loss(t, s).item() == pytest.approx(sum(per_head) / 3, rel=1e-6)


def test_per_layer_heads_learn_their_own_layers(tmp_path, tiny_data):
    """Targets of two source layers: a Grouter with two heads, each closer to its own layer's teacher."""
    src = MoELM(MoEConfig(vocab_size=tiny_data.vocab_size, max_seq_len=tiny_data.seq_len, d_model=32, n_layers=2,
                          n_heads=2, d_expert=8, n_experts=8, top_k=2, init_std=0.2))
    src.save_pretrained(tmp_path / "src")
    capture(tmp_path / "t", source=tmp_path / "src", data=tiny_data, layers="all", top_m=0, progress=False)
    targets = Targets.open(tmp_path / "t")
    cfg = schedule(steps=80, batch_size=16, lr=1e-2, warmup_steps=5, eval_every=40, eval_sequences=64,
                        checkpoint_every=40)
    summary = distill(tmp_path / "g", targets=targets, architecture=ARCH, schedule=cfg, progress=False)
    grouter = Grouter.from_pretrained(tmp_path / "g")
    assert (grouter.cfg.head_layers, grouter.cfg.source_layers, summary["head_layers"]) == ([0, 1], 2, [0, 1])
    assert len(summary["val_kl_per_head"]) == 2
    assert summary["val_kl"] == pytest.approx(np.mean(summary["val_kl_per_head"]))
    assert min(summary["val_topk_recall_per_head"]) > 2 / 8 + 0.2, summary
    idx = np.arange(64)
    teacher = targets.logits("val", idx).topk(2, -1).indices  # [n, L, 2 layers, k]
    with torch.no_grad():
        student = grouter(tiny_data.split("val").batch(idx)["input_ids"]).topk(2, -1).indices
    for h in range(2):  # each head matches its own layer better than the other one
        own = topk_recall(teacher[:, :, h], student[:, :, h])
        assert own > topk_recall(teacher[:, :, 1 - h], student[:, :, h]) + 0.1, (h, own)


# -- compact targets ------------------------------------------------------------------------------


def test_kept_kl_is_the_full_kl_of_the_kept_experts_and_one_bucket_of_the_rest():
    """What compact targets keep is exact for this: KL over {each kept expert, the others as one} of
    the full scores' softmaxes equals kept_kl_loss on (top-M scores, their ids, the rest's
    log-sum-exp), for any student; it is at most the full KL, and equal to it when the student's
    distribution within the rest is the teacher's."""
    from grouter.losses import kept_kl_loss

    g = torch.Generator().manual_seed(0)
    t, s = torch.randn(4, 6, 3, 16, generator=g) * 2, torch.randn(4, 6, 3, 16, generator=g) * 2
    top = t.topk(5, -1)
    rest = t.scatter(-1, top.indices, float("-inf")).logsumexp(-1)

    def bucketed(x):  # log-probabilities of the kept experts, then of the rest as one
        p = x.log_softmax(-1)
        return torch.cat([p.gather(-1, top.indices), p.scatter(-1, top.indices, float("-inf")).logsumexp(-1, True)], -1)

    reference = (bucketed(t).exp() * (bucketed(t) - bucketed(s))).sum(-1).mean()
    assert kept_kl_loss(top.values, top.indices, rest, s).item() == pytest.approx(reference.item(), rel=1e-5)
    assert kept_kl_loss(top.values, top.indices, rest, s).item() < kl_loss(t, s).item()
    kept = torch.zeros_like(t, dtype=torch.bool).scatter(-1, top.indices, True)
    same_rest = torch.where(kept, s, t + 0.7)  # within the rest, the student's distribution is the teacher's
    assert kept_kl_loss(top.values, top.indices, rest, same_rest).item() == pytest.approx(
        kl_loss(t, same_rest).item(), rel=1e-4)


def test_distillation_trains_on_compact_targets(tmp_path, tiny_data):
    """Targets captured with --top-m: distillation learns from them, its loss is the kept-expert KL
    (equal to the full one's on those experts), and evaluation's top-k is the full targets'."""
    from grouter.formats.targets import Targets as T

    src = MoELM(MoEConfig(vocab_size=tiny_data.vocab_size, max_seq_len=tiny_data.seq_len, d_model=32, n_layers=1,
                          n_heads=2, d_expert=8, n_experts=16, top_k=2, init_std=0.2))
    src.save_pretrained(tmp_path / "src")
    capture(tmp_path / "full", source=tmp_path / "src", data=tiny_data, top_m=0, batch_size=256, progress=False)
    capture(tmp_path / "m4", source=tmp_path / "src", data=tiny_data, top_m=4, batch_size=256, progress=False)
    cfg = schedule(steps=60, batch_size=16, lr=1e-2, warmup_steps=5, eval_every=30, eval_sequences=64,
                   checkpoint_every=30)
    summary = distill(tmp_path / "g", targets=tmp_path / "m4", architecture=ARCH, schedule=cfg, progress=False)
    assert summary["val_topk_recall"] > 2 / 16 + 0.2, summary
    grouter = Grouter.from_pretrained(tmp_path / "g")
    assert grouter.cfg.provenance["top_m"] == 4
    full, compact, idx = T.open(tmp_path / "full"), T.open(tmp_path / "m4"), np.arange(8)
    with torch.no_grad():
        student = grouter(tiny_data.split("val").batch(idx)["input_ids"])
    teacher = compact.teacher("val", idx)
    scores = full.logits("val", idx)
    assert torch.equal(scores.gather(-1, teacher.ids), teacher.scores)
    assert teacher.kl(student).item() <= full.teacher("val", idx).kl(student).item()
    with pytest.raises(GrouterError, match="temperature 1"):
        distill(tmp_path / "g2", targets=tmp_path / "m4", architecture=ARCH, schedule=cfg, temperature=2.0,
                progress=False)


# -- head groups ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def four_layer_targets(tmp_path_factory, tiny_data):
    path = tmp_path_factory.mktemp("groups")
    src = MoELM(MoEConfig(vocab_size=tiny_data.vocab_size, max_seq_len=tiny_data.seq_len, d_model=32, n_layers=4,
                          n_heads=2, d_expert=8, n_experts=8, top_k=2, init_std=0.2))
    src.save_pretrained(path / "src")
    capture(path / "t", source=path / "src", data=tiny_data, layers="all", batch_size=256, progress=False)
    return path / "t"


@pytest.mark.parametrize("groups, heads, expected", [(1, None, None), (2, 2, (0, 0, 1, 1)), (4, 4, None)])
def test_head_groups_give_a_head_per_group_of_adjacent_layers(tmp_path, tiny_data, four_layer_targets, groups, heads,
                                                             expected):
    """--head-groups 1: one shared head (distilled against every layer); 2: layers 0-1 and 2-3 share a
    head each; 4 (= the layers): a head per layer, the same Grouter as without the option."""
    cfg = schedule(steps=20, batch_size=16, lr=1e-2, warmup_steps=5, eval_every=20, eval_sequences=32,
                   checkpoint_every=20)
    summary = distill(tmp_path / "g", targets=four_layer_targets, architecture=ARCH, schedule=cfg,
                      head_groups=groups, progress=False)
    grouter = Grouter.from_pretrained(tmp_path / "g")
    assert (len(grouter.cfg.heads) if grouter.cfg.heads else None) == heads
    assert (grouter.cfg.heads.groups or None if grouter.cfg.heads else None) == expected
    assert len(summary["val_kl_per_head"]) == 4, "evaluated against every captured layer"
    if groups == 4:
        distill(tmp_path / "plain", targets=four_layer_targets, architecture=ARCH, schedule=cfg, progress=False)
        assert Grouter.from_pretrained(tmp_path / "plain").fingerprint() == grouter.fingerprint()


def test_head_groups_need_several_layers_and_at_most_one_group_each(tmp_path, tiny_data, four_layer_targets):
    cfg = schedule(steps=2, batch_size=16)
    with pytest.raises(GrouterError, match="between 1 .* and the 4 captured layers"):
        distill(tmp_path / "g", targets=four_layer_targets, architecture=ARCH, schedule=cfg, head_groups=5,
                progress=False)
    targets = make_targets(tmp_path, tiny_data, 8)
    with pytest.raises(GrouterError, match="needs targets of several layers"):
        distill(tmp_path / "g", targets=targets.path, architecture=ARCH, schedule=cfg, head_groups=2, progress=False)


def test_document_starts_need_documents_that_end_with_the_eos(capsys, tiny_data, tmp_path):
    """Megatron data made without --append-eod is packed with that recorded: distill --document-start refuses it
    (it could not find where documents start), and so does every stage that runs a Grouter with document starts."""
    prefix = megatron_indexed_dataset(stdlib_documents()[:2], tiny_data.tokenizer(), tmp_path / "m" / "text_document",
                                      None)
    code, _, err = run_cli(capsys, "data", "megatron", "--megatron-data", prefix, "--tokenizer",
                           tiny_data.path / "tokenizer.json", "--seq-len", 32, "--out", tmp_path / "data")
    assert code == 0, err
    data = PackedDataset.open(tmp_path / "data")
    assert not data.documents_end_with_eos and tiny_data.documents_end_with_eos
    make_targets(tmp_path, data, 8)
    code, _, err = run_cli(capsys, "distill", "--targets", tmp_path / "t", "--out", tmp_path / "g", "--document-start")
    assert_one_line_error(code, err, "preprocess_data.py --append-eod")
    assert_nothing_written(tmp_path / "g")
    small_grouter(tmp_path / "small", document_eos=data.eos_id)
    code, _, err = run_cli(capsys, "dispatch", "--grouter", tmp_path / "small", "--data", data.path, "--out",
                           tmp_path / "routing")
    assert_one_line_error(code, err, "do not all end with it")
