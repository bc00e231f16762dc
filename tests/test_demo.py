"""A reduced demo, end to end: every stage of the pipeline runs and hands its output to the next."""

import json

import pytest

from grouter.experiments.demo import run_demo
from grouter.testing import tiny_demo


@pytest.mark.slow
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
