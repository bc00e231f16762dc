"""A reduced demo, end to end: every stage of the pipeline runs and hands its output to the next."""

import json
from pathlib import Path

import pytest

from grouter.experiments.demo import run_demo
from grouter.testing import tiny_demo


@pytest.mark.slow
def test_reduced_demo_end_to_end(tmp_path, capsys):
    summary = run_demo(tmp_path / "demo", tiny_demo())
    for key in ("data", "source", "grouter", "routing", "plan", "report"):
        assert Path(summary[key]).is_relative_to(tmp_path / "demo") and Path(summary[key]).exists(), key
    assert Path(summary["routing"]).name == "routing-layers-all", "a head per source layer by default"
    assert set(summary["runs"]) == {"grouter-layers-all", "aux", "auxfree", "random", "stablemoe"}
    report = json.loads((tmp_path / "demo" / "report" / "report.json").read_text())
    assert report["runs"]["grouter-layers-all"]["tokens"] == report["runs"]["aux"]["tokens"], "equal tokens"
    assert (tmp_path / "demo" / "report" / "val_loss.png").exists()
    assert "| grouter-layers-all | grouter |" in capsys.readouterr().out
    # a rerun reuses every finished stage
    again = run_demo(tmp_path / "demo", tiny_demo())
    assert again["report"] == summary["report"]
