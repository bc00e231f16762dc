"""Packed dataset format, corpus readers and batch access (grouter.data)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from tokenizers import Tokenizer, models

import grouter.data as data_module
from grouter.data import (Document, PackConfig, data_prepare, data_subset, data_tokenize, detokenize_brown, eos_id_of,
                          iter_default_documents, load_tokenizer, pack_documents, read_documents, train_tokenizer)
from grouter.errors import GrouterError
from grouter.formats.dataset import DataSplit, PackedDataset
from grouter.testing import assert_nothing_written, assert_one_line_error, indexed_items, last_json, run_cli

L = 16
WORDS = {
    "alpha": "the cat sat on a mat while rain fell over quiet hills and rivers".split(),
    "beta": "def return import class lambda yield self value index list dict for in".split(),
}


def synthetic_corpus(n_docs: int = 6, seed: int = 0) -> list[Document]:
    """Two domains of documents with distinct, varied lengths (some shorter than a sequence)."""
    rng = np.random.default_rng(seed)
    docs = []
    for domain, words in WORDS.items():
        for k in range(n_docs):
            n_words = int(rng.integers(3, 60))
            text = f"{domain} doc {k}: " + " ".join(rng.choice(words, n_words))
            docs.append(Document(domain, f"{domain}/{k}", text))
    return docs


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    texts = [d.text for d in synthetic_corpus(20, seed=1)] + ["Über café — naïve 🙂 code():\n\tx = 1\n"]
    return train_tokenizer(texts, vocab_size=300)


def doc_tokens(tok: Tokenizer, doc: Document, eos: int = 0) -> list[int]:
    return tok.encode(doc.text, add_special_tokens=False).ids + [eos]


def domain_streams(split: DataSplit) -> dict[str, np.ndarray]:
    """Each domain's token stream rebuilt from its sequences, which must overlap by one token."""
    seqs, dom = split.sequences(np.arange(len(split))), split.domain_ids()
    streams = {}
    for d, name in enumerate(split.domains):
        mine = seqs[dom == d]
        if len(mine):
            np.testing.assert_array_equal(mine[1:, 0], mine[:-1, -1])  # one-token overlap
            streams[name] = np.concatenate([mine[0], mine[1:, 1:].ravel()])
    return streams


# -- tokenizer --------------------------------------------------------------------------------


def test_train_tokenizer_is_byte_level_and_round_trips(tokenizer):
    assert tokenizer.token_to_id("<|endoftext|>") == 0
    for text in ["Über café — naïve 🙂", "def f(x):\n    return x  # spaces\n", "  leading and trailing  ", "日本語"]:
        assert tokenizer.decode(tokenizer.encode(text).ids) == text
    assert eos_id_of(tokenizer) == 0


def test_train_tokenizer_rejects_tiny_vocab():
    with pytest.raises(GrouterError, match="vocab"):
        train_tokenizer(["abc"], vocab_size=100)


# -- packing ----------------------------------------------------------------------------------


def test_pack_sequences_are_overlapping_slices_of_the_eos_separated_stream(tokenizer, tmp_path):
    docs = synthetic_corpus()
    ds = pack_documents(docs, tokenizer, tmp_path / "ds", PackConfig(seq_len=L, val_fraction=0.0))
    assert ds.domains == ["alpha", "beta"] and ds.seq_len == L and ds.eos_id == 0
    assert ds.meta["token_dtype"] == "uint16" and ds.split("train").tokens.dtype == np.uint16
    assert (tmp_path / "ds" / "train.tokens").stat().st_size == 2 * ds.meta["splits"]["train"]["n_tokens"]

    train = ds.split("train")
    seqs = train.sequences(np.arange(len(train)))
    assert seqs.dtype == np.int64 and seqs.shape == (len(train), L + 1)
    for d, name in enumerate(ds.domains):
        stream = np.concatenate([doc_tokens(tokenizer, doc) for doc in docs if doc.domain == name])
        n_seq = (len(stream) - 1) // L
        mine = seqs[train.domain_ids() == d]
        assert len(mine) == n_seq == ds.meta["splits"]["train"]["sequences_per_domain"][name]
        for i in range(n_seq):
            np.testing.assert_array_equal(mine[i], stream[i * L: i * L + L + 1])
    assert len(ds.split("val")) == 0


def test_val_split_is_by_document_and_covers_every_domain(tokenizer, tmp_path):
    docs = synthetic_corpus(n_docs=30)
    ds = pack_documents(docs, tokenizer, tmp_path / "ds", PackConfig(seq_len=L, val_fraction=0.1, seed=3))
    train, val = domain_streams(ds.split("train")), domain_streams(ds.split("val"))
    assert set(val) == set(train) == {"alpha", "beta"}
    assert all(n > 0 for n in ds.meta["splits"]["val"]["sequences_per_domain"].values())
    for name in ds.domains:
        expected = {tuple(doc_tokens(tokenizer, d)): d.source for d in docs if d.domain == name}
        seen = {}
        for split, streams in (("train", train), ("val", val)):
            pieces = np.split(streams[name], np.flatnonzero(streams[name] == 0) + 1)
            for piece in pieces[:-1]:  # complete documents; the last piece may be cut by the dropped tail
                source = expected[tuple(piece)]  # KeyError: not a whole document of this domain
                assert seen.setdefault(source, split) == split  # no document in both splits
        assert {"train", "val"} <= set(seen.values())
        assert len(seen) >= len(expected) - 4  # only tails (< seq_len + 1 tokens each) are dropped


@pytest.mark.parametrize("val_fraction", [0.1, 0.001])  # 0.001: still at least one val sequence
def test_val_split_cuts_inside_the_stream_when_a_domain_has_one_document(tokenizer, tmp_path, val_fraction):
    long_doc = Document("solo", "solo/0", " ".join(["the cat sat on a mat"] * 40))
    ds = pack_documents([long_doc], tokenizer, tmp_path / "ds", PackConfig(seq_len=L, val_fraction=val_fraction))
    assert len(ds.split("val")) >= 1 and len(ds.split("train")) >= 1
    full = np.array(doc_tokens(tokenizer, long_doc))
    train, val = domain_streams(ds.split("train"))["solo"], domain_streams(ds.split("val"))["solo"]
    np.testing.assert_array_equal(train, full[: len(train)])
    starts = [i for i in range(len(train), len(full) - len(val) + 1) if np.array_equal(full[i: i + len(val)], val)]
    assert starts, "val must be a later slice of the same document"


def test_large_vocabulary_uses_uint32(tokenizer, tmp_path):
    big = Tokenizer.from_str(tokenizer.to_str())
    big.add_tokens([f"zq{i}x" for i in range(66_000)])  # vocabulary past 65536
    docs = [Document("a", str(k), f"the cat zq{65_990 + k}x sat on a mat " * 5) for k in range(8)]
    ds = pack_documents(docs, big, tmp_path / "ds", PackConfig(seq_len=L, val_fraction=0.0))
    assert ds.meta["token_dtype"] == "uint32" and ds.split("train").tokens.dtype == np.uint32
    stream = np.concatenate([doc_tokens(big, d) for d in docs])
    np.testing.assert_array_equal(domain_streams(ds.split("train"))["a"], stream[: len(domain_streams(ds.split("train"))["a"])])
    assert stream.max() > 65_536 and ds.split("train").sequences(np.arange(len(ds.split("train")))).max() > 65_536


def test_streaming_in_small_batches_and_pieces_changes_nothing(tokenizer, tmp_path, monkeypatch):
    """Documents split across tokenizer batches (and long ones into pieces) pack identically."""
    docs = [replace_text(d, d.text.replace(" ", "\n")) for d in synthetic_corpus(12)]  # short lines: cuts at line ends
    config = PackConfig(seq_len=L, val_fraction=0.2)
    whole = pack_documents(docs, tokenizer, tmp_path / "whole", config)
    monkeypatch.setattr(data_module, "_PIECE_CHARS", 40)
    monkeypatch.setattr(data_module, "_ENCODE_BATCH_DOCS", 3)
    assert max(len(d.text) for d in docs) > 3 * 40
    streamed = pack_documents(docs, tokenizer, tmp_path / "streamed", config)
    assert streamed.fingerprint == whole.fingerprint


def test_fingerprint_is_stable_and_tracks_content(tokenizer, tmp_path):
    docs = synthetic_corpus()
    config = PackConfig(seq_len=L, val_fraction=0.2)
    a = pack_documents(docs, tokenizer, tmp_path / "a", config)
    b = pack_documents(docs, tokenizer, tmp_path / "b", config)
    assert a.fingerprint == b.fingerprint and len(a.fingerprint) == 64
    assert a.meta == b.meta
    changed = [replace_text(docs[0], docs[0].text + " extra words here")] + docs[1:]
    assert pack_documents(changed, tokenizer, tmp_path / "c", config).fingerprint != a.fingerprint
    other_len = pack_documents(docs, tokenizer, tmp_path / "d", PackConfig(seq_len=8, val_fraction=0.2))
    assert other_len.fingerprint != a.fingerprint


def replace_text(doc: Document, text: str) -> Document:
    return Document(doc.domain, doc.source, text)


def write_corpus(path: Path, docs: list[Document]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": d.text}) + "\n" for d in docs))
    return path


def test_tokenize_refuses_existing_out_and_empty_or_tiny_corpora(tokenizer, tmp_path):
    """The command around packing: --out appears complete or not at all."""
    (tmp_path / "in").mkdir()
    tokenizer.save(str(tmp_path / "in" / "tok.json"))
    run = dict(tokenizer=tmp_path / "in" / "tok.json", seq_len=L)
    corpus = write_corpus(tmp_path / "in" / "a.jsonl", synthetic_corpus())
    data_tokenize(tmp_path / "ds", input=[corpus], **run)
    with pytest.raises(GrouterError, match="already exists"):
        data_tokenize(tmp_path / "ds", input=[write_corpus(tmp_path / "in" / "b.jsonl", synthetic_corpus(seed=5))],
                      **run)
    data_tokenize(tmp_path / "ds", input=[tmp_path / "in" / "b.jsonl"], overwrite=True, **run)
    with pytest.raises(GrouterError, match="no text"):
        data_tokenize(tmp_path / "empty", input=[write_corpus(tmp_path / "in" / "e.jsonl", [Document("a", "x", "  ")])],
                      **run)
    with pytest.raises(GrouterError, match="corpus too small for seq_len 4096.*--seq-len"):
        data_tokenize(tmp_path / "tiny", input=[corpus], **{**run, "seq_len": 4096})
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == ["ds", "in"]
    assert not [p for p in tmp_path.iterdir() if ".partial" in p.name]  # no scratch directories left behind


def test_failure_while_packing_leaves_no_output(tokenizer, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps({"text": f"doc {i} " * 50}) + "\n" for i in range(20)) + "{oops\n")
    tokenizer.save(str(tmp_path / "tok.json"))
    with pytest.raises(GrouterError, match=r"bad\.jsonl:21"):
        data_tokenize(tmp_path / "out", input=[bad], tokenizer=tmp_path / "tok.json", seq_len=L)
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == ["bad.jsonl", "tok.json"]
    assert not [p for p in tmp_path.iterdir() if ".partial" in p.name]


def test_pack_config_validation():
    with pytest.raises(GrouterError, match="seq_len"):
        PackConfig(seq_len=0)
    with pytest.raises(GrouterError, match="val_fraction"):
        PackConfig(val_fraction=1.0)


# -- batches ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def packed(tokenizer, tmp_path_factory) -> PackedDataset:
    out = tmp_path_factory.mktemp("packed") / "ds"
    return pack_documents(synthetic_corpus(n_docs=40), tokenizer, out, PackConfig(seq_len=L, val_fraction=0.1))


def test_batch_indices_epochs_are_permutations_without_straddling(packed):
    train = packed.split("train")
    n = len(train)
    bs = next(b for b in range(7, 20) if n % b)  # a remainder to drop at each epoch's end
    per_epoch = n // bs
    for epoch in range(3):
        idx = np.concatenate([train.batch_indices(epoch * per_epoch + s, bs, seed=1) for s in range(per_epoch)])
        assert len(np.unique(idx)) == len(idx) == per_epoch * bs
        assert idx.min() >= 0 and idx.max() < n
        np.testing.assert_array_equal(idx, np.random.default_rng([1, epoch]).permutation(n)[: per_epoch * bs])
    assert not np.array_equal(train.batch_indices(0, bs, seed=1), train.batch_indices(per_epoch, bs, seed=1))
    assert not np.array_equal(train.batch_indices(0, bs, seed=1), train.batch_indices(0, bs, seed=2))


def test_batch_indices_are_deterministic_and_resume_exactly(packed):
    steps = range(0, 3 * (len(packed.split("train")) // 5))
    uninterrupted = [packed.split("train").batch_indices(s, 5, seed=4) for s in steps]
    resumed = PackedDataset.open(packed.path).split("train")  # fresh object: no shared state
    resumed.batch_indices(99, 5, seed=4)  # unrelated history must not matter
    for s in reversed(steps[len(steps) // 2:]):
        np.testing.assert_array_equal(resumed.batch_indices(s, 5, seed=4), uninterrupted[s])
    with pytest.raises(GrouterError, match="batch size"):
        resumed.batch_indices(0, len(resumed) + 1)


def test_batch_shapes_shift_and_domains(packed):
    train = packed.split("train")
    idx = train.batch_indices(0, 6)
    batch = train.batch(idx)
    assert set(batch) == {"input_ids", "labels", "domain", "index"}
    assert batch["input_ids"].shape == batch["labels"].shape == (6, L)
    assert all(t.dtype == torch.long for t in batch.values())
    torch.testing.assert_close(batch["input_ids"][:, 1:], batch["labels"][:, :-1])
    seqs = torch.from_numpy(train.sequences(idx))
    torch.testing.assert_close(batch["input_ids"], seqs[:, :-1])
    torch.testing.assert_close(batch["labels"], seqs[:, 1:])
    np.testing.assert_array_equal(batch["domain"].numpy(), train.index[idx, 1])
    np.testing.assert_array_equal(batch["index"].numpy(), idx)


def test_iter_batches_and_token_counts(packed):
    val = packed.split("val")
    seen = torch.cat([b["index"] for b in val.iter_batches(4)])
    np.testing.assert_array_equal(seen.numpy(), np.arange(len(val)))
    kept = sum(len(b["index"]) for b in val.iter_batches(4, drop_last=True))
    assert kept == len(val) - len(val) % 4
    for split in (packed.split("train"), val):
        inputs = split.sequences(np.arange(len(split)))[:, :-1]
        expected = np.bincount(inputs.ravel(), minlength=packed.vocab_size)
        counts = split.token_counts()
        assert counts.dtype == np.int64 and counts.shape == (packed.vocab_size,)
        np.testing.assert_array_equal(counts, expected)


# -- opening and validation -------------------------------------------------------------------


def copy_dataset(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_open_errors(packed, tmp_path):
    with pytest.raises(GrouterError, match="not found.*grouter data prepare"):
        PackedDataset.open(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(GrouterError, match="no meta.json"):
        PackedDataset.open(tmp_path / "empty")

    truncated = copy_dataset(packed.path, tmp_path / "truncated")
    data = (truncated / "train.tokens").read_bytes()
    (truncated / "train.tokens").write_bytes(data[:-3])
    with pytest.raises(GrouterError, match="truncated or corrupt.*train.tokens"):
        PackedDataset.open(truncated)

    bad_index = copy_dataset(packed.path, tmp_path / "bad_index")
    (bad_index / "val.index.npy").write_bytes((bad_index / "val.index.npy").read_bytes()[:-8])
    with pytest.raises(GrouterError, match="truncated or corrupt.*val.index.npy"):
        PackedDataset.open(bad_index)

    corrupt = copy_dataset(packed.path, tmp_path / "corrupt")
    (corrupt / "meta.json").write_text('{"format": "grouter-dataset", "vers')
    with pytest.raises(GrouterError, match="corrupt"):
        PackedDataset.open(corrupt)

    future = copy_dataset(packed.path, tmp_path / "future")
    meta = json.loads((future / "meta.json").read_text())
    (future / "meta.json").write_text(json.dumps({**meta, "version": 99}))
    with pytest.raises(GrouterError, match="version 99"):
        PackedDataset.open(future)

    with pytest.raises(GrouterError, match="unknown split"):
        packed.split("test")
    assert PackedDataset.open(packed.path).fingerprint == packed.fingerprint


def test_dataset_round_trips_its_tokenizer(packed, tokenizer):
    assert packed.tokenizer().to_str() == tokenizer.to_str()
    assert packed.meta["tokenizer_sha256"] and packed.vocab_size == tokenizer.get_vocab_size()


# -- user corpora -----------------------------------------------------------------------------


def test_read_documents_txt_jsonl_parquet(tmp_path):
    (tmp_path / "notes.txt").write_text("one whole file\nis one document\n")
    (tmp_path / "web.jsonl").write_text('{"text": "first"}\n\n{"text": "second", "id": 2}\n')
    table = pa.table({"body": [f"row {i}" for i in range(10)], "n": list(range(10))})
    pq.write_table(table, tmp_path / "books.parquet", row_group_size=3)

    docs = list(read_documents([tmp_path / "notes.txt", tmp_path / "web.jsonl"]))
    assert [(d.domain, d.text) for d in docs] == [
        ("notes", "one whole file\nis one document\n"), ("web", "first"), ("web", "second")]
    assert docs[2].source.endswith("web.jsonl:3")

    rows = list(read_documents([tmp_path / "books.parquet"], domain="lit", text_field="body"))
    assert [d.text for d in rows] == [f"row {i}" for i in range(10)] and {d.domain for d in rows} == {"lit"}


@pytest.mark.parametrize("name, content, field, message", [
    ("bad.jsonl", '{"text": "ok"}\n{"text": \n', "text", r"bad\.jsonl:2: not valid JSON"),
    ("nofield.jsonl", '{"text": "ok"}\n{"body": "x"}\n', "text", r"nofield\.jsonl:2: no 'text' field"),
    ("nofield.parquet", None, "text", r"nofield\.parquet: no 'text' column"),
    ("data.csv", "a,b\n", "text", r"unsupported file type '\.csv'"),
])
def test_read_documents_errors(tmp_path, name, content, field, message):
    path = tmp_path / name
    if content is None:
        pq.write_table(pa.table({"body": ["x"]}), path)
    else:
        path.write_text(content)
    with pytest.raises(GrouterError, match=message):
        list(read_documents([path], text_field=field))


def test_read_documents_missing_file(tmp_path):
    with pytest.raises(GrouterError, match="not found"):
        read_documents([tmp_path / "absent.txt"])


def test_tokenize_corpus_with_file_and_model_dir(tokenizer, tmp_path):
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": d.text}) + "\n" for d in synthetic_corpus(10)))
    tokenizer.save(str(tmp_path / "tok.json"))
    data_tokenize(tmp_path / "from_file", input=[tmp_path / "a.jsonl"], tokenizer=tmp_path / "tok.json", seq_len=L)
    ds = PackedDataset.open(tmp_path / "from_file")
    assert ds.domains == ["a"] and ds.eos_id == 0 and len(ds.split("val")) > 0
    assert ds.meta["sources"]["tokenizer"] == str((tmp_path / "tok.json").resolve())

    # A model directory whose config names its own end-of-text token.
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    custom = Tokenizer.from_str(tokenizer.to_str())
    custom.add_special_tokens(["<doc_end>"])
    custom.save(str(model_dir / "tokenizer.json"))
    (model_dir / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<doc_end>"}}))
    end_id = custom.token_to_id("<doc_end>")
    data_tokenize(tmp_path / "from_dir", input=[tmp_path / "a.jsonl"], tokenizer=model_dir, seq_len=L, domain="web")
    ds = PackedDataset.open(tmp_path / "from_dir")
    assert ds.domains == ["web"] and ds.eos_id == end_id == ds.vocab_size - 1
    assert ds.meta["sources"]["tokenizer"] == str(model_dir.resolve())
    assert (ds.split("train").tokens == end_id).any()


def test_eos_detection_order(tokenizer, tmp_path):
    assert eos_id_of(tokenizer, tmp_path) == 0  # no config files: well-known token
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": [7, 8]}))
    assert eos_id_of(tokenizer, tmp_path) == 7
    bare = Tokenizer(models.BPE())
    with pytest.raises(GrouterError, match="end-of-text"):
        eos_id_of(bare)


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(GrouterError, match="tokenizer not found"):
        load_tokenizer(tmp_path / "missing.json")
    (tmp_path / "broken.json").write_text("{not a tokenizer")
    with pytest.raises(GrouterError, match="cannot read tokenizer"):
        load_tokenizer(tmp_path / "broken.json")
    with pytest.raises(GrouterError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)


# -- the default corpus -----------------------------------------------------------------------



def test_brown_detokenizer():
    tagged = "\n\n\tThe/at jury/nn said/vbd ``/`` no/at evidence/nn ''/'' ,/, 1-1/2/cd (/( or/cc so/rb )/) ./.\n"
    assert detokenize_brown(tagged) == 'The jury said "no evidence", 1-1/2 (or so).\n'


def test_missing_default_corpus_says_how_to_fetch_it(tmp_path):
    with pytest.raises(GrouterError, match="make corpus"):
        iter_default_documents(tmp_path)


def test_default_documents_cover_three_domains_with_real_text():
    cap = 50_000
    docs = list(iter_default_documents(max_bytes_per_domain=cap))
    by_domain = {}
    for d in docs:
        by_domain.setdefault(d.domain, []).append(d)
    assert list(by_domain) == ["prose", "speeches", "code"]
    for domain, ds in by_domain.items():
        size = sum(len(d.text.encode()) for d in ds)
        assert cap * 0.9 < size <= cap, (domain, size)
    prose = "".join(d.text for d in by_domain["prose"])
    assert "Fulton County Grand Jury" in prose and "Sub-Sub-Librarian" in prose  # Brown and Moby-Dick
    assert {d.source.split("/")[0] for d in by_domain["prose"]} == {"brown", "moby-dick"}
    brown = "".join(d.text for d in by_domain["prose"] if d.source.startswith("brown/"))
    assert "/at " not in brown and "/nn" not in brown and "``" not in brown and "''" not in brown
    assert " ." not in brown and " ," not in brown and '"' in brown
    assert "Congress" in "".join(d.text for d in by_domain["speeches"])
    assert any("def " in d.text for d in by_domain["code"])
    assert all(d.source.startswith("python-stdlib/") for d in by_domain["code"])
    assert [d.source for d in docs] == [d.source for d in iter_default_documents(max_bytes_per_domain=cap)]


def test_prepare_default_end_to_end(tmp_path):
    data_prepare(tmp_path / "ds", vocab_size=2048, seq_len=128, max_mb_per_domain=0.3)
    ds = PackedDataset.open(tmp_path / "ds")
    assert ds.domains == ["prose", "speeches", "code"] and ds.vocab_size == 2048
    for split in ("train", "val"):
        per_domain = ds.meta["splits"][split]["sequences_per_domain"]
        assert set(per_domain) == set(ds.domains) and all(n > 0 for n in per_domain.values()), per_domain
        assert set(np.unique(ds.split(split).domain_ids())) == {0, 1, 2}
    code = ds.split("train").domain_ids() == ds.domains.index("code")
    text = ds.tokenizer().decode(ds.split("train").sequences(np.flatnonzero(code)[:20]).ravel().tolist())
    assert "import" in text or "def " in text
    assert ds.meta["sources"]["max_bytes_per_domain"] == 300_000


def test_subset_domains_keeps_exactly_those_sequences(tiny_data, tmp_path):
    data_subset(tmp_path / "prose", data=tiny_data, domains=["prose"])
    sub = PackedDataset.open(tmp_path / "prose")
    assert sub.domains == ["prose"] and sub.fingerprint != tiny_data.fingerprint
    assert sub.meta["tokenizer_sha256"] == tiny_data.meta["tokenizer_sha256"]
    for split in ("train", "val"):
        full, part = tiny_data.split(split), sub.split(split)
        prose = np.flatnonzero(full.domain_ids() == tiny_data.domains.index("prose"))
        assert len(part) == len(prose) > 0 and (part.domain_ids() == 0).all()
        np.testing.assert_array_equal(part.sequences(np.arange(len(part))), full.sequences(prose))
    # a second subset of the same domains is the same dataset
    assert data_subset(tmp_path / "again", data=tiny_data, domains=["prose"])["fingerprint"] == sub.fingerprint


@pytest.mark.parametrize("domains", [[], ["poetry"], ["prose", "prose"]])
def test_subset_domains_rejects_unknown_or_repeated_domains(tiny_data, tmp_path, domains):
    with pytest.raises(GrouterError, match="choose distinct domains among"):
        data_subset(tmp_path / "sub", data=tiny_data, domains=domains)
    assert not (tmp_path / "sub").exists()


def test_megatron_datasets_are_packed_as_they_are(capsys, megatron_text, tiny_data, tmp_path):
    """grouter data megatron: Megatron indexed datasets (made as preprocess_data.py makes them) packed with no
    re-tokenization, each prefix a domain whose training sequences are its tokens back to back (no validation
    share here); a tokenizer whose vocabulary the tokens exceed is refused in one line, nothing written."""
    prefixes = [megatron_text["docs"], megatron_text["paragraphs"]]
    code, out, err = run_cli(capsys, "data", "megatron", "--megatron-data", *prefixes, "--tokenizer",
                             tiny_data.path / "tokenizer.json", "--seq-len", L, "--val-fraction", 0, "--out",
                             tmp_path / "packed", "--json")
    assert code == 0, err
    ds = PackedDataset.open(tmp_path / "packed")
    assert last_json(out)["fingerprint"] == ds.fingerprint
    assert ds.domains == ["text_document", "text_sentence"] and (ds.vocab_size, ds.eos_id) == (512, tiny_data.eos_id)
    assert ds.documents_end_with_eos  # preprocess_data.py --append-eod: where distill --document-start finds them
    train = ds.split("train")
    for d, prefix in enumerate(prefixes):
        tokens = np.concatenate(indexed_items(prefix))
        seqs = train.sequences(np.flatnonzero(train.domain_ids() == d))  # consecutive sequences share one token
        packed = np.concatenate([seqs[:, :-1].ravel(), seqs[-1, -1:]])
        np.testing.assert_array_equal(packed, tokens[:len(packed)])
        assert len(tokens) - len(packed) < L
    small = train_tokenizer((d.text for d in synthetic_corpus(10)), vocab_size=300)
    small.save(str(tmp_path / "small.json"))
    code, _, err = run_cli(capsys, "data", "megatron", "--megatron-data", prefixes[0], "--tokenizer",
                           tmp_path / "small.json", "--out", tmp_path / "refused")
    assert_one_line_error(code, err, "beyond the vocabulary of")
    assert_nothing_written(tmp_path / "refused")
