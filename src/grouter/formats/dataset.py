"""The packed dataset format: a token stream per split plus an index of fixed-length sequences.

Training reads batches straight from a memmap and never re-tokenizes. Format version 2 (``DIR`` is
the dataset directory):

* ``meta.json``: sizes, domains, tokenizer hash, what went in, a content fingerprint, and the
  checksums of the files (``files``: per-chunk for the token streams, verified as they are read;
  whole-file for the indexes and the tokenizer, verified when they are loaded).
* ``tokenizer.json``: the Hugging Face ``tokenizers`` tokenizer that produced the ids.
* ``{split}.tokens``: the raw token stream (``uint16`` when the vocabulary fits, else ``uint32``).
* ``{split}.index.npy``: int64 ``[n_sequences, 2]`` = (start offset into the stream, domain id).

Sequence ``i`` covers stream tokens ``[start, start + L + 1)`` (``L`` = seq_len), so consecutive
packed sequences share one token and ``input_ids, labels = seq[:-1], seq[1:]``; every sequence has
exactly one domain. How corpora become this format (tokenizing, packing, splits) is
:mod:`grouter.data`'s; this module is the reader (:class:`PackedDataset`) and the writer's parts
(:func:`write_split`, :func:`write_meta`).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from tokenizers import Tokenizer

from ..artifacts import read_manifest, reserve, write_json
from ..chunking import batches_of
from ..errors import GrouterError
from ..integrity import CheckedFile, file_checksum, file_sha256, fingerprint_of, verify_file

DATASET_FORMAT = "grouter-dataset"
DATASET_VERSION = 2  # 2: per-chunk checksums of the token streams, checksums of every file
SPLITS = ("train", "val")
COPY_CHUNK = 1 << 24  # tokens moved / counted per step when streaming a memmap


# -- writing ------------------------------------------------------------------------------------

def file_checksums(directory: Path) -> dict:
    """What meta.json records of each file: per-chunk checksums for the token streams (read in
    parts), a SHA-256 for the small files (read whole)."""
    return {**{f"{s}.tokens": file_checksum(directory / f"{s}.tokens") for s in SPLITS},
            **{name: file_sha256(directory / name) for name in [f"{s}.index.npy" for s in SPLITS] + ["tokenizer.json"]}}


def _sha(entry) -> str:
    return entry["sha256"] if isinstance(entry, dict) else entry


def write_split(raw: np.ndarray, ranges: list[np.ndarray], domains: list[str], L: int, out: Path, split: str) -> dict:
    """Write ``{split}.tokens`` (its bytes reserved first: a full disk is an error naming them) and
    ``{split}.index.npy``; return the split's entry for meta.json."""
    offset, index_parts, per_domain = 0, [], {}
    sizes = [int((r[:, 1] - r[:, 0]).sum()) for r in ranges]
    total = sum((n - 1) // L * L + 1 for n in sizes if n > L)  # what the loop below writes
    path = out / f"{split}.tokens"
    with open(path, "wb") as f:
        reserve(f, total * raw.dtype.itemsize, path)
        for d, (name, r) in enumerate(zip(domains, ranges)):
            n_tokens = int((r[:, 1] - r[:, 0]).sum())
            n_seq = (n_tokens - 1) // L if n_tokens > L else 0
            per_domain[name] = n_seq
            if n_seq == 0:
                continue
            used = n_seq * L + 1  # the dropped tail never reaches the file
            _copy_ranges(raw, r, used, f)
            index_parts.append(np.stack([offset + L * np.arange(n_seq), np.full(n_seq, d)], axis=1))
            offset += used
    index = np.concatenate(index_parts) if index_parts else np.zeros((0, 2))
    np.save(out / f"{split}.index.npy", index.astype(np.int64))
    return {"n_sequences": len(index), "n_tokens": offset, "sequences_per_domain": per_domain}


def _copy_ranges(raw: np.ndarray, ranges: np.ndarray, limit: int, f) -> None:
    """Append the first ``limit`` tokens of ``raw[ranges]`` to ``f``, chunk by chunk."""
    if len(ranges) == 0:
        return
    starts, ends = ranges[:, 0], ranges[:, 1]
    run_start = np.flatnonzero(np.concatenate([[True], starts[1:] != ends[:-1]]))  # merge adjacent ranges
    run_end = np.concatenate([run_start[1:], [len(ranges)]]) - 1
    left = limit
    for s, e in zip(starts[run_start], ends[run_end]):
        e = min(int(e), int(s) + left)
        for chunk in range(int(s), e, COPY_CHUNK):
            raw[chunk:min(chunk + COPY_CHUNK, e)].tofile(f)
        left -= e - int(s)
        if left == 0:
            return


def write_meta(directory: Path, *, vocab_size: int, token_dtype: np.dtype, seq_len: int, eos_id: int,
               domains: list[str], splits: dict, val_fraction: float, seed: int, sources: dict,
               documents_end_with_eos: bool = True) -> None:
    """``meta.json`` of a freshly packed dataset whose files are all in ``directory``: their
    checksums and the content fingerprint (token streams and indexes, seq_len and vocabulary)."""
    files = file_checksums(directory)
    write_json(directory / "meta.json", {
        "format": DATASET_FORMAT, "version": DATASET_VERSION, "vocab_size": vocab_size,
        "token_dtype": np.dtype(token_dtype).name, "seq_len": seq_len, "eos_id": eos_id,
        "documents_end_with_eos": documents_end_with_eos, "domains": domains,
        "splits": splits, "val_fraction": val_fraction, "seed": seed, "tokenizer_sha256": files["tokenizer.json"],
        "sources": sources, "files": files,
        "fingerprint": fingerprint_of({"files": {k: _sha(v) for k, v in files.items() if k != "tokenizer.json"},
                                       "seq_len": seq_len, "vocab_size": vocab_size}),
    })


# -- reading ------------------------------------------------------------------------------------


@dataclass(eq=False)
class DataSplit:
    """One split: a token memmap and its sequence index, with batch access for training/eval."""

    name: str
    tokens: np.ndarray  # np.memmap [n_tokens]
    index: np.ndarray  # int64 [n_sequences, 2] = (start, domain id)
    seq_len: int
    domains: list[str]
    vocab_size: int
    checked: CheckedFile | None = field(default=None, repr=False)  # verifies the token bytes as they are read
    _epoch_cache: dict = field(default_factory=dict, repr=False)

    @property
    def n_sequences(self) -> int:
        return len(self.index)

    def __len__(self) -> int:
        return len(self.index)

    def domain_ids(self) -> np.ndarray:
        return self.index[:, 1].copy()

    def sequences(self, idx) -> np.ndarray:
        """int64 ``[len(idx), seq_len + 1]``: one gather from the memmap."""
        starts = self.index[np.asarray(idx, dtype=np.int64), 0]
        if self.checked is not None:
            item = self.tokens.dtype.itemsize
            self.checked.check_rows(starts * item, (self.seq_len + 1) * item)
        return self.tokens[starts[:, None] + np.arange(self.seq_len + 1)].astype(np.int64)

    def batch(self, idx) -> dict[str, torch.Tensor]:
        idx = np.asarray(idx, dtype=np.int64)
        seq = self.sequences(idx)
        return {
            "input_ids": torch.from_numpy(np.ascontiguousarray(seq[:, :-1])),
            "labels": torch.from_numpy(np.ascontiguousarray(seq[:, 1:])),
            "domain": torch.from_numpy(self.index[idx, 1].astype(np.int64)),
            "index": torch.from_numpy(idx.copy()),
        }

    def batch_indices(self, step: int, batch_size: int, seed: int = 0) -> np.ndarray:
        """Sequence indices of training step ``step``: a pure function of (step, batch_size, seed).

        Each epoch is a fresh permutation from ``default_rng([seed, epoch])``, cut into whole
        batches (the remainder is skipped), so a run resumed at step s sees exactly the batches
        an uninterrupted run would.
        """
        if not 1 <= batch_size <= self.n_sequences:
            raise GrouterError(
                f"batch size {batch_size} does not fit the {self.name} split's {self.n_sequences} sequences; "
                "use a smaller --batch-size or more data"
            )
        epoch, position = divmod(int(step), self.n_sequences // batch_size)
        key = (seed, epoch)
        if key not in self._epoch_cache:
            self._epoch_cache.clear()
            self._epoch_cache[key] = np.random.default_rng([seed, epoch]).permutation(self.n_sequences)
        return self._epoch_cache[key][position * batch_size:(position + 1) * batch_size].copy()

    def iter_batches(self, batch_size: int, drop_last: bool = False) -> Iterator[dict[str, torch.Tensor]]:
        """All sequences in index order (evaluation, dispatch statistics)."""
        stop = self.n_sequences - self.n_sequences % batch_size if drop_last else self.n_sequences
        for idx in batches_of(stop, batch_size):
            yield self.batch(idx)

    def token_counts(self) -> np.ndarray:
        """int64 ``[vocab_size]``: how often each id occurs among the sequences' input tokens."""
        counts = np.zeros(self.vocab_size, dtype=np.int64)
        if self.n_sequences == 0:
            return counts
        starts = np.sort(self.index[:, 0])
        # Input tokens of a sequence are [start, start + L); packed sequences tile into runs.
        breaks = np.flatnonzero(starts[1:] != starts[:-1] + self.seq_len) + 1
        for run in np.split(starts, breaks):
            begin, end = int(run[0]), int(run[-1]) + self.seq_len
            for chunk in range(begin, end, COPY_CHUNK):
                stop = min(chunk + COPY_CHUNK, end)
                if self.checked is not None:
                    self.checked.check(chunk * self.tokens.dtype.itemsize, stop * self.tokens.dtype.itemsize)
                found = np.bincount(self.tokens[chunk:stop], minlength=self.vocab_size)
                if len(found) > self.vocab_size:
                    raise GrouterError(f"the {self.name} split holds token ids >= vocab_size {self.vocab_size}; "
                                       "the dataset is corrupt, re-create it")
                counts += found
        return counts


class PackedDataset:
    """A dataset directory opened for reading; token files are memory-mapped on first use."""

    def __init__(self, path: Path, meta: dict):
        self.path = path
        self.meta = meta
        self._splits: dict[str, DataSplit] = {}

    @classmethod
    def open(cls, path: str | Path) -> "PackedDataset":
        """Check the directory is a complete dataset of this format version, cheaply (sizes only)."""
        path = Path(path)
        meta = read_manifest(path, "meta.json", DATASET_FORMAT, DATASET_VERSION, "dataset",
                             f"grouter data prepare --out {path}")
        redo = f"re-create it with `grouter data prepare --out {path} --overwrite`"
        try:
            missing = [k for k in ("vocab_size", "seq_len", "eos_id", "domains", "fingerprint", "files") if k not in meta]
            if missing:
                raise KeyError(missing[0])
            itemsize = np.dtype(meta["token_dtype"]).itemsize
            splits = {name: (int(meta["splits"][name]["n_sequences"]), int(meta["splits"][name]["n_tokens"]))
                      for name in SPLITS}
        except (KeyError, TypeError, ValueError) as e:
            raise GrouterError(f"dataset {path} is corrupt: meta.json lacks or mangles {e}; {redo}") from None
        for name, (n_sequences, n_tokens) in splits.items():
            tokens_file, index_file = path / f"{name}.tokens", path / f"{name}.index.npy"
            size = tokens_file.stat().st_size if tokens_file.is_file() else None
            if size != n_tokens * itemsize:
                raise GrouterError(f"dataset {path} is truncated or corrupt: {tokens_file.name} has "
                                   f"{size} bytes, expected {n_tokens * itemsize}; {redo}")
            if _npy_header(index_file) != ((n_sequences, 2), np.dtype(np.int64)):
                raise GrouterError(f"dataset {path} is truncated or corrupt: {index_file.name} is not an int64 "
                                   f"[{n_sequences}, 2] array; {redo}")
        if splits["train"][0] == 0:
            raise GrouterError(f"dataset {path} has no training sequences; {redo} from more text")
        verify_file(path / "tokenizer.json", meta.get("tokenizer_sha256"), "dataset tokenizer", redo)
        return cls(path, meta)

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    @property
    def seq_len(self) -> int:
        return int(self.meta["seq_len"])

    @property
    def domains(self) -> list[str]:
        return list(self.meta["domains"])

    @property
    def fingerprint(self) -> str:
        return self.meta["fingerprint"]

    @property
    def eos_id(self) -> int:
        return int(self.meta["eos_id"])

    @property
    def documents_end_with_eos(self) -> bool:
        """Whether every document ends with ``eos_id`` (where a Grouter with document starts finds them):
        always for ``grouter data prepare`` / ``tokenize``; for ``data megatron``, prefixes made with
        preprocess_data.py's ``--append-eod``."""
        return bool(self.meta.get("documents_end_with_eos", True))

    @property
    def token_dtype(self) -> np.dtype:
        return np.dtype(self.meta["token_dtype"])

    def split(self, name: str) -> DataSplit:
        if name not in SPLITS:
            raise GrouterError(f"unknown split {name!r}; use one of {', '.join(SPLITS)}")
        if name not in self._splits:
            n_tokens = int(self.meta["splits"][name]["n_tokens"])
            redo = f"re-create it with `grouter data prepare --out {self.path} --overwrite`"
            files = self.meta["files"]
            checked = None
            if n_tokens:
                checked = CheckedFile(self.path / f"{name}.tokens", files.get(f"{name}.tokens"), "dataset tokens", redo)
            tokens = (np.memmap(self.path / f"{name}.tokens", dtype=self.token_dtype, mode="r") if n_tokens
                      else np.zeros(0, dtype=self.token_dtype))  # an empty file cannot be mapped
            verify_file(self.path / f"{name}.index.npy", files.get(f"{name}.index.npy"), "dataset index", redo)
            index = np.load(self.path / f"{name}.index.npy")
            if len(index) and (index[:, 0].min() < 0 or index[:, 0].max() + self.seq_len + 1 > n_tokens
                               or index[:, 1].min() < 0 or index[:, 1].max() >= len(self.domains)):
                raise GrouterError(f"dataset {self.path} is corrupt: {name}.index.npy points outside the data; "
                                   f"re-create it with `grouter data prepare --out {self.path} --overwrite`")
            self._splits[name] = DataSplit(name, tokens, index, self.seq_len, self.domains, self.vocab_size, checked)
        return self._splits[name]

    def tokenizer(self) -> Tokenizer:
        return Tokenizer.from_file(str(self.path / "tokenizer.json"))  # its checksum was verified by open()

    def __repr__(self) -> str:
        sizes = ", ".join(f"{s}={self.meta['splits'][s]['n_sequences']}" for s in SPLITS)
        return f"PackedDataset({str(self.path)!r}, seq_len={self.seq_len}, domains={self.domains}, {sizes})"


def _npy_header(path: Path) -> tuple[tuple[int, ...], np.dtype] | None:
    """(shape, dtype) of a .npy file if its header reads and its size matches, else None."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, dtype = read_header(f)
            data_bytes = os.fstat(f.fileno()).st_size - f.tell()
    except (OSError, ValueError):
        return None
    if data_bytes != math.prod(shape) * dtype.itemsize:
        return None
    return tuple(shape), dtype
