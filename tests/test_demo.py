"""A reduced demo, end to end: every stage of the pipeline runs and hands its output to the next."""

import json

from grouter.cli import main
from grouter.demo import DemoConfig, run_demo

TINY_MODEL = dict(d_model=32, n_layers=2, n_heads=2, d_expert=16)


def tiny_demo() -> DemoConfig:
    return DemoConfig(max_bytes_per_domain=120_000, vocab_size=512, seq_len=32,
                      source=dict(TINY_MODEL, n_experts=16, top_k=2), source_steps=12,
                      grouter=dict(d_model=32, n_layers=1, n_heads=2, d_ff=64), distill_steps=12,
                      target_experts=8, tune_tokens=4_000, target=TINY_MODEL, target_steps=12, batch_size=8,
                      ranks=4)


def test_reduced_demo_end_to_end(tmp_path, capsys):
    summary = run_demo(tmp_path / "demo", tiny_demo())
    for key in ("data", "source", "grouter", "routing", "plan", "report"):
        assert (tmp_path / "demo" / key).exists(), key
    assert set(summary["runs"]) == {"grouter", "aux", "auxfree", "random", "stablemoe"}
    report = json.loads((tmp_path / "demo" / "report" / "report.json").read_text())
    assert report["runs"]["grouter"]["tokens"] == report["runs"]["aux"]["tokens"], "equal tokens"
    assert (tmp_path / "demo" / "report" / "val_loss.png").exists()
    assert "| grouter | grouter |" in capsys.readouterr().out
    # a rerun reuses every finished stage
    again = run_demo(tmp_path / "demo", tiny_demo())
    assert again["report"] == summary["report"]
