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
    capture(tmp_path / name, source=tmp_path / f"src{n_experts}", data=data, progress=False)
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
    capture(tmp_path / "t", source=tmp_path / "src", data=tiny_data, layers="all", progress=False)
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
