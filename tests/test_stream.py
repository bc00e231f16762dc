"""Routing streams of Megatron indexed datasets: every token routed from its document's start, bound to the prefix
and the Grouter, checked as read; `grouter dispatch --megatron-data` and `grouter place` on a stream."""

import json
import shutil

import numpy as np
import pytest
import torch

from grouter.capture import capture
from grouter.cli import main
from grouter.data import Document
from grouter.dispatch import dispatch
from grouter.errors import GrouterError
from grouter.formats.dataset import PackedDataset
from grouter.formats.plan import Plan
from grouter.formats.stream import RoutingStream, StreamSamples, document_windows, prefix_files
from grouter.formats.verify import verify_artifact
from grouter.model import MoEConfig, MoELM
from grouter.network import Grouter
from grouter.place import place
from grouter.routers import Heads
from grouter.testing import (assert_one_line_error, document_routing, indexed_items, megatron_indexed_dataset, run_cli,
                             small_grouter, stdlib_documents)

BF16_TOL = 2 ** -8
WINDOW, OVERLAP = 64, 16


@pytest.fixture(scope="module")
def grouter_dir(tiny_data, tmp_path_factory):
    return small_grouter(tmp_path_factory.mktemp("grouter") / "g", document_eos=tiny_data.eos_id)


@pytest.fixture(scope="module")
def stream_dir(megatron_text, grouter_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("stream") / "paragraphs"
    summary = dispatch(out, grouter=grouter_dir, megatron_data=megatron_text["paragraphs"], overlap=OVERLAP,
                       batch_size=32, progress=False)
    assert summary["format"] == "stream" and summary["window"] == WINDOW  # the length the Grouter was distilled on
    assert summary["documents_longer_than_window"] > 0 and summary["documents"] > 100
    return out


def test_every_token_is_routed_from_its_documents_start(megatron_text, grouter_dir, stream_dir):
    """Row p of the stream is token p of PREFIX.bin, routed by the Grouter over its own item only, from the item's
    start (longer items in windows of 64 re-reading 16 tokens): equal, token by token, to the rule computed
    directly, for every item."""
    stream = RoutingStream.open(stream_dir, prefix=megatron_text["paragraphs"])
    g = Grouter.from_pretrained(grouter_dir)
    offsets, docs = stream.offsets(), indexed_items(megatron_text["paragraphs"])
    assert len(docs) == stream.n_documents and offsets[-1] == stream.n_tokens == sum(map(len, docs))
    lengths = np.diff(offsets)
    assert (lengths <= WINDOW).sum() > 50 and (lengths > 3 * WINDOW).sum() > 3  # short ones, and several windows
    for d, tokens in enumerate(docs):
        stored = stream.rows(np.arange(offsets[d], offsets[d + 1]))
        ids, weights = document_routing(g, tokens, WINDOW, OVERLAP)
        assert torch.equal(stored.ids, ids), d
        assert torch.allclose(stored.weights, weights, rtol=BF16_TOL, atol=1e-6), d
    assert len(torch.unique(stream.rows(np.arange(stream.n_tokens)).ids)) == 16  # the routes vary


def test_windows_route_every_token_once_with_a_context_from_its_document():
    lengths = np.random.default_rng(0).integers(0, 700, size=200)
    for window, overlap in ((64, 16), (64, 0), (64, 63), (7, 3)):
        doc, start, stop, emit = document_windows(lengths, window, overlap)
        covered = np.concatenate([np.arange(a, b) + 1000 * d for d, a, b in zip(doc, emit, stop)])
        expected = np.concatenate([np.arange(n) + 1000 * d for d, n in enumerate(lengths)])
        assert np.array_equal(covered, expected)  # every token once, in order
        assert (stop - start <= window).all() and (emit - start >= np.where(start == 0, 0, overlap)).all()
    with pytest.raises(GrouterError, match="overlap"):
        document_windows(lengths, 8, 8)


def test_per_layer_heads_are_streamed_per_head(megatron_text, tiny_data, tmp_path):
    heads = Heads((0, 3), 6)
    small_grouter(tmp_path / "g", heads=heads, document_eos=tiny_data.eos_id)
    dispatch(tmp_path / "s", grouter=tmp_path / "g", megatron_data=megatron_text["paragraphs"], progress=False)
    stream = RoutingStream.open(tmp_path / "s")
    assert stream.heads == heads and stream.manifest["context"] == {"rule": "document", "window": 64, "overlap": 32}
    g, offsets = Grouter.from_pretrained(tmp_path / "g"), stream.offsets()
    for d, tokens in list(enumerate(indexed_items(megatron_text["paragraphs"])))[:40]:
        stored = stream.rows(np.arange(offsets[d], offsets[d + 1]))
        assert stored.ids.shape == (len(tokens), 2, 4) and stored.heads == heads
        assert torch.equal(stored.ids, document_routing(g, tokens, 64, 32)[0])


def test_a_stream_is_bound_to_its_prefix_and_its_bytes_are_checked_as_read(megatron_text, stream_dir, tmp_path):
    with pytest.raises(GrouterError, match="made for another Megatron dataset"):
        RoutingStream.open(stream_dir, prefix=megatron_text["docs"])
    copy = shutil.copytree(stream_dir, tmp_path / "s")
    ids = copy / "stream.ids"
    data = bytearray(ids.read_bytes())
    data[1000] ^= 1  # same size
    ids.write_bytes(bytes(data))
    stream = RoutingStream.open(copy, prefix=megatron_text["paragraphs"])
    with pytest.raises(GrouterError, match="corrupt"):
        stream.rows(np.arange(240, 260))
    with pytest.raises(GrouterError, match="corrupt"):
        verify_artifact(copy)
    assert verify_artifact(stream_dir)["kind"] == "routing stream"
    # the user's tokens changed after dispatch, keeping their size: found when a reader checks the chunk
    prefix = tmp_path / "p" / "text"
    prefix.parent.mkdir()
    for src, dst in zip(prefix_files(megatron_text["paragraphs"]), prefix_files(prefix)):
        shutil.copyfile(src, dst)
    bin_ = prefix_files(prefix)[1]
    tokens = bytearray(bin_.read_bytes())
    tokens[10] ^= 1
    bin_.write_bytes(bytes(tokens))
    checker = RoutingStream.open(stream_dir, prefix=prefix).bin_checker(prefix)
    with pytest.raises(GrouterError, match="tokens changed since `grouter dispatch`"):
        checker.check(0, 100)


def test_dispatch_refuses_what_it_cannot_route(capsys, megatron_text, grouter_dir, tiny_data, tmp_path):
    args = ["dispatch", "--grouter", grouter_dir, "--out", tmp_path / "o"]
    code, _, err = run_cli(capsys, *args, "--megatron-data", tmp_path / "nothing")
    assert_one_line_error(code, err, "is not a Megatron indexed dataset")
    code, _, err = run_cli(capsys, *args, "--data", tiny_data.path, "--window", "32")
    assert_one_line_error(code, err, "--window and --overlap are for --megatron-data")
    small_grouter(tmp_path / "small", vocab=300, document_eos=tiny_data.eos_id)
    code, _, err = run_cli(capsys, "dispatch", "--grouter", tmp_path / "small", "--megatron-data",
                           megatron_text["paragraphs"], "--out", tmp_path / "o")
    assert_one_line_error(code, err, "beyond the Grouter's vocabulary of 300")
    small_grouter(tmp_path / "across", document_eos=None)
    code, _, err = run_cli(capsys, "dispatch", "--grouter", tmp_path / "across", "--megatron-data",
                           megatron_text["paragraphs"], "--out", tmp_path / "o")
    assert_one_line_error(code, err, "distill with `grouter distill --document-start`")
    small_grouter(tmp_path / "old", distilled_seq_len=None, document_eos=tiny_data.eos_id)
    code, _, err = run_cli(capsys, "dispatch", "--grouter", tmp_path / "old", "--megatron-data",
                           megatron_text["paragraphs"], "--out", tmp_path / "o")
    assert_one_line_error(code, err, "pass --window")
    code, _, err = run_cli(capsys, *args, "--megatron-data", megatron_text["paragraphs"], "--window", "64",
                           "--overlap", "64")
    assert_one_line_error(code, err, "must be below the window")
    assert not (tmp_path / "o").exists()


def test_the_same_dispatch_again_is_a_no_op(capsys, megatron_text, grouter_dir, stream_dir):
    argv = ["dispatch", "--grouter", grouter_dir, "--megatron-data", megatron_text["paragraphs"], "--overlap",
            str(OVERLAP), "--batch-size", "32", "--out", stream_dir, "--json"]
    before = (stream_dir / "stream.json").read_bytes()
    assert main([str(a) for a in argv]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["routing"] == str(stream_dir) and (stream_dir / "stream.json").read_bytes() == before


def test_place_plans_experts_on_gpt_dataset_like_samples_of_a_stream(megatron_text, stream_dir, tmp_path):
    stream = RoutingStream.open(stream_dir)
    samples = StreamSamples(stream, 32, seed=3)
    # sample i is tokens [32 i, 32 i + 32) of the documents in the seeded order, concatenated
    order = np.random.default_rng(3).permutation(stream.n_documents)
    offsets = stream.offsets()
    rows = np.concatenate([np.arange(offsets[d], offsets[d + 1]) for d in order])
    assert len(samples) == stream.n_tokens // 32
    assert np.array_equal(np.asarray(samples[5:9]), stream.ids()[rows[5 * 32:9 * 32]].reshape(4, 32, 4))
    summary = place(tmp_path / "plan", routing=stream_dir, ranks=4, seq_len=32, seed=3, global_batch=32,
                    progress=False)
    plan = Plan.load(tmp_path / "plan")
    assert plan.source["kind"] == "stream" and plan.source["seq_len"] == 32
    assert sorted(plan.permutation.tolist()) == list(range(16))
    assert summary["plan_over_random"]["deepep"] < 1  # the expert grouping pays on such samples
    with pytest.raises(GrouterError, match="pass --seq-len"):
        place(tmp_path / "p2", routing=stream_dir, ranks=4, progress=False)


def test_a_grouter_distilled_with_document_starts_streams_what_it_learned_on(capsys, tiny_data, tmp_path):
    """Distilled with --document-start on `grouter data megatron`'s packing of a Megatron dataset of short documents
    (a line each, --append-eod: several to a packed sequence), the Grouter routes each document inside a packed training sequence
    (what distillation, fold, tune and dispatch --data see) exactly as the routing stream of the prefix stores it."""
    lines = [Document(d.domain, f"{d.source}{i}", line) for d in stdlib_documents()[:2]
             for i, line in enumerate(d.text.split("\n")) if line.strip()]
    prefix = megatron_indexed_dataset(lines, tiny_data.tokenizer(), tmp_path / "short" / "text_document",
                                      tiny_data.eos_id)
    code, _, err = run_cli(capsys, "data", "megatron", "--megatron-data", prefix, "--tokenizer",
                           tiny_data.path / "tokenizer.json", "--seq-len", 64, "--out", tmp_path / "data")
    assert code == 0, err
    data = PackedDataset.open(tmp_path / "data")
    src = MoELM(MoEConfig(vocab_size=512, max_seq_len=64, d_model=32, n_layers=1, n_heads=2, d_expert=8,
                          n_experts=16, top_k=4, init_std=0.2))
    src.save_pretrained(tmp_path / "source")
    capture(tmp_path / "targets", source=tmp_path / "source", data=data, progress=False)
    code, _, err = run_cli(capsys, "distill", "--targets", tmp_path / "targets", "--out", tmp_path / "g",
                           "--document-start", "--d-model", "32", "--layers", "1", "--heads", "2", "--d-ff", "64",
                           "--steps", "4", "--batch-size", "4", "--eval-every", "4", "--checkpoint-every", "4")
    assert code == 0, err
    g = Grouter.from_pretrained(tmp_path / "g")
    assert g.cfg.document_eos == data.eos_id
    dispatch(tmp_path / "s", grouter=tmp_path / "g", megatron_data=prefix, progress=False)
    stream = RoutingStream.open(tmp_path / "s", prefix=prefix)
    offsets, docs = stream.offsets(), indexed_items(prefix)
    where = {tuple(d.tolist()): i for i, d in enumerate(docs)}
    seqs = data.split("train").batch(np.arange(24))["input_ids"]
    routing, compared = g.route(seqs), 0
    for row, seq in enumerate(seqs):
        ends = torch.nonzero(seq == data.eos_id).flatten().tolist()
        for a, b in zip(ends, ends[1:]):  # the whole documents inside the sequence
            d = where[tuple(seq[a + 1:b + 1].tolist())]
            stored = stream.rows(np.arange(offsets[d], offsets[d + 1]))
            assert torch.equal(stored.ids, routing.ids[row, a + 1:b + 1])
            assert torch.allclose(stored.weights, routing.weights[row, a + 1:b + 1].to(stored.weights.dtype),
                                  rtol=BF16_TOL, atol=1e-6)
            compared += 1
    assert compared > 20
