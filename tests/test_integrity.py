"""Integrity end to end, through the command line: corruption that keeps a file's size is found
before use, unfinished runs are refused downstream, outputs are locked, inputs never deleted,
nonsense settings refused at parse time, and every failure is one ``error:`` line (JSON with --json).

One module-scoped pipeline on the tiny dataset (source → capture → distill → fold → dispatch →
place, tiny sizes); every test works on copies of its artifacts.
"""

import contextlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from grouter.artifacts import output_lock, read_json
from grouter.cli import main
from grouter.data import PackConfig, pack_documents
from grouter.formats.dataset import PackedDataset
from grouter.formats.run import read_run
from grouter.integrity import CheckedFile, file_checksum
from grouter.loop import TrainConfig
from grouter.model import MoEConfig, MoELM
from grouter.routers import Routing
from grouter.testing import train_run

from grouter.testing import stdlib_documents
from grouter.testing import SMALL_TRAIN, assert_nothing_written, assert_one_line_error

SRC = str(Path(__file__).resolve().parents[1] / "src")
CORRUPT = r"corrupt|checksum|altered|modified"
TINY_GROUTER = ["--d-model", "32", "--layers", "1", "--heads", "2", "--d-ff", "64", "--steps", "6", "--batch-size", "4",
                "--eval-every", "3", "--checkpoint-every", "3"]


def run(_capsys, *argv) -> tuple[int, str, str]:
    """``grouter ARGV`` in this process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


def ok(capsys, *argv) -> dict:
    code, out, err = run(capsys, *argv, "--json")
    assert code == 0, err
    return json.loads(out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def pipeline(tiny_data, tmp_path_factory):
    """The artifacts of every stage, made through the CLI once."""
    root = tmp_path_factory.mktemp("integrity")
    d = str(tiny_data.path)
    capsys = None
    ok(capsys, "source", "train", "--data", d, "--out", str(root / "source"), *SMALL_TRAIN)
    ok(capsys, "capture", "--source", str(root / "source"), "--data", d, "--out", str(root / "targets"))
    ok(capsys, "distill", "--targets", str(root / "targets"), "--out", str(root / "grouter"), *TINY_GROUTER)
    ok(capsys, "fold", "--grouter", str(root / "grouter"), "--experts", "4", "--top-k", "2", "--data", d,
       "--out", str(root / "folded"), "--max-sequences", "64")
    ok(capsys, "dispatch", "--grouter", str(root / "folded"), "--data", d, "--out", str(root / "routing"))
    ok(capsys, "place", "--routing", str(root / "routing"), "--ranks", "2", "--out", str(root / "plan"))
    return root


def copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def flip_byte(path: Path, seed: int) -> int:
    """Flip one bit of one byte at a seeded random offset; the file keeps its size."""
    data = bytearray(path.read_bytes())
    at = int(np.random.default_rng(seed).integers(len(data)))
    data[at] ^= 0x10
    path.write_bytes(bytes(data))
    return at


def test_checked_file_finds_a_flip_only_in_the_chunks_it_reads(tmp_path):
    path = tmp_path / "blob"
    path.write_bytes(np.random.default_rng(0).bytes(10_000))
    checksum = file_checksum(path, chunk_bytes=1024)
    flip_byte(path, 0)  # offset 8506 with this seed: chunk 8
    checked = CheckedFile(path, checksum, "blob", "re-create it")
    checked.check(0, 8 * 1024)  # chunks 0..7: untouched
    assert checked.verified_fraction == 0.8
    with pytest.raises(Exception, match="bytes 8192..9215 do not match"):
        checked.check_rows(np.array([100, 8500]), 10)
    with pytest.raises(Exception, match="truncated"):
        path.write_bytes(path.read_bytes()[:-1])
        CheckedFile(path, checksum, "blob", "re-create it")


CASES = {  # artifact file to flip -> the command that consumes it
    "dataset tokens": ("data", "train.tokens", "train"),
    "dataset index": ("data", "train.index.npy", "train"),
    "dataset tokenizer": ("data", "tokenizer.json", "capture"),
    "dataset manifest": ("data", "meta.json", "train"),
    "targets": ("targets", "train.topm", "distill"),  # capture's default: compact targets
    "targets' experts": ("targets", "train.topm_ids", "distill"),
    "targets' rest": ("targets", "train.rest", "distill"),
    "targets manifest": ("targets", "targets.json", "distill"),
    "Grouter weights": ("folded", "model.safetensors", "dispatch"),
    "Grouter config": ("folded", "config.json", "dispatch"),
    "distill run checkpoint": ("grouter", "checkpoint/model.safetensors", "fold"),
    "source checkpoint": ("source", "checkpoint/model.safetensors", "capture"),
    "routing store ids": ("routing", "train.ids", "train --routing"),
    "routing store weights": ("routing", "train.weights", "train --routing"),
    "placement plan": ("plan", "plan.json", "ep"),
}


def consume(capsys, command: str, art: dict[str, Path], out: Path):
    d = str(art["data"])
    argv = {
        "train": ["train", "--data", d, "--router", "aux", *SMALL_TRAIN],
        "capture": ["capture", "--source", str(art["source"]), "--data", d],
        "distill": ["distill", "--targets", str(art["targets"]), *TINY_GROUTER],
        "dispatch": ["dispatch", "--grouter", str(art["folded"]), "--data", d],
        "fold": ["fold", "--grouter", str(art["grouter"]), "--experts", "4", "--top-k", "2", "--data", d,
                 "--max-sequences", "16"],
        "train --routing": ["train", "--data", d, "--routing", str(art["routing"]), *SMALL_TRAIN],
        "ep": ["ep", "--data", d, "--routing", str(art["routing"]), "--plan", str(art["plan"]), "--steps", "1",
               "--device", "cpu"],
    }[command]
    return run(capsys, *argv, "--out", str(out))


@pytest.mark.parametrize("case", list(CASES))
def test_a_flipped_byte_is_refused_by_its_consumer(capsys, pipeline, tiny_data, tmp_path, case):
    kind, file, command = CASES[case]
    art = {name: pipeline / name for name in ("source", "targets", "grouter", "folded", "routing", "plan")}
    art["data"] = tiny_data.path
    art[kind] = copy(art[kind], tmp_path / kind)  # a copy has the same content: it is bound like the original
    flip_byte(art[kind] / file, seed=zlib.crc32(case.encode()))
    code, _, err = consume(capsys, command, art, tmp_path / "out")
    assert_one_line_error(code, err, "")
    assert re.search(CORRUPT, err.lower()), err
    out = tmp_path / "out"  # nothing a later stage would accept: no output, or a run that never finished
    assert not out.exists() or (read_run(out)["status"] == "running" and not (out / "checkpoint").exists())


@pytest.mark.parametrize("file", ["model.safetensors", "optimizer.safetensors", "trainer_state.json", "optimizer.json"])
def test_a_flipped_byte_in_a_training_checkpoint_is_refused_on_resume(capsys, tiny_data, tmp_path, file):
    argv = ["train", "--data", str(tiny_data.path), "--router", "aux", "--out", str(tmp_path / "r"), *SMALL_TRAIN]
    cfg = MoEConfig(vocab_size=tiny_data.vocab_size, max_seq_len=tiny_data.seq_len, d_model=64, n_layers=2,
                    n_heads=4, d_expert=64, n_experts=8, top_k=2)  # the tiny preset: the command's own run
    tcfg = TrainConfig(steps=6, batch_size=4, eval_every=3, checkpoint_every=3, eval_sequences=4)
    train_run(tiny_data, tmp_path / "r", cfg, tcfg, stop_after=3)  # as if killed after step 3
    flip_byte(tmp_path / "r" / "checkpoint" / file, seed=zlib.crc32(file.encode()))
    code, _, err = run(capsys, *argv)
    assert_one_line_error(code, err, "")
    assert re.search(CORRUPT, err.lower()), err
    assert read_run(tmp_path / "r")["status"] == "running"


def test_verify_checks_every_artifact_and_finds_a_flip(capsys, pipeline, tmp_path):
    for name, kind in (("source", "training run"), ("targets", "targets"), ("grouter", "training run"),
                       ("folded", "model"), ("routing", "routing store"), ("plan", "placement plan")):
        result = ok(capsys, "verify", str(pipeline / name))
        assert result["kind"] == kind and result["bytes_checked"] > 0
    store = copy(pipeline / "routing", tmp_path / "routing")
    flip_byte(store / "val.weights", seed=1)
    code, _, err = run(capsys, "verify", str(store))
    assert_one_line_error(code, err, "val.weights is corrupt: bytes")


def test_a_plan_from_another_routing_store_is_refused(capsys, pipeline, tiny_data, tmp_path):
    ok(capsys, "dispatch", "--grouter", str(pipeline / "folded"), "--data", str(tiny_data.path), "--k", "1",
       "--out", str(tmp_path / "routing-k1"))
    ok(capsys, "place", "--routing", str(tmp_path / "routing-k1"), "--ranks", "2", "--out", str(tmp_path / "plan-k1"))
    code, _, err = run(capsys, "ep", "--data", str(tiny_data.path), "--routing", str(pipeline / "routing"),
                       "--plan", str(tmp_path / "plan-k1"), "--steps", "1", "--device", "cpu",
                       "--out", str(tmp_path / "ep"))
    assert_one_line_error(code, err, "top-1")  # k differs: refused before anything runs
    # same k, other Grouter: the fingerprints differ
    torch.manual_seed(1)
    other = MoELM  # noqa: F841 (keeps the import used when the next lines are read alone)
    from grouter.network import Grouter

    g = Grouter.from_pretrained(pipeline / "folded")
    with torch.no_grad():
        g.head.weight.mul_(-1)
    g.save_pretrained(tmp_path / "other-grouter")
    ok(capsys, "dispatch", "--grouter", str(tmp_path / "other-grouter"), "--data", str(tiny_data.path),
       "--out", str(tmp_path / "routing-other"))
    code, _, err = run(capsys, "ep", "--data", str(tiny_data.path), "--routing", str(tmp_path / "routing-other"),
                       "--plan", str(pipeline / "plan"), "--steps", "1", "--device", "cpu",
                       "--out", str(tmp_path / "ep2"))
    assert_one_line_error(code, err, "another routing store")


def small_model(data) -> MoEConfig:
    return MoEConfig(vocab_size=data.vocab_size, max_seq_len=data.seq_len, d_model=32, n_layers=1, n_heads=2,
                     d_expert=16, n_experts=4, top_k=1, router="external")


def test_a_diverging_run_keeps_its_last_good_checkpoint(tiny_data, tmp_path):
    """Routing weights turn NaN at step 5: the run stops there, and the step-4 checkpoint is the one
    an uninterrupted 4-step run writes."""
    calls = {"train": 0}

    def routing(split, idx):
        shape = (len(idx), tiny_data.seq_len, 1)
        weights = torch.ones(shape)
        if split == "train":
            calls["train"] += 1
            if calls["train"] > 5:
                weights = torch.full(shape, float("nan"))
        return Routing(torch.zeros(shape, dtype=torch.long), weights)

    cfg = TrainConfig(steps=8, batch_size=4, eval_every=2, checkpoint_every=2, eval_sequences=4, device="cpu")
    with pytest.raises(Exception, match="became nan at step 5.*step 4.* is kept"):
        train_run(tiny_data, tmp_path / "r", small_model(tiny_data), cfg, routing_source=routing)
    calls["train"] = -10**9  # never NaN
    train_run(tiny_data, tmp_path / "ref", small_model(tiny_data), cfg, routing_source=routing, stop_after=4)
    kept = read_json(tmp_path / "r" / "checkpoint" / "trainer_state.json", "state")
    assert kept["step"] == 4
    a = MoELM.from_pretrained(tmp_path / "r" / "checkpoint").state_dict()
    b = MoELM.from_pretrained(tmp_path / "ref" / "checkpoint").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_overwrite_never_deletes_an_input(capsys, tiny_data, tmp_path):
    data = copy(tiny_data.path, tmp_path / "data")
    before = sorted(p.name for p in data.iterdir())
    code, _, err = run(capsys, "data", "subset", "--data", str(data), "--domains", "code", "--out", str(data),
                       "--overwrite")
    assert_one_line_error(code, err, "is also an input")
    code, _, err = run(capsys, "train", "--data", str(data / "sub" / ".."), "--router", "aux", "--out",
                       str(tmp_path), "--overwrite", *SMALL_TRAIN)
    assert_one_line_error(code, err, "is also an input")
    assert sorted(p.name for p in data.iterdir()) == before
    PackedDataset.open(data).split("train").checked.check_all()


def test_a_second_writer_is_refused(capsys, tiny_data, tmp_path):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; sys.path.insert(0, sys.argv[1]); from grouter.artifacts import output_lock\n"
        "with output_lock(sys.argv[2]):\n    print('locked', flush=True); time.sleep(60)"), SRC, str(out)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        code, _, err = run(capsys, "train", "--data", str(tiny_data.path), "--router", "aux", "--out", str(out),
                           *SMALL_TRAIN)
        assert_one_line_error(code, err, f"is being written by process {holder.pid}")
        assert not out.exists()
    finally:
        holder.kill()
        holder.wait()
    with output_lock(out):  # the holder died: its lock died with it
        pass


def test_unfinished_runs_are_refused_downstream_until_resumed(capsys, pipeline, tiny_data, tmp_path):
    d = str(tiny_data.path)
    cfg = MoEConfig(vocab_size=tiny_data.vocab_size, max_seq_len=tiny_data.seq_len, d_model=32, n_layers=2,
                    n_heads=2, d_expert=16, n_experts=8, top_k=2)
    tcfg = TrainConfig(steps=6, batch_size=4, eval_every=3, checkpoint_every=3, eval_sequences=4, device="cpu")
    train_run(tiny_data, tmp_path / "source", cfg, tcfg, command="source train", stop_after=3)  # killed after step 3
    code, _, err = run(capsys, "capture", "--source", str(tmp_path / "source"), "--data", d, "--out",
                       str(tmp_path / "t"))
    assert_one_line_error(code, err, "did not finish (checkpoint at step 3); rerun the same `grouter source train`")
    ok(capsys, "capture", "--source", str(tmp_path / "source" / "checkpoint"), "--data", d,  # on purpose
       "--out", str(tmp_path / "t-partial"))
    train_run(tiny_data, tmp_path / "source", cfg, tcfg, command="source train")  # the resume completes it
    ok(capsys, "capture", "--source", str(tmp_path / "source"), "--data", d, "--out", str(tmp_path / "t"))

    from grouter.distill import distill

    job = dict(targets=pipeline / "targets", architecture=dict(d_model=32, n_layers=1, n_heads=2, d_ff=64),
               schedule=dict(steps=6, batch_size=4, eval_every=3, checkpoint_every=3, device="cpu"), progress=False)
    distill(tmp_path / "g", stop_after=3, **job)
    for argv in (["fold", "--experts", "4", "--top-k", "2", "--data", d, "--max-sequences", "16"],
                 ["dispatch", "--data", d], ["train", "--data", d, *SMALL_TRAIN]):
        code, _, err = run(capsys, *argv, "--grouter", str(tmp_path / "g"), "--out", str(tmp_path / "x"))
        assert_one_line_error(code, err, "rerun the same `grouter distill` command to resume it")
    distill(tmp_path / "g", **job)
    ok(capsys, "dispatch", "--grouter", str(tmp_path / "g"), "--data", d, "--out", str(tmp_path / "x"))


@pytest.mark.parametrize("argv,needle", [
    (["tune", "--grouter", "g", "--data", "d", "--out", "o", "--lr", "inf"], "--lr: expected a number greater than 0 and below 10, got inf"),
    (["tune", "--grouter", "g", "--data", "d", "--out", "o", "--lr", "nan"], "--lr: expected a number greater than 0"),
    (["tune", "--grouter", "g", "--data", "d", "--out", "o", "--method", "bias", "--bias-gamma", "nan"], "--bias-gamma"),
    (["tune", "--grouter", "g", "--data", "d", "--out", "o", "--bias-gamma", "-0.1"], "--bias-gamma"),
    (["train", "--data", "d", "--router", "aux", "--out", "o", "--warmup-steps", "-1"], "--warmup-steps: expected a number at least 0"),
    (["train", "--data", "d", "--router", "aux", "--out", "o", "--lr", "0"], "--lr"),
    (["data", "prepare", "--out", "o", "--max-mb-per-domain", "nan"], "--max-mb-per-domain"),
    (["data", "tokenize", "--input", "x", "--tokenizer", "t", "--out", "o", "--val-fraction", "1"], "--val-fraction"),
    (["distill", "--targets", "t", "--out", "o", "--temperature", "-1"], "--temperature"),
    (["capture", "--source", "s", "--data", "d", "--out", "o", "--layer", "-1"], "--layer"),
])
def test_nonsense_settings_are_refused_at_parse_time(capsys, argv, needle):
    code, out, err = run(capsys, *argv, "--json")
    assert_one_line_error(code, err, needle)
    assert json.loads(out.strip().splitlines()[-1]) == {"error": err.strip()[len("error: "):]}


def test_json_failures_and_flags_before_the_command(capsys, tmp_path):
    for argv in (["--json", "train", "--data", str(tmp_path / "nope"), "--router", "aux", "--out", str(tmp_path / "o")],
                 ["train", "--data", str(tmp_path / "nope"), "--router", "aux", "--out", str(tmp_path / "o"), "--json"]):
        code, out, err = run(capsys, *argv)
        assert code == 2 and json.loads(out.strip().splitlines()[-1])["error"].startswith("dataset")
    code, _, err = run(capsys, "--debug", "train", "--data", str(tmp_path / "nope"), "--router", "aux",
                       "--out", str(tmp_path / "o"))
    assert code == 2 and "Traceback" in err


def test_a_dataset_without_validation_is_refused_before_training(capsys, tiny_data, tmp_path):
    data = pack_documents(stdlib_documents()[:8], tiny_data.tokenizer(), tmp_path / "noval",
                          PackConfig(seq_len=32, val_fraction=0.0))
    code, _, err = run(capsys, "train", "--data", str(data.path), "--router", "aux", "--out", str(tmp_path / "r"),
                       *SMALL_TRAIN)
    assert_one_line_error(code, err, "no validation sequences")
    assert not (tmp_path / "r").exists()


def test_a_model_that_cannot_fit_is_refused_with_an_estimate(capsys, tiny_data, tmp_path):
    code, _, err = run(capsys, "train", "--data", str(tiny_data.path), "--router", "aux", "--out", str(tmp_path / "r"),
                       "--d-model", "8192", "--d-expert", "65536", "--experts", "256", "--steps", "1")
    assert_one_line_error(code, err, "GiB free; choose a smaller model")
    assert MoEConfig(d_model=64, n_experts=4, d_expert=32, n_heads=4).num_parameters() == \
        MoELM(MoEConfig(d_model=64, n_experts=4, d_expert=32, n_heads=4)).num_parameters()


def test_rerunning_a_finished_command_is_a_no_op_and_other_options_are_refused(capsys, pipeline, tiny_data, tmp_path):
    argv = ["fold", "--grouter", str(pipeline / "grouter"), "--experts", "4", "--top-k", "2", "--data",
            str(tiny_data.path), "--max-sequences", "16", "--out", str(tmp_path / "f")]
    first = ok(capsys, *argv)
    stamp = (tmp_path / "f" / "model.safetensors").stat().st_mtime_ns
    code, out, err = run(capsys, *argv, "--json")
    assert code == 0 and "nothing to do" in err and json.loads(out.strip().splitlines()[-1]) == first
    assert (tmp_path / "f" / "model.safetensors").stat().st_mtime_ns == stamp
    code, _, err = run(capsys, *argv, "--seed", "3")
    assert_one_line_error(code, err, "already exists")


def test_output_in_the_way_and_non_utf8_input_get_their_own_messages(capsys, tiny_data, tmp_path):
    (tmp_path / "file").write_text("x")
    code, _, err = run(capsys, "train", "--data", str(tiny_data.path), "--router", "aux",
                       "--out", str(tmp_path / "file" / "run"), *SMALL_TRAIN)
    assert_one_line_error(code, err, "a file is in the way")
    (tmp_path / "bad.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    code, _, err = run(capsys, "data", "tokenize", "--input", str(tmp_path / "bad.jsonl"), "--tokenizer",
                       str(tiny_data.path / "tokenizer.json"), "--out", str(tmp_path / "d"))
    assert_one_line_error(code, err, "not UTF-8")


def test_ctrl_c_during_start_up_is_one_line(tmp_path):
    """An interrupt while the commands load (seconds of imports) is reported, not a traceback."""
    code = ("import sys, importlib.abc\n"
            "class Stop(importlib.abc.MetaPathFinder):\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name == 'grouter.cli': raise KeyboardInterrupt\n"
            "sys.meta_path.insert(0, Stop()); sys.path.insert(0, sys.argv[1])\n"
            "from grouter.__main__ import main; sys.exit(main())")
    proc = subprocess.run([sys.executable, "-c", code, SRC], capture_output=True, text=True)
    assert proc.returncode == 130 and proc.stderr.strip() == "error: interrupted"


# -- every file a command reads is an input; every output is verified before it is reused --------------
def test_out_may_not_lie_inside_an_input(capsys, pipeline, tiny_data, tmp_path):
    """--out inside an input would be written into it (and --overwrite would replace part of it)."""
    d = str(tiny_data.path)
    grouter, source = copy(pipeline / "grouter", tmp_path / "g"), copy(pipeline / "source", tmp_path / "s")
    before = {p: p.stat().st_mtime_ns for p in [*grouter.rglob("*"), *source.rglob("*")]}
    for argv in (["fold", "--grouter", grouter, "--experts", "4", "--data", d, "--out", grouter / "checkpoint"],
                 ["capture", "--source", source, "--data", d, "--out", source / "checkpoint"],
                 ["report", source, "--out", source / "probes"]):
        code, _, err = run(capsys, *map(str, argv), "--overwrite")
        assert_one_line_error(code, err, "is also an input of this command, or holds or lies inside one")
    assert {p: p.stat().st_mtime_ns for p in [*grouter.rglob("*"), *source.rglob("*")]} == before


def option_fields(cls):
    """Every leaf field of an options dataclass, nested groups included."""
    from dataclasses import fields

    from grouter.options import nested

    for f in fields(cls):
        sub = nested(cls, f)
        yield from option_fields(sub) if sub is not None else [(cls, f)]


def test_every_path_a_command_reads_is_an_input():
    """Walk every command's options: a path-valued option must be an input (a name-or-file option is
    one when it names a file), so that --out is checked against it and its content is part of the
    command's identity; every field of the inputs is one."""
    from dataclasses import fields

    from grouter.cli import COMMANDS
    from grouter.options import types_of

    for stage in (c.stage for c in COMMANDS):
        assert all(f.metadata.get("input") for f in fields(stage.inputs)), stage.name
        for cls, f in option_fields(stage.options):
            if "Path" in str(types_of(cls)[f.name]):
                assert f.metadata.get("file"), f"{stage.name}: option {f.name} is a path but not an input"
    from grouter.place import Options as PlaceOptions

    assert [f.metadata["file"] for _, f in option_fields(PlaceOptions) if f.name == "hardware"] == [True]


def test_file_options_are_inputs_and_their_content_is_the_identity(capsys, pipeline, tiny_data, tmp_path):
    tok_dir = copy(tiny_data.path, tmp_path / "Dt")
    (tmp_path / "a.txt").write_text("some text " * 400)
    tokenize = ["data", "tokenize", "--input", str(tmp_path / "a.txt"), "--seq-len", "16"]
    code, _, err = run(capsys, *tokenize, "--tokenizer", str(tok_dir / "tokenizer.json"), "--out", str(tok_dir),
                       "--overwrite")
    assert_one_line_error(code, err, "is also an input")
    assert (tok_dir / "train.tokens").exists()
    profile = tmp_path / "Pw" / "h.json"
    profile.parent.mkdir()
    profile.write_text(json.dumps({"name": "mine", "gpus_per_node": 2, "flops": 1e15, "hbm_bandwidth": 3e12,
                                   "nvlink_bandwidth": 4e11, "rdma_bandwidth": 5e10, "nvlink_latency": 3e-6,
                                   "rdma_latency": 5e-6}))
    code, _, err = run(capsys, "place", "--routing", str(pipeline / "routing"), "--ranks", "2", "--hardware",
                       str(profile), "--out", str(profile.parent), "--overwrite")
    assert_one_line_error(code, err, "is also an input")
    assert profile.exists()
    # the same command with another tokenizer file at the same path is another command
    tok = tmp_path / "tok.json"
    shutil.copy(tok_dir / "tokenizer.json", tok)
    ok(capsys, *tokenize, "--tokenizer", str(tok), "--out", str(tmp_path / "t"))
    from tokenizers import Tokenizer
    other = Tokenizer.from_file(str(tok))
    other.add_tokens(["an added token"])
    other.save(str(tok))
    code, _, err = run(capsys, *tokenize, "--tokenizer", str(tok), "--out", str(tmp_path / "t"))
    assert_one_line_error(code, err, "already exists")


def test_a_rerun_verifies_what_it_would_reuse(capsys, pipeline, tiny_data, tmp_path):
    argv = ["dispatch", "--grouter", str(pipeline / "folded"), "--data", str(tiny_data.path), "--out",
            str(tmp_path / "R")]
    ok(capsys, *argv)
    flip_byte(tmp_path / "R" / "train.ids", seed=3)
    code, _, err = run(capsys, *argv)
    assert_one_line_error(code, err, "holds this command's result, but damaged")
    assert "rerun with --overwrite" in err
    ok(capsys, *argv, "--overwrite")
    (tmp_path / "R" / "val.ids").unlink()
    code, _, err = run(capsys, *argv)
    assert_one_line_error(code, err, "val.ids is missing or truncated")


def test_place_checks_the_split_it_does_not_plan_on(capsys, pipeline, tmp_path):
    store = copy(pipeline / "routing", tmp_path / "routing")
    flip_byte(store / "val.weights", seed=2)
    code, _, err = run(capsys, "place", "--routing", str(store), "--ranks", "2", "--out", str(tmp_path / "plan"))
    assert_one_line_error(code, err, "val.weights is corrupt")
    assert_nothing_written(tmp_path / "plan")


def test_a_run_log_and_probes_carry_checksums(capsys, tiny_data, tmp_path):
    run_dir = tmp_path / "r"
    ok(capsys, "train", "--data", str(tiny_data.path), "--router", "aux", "--out", str(run_dir), *SMALL_TRAIN)
    ok(capsys, "report", str(run_dir), "--out", str(tmp_path / "rep"))
    log = run_dir / "metrics.jsonl"
    last = json.loads(log.read_text().splitlines()[-1])
    log.write_text(log.read_text().replace(json.dumps(last), json.dumps({**last, "val_loss": last["val_loss"] - 1})))
    for argv in (["verify", str(run_dir)], ["report", str(run_dir), "--out", str(tmp_path / "rep2")]):
        code, _, err = run(capsys, *argv)
        assert_one_line_error(code, err, "metrics.jsonl does not match its checksum")
    probe = sorted((run_dir / "probes").glob("*.npy"))[0]
    log.write_text(log.read_text().replace(json.dumps({**last, "val_loss": last["val_loss"] - 1}), json.dumps(last)))
    assert ok(capsys, "verify", str(run_dir))["status"] == "complete"
    flip_byte(probe, seed=4)
    code, _, err = run(capsys, "verify", str(run_dir))
    assert_one_line_error(code, err, f"probes/{probe.name} does not match its checksum")


def test_unfinished_runs_are_verified_and_said_so(capsys, tiny_data, tmp_path):
    cfg = MoEConfig(vocab_size=tiny_data.vocab_size, max_seq_len=tiny_data.seq_len, d_model=32, n_layers=1,
                    n_heads=2, d_expert=16, n_experts=4, top_k=1)
    tcfg = TrainConfig(steps=6, batch_size=4, eval_every=3, checkpoint_every=3, eval_sequences=4)
    train_run(tiny_data, tmp_path / "u", cfg, tcfg, stop_after=3)
    result = ok(capsys, "verify", str(tmp_path / "u"))
    assert result["status"] == "unfinished" and "did not finish" in result["note"] and result["bytes_checked"] > 0
    train_run(tiny_data, tmp_path / "u", cfg, tcfg)
    assert ok(capsys, "verify", str(tmp_path / "u"))["status"] == "complete"


def test_report_names_runs_it_cannot_compare_and_reads_past_a_torn_line(capsys, pipeline, tiny_data, tmp_path):
    code, _, err = run(capsys, "report", str(pipeline / "grouter"), "--out", str(tmp_path / "rep"))
    assert_one_line_error(code, err, "is a `grouter distill` run; report compares the training runs")
    from grouter.formats.run import read_metrics
    log = copy(pipeline / "source", tmp_path / "s") / "metrics.jsonl"
    records = read_metrics(log)
    with open(log, "a") as f:
        f.write('{"kind": "train", "step": 7, "lo')  # what kill -9 leaves
    assert read_metrics(log) == records
    log.write_text(log.read_text().replace('"kind"', '"ki', 1) + "\n")
    with pytest.raises(Exception, match="metrics.jsonl is corrupt at line 1"):
        read_metrics(log)


def test_a_killed_commands_scratch_is_cleaned_up_by_the_next(capsys, pipeline, tiny_data, tmp_path):
    (tmp_path / ".f.partial-abc123").mkdir()  # what a killed fold leaves
    (tmp_path / ".f.partial-abc123" / "model.safetensors").write_bytes(b"half")
    (tmp_path / ".f.lock").write_text("process 1 (`grouter fold`)")  # its lock file, the lock long released
    ok(capsys, "fold", "--grouter", str(pipeline / "grouter"), "--experts", "4", "--top-k", "2", "--data",
       str(tiny_data.path), "--max-sequences", "16", "--out", str(tmp_path / "f"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]


def test_bad_text_and_paths_get_their_line(capsys, tiny_data, tmp_path):
    (tmp_path / "s.jsonl").write_text('{"text": "ok"}\n{"text": "half a pair \\ud800 here"}\n')
    tok = str(tiny_data.path / "tokenizer.json")
    code, _, err = run(capsys, "data", "tokenize", "--input", str(tmp_path / "s.jsonl"), "--tokenizer", tok,
                       "--out", str(tmp_path / "d"))
    assert_one_line_error(code, err, "s.jsonl:2: the text holds an unpaired surrogate")
    code, _, err = run(capsys, "data", "tokenize", "--input", "/dev/null", "--tokenizer", tok, "--out",
                       str(tmp_path / "d"))
    assert_one_line_error(code, err, "/dev/null is not a regular file")


@pytest.mark.parametrize("argv,needle", [
    (["tune", "--grouter", "g", "--data", "d", "--out", "o", "--lr", "-inf"], "--lr: expected a number greater than 0 and below 10, got -inf"),
    (["tune", "--grouter", "g", "--data", "d", "--out", "o", "--lr", "1e38"], "--lr: expected a number greater than 0 and below 10"),
    (["place", "--routing", "r", "--ranks", "2", "--out", "o", "--seed", "-1"], "--seed: expected a number at least 0"),
    (["place", "--routing", "r", "--ranks", "2", "--out", "o", "--target-layers", "100000"], "--target-layers: expected a number at least 1 and below 1025"),
])
def test_out_of_range_values_are_refused_before_anything_runs(capsys, argv, needle):
    code, _, err = run(capsys, *argv)
    assert code == 2
    assert_one_line_error(code, err, needle)


def test_a_global_batch_larger_than_the_data_is_refused(capsys, pipeline, tmp_path):
    code, _, err = run(capsys, "place", "--routing", str(pipeline / "routing"), "--ranks", "2", "--global-batch",
                       "1000000", "--out", str(tmp_path / "p"))
    assert_one_line_error(code, err, "the global batch (1000000 sequences) is larger than the")


def test_out_of_memory_names_what_memory_grows_with(capsys, monkeypatch, pipeline, tmp_path):
    import grouter.network

    def no_memory(*a, **k):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")

    monkeypatch.setattr(grouter.network.Grouter, "__init__", no_memory)
    code, _, err = run(capsys, "distill", "--targets", str(pipeline / "targets"), "--out", str(tmp_path / "g"),
                       "--d-model", "200000", "--d-ff", "200000")
    assert_one_line_error(code, err, "out of memory: lower what this command's memory grows with (--d-model 200000, "
                                     "--layers 3, --d-ff 200000, --batch-size 16)")


def test_a_full_disk_is_one_line_naming_the_file_and_the_bytes(capsys, monkeypatch, pipeline, tiny_data, tmp_path):
    import errno
    import os

    def full(fd, offset, size):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    code, _, err = run(capsys, "capture", "--source", str(pipeline / "source"), "--data", str(tiny_data.path), "--out",
                       str(tmp_path / "t"))
    assert_one_line_error(code, err, "no space left on the device of")
    assert "train.topm: writing it needs" in err and "bytes" in err
    monkeypatch.undo()

    from safetensors import SafetensorError

    def full_save(*a, **k):
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: \"No space left on device\" })")

    monkeypatch.setattr("grouter.artifacts.save_file", full_save)
    code, _, err = run(capsys, "fold", "--grouter", str(pipeline / "grouter"), "--experts", "4", "--top-k", "2", "--data",
                       str(tiny_data.path), "--max-sequences", "16", "--out", str(tmp_path / "f"))
    assert_one_line_error(code, err, "model.safetensors: writing it needs")
    assert_nothing_written(tmp_path / "f")


def test_ctrl_c_at_any_moment_of_start_up_is_one_line(tmp_path):
    """The console script, interrupted while it loads: never a traceback (a few moments in the imports)."""
    script = Path(sys.executable).with_name("grouter")
    env = dict(os.environ, PYTHONPATH=SRC)
    for delay in (0.05, 0.3, 0.6):
        proc = subprocess.Popen([str(script), "dispatch", "--grouter", "g", "--data", "d", "--out", str(tmp_path / "o")],
                                stderr=subprocess.PIPE, text=True, env=env)
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        assert "Traceback" not in err, (delay, err)
        assert proc.returncode in (130, 2), (delay, proc.returncode, err)  # 2: it had loaded and refused the paths
        assert err.strip().splitlines()[-1].startswith("error: "), err
