"""The study (``grouter reproduce --study``): every factor end to end on a tiny configuration, killed
and rerun (finished runs are not redone), baselines shared between cells, the tuning variants'
routing kept, the plan, and the command line."""

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from grouter.cli import main
from grouter.errors import GrouterError
from grouter.experiments.pipeline import Pipeline
from grouter.experiments.study import (FACTORS, StudyConfig, plan, plan_markdown, plan_rows, run_study, study_config,
                                       write_study)
from grouter.formats.dataset import PackedDataset
from grouter.formats.run import read_run
from grouter.train import source_train, train

from grouter.testing import assert_one_line_error
from grouter.testing import run_cli as run
from grouter.testing import assert_nothing_written, last_json
from grouter.testing import tiny_reproduction as tiny

KILL_AT = 11  # the 11th call of train: the base cell (source + 2 seeds × 4 runs) is done, then source/2x's source, then its first run


STUDY_BASELINES = ("random", "aux", "stablemoe")


def tiny_study() -> StudyConfig:
    base = tiny(baselines=STUDY_BASELINES, fold_ablation=(), causal_ablation=False, target_steps=8, source_steps=8,
                distill_steps=8, eval_every=4)
    return StudyConfig(base=base, seeds=2, seeded=("source/2x",), source_ratios=(2.0,),
                       big_source=dict(d_model=96, n_layers=2, n_heads=2, d_expert=32, n_experts=16, top_k=2),
                       token_ratios=(0.5, 2.0), tune_variants=("untuned", "held-out", "keep", "bias"), tune_keep=1.0,
                       many_experts=16, many_top_k=4, many_d_expert=16, many_source_experts=32)


def finished_runs(out: Path) -> dict[Path, int]:
    """Every finished training run under ``out`` (sources, distillations, targets): its run.json's mtime."""
    return {p.parent: p.stat().st_mtime_ns for p in out.rglob("run.json") if read_run(p.parent)["status"] == "complete"}


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """The whole tiny study, killed during its 12th training run and rerun to the end."""
    out = tmp_path_factory.mktemp("study") / "s"
    real, calls = Pipeline.stage, []

    def killed(pipe, name, what, stage, **kw):
        if stage not in (train, source_train):
            return real(pipe, name, what, stage, **kw)
        calls.append(pipe.out / name)
        if len(calls) == KILL_AT:
            real(pipe, name, what, stage, stop_after=2, **kw)  # part of a run, then the kill
            raise KeyboardInterrupt
        return real(pipe, name, what, stage, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Pipeline, "stage", killed)
        with pytest.raises(KeyboardInterrupt):
            run_study(out, "all", tiny_study())
    partial = json.loads((out / "study.json").read_text())
    before = finished_runs(out)
    result = run_study(out, "all", tiny_study())
    return {"out": out, "partial": partial, "before": before, "killed": calls[-1], "result": result,
            "summary": json.loads((out / "study.json").read_text())}


def cells(study) -> dict[str, dict]:
    return {c["id"]: c for c in study["summary"]["cells"]}


@pytest.mark.slow
def test_every_factor_runs_end_to_end(study):
    out, all_cells = study["out"], cells(study)
    domains = {"all", *PackedDataset.open(out / "data").domains}
    assert "code" in domains and len(domains) >= 4
    assert {c["factor"] for c in all_cells.values()} == set(FACTORS)
    assert all(c["status"] == "done" for c in all_cells.values())
    for c in all_cells.values():
        assert set(c["by_domain"]) == domains
        for values in c["by_domain"].values():
            assert len(values["speedup"]) == len(values["gap"]) == c["seeds"]
            assert set(values["best_baseline"]) <= set(STUDY_BASELINES)
    assert all_cells["source/1x"]["seeds"] == all_cells["source/2x"]["seeds"] == 2
    assert all_cells["source/bigger"]["seeds"] == 1
    assert (out / "study.md").read_text().count("pending") == 0
    assert {p.name for p in (out / "plots").iterdir()} == {f"{f}.png" for f in FACTORS}
    assert (out / "cells" / "tokens" / "2x" / "report" / "report.md").exists()
    assert set(study["result"]["cells"]) == set(all_cells)


@pytest.mark.slow
def test_a_killed_study_resumes_without_redoing_finished_runs(study):
    partial = {c["id"]: c["status"] for c in study["partial"]["cells"]}
    assert partial["source/1x"] == "done" and partial["source/2x"] == "pending"
    after = finished_runs(study["out"])
    assert {path: after[path] for path in study["before"]} == study["before"], "a finished run was trained again"
    assert study["killed"] in after and study["killed"] not in study["before"]


@pytest.mark.slow
def test_cells_share_their_baselines_and_data_order(study):
    all_cells = cells(study)
    base_target = all_cells["source/1x"]["target"]
    users = [c["id"] for c in all_cells.values() if f"{base_target}/aux-s0" in c["runs"][0]]
    assert {"source/1x", "source/2x", "source/bigger", "tuning/keep", "heads/per-layer", "tokens/1x"} <= set(users)
    assert len({c["target"] for c in all_cells.values() if c["factor"] == "tokens"}) == 3  # their own baselines
    assert all_cells["heads/shared-2x"]["runs"][0] == all_cells["source/2x"]["runs"][0]  # the same runs
    assert all_cells["heads/per-layer-2x"]["pipeline"] == all_cells["source/2x"]["pipeline"]  # the same source
    best = {t: all_cells[f"tokens/{t}-per-layer-2x"] for t in ("0.5x", "1x", "2x")}  # the best, across tokens:
    assert best["1x"]["runs"][0] == all_cells["heads/per-layer-2x"]["runs"][0]  # the heads cell's runs,
    for t, c in best.items():  # and the tokens cells' baselines
        assert c["runs"][0][1:] == all_cells[f"tokens/{t}"]["runs"][0][1:] and c["series"] == "per-layer"
    for seed, names in enumerate(all_cells["source/2x"]["runs"]):
        identities = [read_run(study["out"] / "runs" / name)["identity"] for name in names]
        assert {i["train"]["seed"] for i in identities} == {seed}, "one seed, hence one data order, per pairing"
        assert len({json.dumps(i["train"]) for i in identities}) == 1, "equal tokens and schedule"


@pytest.mark.slow
def test_tuning_variants_report_the_routing_they_keep(study):
    tuning = {c["key"]: c for c in cells(study).values() if c["factor"] == "tuning"}
    assert set(tuning) == {"untuned", "all", "held-out", "keep", "bias", "captured-on-all"}
    domains = {"all", *PackedDataset.open(study["out"] / "data").domains}
    assert tuning["untuned"]["routing_kept"] == dict.fromkeys(domains, 1.0)
    for c in tuning.values():
        assert set(c["routing_kept"]) == domains
        assert all(0.0 <= v <= 1.0 for v in c["routing_kept"].values())
    assert tuning["held-out"]["tune_report"]["domain"] == "code"
    assert tuning["keep"]["tune_report"]["keep"] == tiny_study().tune_keep
    assert tuning["bias"]["tune_report"]["method"] == "bias"
    assert "top-k sets kept (code)" in (study["out"] / "study.md").read_text()


@pytest.mark.slow
def test_the_captured_on_all_cell_distils_on_the_held_out_domain_from_the_same_source(study):
    """The user's case: the base's source (never trained on code) captured, distilled and folded on all
    data, code included; the base cell captured on the source's data only."""
    from grouter.formats.targets import Targets
    base = study["out"] / "pipelines" / "base"
    mine, theirs = Targets.open(base / "targets-on-data"), Targets.open(base / "targets")
    assert "code" in mine.data.domains and "code" not in theirs.data.domains
    assert mine.manifest["source"] == theirs.manifest["source"]
    record = (base / "grouter-folded-on-data" / ".grouter-command.json").read_text()
    from grouter.runner import state_of
    assert state_of(mine.data.path) in record and state_of(theirs.data.path) not in record, "folded on all data"
    cell = cells(study)["tuning/captured-on-all"]
    assert cell["runs"][0][0].endswith("grouter-base-on-data-s0") and cell["runs"][0][1:] == cells(study)["tuning/all"]["runs"][0][1:]


@pytest.mark.slow
def test_a_study_directory_holds_one_configuration(study):
    with pytest.raises(GrouterError, match="holds a study with another configuration"):
        run_study(study["out"], "heads", replace(tiny_study(), tune_keep=2.0))
    with pytest.raises(GrouterError, match="unknown study 'nonsense'"):
        run_study(study["out"], "nonsense", tiny_study())


@pytest.mark.slow
def test_more_seeds_for_a_cell_run_only_the_new_seeds(study, tmp_path):
    """A study copied elsewhere and given another seed for one cell: the study reports the seeds still
    owed, trains only that seed's Grouter run (its baseline is the base cell's), and records the seeds."""
    out = tmp_path / "copy"
    shutil.copytree(study["out"], out)
    more = replace(tiny_study(), seeded=(*tiny_study().seeded, "heads/per-layer"))
    write_study(out, more)
    assert "| 1 of 2 seeds |" in (out / "study.md").read_text()
    before = finished_runs(out)
    run_study(out, "heads", more)
    trained = set(finished_runs(out)) - set(before)
    target = cells(study)["heads/per-layer"]["target"]
    assert trained == {out / "runs" / target / "grouter-base-layers-all-s1"}
    assert json.loads((out / "cells/heads/per-layer/cell.json").read_text())["seeds"] == 2
    assert json.loads((out / "study-config.json").read_text())["config"]["seeded"] == list(more.seeded)
    run_study(out, "heads", tiny_study())  # fewer seeds asked: the cell with more is finished
    assert set(finished_runs(out)) == set(before) | trained


def test_the_plan():
    """Each factor but scale has the base cell once; cells sharing a pipeline agree on everything it makes;
    the cpu plan fits about 4.7 hours and is the one docs/study.md shows."""
    cfg = study_config("cpu")
    assert cfg.base.baselines == STUDY_BASELINES
    cells_ = plan(cfg)
    for factor in FACTORS:  # scale departs from the best cell (a head per layer, the strongest source)
        assert sum(c.base for c in cells_ if c.factor == factor) == (factor != "scale")
    scale = {c.key: c for c in cells_ if c.factor == "scale"}
    assert list(scale) == ["full", "m2k", "m4k", "g1", "g2"], "M = 8k is every expert of the cpu source"
    assert scale["full"].grouter_run == next(c for c in cells_ if c.id == "heads/per-layer-8x").grouter_run
    assert (scale["m2k"].top_m, scale["g2"].head_groups, scale["g2"].grouter_run) == (8, 2, "grouter-source-8x-layers-all-g2")
    made = ("source", "source_steps", "grouter", "distill_steps", "target_experts", "tune_tokens")
    for c in cells_:
        shares = [o for o in cells_ if o.pipeline == c.pipeline]
        assert all(getattr(o.cfg, f) == getattr(c.cfg, f) for o in shares for f in made), c.id
    rows = plan_rows(cfg)
    assert 260 <= sum(r["minutes"] for r in rows) <= 300
    docs = Path(__file__).resolve().parents[1] / "docs" / "study.md"
    assert "\n".join(plan_markdown(rows)) in docs.read_text()


# -- the command line ---------------------------------------------------------------------------------

def test_cli_study_help(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["reproduce", "--study", "tokens", "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert "--study NAME" in text and all(f in text for f in FACTORS)


def test_cli_study_refuses_bad_input(capsys, tmp_path):
    out = tmp_path / "s"
    code, _, err = run(capsys, "reproduce", "--study", "heads,nonsense", "--out", str(out))
    assert_one_line_error(code, err, "unknown study 'nonsense'; choose all, a factor (source, tuning, heads")
    assert_nothing_written(out)
    code, _, err = run(capsys, "reproduce", "--study", "heads", "--scale", "gpu", "--out", str(out))
    assert_one_line_error(code, err, "the study has scales smoke, cpu, not 'gpu'")
    code, _, err = run(capsys, "reproduce", "--study", "heads", "--shared-head", "--out", str(out))
    assert_one_line_error(code, err, "--shared-head is for grouter reproduce; the study's base cell has one shared head")
    assert_nothing_written(out)


@pytest.mark.slow
def test_cli_study_reuses_a_finished_study(capsys, monkeypatch, study):
    monkeypatch.setattr("grouter.experiments.reproduce.study_config", lambda scale, **overrides: replace(
        tiny_study(), base=replace(tiny_study().base, **overrides)))
    code, stdout, err = run(capsys, "reproduce", "--study", "heads", "--scale", "smoke", "--out", str(study["out"]),
                            "--json")
    assert code == 0, err
    result = last_json(stdout)
    assert set(result["cells"]) == set(cells(study)) and result["study"] == "heads"
    assert "reusing" in err and "training" not in err.replace("training the", "")
