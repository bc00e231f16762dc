"""The report: tables, plots, tokens-to-loss speedup computed from real run logs."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from grouter.errors import GrouterError
from grouter.model import MoEConfig
from grouter.report import RunRecord, report, speedups, tokens_to_reach
from grouter.routers import Routing
from grouter.loop import TrainConfig
from grouter.testing import train_run


def test_tokens_to_reach_interpolates():
    curve = [(100, 5.0), (200, 3.0), (300, 2.0)]
    assert tokens_to_reach(curve, 4.0) == pytest.approx(150)
    assert tokens_to_reach(curve, 2.0) == pytest.approx(300)
    assert tokens_to_reach(curve, 1.0) is None


def _record(name: str, router: str, losses: dict[str, list[float]]) -> RunRecord:
    """A run whose per-domain validation curves are given; `all` is their mean."""
    evals = [{"tokens": 100 * (i + 1), "val_loss": float(np.mean([v[i] for v in losses.values()])),
              "val_loss_by_domain": {d: v[i] for d, v in losses.items()}} for i in range(3)]
    return RunRecord(name, Path(name), router, {}, [], evals)


def test_speedups_per_domain_pick_the_best_baseline_of_each_domain():
    runs = [_record("aux", "aux", {"seen": [5, 4, 3], "held": [6, 5, 4]}),
            _record("hash", "hash", {"seen": [5, 4.5, 3.5], "held": [6, 4.5, 3.8]}),
            _record("g", "grouter", {"seen": [4, 2, 1.5], "held": [6, 5.5, 5]})]
    seen, held = speedups(runs, "seen"), speedups(runs, "held")
    assert seen["best_baseline"] == "aux" and seen["runs"]["g"]["speedup"] == pytest.approx(2.0)
    assert held["best_baseline"] == "hash" and held["runs"]["g"]["speedup"] is None  # never reaches 3.8
    assert held["runs"]["g"]["final_val_loss_gap"] == pytest.approx(1.2)
    assert speedups(runs)["runs"]["g"]["speedup"] == pytest.approx(300 / 250)  # the mean curve reaches 3.5 at 250


def test_report_compares_runs(tiny_data, tmp_path):
    mcfg = dict(vocab_size=tiny_data.vocab_size, max_seq_len=tiny_data.seq_len, d_model=32, n_layers=2, n_heads=2,
                d_expert=32, n_experts=8, top_k=2)
    tcfg = TrainConfig(steps=20, batch_size=8, lr=1e-2, warmup_steps=2, eval_every=5, checkpoint_every=10,
                       eval_sequences=8)

    def hashed(split, idx):
        ids = torch.from_numpy(tiny_data.split(split).sequences(idx)[:, :-1])
        experts = torch.stack([(ids * 5 + j) % 8 for j in range(2)], dim=-1)
        return Routing(experts, torch.full(experts.shape, 0.5))

    train_run(tiny_data, tmp_path / "aux", MoEConfig(router="aux", **mcfg), tcfg)
    train_run(tiny_data, tmp_path / "grouter", MoEConfig(router="external", **mcfg), tcfg, routing_source=hashed,
          routing_identity={"kind": "test", "causal": True})
    result = report(tmp_path / "rep", runs=[tmp_path / "aux", tmp_path / "grouter"])
    files = {p.name for p in (tmp_path / "rep").iterdir()}
    assert {"report.md", "report.json", "val_loss.png", "val_loss_by_domain.png", "maxvio_vs_loss.png",
            "grad_norm_cv.png", "routing_consistency.png"} <= files
    data = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert data["runs"]["grouter"]["router"] == "grouter" and data["runs"]["aux"]["router"] == "aux"
    # the speedup: tokens the baseline took to reach its final val loss over the tokens the Grouter run took
    curve = lambda run: [(e["tokens"], e["val_loss"]) for e in RunRecord.load(tmp_path / run).evals]  # noqa: E731
    assert [t for t, _ in curve("aux")] == [t for t, _ in curve("grouter")] == [5 * 8 * 32 * i for i in (1, 2, 3, 4)]
    target = curve("aux")[-1][1]
    reached = tokens_to_reach(curve("grouter"), target)
    speed = data["speedup"]
    assert speed["best_baseline"] == "aux" and speed["target_val_loss"] == target
    assert speed["baseline_tokens"] == tokens_to_reach(curve("aux"), target)
    assert speed["runs"]["grouter"]["tokens_to_target"] == reached
    assert speed["runs"]["grouter"]["speedup"] == (None if reached is None else
                                                   pytest.approx(speed["baseline_tokens"] / reached))
    assert speed["runs"]["grouter"]["final_val_loss_gap"] == pytest.approx(curve("grouter")[-1][1] - target)
    assert "| aux | aux |" in result["table"]
    assert set(data["speedup_by_domain"]) == {"all", *tiny_data.domains}
    # external routing is fixed: successive probes agree completely
    assert all(v == 1.0 for _, v in RunRecord.load(tmp_path / "grouter").probe_consistency())


def test_report_refuses_unfinished_runs(tiny_data, tmp_path):
    mcfg = MoEConfig(vocab_size=tiny_data.vocab_size, max_seq_len=tiny_data.seq_len, d_model=32, n_layers=1,
                     n_heads=2, d_expert=16, n_experts=4, top_k=1)
    tcfg = TrainConfig(steps=4, batch_size=4, eval_every=2, checkpoint_every=2, eval_sequences=4)
    train_run(tiny_data, tmp_path / "r", mcfg, tcfg, stop_after=2)
    with pytest.raises(GrouterError, match="not a finished run"):
        report(tmp_path / "rep", runs=[tmp_path / "r"])
    with pytest.raises(GrouterError, match="nope not found"):
        report(tmp_path / "rep", runs=[tmp_path / "nope"])
    assert not (tmp_path / "rep").exists()


def test_speedups_without_baselines_is_empty():
    assert speedups([]) == {}
