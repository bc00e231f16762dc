"""Routing streams: the routing of every token of a Megatron indexed dataset, in that dataset's order.

A Megatron pretraining dataset is a *prefix*: ``PREFIX.bin`` holds the token ids of every item back to
back, ``PREFIX.idx`` each item's length and byte offset. ``GPTDataset`` treats each item as a document
(an item is a document as ``preprocess_data.py`` writes it, or a sentence with ``--split-sentences``):
it shuffles them, concatenates them and cuts samples out of the concatenation. So a document's routing
must not depend on what precedes it in a sample: the Grouter's causal context starts at the document's
start (docs/method.md#routing-streams-for-megatron-indexed-datasets), and then any sequence length,
packing, blend or sample order can slice it. Layout of a stream directory:

- ``stream.json``: the header; the prefix it is bound to (path, SHA-256 of ``.idx``, per-chunk
  checksums of ``.bin`` so that a reader can verify the tokens it reads, token dtype, counts, the
  largest token id); the Grouter (fingerprint, path, causal); k, E, both dtypes, per-layer heads; the
  context rule (document start, ``window``, ``overlap``: :func:`document_windows`); the files' checksums.
- ``stream.ids`` / ``stream.weights``: ``[n_tokens, k]`` (``[n_tokens, H, k]`` with per-layer heads)
  expert ids (uint8 for E <= 256, else uint16) and 16-bit gate weights (bfloat16 or float16 bit
  patterns); **row p is the routing of token p of** ``PREFIX.bin``.
- ``documents.offsets``: int64 ``[n_documents + 1]``: document i is rows ``[offsets[i], offsets[i + 1])``.

Nothing here imports megatron-core but :meth:`MegatronPrefix.open` (Megatron's IndexedDataset reads the
prefix's index for dispatch and ``grouter data megatron``): the stream is read with numpy, the prefix hashed
as files.
:class:`StreamWriter` writes one (``grouter dispatch --megatron-data``), :class:`RoutingStream` reads it.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..artifacts import read_manifest, write_json
from ..chunking import row_chunks
from ..errors import GrouterError
from ..integrity import CheckedFile, file_checksum, file_sha256, fingerprint_of
from ..routers import Heads, Routing
from .store import (WEIGHTS_DTYPES, RoutingManifest, StoreWriter, check_expert_ids, head_fields, weight_bits)

STREAM_FORMAT, STREAM_VERSION = "grouter-routing-stream", 1
STREAM_FILES = ("stream.ids", "stream.weights", "documents.offsets")
WINDOW_BLOCK = 1 << 16  # windows are ordered by length within blocks of this many (less padding per batch)


# -- the prefix ----------------------------------------------------------------------------------------
def prefix_files(prefix: str | Path) -> tuple[Path, Path]:
    """``PREFIX.idx`` and ``PREFIX.bin``."""
    return Path(f"{prefix}.idx"), Path(f"{prefix}.bin")


def is_prefix(path: str | Path) -> bool:
    """A Megatron indexed dataset prefix: both of its files exist."""
    return all(p.is_file() for p in prefix_files(path))


def check_prefix(prefix: str | Path) -> Path:
    """``prefix`` as a path, or the one-line error a missing prefix gets."""
    prefix = Path(str(prefix).removesuffix(".bin").removesuffix(".idx"))
    if not is_prefix(prefix):
        raise GrouterError(f"{prefix} is not a Megatron indexed dataset: {prefix}.idx and {prefix}.bin must both exist "
                           "(give the prefix, as Megatron's --data-path does; preprocess_data.py writes them)")
    return prefix


@functools.lru_cache(maxsize=16)
def _prefix_fingerprint(idx: str, bin_: str, stat: tuple) -> dict:
    return {"idx_sha256": file_sha256(idx), "bin": file_checksum(bin_)}


def prefix_fingerprint(prefix: str | Path) -> dict:
    """What binds a stream to a prefix's content: the SHA-256 of ``.idx`` and the per-chunk checksums of
    ``.bin`` (one pass over it; remembered in this process while the files are unchanged)."""
    idx, bin_ = prefix_files(check_prefix(prefix))
    stat = tuple((s.st_ino, s.st_size, s.st_mtime_ns) for s in (idx.stat(), bin_.stat()))
    return _prefix_fingerprint(str(idx), str(bin_), stat)


def prefix_state(prefix: str | Path) -> str:
    """A prefix's content as one digest (a command's identity: the same data anywhere is the same input)."""
    fp = prefix_fingerprint(prefix)
    return fingerprint_of({"idx": fp["idx_sha256"], "bin": fp["bin"]["sha256"]})


@dataclass
class MegatronPrefix:
    """A Megatron indexed dataset opened for routing: its documents (Megatron's IndexedDataset reads the
    index), its tokens memory-mapped, their chunks verified as read, their largest id. Opening one needs
    megatron-core (imported here only); reading a stream does not."""

    path: Path
    offsets: np.ndarray  # int64 [n_items + 1]: item i (a document to GPTDataset) is tokens [offsets[i], offsets[i + 1])
    document_items: np.ndarray  # int64: the first item of each of preprocess_data.py's documents, then the item count
    tokens: np.ndarray
    checked: CheckedFile
    max_token_id: int

    @classmethod
    def open(cls, prefix: Path) -> "MegatronPrefix":
        prefix = check_prefix(prefix)
        try:
            from megatron.core.datasets.indexed_dataset import IndexedDataset
        except ImportError as e:
            raise GrouterError(f"reading a Megatron indexed dataset needs megatron-core (pip install "
                               f"'grouter[megatron]'): {e}") from None
        index = IndexedDataset(str(prefix), multimodal=False, mmap=True)
        lengths, dtype = np.asarray(index.sequence_lengths, dtype=np.int64), np.dtype(index.index.dtype)
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        pointers = np.asarray(index.index.sequence_pointers, dtype=np.int64)
        bin_path = prefix_files(prefix)[1]
        if bin_path.stat().st_size != offsets[-1] * dtype.itemsize or not np.array_equal(
                pointers, offsets[:-1] * dtype.itemsize):
            raise GrouterError(f"{bin_path} does not hold its documents back to back as its .idx says (as "
                               "Megatron's IndexedDatasetBuilder writes them); rebuild it with preprocess_data.py")
        checked = CheckedFile(bin_path, prefix_fingerprint(prefix)["bin"], "Megatron dataset file",
                              f"{bin_path} changed while it was read; run the command again")
        tokens = np.memmap(bin_path, dtype=dtype, mode="r") if offsets[-1] else np.zeros(0, dtype)
        checked.check_all()
        top = max((int(tokens[a:b].max()) for a, b in row_chunks(len(tokens), 1) if b > a), default=-1)
        documents = np.array(index.document_indices, dtype=np.int64)  # a copy: the index's views die with it
        return cls(prefix, offsets, documents, tokens, checked, top)


# -- the context rule --------------------------------------------------------------------------------
def document_windows(lengths: np.ndarray, window: int, overlap: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The Grouter runs over documents of ``lengths`` tokens as ``(document, start, stop, emit)``: it reads
    the document's tokens ``[start, stop)`` and keeps the routing of ``[emit, stop)``.

    A document of at most ``window`` tokens is one window from its start. A longer one is read in windows
    of ``window`` tokens starting every ``window - overlap`` tokens; each after the first keeps only its
    tokens after the first ``overlap``, so token t of a document is routed with a context from its
    document's tokens ``[s, t]``, ``s`` a function of t alone (t - s is at least ``overlap`` and below
    ``window``): the routing depends on the document's tokens up to t only. Returns the document of each
    window, and its start, stop and first kept token (document positions), in document order.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if not 0 <= overlap < window:
        raise GrouterError(f"the window overlap ({overlap}) must be at least 0 and below the window ({window})")
    stride = window - overlap
    count = np.where(lengths > window, 1 + -(-(lengths - window) // stride), (lengths > 0).astype(np.int64))
    doc = np.repeat(np.arange(len(lengths), dtype=np.int64), count)
    j = np.arange(len(doc), dtype=np.int64) - np.repeat(np.cumsum(count) - count, count)  # window j of its document
    start = j * stride
    stop = np.minimum(start + window, lengths[doc])
    emit = np.where(j == 0, 0, start + overlap)
    return doc, start, stop, emit


def window_order(lengths: np.ndarray) -> np.ndarray:
    """The order windows are routed in: by length within fixed blocks of :data:`WINDOW_BLOCK`, so a batch
    pads little, and the order (and so every batch) is a function of the prefix alone (resumable)."""
    block = np.arange(len(lengths), dtype=np.int64) // WINDOW_BLOCK
    return np.lexsort((np.asarray(lengths), block))


# -- writing ------------------------------------------------------------------------------------------
@dataclass
class StreamWriter:
    """Writes a stream's files in ``work``: :meth:`allocate` sizes them, :meth:`maps` opens them read-write
    (several processes may fill disjoint rows), :meth:`put` writes routing at given rows, :meth:`finish`
    writes ``documents.offsets``, the checksums and ``stream.json``."""

    work: Path
    k: int
    n_experts: int
    weights_dtype: str = "bfloat16"
    heads: Heads | None = None

    def __post_init__(self):
        self.work = Path(self.work)
        self.rows = StoreWriter(self.work, 1, self.k, self.n_experts, self.weights_dtype, self.heads)  # a row per token

    def allocate(self, n_tokens: int) -> bool:
        """Size the files for ``n_tokens``; True when they had that size already (a resumed job)."""
        kept = self.rows.allocate("stream", n_tokens)
        self.n_tokens = n_tokens
        return kept

    def maps(self) -> tuple[np.memmap, np.memmap] | None:
        return self.rows.maps("stream", 0, self.n_tokens)

    def put(self, maps: tuple[np.memmap, np.memmap], rows: np.ndarray, routing: Routing) -> None:
        """Write ``routing`` (ids and weights ``[n, k]`` or ``[n, H, k]``) at stream rows ``rows``."""
        ids, bits = maps
        check_expert_ids(routing.ids, self.n_experts)
        shape = (len(rows), 1, *routing.ids.shape[1:])
        ids[rows] = routing.ids.to(torch.int32).cpu().numpy().astype(self.rows.ids_dtype).reshape(shape)
        bits[rows] = weight_bits(routing.weights, self.weights_dtype).reshape(shape)

    def finish(self, offsets: np.ndarray, prefix: Path, grouter: dict, context: dict, token_dtype: np.dtype,
               max_token_id: int) -> dict:
        """Write ``documents.offsets`` and ``stream.json``; ``grouter``: its fingerprint, path and causality."""
        np.asarray(offsets, dtype=np.int64).tofile(self.work / "documents.offsets")
        fp = prefix_fingerprint(prefix)
        fields = {key: value for key, value in head_fields(self.heads).items() if key != "version"}
        manifest = {"format": STREAM_FORMAT, "version": STREAM_VERSION, **fields,
                    "prefix": {"path": str(Path(prefix).resolve()), "idx_sha256": fp["idx_sha256"], "bin": fp["bin"],
                               "token_dtype": np.dtype(token_dtype).name, "n_documents": len(offsets) - 1,
                               "n_tokens": int(offsets[-1]), "max_token_id": int(max_token_id)},
                    "grouter_fingerprint": grouter["fingerprint"], "grouter_path": grouter["path"],
                    "causal": bool(grouter["causal"]), "k": self.k, "n_experts": self.n_experts,
                    "ids_dtype": self.rows.ids_dtype.name, "weights_dtype": self.weights_dtype, "context": context,
                    "files": {name: file_checksum(self.work / name) for name in STREAM_FILES}}
        write_json(self.work / "stream.json", manifest)
        return manifest


# -- reading ------------------------------------------------------------------------------------------
@dataclass
class RoutingStream(RoutingManifest):
    """A routing stream opened read-only (memory-mapped), its files' chunks verified as they are read."""

    path: Path
    manifest: dict
    _files: dict = field(default_factory=dict, repr=False)  # file name -> CheckedFile
    _offsets: np.ndarray | None = field(default=None, repr=False)

    @classmethod
    def open(cls, path: str | Path, prefix: str | Path | None = None,
             grouter_fingerprint: str | None = None) -> "RoutingStream":
        """Open ``path``; with ``prefix`` / ``grouter_fingerprint``, refuse a stream made for others."""
        path = Path(path)
        m = read_manifest(path, "stream.json", STREAM_FORMAT, STREAM_VERSION, "routing stream",
                          "grouter dispatch --megatron-data PREFIX")
        stream = cls(path, m)
        stream._check_manifest()
        stream._files = {name: CheckedFile(path / name, m["files"].get(name), "routing stream file", stream._redo)
                         for name in STREAM_FILES}
        if prefix is not None:
            stream.check_prefix(prefix)
        if grouter_fingerprint is not None and grouter_fingerprint != m["grouter_fingerprint"]:
            raise GrouterError(f"routing stream {path} was made with another Grouter (fingerprint "
                               f"{m['grouter_fingerprint'][:12]}, expected {grouter_fingerprint[:12]}); dispatch again")
        return stream

    @property
    def _redo(self) -> str:
        return f"re-create it with `grouter dispatch --megatron-data PREFIX --out {self.path} --overwrite`"

    def _check_manifest(self) -> None:
        m = self.manifest
        try:
            p = m["prefix"]
            int(p["n_tokens"]), int(p["n_documents"]), int(p["max_token_id"]), np.dtype(p["token_dtype"])
            self._check_dtypes()
            m["grouter_fingerprint"], m["context"]["window"], int(m["k"])
            if m.get("heads", 1) != (len(self.heads) if self.heads else 1):
                raise ValueError("heads")
        except (KeyError, TypeError, ValueError, GrouterError) as e:
            raise GrouterError(f"routing stream {self.path} is corrupt: stream.json lacks or mangles {e}; "
                               f"{self._redo}") from None

    def check_prefix(self, prefix: str | Path) -> None:
        """Refuse a prefix other than the one this stream was made for: its ``.idx`` (hashed now, it is
        small) and the size of its ``.bin`` (whose chunks :meth:`bin_checker` verifies as they are read)."""
        idx, bin_ = prefix_files(check_prefix(prefix))
        p = self.manifest["prefix"]
        if bin_.stat().st_size != p["bin"]["bytes"] or file_sha256(idx) != p["idx_sha256"]:
            raise GrouterError(f"routing stream {self.path} was made for another Megatron dataset than {prefix} "
                               f"(it routes {p['path']}); run `grouter dispatch --megatron-data {prefix}`")

    def bin_checker(self, prefix: str | Path) -> CheckedFile:
        """Verifies the chunks of ``PREFIX.bin`` against the checksums taken when the stream was made."""
        return CheckedFile(prefix_files(prefix)[1], self.manifest["prefix"]["bin"], "Megatron dataset file",
                           f"the tokens changed since `grouter dispatch` routed them: dispatch {prefix} again")

    def verify(self) -> None:
        for checked in self._files.values():
            checked.check_all()

    @property
    def n_tokens(self) -> int:
        return int(self.manifest["prefix"]["n_tokens"])

    @property
    def n_documents(self) -> int:
        return int(self.manifest["prefix"]["n_documents"])

    @property
    def token_shape(self) -> tuple[int, ...]:
        """One token's ids (or weights): ``(k,)``, or ``(H, k)`` with per-layer heads."""
        return (self.k,) if self.heads is None else (len(self.heads), self.k)

    def offsets(self) -> np.ndarray:
        """int64 ``[n_documents + 1]``: document i is rows ``[offsets[i], offsets[i + 1])`` (verified, loaded once)."""
        if self._offsets is None:
            self._files["documents.offsets"].check_all()
            offsets = np.fromfile(self.path / "documents.offsets", dtype=np.int64)
            if len(offsets) != self.n_documents + 1 or offsets[0] != 0 or offsets[-1] != self.n_tokens or (
                    np.diff(offsets) < 0).any():
                raise GrouterError(f"routing stream {self.path} is corrupt: documents.offsets does not describe "
                                   f"{self.n_documents} documents of {self.n_tokens} tokens; {self._redo}")
            self._offsets = offsets
        return self._offsets

    def _map(self, name: str, dtype: np.dtype) -> np.ndarray:
        shape = (self.n_tokens, *self.token_shape)
        return np.memmap(self.path / name, dtype=dtype, mode="r", shape=shape) if shape[0] else np.zeros(shape, dtype)

    def ids(self) -> np.ndarray:
        """Every token's ids ``[n_tokens, k]`` (``[n_tokens, H, k]``), memory-mapped, all verified first."""
        self._files["stream.ids"].check_all()
        return self._map("stream.ids", self.ids_dtype)

    def rows(self, rows: np.ndarray) -> Routing:
        """The routing of stream rows ``rows`` (tokens of ``PREFIX.bin``): ids long and weights float32
        ``[n, k]`` (``[n, H, k]``, ``heads`` set); the chunks holding them verified first."""
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size and not 0 <= int(rows.min()) <= int(rows.max()) < self.n_tokens:
            raise GrouterError(f"rows {int(rows.min())}..{int(rows.max())} are outside routing stream {self.path}'s "
                               f"{self.n_tokens} tokens")
        per_token = math.prod(self.token_shape)
        self._files["stream.ids"].check_rows(rows * per_token * self.ids_dtype.itemsize, per_token * self.ids_dtype.itemsize)
        self._files["stream.weights"].check_rows(rows * per_token * 2, per_token * 2)
        ids = np.asarray(self._map("stream.ids", self.ids_dtype)[rows]).astype(np.int64)
        check_expert_ids(torch.from_numpy(ids), self.n_experts, f"routing stream {self.path}; {self._redo}")
        bits = np.ascontiguousarray(self._map("stream.weights", np.dtype(np.uint16))[rows]).view(np.int16)
        weights = torch.from_numpy(bits).view(WEIGHTS_DTYPES[self.manifest["weights_dtype"]]).float()
        return Routing(torch.from_numpy(ids), weights, heads=self.heads)

    def __repr__(self) -> str:
        return (f"RoutingStream({str(self.path)!r}, k={self.k}, n_experts={self.n_experts}, "
                f"documents={self.n_documents}, tokens={self.n_tokens}, prefix={self.manifest['prefix']['path']!r})")


def span_rows(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The rows of spans ``[starts[i], starts[i] + lengths[i])``, concatenated (vectorised)."""
    starts, lengths = np.asarray(starts, dtype=np.int64), np.asarray(lengths, dtype=np.int64)
    first = np.repeat(starts - (np.cumsum(lengths) - lengths), lengths)
    return first + np.arange(int(lengths.sum()), dtype=np.int64)


class StreamSamples:
    """A stream read as samples the way GPTDataset makes them, for planning (``grouter place``): documents in a
    seeded random order, concatenated, cut every ``seq_len`` tokens (the last partial sample dropped).
    Megatron's own samples use its own shuffle, so these are a draw from the same distribution, not its
    samples. Reads like a routing store's ids ``[n, seq_len, k]`` (``[n, seq_len, H, k]``), lazily: a slice
    stays lazy, an index array or ``np.asarray`` gathers those samples' rows."""

    def __init__(self, stream: RoutingStream, seq_len: int, seed: int, rows: slice = slice(None)):
        self.stream, self.seq_len, self.seed = stream, int(seq_len), int(seed)
        offsets = stream.offsets()
        self.order = np.random.default_rng(self.seed).permutation(stream.n_documents)
        lengths = np.diff(offsets)[self.order]
        self.first_row, self.ends = offsets[:-1][self.order], np.cumsum(lengths)
        self.starts = self.ends - lengths  # each (shuffled) document's first position in the concatenation
        self.index = np.arange(stream.n_tokens // self.seq_len)[rows]
        self.ids_map = stream.ids()
        self.shape = (len(self.index), self.seq_len, *stream.token_shape)
        self.ndim, self.dtype = len(self.shape), stream.ids_dtype

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows):
        if isinstance(rows, slice):
            view = StreamSamples.__new__(StreamSamples)
            view.__dict__.update(self.__dict__, index=self.index[rows])
            view.shape = (len(view.index), *self.shape[1:])
            return view
        return self._read(self.index[rows])

    def __array__(self, dtype=None, copy=None):
        out = self._read(self.index)
        return out if dtype is None else out.astype(dtype)

    def rows(self, samples: np.ndarray) -> np.ndarray:
        """Stream rows ``[len(samples), seq_len]`` of these samples' tokens."""
        position = np.asarray(samples, dtype=np.int64)[:, None] * self.seq_len + np.arange(self.seq_len)
        j = np.searchsorted(self.ends, position, side="right")  # the document (in the shuffled order) of each
        return self.first_row[j] + position - self.starts[j]

    def _read(self, samples: np.ndarray) -> np.ndarray:
        return np.asarray(self.ids_map[self.rows(np.atleast_1d(samples)).reshape(-1)]).reshape(
            len(np.atleast_1d(samples)), self.seq_len, *self.stream.token_shape)


@dataclass
class StreamPlanning:
    """What ``grouter place`` reads of a routing store, from a stream: :class:`StreamSamples` as the ``train``
    split, E, k, heads, and where the routing came from (``kind`` "stream": only the plan's expert placement
    applies to Megatron's own samples)."""

    stream: RoutingStream
    seq_len: int
    seed: int
    kind: str = "stream"

    def ids(self, split: str) -> StreamSamples:
        if split != "train":
            raise GrouterError("a routing stream has one split: its samples are cut at training time (use train)")
        return StreamSamples(self.stream, self.seq_len, self.seed)

    @property
    def path(self) -> Path:
        return self.stream.path

    @property
    def n_experts(self) -> int:
        return self.stream.n_experts

    @property
    def k(self) -> int:
        return self.stream.k

    @property
    def heads(self) -> Heads | None:
        return self.stream.heads

    @property
    def manifest(self) -> dict:
        m = self.stream.manifest
        return {"dataset_fingerprint": m["prefix"]["idx_sha256"], "grouter_fingerprint": m["grouter_fingerprint"]}
