"""A reduced reproduction, end to end: every run of the paper's comparison, the held-out domain
kept from the source, and the ablations."""

import json
from dataclasses import replace

import pytest

from grouter.cli import main
from grouter.errors import GrouterError
from grouter.formats.dataset import PackedDataset
from grouter.formats.grouter import GrouterConfig
from grouter.model import MoEConfig
from grouter.experiments.reproduce import SCALES, reproduce_config, run_reproduce
from grouter.testing import tiny_reproduction as tiny


@pytest.mark.filterwarnings("ignore:this Grouter is bidirectional")
@pytest.mark.slow
def test_reduced_reproduction_end_to_end(tmp_path, capsys):
    out = tmp_path / "repro"
    summary = run_reproduce(out, tiny())
    report = json.loads((out / "report" / "report.json").read_text())
    runs = report["runs"]
    assert set(runs) == {"grouter", "grouter-raw", "grouter-bidirectional", "grouter-raw-fold-random",
                         "grouter-raw-fold-balance", "aux", "zloss", "auxfree", "hash", "random", "stablemoe",
                         "none"}
    assert len({r["tokens"] for r in runs.values()}) == 1, "equal tokens for every run"
    assert runs["grouter-bidirectional"]["router"] == "grouter (bidirectional, leaks)"
    # the source and the Grouter never saw the held-out domain; the targets validate on it
    source_data = json.loads((out / "source" / "run.json").read_text())["identity"]["data_fingerprint"]
    assert source_data == PackedDataset.open(out / "data-source").fingerprint
    assert PackedDataset.open(out / "data-source").domains == ["prose", "speeches"]
    assert "code" in runs["grouter"]["val_loss_by_domain"]
    assert summary["domains"] == {"source_saw": ["prose", "speeches"], "held_out": "code"}
    assert {"all", "code"} <= set(summary["speedup_by_domain"])
    assert set(summary["fold"]) == {"affinity", "random", "balance"}
    text = (out / "reproduce.md").read_text()
    assert "held-out domain 'code'" in text and "causal vs bidirectional" in text and "folding strategy" in text
    # a head per source layer by default: the Grouter run's routing store has one per source layer
    from grouter.formats.store import RoutingStore
    assert RoutingStore.open(out / "routing-layers-all").heads.layers == tuple(range(tiny().source["n_layers"]))
    assert "a head per source layer" in text
    assert "Grouter vs best baseline" in capsys.readouterr().out
    # rerunning reuses everything and keeps the stage timings of the first invocation
    again = run_reproduce(out, tiny())
    assert again["speedup_by_domain"] == summary["speedup_by_domain"]
    assert again["stage_seconds"] == summary["stage_seconds"]


def test_reproduce_refuses_a_held_out_domain_the_data_lacks(tmp_path):
    with pytest.raises(GrouterError, match="held-out domain 'poetry' must be one of"):
        run_reproduce(tmp_path / "r", replace(tiny(), held_out_domain="poetry"))
    with pytest.raises(GrouterError, match="unknown scale"):
        reproduce_config("huge")


@pytest.mark.parametrize("scale", SCALES)
def test_every_scale_builds_valid_models(scale):
    cfg = reproduce_config(scale)
    MoEConfig(vocab_size=cfg.vocab_size, max_seq_len=cfg.seq_len, **cfg.source).validate()
    MoEConfig(vocab_size=cfg.vocab_size, max_seq_len=cfg.seq_len, n_experts=cfg.target_experts,
              top_k=cfg.source["top_k"], **cfg.target).validate()
    GrouterConfig(vocab_size=cfg.vocab_size, n_experts=cfg.source["n_experts"], top_k=cfg.source["top_k"],
                  **cfg.grouter).validate()
    assert cfg.source["top_k"] < cfg.target_experts < cfg.source["n_experts"]


def test_cli_reproduce_has_scales(capsys):
    with pytest.raises(SystemExit):
        main(["reproduce", "--help"])
    assert "smoke" in capsys.readouterr().out and set(SCALES) == {"smoke", "cpu", "gpu"}
