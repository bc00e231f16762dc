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


def test_demo_kind_names_the_grouter_a_demo_made(tmp_path):
    """Tools reading a demo's artifacts find its default per-layer Grouter, else the shared head's, else
    say what to run."""
    from grouter.errors import GrouterError
    from grouter.experiments.demo import demo_kind

    with pytest.raises(GrouterError, match="holds no demo routing store"):
        demo_kind(tmp_path)
    for name in ("routing", "routing-layers-all"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "manifest.json").write_text("{}")
        assert demo_kind(tmp_path) == name.removeprefix("routing")
