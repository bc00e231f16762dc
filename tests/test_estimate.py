"""``grouter estimate``: the byte formulas equal what capture, dispatch and data write; the FLOPs and the
presets' headline sizes; the command line."""

import shutil

import pytest

from grouter.capture import capture
from grouter.estimate import PRESETS, Options, check_artifacts, data_bytes_per_token, estimate, grouter_params
from grouter.formats.targets import bytes_per_token as targets_bytes_per_token
from grouter.routers import Heads
from grouter.model import MoEConfig, MoELM
from grouter.testing import assert_one_line_error, last_json, run_cli, synthetic_store


@pytest.fixture(scope="module")
def pipeline_dir(tiny_data, tmp_path_factory):
    """A directory shaped like a pipeline's --out: the data, full and compact targets of a 3-layer source, a
    one-head and a per-layer routing store."""
    root = tmp_path_factory.mktemp("pipeline")
    shutil.copytree(tiny_data.path, root / "data")
    cfg = MoEConfig(vocab_size=tiny_data.vocab_size, max_seq_len=tiny_data.seq_len, d_model=32, n_layers=3, n_heads=2,
                    d_expert=16, n_experts=8, top_k=2, router="aux")
    MoELM(cfg).save_pretrained(root / "source", extra={"data": {"tokenizer_sha256": tiny_data.meta["tokenizer_sha256"]}})
    capture(root / "targets-layers-all", source=root / "source", data=tiny_data, layers="all", top_m=0, progress=False)
    capture(root / "targets-layers-all-m4", source=root / "source", data=tiny_data, layers="all", top_m=4,
            progress=False)
    synthetic_store(tiny_data, root / "routing", 8, 2, clusters=4)
    synthetic_store(tiny_data, root / "routing-layers-all", 8, 2, clusters=4, heads=Heads((0, 1, 2), 3))
    return root


def test_byte_formulas_equal_the_artifacts_on_disk(pipeline_dir, tiny_data):
    rows = {r["directory"]: r for r in check_artifacts(pipeline_dir)}
    assert set(rows) == {"data", "targets-layers-all", "targets-layers-all-m4", "routing", "routing-layers-all"}
    tokens = (len(tiny_data.split("train")) + len(tiny_data.split("val"))) * tiny_data.seq_len
    assert rows["targets-layers-all"]["estimated_bytes"] == tokens * 3 * 8 * 2  # float16 per expert and layer
    assert rows["targets-layers-all-m4"]["estimated_bytes"] == tokens * 3 * (4 * (2 + 1) + 4)
    assert rows["routing"]["estimated_bytes"] == tokens * 2 * (1 + 2)  # k uint8 ids and k 16-bit weights
    assert rows["routing-layers-all"]["estimated_bytes"] == 3 * rows["routing"]["estimated_bytes"]
    for name in ("targets-layers-all", "targets-layers-all-m4", "routing", "routing-layers-all"):
        assert rows[name]["ratio"] == 1.0, name  # exact: the payload files are these bytes
    # the data: token ids and the sequence index, plus the tokenizer and the shared token between packed runs
    assert 1.0 < rows["data"]["ratio"] < 1.0 + 2e-3 + (pipeline_dir / "data" / "tokenizer.json").stat().st_size / (
        tokens * data_bytes_per_token(tiny_data.vocab_size, tiny_data.seq_len))


def test_the_papers_setting():
    """The issue's own figures: every score of 48 layers x 128 experts in float16 is 12 KiB per token, about
    32 TB for 2.6B tokens (the default top 2k = 16 about 6.5 TB); 48 heads of top-8 are 1,152 B per token,
    about 35 TB for 30B tokens."""
    stages = {r["stage"]: r for r in estimate(PRESETS["paper"], Options(top_m=0))["stages"]}
    assert stages["capture"]["bytes_per_token"] == 48 * 128 * 2 == 12_288
    assert 31e12 < stages["capture"]["bytes"] < 33e12
    default = {r["stage"]: r for r in estimate(PRESETS["paper"], Options())["stages"]}
    assert default["capture"]["bytes_per_token"] == targets_bytes_per_token(48, 128, 16) == 48 * (16 * 3 + 4)
    assert stages["dispatch"]["bytes_per_token"] == 1_152 and 34e12 < stages["dispatch"]["bytes"] < 35e12
    assert stages["capture"]["flops"] == pytest.approx(2.6e9 * (2 * 3.3e9 + 2 * 48 * 4096 * 2048))
    compact = {r["stage"]: r for r in estimate(PRESETS["paper"], Options(top_m=32, head_groups=4))["stages"]}
    assert compact["capture"]["bytes_per_token"] == targets_bytes_per_token(48, 128, 32) == 48 * (32 * 3 + 4)
    assert compact["dispatch"]["bytes_per_token"] == 4 * 8 * 3


def test_grouter_parameters_counted_on_the_meta_device():
    """The paper's Grouter: about 60M parameters, 50M of them the embedding (we count ours)."""
    total, matmul = grouter_params(PRESETS["paper"], 1)
    assert 50e6 < total < 62e6 and total - matmul == 151_936 * 320
    per_layer, _ = grouter_params(PRESETS["paper"], 48)
    assert per_layer - total == 47 * 320 * 128  # a 320 x 128 head per further layer


def test_cli_estimate_and_artifacts(capsys, pipeline_dir):
    code, out, _ = run_cli(capsys, "estimate", "--preset", "small", "--top-m", "16", "--artifacts", str(pipeline_dir),
                           "--json")
    assert code == 0
    result = last_json(out)
    assert result["setting"]["name"] == "small" and len(result["artifacts"]) == 5
    assert {r["stage"] for r in result["stages"]} >= {"data", "capture", "distill", "tune", "dispatch"}
    code, out, _ = run_cli(capsys, "estimate")
    assert code == 0 and "| capture | targets: 48 layers, the top 16 scores |" in out and "6.5 TB" in out


@pytest.mark.parametrize("argv, needle", [
    (["--top-m", "4"], "must keep at least the source's top-k (8)"),
    (["--top-m", "128"], "fewer than its 128 experts"),
    (["--head-groups", "49"], "more than the source's 48 MoE layers"),
    (["--preset", "huge"], "invalid choice"),
])
def test_cli_estimate_refuses_bad_input(capsys, argv, needle):
    code, _, err = run_cli(capsys, "estimate", *argv)
    assert_one_line_error(code, err, needle)


def test_cli_estimate_refuses_a_directory_without_artifacts(capsys, tmp_path):
    code, _, err = run_cli(capsys, "estimate", "--artifacts", str(tmp_path))
    assert_one_line_error(code, err, "holds no data, targets or routing directory")


def test_the_planner_fit_reproduces_its_measured_runs():
    """Least squares over the four runs: the bytes objective's CPU and memory within 5 %, the step-time
    objective's (bytes plus one term for its stage) within 20 %."""
    from dataclasses import replace

    from grouter.estimate import PLANNER_RUNS, stage_table

    for n, t, cpu, gib, steptime_cpu, steptime_gib in PLANNER_RUNS:
        s = replace(PRESETS["paper"], seq_len=t, target_tokens=n * t, ranks=(64,))
        rows = {r["stage"]: r for r in stage_table(s, 0, 1, 1e15, 80, 2e9)}
        assert rows["place (bytes)"]["cpu_seconds"][64] == pytest.approx(cpu, rel=0.05)
        assert rows["place (bytes)"]["memory_gib"][64] == pytest.approx(gib, rel=0.05)
        assert rows["place (steptime)"]["cpu_seconds"][64] == pytest.approx(steptime_cpu, rel=0.2)
        assert rows["place (steptime)"]["memory_gib"][64] == pytest.approx(steptime_gib, rel=0.2)


def test_the_planners_memory_follows_its_bounded_refinement_sample():
    """The sample is place's: up to refine_limit sequences in whole global batches, at least one; so the
    memory grows with the sequences, not with their length or the heads, once the sample is capped."""
    from grouter.estimate import planner_features
    from grouter.place import REFINE_SLOTS, refine_limit

    slots = 4096 * 8 * 48  # the paper's sequence, 48 heads: refine_limit is under one global batch
    assert refine_limit(slots) < 16 * 64
    assert planner_features(7e6, 4096, 8, 48, 64)["memory"][0] == 16 * 64 * slots
    one_head = planner_features(7e6, 4096, 8, 1, 64)["memory"][0]
    assert one_head <= REFINE_SLOTS and one_head == refine_limit(4096 * 8) // 1024 * 1024 * 4096 * 8
    assert planner_features(1000, 32, 8, 1, 64)["memory"][0] == 1000 * 32 * 8  # fewer sequences than the limit