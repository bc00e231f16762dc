"""The report: tables, plots, tokens-to-loss speedup computed from real run logs."""

import json

import numpy as np
import pytest
import torch

from grouter.errors import GrouterError
from grouter.model import MoEConfig
from grouter.report import report, speedups, tokens_to_reach
from grouter.routers import Routing
from grouter.train import TrainConfig, train


def test_tokens_to_reach_interpolates():
    evals = [{"tokens": 100, "val_loss": 5.0}, {"tokens": 200, "val_loss": 3.0}, {"tokens": 300, "val_loss": 2.0}]
    assert tokens_to_reach(evals, 4.0) == pytest.approx(150)
    assert tokens_to_reach(evals, 2.0) == pytest.approx(300)
    assert tokens_to_reach(evals, 1.0) is None


def test_report_compares_runs(tiny_data, tmp_path):
    mcfg = dict(vocab_size=tiny_data.vocab_size, max_seq_len=tiny_data.seq_len, d_model=32, n_layers=2, n_heads=2,
                d_expert=32, n_experts=8, top_k=2)
    tcfg = TrainConfig(steps=20, batch_size=8, lr=1e-2, warmup_steps=2, eval_every=5, checkpoint_every=10,
                       eval_sequences=8)

    def hashed(split, idx):
        ids = torch.from_numpy(tiny_data.split(split).sequences(idx)[:, :-1])
        experts = torch.stack([(ids * 5 + j) % 8 for j in range(2)], dim=-1)
        return Routing(experts, torch.full(experts.shape, 0.5))

    train(tiny_data, tmp_path / "aux", MoEConfig(router="aux", **mcfg), tcfg, progress=False)
    train(tiny_data, tmp_path / "grouter", MoEConfig(router="external", **mcfg), tcfg, routing_source=hashed,
          routing_identity={"kind": "test", "causal": True}, progress=False)
    result = report([tmp_path / "aux", tmp_path / "grouter"], tmp_path / "rep")
    files = {p.name for p in (tmp_path / "rep").iterdir()}
    assert {"report.md", "report.json", "val_loss.png", "maxvio_vs_loss.png", "grad_norm_cv.png",
            "routing_consistency.png"} <= files
    data = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert data["runs"]["grouter"]["router"] == "grouter" and data["runs"]["aux"]["router"] == "aux"
    assert data["speedup"]["best_baseline"] == "aux"
    assert "grouter" in data["speedup"]["runs"]
    assert "| aux | aux |" in result["table"]
    # external routing is fixed: successive probes agree completely
    from grouter.report import RunRecord

    assert all(v == 1.0 for _, v in RunRecord.load(tmp_path / "grouter").probe_consistency())


def test_report_refuses_unfinished_runs(tiny_data, tmp_path):
    mcfg = MoEConfig(vocab_size=tiny_data.vocab_size, max_seq_len=tiny_data.seq_len, d_model=32, n_layers=1,
                     n_heads=2, d_expert=16, n_experts=4, top_k=1)
    tcfg = TrainConfig(steps=4, batch_size=4, eval_every=2, checkpoint_every=2, eval_sequences=4)
    train(tiny_data, tmp_path / "r", mcfg, tcfg, stop_after=2, progress=False)
    with pytest.raises(GrouterError, match="not a finished run"):
        report([tmp_path / "r"], tmp_path / "rep")
    with pytest.raises(GrouterError, match="missing"):
        report([tmp_path / "nope"], tmp_path / "rep")
    assert not (tmp_path / "rep").exists()


def test_speedups_without_baselines_is_empty():
    assert speedups([]) == {}
