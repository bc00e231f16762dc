"""Every command through ``grouter.cli.main``: (a) ``--help`` names its required options, (b) it
succeeds on tiny data and its ``--json`` results match what it wrote, (c) a realistic bad input is
one ``error:`` line, exit 2, and nothing half-written in ``--out``.

One module fixture runs the pipeline once through the command line (source train → capture →
distill → fold → tune → dispatch → place → train), tiny sizes; the tests check its outputs.
"""

import io
import json
import re
from dataclasses import replace
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import pytest
import torch

from grouter.artifacts import read_json
from grouter.cli import main
from grouter.formats.dataset import SPLITS, PackedDataset
from grouter.formats.plan import Plan
from grouter.formats.run import read_metrics
from grouter.formats.store import RoutingStore
from grouter.formats.targets import Targets
from grouter.metrics import max_vio, topk_set_agreement
from grouter.model import MODEL_PRESETS, MoELM
from grouter.network import Grouter
from grouter.report import tokens_to_reach
from grouter.routers import expert_counts

from grouter.testing import stdlib_documents
from grouter.testing import SMALL_TRAIN, assert_nothing_written, assert_one_line_error, last_json
from grouter.testing import run_cli as run

TINY = MODEL_PRESETS["tiny"]  # the source: 8 experts, top-2
FOLD_EXPERTS, FOLD_TOP_K = 4, 1  # the target: fewer experts, and a top-k that is not the source's
GROUTER_SIZE = ["--d-model", "32", "--layers", "1", "--heads", "2", "--d-ff", "64"]
DISTILL = [*GROUTER_SIZE, "--steps", "6", "--batch-size", "4", "--eval-every", "3", "--checkpoint-every", "3"]
STEPS, BATCH = 6, 4  # SMALL_TRAIN's


def cli(*argv):
    """``main`` with its output captured (usable in a module fixture, where capsys is not)."""
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def load(path) -> dict:
    """A JSON file grouter wrote, its checksum verified and removed."""
    return read_json(path, path.name)


def n_sequences(data, split="train") -> int:
    return len(data.split(split))


def train_records(run_dir):
    return [r for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "train"]


def eval_records(run_dir):
    return [r for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "eval"]


def grouter_stages(root, source, data, *capture_options):
    """The stages from a trained source to a routing store: capture, distill, fold, tune, dispatch."""
    return {
        "targets": ["capture", "--source", source, "--data", data, *capture_options, "--batch-size", "256",
                    "--device", "cpu"],
        "distilled": ["distill", "--targets", root / "targets", *DISTILL, "--device", "cpu"],
        "folded": ["fold", "--grouter", root / "distilled", "--experts", FOLD_EXPERTS, "--top-k", FOLD_TOP_K,
                   "--data", data, "--max-sequences", "64", "--device", "cpu"],
        "tuned": ["tune", "--grouter", root / "folded", "--data", data, "--tokens", "2000", "--eval-sequences", "32",
                  "--device", "cpu"],
        "routing": ["dispatch", "--grouter", root / "tuned", "--data", data, "--batch-size", "256", "--device", "cpu"],
    }


def run_stages(root, stages):
    """Run each command with --out root/NAME --json: {name: (directory, printed JSON)}."""
    results = {}
    for name, argv in stages.items():
        code, out, err = cli(*argv, "--out", root / name, "--json")
        assert code == 0, f"{name}: {err[-2000:]}"
        results[name] = (root / name, last_json(out))
    return results


@pytest.fixture(scope="module")
def pipe(tiny_data, tmp_path_factory):
    """The pipeline, once, through the command line: {stage: (directory, printed JSON)}."""
    root = tmp_path_factory.mktemp("cli-pipeline")
    data = str(tiny_data.path)
    stages = {
        "source": ["source", "train", "--data", data, *SMALL_TRAIN, "--device", "cpu"],
        **grouter_stages(root, root / "source", data),
        "plan2": ["place", "--routing", root / "routing", "--ranks", "2"],
        "plan1": ["place", "--routing", root / "routing", "--ranks", "1"],
        "target": ["train", "--data", data, "--routing", root / "routing", *SMALL_TRAIN, "--device", "cpu"],
    }
    return {**run_stages(root, stages), "root": root}


# -- (a) help ---------------------------------------------------------------------------------------

HELP = {  # command -> options its usage must show as required (not in [brackets])
    ("data", "prepare"): ["--out"],
    ("data", "tokenize"): ["--input", "--tokenizer", "--out"],
    ("data", "subset"): ["--data", "--domains", "--out"],
    ("data", "megatron"): ["--megatron-data", "--tokenizer", "--out"],
    ("source", "train"): ["--data", "--out"],
    ("train",): ["--data", "--out", "(--routing", "--grouter", "--router"],
    ("capture",): ["--source", "--data", "--out"],
    ("distill",): ["--targets", "--out"],
    ("fold",): ["--grouter", "--experts", "--data", "--out"],
    ("tune",): ["--grouter", "--data", "--out"],
    ("dispatch",): ["--grouter", "(--data", "--megatron-data", "--out"],
    ("place",): ["--routing", "--ranks", "--out"],
    ("ep",): ["--data", "--routing", "--out"],
    ("report",): ["RUN_DIR", "--out"],
    ("demo",): [],
    ("reproduce",): [],
}
OPTIONAL = {("demo",): ["[--out OUT]", "[--shared-head]"], ("reproduce",): ["[--out OUT]", "[--scale", "[--data DATA]",
                                                          "[--held-out-domain"]}


@pytest.mark.parametrize("command", list(HELP), ids=" ".join)
def test_help_names_the_required_options(capsys, command):
    with pytest.raises(SystemExit) as exit_:
        main([*command, "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    usage = " ".join(text.split("\n\n")[0].split())  # the usage paragraph, one line
    assert usage.startswith(f"usage: grouter {' '.join(command)} "), usage
    for option in HELP[command]:
        assert re.search(rf"(?<!\[){re.escape(option)}\b", usage), (option, usage)
    for option in OPTIONAL.get(command, []):
        assert option in usage, (option, usage)
    assert "--json" in text


# -- data -------------------------------------------------------------------------------------------

def test_data_prepare(capsys, tmp_path):
    out = tmp_path / "ds"
    code, stdout, err = run(capsys, "data", "prepare", "--out", str(out), "--max-mb-per-domain", "0.05",
                            "--vocab-size", "512", "--seq-len", "32", "--json")
    assert code == 0, err
    result = last_json(stdout)
    ds = PackedDataset.open(out)
    assert result["data"] == str(out) and result["fingerprint"] == ds.fingerprint
    assert (result["vocab_size"], result["seq_len"]) == (512, 32) == (ds.vocab_size, ds.seq_len)
    assert result["domains"] == ["prose", "speeches", "code"]
    assert result["train_sequences"] == n_sequences(ds) and result["val_sequences"] == n_sequences(ds, "val")
    assert result["train_tokens"] == ds.split("train").tokens.size == result["train_sequences"] * 32 + 3  # + 1 a domain
    assert ds.meta["sources"]["max_bytes_per_domain"] == 50_000
    assert ds.tokenizer().get_vocab_size() == 512


def test_data_prepare_refuses_a_tiny_vocabulary(capsys, tmp_path):
    out = tmp_path / "ds"
    code, _, err = run(capsys, "data", "prepare", "--out", str(out), "--vocab-size", "100",
                       "--max-mb-per-domain", "0.05")
    assert code == 2
    assert_one_line_error(code, err, "--vocab-size: expected a number at least 257, got 100")
    assert_nothing_written(out)


def tokenize_inputs(tmp_path):
    """A .txt (one document) and a .jsonl (one document a line) of real text."""
    docs = [d.text for d in stdlib_documents() if d.domain == "prose"]
    (tmp_path / "notes.txt").write_text(docs[0])
    (tmp_path / "posts.jsonl").write_text("".join(json.dumps({"body": t}) + "\n" for t in docs[1:4]))
    return {"notes": [docs[0]], "posts": docs[1:4]}


def test_data_tokenize(capsys, tiny_data, tmp_path):
    texts = tokenize_inputs(tmp_path)
    out, L = tmp_path / "ds", 16
    code, stdout, err = run(capsys, "data", "tokenize", "--input", str(tmp_path / "notes.txt"),
                            str(tmp_path / "posts.jsonl"), "--tokenizer", str(tiny_data.path / "tokenizer.json"),
                            "--out", str(out), "--seq-len", str(L), "--text-field", "body", "--val-fraction", "0.2",
                            "--json")
    assert code == 0, err
    result = last_json(stdout)
    ds = PackedDataset.open(out)
    assert result["fingerprint"] == ds.fingerprint and result["domains"] == ["notes", "posts"]  # the files' names
    assert (result["vocab_size"], result["seq_len"]) == (tiny_data.vocab_size, L)
    assert (result["train_sequences"], result["val_sequences"]) == (n_sequences(ds), n_sequences(ds, "val"))
    # each document is its tokens then the end-of-text id, concatenated per domain
    tok = tiny_data.tokenizer()
    streams = {d: [i for t in ts for i in tok.encode(t, add_special_tokens=False).ids + [tiny_data.eos_id]]
               for d, ts in texts.items()}
    windows = {d: {tuple(s[i:i + L + 1]) for i in range(len(s) - L)} for d, s in streams.items()}
    for split in SPLITS:
        part = ds.split(split)
        seqs, domains = part.sequences(np.arange(len(part))), part.domain_ids()
        assert set(domains.tolist()) == {0, 1}, split  # both domains in both splits
        assert all(tuple(q) in windows[ds.domains[d]] for q, d in zip(seqs.tolist(), domains))
    # a domain's stream is split in two; each part loses only its tail of < L tokens (+1 shared token)
    for d, stream in streams.items():
        n = sum(ds.meta["splits"][split]["sequences_per_domain"][d] for split in SPLITS)
        assert 0 <= len(stream) - (n * L + 2) <= 2 * (L - 1), d
    first = ds.split("train").batch(np.array([0]))  # the .txt is one document: train starts with it
    assert first["input_ids"][0].tolist() == streams["notes"][:L]
    assert first["labels"][0].tolist() == streams["notes"][1:L + 1]


def test_data_tokenize_names_the_missing_text_field(capsys, tiny_data, tmp_path):
    tokenize_inputs(tmp_path)
    out = tmp_path / "ds"
    code, _, err = run(capsys, "data", "tokenize", "--input", str(tmp_path / "posts.jsonl"), "--tokenizer",
                       str(tiny_data.path / "tokenizer.json"), "--out", str(out))
    assert code == 2
    assert_one_line_error(code, err, "posts.jsonl:1: no 'text' field; pass --text-field")
    assert_nothing_written(out)


def test_data_subset(capsys, tiny_data, tmp_path):
    out = tmp_path / "prose"
    code, stdout, err = run(capsys, "data", "subset", "--data", str(tiny_data.path), "--domains", "prose",
                            "--out", str(out), "--json")
    assert code == 0, err
    result = last_json(stdout)
    ds = PackedDataset.open(out)
    assert result["domains"] == ["prose"] == ds.domains and result["fingerprint"] == ds.fingerprint
    for split, key in (("train", "train_sequences"), ("val", "val_sequences")):
        expected = tiny_data.meta["splits"][split]["sequences_per_domain"]["prose"]
        assert result[key] == expected == n_sequences(ds, split)
    prose = np.flatnonzero(tiny_data.split("train").domain_ids() == tiny_data.domains.index("prose"))
    assert np.array_equal(ds.split("train").sequences(np.arange(3)), tiny_data.split("train").sequences(prose[:3]))


def test_data_subset_refuses_a_repeated_domain(capsys, tiny_data, tmp_path):
    out = tmp_path / "twice"
    code, _, err = run(capsys, "data", "subset", "--data", str(tiny_data.path), "--domains", "prose,prose",
                       "--out", str(out))
    assert code == 2
    assert_one_line_error(code, err, "choose distinct domains among code, prose (got prose, prose)")
    assert_nothing_written(out)


# -- source train, train ----------------------------------------------------------------------------

def check_run(run_dir, result, n_experts, top_k, router):
    """The printed summary of a training run against its checkpoint and its metrics log."""
    assert result["out"] == str(run_dir) and result["steps"] == STEPS
    assert result["tokens"] == STEPS * BATCH * 32
    model = MoELM.from_pretrained(run_dir / "checkpoint")
    assert (model.cfg.n_experts, model.cfg.top_k, model.cfg.router) == (n_experts, top_k, router)
    steps, evals = train_records(run_dir), eval_records(run_dir)
    assert [r["step"] for r in steps] == list(range(1, STEPS + 1)) and [e["step"] for e in evals] == [3, 6]
    assert result["final_val_loss"] == evals[-1]["val_loss"]
    loads = np.sum([r["expert_load"] for r in steps], axis=0)  # [layers, experts] over the run
    assert loads.sum() == STEPS * BATCH * 32 * top_k * model.cfg.n_layers
    assert result["max_vio_global"] == pytest.approx(float(max_vio(loads).mean()))
    assert result["max_vio_batch_mean"] == pytest.approx(np.mean([max_vio(r["expert_load"]).mean() for r in steps]))
    assert load(run_dir / "run.json")["summary"] == result


def test_source_train(pipe):
    run_dir, result = pipe["source"]
    check_run(run_dir, result, TINY["n_experts"], TINY["top_k"], "aux")


def test_source_train_refuses_a_batch_larger_than_the_data(capsys, tiny_data, tmp_path):
    out, too_many = tmp_path / "s", n_sequences(tiny_data) + 1
    code, _, err = run(capsys, "source", "train", "--data", str(tiny_data.path), "--out", str(out), "--preset", "tiny",
                       "--batch-size", str(too_many))
    assert code == 2
    assert_one_line_error(code, err, f"batch size {too_many} exceeds the {too_many - 1} training sequences")
    assert_nothing_written(out)


def test_train_with_stored_routing(pipe):
    run_dir, result = pipe["target"]
    check_run(run_dir, result, FOLD_EXPERTS, FOLD_TOP_K, "external")
    routing = load(run_dir / "run.json")["identity"]["routing"]
    store = RoutingStore.open(pipe["routing"][0])
    assert routing["kind"] == "store" and routing["grouter_fingerprint"] == store.manifest["grouter_fingerprint"]


def test_train_refuses_an_expert_count_the_routing_contradicts(capsys, tiny_data, pipe, tmp_path):
    out = tmp_path / "run"
    code, _, err = run(capsys, "train", "--data", str(tiny_data.path), "--routing", str(pipe["routing"][0]),
                       "--out", str(out), "--experts", "8", *SMALL_TRAIN)
    assert code == 2
    assert_one_line_error(code, err, f"--experts 8 contradicts the routing ({FOLD_EXPERTS})")
    assert_nothing_written(out)


# -- capture, distill, fold, tune -------------------------------------------------------------------

def test_capture(pipe, tiny_data):
    out, result = pipe["targets"]
    assert result["targets"] == str(out)
    assert (result["n_experts"], result["top_k"], result["layer"]) == (TINY["n_experts"], TINY["top_k"], 0)
    assert result["top_m"] == 2 * TINY["top_k"]  # the default: compact targets, the top 2k scores
    assert result["score_function"] == "softmax"  # an aux-loss source: raw gate logits
    assert result["train_tokens"] == n_sequences(tiny_data) * tiny_data.seq_len
    targets = Targets.open(out, tiny_data)
    assert {s: targets.array(s, "topm").shape for s in SPLITS} == {
        s: (n_sequences(tiny_data, s), tiny_data.seq_len, 2 * TINY["top_k"]) for s in SPLITS}
    # the stored scores' top-k is the source's own first-layer routing of those tokens
    source = MoELM.from_pretrained(pipe["source"][0] / "checkpoint").eval()
    idx = np.arange(8)
    with torch.no_grad():
        chosen = source(tiny_data.split("val").batch(idx)["input_ids"]).routing_ids[0]
    stored = targets.teacher("val", idx).topk(TINY["top_k"])
    assert topk_set_agreement(chosen, stored) > 0.98  # float16 storage may flip a near tie


def test_capture_refuses_a_layer_the_source_lacks(capsys, tiny_data, pipe, tmp_path):
    out = tmp_path / "t"
    code, _, err = run(capsys, "capture", "--source", str(pipe["source"][0]), "--data", str(tiny_data.path),
                       "--out", str(out), "--layer", "5", "--device", "cpu")
    assert code == 2
    assert_one_line_error(code, err, f"layer 5 is out of range: the source has {TINY['n_layers']} layers "
                                     f"(0..{TINY['n_layers'] - 1}); MoE layers are 0, 1")
    assert_nothing_written(out)


def test_distill(pipe):
    out, result = pipe["distilled"]
    assert result["grouter"] == str(out) and result["steps"] == 6 and result["causal"] is True
    assert (result["n_experts"], result["top_k"]) == (TINY["n_experts"], TINY["top_k"])
    g = Grouter.from_pretrained(out)
    assert (g.cfg.d_model, g.cfg.n_layers, g.cfg.n_heads, g.cfg.d_ff) == (32, 1, 2, 64)
    assert result["parameters"] == g.num_parameters()
    assert g.cfg.provenance["source"]["path"] == str(pipe["source"][0] / "checkpoint")
    evals = eval_records(out)
    assert [e["step"] for e in evals] == [3, 6]
    assert (result["val_kl"], result["val_topk_recall"]) == (evals[-1]["kl"], evals[-1]["topk_recall"])


def test_distill_refuses_a_directory_that_is_not_targets(capsys, pipe, tmp_path):
    out = tmp_path / "g"
    code, _, err = run(capsys, "distill", "--targets", str(pipe["source"][0]), "--out", str(out), *DISTILL)
    assert code == 2
    assert_one_line_error(code, err, "is not a grouter targets directory (no targets.json)")
    assert_nothing_written(out)


def test_fold(pipe, tiny_data):
    out, result = pipe["folded"]
    assert result["grouter"] == str(out) and result["strategy"] == "affinity"
    assert (result["source_experts"], result["target_experts"], result["top_k"]) == (8, FOLD_EXPERTS, FOLD_TOP_K)
    assert result["group_sizes"] == [2] * FOLD_EXPERTS
    assert result["tokens_measured"] == min(64, n_sequences(tiny_data)) * tiny_data.seq_len
    g = Grouter.from_pretrained(out)
    assert (g.cfg.n_experts, g.cfg.top_k) == (FOLD_EXPERTS, FOLD_TOP_K)
    groups = g.cfg.provenance["fold"]["groups"]
    assert sorted(e for grp in groups for e in grp) == list(range(8))
    affinity = np.load(out / "affinity.npy")
    inside = sum(affinity[np.ix_(grp, grp)].sum() for grp in groups) / affinity.sum()
    assert result["within_group_affinity"] == pytest.approx(inside)


def test_fold_refuses_as_many_experts_as_the_grouter_has(capsys, tiny_data, pipe, tmp_path):
    out = tmp_path / "f"
    code, _, err = run(capsys, "fold", "--grouter", str(pipe["distilled"][0]), "--experts", "8", "--data",
                       str(tiny_data.path), "--out", str(out), "--device", "cpu")
    assert code == 2
    assert_one_line_error(code, err, "--experts must be between 1 and 7 (fewer than the Grouter's 8); got 8")
    assert_nothing_written(out)


def test_tune(pipe, tiny_data):
    out, result = pipe["tuned"]
    assert result["grouter"] == str(out)
    before, after = Grouter.from_pretrained(pipe["folded"][0]), Grouter.from_pretrained(out)
    assert (after.cfg.n_experts, after.cfg.top_k) == (FOLD_EXPERTS, FOLD_TOP_K)
    # the report's figures, recomputed on its held-out set (the first 32 validation sequences)
    x = tiny_data.split("val").batch(np.arange(32))["input_ids"]
    with torch.no_grad():
        ids_before, ids_after = before.route(x).ids, after.route(x).ids
    assert result["max_vio_global_before"] == pytest.approx(float(max_vio(expert_counts(ids_before, FOLD_EXPERTS))))
    assert result["max_vio_global_after"] == pytest.approx(float(max_vio(expert_counts(ids_after, FOLD_EXPERTS))))
    assert result["topk_set_agreement_with_untuned"] == pytest.approx(topk_set_agreement(ids_before, ids_after))
    report = load(out / "tune_report.json")
    assert report["tokens"] == 2000 and report["held_out_sequences"] == 32


def test_tune_refuses_an_unknown_domain(capsys, tiny_data, pipe, tmp_path):
    out = tmp_path / "t"
    code, _, err = run(capsys, "tune", "--grouter", str(pipe["folded"][0]), "--data", str(tiny_data.path),
                       "--out", str(out), "--domain", "poetry", "--tokens", "2000", "--device", "cpu")
    assert code == 2
    assert_one_line_error(code, err, "unknown domain 'poetry'; the dataset has code, prose")
    assert_nothing_written(out)



def test_tune_keep(capsys, tiny_data, pipe, tmp_path):
    """--keep reaches the tuning loss (recorded in the report); it needs the gradient method."""
    args = ["tune", "--grouter", str(pipe["folded"][0]), "--data", str(tiny_data.path), "--tokens", "2000",
            "--eval-sequences", "32", "--device", "cpu"]
    code, stdout, err = run(capsys, *args, "--out", str(tmp_path / "kept"), "--keep", "0.5", "--json")
    assert code == 0, err
    assert last_json(stdout)["grouter"] == str(tmp_path / "kept")
    assert load(tmp_path / "kept" / "tune_report.json")["keep"] == 0.5
    code, _, err = run(capsys, *args, "--out", str(tmp_path / "t"), "--keep", "0.5", "--method", "bias")
    assert_one_line_error(code, err, "--keep weighs a loss term: it needs --method gradient")
    assert_nothing_written(tmp_path / "t")
    code, _, err = run(capsys, *args, "--out", str(tmp_path / "t"), "--keep", "-1")
    assert_one_line_error(code, err, "argument --keep")

# -- dispatch, place, ep ----------------------------------------------------------------------------

def test_dispatch(pipe, tiny_data):
    out, result = pipe["routing"]
    assert result["routing"] == str(out) and not result["resumed"] and result["world_size"] == 1
    assert (result["k"], result["n_experts"]) == (FOLD_TOP_K, FOLD_EXPERTS)
    assert result["tokens"] == sum(n_sequences(tiny_data, s) for s in SPLITS) * tiny_data.seq_len
    assert result["bytes_per_token"] == FOLD_TOP_K * (1 + 2)  # uint8 id + bfloat16 weight per expert
    grouter = Grouter.from_pretrained(pipe["tuned"][0])
    store = RoutingStore.open(out, data=tiny_data, grouter_fingerprint=grouter.fingerprint())
    idx = np.array([0, 5, n_sequences(tiny_data) - 1])
    with torch.no_grad():
        online = grouter.route(tiny_data.split("train").batch(idx)["input_ids"])
    assert torch.equal(store.routing("train", idx).ids, online.ids)


def test_dispatch_refuses_k_above_the_experts(capsys, tiny_data, pipe, tmp_path):
    out = tmp_path / "r"
    code, _, err = run(capsys, "dispatch", "--grouter", str(pipe["tuned"][0]), "--data", str(tiny_data.path),
                       "--out", str(out), "--k", "5", "--device", "cpu")
    assert code == 2
    assert_one_line_error(code, err, f"k = 5 is not possible with the Grouter's {FOLD_EXPERTS} experts")
    assert_nothing_written(out)


def test_place(pipe, tiny_data):
    out, result = pipe["plan2"]
    assert result["out"] == str(out) and result["plan"] == str(out / "plan.json")
    assert (result["ranks"], result["algorithm"], result["global_batch"]) == (2, "balanced", 32)
    plan = Plan.load(out)
    assert (plan.ranks, plan.n_experts, plan.k, plan.experts_per_rank) == (2, FOLD_EXPERTS, FOLD_TOP_K, 2)
    assert sorted(plan.permutation.tolist()) == list(range(FOLD_EXPERTS))
    placed = np.concatenate([b for batches in plan.samples for b in batches])
    assert result["sequences_placed"] == len(placed) == len(np.unique(placed))
    assert result["sequences_placed"] + result["sequences_dropped"] == n_sequences(tiny_data)
    assert all(len(plan.samples[0][b]) == len(plan.samples[1][b]) for b in range(plan.n_batches))  # balanced
    report = load(out / "report.json")
    assert result["plan_over_random"] == {m: c["plan_over_random"] for m, c in report["cost_models"].items()}


def test_place_refuses_ranks_that_do_not_divide_the_experts(capsys, pipe, tmp_path):
    out = tmp_path / "p"
    code, _, err = run(capsys, "place", "--routing", str(pipe["routing"][0]), "--ranks", "3", "--out", str(out))
    assert code == 2
    assert_one_line_error(code, err, f"divides {FOLD_EXPERTS}")
    assert_nothing_written(out)


# -- per-layer heads: capture --layers ... place --target-layers, train ---------------------------------

TARGET_LAYERS = 3  # the target's depth: its layers take heads 0, 0, 1 (depths 1/6, 1/2, 5/6; the heads' 1/4, 3/4)


@pytest.fixture(scope="module")
def layered(pipe, tiny_data):
    """The pipeline again with every MoE layer of the source captured: a Grouter with one head per layer."""
    root, data = pipe["root"] / "layered", str(tiny_data.path)
    stages = {
        **grouter_stages(root, pipe["source"][0], data, "--layers", "all"),
        "plan": ["place", "--routing", root / "routing", "--ranks", "2", "--target-layers", TARGET_LAYERS],
        "target": ["train", "--data", data, "--routing", root / "routing", *SMALL_TRAIN, "--layers", TARGET_LAYERS,
                   "--device", "cpu"],
    }
    return run_stages(root, stages)


def test_per_layer_capture_distill_fold_tune(layered, pipe, tiny_data):
    layers = list(range(TINY["n_layers"]))
    out, result = layered["targets"]
    assert result["layers"] == layers and "layer" not in result
    targets, first = Targets.open(out, tiny_data), Targets.open(pipe["targets"][0], tiny_data)
    m = 2 * TINY["top_k"]  # the default compact targets
    assert targets.array("train", "topm").shape == (n_sequences(tiny_data), tiny_data.seq_len, len(layers), m)
    for kind in ("topm", "topm_ids", "rest"):  # head 0's teacher: the first layer's
        assert np.array_equal(targets.array("val", kind)[:, :, 0], first.array("val", kind)), kind
    _, distilled = layered["distilled"]
    assert distilled["head_layers"] == layers and len(distilled["val_kl_per_head"]) == len(layers)
    assert distilled["val_kl"] == pytest.approx(np.mean(distilled["val_kl_per_head"]))
    _, folded = layered["folded"]
    assert folded["head_layers"] == layers and len(folded["within_group_affinity_per_head"]) == len(layers)
    g = Grouter.from_pretrained(layered["tuned"][0])
    assert (g.cfg.head_layers, g.cfg.source_layers, g.cfg.n_experts) == (layers, TINY["n_layers"], FOLD_EXPERTS)
    assert len(g.cfg.provenance["fold"]["groups"]) == len(layers) and layered["tuned"][1]["head_layers"] == layers


def test_per_layer_dispatch_place_train(layered, tiny_data):
    out, result = layered["routing"]
    heads = len(result["head_layers"])
    assert result["bytes_per_token"] == heads * FOLD_TOP_K * (1 + 2)
    store = RoutingStore.open(out, data=tiny_data)
    assert store.ids("train").shape == (n_sequences(tiny_data), tiny_data.seq_len, heads, FOLD_TOP_K)
    _, plan = layered["plan"]
    assert plan["per_layer_routing"] == {"head_layers": [0, 1], "target_layers": TARGET_LAYERS, "layer_heads": [0, 0, 1]}
    run_dir, run_result = layered["target"]
    assert run_result["layer_heads"] == [0, 0, 1]
    assert MoELM.from_pretrained(run_dir / "checkpoint").cfg.n_layers == TARGET_LAYERS
    probe = np.load(sorted((run_dir / "probes").glob("*.npy"))[-1])  # [layers, 8 val sequences, L, k]
    ids = store.routing("val", np.arange(8)).ids.numpy()
    assert all(np.array_equal(probe[layer], ids[:, :, head]) for layer, head in enumerate([0, 0, 1]))
    for stage, kind in (("targets", "targets"), ("tuned", "model"), ("routing", "routing store")):
        code, stdout, err = cli("verify", layered[stage][0], "--json")
        assert code == 0 and last_json(stdout)["kind"] == kind, err


@pytest.mark.parametrize("argv, message", [
    (["capture", "--layers", "0,5"], f"layer 5 is out of range: the source has {TINY['n_layers']} layers"),
    (["capture", "--layers", "0,x"], "argument --layers: expected an integer, got 'x'"),
    (["capture", "--layer", "0", "--layers", "1"], "argument --layers: not allowed with argument --layer"),
    (["place", "--ranks", "2", "--redundant-experts", "2"], "--redundant-experts predicts step times: add --hardware"),
    (["place", "--ranks", "2", "--target-layers", "0"], "argument --target-layers: expected a number at least 1"),
])
def test_per_layer_bad_inputs(capsys, tiny_data, pipe, layered, tmp_path, argv, message):
    inputs = {"capture": ["--source", str(pipe["source"][0]), "--data", str(tiny_data.path), "--device", "cpu"],
              "place": ["--routing", str(layered["routing"][0])]}[argv[0]]
    out = tmp_path / "out"
    code, _, err = run(capsys, *argv, *inputs, "--out", str(out))
    assert code == 2
    assert_one_line_error(code, err, message)
    assert_nothing_written(out)


EP_SIZE = ["--steps", "2", "--d-model", "32", "--layers", "1", "--heads", "2", "--d-expert", "32", "--device", "cpu"]


def test_ep_one_process(capsys, tiny_data, pipe, tmp_path):
    out = tmp_path / "ep"
    code, stdout, err = run(capsys, "ep", "--data", str(tiny_data.path), "--routing", str(pipe["routing"][0]),
                            "--plan", str(pipe["plan1"][0]), "--out", str(out), *EP_SIZE, "--json")
    assert code == 0, err
    result = last_json(stdout)
    assert result["out"] == str(out)
    assert load(out / "run.json")["summary"] == {k: v for k, v in result.items() if k != "out"}
    records = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2 and [r["step"] for r in records] == [1, 2]
    assert (result["ranks"], result["steps"], result["placement"], result["exchange"]) == (1, 2, "plan", "dedup")
    assert (result["n_experts"], result["k"]) == (FOLD_EXPERTS, FOLD_TOP_K)
    assert (result["model"]["d_model"], result["model"]["n_layers"]) == (32, 1)
    assert result["final_loss"] == records[-1]["loss"]
    plan = Plan.load(pipe["plan1"][0])
    assert [r["sequences_per_rank"] for r in records] == [[len(plan.samples[0][b])] for b in range(2)]
    assert result["dispatch_bytes_per_rank_step"] == 0.0  # one rank holds every expert: nothing is sent


def test_ep_refuses_a_plan_for_another_world_size(capsys, tiny_data, pipe, tmp_path):
    out = tmp_path / "ep"
    code, _, err = run(capsys, "ep", "--data", str(tiny_data.path), "--routing", str(pipe["routing"][0]),
                       "--plan", str(pipe["plan2"][0]), "--out", str(out), *EP_SIZE)
    assert code == 2
    assert_one_line_error(code, err, "the plan is for 2 ranks but 1 processes run")
    assert_nothing_written(out)


# -- report, demo, reproduce ------------------------------------------------------------------------

def test_report(capsys, pipe, tmp_path):
    out = tmp_path / "rep"
    source, target = pipe["source"][0], pipe["target"][0]
    code, stdout, err = run(capsys, "report", str(source), str(target), "--out", str(out), "--json")
    assert code == 0, err
    result = last_json(stdout)
    assert result["report"] == str(out)
    assert "| source | aux |" in result["table"] and "| target | grouter |" in result["table"]
    saved = load(out / "report.json")
    assert {n: r["router"] for n, r in saved["runs"].items()} == {"source": "aux", "target": "grouter"}
    assert saved["speedup"] == result["speedup"]
    # the speedup is the ratio of tokens to reach the baseline's final loss, from the logged curves
    curve = lambda run: [(e["tokens"], e["val_loss"]) for e in eval_records(run)]  # noqa: E731
    goal = curve(source)[-1][1]
    speed = result["speedup"]
    assert speed["best_baseline"] == "source" and speed["target_val_loss"] == goal
    reached = tokens_to_reach(curve(target), goal)
    expected = None if reached is None else tokens_to_reach(curve(source), goal) / reached
    assert speed["runs"]["target"]["speedup"] == (None if expected is None else pytest.approx(expected))
    assert speed["runs"]["target"]["final_val_loss_gap"] == pytest.approx(curve(target)[-1][1] - goal)
    assert set(result["speedup_by_domain"]) == {"all", "code", "prose"}


def test_report_refuses_a_directory_that_is_not_a_run(capsys, pipe, tmp_path):
    out = tmp_path / "rep"
    code, _, err = run(capsys, "report", str(pipe["source"][0]), str(pipe["routing"][0]), "--out", str(out))
    assert code == 2
    assert_one_line_error(code, err, f"{pipe['routing'][0]} is not a grouter training run (no run.json)")
    assert_nothing_written(out)


def test_demo(capsys, monkeypatch, tmp_path):
    from grouter.testing import tiny_demo

    cfg = tiny_demo(max_mb_per_domain=0.03, source_steps=4, distill_steps=4, tune_tokens=1_000, target_steps=4,
                    baselines=("aux",), ranks=2)  # smaller still: seconds
    monkeypatch.setattr("grouter.experiments.demo.demo_config", lambda: cfg)
    out = tmp_path / "demo"
    code, stdout, err = run(capsys, "demo", "--out", str(out), "--json")
    assert code == 0, err
    result = last_json(stdout)
    for key in ("data", "source", "grouter", "routing", "plan", "report"):
        assert Path(result[key]).is_relative_to(out) and Path(result[key]).exists(), key
    assert PackedDataset.open(result["data"]).domains == ["prose", "speeches", "code"]
    assert Plan.load(result["plan"]).ranks == 2
    assert set(load(out / "report" / "report.json")["runs"]) == {"grouter-layers-all", "aux"}
    assert RoutingStore.open(result["routing"]).heads.layers == tuple(range(cfg.source["n_layers"]))  # the default
    assert Path(result["plan"]).name == "plan-layers-all"

    kept = [out / "runs" / "aux" / "run.json", out / "source" / "run.json"]  # reused by the shared head beside them
    mtimes = [p.stat().st_mtime_ns for p in kept]
    code, stdout, err = run(capsys, "demo", "--out", str(out), "--shared-head", "--json")
    assert code == 0, err
    shared = last_json(stdout)
    assert RoutingStore.open(shared["routing"]).heads is None
    assert Path(shared["plan"]).name == "plan" and Path(result["plan"]).exists()
    assert set(load(out / "report" / "report.json")["runs"]) == {"grouter", "aux"}
    assert [p.stat().st_mtime_ns for p in kept] == mtimes


def test_demo_without_the_corpus_says_how_to_fetch_it(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("GROUTER_CORPUS_DIR", str(tmp_path / "no-corpus"))
    out = tmp_path / "demo"
    code, _, err = run(capsys, "demo", "--out", str(out))
    assert code == 2
    assert_one_line_error(code, err, "run `make corpus`")
    assert not (out / "data").exists() and not (out.exists() and any(out.iterdir()))


def test_reproduce_on_a_users_dataset(capsys, monkeypatch, tiny_data, tmp_path):
    """--data: the held-out domain is one of the user's; the embedded corpus is not prepared."""
    from grouter.data import PackConfig, pack_documents
    from grouter.testing import tiny_reproduction as tiny

    data = pack_documents(stdlib_documents()[:8], tiny_data.tokenizer(), tmp_path / "data", PackConfig(seq_len=32))

    base = tiny(source_steps=4, distill_steps=4, tune_tokens=1_000, baselines=("aux",), fold_ablation=(),
                causal_ablation=False)  # the smoke scale, smaller still, and only one baseline, no ablations

    def small(scale, **overrides):
        assert scale == "smoke"
        return replace(base, **overrides)

    monkeypatch.setattr("grouter.experiments.reproduce.reproduce_config", small)
    out = tmp_path / "r"
    code, stdout, err = run(capsys, "reproduce", "--scale", "smoke", "--out", str(out), "--data", str(data.path),
                            "--held-out-domain", "prose", "--target-steps", "4", "--json")
    assert code == 0, err
    result = last_json(stdout)
    assert result["domains"] == {"source_saw": ["code"], "held_out": "prose"}
    assert result["config"]["data"] == str(data.path) and result["config"]["target_steps"] == 4
    assert result["target_tokens_per_run"] == 4 * base.batch_size * data.seq_len
    assert result["train_tokens_available"] == data.split("train").tokens.size
    assert not (out / "data").exists()
    assert PackedDataset.open(out / "data-source").domains == ["code"]
    report = load(out / "report" / "report.json")
    assert set(report["runs"]) == {"grouter", "grouter-raw", "aux"}
    assert {r["tokens"] for r in report["runs"].values()} == {result["target_tokens_per_run"]}
    assert result["speedup_by_domain"] == report["speedup_by_domain"]
    assert load(out / "reproduce.json") == result


def test_reproduce_refuses_a_held_out_domain_the_data_lacks(capsys, monkeypatch, tiny_data, tmp_path):
    from grouter.experiments.pipeline import Pipeline

    def no_training(*a, **k):
        raise AssertionError("trained before checking the held-out domain")

    monkeypatch.setattr(Pipeline, "source_targets", no_training)
    out = tmp_path / "r"
    code, _, err = run(capsys, "reproduce", "--scale", "smoke", "--out", str(out), "--data", str(tiny_data.path),
                       "--held-out-domain", "poetry")
    assert code == 2
    assert_one_line_error(code, err, "held-out domain 'poetry' must be one of the data's domains (code, prose)")
    assert_nothing_written(out)


# -- at scale: compact targets, head groups -----------------------------------------------------------


def test_compact_targets_and_head_groups_through_the_command_line(capsys, pipe, tiny_data, tmp_path):
    """``capture --layers all --top-m 4`` then ``distill --head-groups 1``: the summary's bytes per token,
    a shared head distilled against both layers' compact targets, verify reading version 4."""
    data, source = str(tiny_data.path), str(pipe["source"][0])
    code, out, err = run(capsys, "capture", "--source", source, "--data", data, "--layers", "all", "--top-m", "4",
                         "--batch-size", "256", "--device", "cpu", "--out", tmp_path / "t", "--json")
    assert code == 0, err
    result = last_json(out)
    assert (result["top_m"], result["bytes_per_token"]) == (4, TINY["n_layers"] * (4 * (2 + 1) + 4))
    code, out, err = run(capsys, "verify", tmp_path / "t", "--json")
    assert code == 0 and last_json(out)["kind"] == "targets", err
    code, out, err = run(capsys, "distill", "--targets", tmp_path / "t", *DISTILL, "--head-groups", "1",
                         "--device", "cpu", "--out", tmp_path / "g", "--json")
    assert code == 0, err
    summary = last_json(out)
    assert "head_layers" not in summary and len(summary["val_kl_per_head"]) == TINY["n_layers"]
    assert Grouter.from_pretrained(tmp_path / "g").cfg.heads is None
    code, _, err = run(capsys, "capture", "--source", source, "--data", data, "--top-m", "8", "--device", "cpu",
                       "--out", tmp_path / "t8")
    assert_one_line_error(code, err, "--top-m 8 must keep at least the source's top-k (2) and fewer than its 8 experts")
    assert_nothing_written(tmp_path / "t8")
