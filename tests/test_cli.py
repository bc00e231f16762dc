"""The command line: help, --json, and one-line errors for bad input (nothing half-written)."""

import json
import subprocess
import sys

import pytest

from grouter.cli import COMMANDS, main
from grouter.testing import SMALL_TRAIN, assert_one_line_error
from grouter.testing import run_cli as run


@pytest.mark.parametrize("argv", [[], ["data"], ["source"]] + [c.stage.name.split() for c in COMMANDS],
                         ids=lambda argv: " ".join(argv) or "grouter")
def test_every_command_has_help(argv):
    with pytest.raises(SystemExit) as exit_:
        main(argv + ["--help"])
    assert exit_.value.code == 0


def test_console_script_is_installed():
    result = subprocess.run([sys.executable, "-m", "grouter.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "demo" in result.stdout


def test_output_into_a_closed_pipe_is_quiet():
    """``grouter estimate | head -1``: the reader is gone before the table is written (closed here at
    once, while the command imports); no BrokenPipeError traceback, exit 0."""
    proc = subprocess.Popen([sys.executable, "-m", "grouter.cli", "estimate"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    proc.stdout.close()
    assert proc.wait(timeout=120) == 0 and proc.stderr.read() == ""


def test_train_json_output_and_resume(capsys, tiny_data, tmp_path):
    import numpy as np

    from grouter.formats.run import read_metrics

    argv = ["train", "--data", str(tiny_data.path), "--out", str(tmp_path / "r"), "--router", "auxfree", "--json",
            *SMALL_TRAIN]
    code, out, _ = run(capsys, *argv)
    assert code == 0
    result = json.loads(out.strip().splitlines()[-1])
    assert result["steps"] == 6 and result["out"] == str(tmp_path / "r")
    evals = [r for r in read_metrics(tmp_path / "r" / "metrics.jsonl") if r["kind"] == "eval"]
    assert [e["step"] for e in evals] == [3, 6] and result["final_val_loss"] == evals[-1]["val_loss"]
    by_domain = evals[-1]["val_loss_by_domain"]  # 4 sequences of each domain: the overall loss is their mean
    assert set(by_domain) == {"code", "prose"}
    assert result["final_val_loss"] == pytest.approx(np.mean(list(by_domain.values())))
    # rerunning the finished run trains nothing and prints the same results
    size = (tmp_path / "r" / "metrics.jsonl").stat().st_size
    code, out, _ = run(capsys, *argv)
    assert code == 0 and json.loads(out.strip().splitlines()[-1]) == result
    assert (tmp_path / "r" / "metrics.jsonl").stat().st_size == size


def test_source_train_writes_a_loadable_model(capsys, tiny_data, tmp_path):
    from grouter.model import MoELM

    code, _, _ = run(capsys, "source", "train", "--data", str(tiny_data.path), "--out", str(tmp_path / "s"),
                     *SMALL_TRAIN)
    assert code == 0
    model = MoELM.from_pretrained(tmp_path / "s" / "checkpoint")
    assert model.cfg.router == "aux" and model.cfg.vocab_size == tiny_data.vocab_size


def test_data_subset(capsys, tiny_data, tmp_path):
    code, out, _ = run(capsys, "data", "subset", "--data", str(tiny_data.path), "--domains", "code",
                       "--out", str(tmp_path / "code"), "--json")
    assert code == 0 and json.loads(out.strip().splitlines()[-1])["domains"] == ["code"]
    code, _, err = run(capsys, "data", "subset", "--data", str(tiny_data.path), "--domains", "poetry",
                       "--out", str(tmp_path / "poetry"))
    assert_one_line_error(code, err, "choose distinct domains among code, prose")


def test_missing_and_empty_data_directory(capsys, tmp_path):
    code, _, err = run(capsys, "train", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "o"), "--router", "aux")
    assert_one_line_error(code, err, "not found")
    (tmp_path / "empty").mkdir()
    code, _, err = run(capsys, "train", "--data", str(tmp_path / "empty"), "--out", str(tmp_path / "o"), "--router", "aux")
    assert_one_line_error(code, err, "empty")
    assert not (tmp_path / "o").exists()


def test_k_larger_than_experts(capsys, tiny_data, tmp_path):
    code, _, err = run(capsys, "train", "--data", str(tiny_data.path), "--out", str(tmp_path / "o"), "--router", "aux",
                       "--experts", "4", "--top-k", "5")
    assert_one_line_error(code, err, "top-k 5")
    assert not (tmp_path / "o").exists()


def test_unknown_router(capsys, tiny_data, tmp_path):
    code, _, err = run(capsys, "train", "--data", str(tiny_data.path), "--out", str(tmp_path / "o"), "--router", "magic")
    assert code == 2
    assert_one_line_error(code, err, "invalid choice: 'magic'")


def test_corrupt_checkpoint(capsys, tiny_data, tmp_path):
    args = ["train", "--data", str(tiny_data.path), "--out", str(tmp_path / "r"), "--router", "aux", *SMALL_TRAIN]
    from grouter.loop import TrainConfig
    from grouter.model import MODEL_PRESETS, MoEConfig
    from grouter.testing import train_run

    cfg = MoEConfig(vocab_size=tiny_data.vocab_size, max_seq_len=tiny_data.seq_len, **MODEL_PRESETS["tiny"])
    train_run(tiny_data, tmp_path / "r", cfg,
          TrainConfig(steps=6, batch_size=4, eval_every=3, checkpoint_every=3, eval_sequences=4), stop_after=3)
    (tmp_path / "r" / "checkpoint" / "optimizer.safetensors").write_bytes(b"garbage")
    code, _, err = run(capsys, *args)
    assert_one_line_error(code, err, "corrupt")


def test_debug_shows_traceback(capsys, tmp_path):
    code, _, err = run(capsys, "train", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "o"),
                       "--router", "aux", "--debug")
    assert code == 2 and "Traceback" in err


def test_dispatch_then_train_with_stored_routing(capsys, tiny_data, tmp_path):
    import torch

    from grouter.formats.grouter import GrouterConfig
    from grouter.network import Grouter

    g = Grouter(GrouterConfig(vocab_size=tiny_data.vocab_size, n_experts=8, top_k=2, d_model=32, n_layers=1,
                              n_heads=2, d_ff=64, max_seq_len=tiny_data.seq_len))
    torch.nn.init.normal_(g.head.weight, std=0.5)
    g.save_pretrained(tmp_path / "g")
    code, out, err = run(capsys, "dispatch", "--grouter", str(tmp_path / "g"), "--data", str(tiny_data.path),
                         "--out", str(tmp_path / "store"), "--json")
    assert code == 0, err
    assert json.loads(out.strip().splitlines()[-1])["bytes_per_token"] == 6
    code, out, err = run(capsys, "train", "--data", str(tiny_data.path), "--routing", str(tmp_path / "store"),
                         "--out", str(tmp_path / "run"), "--json", *SMALL_TRAIN)
    assert code == 0, err
    code, _, err = run(capsys, "train", "--data", str(tiny_data.path), "--routing", str(tmp_path / "store"),
                       "--out", str(tmp_path / "run2"), "--top-k", "3", *SMALL_TRAIN)
    assert_one_line_error(code, err, "contradicts the routing")


def test_routing_store_for_another_dataset_is_refused(capsys, tiny_data, tmp_path):
    from grouter.data import PackConfig, pack_documents

    from grouter.testing import stdlib_documents

    other = pack_documents(stdlib_documents()[:6], tiny_data.tokenizer(), tmp_path / "other", PackConfig(seq_len=32))
    g_args = ["--grouter", str(tmp_path / "g")]
    from grouter.formats.grouter import GrouterConfig
    from grouter.network import Grouter

    Grouter(GrouterConfig(vocab_size=tiny_data.vocab_size, n_experts=8, top_k=2, d_model=32, n_layers=1, n_heads=2,
                          d_ff=64)).save_pretrained(tmp_path / "g")
    assert run(capsys, "dispatch", *g_args, "--data", str(other.path), "--out", str(tmp_path / "store"))[0] == 0
    code, _, err = run(capsys, "train", "--data", str(tiny_data.path), "--routing", str(tmp_path / "store"),
                       "--out", str(tmp_path / "run"), *SMALL_TRAIN)
    assert_one_line_error(code, err, "another dataset")
    assert not (tmp_path / "run").exists()
