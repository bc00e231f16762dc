"""Pre-dispatch: the routing store equals online routing, is bound to its inputs, resumes and shards."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from grouter.testing import stdlib_documents
from grouter.data import PackConfig, pack_documents, train_tokenizer
from grouter.dispatch import dispatch
from grouter.errors import GrouterError
from grouter.formats.dataset import SPLITS, PackedDataset
from grouter.formats.grouter import GrouterConfig
from grouter.formats.store import ONE_HEAD_VERSION, PER_LAYER_VERSION, ROUTING_FORMAT, RoutingStore
from grouter.network import Grouter

BF16_TOL = 2 ** -8  # relative spacing of bfloat16 (8 significant bits)
BATCH = 64
SRC = str(Path(__file__).resolve().parents[1] / "src")


def make_grouter(data, path: Path, n_experts: int = 16, top_k: int = 4) -> Path:
    g = Grouter(GrouterConfig(vocab_size=data.vocab_size, n_experts=n_experts, top_k=top_k, d_model=32,
                              n_layers=1, n_heads=2, d_ff=64, max_seq_len=data.seq_len))
    with torch.no_grad():
        g.head.weight.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(1))  # routes that vary
    g.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def grouter_dir(tiny_data, tmp_path_factory):
    return make_grouter(tiny_data, tmp_path_factory.mktemp("grouter") / "g16")


@pytest.fixture(scope="module")
def store_dir(tiny_data, grouter_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("routing") / "store"
    summary = dispatch(out, grouter=grouter_dir, data=tiny_data, batch_size=BATCH, progress=False)
    assert summary["routing"] == str(out) and summary["k"] == 4 and summary["n_experts"] == 16
    assert summary["tokens"] == sum(len(tiny_data.split(s)) for s in SPLITS) * tiny_data.seq_len
    # an uninterrupted run routes every token itself: the rate is all tokens over its wall time
    assert summary["tokens_per_second"] == pytest.approx(summary["tokens"] / summary["seconds"], rel=1e-2)
    assert not summary["resumed"] and summary["world_size"] == 1
    return out


def read_bytes(store: Path) -> dict[str, bytes]:
    return {f"{s}.{kind}": (store / f"{s}.{kind}").read_bytes() for s in SPLITS for kind in ("ids", "weights")}


def subprocess_env() -> dict:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"  # like torchrun's workers; the store must not depend on it
    env["PYTHONPATH"] = SRC + os.pathsep + env.get("PYTHONPATH", "")
    return env


# -- the store is the online routing of exactly the training sequences --------------------------


def test_store_equals_online_routing(tiny_data, grouter_dir, store_dir):
    g = Grouter.from_pretrained(grouter_dir)
    store = RoutingStore.open(store_dir, data=tiny_data, grouter_fingerprint=g.fingerprint())
    assert (store.k, store.n_experts) == (4, 16)
    m = store.manifest
    assert (m["format"], m["version"], "heads" in m) == (ROUTING_FORMAT, ONE_HEAD_VERSION, False)  # as before heads
    assert m["dataset_fingerprint"] == tiny_data.fingerprint and m["seq_len"] == tiny_data.seq_len
    assert m["dataset_path"] == str(Path(tiny_data.path).resolve()) and m["causal"] is True
    assert m["ids_dtype"] == "uint8" and m["weights_dtype"] == "bfloat16"
    rng = np.random.default_rng(0)
    for name in SPLITS:
        split = tiny_data.split(name)
        n = len(split)
        assert m["splits"][name]["n_sequences"] == n and store.ids(name).shape == (n, tiny_data.seq_len, 4)
        idx = np.unique(np.concatenate([rng.choice(n, 40, replace=False), [0, n - 1]]))
        online = g.route(split.batch(idx)["input_ids"], 4)
        stored = store.routing(name, idx)
        assert stored.ids.dtype == torch.long and stored.weights.dtype == torch.float32
        assert stored.ids.shape == stored.weights.shape == (len(idx), tiny_data.seq_len, 4)
        assert torch.equal(stored.ids, online.ids)
        assert torch.allclose(stored.weights, online.weights, rtol=BF16_TOL, atol=1e-6)
        assert len(torch.unique(stored.ids)) > 8  # the routes vary: the comparison means something


def test_store_aligned_with_training_sequences(tiny_data, grouter_dir, store_dir):
    """Sequence i position t of the store routes split.batch([i])["input_ids"][0, t], and nothing else."""
    g = Grouter.from_pretrained(grouter_dir)
    store = RoutingStore.open(store_dir, data=tiny_data, verify=False)
    L = tiny_data.seq_len
    for name in SPLITS:
        split = tiny_data.split(name)
        n = len(split)
        for i in sorted({0, 1, BATCH - 1, BATCH, n // 2, n - 2, n - 1}):
            input_ids = split.batch([i])["input_ids"]
            online = g.route(input_ids, 4)
            stored = store.routing(name, np.array([i]))
            for t in (0, 1, L // 2, L - 1):
                assert torch.equal(stored.ids[0, t], online.ids[0, t]), (name, i, t)
            # a one-token shift (the labels, or the neighbouring sequence) would route differently
            shifted = g.route(split.batch([i])["labels"], 4)
            assert not torch.equal(stored.ids[0], shifted.ids[0])
        # gate weights of each token sum to 1 (softmax over the top-k, scale 1)
        w = store.routing(name, np.arange(min(n, 50))).weights
        assert torch.allclose(w.sum(-1), torch.ones(()), atol=4 * BF16_TOL)


def test_per_layer_routing_is_stored_per_head_aligned_with_the_sequences(tmp_path, tiny_data):
    """A Grouter with per-layer heads: every head's routing of every input token, [n, L, H, k], in the
    dataset's order; the manifest names the heads' source layers; H·3k bytes per token."""
    g = Grouter(GrouterConfig(vocab_size=tiny_data.vocab_size, n_experts=16, top_k=4, d_model=32, n_layers=1, n_heads=2,
                              d_ff=64, max_seq_len=tiny_data.seq_len, head_layers=[0, 2, 5], source_layers=6))
    with torch.no_grad():
        g.head.weight.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(1))
    g.save_pretrained(tmp_path / "g")
    summary = dispatch(tmp_path / "r", grouter=tmp_path / "g", data=tiny_data, batch_size=BATCH, progress=False)
    assert summary["head_layers"] == [0, 2, 5] and summary["bytes_per_token"] == 3 * 3 * 4
    store = RoutingStore.open(tmp_path / "r", data=tiny_data, grouter_fingerprint=g.fingerprint())
    m = store.manifest
    assert (m["version"], m["heads"], m["head_layers"], m["source_layers"]) == (PER_LAYER_VERSION, 3, [0, 2, 5], 6)
    assert store.heads.layers == (0, 2, 5) and "head_layers=[0, 2, 5]" in repr(store)
    L = tiny_data.seq_len
    for name in SPLITS:
        split = tiny_data.split(name)
        n = len(split)
        assert store.ids(name).shape == (n, L, 3, 4)
        for i in sorted({0, BATCH - 1, BATCH, n - 1}):
            online = g.route(split.batch([i])["input_ids"], 4)
            stored = store.routing(name, np.array([i]))
            assert stored.ids.shape == (1, L, 3, 4) and stored.heads == store.heads
            assert torch.equal(stored.ids, online.ids)
            assert torch.allclose(stored.weights, online.weights, rtol=BF16_TOL, atol=1e-6)
            for h in range(3):  # heads differ, and each is its own head's routing
                assert torch.equal(stored.ids[0, :, h], g(split.batch([i])["input_ids"])[0, :, h].topk(4).indices)
            assert not torch.equal(stored.ids[..., 0, :], stored.ids[..., 1, :])
    tokens = sum(len(tiny_data.split(s)) for s in SPLITS) * L
    assert sum(p.stat().st_size for p in (tmp_path / "r").iterdir() if p.suffix in (".ids", ".weights")) == 3 * 3 * 4 * tokens


def test_storage_is_3k_bytes_per_token(tiny_data, store_dir):
    k, L = 4, tiny_data.seq_len
    tokens = sum(len(tiny_data.split(s)) for s in SPLITS) * L
    data_bytes = sum(p.stat().st_size for p in store_dir.iterdir() if p.suffix in (".ids", ".weights"))
    assert data_bytes == 3 * k * tokens
    assert sorted(p.name for p in store_dir.iterdir() if not p.name.startswith(".")) == sorted(
        ["manifest.json"] + [f"{s}.{x}" for s in SPLITS for x in ("ids", "weights")])


def test_uint16_ids_above_256_experts_and_float16_weights(tiny_data, tmp_path):
    g_dir = make_grouter(tiny_data, tmp_path / "g300", n_experts=300, top_k=2)
    summary = dispatch(tmp_path / "r300", grouter=g_dir, data=tiny_data, batch_size=256, weights_dtype="float16", progress=False)
    assert summary["bytes_per_token"] == 2 * (2 + 2)
    store = RoutingStore.open(tmp_path / "r300", data=tiny_data)
    assert store.manifest["ids_dtype"] == "uint16" and store.ids("train").dtype == np.uint16
    assert store.manifest["weights_dtype"] == "float16"
    n = len(tiny_data.split("train"))
    assert (tmp_path / "r300" / "train.ids").stat().st_size == n * tiny_data.seq_len * 2 * 2
    g = Grouter.from_pretrained(g_dir)
    idx = np.array([0, 7, n - 1])
    online = g.route(tiny_data.split("train").batch(idx)["input_ids"])
    stored = store.routing("train", idx)
    assert torch.equal(stored.ids, online.ids) and stored.ids.max() > 255
    assert torch.allclose(stored.weights, online.weights, rtol=2 ** -11, atol=1e-6)


# -- resumable and atomic -----------------------------------------------------------------------

# A kill at a known point: this wrapper runs a command line (``grouter.cli``) with
# ``ResumableDir.set_done`` patched so that the process SIGKILLs itself right after its N-th
# checkpoint, i.e. the N-th time progress was recorded for every rank (after the data it covers was
# flushed). Only the process holding the ResumableDir (rank 0) records progress, so only it dies;
# torchrun then tears down the other ranks. Usage: KILL_AFTER N CHECKPOINT_EVERY COMMAND...
KILL_AFTER = """
import os, signal, sys
import grouter.artifacts, grouter.dispatch
from grouter.cli import main

kill_after, grouter.dispatch.CHECKPOINT_EVERY = int(sys.argv[1]), int(sys.argv[2])
last_rank = f"rank{int(os.environ.get('WORLD_SIZE', '1')) - 1}"
set_done, checkpoints = grouter.artifacts.ResumableDir.set_done, []

def set_done_then_die(self, key, value):
    set_done(self, key, value)
    if value > 0 and key.endswith("/" + last_rank):  # every rank's progress of this step is recorded
        checkpoints.append(key)
        if len(checkpoints) == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)

grouter.artifacts.ResumableDir.set_done = set_done_then_die
sys.exit(main(sys.argv[3:]))
"""
KILLS_AT = 3  # checkpoints before the kill, one per batch: the kill lands 3 batches into the train split


def dispatch_args(grouter_dir, data, out) -> list[str]:
    return ["dispatch", "--grouter", str(grouter_dir), "--data", str(data.path), "--out", str(out),
            "--batch-size", str(BATCH), "--device", "cpu", "--json"]


def test_kill_and_resume_is_byte_identical(tiny_data, grouter_dir, store_dir, tmp_path, capsys):
    from grouter.cli import main

    out, partial = tmp_path / "resumed", tmp_path / ".resumed.partial"
    killed = subprocess.run([sys.executable, "-c", KILL_AFTER, str(KILLS_AT), "1",
                             *dispatch_args(grouter_dir, tiny_data, out)],
                            env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    progress = json.loads((partial / "progress.json").read_text())["done"]
    assert progress == {"train/rank0": KILLS_AT * BATCH}  # killed right after its third checkpoint
    assert not out.exists()  # no store, a partial one to resume

    assert main(dispatch_args(grouter_dir, tiny_data, out)) == 0  # the same command, uninterrupted
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["resumed"] is True and summary["routing"] == str(out)
    # it routed only what the killed run had not: the rest of train, and val
    rest = (sum(len(tiny_data.split(s)) for s in SPLITS) - KILLS_AT * BATCH) * tiny_data.seq_len
    assert summary["tokens_per_second"] == pytest.approx(rest / summary["seconds"], rel=1e-2)
    assert not partial.exists()
    assert read_bytes(out) == read_bytes(store_dir)
    assert json.loads((out / "manifest.json").read_text()) == json.loads((store_dir / "manifest.json").read_text())
    RoutingStore.open(out, data=tiny_data)


def test_stale_partial_of_another_job_is_discarded_and_smaller_k_is_a_prefix(tiny_data, grouter_dir, store_dir,
                                                                           tmp_path):
    out = tmp_path / "k2"
    partial = tmp_path / ".k2.partial"
    partial.mkdir()
    (partial / "progress.json").write_text(json.dumps({"identity": {"k": 99}, "done": {"train/rank0": 64}}))
    (partial / "train.ids").write_bytes(b"\xff" * 100)
    summary = dispatch(out, grouter=grouter_dir, data=tiny_data, k=2, batch_size=256, progress=False)
    assert not summary["resumed"] and summary["bytes_per_token"] == 6
    k2, k4 = RoutingStore.open(out, data=tiny_data), RoutingStore.open(store_dir, verify=False)
    assert k2.k == 2
    for name in SPLITS:  # top-k ids come sorted by logit: the first 2 of k = 4 are the k = 2 routing
        assert np.array_equal(np.asarray(k2.ids(name)), np.asarray(k4.ids(name))[..., :2])


# -- refusals -----------------------------------------------------------------------------------


@pytest.fixture()
def store_copy(store_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(store_dir, copy)
    return copy


def test_tampered_ids_refused(tiny_data, store_copy):
    f = store_copy / "train.ids"
    raw = bytearray(f.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    f.write_bytes(bytes(raw))
    store = RoutingStore.open(store_copy, data=tiny_data)  # sizes are fine: the bytes are checked when read
    n = store.n_sequences("train")
    store.routing("val", np.arange(4))  # another file: fine
    with pytest.raises(GrouterError, match="train.ids is corrupt: bytes 0..[0-9]* do not match their checksum"):
        store.routing("train", np.arange(4))  # a small store is one chunk: any read of it finds the flip
    with pytest.raises(GrouterError, match="do not match their checksum"):
        RoutingStore.open(store_copy).verify()
    RoutingStore.open(store_copy, verify=False).routing("train", np.arange(n // 2 - 2, n // 2 + 2))  # unchecked


def test_truncated_weights_refused(tiny_data, store_copy):
    f = store_copy / "val.weights"
    with open(f, "r+b") as fh:
        fh.truncate(f.stat().st_size - 2)
    with pytest.raises(GrouterError, match="truncated"):
        RoutingStore.open(store_copy, data=tiny_data, verify=False)


def test_other_dataset_refused(tiny_data, store_dir, tmp_path):
    docs = stdlib_documents()[:8]
    tokenizer = train_tokenizer((d.text for d in docs), vocab_size=512)
    pack_documents(docs, tokenizer, tmp_path / "other", PackConfig(seq_len=16, val_fraction=0.1, seed=0))
    other = PackedDataset.open(tmp_path / "other")
    with pytest.raises(GrouterError, match="another dataset"):
        RoutingStore.open(store_dir, data=other)


def test_other_grouter_refused(tiny_data, store_dir, tmp_path):
    other = Grouter.from_pretrained(make_grouter(tiny_data, tmp_path / "g", n_experts=16, top_k=2))
    with pytest.raises(GrouterError, match="another Grouter"):
        RoutingStore.open(store_dir, data=tiny_data, grouter_fingerprint=other.fingerprint())


def test_missing_or_foreign_store_refused(tiny_data, store_copy, tmp_path):
    with pytest.raises(GrouterError, match="grouter dispatch"):
        RoutingStore.open(tmp_path / "nowhere")
    manifest = json.loads((store_copy / "manifest.json").read_text())
    (store_copy / "manifest.json").write_text(json.dumps({**manifest, "version": 99}))
    with pytest.raises(GrouterError, match="version"):
        RoutingStore.open(store_copy)
    (store_copy / "manifest.json").write_text(json.dumps({**manifest, "format": "grouter-targets"}))
    with pytest.raises(GrouterError, match="not a grouter routing store"):
        RoutingStore.open(store_copy)
    (store_copy / "manifest.json").unlink()
    with pytest.raises(GrouterError, match="grouter dispatch"):
        RoutingStore.open(store_copy)


def test_bad_arguments_refused(tiny_data, grouter_dir, store_dir, tmp_path):
    with pytest.raises(GrouterError, match="k = 17"):
        dispatch(tmp_path / "k17", grouter=grouter_dir, data=tiny_data, k=17, progress=False)
    with pytest.raises(GrouterError, match="--weights-dtype must be one of bfloat16, float16"):
        dispatch(tmp_path / "f32", grouter=grouter_dir, data=tiny_data, weights_dtype="float32", progress=False)
    with pytest.raises(GrouterError, match="already exists"):
        dispatch(store_dir, grouter=grouter_dir, data=tiny_data, progress=False)
    assert not any(p.name.startswith(".k17") or p.name.startswith("k17") for p in tmp_path.iterdir())


# -- sharded over processes ---------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_sharded_dispatch_killed_and_resumed_is_byte_identical(tiny_data, grouter_dir, store_dir, tmp_path):
    """torchrun with 2 gloo ranks, rank 0 killed right after its third checkpoint (torchrun ends the
    other rank) and relaunched: the store is byte-identical to a single-process one."""
    script = tmp_path / "kill_after.py"
    script.write_text(KILL_AFTER)
    out, partial = tmp_path / "sharded", tmp_path / ".sharded.partial"
    env = subprocess_env()
    env.pop("WORLD_SIZE", None)

    def torchrun(*argv) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                               "--master_addr", "127.0.0.1", "--master_port", str(free_port()), *argv],
                              env=env, capture_output=True, text=True, timeout=180)

    killed = torchrun(str(script), str(KILLS_AT), "1", *dispatch_args(grouter_dir, tiny_data, out))
    assert killed.returncode != 0 and "SIGKILL" in killed.stderr, killed.stderr[-3000:]
    progress = json.loads((partial / "progress.json").read_text())["done"]
    assert progress == {"train/rank0": KILLS_AT * BATCH, "train/rank1": KILLS_AT * BATCH}
    assert not out.exists()

    relaunch = torchrun("-m", "grouter.cli", *dispatch_args(grouter_dir, tiny_data, out))
    assert relaunch.returncode == 0, relaunch.stderr[-3000:]
    assert "resuming dispatch" in relaunch.stderr
    results = [json.loads(ln) for ln in relaunch.stdout.splitlines() if ln.startswith("{")]
    assert results and all(r["resumed"] is True and r["world_size"] == 2 for r in results), relaunch.stdout
    assert read_bytes(out) == read_bytes(store_dir)
    assert json.loads((out / "manifest.json").read_text()) == json.loads((store_dir / "manifest.json").read_text())
    assert not partial.exists()


def test_a_manifest_whose_version_and_heads_disagree_is_refused(tmp_path):
    from grouter.artifacts import read_json, write_json
    from grouter.formats.store import write_store
    from grouter.routers import Heads, Routing

    ids = torch.randint(0, 8, (4, 6, 2, 2))
    write_store(tmp_path / "s", {"train": Routing(ids, torch.rand(4, 6, 2, 2), heads=Heads((1, 3), 4))}, 8)
    store = RoutingStore.open(tmp_path / "s")
    assert torch.equal(store.routing("train", np.arange(4)).ids, ids) and store.row_shape == (6, 2, 2)
    m = read_json(tmp_path / "s" / "manifest.json", "manifest")
    write_json(tmp_path / "s" / "manifest.json", {**m, "version": ONE_HEAD_VERSION})
    with pytest.raises(GrouterError, match="corrupt: manifest.json lacks or mangles"):
        RoutingStore.open(tmp_path / "s")
    write_json(tmp_path / "s" / "manifest.json", {**m, "head_layers": [3, 1]})
    with pytest.raises(GrouterError, match="corrupt: manifest.json lacks or mangles"):
        RoutingStore.open(tmp_path / "s")
    with pytest.raises(GrouterError, match="does not fit a store"):
        write_store(tmp_path / "t", {"train": Routing(ids, torch.rand(4, 6, 2, 2))}, 8)


def test_a_head_group_grouter_stores_a_routing_per_group_and_serves_each_layer_its_groups(tmp_path, tiny_data):
    """Four source layers in two head groups: the store holds two routings per token (version 4,
    ``head_groups``), and each layer of a target of any depth gets its group's head's routing;
    folding keeps the groups."""
    from grouter.fold import fold

    g = Grouter(GrouterConfig(vocab_size=tiny_data.vocab_size, n_experts=16, top_k=4, d_model=32, n_layers=1, n_heads=2,
                              d_ff=64, max_seq_len=tiny_data.seq_len, head_layers=[0, 1, 2, 3], source_layers=4,
                              head_groups=[0, 0, 1, 1]))
    with torch.no_grad():
        g.head.weight.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(1))
    g.save_pretrained(tmp_path / "g")
    summary = dispatch(tmp_path / "r", grouter=tmp_path / "g", data=tiny_data, batch_size=BATCH, progress=False)
    assert summary["bytes_per_token"] == 2 * 3 * 4
    store = RoutingStore.open(tmp_path / "r", data=tiny_data, grouter_fingerprint=g.fingerprint())
    m = store.manifest
    assert (m["version"], m["heads"], m["head_groups"]) == (4, 2, [0, 0, 1, 1]) and store.heads == g.cfg.heads
    idx = np.arange(3)
    stored = store.routing("val", idx)
    with torch.no_grad():
        logits = g(tiny_data.split("val").batch(idx)["input_ids"])  # [n, L, 2 heads, E]
    for n_layers, expected in [(4, [0, 0, 1, 1]), (2, [0, 1]), (8, [0, 0, 0, 0, 1, 1, 1, 1])]:
        for layer, head in enumerate(expected):
            assert torch.equal(stored.for_layer(layer, n_layers).ids, logits[..., head, :].topk(4).indices)
    folded = fold(tmp_path / "f", grouter=tmp_path / "g", data=tiny_data, experts=8, progress=False)
    assert folded["head_groups"] == [0, 0, 1, 1]
    assert Grouter.from_pretrained(tmp_path / "f").cfg.heads == g.cfg.heads
    assert sorted(p.name for p in (tmp_path / "f").glob("affinity_*.png")) == ["affinity_layers0-1.png",
                                                                                 "affinity_layers2-3.png"]
    dispatch(tmp_path / "rf", grouter=tmp_path / "f", data=tiny_data, batch_size=BATCH, progress=False)
    assert RoutingStore.open(tmp_path / "rf").heads == g.cfg.heads
